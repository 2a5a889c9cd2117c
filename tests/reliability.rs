//! Reliability: a run survives SIGKILL at any moment (checkpoint writes included) and resumes bit
//! for bit; two runs cannot share a run directory; a read-only or full disk, and a loss that
//! blows up, each get one clear line and never cost the last good checkpoint. Ctrl-C and SIGTERM
//! stop a run after checkpointing the step under way.
//!
//! The tests that need a small or read-only file system mount a tmpfs (Linux, root). Where that
//! is not permitted they write "skipped: cannot mount a small tmpfs (reason)" straight to the
//! terminal and return; the unit tests in src/os/files.rs cover the same messages with injected
//! errors.

mod common;

use common::tokens;
use common::{assert_one_line_error, complete_step_lines, deterministic_step_lines, finch, report, step_lines, text};
use common::{TempDir, TINY_MODEL};
use finch::formats::checkpoint::{self, Checkpoint};
use finch::formats::tokens::write_llmc_u16;
use finch::os::files::{explain_write_error, free_space, io_cause, PAUSE_BEFORE_RENAME_ENV};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// finch with `args`, its atomic writes held `pause_ms` between sync and rename, stdout dropped.
fn finch_command(args: &[String], pause_ms: u64) -> Command {
    let mut command = Command::new(common::finch_bin());
    command.args(args).env(PAUSE_BEFORE_RENAME_ENV, pause_ms.to_string()).stdout(Stdio::null());
    command
}

fn spawn(args: &[String], pause_ms: u64) -> Child {
    finch_command(args, pause_ms).stderr(Stdio::null()).spawn().expect("start finch")
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

fn load_checkpoint(dir: &Path) -> Checkpoint {
    match checkpoint::load(dir) {
        Ok(Some(ck)) => ck,
        Ok(None) => panic!("{}: no checkpoint", dir.display()),
        Err(e) => panic!("{}: checkpoint does not load: {e:#}", dir.display()),
    }
}

fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

fn assert_same_checkpoint(a: &Checkpoint, b: &Checkpoint) {
    assert_eq!(a.state, b.state);
    assert_eq!(a.optimizer.t, b.optimizer.t);
    assert!(same_bits(&a.params, &b.params), "checkpoint weights differ");
    assert!(same_bits(&a.optimizer.m, &b.optimizer.m) && same_bits(&a.optimizer.v, &b.optimizer.v), "moments differ");
}

/// Temporary files of interrupted writes in `dir`: ours (`.NAME.tmp`) and safetensors'
/// (`.tmpXXXXXX`).
fn temp_files(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| (n.starts_with('.') && n.ends_with(".tmp")) || (n.starts_with(".tmp") && n.len() == 10))
        .collect()
}

/// The temporary files of a checkpoint write: safetensors' own while it writes the data, then
/// ours between the sync and the rename.
fn checkpoint_temps(dir: &Path) -> Vec<String> {
    temp_files(dir).into_iter().filter(|n| n == ".checkpoint.safetensors.tmp" || !n.ends_with(".tmp")).collect()
}

/// SplitMix64: the kill moments come from a seed, so a failure can be replayed.
struct SplitMix(u64);

impl SplitMix {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_add(0x9E3779B97F4A7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
        (z ^ (z >> 31)) % n
    }
}

#[derive(Debug, Clone, Copy)]
enum Moment {
    /// `ms` after the process starts: loading, locking, rewriting the log, the first steps.
    Startup { ms: u64 },
    /// `ms` after the log shows `step` complete steps: inside a step, a validation or a write.
    AfterStep { step: usize, ms: u64 },
    /// Inside the first checkpoint write once `step` steps are logged.
    InCheckpointWrite { step: usize },
    /// Inside the final model write.
    InModelWrite,
}

