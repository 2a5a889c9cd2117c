//! Compiles every `kernels/*.cu` to PTX with nvcc, twice: for `compute_80` (portable: Ampere and
//! later, JIT-compiled by the driver) and `compute_90a` (Hopper-only instructions such as wgmma
//! and TMA). The library embeds the PTX (`src/cuda/ptx.rs`) and cudarc loads it at run time, so
//! the binary itself needs no CUDA to build or to start.
//!
//! Where ptxas sits beside nvcc, each PTX is also assembled (`ptxas -v`) to a cubin for sm_80 and
//! sm_90a, which the library embeds too: a GPU of those families then loads machine code at
//! start, with no JIT (and no PTX-versus-driver question), and falls back to the PTX otherwise.
//! The register, shared-memory and spill report is written to `$OUT_DIR/ptxas-report.txt` (and
//! embedded, so `finch check` can show it). Spills are warnings, or errors with `DENY_SPILLS=1`.
//!
//! Without nvcc the build succeeds with no kernels (GPU commands then say so), unless
//! `REQUIRE_NVCC=1`, which CI sets so that every CI run compiles and assembles every kernel.

use std::env;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

/// (virtual architecture for the PTX, real architecture ptxas checks it against).
const ARCHES: [(&str, &str); 2] = [("compute_80", "sm_80"), ("compute_90a", "sm_90a")];

