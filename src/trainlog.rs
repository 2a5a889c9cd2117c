//! What training reports: a JSONL log (one object per step, plus event lines without "step")
//! and the console (a progress bar on a terminal, plain lines otherwise).

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::path::{Path, PathBuf};

/// One training step, as logged. Floats print as the shortest string that round-trips.
#[derive(Debug, Clone, Serialize)]
pub struct StepRecord {
    pub step: usize,
    pub loss: f64,
    pub grad_norm: f64,
    pub lr: f64,
    pub ms: f64,
    pub tok_per_s: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub val_loss: Option<f64>,
}

pub struct JsonlLog {
    path: PathBuf,
    file: File,
}

impl JsonlLog {
    /// Starts a fresh log, replacing any file at `path`.
    pub fn create(path: &Path) -> Result<JsonlLog> {
        let file = File::create(path).with_context(|| format!("--log {}: cannot create", path.display()))?;
        Ok(JsonlLog { path: path.to_owned(), file })
    }

    /// Continues the log of a resumed run: step lines after `step` (written after the checkpoint
    /// the run resumes from) are dropped, so the finished log equals an uninterrupted run's.
    pub fn resume(path: &Path, step: usize) -> Result<JsonlLog> {
        let name = path.display();
        let mut kept = String::new();
        if path.exists() {
            let reader = BufReader::new(File::open(path).with_context(|| format!("{name}: cannot read"))?);
            for line in reader.lines() {
                let line = line.with_context(|| format!("{name}: cannot read"))?;
                let parsed: Option<serde_json::Value> = serde_json::from_str(&line).ok();
                let line_step = parsed.as_ref().and_then(|v| v.get("step")).and_then(|s| s.as_u64());
                if parsed.is_some() && line_step.is_none_or(|s| s as usize <= step) {
                    kept.push_str(&line);
                    kept.push('\n');
                }
            }
        }
        crate::fsutil::write_atomically(path, kept.as_bytes())?;
        let file = OpenOptions::new().append(true).open(path).with_context(|| format!("{name}: cannot append"))?;
        Ok(JsonlLog { path: path.to_owned(), file })
    }

    pub fn write(&mut self, record: &impl Serialize) -> Result<()> {
        let line = serde_json::to_string(record)? + "\n";
        self.file.write_all(line.as_bytes()).with_context(|| format!("{}: cannot write", self.path.display()))
    }
}

/// Console output for a run of `total` steps.
pub enum Console {
    Bar(ProgressBar),
    Lines { total: usize },
}

impl Console {
    pub fn new(first_step: usize, total: usize) -> Console {
        if std::io::stderr().is_terminal() {
            let bar = ProgressBar::new(total as u64).with_position(first_step as u64);
            bar.set_style(
                ProgressStyle::with_template("{bar:30} {pos}/{len} steps  {msg}  [{elapsed_precise} < {eta_precise}]")
                    .expect("valid template"),
            );
            Console::Bar(bar)
        } else {
            Console::Lines { total }
        }
    }

    /// Prints a message above the bar (or as a plain line).
    pub fn println(&self, msg: &str) {
        match self {
            Console::Bar(bar) => bar.println(msg),
            Console::Lines { .. } => println!("{msg}"),
        }
    }

    pub fn step(&self, r: &StepRecord) {
        let val = r.val_loss.map(|v| format!(" | val {v:.4}")).unwrap_or_default();
        let text = format!(
            "loss {:.4}{val} | norm {:.3} | lr {:.2e} | {:.0} ms | {:.0} tok/s",
            r.loss, r.grad_norm, r.lr, r.ms, r.tok_per_s
        );
        match self {
            Console::Bar(bar) => {
                bar.set_message(text);
                bar.set_position(r.step as u64);
            }
            Console::Lines { total } => {
                println!("step {:>width$}/{total} | {text}", r.step, width = total.to_string().len())
            }
        }
    }

    pub fn finish(&self) {
        if let Console::Bar(bar) = self {
            bar.finish();
        }
    }
}
