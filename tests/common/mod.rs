//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Flags for a tiny model (1 layer, 2 heads, 8 channels, vocab 50, context 8): fast to train.
pub const TINY_MODEL: [&str; 10] =
    ["--n-layer", "1", "--n-head", "2", "--n-embd", "8", "--vocab-size", "50", "--context-length", "8"];

/// The PyTorch fixture's directory: `$FINCH_FIXTURES/tiny_gpt2` when set (a test binary carried to
/// another machine, as tools/gpu-first-light.sh does), else this checkout's.
pub fn fixture() -> String {
    match std::env::var("FINCH_FIXTURES") {
        Ok(dir) => format!("{dir}/tiny_gpt2"),
        Err(_) => concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny_gpt2").to_string(),
    }
}

/// The finch binary the tests run: `$FINCH_BIN` when set (see [`fixture`]), else cargo's build.
pub fn finch_bin() -> PathBuf {
    std::env::var_os("FINCH_BIN").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_finch")))
}

/// A fresh directory under the system temp dir, removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "finch-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn finch(args: &[&str]) -> Output {
    Command::new(finch_bin()).args(args).output().expect("run finch")
}

/// Prints past the test harness's capture, so the line is always visible (a skipped test says so).
pub fn report(line: &str) {
    use std::io::Write;
    let _ = std::io::stderr().write_all(format!("{line}\n").as_bytes());
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Deterministic pseudo-random tokens below `vocab`.
pub fn tokens(n: usize, vocab: u16, seed: u64) -> Vec<u16> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 33) % vocab as u64) as u16
        })
        .collect()
}

/// The step lines of a JSONL log.
pub fn step_lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v.get("step").is_some())
        .collect()
}

/// The step lines of a log that are complete (end in a newline): what a killed run finished.
pub fn complete_step_lines(path: &Path) -> usize {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.split_inclusive('\n').filter(|l| l.ends_with('\n') && l.contains("\"step\"")).count()
}

/// Step lines without the fields that measure time: what must be identical run to run.
pub fn deterministic_step_lines(path: &Path) -> Vec<serde_json::Value> {
    step_lines(path)
        .into_iter()
        .map(|mut v| {
            let o = v.as_object_mut().unwrap();
            o.remove("ms");
            o.remove("tok_per_s");
            o.remove("mfu");
            v
        })
        .collect()
}

/// A user mistake: non-zero exit, exactly one line on stderr containing each of `wants`, no panic.
pub fn assert_one_line_error(out: &Output, wants: &[&str]) {
    let err = text(&out.stderr);
    assert!(!out.status.success(), "succeeded, stderr: {err}");
    assert!(!err.contains("panicked") && !err.contains("RUST_BACKTRACE"), "panic: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err}");
    for w in wants {
        assert!(err.contains(w), "{err:?} lacks {w:?}");
    }
}
