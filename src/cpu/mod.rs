//! The CPU reference engine, the oracle every GPU kernel is judged against: one file per op, each
//! with an explicit forward and backward (no autograd); the GPT-2 model composed from them
//! (`model`) and the Llama family's (`llama`, with `rmsnorm`, `rope` and `swiglu`); token-by-token
//! inference with a KV cache (`infer`, `infer_llama`); and the float types and GEMM they compute
//! with (`real`).
//!
//! Conventions (from llm.c): every function opens with the shapes it works on; backward
//! functions *accumulate* (`+=`) into their gradient outputs, so a tensor used twice simply
//! receives two contributions; the caller zeroes gradients once per step.
//! Ops are generic over [`Real`](crate::cpu::real::Real): training runs them in f32, the gradient
//! checks in f64. Parallel loops split work into pieces fixed by the shapes alone, never by the
//! thread count, so results are bit-identical run to run on any number of cores.

pub mod attention;
pub mod crossentropy;
pub mod encoder;
pub mod gelu;
pub mod infer;
pub mod infer_llama;
pub mod layernorm;
pub mod llama;
pub mod matmul;
pub mod model;
pub mod optimizer;
pub mod real;
pub mod residual;
pub mod rmsnorm;
pub mod rope;
pub mod swiglu;

#[cfg(test)]
pub(crate) mod gradcheck;