fn main() {
    println!("cargo:rerun-if-changed=kernels");
    for var in ["NVCC", "CUDA_HOME", "CUDA_PATH", "CUDA_ROOT", "REQUIRE_NVCC", "DENY_SPILLS", "PATH"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let flag = |name: &str| env::var(name).is_ok_and(|v| v == "1");
    let kernels = kernel_sources(Path::new("kernels"));

    let Some(nvcc) = find_nvcc() else {
        if flag("REQUIRE_NVCC") {
            fail("REQUIRE_NVCC=1 but nvcc was not found (looked at $NVCC, $CUDA_HOME/$CUDA_PATH/$CUDA_ROOT/bin/nvcc, PATH and /usr/local/cuda/bin/nvcc)");
        }
        println!(
            "cargo:warning=nvcc not found: building finch without CUDA kernels (set CUDA_HOME or NVCC to build them)"
        );
        write_embedding(&out_dir, None, &[], "", false);
        return;
    };
    let version = nvcc_version(&nvcc);
    let ptxas = nvcc.with_file_name(if cfg!(windows) { "ptxas.exe" } else { "ptxas" });
    let ptxas = ptxas.is_file().then_some(ptxas);

    // One job per (kernel file, architecture), run a few at a time.
    let jobs: Vec<(&PathBuf, (&str, &str))> = kernels.iter().flat_map(|k| ARCHES.map(|a| (k, a))).collect();
    let parallel = env::var("NUM_JOBS").ok().and_then(|n| n.parse().ok()).unwrap_or(2usize).max(1);
    let mut reports = Vec::new();
    for batch in jobs.chunks(parallel) {
        let results: Vec<Result<String, String>> = std::thread::scope(|s| {
            let handles: Vec<_> = batch
                .iter()
                .map(|&(src, arch)| {
                    let (nvcc, ptxas, out_dir) = (&nvcc, ptxas.as_deref(), &out_dir);
                    s.spawn(move || compile(nvcc, ptxas, src, arch, out_dir))
                })
                .collect();
            handles.into_iter().map(|h| h.join().expect("compile thread")).collect()
        });
        for r in results {
            match r {
                Ok(report) => reports.push(report),
                Err(e) => fail(&e),
            }
        }
    }

    let mut summary = String::new();
    let mut spills = Vec::new();
    for report in &reports {
        for f in parse_ptxas(report) {
            writeln!(
                summary,
                "{:<8} {:<48} {:>4} regs {:>6} B smem {:>5} B stack {:>5} B spill-st {:>5} B spill-ld",
                f.arch, f.name, f.registers, f.smem, f.stack, f.spill_stores, f.spill_loads
            )
            .unwrap();
            if f.spill_stores > 0 || f.spill_loads > 0 {
                spills.push(format!(
                    "{} on {}: {} bytes spill stores, {} bytes spill loads",
                    f.name, f.arch, f.spill_stores, f.spill_loads
                ));
            }
        }
    }
    std::fs::write(out_dir.join("ptxas-report.txt"), &summary).expect("write ptxas report");
    if ptxas.is_none() {
        println!("cargo:warning=ptxas not found beside {}: kernels compiled to PTX but not assembled", nvcc.display());
    }
    for s in &spills {
        if flag("DENY_SPILLS") {
            fail(&format!("register spills with DENY_SPILLS=1: {s}"));
        }
        println!("cargo:warning=register spill: {s}");
    }
    write_embedding(&out_dir, Some(&version), &kernels, &summary, ptxas.is_some());
}

fn fail(message: &str) -> ! {
    eprintln!("error: {message}");
    std::process::exit(1);
}

/// `kernels/*.cu`, sorted. Headers (`*.cuh`) are included by them, not compiled.
fn kernel_sources(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.extension().is_some_and(|e| e == "cu")).collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

/// $NVCC, then $CUDA_HOME|$CUDA_PATH|$CUDA_ROOT/bin/nvcc, then nvcc on PATH, then /usr/local/cuda.
fn find_nvcc() -> Option<PathBuf> {
    if let Some(p) = env::var_os("NVCC") {
        return Some(PathBuf::from(p));
    }
    let exe = if cfg!(windows) { "nvcc.exe" } else { "nvcc" };
    for var in ["CUDA_HOME", "CUDA_PATH", "CUDA_ROOT"] {
        if let Some(home) = env::var_os(var) {
            let p = PathBuf::from(home).join("bin").join(exe);
            if p.is_file() {
                return Some(p);
            }
        }
    }
    if let Some(path) = env::var_os("PATH") {
        if let Some(p) = env::split_paths(&path).map(|d| d.join(exe)).find(|p| p.is_file()) {
            return Some(p);
        }
    }
    Some(PathBuf::from("/usr/local/cuda/bin").join(exe)).filter(|p| p.is_file())
}

fn nvcc_version(nvcc: &Path) -> String {
    let out = Command::new(nvcc).arg("--version").output();
    let out = match out {
        Ok(o) if o.status.success() => o,
        Ok(o) => fail(&format!("{} --version failed: {}", nvcc.display(), String::from_utf8_lossy(&o.stderr).trim())),
        Err(e) => fail(&format!("cannot run {}: {e}", nvcc.display())),
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let release = text.lines().find(|l| l.contains("release")).unwrap_or("unknown release").trim();
    format!("{} ({release})", nvcc.display())
}

/// nvcc → PTX, then ptxas -v on it to a cubin (when ptxas is present). Returns ptxas's report.
fn compile(
    nvcc: &Path,
    ptxas: Option<&Path>,
    src: &Path,
    (virt, real): (&str, &str),
    out_dir: &Path,
) -> Result<String, String> {
    let stem = src.file_stem().unwrap().to_string_lossy();
    let ptx = out_dir.join(format!("{stem}.{virt}.ptx"));
    let out = Command::new(nvcc)
        .args(["-ptx", "-O3", "-std=c++17", "-lineinfo", &format!("-arch={virt}"), "-Ikernels", "-o"])
        .arg(&ptx)
        .arg(src)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", nvcc.display()))?;
    if !out.status.success() {
        return Err(format!(
            "nvcc failed on {} for {virt}:\n{}{}",
            src.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let Some(ptxas) = ptxas else { return Ok(String::new()) };
    let out = Command::new(ptxas)
        .args(["-v", &format!("-arch={real}"), "-o"])
        .arg(out_dir.join(format!("{stem}.{real}.cubin")))
        .arg(&ptx)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", ptxas.display()))?;
    let report = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() {
        return Err(format!("ptxas failed on {} for {real}:\n{report}", ptx.display()));
    }
    Ok(report)
}

#[derive(Default)]
struct FunctionReport {
    name: String,
    arch: String,
    registers: u64,
    smem: u64,
    stack: u64,
    spill_stores: u64,
    spill_loads: u64,
}

/// The numbers ptxas -v prints per entry function:
///   ptxas info    : Compiling entry function 'NAME' for 'sm_90a'
///       0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
///   ptxas info    : Used 26 registers, used 1 barriers, 4096 bytes smem, 368 bytes cmem[0]
fn parse_ptxas(report: &str) -> Vec<FunctionReport> {
    let number_before = |line: &str, unit: &str| -> u64 {
        line.split(',')
            .find_map(|part| part.trim().strip_suffix(unit).and_then(|n| n.trim().split(' ').next_back()?.parse().ok()))
            .unwrap_or(0)
    };
    let mut functions: Vec<FunctionReport> = Vec::new();
    for line in report.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let mut parts = rest.split('\'');
            let name = parts.next().unwrap_or_default().to_string();
            let arch = parts.nth(1).unwrap_or_default().to_string();
            functions.push(FunctionReport { name, arch, ..Default::default() });
        } else if let Some(f) = functions.last_mut() {
            if line.contains("bytes stack frame") {
                f.stack = number_before(line, "bytes stack frame");
                f.spill_stores = number_before(line, "bytes spill stores");
                f.spill_loads = number_before(line, "bytes spill loads");
            } else if line.contains("Used") && line.contains("registers") {
                let used = line.split("Used").nth(1).unwrap_or_default();
                f.registers = number_before(used, "registers");
                f.smem = number_before(used, "bytes smem");
            }
        }
    }
    functions
}

/// Writes `$OUT_DIR/kernels.rs`, included by src/cuda/ptx.rs: the nvcc used, each family's two
/// PTX texts and (when ptxas made them) two cubins, and the ptxas summary.
fn write_embedding(out_dir: &Path, nvcc: Option<&str>, kernels: &[PathBuf], ptxas_summary: &str, cubins: bool) {
    let mut code = String::new();
    writeln!(code, "pub const NVCC: Option<&str> = {nvcc:?};").unwrap();
    writeln!(code, "pub const PTXAS_REPORT: &str = {ptxas_summary:?};").unwrap();
    writeln!(code, "pub const FAMILIES: &[KernelFamily] = &[").unwrap();
    if nvcc.is_some() {
        for src in kernels {
            let stem = src.file_stem().unwrap().to_string_lossy();
            let path = |virt: &str| out_dir.join(format!("{stem}.{virt}.ptx")).display().to_string();
            let cubin = |real: &str| match cubins {
                true => format!(
                    "Some(include_bytes!({:?}))",
                    out_dir.join(format!("{stem}.{real}.cubin")).display().to_string()
                ),
                false => "None".to_string(),
            };
            writeln!(
                code,
                "    KernelFamily {{ name: {stem:?}, portable: include_str!({:?}), hopper: include_str!({:?}), \
                 cubin_sm80: {}, cubin_sm90a: {} }},",
                path(ARCHES[0].0),
                path(ARCHES[1].0),
                cubin(ARCHES[0].1),
                cubin(ARCHES[1].1)
            )
            .unwrap();
        }
    }
    writeln!(code, "];").unwrap();
    std::fs::write(out_dir.join("kernels.rs"), code).expect("write kernels.rs");
}
