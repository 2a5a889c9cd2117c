//! Multi-process training: the launchers' environments, and data parallelism over NCCL against
//! one process. Without a GPU only the environment checks run (they fail before any device is
//! opened); the rest say "skipped" like tests/gpu.rs, unless FINCH_REQUIRE_GPU=1. CI runs them
//! through the fake CUDA driver and the fake NCCL (tools/kernel-emu/fake-nccl), which reduces in
//! a fixed rank order.

mod common;

use common::{assert_one_line_error, deterministic_step_lines, finch_bin, report, text, tokens, TempDir};
use finch::formats::tokens::write_llmc_u16;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// `finch ARGS` with extra environment variables, the launcher's variables cleared first (the
/// test process may itself run under one).
fn finch_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(finch_bin());
    cmd.args(args);
    for v in ["RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "FINCH_LOCAL_LAUNCH"] {
        cmd.env_remove(v);
    }
    for v in ["OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS"] {
        cmd.env_remove(v);
    }
    cmd.envs(env.iter().copied());
    cmd.output().expect("run finch")
}

fn data(dir: &TempDir) -> String {
    let path = dir.path("train.bin");
    write_llmc_u16(&path, &tokens(30_000, 97, 11)).unwrap();
    path.to_str().unwrap().to_string()
}

fn train_args<'a>(data: &'a str, out: &'a str, batch: &'a str, steps: &'a str, precision: &'a str) -> Vec<&'a str> {
    vec![
        "train",
        "--device",
        "cuda",
        "--precision",
        precision,
        "--data",
        data,
        "--n-layer",
        "2",
        "--n-head",
        "4",
        "--n-embd",
        "64",
        "--vocab-size",
        "97",
        "--context-length",
        "32",
        "--batch-size",
        batch,
        "--seq-len",
        "32",
        "--lr",
        "3e-3",
        "--lr-schedule",
        "constant",
        "--steps",
        steps,
        "--checkpoint-every",
        "2",
        "--out",
        out,
        "--dist-timeout",
        "60",
    ]
}

