//! Checkpoint and resume: a run killed with SIGKILL and resumed produces the uninterrupted run's
//! log (every field but the timings) and final weights, bit for bit.

mod common;

use common::{complete_step_lines, deterministic_step_lines, finch, step_lines, text, tokens, TempDir, TINY_MODEL};
use finch::formats::tokens::write_llmc_u16;
use std::process::Command;
use std::time::{Duration, Instant};

fn run_args(data: &str, val: &str, out: &str) -> Vec<String> {
    let flags = [
        "train",
        "--device",
        "cpu",
        "--data",
        data,
        "--val",
        val,
        "--val-every",
        "10",
        "--val-batches",
        "2",
        "--n-layer",
        "2",
        "--n-head",
        "4",
        "--n-embd",
        "64",
        "--vocab-size",
        "97",
        "--context-length",
        "64",
        "--batch-size",
        "4",
        "--seq-len",
        "64",
        "--grad-accum",
        "2",
        "--steps",
        "60",
        "--lr",
        "3e-3",
        "--warmup-steps",
        "3",
        "--lr-schedule",
        "cosine",
        "--min-lr",
        "3e-4",
        "--checkpoint-every",
        "5",
        "--out",
        out,
    ];
    flags.iter().map(|s| s.to_string()).collect()
}

#[test]
fn killed_and_resumed_run_equals_the_uninterrupted_run() {
    let dir = TempDir::new("resume");
    let (data, val) = (dir.path("train.bin"), dir.path("val.bin"));
    write_llmc_u16(&data, &tokens(20_000, 97, 11)).unwrap();
    write_llmc_u16(&val, &tokens(2_000, 97, 12)).unwrap();
    let (data, val) = (data.to_str().unwrap(), val.to_str().unwrap());
    let (whole, broken) = (dir.path("whole"), dir.path("broken"));

    let out = finch(&run_args(data, val, whole.to_str().unwrap()).iter().map(|s| s.as_str()).collect::<Vec<_>>());
    assert!(out.status.success(), "{}", text(&out.stderr));

    // Start the same run and kill it with SIGKILL once it is past a few checkpoints.
    let mut child = Command::new(common::finch_bin())
        .args(run_args(data, val, broken.to_str().unwrap()))
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let log = broken.join("log.jsonl");
    let deadline = Instant::now() + Duration::from_secs(120);
    while complete_step_lines(&log) < 17 {
        assert!(Instant::now() < deadline, "the run never reached step 17");
        assert!(child.try_wait().unwrap().is_none(), "the run ended before it could be killed");
        std::thread::sleep(Duration::from_millis(1));
    }
    child.kill().unwrap();
    assert!(!child.wait().unwrap().success());
    let killed_at = complete_step_lines(&log);
    assert!(killed_at < 60, "the run finished before the kill");

    let out = finch(&["train", "--resume", broken.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("resuming after step"), "{}", text(&out.stdout));

    let (want, got) = (deterministic_step_lines(&whole.join("log.jsonl")), deterministic_step_lines(&log));
    assert_eq!(want.len(), 60);
    assert!(want.iter().any(|v| v.get("val_loss").is_some()));
    assert_eq!(got, want, "resumed log differs (killed after {killed_at} steps)");
    let weights = |d: &std::path::Path| std::fs::read(d.join("model/model.safetensors")).unwrap();
    assert!(weights(&whole) == weights(&broken), "final weights differ");
}

#[test]
fn run_directories_are_not_overwritten_and_finished_runs_can_be_extended() {
    let dir = TempDir::new("rundir");
    let data = dir.path("train.bin");
    write_llmc_u16(&data, &tokens(2_000, 50, 13)).unwrap();
    let run = dir.path("run");
    let (d, r) = (data.to_str().unwrap(), run.to_str().unwrap());
    let mut base = vec!["train", "--device", "cpu", "--data", d, "--batch-size", "2", "--steps", "4"];
    base.extend_from_slice(&TINY_MODEL);
    base.extend_from_slice(&["--lr-schedule", "constant", "--out", r]);
    assert!(finch(&base).status.success());

    let again = finch(&base);
    assert!(!again.status.success());
    assert!(text(&again.stderr).contains("already holds a checkpoint") && text(&again.stderr).contains("--resume"));

    let done = finch(&["train", "--resume", r]);
    assert!(!done.status.success());
    assert!(text(&done.stderr).contains("already completed 4 of 4 steps"), "{}", text(&done.stderr));

    // A finished run whose model is missing (killed while writing it, or deleted) gets it back.
    std::fs::remove_file(run.join("model/model.safetensors")).unwrap();
    let finish = finch(&["train", "--resume", r]);
    assert!(finish.status.success(), "{}", text(&finish.stderr));
    assert!(text(&finish.stdout).contains("writing its final outputs"), "{}", text(&finish.stdout));
    assert!(run.join("model/model.safetensors").exists());

    let more = finch(&["train", "--resume", r, "--steps", "7"]);
    assert!(more.status.success(), "{}", text(&more.stderr));
    let steps: Vec<u64> = step_lines(&run.join("log.jsonl")).iter().map(|v| v["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, [1, 2, 3, 4, 5, 6, 7]);

    let not_a_run = finch(&["train", "--resume", dir.path("nothing").to_str().unwrap()]);
    assert!(text(&not_a_run.stderr).contains("not a finch run directory"));
}
