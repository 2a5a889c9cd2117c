//! The memory plan of a run: the bytes it needs on the host and on the GPU, by part, checked
//! against what is available before anything large is allocated, and the one-line refusal when
//! they do not fit.

use crate::cuda::llama_model::llama_memory_plan;
use crate::cuda::model::memory_plan as gpu_memory_plan;
use crate::cuda::{Gpu, Precision};
use crate::model::family::ModelConfig;
use crate::os::resources::{available_memory, human_bytes, AvailableMemory};
use anyhow::{bail, Result};

/// Bytes of host memory a run needs, by part. On the CPU: weights, gradients and AdamW's m and
/// v, then the activations and their gradients, all f32. On a GPU everything lives on the
/// device, but each checkpoint copies the f32 weights and both moments to the host (as a resumed
/// run holds its loaded checkpoint there until the upload).
pub(super) fn host_memory_plan(on_gpu: bool, cfg: &ModelConfig, b: usize, t: usize) -> Vec<(&'static str, usize)> {
    let n = cfg.layout().total;
    match on_gpu {
        false => {
            vec![("weights+grads+optimizer", 4 * 4 * n), ("activations", 2 * 4 * cfg.activation_count(b, t))]
        }
        true => vec![("weights and AdamW moments copied from the GPU for each checkpoint", 3 * 4 * n)],
    }
}

/// Refuses a run whose host memory `plan` cannot fit, before anything large is allocated.
/// `batch` is (B, T) when the plan grows with them.
pub(super) fn check_memory(plan: &[(&str, usize)], batch: Option<(usize, usize)>) -> Result<()> {
    match available_memory().and_then(|available| memory_refusal(plan, batch, &available)) {
        Some(refusal) => bail!(refusal),
        None => Ok(()),
    }
}

/// The one-line refusal of a run whose host memory `plan` exceeds `available`, if it does.
fn memory_refusal(
    plan: &[(&str, usize)],
    batch: Option<(usize, usize)>,
    available: &AvailableMemory,
) -> Option<String> {
    let needed = plan_bytes(plan);
    if needed as u64 <= available.bytes {
        return None;
    }
    let (what, lower) = match batch {
        Some((b, t)) => (format!("{} at B={b}, T={t}", describe_plan(plan)), "lower --batch-size or --seq-len, or "),
        None => (describe_plan(plan), ""),
    };
    Some(format!(
        "not enough memory: training needs {} ({what}) but {} is available{}; {lower}use a smaller model",
        human_bytes(needed),
        human_bytes(available.bytes as usize),
        available.limited_by.as_ref().map(|why| format!(" under {why}")).unwrap_or_default()
    ))
}

/// Refuses a GPU run whose buffers cannot fit in the free device memory.
pub(super) fn check_gpu_memory(
    gpu: &Gpu,
    cfg: &ModelConfig,
    (b, t): (usize, usize),
    precision: Precision,
    (recompute, ranks): (bool, usize),
) -> Result<()> {
    let (free, _) = gpu.memory()?;
    let plan = gpu_plan(cfg, (b, t), precision, recompute, ranks);
    // What --recompute would need, when it is not on (and the model has it): the first thing to try.
    let with_recompute = match cfg {
        ModelConfig::Gpt2(c) if !recompute => Some(plan_bytes(&gpu_memory_plan(c, (b, t), precision, true, ranks))),
        _ => None,
    };
    match gpu_memory_refusal(&plan, free, &gpu.name, precision, with_recompute) {
        Some(refusal) => bail!(refusal),
        None => Ok(()),
    }
}

/// The device memory a GPU run of `cfg` needs, by part.
pub(super) fn gpu_plan(
    cfg: &ModelConfig,
    (b, t): (usize, usize),
    precision: Precision,
    recompute: bool,
    ranks: usize,
) -> Vec<(&'static str, usize)> {
    match cfg {
        ModelConfig::Gpt2(c) => gpu_memory_plan(c, (b, t), precision, recompute, ranks),
        ModelConfig::Llama(c) => llama_memory_plan(c, (b, t), precision),
    }
}