/// Waits for `moment` in the run writing `dir`; false if the process ended first.
fn wait_for(moment: Moment, child: &mut Child, dir: &Path) -> bool {
    let deadline = Instant::now() + Duration::from_secs(60);
    let started = Instant::now();
    let log = dir.join("log.jsonl");
    let mut until = |ready: &mut dyn FnMut() -> bool| loop {
        if ready() {
            return true;
        }
        if child.try_wait().unwrap().is_some() {
            return false;
        }
        assert!(Instant::now() < deadline, "waited a minute for {moment:?}");
        std::thread::sleep(Duration::from_micros(50));
    };
    match moment {
        Moment::Startup { ms } => until(&mut || started.elapsed() >= Duration::from_millis(ms)),
        Moment::AfterStep { step, ms } => {
            until(&mut || complete_step_lines(&log) >= step) && {
                let t = Instant::now();
                until(&mut || t.elapsed() >= Duration::from_millis(ms))
            }
        }
        // First the leftovers of the previous kill must be gone (the new process removes them
        // once it holds the lock), so the write caught is this process's own.
        Moment::InCheckpointWrite { step } => {
            until(&mut || checkpoint_temps(dir).is_empty())
                && until(&mut || complete_step_lines(&log) >= step)
                && until(&mut || !checkpoint_temps(dir).is_empty())
        }
        Moment::InModelWrite => {
            let model = dir.join("model");
            until(&mut || temp_files(&model).is_empty()) && until(&mut || !temp_files(&model).is_empty())
        }
    }
}

fn kill_run_args(data: &str, val: &str, out: &str, steps: usize) -> Vec<String> {
    let steps = steps.to_string();
    strings(&[
        "train",
        "--device",
        "cpu",
        "--data",
        data,
        "--val",
        val,
        "--val-every",
        "8",
        "--val-batches",
        "2",
        "--n-layer",
        "2",
        "--n-head",
        "2",
        "--n-embd",
        "32",
        "--vocab-size",
        "97",
        "--context-length",
        "32",
        "--batch-size",
        "4",
        "--grad-accum",
        "2",
        "--steps",
        &steps,
        "--lr",
        "3e-3",
        "--warmup-steps",
        "4",
        "--min-lr",
        "3e-4",
        "--checkpoint-every",
        "2",
        "--threads",
        "2",
        "--out",
        out,
    ])
}

