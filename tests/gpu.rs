//! GPU tests: every kernel against the CPU reference (the checks of `finch check`), training
//! CPU vs GPU, bit-reproducibility, and checkpoint/resume on the GPU.
//!
//! Without a usable GPU (no driver, no device, or a build without kernels) each test writes
//! "skipped: no CUDA device" with the reason straight to the terminal (past the test harness's
//! output capture, so it is always visible) and returns, unless FINCH_REQUIRE_GPU=1 makes that a
//! failure. CI runs them through the fake CUDA driver (tools/kernel-emu/fake-cuda) that way.

mod common;

use common::{deterministic_step_lines, finch, report, text, tokens, TempDir};
use finch::cuda::check::{kernel_checks, llama_training_check, print_table, small_model, training_check, CheckRow};
use finch::cuda::model::GpuGpt;
use finch::cuda::{Gpu, Precision};
use finch::formats::tokens::write_llmc_u16;
use finch::model::init::init_params;
use std::sync::Arc;

/// The GPU, or None after saying why the test skips. With FINCH_REQUIRE_GPU=1 (CI, under the
/// fake CUDA driver, and the GPU machine's first-light script) there is no skipping: a GPU that
/// cannot be opened fails the test.
fn gpu_or_skip(test: &str) -> Option<Arc<Gpu>> {
    match Gpu::open() {
        Ok(gpu) => Some(gpu),
        Err(e) if std::env::var("FINCH_REQUIRE_GPU").is_ok_and(|v| v == "1") => {
            panic!("test {test}: FINCH_REQUIRE_GPU=1 but no GPU can be opened: {e:#}")
        }
        Err(e) => {
            report(&format!("test {test} ... skipped: no CUDA device ({e:#})"));
            None
        }
    }
}

fn assert_all_pass(rows: &[CheckRow]) {
    print_table(rows);
    let failed: Vec<&CheckRow> = rows.iter().filter(|r| !r.passed()).collect();
    assert!(failed.is_empty(), "{} of {} checks failed: {failed:#?}", failed.len(), rows.len());
}

#[test]
fn every_kernel_matches_the_cpu_reference() {
    let Some(gpu) = gpu_or_skip("every_kernel_matches_the_cpu_reference") else { return };
    for precision in [Precision::F32, Precision::Bf16] {
        assert_all_pass(&kernel_checks(&gpu, precision, 1).unwrap());
    }
}

#[test]
fn gpu_training_follows_the_cpu() {
    let Some(gpu) = gpu_or_skip("gpu_training_follows_the_cpu") else { return };
    for precision in [Precision::F32, Precision::Bf16] {
        assert_all_pass(&training_check(&gpu, precision).unwrap());
    }
}

#[test]
fn gpu_llama_training_follows_the_cpu() {
    let Some(gpu) = gpu_or_skip("gpu_llama_training_follows_the_cpu") else { return };
    for precision in [Precision::F32, Precision::Bf16] {
        assert_all_pass(&llama_training_check(&gpu, precision).unwrap());
    }
}

