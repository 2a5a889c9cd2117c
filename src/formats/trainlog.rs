//! What training reports: a JSONL log (one object per step, plus event lines without "step")
//! and the console (a progress bar on a terminal, plain lines otherwise).

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use std::cell::Cell;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// One training step, as logged. Floats print as the shortest string that round-trips.
#[derive(Debug, Clone, Serialize)]
pub struct StepRecord {
    pub step: usize,
    pub loss: f64,
    pub grad_norm: f64,
    pub lr: f64,
    pub ms: f64,
    pub tok_per_s: f64,
    /// Model FLOPs utilisation on a GPU whose peak is known (llm.c's FLOP count over the step's
    /// time, against the dense bf16 peak the start-up line names).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mfu: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub val_loss: Option<f64>,
    /// With --skip-nonfinite: the loss or gradient norm was not finite and the update was skipped
    /// (written as `"skipped":true`; absent otherwise).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub skipped: bool,
}

pub struct JsonlLog {
    path: PathBuf,
    file: File,
    /// The steps logged as skipped (`"skipped":true`) that a resumed log kept.
    pub skipped_before: Vec<usize>,
}

/// Names the log and the problem, in one line (`…: cannot write (no space left on device)`).
fn log_error(e: std::io::Error, path: &Path, what: &str) -> anyhow::Error {
    match crate::os::files::os_problem(&e) {
        Some(problem) => anyhow::anyhow!("{}: cannot {what} ({problem})", path.display()),
        None => anyhow::Error::new(e).context(format!("{}: cannot {what}", path.display())),
    }
}

impl JsonlLog {
    /// Starts a fresh log, replacing any file at `path`.
    pub fn create(path: &Path) -> Result<JsonlLog> {
        let file = File::create(path).map_err(|e| log_error(e, path, "create"))?;
        Ok(JsonlLog { path: path.to_owned(), file, skipped_before: Vec::new() })
    }

    /// Continues the log of a resumed run: step lines after `step` (written after the checkpoint
    /// the run resumes from) are dropped, so the finished log equals an uninterrupted run's.
    pub fn resume(path: &Path, step: usize) -> Result<JsonlLog> {
        let name = path.display();
        let mut kept = String::new();
        let mut skipped_before = Vec::new();
        if path.exists() {
            let reader = BufReader::new(File::open(path).with_context(|| format!("{name}: cannot read"))?);
            for line in reader.lines() {
                let line = line.with_context(|| format!("{name}: cannot read"))?;
                let parsed: Option<serde_json::Value> = serde_json::from_str(&line).ok();
                let line_step = parsed.as_ref().and_then(|v| v.get("step")).and_then(|s| s.as_u64());
                if parsed.is_some() && line_step.is_none_or(|s| s as usize <= step) {
                    let skipped = parsed.as_ref().and_then(|v| v.get("skipped")).and_then(|s| s.as_bool());
                    if let (Some(s), Some(true)) = (line_step, skipped) {
                        skipped_before.push(s as usize);
                    }
                    kept.push_str(&line);
                    kept.push('\n');
                }
            }
        }
        crate::os::files::write_atomically(path, kept.as_bytes()).map_err(|e| {
            match crate::os::files::io_cause(&e).and_then(crate::os::files::os_problem) {
                Some(problem) => anyhow::anyhow!("{name}: cannot rewrite ({problem})"),
                None => e,
            }
        })?;
        let file = OpenOptions::new().append(true).open(path).map_err(|e| log_error(e, path, "append"))?;
        Ok(JsonlLog { path: path.to_owned(), file, skipped_before })
    }

    /// Appends one line. A line is one `write` call, so a killed process leaves at most a
    /// partial last line, which `resume` drops.
    pub fn write(&mut self, record: &impl Serialize) -> Result<()> {
        let line = serde_json::to_string(record)? + "\n";
        self.file.write_all(line.as_bytes()).map_err(|e| log_error(e, &self.path, "write"))
    }

    /// Makes the lines so far durable; called before each checkpoint, so a power cut never
    /// leaves a checkpoint newer than its log.
    pub fn sync(&self) -> Result<()> {
        self.file.sync_data().map_err(|e| log_error(e, &self.path, "sync"))
    }
}

