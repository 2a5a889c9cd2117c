//! The subcommands, one module each: their flags (clap), the checks on them, and what the command
//! does. This is the top layer: it may use every other module, and none uses it. `main.rs` only
//! dispatches here and prints errors.

pub mod bench;
pub mod check;
pub mod device;
pub mod plot;
pub mod quickstart;
pub mod sample;
pub mod tokenize;
pub mod train;
