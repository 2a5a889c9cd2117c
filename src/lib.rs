//! finch: train GPT-2-style transformers; every GPU kernel is judged against the CPU reference
//! in [`cpu`]. See docs/ARCHITECTURE.md for a tour.

pub mod checkpoint;
pub mod config;
pub mod cpu;
pub mod cuda;
pub mod data;
pub mod engine;
pub mod fsutil;
pub mod infer;
pub mod interrupt;
pub mod layout;
pub mod mapfile;
pub mod model;
pub mod modelio;
pub mod plot;
pub mod quickstart;
pub mod real;
pub mod resources;
pub mod rng;
pub mod sample;
pub mod schedule;
pub mod sigbus;
pub mod tokenize;
pub mod tokenizer;
pub mod train;
pub mod trainlog;