/// Console output for a run of `total` steps.
pub enum Console {
    Bar {
        bar: ProgressBar,
        first: usize,
    },
    Lines(Lines),
    /// Prints nothing: the ranks of a multi-process job other than rank 0.
    Quiet,
}

/// Plain lines, off a terminal: one every `every` steps (and at validation, skipped updates and the
/// last step, and at least once a minute), each with the time so far and an estimate of the rest.
pub struct Lines {
    total: usize,
    every: usize,
    first: usize,
    started: Instant,
    last_line: Cell<Instant>,
}

/// A line at least this often, however slow the steps.
const LINE_SECONDS: f64 = 60.0;

impl Console {
    /// For a run whose next step is `first_step + 1`.
    pub fn new(first_step: usize, total: usize, every: usize) -> Console {
        if std::io::stderr().is_terminal() {
            let bar = ProgressBar::new(total as u64).with_position(first_step as u64);
            bar.set_style(
                ProgressStyle::with_template("{bar:30} {pos}/{len} steps  {msg}  [{elapsed_precise} < {eta_precise}]")
                    .expect("valid template"),
            );
            bar.reset_eta();
            Console::Bar { bar, first: first_step }
        } else {
            let now = Instant::now();
            Console::Lines(Lines { total, every, first: first_step, started: now, last_line: Cell::new(now) })
        }
    }

    /// The steps already done when the run (this process) started.
    pub fn first_step(&self) -> usize {
        match self {
            Console::Bar { first, .. } => *first,
            Console::Lines(l) => l.first,
            Console::Quiet => 0,
        }
    }

    /// Prints a message above the bar (or as a plain line).
    pub fn println(&self, msg: &str) {
        match self {
            Console::Bar { bar, .. } => bar.println(msg),
            Console::Lines(_) => println!("{msg}"),
            Console::Quiet => {}
        }
    }

    pub fn step(&self, r: &StepRecord) {
        if matches!(self, Console::Quiet) {
            return;
        }
        let val = r.val_loss.map(|v| format!(" | val {v:.4}")).unwrap_or_default();
        let mfu = r.mfu.map(|m| format!(" | MFU {:.1}%", 100.0 * m)).unwrap_or_default();
        let text = format!(
            "loss {:.4}{val} | norm {:.3} | lr {:.2e} | {:.0} ms | {:.0} tok/s{mfu}{}",
            r.loss,
            r.grad_norm,
            r.lr,
            r.ms,
            r.tok_per_s,
            if r.skipped { " | update skipped" } else { "" }
        );
        match self {
            Console::Bar { bar, .. } => {
                bar.set_message(text);
                bar.set_position(r.step as u64);
            }
            Console::Quiet => {}
            Console::Lines(l) => {
                let elapsed = l.started.elapsed().as_secs_f64();
                let quiet = l.last_line.get().elapsed().as_secs_f64();
                let due = r.step == l.first + 1
                    || r.step % l.every == 0
                    || r.step == l.total
                    || r.val_loss.is_some()
                    || r.skipped
                    || quiet >= LINE_SECONDS;
                if due {
                    l.last_line.set(Instant::now());
                    let left = elapsed / (r.step - l.first) as f64 * (l.total - r.step) as f64;
                    println!(
                        "step {:>width$}/{} | {text} | {} elapsed, {} left",
                        r.step,
                        l.total,
                        human_duration(elapsed),
                        human_duration(left),
                        width = l.total.to_string().len()
                    )
                }
            }
        }
    }

    pub fn finish(&self) {
        if let Console::Bar { bar, .. } = self {
            bar.finish();
        }
    }
}

/// "45 s", "12 min", "3 h 20 min", "9 days 11 h".
pub fn human_duration(seconds: f64) -> String {
    let s = seconds.max(0.0).round() as u64;
    match s {
        0..90 => format!("{s} s"),
        90..5400 => format!("{} min", (s + 30) / 60),
        5400..172_800 => format!("{} h {} min", s / 3600, s % 3600 / 60),
        _ => format!("{} days {} h", s / 86_400, s % 86_400 / 3600),
    }
}

/// "1 step", "3 steps", "2 batches".
pub fn plural(n: u64, noun: &str) -> String {
    let suffix = match (n, noun.ends_with(['s', 'h'])) {
        (1, _) => "",
        (_, true) => "es",
        _ => "s",
    };
    format!("{n} {noun}{suffix}")
}
