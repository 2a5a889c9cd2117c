//! The operating-system plumbing under everything else: read-only maps of large files
//! (`mapfile`) and the SIGBUS handler that names a file failing under its map (`sigbus`),
//! crash-safe writes and the run-directory lock (`files`), Ctrl-C and SIGTERM during training
//! (`interrupt`), and what memory and threads the machine allows (`resources`).

pub mod files;
pub mod interrupt;
pub mod mapfile;
pub mod resources;
pub mod sigbus;
