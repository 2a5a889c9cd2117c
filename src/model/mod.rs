//! What a GPT-2 model is, whatever runs it: its hyper-parameters (`config`), the one layout of
//! parameters and activations that every backend and every file format shares (`layout`), and its
//! seeded initial weights (`init`, drawn with `rng`). Nothing here computes a forward pass; the
//! backends in `cpu` and `cuda` do, over these layouts.

pub mod config;
pub mod init;
pub mod layout;
pub mod rng;
