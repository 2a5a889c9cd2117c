//! finch: train GPT-2-style transformers; every GPU kernel is judged against the CPU reference
//! in [`cpu`]. See docs/ARCHITECTURE.md for a tour.

//TMP pub mod checkpoint;
pub mod config;
pub mod cpu;
//TMP pub mod data;
//TMP pub mod fsutil;
pub mod layout;
pub mod model;
//TMP pub mod modelio;
pub mod real;
pub mod rng;
pub mod schedule;
//TMP pub mod train;
//TMP pub mod trainlog;