/// A Llama-family run through the CLI on the GPU follows the CPU's, resumes, and samples.
#[test]
fn gpu_llama_training_through_the_cli_follows_the_cpu_and_resumes() {
    if gpu_or_skip("gpu_llama_training_through_the_cli_follows_the_cpu_and_resumes").is_none() {
        return;
    }
    let dir = TempDir::new("gpu-llama-cli");
    let data = dir.path("train.bin");
    write_llmc_u16(&data, &tokens(8_000, 256, 9)).unwrap();
    let d = data.to_str().unwrap();
    let run = |device: &str, precision: &str, out: &str, steps: &str| {
        #[rustfmt::skip]
        let args = [
            "train", "--device", device, "--precision", precision, "--data", d, "--model", "llama-135m",
            "--n-layer", "2", "--n-head", "4", "--n-kv-head", "2", "--n-embd", "32", "--intermediate-size", "40",
            "--vocab-size", "256", "--context-length", "16", "--batch-size", "4", "--steps", steps,
            "--lr-schedule", "constant", "--out", out,
        ];
        let out = finch(&args);
        assert!(out.status.success(), "{device} {precision}: {}", text(&out.stderr));
        text(&out.stdout)
    };
    let losses = |out: &str| -> Vec<f64> {
        let log = std::path::Path::new(out).join("log.jsonl");
        deterministic_step_lines(&log).iter().map(|l| l["loss"].as_f64().unwrap()).collect()
    };
    let cpu = dir.path("cpu");
    run("cpu", "f32", cpu.to_str().unwrap(), "6");
    for precision in [Precision::F32, Precision::Bf16] {
        let out = dir.path(&format!("gpu-{precision}"));
        let o = out.to_str().unwrap();
        let stdout = run("cuda", &precision.to_string(), o, "3");
        assert!(stdout.contains("device: cuda") && stdout.contains("GPU memory: "), "{stdout}");
        let resumed = finch(&["train", "--resume", o, "--steps", "6"]);
        assert!(resumed.status.success(), "{}", text(&resumed.stderr));
        let (want, got) = (losses(cpu.to_str().unwrap()), losses(o));
        assert_eq!(got.len(), 6);
        for (step, (w, g)) in want.iter().zip(&got).enumerate() {
            let tolerance = finch::cuda::check::training_tolerance(precision);
            assert!((w - g).abs() <= tolerance, "{precision} step {}: cpu {w}, gpu {g}", step + 1);
        }
    }
    // Greedy sampling on the GPU gives the CPU's text.
    let sample = |device: &str| {
        let model = dir.path("gpu-f32");
        let args = ["sample", "--model", model.to_str().unwrap(), "--device", device, "--temperature", "0"];
        let out = finch(&[&args[..], &["--prompt", "ab", "--max-new-tokens", "12"]].concat());
        assert!(out.status.success(), "{}", text(&out.stderr));
        out.stdout
    };
    assert_eq!(sample("cuda"), sample("cpu"));
}

/// Losses and final weights of `steps` training steps on the GPU.
fn train_on_gpu(gpu: &Arc<Gpu>, precision: Precision, steps: usize) -> (Vec<f64>, Vec<f32>) {
    let cfg = small_model();
    let (b, t) = (4, 32);
    let data: Vec<u32> = tokens(b * t + 1, cfg.vocab_size as u16, 5).into_iter().map(u32::from).collect();
    let hp = finch::cpu::optimizer::AdamWConfig { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 };
    let mut model = GpuGpt::new(gpu.clone(), cfg, precision, &init_params(&cfg, 3)).unwrap();
    let mut losses = Vec::new();
    for _ in 0..steps {
        model.zero_grad().unwrap();
        losses.push(model.forward(&data[..b * t], Some(&data[1..]), b, t).unwrap().unwrap());
        model.backward(1.0).unwrap();
        let norm = model.grad_norm().unwrap();
        model.update(1e-3, &hp, norm, 1.0).unwrap();
    }
    (losses, model.master_params().unwrap())
}

#[test]
fn gpu_training_is_bit_reproducible() {
    let Some(gpu) = gpu_or_skip("gpu_training_is_bit_reproducible") else { return };
    for precision in [Precision::Bf16, Precision::F32] {
        let (losses_a, params_a) = train_on_gpu(&gpu, precision, 5);
        let (losses_b, params_b) = train_on_gpu(&gpu, precision, 5);
        assert_eq!(losses_a, losses_b, "{precision}: losses differ between identical runs");
        assert!(params_a == params_b, "{precision}: weights differ between identical runs");
        assert!(losses_a[4] < losses_a[0], "{precision}: loss did not fall: {losses_a:?}");
    }
}

fn gpu_run_args<'a>(data: &'a str, out: &'a str, steps: &'a str) -> Vec<&'a str> {
    vec![
        "train",
        "--device",
        "cuda",
        "--precision",
        "bf16",
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
        "4",
        "--seq-len",
        "32",
        "--grad-accum",
        "2",
        "--lr",
        "3e-3",
        "--lr-schedule",
        "constant",
        "--steps",
        steps,
        "--checkpoint-every",
        "4",
        "--out",
        out,
    ]
}