/// 30 SIGKILLs at seeded random moments of one run (at start-up, mid-step, inside checkpoint
/// writes) and one inside the final model write; after each kill the directory holds a complete
/// checkpoint no older than the last one, and the log reaches it. Resumed to the end, the run
/// equals an uninterrupted one: log (but for timings), checkpoint contents, model bytes.
/// FINCH_KILL_SEED=N replays another schedule.
#[test]
fn sigkill_at_random_moments_and_inside_checkpoint_writes_then_resume_is_bit_exact() {
    const STEPS: usize = 48;
    const KILLS: usize = 30;
    const PAUSE_MS: u64 = 20;
    let seed = std::env::var("FINCH_KILL_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(20_240_520);
    let started = Instant::now();
    let dir = TempDir::new("kill");
    let (data, val) = (dir.path("train.bin"), dir.path("val.bin"));
    write_llmc_u16(&data, &tokens(20_000, 97, 21)).unwrap();
    write_llmc_u16(&val, &tokens(2_000, 97, 22)).unwrap();
    let (data, val) = (data.to_str().unwrap(), val.to_str().unwrap());
    let (whole, broken) = (dir.path("whole"), dir.path("broken"));

    // The uninterrupted run, without the test hook (which must change nothing).
    let out =
        finch(&kill_run_args(data, val, whole.to_str().unwrap(), STEPS).iter().map(|s| s.as_str()).collect::<Vec<_>>());
    assert!(out.status.success(), "{}", text(&out.stderr));

    let mut rng = SplitMix(seed);
    let mut plan: Vec<Moment> = (0..KILLS)
        .map(|i| {
            let step = 1 + i * (STEPS - 4) / KILLS + rng.below(2) as usize;
            match rng.below(3) {
                0 => Moment::Startup { ms: rng.below(150) },
                1 => Moment::AfterStep { step, ms: rng.below(25) },
                _ => Moment::InCheckpointWrite { step },
            }
        })
        .collect();
    plan.push(Moment::InModelWrite);

    let first_args = kill_run_args(data, val, broken.to_str().unwrap(), STEPS);
    let resume_args = strings(&["train", "--resume", broken.to_str().unwrap()]);
    // A run killed after saving its flags but before its first checkpoint is started again, which
    // --resume does only when asked to.
    let restart_args: Vec<String> = resume_args.iter().cloned().chain(["--restart".to_string()]).collect();
    let (mut kills, mut restarts_from_scratch, mut last_step) = (Vec::new(), 0, 0);
    let (mut in_data_write, mut before_rename) = (0, 0);
    for moment in plan {
        // Before the run has saved its flags there is nothing to resume: start it again.
        let resumable = broken.join("train_args.json").exists();
        restarts_from_scratch += usize::from(!resumable && !kills.is_empty());
        // Temporary files seen after the kill are this process's own unless some were left over.
        let fresh = checkpoint_temps(&broken).is_empty() || matches!(moment, Moment::InCheckpointWrite { .. });
        let args = match (resumable, broken.join(checkpoint::CHECKPOINT_FILE).exists()) {
            (false, _) => &first_args,
            (true, true) => &resume_args,
            (true, false) => &restart_args,
        };
        let mut child = spawn(args, PAUSE_MS);
        if !wait_for(moment, &mut child, &broken) {
            let status = child.wait().unwrap();
            assert!(status.success(), "a run ended by itself with {status} before {moment:?}");
            break;
        }
        child.kill().unwrap();
        assert!(!child.wait().unwrap().success());
        let temps = if fresh { checkpoint_temps(&broken) } else { Vec::new() };
        in_data_write += usize::from(temps.iter().any(|n| !n.ends_with(".tmp")));
        before_rename += usize::from(temps.iter().any(|n| n.ends_with(".tmp")));
        kills.push(moment);
        if broken.join(checkpoint::CHECKPOINT_FILE).exists() {
            let step = load_checkpoint(&broken).state.step;
            assert!(step >= last_step, "after {moment:?} the checkpoint went back from step {last_step} to {step}");
            assert!(complete_step_lines(&broken.join("log.jsonl")) >= step, "the log is behind its checkpoint");
            last_step = step;
        } else {
            assert_eq!(last_step, 0, "the checkpoint disappeared after {moment:?}");
        }
    }
    // The last kill was inside the final model write, after the last checkpoint: resuming
    // writes the final outputs from it.
    assert!(matches!(kills.last(), Some(Moment::InModelWrite)), "the run finished before the model-write kill");
    let out = finch(&resume_args.iter().map(|s| s.as_str()).collect::<Vec<_>>());
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("the run completed its 48 steps before it was interrupted"));

    let (want, got) =
        (deterministic_step_lines(&whole.join("log.jsonl")), deterministic_step_lines(&broken.join("log.jsonl")));
    assert_eq!(want.len(), STEPS);
    assert_eq!(got, want, "the resumed log differs");
    assert_same_checkpoint(&load_checkpoint(&whole), &load_checkpoint(&broken));
    let weights = |d: &Path| std::fs::read(d.join("model/model.safetensors")).unwrap();
    assert!(weights(&whole) == weights(&broken), "final weights differ");
    assert!(temp_files(&broken).is_empty() && temp_files(&broken.join("model")).is_empty(), "temporary files left");

    let count = |f: fn(&Moment) -> bool| kills.iter().filter(|m| f(m)).count();
    assert!(kills.len() >= KILLS, "only {} of {} kills happened before the run finished", kills.len(), KILLS + 1);
    assert!(in_data_write + before_rename >= 3, "too few kills landed inside checkpoint writes");
    report(&format!(
        "kill test (seed {seed}): {} SIGKILLs of a {STEPS}-step run aimed at start-up ({}), mid-step ({}), checkpoint \
         writes ({}) and the model write ({}); {in_data_write} landed inside a checkpoint's data write, \
         {before_rename} between its sync and rename, {restarts_from_scratch} before the flags were saved (started \
         afresh); resumed bit-exact in {:.1} s",
        kills.len(),
        count(|m| matches!(m, Moment::Startup { .. })),
        count(|m| matches!(m, Moment::AfterStep { .. })),
        count(|m| matches!(m, Moment::InCheckpointWrite { .. })),
        count(|m| matches!(m, Moment::InModelWrite)),
        started.elapsed().as_secs_f64()
    ));
}

