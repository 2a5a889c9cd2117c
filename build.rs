//! Build script. The CUDA backend issue fills this in: compiling `kernels/*.cu` to PTX with nvcc
//! (compute_80 and compute_90a) for the library to embed. Until then there is nothing to build,
//! and the crate must build on machines with no CUDA toolkit at all.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=kernels");
}