/// With a constant learning rate, a run stopped after its step-4 checkpoint and resumed to step
/// 8 must log exactly what an uninterrupted 8-step run logs, and end with the same weights.
#[test]
fn gpu_resume_is_bit_exact() {
    if gpu_or_skip("gpu_resume_is_bit_exact").is_none() {
        return;
    }
    let dir = TempDir::new("gpu-resume");
    let data = dir.path("train.bin");
    write_llmc_u16(&data, &tokens(10_000, 97, 3)).unwrap();
    let data = data.to_str().unwrap();
    let (whole, split) = (dir.path("whole"), dir.path("split"));
    let (whole, split) = (whole.to_str().unwrap(), split.to_str().unwrap());

    let out = finch(&gpu_run_args(data, whole, "8"));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = finch(&gpu_run_args(data, split, "4"));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = finch(&["train", "--resume", split, "--steps", "8"]);
    assert!(out.status.success(), "{}", text(&out.stderr));

    let log = |d: &str| deterministic_step_lines(&std::path::Path::new(d).join("log.jsonl"));
    assert_eq!(log(whole), log(split));
    let weights = |d: &str| std::fs::read(std::path::Path::new(d).join("model/model.safetensors")).unwrap();
    assert!(weights(whole) == weights(split), "final weights differ");
}

/// A kernel name the loaded modules lack is a one-line error, not a panic.
#[test]
fn a_missing_kernel_is_an_error_naming_it() {
    let Some(gpu) = gpu_or_skip("a_missing_kernel_is_an_error_naming_it") else { return };
    let e = gpu.launch("no_such_kernel_f32", (1, 1, 1), 32, &[]).unwrap_err();
    assert!(format!("{e:#}").starts_with("kernel no_such_kernel_f32 is not among the "), "{e:#}");
}

/// Run only by `a_faulting_kernel_is_named_with_its_launch`, in a process of its own: it breaks
/// the GPU context for good.
#[test]
#[ignore]
fn launch_a_kernel_on_a_bad_pointer() {
    let gpu = Gpu::open().unwrap();
    let bad = finch::cuda::DPtr(0x10);
    let result =
        gpu.launch("floatx_to_f32_f32", (4, 1, 1), 256, &[bad.into(), bad.into(), finch::cuda::Arg::I64(1024)]);
    let result = result.and_then(|()| gpu.synchronize());
    println!("result: {:#}", result.unwrap_err());
}

/// A kernel that faults is named, with its launch, when FINCH_SYNC_EACH_LAUNCH=1: a real GPU
/// reports a fault at the next synchronisation, so without the option the error names whatever
/// waited next (the fake driver refuses the pointer at the launch itself).
#[test]
fn a_faulting_kernel_is_named_with_its_launch() {
    if gpu_or_skip("a_faulting_kernel_is_named_with_its_launch").is_none() {
        return;
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "launch_a_kernel_on_a_bad_pointer", "--ignored", "--nocapture", "--test-threads", "1"])
        .env("FINCH_SYNC_EACH_LAUNCH", "1")
        .output()
        .unwrap();
    let stdout = text(&out.stdout);
    let line =
        stdout.lines().find(|l| l.contains("result: ")).unwrap_or_else(|| panic!("{stdout}{}", text(&out.stderr)));
    assert!(line.contains("kernel floatx_to_f32_f32 (grid (4, 1, 1), block 256) failed"), "{line}");
}