/// `spawn`, keeping stderr to read.
fn spawn_keeping_stderr(args: &[String], pause_ms: u64) -> Child {
    finch_command(args, pause_ms).stderr(Stdio::piped()).spawn().expect("start finch")
}

fn send(child: &Child, signal: libc::c_int) {
    // SAFETY: kill(2) on the pid of a child not yet reaped.
    assert_eq!(unsafe { libc::kill(child.id() as libc::pid_t, signal) }, 0);
}

/// Ctrl-C and SIGTERM (what schedulers send before SIGKILL) finish the step under way, checkpoint
/// it although no checkpoint is due, and exit with 128 + the signal; a second signal stops at
/// once, keeping the last checkpoint whole (here it lands while a checkpoint write is held
/// between its sync and rename). Every such run resumes to the uninterrupted run's log,
/// checkpoint and model, bit for bit.
#[test]
fn a_stop_signal_checkpoints_the_step_under_way_a_second_stops_at_once_and_resume_is_bit_exact() {
    const STEPS: usize = 40;
    const PAUSE_MS: u64 = 2000;
    let dir = TempDir::new("stop");
    let (data, val) = (dir.path("train.bin"), dir.path("val.bin"));
    write_llmc_u16(&data, &tokens(20_000, 97, 41)).unwrap();
    write_llmc_u16(&val, &tokens(2_000, 97, 42)).unwrap();
    let (data, val) = (data.to_str().unwrap(), val.to_str().unwrap());
    let whole = dir.path("whole");
    let out =
        finch(&kill_run_args(data, val, whole.to_str().unwrap(), STEPS).iter().map(|s| s.as_str()).collect::<Vec<_>>());
    assert!(out.status.success(), "{}", text(&out.stderr));
    let model = |d: &Path| std::fs::read(d.join("model/model.safetensors")).unwrap();
    let resume_to_the_end = |run: &Path| {
        let restart = if run.join(checkpoint::CHECKPOINT_FILE).exists() { None } else { Some("--restart") };
        let args: Vec<&str> = ["train", "--resume", run.to_str().unwrap()].into_iter().chain(restart).collect();
        let out = finch(&args);
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert_eq!(
            deterministic_step_lines(&run.join("log.jsonl")),
            deterministic_step_lines(&whole.join("log.jsonl"))
        );
        assert_same_checkpoint(&load_checkpoint(&whole), &load_checkpoint(run));
        assert!(model(&whole) == model(run), "final weights differ");
    };

    // One signal, with no checkpoint due before the end (--checkpoint-every 0).
    for (signal, name, code) in [(libc::SIGTERM, "SIGTERM", 143), (libc::SIGINT, "SIGINT", 130)] {
        let run = dir.path(name);
        let r = run.to_str().unwrap();
        let mut args = kill_run_args(data, val, r, STEPS);
        args.extend(strings(&["--checkpoint-every", "0"]));
        let mut child = spawn_keeping_stderr(&args, 0);
        assert!(wait_for(Moment::AfterStep { step: 5, ms: 0 }, &mut child, &run), "the run ended before step 5");
        send(&child, signal);
        let out = child.wait_with_output().unwrap();
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{name}: {err}");
        let step = load_checkpoint(&run).state.step;
        assert!((5..STEPS).contains(&step), "{name}: checkpoint of step {step}");
        assert_eq!(complete_step_lines(&run.join("log.jsonl")), step, "{name}: the log and the checkpoint disagree");
        let lines: Vec<&str> = err.lines().collect();
        assert_eq!(lines.len(), 2, "{err}");
        assert!(lines[0].starts_with(&format!("{name}: stopping after the step under way")), "{err}");
        let stopped = format!("stopped by {name} after step {step} of {STEPS}; its checkpoint is in {r}: continue with finch train --resume {r}");
        assert_eq!(lines[1], stopped);
        resume_to_the_end(&run);
    }

    // Two signals while a checkpoint write is held for PAUSE_MS between its sync and rename: the
    // first, before the run's first checkpoint (step 2), and after it (step 4).
    for (writing, signal, name, code) in [(2, libc::SIGINT, "SIGINT", 130), (4, libc::SIGTERM, "SIGTERM", 143)] {
        let run = dir.path(&format!("twice-{writing}"));
        let r = run.to_str().unwrap();
        let mut child = spawn_keeping_stderr(&kill_run_args(data, val, r, STEPS), PAUSE_MS);
        let (log, deadline) = (run.join("log.jsonl"), Instant::now() + Duration::from_secs(60));
        while !(complete_step_lines(&log) >= writing && run.join(".checkpoint.safetensors.tmp").exists()) {
            assert!(
                Instant::now() < deadline && child.try_wait().unwrap().is_none(),
                "no checkpoint write of step {writing}"
            );
            std::thread::sleep(Duration::from_micros(200));
        }
        // The log is synced before its checkpoint, and nothing moves during the pause.
        assert_eq!(complete_step_lines(&log), writing);
        send(&child, signal);
        std::thread::sleep(Duration::from_millis(100));
        send(&child, signal);
        let out = child.wait_with_output().unwrap();
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{name} twice: {err}");
        let lines: Vec<&str> = err.lines().collect();
        assert_eq!(lines.len(), 2, "{err}");
        assert!(lines[0].starts_with(&format!("{name}: stopping after the step under way")), "{err}");
        if writing == 2 {
            assert_eq!(lines[1], format!("{name} again: stopped at once, before the run's first checkpoint, so nothing is saved: start it again from step 1 with finch train --resume {r} --restart"));
            assert!(!run.join(checkpoint::CHECKPOINT_FILE).exists());
        } else {
            assert_eq!(lines[1], format!("{name} again: stopped at once, without finishing the step; the last checkpoint in {r} is intact: continue with finch train --resume {r}"));
            assert_eq!(load_checkpoint(&run).state.step, writing - 2, "the held write was not abandoned");
        }
        resume_to_the_end(&run);
    }
}

