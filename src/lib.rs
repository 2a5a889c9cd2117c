//! finch: train GPT-2-style transformers; every GPU kernel is judged against the CPU reference
//! in [`cpu`]. See docs/ARCHITECTURE.md for a tour.
//!
//! Layers, from the top; a module uses only those below it:
//! [`cli`] (the subcommands) → [`formats`] (files on disk) → [`cuda`] (the GPU backend) →
//! [`cpu`] (the reference engine) → [`model`] (config, shared layout, init) → [`os`]; beside
//! them, [`dist`] (many processes: launchers, rendezvous) uses only [`os`].

pub mod cli;
pub mod cpu;
pub mod cuda;
pub mod dist;
pub mod formats;
pub mod model;
pub mod os;