/// The one-line refusal of a GPU run whose buffers (`plan`) exceed the `free` device memory.
/// `with_recompute`: the bytes the run would need with --recompute, when it is not on.
fn gpu_memory_refusal(
    plan: &[(&str, usize)],
    free: usize,
    gpu_name: &str,
    precision: Precision,
    with_recompute: Option<usize>,
) -> Option<String> {
    let needed = plan_bytes(plan);
    (needed > free).then(|| {
        format!(
            "not enough GPU memory: training needs {} ({}) but {} is free on {gpu_name}; {}lower --batch-size or \
             --seq-len{}, or use a smaller model",
            human_bytes(needed),
            describe_plan(plan),
            human_bytes(free),
            with_recompute.map(|b| format!("add --recompute (needs {}), ", human_bytes(b))).unwrap_or_default(),
            if precision == Precision::F32 { ", use --precision bf16" } else { "" }
        )
    })
}

/// The bytes of a memory plan, all parts together.
pub(super) fn plan_bytes(plan: &[(&str, usize)]) -> usize {
    plan.iter().map(|(_, bytes)| bytes).sum()
}

pub(super) fn describe_plan(plan: &[(&str, usize)]) -> String {
    plan.iter().map(|(what, bytes)| format!("{} {what}", human_bytes(*bytes))).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::GptConfig;
    use crate::model::config::Preset;
    use crate::model::layout::{activation_count, ParamLayout};

    #[test]
    fn a_run_beyond_the_available_host_memory_is_refused_with_the_numbers() {
        let cfg = GptConfig::preset(Preset::Gpt2);
        let n = ParamLayout::new(&cfg).total;
        let cpu = host_memory_plan(false, &ModelConfig::Gpt2(cfg), 4, 64);
        let needed = 16 * n + 8 * activation_count(&cfg, 4, 64);
        let room = |bytes: usize| AvailableMemory { bytes: bytes as u64, limited_by: None };
        assert_eq!(memory_refusal(&cpu, Some((4, 64)), &room(needed)), None);
        let refusal = memory_refusal(&cpu, Some((4, 64)), &room(needed - 1)).expect("one byte short");
        assert!(refusal.starts_with("not enough memory: training needs "), "{refusal}");
        assert!(refusal.contains(" weights+grads+optimizer, ") && refusal.contains(" activations at B=4, T=64) but "));
        assert!(refusal.ends_with(" is available; lower --batch-size or --seq-len, or use a smaller model"));

        // A GPU run (no device needed to plan it) holds a checkpoint's worth on the host, whatever
        // the batch; the refusal names the cgroup that limits it.
        let limited = AvailableMemory {
            bytes: (12 * n - 1) as u64,
            limited_by: Some("the memory limit of cgroup /job (1.0 GiB)".into()),
        };
        let gpu = host_memory_plan(true, &ModelConfig::Gpt2(cfg), 4, 64);
        assert_eq!(gpu, host_memory_plan(true, &ModelConfig::Gpt2(cfg), 64, 1024));
        let refusal = memory_refusal(&gpu, None, &limited).expect("one byte short");
        assert_eq!(
            refusal,
            format!(
                "not enough memory: training needs {} ({} weights and AdamW moments copied from the GPU for each \
                 checkpoint) but {} is available under the memory limit of cgroup /job (1.0 GiB); use a smaller model",
                human_bytes(12 * n),
                human_bytes(12 * n),
                human_bytes(12 * n - 1)
            )
        );
        assert_eq!(memory_refusal(&gpu, None, &room(12 * n)), None);
    }

    #[test]
    fn a_gpu_run_beyond_the_free_device_memory_is_refused_with_its_plan() {
        // The refusal of check_gpu_memory, planned without a GPU: GPT-2 small at B=8, T=1024.
        let cfg = GptConfig::preset(Preset::Gpt2);
        for precision in [Precision::Bf16, Precision::F32] {
            let plan = gpu_memory_plan(&cfg, (8, 1024), precision, false, 1);
            let needed = plan_bytes(&plan);
            assert_eq!(gpu_memory_refusal(&plan, needed, "H200", precision, None), None);
            let refusal = gpu_memory_refusal(&plan, needed - 1, "H200", precision, None).expect("one byte short");
            assert!(refusal.starts_with(&format!("not enough GPU memory: training needs {} (", human_bytes(needed))));
            for part in ["weights, ", "master weights, ", "AdamW moments, ", "activations, ", "activation gradients, "]
            {
                assert!(refusal.contains(part), "{refusal} lacks {part}");
            }
            assert!(refusal.contains(" is free on H200; lower --batch-size or --seq-len"));
            assert_eq!(refusal.contains("--precision bf16"), precision == Precision::F32, "{refusal}");
        }
        // Without --recompute, the refusal says what it would need with it.
        let plan = gpu_memory_plan(&cfg, (8, 1024), Precision::Bf16, false, 1);
        let with = plan_bytes(&gpu_memory_plan(&cfg, (8, 1024), Precision::Bf16, true, 1));
        let refusal = gpu_memory_refusal(&plan, with, "H100", Precision::Bf16, Some(with)).expect("short");
        assert!(refusal.contains(&format!("; add --recompute (needs {}), lower --batch-size", human_bytes(with))));
        // bf16 storage halves the weights and the activations the plan counts.
        let bytes = |p| plan_bytes(&gpu_memory_plan(&cfg, (8, 1024), p, false, 1));
        assert!(bytes(Precision::Bf16) < bytes(Precision::F32));
    }

    #[test]
    fn gpt2_xl_at_t1024_fits_an_80_gb_gpu_and_recompute_saves_what_it_should() {
        // The plan's arithmetic for GPT-2 1.5B, bf16, T=1024 (README "GPU memory"): 1.56 G
        // parameters (padded vocabulary) × (2 bf16 + 4 master + 4 gradient + 8 AdamW) bytes =
        // 28.1 GiB, plus the activations, which grow with B.
        let cfg = GptConfig::preset(Preset::Gpt2Xl);
        let (b, t, c, l) = (16, 1024, cfg.n_embd, cfg.n_layer);
        let part = |plan: &[(&str, usize)], name: &str| plan.iter().find(|(n, _)| *n == name).unwrap().1;
        let plain = gpu_memory_plan(&cfg, (b, t), Precision::Bf16, false, 1);
        let recompute = gpu_memory_plan(&cfg, (b, t), Precision::Bf16, true, 1);
        let n = ParamLayout::new(&cfg).total;
        assert_eq!(part(&plain, "weights") + part(&plain, "master weights"), 6 * n);
        assert_eq!(part(&plain, "gradients") + part(&plain, "AdamW moments"), 12 * n);
        // --recompute keeps one layer's ln_1/ln_2 (2L tensors of B·T·C → 1) and GELU output
        // (L of 4·B·T·C → 1), in bf16.
        let btc2 = b * t * c * 2;
        let saved = part(&plain, "activations") - part(&recompute, "activations");
        assert_eq!(saved, (2 * l - 1) * btc2 + (l - 1) * 4 * btc2);
        // An 80 GB H100 shows about 79.1 GiB; leave 1.5 GiB for the CUDA context and modules.
        let room = (79.1 - 1.5) * (1u64 << 30) as f64;
        assert!((plan_bytes(&recompute) as f64) < room, "{}", describe_plan(&recompute));
        assert!((plan_bytes(&plain) as f64) < room, "{}", describe_plan(&plain));
        // B=24 fits only with --recompute, and B=32 not even with it.
        let b24 = |r| plan_bytes(&gpu_memory_plan(&cfg, (24, t), Precision::Bf16, r, 1)) as f64;
        assert!(b24(true) < room && b24(false) > room);
        let b32 = gpu_memory_plan(&cfg, (32, t), Precision::Bf16, true, 1);
        assert!(plan_bytes(&b32) as f64 > room, "{}", describe_plan(&b32));
    }

    #[test]
    fn a_data_parallel_rank_plans_its_share_of_the_optimizer() {
        // ZeRO-1 over 4 ranks: master weights and moments are a quarter (shares of 64-element
        // multiples), the bf16 weights and the backward's gradients whole, plus the summed share.
        let cfg = GptConfig::preset(Preset::Gpt2);
        let part = |plan: &[(&str, usize)], name: &str| plan.iter().find(|(n, _)| *n == name).unwrap().1;
        let one = gpu_memory_plan(&cfg, (8, 1024), Precision::Bf16, false, 1);
        let four = gpu_memory_plan(&cfg, (8, 1024), Precision::Bf16, false, 4);
        let n = ParamLayout::new(&cfg).total;
        let share = n.div_ceil(4).next_multiple_of(64);
        assert_eq!(part(&four, "master weights"), 4 * share);
        assert_eq!(part(&four, "AdamW moments"), 8 * share);
        assert_eq!(part(&four, "weights"), 2 * 4 * share);
        assert_eq!(part(&four, "gradients"), 4 * 4 * share + 4 * share);
        assert!(plan_bytes(&four) < plan_bytes(&one));
        assert_eq!(part(&four, "activations"), part(&one, "activations"));
    }
}