fn long_run_args(data: &str, out: &str, steps: usize) -> Vec<String> {
    let steps = steps.to_string();
    let mut args = strings(&["train", "--device", "cpu", "--data", data, "--batch-size", "2", "--steps", &steps]);
    args.extend(strings(&TINY_MODEL));
    args.extend(strings(&["--lr-schedule", "constant", "--checkpoint-every", "1", "--out", out]));
    args
}

#[test]
fn a_second_run_on_a_busy_directory_fails_at_once_and_a_killed_runs_lock_does_not_block() {
    let dir = TempDir::new("lock");
    let data = dir.path("train.bin");
    write_llmc_u16(&data, &tokens(5_000, 50, 31)).unwrap();
    let (data, run) = (data.to_str().unwrap(), dir.path("run"));
    let r = run.to_str().unwrap();

    let mut first = spawn(&long_run_args(data, r, 1_000_000), 0);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !run.join(checkpoint::CHECKPOINT_FILE).exists() {
        assert!(Instant::now() < deadline && first.try_wait().unwrap().is_none(), "the first run made no checkpoint");
        std::thread::sleep(Duration::from_millis(2));
    }
    let busy = format!("{r} is in use by another finch run (pid {})", first.id());
    let t = Instant::now();
    let resume = finch(&["train", "--resume", r]);
    assert_one_line_error(&resume, &[&busy, "wait for it"]);
    // A fresh run on it hears the same, not "already holds a checkpoint".
    let fresh = finch(&long_run_args(data, r, 10).iter().map(|s| s.as_str()).collect::<Vec<_>>());
    assert_one_line_error(&fresh, &[&busy, "choose another --out"]);
    assert!(t.elapsed() < Duration::from_secs(10), "the refusals were not immediate");
    assert!(first.try_wait().unwrap().is_none(), "the first run was disturbed");

    // SIGKILL: the kernel drops the lock with the process; the .lock file (and its pid) stays.
    first.kill().unwrap();
    first.wait().unwrap();
    assert!(run.join(finch::os::files::LOCK_FILE).exists());
    let step = load_checkpoint(&run).state.step;
    let more = (step + 2).to_string();
    let resumed = finch(&["train", "--resume", r, "--steps", &more]);
    assert!(resumed.status.success(), "{}", text(&resumed.stderr));
    assert_eq!(load_checkpoint(&run).state.step, step + 2);
}

