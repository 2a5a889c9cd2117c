//! What a model is, whatever runs it: GPT-2's hyper-parameters (`config`), the one layout of
//! parameters and activations that every backend and every file format shares (`layout`), the
//! Llama family's config and layout (`llama`), both families behind one `ModelConfig`
//! (`family`), and seeded initial weights (`init`, drawn with `rng`). Nothing here computes a
//! forward pass; the backends in `cpu` and `cuda` do, over these layouts.

pub mod config;
pub mod family;
pub mod init;
pub mod layout;
pub mod llama;
pub mod rng;
