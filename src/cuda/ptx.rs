//! The PTX that build.rs compiled from kernels/*.cu, embedded in the library.

/// One kernels/*.cu file, compiled twice.
pub struct KernelFamily {
    /// The file stem: "matmul" for kernels/matmul.cu.
    pub name: &'static str,
    /// PTX for compute_80: runs on Ampere and every later GPU (the driver JIT-compiles it).
    pub portable: &'static str,
    /// PTX for compute_90a: Hopper (compute capability 9.0) only, may use wgmma and TMA.
    pub hopper: &'static str,
    /// The portable PTX assembled by ptxas for sm_80: machine code for every 8.x GPU.
    pub cubin_sm80: Option<&'static [u8]>,
    /// The Hopper PTX assembled for sm_90a.
    pub cubin_sm90a: Option<&'static [u8]>,
}

/// The `.version` (PTX ISA) a PTX text declares, e.g. "9.0".
pub fn ptx_isa(ptx: &str) -> Option<&str> {
    ptx.lines().find_map(|l| l.trim_start().strip_prefix(".version ")).map(str::trim)
}

// Defines NVCC (the compiler used, None when the build found none), PTXAS_REPORT (registers,
// shared memory and spills of every kernel) and FAMILIES.
include!(concat!(env!("OUT_DIR"), "/kernels.rs"));

/// The kernel names a PTX module defines (its `.entry` directives).
pub fn entry_names(ptx: &str) -> impl Iterator<Item = &str> {
    ptx.lines().filter_map(|line| {
        let rest =
            line.trim_start().strip_prefix(".visible .entry ").or_else(|| line.trim_start().strip_prefix(".entry "))?;
        rest.split('(').next().map(str::trim)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_names_are_read_from_ptx() {
        let ptx = "//\n.version 9.0\n.visible .entry matmul_bf16(\n\t.param .u64 a\n)\n{\n}\n.visible .entry bias_grad_f32(\n";
        assert_eq!(entry_names(ptx).collect::<Vec<_>>(), ["matmul_bf16", "bias_grad_f32"]);
    }

    #[test]
    fn the_isa_version_is_read_from_ptx() {
        assert_eq!(ptx_isa("//\n.version 9.0\n.target sm_80\n"), Some("9.0"));
        assert_eq!(ptx_isa(".target sm_80\n"), None);
    }

    #[test]
    fn every_family_has_both_architectures() {
        for f in FAMILIES {
            assert!(f.portable.contains(".target sm_80"), "{}: portable PTX targets sm_80", f.name);
            assert!(f.hopper.contains(".target sm_90a"), "{}: Hopper PTX targets sm_90a", f.name);
            assert!(entry_names(f.portable).count() > 0, "{}: no kernels", f.name);
        }
    }
}