/// A tmpfs of `size` mounted on `dir` for the life of the value (then unmounted).
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str, test: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(dir).unwrap();
        let out = Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"]).arg(dir).output();
        match out {
            Ok(o) if o.status.success() => Some(Tmpfs(dir.to_owned())),
            Ok(o) => {
                report(&format!("test {test} ... skipped: cannot mount a small tmpfs ({})", text(&o.stderr).trim()));
                None
            }
            Err(e) => {
                report(&format!("test {test} ... skipped: cannot mount a small tmpfs ({e})"));
                None
            }
        }
    }

    fn remount_read_only(&self) {
        let out = Command::new("mount").args(["-o", "remount,ro"]).arg(&self.0).output().unwrap();
        assert!(out.status.success(), "remount read-only: {}", text(&out.stderr));
    }

    /// Leaves about `left` bytes free by growing a filler file.
    fn fill_leaving(&self, left: u64) {
        let more = free_space(&self.0).unwrap().saturating_sub(left);
        let mut filler = std::fs::OpenOptions::new().create(true).append(true).open(self.0.join("filler")).unwrap();
        let _ = filler.write_all(&vec![1u8; more as usize]);
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).output();
    }
}

fn small_args<'a>(data: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["train", "--device", "cpu", "--data", data, "--batch-size", "2", "--steps", "3"];
    args.extend_from_slice(&TINY_MODEL);
    args.extend_from_slice(extra);
    args
}

#[test]
fn a_read_only_directory_gets_one_line_naming_it() {
    let test = "a_read_only_directory_gets_one_line_naming_it";
    let dir = TempDir::new("readonly");
    let data = dir.path("train.bin");
    write_llmc_u16(&data, &tokens(2_000, 50, 41)).unwrap();
    let data = data.to_str().unwrap();
    let Some(fs) = Tmpfs::mount(&dir.path("ro"), "1m", test) else { return };
    let ro = fs.0.to_str().unwrap().to_string();
    let run = format!("{ro}/run");
    assert!(finch(&small_args(data, &["--out", &run])).status.success());
    fs.remount_read_only();

    let expect = |args: &[&str], wants: &[&str]| assert_one_line_error(&finch(&small_args(data, args)), wants);
    expect(&["--out", &ro], &[&format!("--out {ro}: cannot write (read-only file system)")]);
    expect(
        &["--out", &format!("{ro}/new")],
        &[&format!("--out {ro}/new: cannot create the directory (read-only file system)")],
    );
    assert_one_line_error(
        &finch(&["train", "--resume", &run, "--steps", "5"]),
        &[&format!("--resume {run}: cannot write (read-only file system)")],
    );
    expect(
        &["--save", &format!("{ro}/model")],
        &[&format!("--save {ro}/model: cannot create the directory (read-only file system)")],
    );
    expect(
        &["--log", &format!("{ro}/log.jsonl")],
        &[&format!("{ro}/log.jsonl: cannot create (read-only file system)")],
    );
}