#[test]
fn bad_launcher_environments_are_one_line_each() {
    let dir = TempDir::new("dist-env");
    let data = data(&dir);
    let out = dir.path("run");
    let args = train_args(&data, out.to_str().unwrap(), "2", "2", "bf16");
    // (environment, extra flags, the error)
    type Case<'a> = (&'a [(&'a str, &'a str)], &'a [&'a str], &'a str);
    let cases: [Case; 7] = [
        (
            &[("RANK", "0"), ("WORLD_SIZE", "0")],
            &[],
            "WORLD_SIZE=0 (torchrun's environment): the job needs at least 1 process",
        ),
        (&[("RANK", "2"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0")], &[], "RANK=2 but WORLD_SIZE=2"),
        (
            &[("OMPI_COMM_WORLD_RANK", "1"), ("OMPI_COMM_WORLD_SIZE", "x")],
            &[],
            "OMPI_COMM_WORLD_SIZE=x (mpirun's environment): expected a whole number",
        ),
        (&[("RANK", "1"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "1")], &[], "MASTER_ADDR is not set (torchrun)"),
        (
            &[("SLURM_PROCID", "3"), ("SLURM_STEP_NUM_TASKS", "2"), ("SLURM_LOCALID", "1")],
            &[],
            "SLURM_PROCID=3 but SLURM_STEP_NUM_TASKS=2",
        ),
        (
            &[
                ("RANK", "0"),
                ("WORLD_SIZE", "2"),
                ("LOCAL_RANK", "0"),
                ("MASTER_ADDR", "127.0.0.1"),
                ("MASTER_PORT", "1"),
            ],
            &["--nproc-per-node", "2"],
            "--nproc-per-node 2: this process is already rank 0 of 2 under torchrun",
        ),
        (
            &[
                ("RANK", "0"),
                ("WORLD_SIZE", "2"),
                ("LOCAL_RANK", "0"),
                ("MASTER_ADDR", "127.0.0.1"),
                ("MASTER_PORT", "1"),
            ],
            &["--device", "cpu"],
            "--device cpu: a job of 2 processes trains on GPUs",
        ),
    ];
    for (env, extra, want) in cases {
        let mut a = args.clone();
        a.extend_from_slice(extra);
        let out = finch_env(&a, env);
        assert_one_line_error(&out, &[want]);
    }
    assert!(!out.exists(), "a refused job left its run directory");
}

/// The GPU and NCCL, or None after saying why the tests skip (a failure with
/// FINCH_REQUIRE_GPU=1).
fn gpus_or_skip(test: &str) -> bool {
    let gpu = finch::cuda::Gpu::open();
    let nccl = finch::cuda::nccl::Nccl::available();
    let why = match (&gpu, nccl) {
        (Ok(_), true) => return true,
        (Err(e), _) => format!("no CUDA device ({e:#})"),
        (Ok(_), false) => "no NCCL (libnccl.so.2)".to_string(),
    };
    if std::env::var("FINCH_REQUIRE_GPU").is_ok_and(|v| v == "1") {
        panic!("test {test}: FINCH_REQUIRE_GPU=1 but {why}");
    }
    report(&format!("test {test} ... skipped: {why}"));
    false
}

fn losses(out: &std::path::Path) -> Vec<f64> {
    deterministic_step_lines(&out.join("log.jsonl")).iter().map(|l| l["loss"].as_f64().unwrap()).collect()
}

fn weights(out: &std::path::Path) -> Vec<f32> {
    finch::formats::checkpoint::load(out).unwrap().expect("a checkpoint").params
}

fn max_relative_difference(a: &[f32], b: &[f32]) -> f64 {
    let scale = a.iter().fold(0f64, |m, x| m.max(x.abs() as f64));
    a.iter().zip(b).fold(0f64, |m, (x, y)| m.max((*x as f64 - *y as f64).abs())) / scale
}

/// One process at batch 8, 2 ranks at 4 and 4 ranks at 2 read the same tokens each step: the
/// same losses and weights, up to the order of the gradient sums (each rank sums its rows, then
/// NCCL sums the ranks), so within the precision's tolerance rather than bit for bit. f32 shows
/// the agreement tightly; bf16 as the training comparison of `finch check` allows.
#[test]
fn data_parallel_training_matches_one_process_with_the_same_global_batch() {
    if !gpus_or_skip("data_parallel_training_matches_one_process_with_the_same_global_batch") {
        return;
    }
    let dir = TempDir::new("dist-match");
    let data = data(&dir);
    for (precision, loss_tol, weight_tol) in [("f32", 1e-5, 1e-5), ("bf16", 2e-2, 2e-2)] {
        let one = dir.path(&format!("one-{precision}"));
        let run = finch_env(&train_args(&data, one.to_str().unwrap(), "8", "4", precision), &[]);
        assert!(run.status.success(), "{}", text(&run.stderr));
        for (ranks, batch) in [("2", "4"), ("4", "2")] {
            let many = dir.path(&format!("{ranks}-{precision}"));
            let mut args = train_args(&data, many.to_str().unwrap(), batch, "4", precision);
            args.extend_from_slice(&["--nproc-per-node", ranks]);
            let run = finch_env(&args, &[]);
            assert!(run.status.success(), "{ranks} ranks: {}", text(&run.stderr));
            let stdout = text(&run.stdout);
            assert!(stdout.contains(&format!("data parallel: {ranks} processes (torchrun)")), "{stdout}");
            // Only rank 0 prints: one start-up line of each kind.
            assert_eq!(stdout.matches("model: ").count(), 1, "{stdout}");
            let (want, got) = (losses(&one), losses(&many));
            assert_eq!(got.len(), 4);
            for (step, (w, g)) in want.iter().zip(&got).enumerate() {
                assert!(
                    (w - g).abs() <= loss_tol * w.abs(),
                    "{precision}, {ranks} ranks, step {}: {w} vs {g}",
                    step + 1
                );
            }
            let d = max_relative_difference(&weights(&one), &weights(&many));
            assert!(d <= weight_tol, "{precision}, {ranks} ranks: weights differ by {d:e}");
        }
    }
}

/// A checkpoint is the same file whatever the number of ranks: 2 ranks for 4 steps, then 4
/// ranks (half the batch each) to step 8, end where 2 ranks for 8 steps end; then one process
/// carries on.
#[test]
fn a_run_resumes_on_another_number_of_gpus() {
    if !gpus_or_skip("a_run_resumes_on_another_number_of_gpus") {
        return;
    }
    let dir = TempDir::new("dist-resume");
    let data = data(&dir);
    let (whole, split) = (dir.path("whole"), dir.path("split"));
    let mut args = train_args(&data, whole.to_str().unwrap(), "4", "8", "f32");
    args.extend_from_slice(&["--nproc-per-node", "2"]);
    assert!(finch_env(&args, &[]).status.success());
    let mut args = train_args(&data, split.to_str().unwrap(), "4", "4", "f32");
    args.extend_from_slice(&["--nproc-per-node", "2"]);
    assert!(finch_env(&args, &[]).status.success());
    let s = split.to_str().unwrap();
    let run = finch_env(&["train", "--resume", s, "--steps", "8", "--batch-size", "2", "--nproc-per-node", "4"], &[]);
    assert!(run.status.success(), "{}", text(&run.stderr));
    let (want, got) = (losses(&whole), losses(&split));
    assert_eq!(got.len(), 8);
    for (step, (w, g)) in want.iter().zip(&got).enumerate() {
        assert!((w - g).abs() <= 1e-5 * w.abs(), "step {}: {w} vs {g}", step + 1);
    }
    assert!(max_relative_difference(&weights(&whole), &weights(&split)) <= 1e-5);
    // And on to step 10 as one process, with the global batch of 8 in one.
    let run = finch_env(&["train", "--resume", s, "--steps", "10", "--batch-size", "8"], &[]);
    assert!(run.status.success(), "{}", text(&run.stderr));
    assert_eq!(losses(&split).len(), 10);
}

/// A rank that dies mid-run ends the job: non-zero, within the timeout, naming the rank.
#[test]
fn a_killed_rank_ends_the_job_within_the_timeout() {
    if !gpus_or_skip("a_killed_rank_ends_the_job_within_the_timeout") {
        return;
    }
    let dir = TempDir::new("dist-kill");
    let data = data(&dir);
    let out = dir.path("run");
    let mut args = train_args(&data, out.to_str().unwrap(), "4", "20", "bf16");
    args.extend_from_slice(&["--nproc-per-node", "2", "--dist-timeout", "30"]);
    let started = Instant::now();
    let run = finch_env(&args, &[("FINCH_TEST_KILL_RANK_AT_STEP", "1:3")]);
    let took = started.elapsed();
    let err = text(&run.stderr);
    assert!(!run.status.success(), "{err}");
    assert!(took < Duration::from_secs(60), "took {took:?}: {err}");
    assert!(err.contains("rank 1 of 2 was killed"), "{err}");
    assert!(err.lines().count() <= 3, "{err}");
    // Rank 0 wrote the step-2 checkpoint before rank 1 died: the run resumes.
    assert_eq!(finch::formats::checkpoint::load(&out).unwrap().expect("a checkpoint").state.step, 2);
}

/// A rank that cannot reach rank 0, and more local ranks than GPUs, are one line each.
#[test]
fn an_unreachable_rank_0_and_missing_gpus_are_one_line_each() {
    if !gpus_or_skip("an_unreachable_rank_0_and_missing_gpus_are_one_line_each") {
        return;
    }
    let dir = TempDir::new("dist-unreachable");
    let data = data(&dir);
    let out = dir.path("run");
    let mut args = train_args(&data, out.to_str().unwrap(), "2", "2", "bf16");
    args.extend_from_slice(&["--dist-timeout", "2"]);
    let port = std::net::TcpListener::bind(("127.0.0.1", 0)).unwrap().local_addr().unwrap().port().to_string();
    let env =
        [("RANK", "1"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", &port)];
    let run = finch_env(&args, &env);
    assert_one_line_error(
        &run,
        &[&format!("rank 1 of 2: cannot reach rank 0 at 127.0.0.1:{port} (MASTER_ADDR:MASTER_PORT) within 2 s")],
    );
    let env = [
        ("RANK", "1"),
        ("WORLD_SIZE", "64"),
        ("LOCAL_RANK", "63"),
        ("MASTER_ADDR", "127.0.0.1"),
        ("MASTER_PORT", &port),
    ];
    let run = finch_env(&args, &env);
    assert_one_line_error(&run, &["this process wants GPU 63 (its LOCAL_RANK) but this machine has "]);
}

/// finch runs under mpirun and srun with no wrapper: two processes started with only Open MPI's,
/// or Slurm's, variables train as `--nproc-per-node 2` does, to the bit (the same ranks, the
/// same fixed-order sums).
#[test]
fn mpirun_and_srun_environments_start_the_same_job() {
    if !gpus_or_skip("mpirun_and_srun_environments_start_the_same_job") {
        return;
    }
    let dir = TempDir::new("dist-launchers");
    let data = data(&dir);
    let reference = dir.path("nproc");
    let mut args = train_args(&data, reference.to_str().unwrap(), "4", "3", "bf16");
    args.extend_from_slice(&["--nproc-per-node", "2"]);
    assert!(finch_env(&args, &[]).status.success());
    let free_port = || std::net::TcpListener::bind(("127.0.0.1", 0)).unwrap().local_addr().unwrap().port();
    for launcher in ["mpirun", "srun"] {
        let out = dir.path(launcher);
        let args = train_args(&data, out.to_str().unwrap(), "4", "3", "bf16");
        let port = free_port().to_string();
        // srun's default port is 20000 + job id % 20000: pick a job id whose port is free.
        let job = (0..20000u16)
            .map(|k| (k + std::process::id() as u16 % 9973) % 20000)
            .find(|k| std::net::TcpListener::bind(("0.0.0.0", 20000 + k)).is_ok())
            .unwrap()
            .to_string();
        let children: Vec<_> = (0..2)
            .map(|rank| {
                let r = rank.to_string();
                let env: Vec<(&str, String)> = match launcher {
                    "mpirun" => vec![
                        ("OMPI_COMM_WORLD_RANK", r.clone()),
                        ("OMPI_COMM_WORLD_SIZE", "2".into()),
                        ("OMPI_COMM_WORLD_LOCAL_RANK", r.clone()),
                        ("MASTER_ADDR", "127.0.0.1".into()),
                        ("MASTER_PORT", port.clone()),
                    ],
                    _ => vec![
                        ("SLURM_PROCID", r.clone()),
                        ("SLURM_STEP_NUM_TASKS", "2".into()),
                        ("SLURM_LOCALID", r.clone()),
                        ("SLURM_JOB_NODELIST", "localhost".into()),
                        ("SLURM_JOB_ID", job.clone()),
                    ],
                };
                let mut cmd = Command::new(finch_bin());
                cmd.args(&args).env_remove("RANK").env_remove("WORLD_SIZE").env_remove("MASTER_PORT");
                cmd.envs(env).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
                cmd.spawn().unwrap()
            })
            .collect();
        let outputs: Vec<Output> = children.into_iter().map(|c| c.wait_with_output().unwrap()).collect();
        for (rank, o) in outputs.iter().enumerate() {
            assert!(o.status.success(), "{launcher} rank {rank}: {}", text(&o.stderr));
        }
        assert!(text(&outputs[0].stdout).contains(&format!("data parallel: 2 processes ({launcher})")));
        assert_eq!(text(&outputs[1].stdout), "", "rank 1 printed");
        assert_eq!(losses(&out), losses(&reference), "{launcher}");
    }
}

/// Ctrl-C to `--nproc-per-node`'s launcher stops every rank after the same step; they
/// checkpoint it together and the run resumes.
#[test]
fn ctrl_c_stops_every_rank_after_the_same_step() {
    if !gpus_or_skip("ctrl_c_stops_every_rank_after_the_same_step") {
        return;
    }
    let dir = TempDir::new("dist-ctrl-c");
    let data = data(&dir);
    let out = dir.path("run");
    let mut args = train_args(&data, out.to_str().unwrap(), "4", "400", "bf16");
    args.extend_from_slice(&["--nproc-per-node", "2", "--checkpoint-every", "0"]);
    let mut child = Command::new(finch_bin())
        .args(&args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let log = out.join("log.jsonl");
    let deadline = Instant::now() + Duration::from_secs(120);
    while !log.exists() || common::step_lines(&log).len() < 2 {
        assert!(Instant::now() < deadline, "no steps logged");
        std::thread::sleep(Duration::from_millis(50));
    }
    // SAFETY: signals the child we started.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
    let status = child.wait().unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(130), "{err}");
    let ck = finch::formats::checkpoint::load(&out).unwrap().expect("a checkpoint");
    let logged = common::step_lines(&log).len();
    assert!(ck.state.step >= 2 && ck.state.step < 400 && logged == ck.state.step, "{} vs {logged}", ck.state.step);
    assert_eq!(err.matches("stopped by SIGINT after step").count(), 1, "{err}");
    let more = (ck.state.step + 1).to_string();
    let run = finch_env(&["train", "--resume", out.to_str().unwrap(), "--steps", &more, "--nproc-per-node", "2"], &[]);
    assert!(run.status.success(), "{}", text(&run.stderr));
}