/// `finch train --device cuda` through the CLI, as a user runs it: at f32 each step's loss
/// follows the CPU run within `training_tolerance` (bf16 within its own), also across a
/// `--resume` in the middle.
#[test]
fn gpu_training_through_the_cli_follows_the_cpu_and_resumes() {
    if gpu_or_skip("gpu_training_through_the_cli_follows_the_cpu_and_resumes").is_none() {
        return;
    }
    let dir = TempDir::new("gpu-cli");
    let data = dir.path("train.bin");
    write_llmc_u16(&data, &tokens(8_000, 97, 9)).unwrap();
    let d = data.to_str().unwrap();
    let run = |device: &str, precision: &str, out: &str, steps: &str| {
        let args = [
            "train",
            "--device",
            device,
            "--precision",
            precision,
            "--data",
            d,
            "--n-layer",
            "2",
            "--n-head",
            "2",
            "--n-embd",
            "32",
            "--vocab-size",
            "97",
            "--context-length",
            "16",
            "--batch-size",
            "4",
            "--steps",
            steps,
            "--lr-schedule",
            "constant",
            "--out",
            out,
        ];
        let out = finch(&args);
        assert!(out.status.success(), "{device} {precision}: {}", text(&out.stderr));
    };
    let losses = |out: &str| -> Vec<f64> {
        let log = std::path::Path::new(out).join("log.jsonl");
        deterministic_step_lines(&log).iter().map(|l| l["loss"].as_f64().unwrap()).collect()
    };
    let cpu = dir.path("cpu");
    run("cpu", "f32", cpu.to_str().unwrap(), "6");
    for precision in [Precision::F32, Precision::Bf16] {
        let out = dir.path(&format!("gpu-{precision}"));
        let o = out.to_str().unwrap();
        run("cuda", &precision.to_string(), o, "3");
        let resumed = finch(&["train", "--resume", o, "--steps", "6"]);
        assert!(resumed.status.success(), "{}", text(&resumed.stderr));
        let (want, got) = (losses(cpu.to_str().unwrap()), losses(o));
        assert_eq!(got.len(), 6);
        for (step, (w, g)) in want.iter().zip(&got).enumerate() {
            let tolerance = finch::cuda::check::training_tolerance(precision);
            assert!((w - g).abs() <= tolerance, "{precision} step {}: cpu {w}, gpu {g}", step + 1);
        }
    }
}

/// `finch sample --device cuda` gives the CPU's greedy text, and a model whose head dimension the
/// kernels cannot take is refused under `--device cuda` and sampled on the CPU under `auto`.
#[test]
fn gpu_sampling_matches_the_cpu() {
    if gpu_or_skip("gpu_sampling_matches_the_cpu").is_none() {
        return;
    }
    let dir = TempDir::new("gpu-sample");
    let data = dir.path("train.bin");
    write_llmc_u16(&data, &tokens(4_000, 256, 10)).unwrap();
    let d = data.to_str().unwrap();
    let train = |model: &str, heads: &str, channels: &str| {
        let args = [
            "train",
            "--device",
            "cpu",
            "--data",
            d,
            "--vocab-size",
            "256",
            "--n-layer",
            "1",
            "--n-head",
            heads,
            "--n-embd",
            channels,
            "--context-length",
            "32",
            "--batch-size",
            "4",
            "--steps",
            "5",
            "--save",
            model,
        ];
        let out = finch(&args);
        assert!(out.status.success(), "{}", text(&out.stderr));
    };
    let model = dir.path("model");
    let m = model.to_str().unwrap();
    train(m, "2", "32");
    let sample = |device: &str, model: &str| {
        finch(&[
            "sample",
            "--model",
            model,
            "--device",
            device,
            "--temperature",
            "0",
            "--max-new-tokens",
            "24",
            "--prompt",
            "ab",
        ])
    };
    let (on_cpu, on_gpu) = (sample("cpu", m), sample("cuda", m));
    assert!(on_gpu.status.success(), "{}", text(&on_gpu.stderr));
    assert_eq!(text(&on_gpu.stdout), text(&on_cpu.stdout));

    let wide = dir.path("wide");
    let w = wide.to_str().unwrap();
    train(w, "1", "136"); // head dimension 136 > 128
    let refused = sample("cuda", w);
    assert!(!refused.status.success());
    assert!(text(&refused.stderr)
        .contains("--device cuda: the GPU kernels support head dimensions up to 128, and this model's is 136"));
    assert!(sample("auto", w).status.success());
}