#[test]
fn a_full_disk_is_refused_up_front_or_stops_the_run_keeping_its_checkpoint() {
    let test = "a_full_disk_is_refused_up_front_or_stops_the_run_keeping_its_checkpoint";
    let dir = TempDir::new("full");
    let data = dir.path("train.bin");
    write_llmc_u16(&data, &tokens(20_000, 97, 51)).unwrap();
    let data = data.to_str().unwrap();
    let Some(fs) = Tmpfs::mount(&dir.path("small"), "1m", test) else { return };
    let small = fs.0.to_str().unwrap().to_string();
    let model = ["--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--vocab-size", "97", "--context-length", "32"];
    let run_args = |out: &str, embd: &'static str, steps: &'static str| -> Vec<String> {
        let mut args = strings(&["train", "--device", "cpu", "--data", data, "--batch-size", "2", "--steps", steps]);
        args.extend(strings(&model));
        args.extend(strings(&["--n-embd", embd, "--checkpoint-every", "1", "--out", out]));
        args
    };

    // Up front: a model whose checkpoint alone exceeds the 1 MiB file system.
    let big = run_args(&format!("{small}/big"), "96", "3");
    assert_one_line_error(
        &finch(&big.iter().map(|s| s.as_str()).collect::<Vec<_>>()),
        &[
            &format!("--out {small}/big: not enough space left on device (needed ~"),
            "for the checkpoint and the final model",
            "MiB free)",
        ],
    );

    // Mid-run: the disk fills up after the first checkpoints; the next one is refused with the
    // numbers, the last one stays whole, and the run resumes once there is room again.
    let run = format!("{small}/run");
    let run_dir = PathBuf::from(&run);
    let mut child = Command::new(common::finch_bin())
        .args(run_args(&run, "32", "100000"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while complete_step_lines(&run_dir.join("log.jsonl")) < 3 {
        assert!(Instant::now() < deadline && child.try_wait().unwrap().is_none(), "the run did not start");
        std::thread::sleep(Duration::from_millis(1));
    }
    // Keep ~100 KiB free (a checkpoint needs ~0.4 MiB), topping up as replaced files are freed.
    while child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the run never noticed the full disk");
        fs.fill_leaving(100 << 10);
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    assert_one_line_error(
        &out,
        &[&format!("--out {run}: "), "space left on device (needed ~0.4 MiB for the checkpoint, ", " MiB free)"],
    );
    let ck = load_checkpoint(&run_dir);
    assert!(text(&out.stderr).contains(&format!("the checkpoint of step {} is intact", ck.state.step)));
    assert!(text(&out.stderr).contains(&format!("continue with --resume {run}")));
    assert!(temp_files(&run_dir).is_empty(), "temporary files left: {:?}", temp_files(&run_dir));
    assert!(complete_step_lines(&run_dir.join("log.jsonl")) >= ck.state.step);

    // The write itself failing with ENOSPC (no up-front check): the old checkpoint is untouched,
    // no temporary file is left, and the error reads as one line with the numbers.
    let mut later = ck.state;
    later.step += 1;
    let err = checkpoint::save(&run_dir, &ck.config, &ck.params, &ck.optimizer, &later).unwrap_err();
    assert_eq!(io_cause(&err).and_then(|e| e.raw_os_error()), Some(28), "{err:#}");
    let line = format!(
        "{:#}",
        explain_write_error(err, "--out", &run_dir, Some((12 * ck.params.len() as u64, "the checkpoint")))
    );
    assert!(
        line.starts_with(&format!("--out {run}: no space left on device (needed ~0.4 MiB for the checkpoint, ")),
        "{line}"
    );
    assert!(line.ends_with(" MiB free)") && !line.contains('\n'), "{line}");
    assert!(temp_files(&run_dir).is_empty(), "temporary files left: {:?}", temp_files(&run_dir));
    assert_same_checkpoint(&load_checkpoint(&run_dir), &ck);

    std::fs::remove_file(fs.0.join("filler")).unwrap();
    let more = (ck.state.step + 2).to_string();
    let resumed = finch(&["train", "--resume", &run, "--steps", &more]);
    assert!(resumed.status.success(), "{}", text(&resumed.stderr));
    assert_eq!(load_checkpoint(&run_dir).state.step, ck.state.step + 2);
}

/// A learning rate of 1e30 gives finite weights after step 1 (AdamW moves each by about lr) and a
/// NaN loss at step 2: a real divergence, deterministic on a given machine.
fn diverging_args<'a>(data: &'a str, out: &'a str, steps: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["train", "--device", "cpu", "--data", data, "--batch-size", "2", "--steps", steps];
    args.extend_from_slice(&TINY_MODEL);
    args.extend_from_slice(&["--lr", "1e30", "--lr-schedule", "constant", "--checkpoint-every", "1", "--out", out]);
    args.extend_from_slice(extra);
    args
}

#[test]
fn a_nonfinite_step_stops_the_run_naming_the_tensor_or_with_skip_nonfinite_is_skipped_and_counted() {
    let dir = TempDir::new("nonfinite");
    let data = dir.path("train.bin");
    write_llmc_u16(&data, &tokens(2_000, 50, 61)).unwrap();
    let data = data.to_str().unwrap();
    let (stop, skip, split) = (dir.path("stop"), dir.path("skip"), dir.path("split"));
    let (stop_s, skip_s, split_s) = (stop.to_str().unwrap(), skip.to_str().unwrap(), split.to_str().unwrap());

    // Default: stop before the bad update, name the first non-finite gradient, keep step 1's checkpoint.
    let out = finch(&diverging_args(data, stop_s, "12", &[]));
    assert_one_line_error(
        &out,
        &[
            "step 2: the loss is ",
            "(first non-finite gradient: wte.weight[",
            "stopped before applying its update (the checkpoint of step 1 in ",
            "pass --skip-nonfinite",
        ],
    );
    let good = load_checkpoint(&stop);
    assert_eq!((good.state.step, good.optimizer.t), (1, 1));
    assert!(good.params.iter().all(|p| p.is_finite()));
    assert_eq!(step_lines(&stop.join("log.jsonl")).len(), 1);

    // --skip-nonfinite: steps 2..12 are logged as skipped, no optimizer step is taken (the
    // weights and moments stay those of step 1), and the data position still advances.
    let out = finch(&diverging_args(data, skip_s, "12", &["--skip-nonfinite"]));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let summary = "skipped 11 of 12 updates whose loss or gradient norm was not finite (--skip-nonfinite)";
    assert!(text(&out.stdout).contains(summary), "{}", text(&out.stdout));
    assert!(text(&out.stdout).contains("step 2: the loss is "), "{}", text(&out.stdout));
    let lines = step_lines(&skip.join("log.jsonl"));
    assert_eq!(lines.len(), 12);
    assert!(lines[0].get("skipped").is_none() && lines[0]["loss"].is_f64());
    assert!(lines[1..].iter().all(|l| l["skipped"] == true && l["loss"].is_null()));
    let ck = load_checkpoint(&skip);
    assert_eq!((ck.state.step, ck.optimizer.t), (12, 1));
    assert_eq!(ck.state.walker.position, 12 * good.state.walker.position);
    assert!(same_bits(&ck.params, &good.params) && same_bits(&ck.optimizer.m, &good.optimizer.m));
    assert!(skip.join("model/model.safetensors").exists());

    // The count survives a resume: 6 steps, then extended to 12.
    assert!(finch(&diverging_args(data, split_s, "6", &["--skip-nonfinite"])).status.success());
    let out = finch(&["train", "--resume", split_s, "--steps", "12"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains(summary), "{}", text(&out.stdout));
    assert_eq!(deterministic_step_lines(&split.join("log.jsonl")), deterministic_step_lines(&skip.join("log.jsonl")));
}
