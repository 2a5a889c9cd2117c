//! train_args.json, the flags a run directory keeps for `finch train --resume`: merged with an
//! empty command line and checked as far as `finch train` goes before it opens a file (flags,
//! model, batch shape, memory plans, learning rate): `train::check_saved_args`. It must return,
//! never panic, whatever the file holds.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    let Ok(text) = std::str::from_utf8(input) else { return };
    let _ = finch::cli::train::check_saved_args(text);
});
