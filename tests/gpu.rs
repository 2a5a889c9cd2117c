//! GPU tests: every kernel against the CPU reference (the checks of `finch check`), training
//! CPU vs GPU, bit-reproducibility, and checkpoint/resume on the GPU.
//!
//! Without a usable GPU (no driver, no device, or a build without kernels) each test writes
//! "skipped: no CUDA device" with the reason straight to the terminal (past the test harness's
//! output capture, so it is always visible) and returns.

mod common;

use common::{deterministic_step_lines, finch, report, text, tokens, TempDir};
use finch::cuda::check::{kernel_checks, print_table, small_model, training_check, CheckRow};
use finch::cuda::model::GpuGpt;
use finch::cuda::{Gpu, Precision};
use finch::formats::tokens::write_llmc_u16;
use finch::model::init::init_params;
use std::sync::Arc;

fn gpu_or_skip(test: &str) -> Option<Arc<Gpu>> {
    match Gpu::open() {
        Ok(gpu) => Some(gpu),
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
