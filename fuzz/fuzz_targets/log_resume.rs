//! The training log read back on `finch train --resume`: `JsonlLog::resume` on a file holding the
//! input, which must keep exactly the input's JSON lines at or before the step.
#![no_main]

mod common;

use finch::formats::trainlog::JsonlLog;
use libfuzzer_sys::fuzz_target;
use std::sync::LazyLock;

static DIR: LazyLock<std::path::PathBuf> = LazyLock::new(|| common::scratch_dir("resume"));

fuzz_target!(|input: &[u8]| {
    let Some((&step, text)) = input.split_first() else { return };
    let path = DIR.join("log.jsonl");
    std::fs::write(&path, text).unwrap();
    if JsonlLog::resume(&path, step as usize).is_ok() {
        let kept = std::fs::read_to_string(&path).unwrap();
        let input = String::from_utf8_lossy(text);
        // The input's lines as BufRead::lines reads them: "\n" or "\r\n" ends one; the kept
        // file holds each kept line followed by "\n".
        let mut from = input.split_inclusive('\n').map(|l| match l.strip_suffix('\n') {
            Some(l) => l.strip_suffix('\r').unwrap_or(l),
            None => l,
        });
        for line in kept.split_terminator('\n') {
            assert!(from.any(|l| l == line), "kept a line that is not in the input: {line:?}");
            serde_json::from_str::<serde_json::Value>(line).expect("kept lines are JSON");
        }
    }
});