/// A run whose buffers exceed the GPU's free memory is refused in one line, before it allocates.
#[test]
fn a_run_beyond_the_gpu_memory_is_refused_in_one_line() {
    if gpu_or_skip("a_run_beyond_the_gpu_memory_is_refused_in_one_line").is_none() {
        return;
    }
    let dir = TempDir::new("gpu-oom");
    let data = dir.path("train.bin");
    write_llmc_u16(&data, &tokens(1_000, 97, 11)).unwrap();
    // GPT-2 XL at B=512, T=1024: its activations alone are terabytes, more than any GPU has.
    let args =
        ["train", "--device", "cuda", "--data", data.to_str().unwrap(), "--model", "gpt2-xl", "--batch-size", "512"];
    let out = finch(&args);
    let err = text(&out.stderr);
    assert!(!out.status.success() && err.trim_end().lines().count() == 1, "{err}");
    assert!(err.contains("not enough GPU memory: training needs ") && err.contains(" is free on "), "{err}");
}

/// `finch bench attention` runs (tiny shapes: under the fake driver only the path is shown).
#[test]
fn the_attention_benchmark_runs() {
    if gpu_or_skip("the_attention_benchmark_runs").is_none() {
        return;
    }
    let out = finch(&["bench", "attention", "--quick", "--warmup", "0", "--repeats", "1"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert_eq!(
        stdout.lines().filter(|l| l.trim_start().starts_with("64 ") || l.trim_start().starts_with("128 ")).count(),
        2,
        "{stdout}"
    );
}

/// `finch bench memory --quick`: every memory-bound operation, with the bytes `--profile` counts,
/// against the copy measured in the same run.
#[test]
fn the_memory_benchmark_runs() {
    if gpu_or_skip("the_memory_benchmark_runs").is_none() {
        return;
    }
    let out = finch(&["bench", "memory", "--quick", "--warmup", "0", "--repeats", "1", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let rows: Vec<serde_json::Value> = text(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let ops: Vec<&str> = rows.iter().map(|r| r["op"].as_str().unwrap()).collect();
    for op in ["encoder forward", "layernorm backward", "bias gradient", "gradient norm", "AdamW (all tensors)"] {
        assert!(ops.contains(&op), "{op} missing: {ops:?}");
    }
    for r in &rows {
        assert!(r["bytes"].as_f64().unwrap() > 0.0 && r["gbps"].as_f64().unwrap() > 0.0, "{r}");
        assert!(r["of_copy"].as_f64().unwrap() > 0.0, "{r}");
    }
    let bias = rows.iter().find(|r| r["op"] == "bias gradient").unwrap();
    assert_eq!(bias["kernels"], serde_json::json!(["bias_grad_partial_bf16", "bias_grad_reduce"]));
}

/// The captured step (the default), the step issued launch by launch (`--cuda-graph false`),
/// `--recompute` and `--profile` compute the same bits: identical logs and final weights.
#[test]
fn graph_replay_and_recompute_give_the_same_bits() {
    if gpu_or_skip("graph_replay_and_recompute_give_the_same_bits").is_none() {
        return;
    }
    let dir = TempDir::new("gpu-graph");
    let data = dir.path("train.bin");
    write_llmc_u16(&data, &tokens(10_000, 97, 4)).unwrap();
    let data = data.to_str().unwrap();
    let variants: [(&str, &[&str]); 5] = [
        ("graph", &[]),
        ("direct", &["--cuda-graph", "false"]),
        ("recompute", &["--recompute"]),
        ("direct-recompute", &["--cuda-graph", "false", "--recompute"]),
        ("profile", &["--profile"]),
    ];
    let mut first: Option<(Vec<serde_json::Value>, Vec<u8>)> = None;
    for (name, extra) in variants {
        let out = dir.path(name);
        let o = out.to_str().unwrap();
        let mut args = gpu_run_args(data, o, "6");
        args.extend_from_slice(extra);
        let run = finch(&args);
        assert!(run.status.success(), "{name}: {}", text(&run.stderr));
        if extra.contains(&"--recompute") {
            assert!(text(&run.stdout).contains("--recompute: LayerNorm and GELU outputs recomputed"));
        }
        let log = deterministic_step_lines(&out.join("log.jsonl"));
        let weights = std::fs::read(out.join("model/model.safetensors")).unwrap();
        assert_eq!(log.len(), 6, "{name}");
        match &first {
            None => first = Some((log, weights)),
            Some((log0, weights0)) => {
                assert_eq!(&log, log0, "{name}: the log differs from the captured step's");
                assert!(&weights == weights0, "{name}: the final weights differ from the captured step's");
            }
        }
    }
}

/// Under the fake driver, from its counters (the difference between a 2-step and a 6-step run,
/// per step): one host synchronisation per step and one AdamW launch, at grad-accum 1 and 4,
/// and host↔device traffic of the step's tokens and scalars only.
#[test]
fn a_training_step_synchronises_once() {
    let Some(gpu) = gpu_or_skip("a_training_step_synchronises_once") else { return };
    if !gpu.name.starts_with("Fake CUDA") {
        report("test a_training_step_synchronises_once ... skipped: the counters are the fake CUDA driver's");
        return;
    }
    let dir = TempDir::new("gpu-counters");
    let data = dir.path("train.bin");
    write_llmc_u16(&data, &tokens(20_000, 97, 6)).unwrap();
    let data = data.to_str().unwrap();
    for accum in ["1", "4"] {
        let counters = |steps: &str| -> serde_json::Value {
            let out = dir.path(&format!("run-{accum}-{steps}"));
            let file = dir.path(&format!("counters-{accum}-{steps}.json"));
            let mut args = gpu_run_args(data, out.to_str().unwrap(), steps);
            args.extend_from_slice(&["--grad-accum", accum, "--checkpoint-every", "100"]);
            let run = std::process::Command::new(common::finch_bin())
                .args(&args)
                .env("FAKE_CUDA_COUNTERS", &file)
                .output()
                .expect("run finch");
            assert!(run.status.success(), "{}", text(&run.stderr));
            serde_json::from_str(&std::fs::read_to_string(&file).expect("the fake writes its counters")).unwrap()
        };
        let (a, b) = (counters("2"), counters("6"));
        let per_step = |path: &[&str]| {
            let get = |v: &serde_json::Value| path.iter().fold(v, |v, k| &v[*k]).as_f64().unwrap_or(0.0);
            (get(&b) - get(&a)) / 4.0
        };
        let accum_n: usize = accum.parse().unwrap();
        assert_eq!(per_step(&["syncs", "total"]), 1.0, "grad-accum {accum}: host waits per step");
        assert_eq!(per_step(&["per_kernel", "adamw_bf16", "launches"]), 1.0, "grad-accum {accum}");
        assert_eq!(per_step(&["graphs", "launches"]), 1.0, "grad-accum {accum}: graph replays per step");
        // Up: the AdamW scalars (8 words), the step's initial state (48 bytes) and per
        // micro-batch inputs, targets and token buckets (5·B·T + 2 words), one copy. Down: the
        // step's state (48 bytes).
        let bt = 4 * 32;
        assert_eq!(per_step(&["htod", "count"]), 1.0);
        assert_eq!(per_step(&["htod", "bytes"]), (4 * (8 + 12 + accum_n * (5 * bt + 2))) as f64);
        assert_eq!(per_step(&["dtoh", "count"]), 1.0);
        assert_eq!(per_step(&["dtoh", "bytes"]), 48.0);
        report(&format!(
            "grad-accum {accum}: per step {} launches, {} host sync, {} B up, {} B down",
            per_step(&["launches"]),
            per_step(&["syncs", "total"]),
            per_step(&["htod", "bytes"]),
            per_step(&["dtoh", "bytes"])
        ));
    }
}

/// A Llama-family training step on the GPU waits for it once, with one copy each way (no CUDA
/// graph yet: its launches are issued every step).
#[test]
fn a_llama_training_step_synchronises_once() {
    let Some(gpu) = gpu_or_skip("a_llama_training_step_synchronises_once") else { return };
    if !gpu.name.starts_with("Fake CUDA") {
        report("test a_llama_training_step_synchronises_once ... skipped: the counters are the fake CUDA driver's");
        return;
    }
    let dir = TempDir::new("gpu-llama-counters");
    let data = dir.path("train.bin");
    write_llmc_u16(&data, &tokens(20_000, 97, 6)).unwrap();
    let data = data.to_str().unwrap();
    for accum in ["1", "3"] {
        let counters = |steps: &str| -> serde_json::Value {
            let out = dir.path(&format!("run-{accum}-{steps}"));
            let file = dir.path(&format!("counters-{accum}-{steps}.json"));
            #[rustfmt::skip]
            let args = [
                "train", "--device", "cuda", "--data", data, "--model", "llama-135m", "--n-layer", "2", "--n-head", "4",
                "--n-kv-head", "2", "--n-embd", "32", "--intermediate-size", "40", "--vocab-size", "97",
                "--context-length", "32", "--batch-size", "4", "--steps", steps, "--grad-accum", accum,
                "--checkpoint-every", "100", "--out", out.to_str().unwrap(),
            ];
            let run = std::process::Command::new(common::finch_bin())
                .args(args)
                .env("FAKE_CUDA_COUNTERS", &file)
                .output()
                .expect("run finch");
            assert!(run.status.success(), "{}", text(&run.stderr));
            serde_json::from_str(&std::fs::read_to_string(&file).expect("the fake writes its counters")).unwrap()
        };
        let (a, b) = (counters("2"), counters("6"));
        let per_step = |path: &[&str]| {
            let get = |v: &serde_json::Value| path.iter().fold(v, |v, k| &v[*k]).as_f64().unwrap_or(0.0);
            (get(&b) - get(&a)) / 4.0
        };
        let accum_n: usize = accum.parse().unwrap();
        assert_eq!(per_step(&["syncs", "total"]), 1.0, "grad-accum {accum}: host waits per step");
        assert_eq!(per_step(&["per_kernel", "adamw_bf16", "launches"]), 1.0, "grad-accum {accum}");
        // Up: the AdamW scalars, the initial state and each micro-batch's tokens, in one copy;
        // down: the step's state.
        let bt = 4 * 32;
        assert_eq!(per_step(&["htod", "count"]), 1.0);
        assert_eq!(per_step(&["htod", "bytes"]), (4 * (8 + 12 + accum_n * (5 * bt + 2))) as f64);
        assert_eq!((per_step(&["dtoh", "count"]), per_step(&["dtoh", "bytes"])), (1.0, 48.0));
        report(&format!(
            "llama grad-accum {accum}: per step {} launches, {} host sync, {} B up, {} B down",
            per_step(&["launches"]),
            per_step(&["syncs", "total"]),
            per_step(&["htod", "bytes"]),
            per_step(&["dtoh", "bytes"])
        ));
    }
}

/// `--profile`: a table of every kernel's time per step at the end, and the same as a "profile"
/// event in the log, with MFU against the named peak (the fake driver reports H100 limits).
#[test]
fn the_profile_reports_every_kernel() {
    if gpu_or_skip("the_profile_reports_every_kernel").is_none() {
        return;
    }
    let dir = TempDir::new("gpu-profile");
    let data = dir.path("train.bin");
    write_llmc_u16(&data, &tokens(10_000, 97, 5)).unwrap();
    let out = dir.path("run");
    let mut args = gpu_run_args(data.to_str().unwrap(), out.to_str().unwrap(), "3");
    args.push("--profile");
    let run = finch(&args);
    let stdout = text(&run.stdout);
    assert!(run.status.success(), "{}", text(&run.stderr));
    assert!(stdout.contains("profile: ") && stdout.contains(" per step over 2 steps"), "{stdout}");
    for kernel in ["adamw_bf16", "encoder_forward_bf16", "flash_forward_hd64_bf16", "crossentropy_forward_bf16"] {
        assert!(stdout.lines().any(|l| l.starts_with(kernel)), "no {kernel} row: {stdout}");
    }
    assert!(stdout.contains(" TFLOP/s") && stdout.contains(" GB/s"), "{stdout}");
    let log = std::fs::read_to_string(out.join("log.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = log.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let profile = lines.iter().find(|l| l["event"] == "profile").expect("a profile event");
    assert_eq!(profile["steps"], 2);
    let kernels = profile["kernels"].as_array().unwrap();
    let row = |name: &str| kernels.iter().find(|k| k["kernel"] == name).unwrap_or_else(|| panic!("{name}"));
    // One AdamW launch per step; 2 micro-batches, so 2 cross-entropies.
    assert_eq!(row("adamw_bf16")["launches_per_step"], 1.0);
    assert_eq!(row("crossentropy_forward_bf16")["launches_per_step"], 2.0);
    assert!(row("adamw_bf16")["gbps"].as_f64().unwrap() > 0.0);
    let share: f64 = kernels.iter().map(|k| k["share"].as_f64().unwrap()).sum();
    assert!((share - 1.0).abs() < 1e-9, "shares sum to {share}");
    assert!(profile["peak"].as_str().unwrap().contains("H100"), "{profile}");
    assert!(profile["mfu"].as_f64().unwrap() > 0.0);
    let steps: Vec<&serde_json::Value> = lines.iter().filter(|l| l.get("step").is_some()).collect();
    assert!(steps.iter().all(|l| l["mfu"].as_f64().is_some_and(|m| m > 0.0)), "every step line has an MFU");
}

/// The non-finite check happens on the device: a diverging run (lr 1e30) stops before the bad
/// update naming it, or with --skip-nonfinite skips it there (weights and AdamW's step count
/// untouched) and finishes, as on the CPU.
#[test]
fn a_nonfinite_gpu_step_is_stopped_or_skipped_on_the_device() {
    if gpu_or_skip("a_nonfinite_gpu_step_is_stopped_or_skipped_on_the_device").is_none() {
        return;
    }
    let dir = TempDir::new("gpu-nonfinite");
    let data = dir.path("train.bin");
    write_llmc_u16(&data, &tokens(10_000, 97, 8)).unwrap();
    let data = data.to_str().unwrap();
    let run = |out: &str, extra: &[&str]| {
        let mut args = gpu_run_args(data, out, "8");
        args.extend_from_slice(&["--lr", "1e30", "--checkpoint-every", "1"]);
        args.extend_from_slice(extra);
        finch(&args)
    };
    let load = |dir: &std::path::Path| finch::formats::checkpoint::load(dir).unwrap().expect("a checkpoint");

    let stop = dir.path("stop");
    let out = run(stop.to_str().unwrap(), &[]);
    common::assert_one_line_error(&out, &["the loss is ", "stopped before applying its update", "--skip-nonfinite"]);
    let good = load(&stop);
    assert!(good.params.iter().all(|p| p.is_finite()));
    assert_eq!(good.optimizer.t as usize, good.state.step, "every checkpointed step was applied");

    let skip = dir.path("skip");
    let out = run(skip.to_str().unwrap(), &["--skip-nonfinite"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let lines = common::step_lines(&skip.join("log.jsonl"));
    let skipped = lines.iter().filter(|l| l["skipped"] == true).count();
    assert!(skipped > 0, "lr 1e30 did not diverge");
    let ck = load(&skip);
    assert_eq!(ck.state.step, 8);
    assert_eq!(ck.optimizer.t as usize, 8 - skipped, "AdamW counted a skipped step");
    assert!(ck.params.iter().all(|p| p.is_finite()), "a skipped update reached the weights");
    let summary = format!("skipped {skipped} of 8 updates whose loss or gradient norm was not finite");
    assert!(text(&out.stdout).contains(&summary), "{}", text(&out.stdout));
}
