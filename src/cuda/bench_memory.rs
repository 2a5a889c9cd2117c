//! The benchmark behind `finch bench memory`: the memory-bound kernels of the training step at
//! GPT-2 124M shapes (B = 8, T = 1024, bf16), in GB/s and as a percentage of the device-to-device
//! copy bandwidth measured in the same run.
//!
//! Bytes are what each launch must move (every input and output once, as `cuda/ops.rs` states them
//! for `--profile`), read from the profiler on one untimed call; times are CUDA-event medians of
//! batches of back-to-back calls, as in the matmul benchmark. The copy moves 256 MiB with
//! cuMemcpyDtoDAsync and counts its read and its write.

use super::bench::{ptr, random_bf16, time_ms};
use super::model::{adamw_chunks, adamw_header, StepState};
use super::ops::{bias_scratch_len, layernorm_scratch_len, Ops, TokenBuckets, NORM_BLOCKS};
use super::profile::{KernelTotal, Profiler};
use super::{Gpu, Precision};
use crate::cpu::optimizer::AdamWConfig;
use crate::model::config::{GptConfig, Preset};
use crate::model::layout::ParamLayout;
use crate::model::rng::Rng;
use anyhow::Result;
use cudarc::driver::CudaSlice;
use half::bf16;
use serde::Serialize;
use std::sync::Arc;

/// One operation's result: its kernels, bytes moved per call, time and bandwidth.
#[derive(Debug, Clone, Serialize)]
pub struct MemoryResult {
    pub op: String,
    pub kernels: Vec<String>,
    pub shape: String,
    pub bytes: f64,
    pub ms: f64,
    pub gbps: f64,
    /// Of the device-to-device copy's GB/s in the same run.
    pub of_copy: f64,
    pub device: String,
}

/// The copy's bandwidth and every operation's result.
#[derive(Debug, Clone, Serialize)]
pub struct MemoryBench {
    pub copy_gbps: f64,
    pub results: Vec<MemoryResult>,
}

/// The shapes: GPT-2 124M at B·T = 8192 (N rows, C channels, Vp padded vocabulary, P
/// parameters), or tiny ones (`quick`: the benchmark runs, the numbers mean nothing).
struct Shapes {
    n: usize,
    b: usize,
    t: usize,
    cfg: GptConfig,
}

impl Shapes {
    fn new(quick: bool) -> Shapes {
        let cfg = match quick {
            false => GptConfig::preset(Preset::Gpt2),
            true => GptConfig {
                n_layer: 1,
                n_head: 2,
                n_embd: 64,
                vocab_size: 500,
                n_positions: 64,
                layer_norm_epsilon: 1e-5,
            },
        };
        let (b, t) = if quick { (2, 32) } else { (8, 1024) };
        Shapes { n: b * t, b, t, cfg }
    }
}

/// The device-to-device copy bandwidth, GB/s (read + write), over `bytes`.
fn copy_gbps(gpu: &Arc<Gpu>, bytes: usize, timing: (usize, usize)) -> Result<f64> {
    let src: CudaSlice<u8> = gpu.stream.alloc_zeros(bytes)?;
    let mut dst: CudaSlice<u8> = gpu.stream.alloc_zeros(bytes)?;
    let ms = time_ms(gpu, timing.0, timing.1, |_| Ok(gpu.stream.memcpy_dtod(&src, &mut dst)?))?;
    Ok(2.0 * bytes as f64 / (ms * 1e-3) / 1e9)
}

/// The kernels one call of `f` launches and the bytes they move (from the profiler).
fn work_of(gpu: &Gpu, f: &mut impl FnMut(usize) -> Result<()>) -> Result<Vec<KernelTotal>> {
    *gpu.profiler.lock().unwrap_or_else(|e| e.into_inner()) = Some(Profiler::recording());
    let run = f(0);
    gpu.synchronize()?;
    let mut profiler = gpu.profiler.lock().unwrap_or_else(|e| e.into_inner()).take().expect("set above");
    run?;
    profiler.end_step()?;
    Ok(profiler.totals)
}

/// One benchmarked operation: its name, its shape, and a call that runs it (owning its buffers).
type Case<'a> = (&'static str, String, Box<dyn FnMut(usize) -> Result<()> + 'a>);

/// Runs every memory-bound operation of the step and times it against the copy.
pub fn bench_memory(gpu: &Arc<Gpu>, quick: bool, timing: (usize, usize)) -> Result<MemoryBench> {
    let s = Shapes::new(quick);
    let ops = Ops { gpu, precision: Precision::Bf16, force_variant: None };
    let mut rng = Rng::new(7);
    let copy = copy_gbps(gpu, if quick { 1 << 20 } else { 256 << 20 }, timing)?;
    let mut cases = activation_cases(&ops, &s, &mut rng)?;
    cases.extend(step_cases(&ops, &s, &mut rng)?);
    let mut results = Vec::new();
    for (op, shape, f) in cases.iter_mut() {
        let kernels = work_of(gpu, f)?;
        let bytes: f64 = kernels.iter().map(|k| k.bytes).sum();
        let ms = time_ms(gpu, timing.0, timing.1, &mut *f)?;
        let gbps = bytes / (ms * 1e-3) / 1e9;
        results.push(MemoryResult {
            op: op.to_string(),
            kernels: kernels.iter().map(|k| k.kernel.clone()).collect(),
            shape: shape.clone(),
            bytes,
            ms,
            gbps,
            of_copy: gbps / copy,
            device: gpu.name.clone(),
        });
    }
    Ok(MemoryBench { copy_gbps: copy, results })
}

fn bf16s(gpu: &Gpu, len: usize, rng: &mut Rng) -> Result<CudaSlice<bf16>> {
    Ok(gpu.stream.clone_htod(&random_bf16(len, rng.next_u64()))?)
}

fn f32s(gpu: &Gpu, len: usize) -> Result<CudaSlice<f32>> {
    Ok(gpu.stream.alloc_zeros::<f32>(len)?)
}

/// The operations on activations: the embedding forward and backward, the residual +
/// LayerNorm forward, the LayerNorm backward and the bias gradient.
fn activation_cases<'a>(ops: &'a Ops<'a>, s: &Shapes, rng: &mut Rng) -> Result<Vec<Case<'a>>> {
    let (gpu, n, c, (b, t)) = (ops.gpu, s.n, s.cfg.n_embd, (s.b, s.t));
    let vp = s.cfg.padded_vocab_size();
    let d = move |x: &CudaSlice<bf16>| ptr(gpu, x);
    let g = move |x: &CudaSlice<f32>| ptr(gpu, x);
    let (x1, x2, x3, out) =
        (bf16s(gpu, n * c, rng)?, bf16s(gpu, n * c, rng)?, bf16s(gpu, n * c, rng)?, bf16s(gpu, n * c, rng)?);
    let (w, bias, wide) = (bf16s(gpu, c, rng)?, bf16s(gpu, c, rng)?, bf16s(gpu, n * 4 * c, rng)?);
    let (wte, wpe) = (bf16s(gpu, vp * c, rng)?, bf16s(gpu, t * c, rng)?);
    let (mean, rstd) = (f32s(gpu, n)?, f32s(gpu, n)?);
    let (dw, db, dbias, dwte, dwpe) =
        (f32s(gpu, c)?, f32s(gpu, c)?, f32s(gpu, 4 * c)?, f32s(gpu, vp * c)?, f32s(gpu, t * c)?);
    let scratch = f32s(gpu, layernorm_scratch_len(n, c).max(bias_scratch_len(n, 4 * c)))?;
    let tokens: Vec<u32> = (0..n).map(|_| (rng.next_u64() % s.cfg.vocab_size as u64) as u32).collect();
    let buckets = TokenBuckets::new(&tokens);
    let inputs = gpu.stream.clone_htod(&tokens.iter().map(|&x| x as i32).collect::<Vec<i32>>())?;
    let bk: Vec<CudaSlice<i32>> =
        [&buckets.tokens, &buckets.starts, &buckets.positions, &vec![buckets.tokens.len() as i32]]
            .into_iter()
            .map(|v| gpu.stream.clone_htod(v))
            .collect::<std::result::Result<_, _>>()?;
    let ptrs = (d(&x1), d(&x2), d(&x3), d(&out));
    let (p_w, p_b, p_mean, p_rstd, p_scratch) = (d(&w), d(&bias), g(&mean), g(&rstd), g(&scratch));
    // The buffers live as long as the cases: moved into the last one.
    let keep = (x1, x2, x3, out, w, bias, mean, rstd, scratch);
    Ok(vec![
        (
            "encoder forward",
            format!("N={n} C={c}"),
            Box::new(move |_| ops.encoder_forward(ptrs.3, ptr(gpu, &inputs), d(&wte), d(&wpe), b, t, c)),
        ),
        (
            "encoder backward",
            format!("N={n} C={c}"),
            Box::new(move |_| {
                let buckets = (ptr(gpu, &bk[0]), ptr(gpu, &bk[1]), ptr(gpu, &bk[2]), ptr(gpu, &bk[3]));
                ops.encoder_backward(g(&dwte), g(&dwpe), ptrs.0, buckets, b, t, c)
            }),
        ),
        (
            "residual + layernorm forward",
            format!("N={n} C={c}"),
            Box::new(move |_| {
                ops.residual_layernorm_forward(ptrs.2, ptrs.3, p_mean, p_rstd, ptrs.0, ptrs.1, p_w, p_b, n, c, 1e-5)
            }),
        ),
        (
            "layernorm backward",
            format!("N={n} C={c}"),
            Box::new(move |_| {
                let grads = (g(&dw), g(&db));
                ops.layernorm_backward(ptrs.2, ptrs.2, grads, ptrs.1, ptrs.0, p_mean, p_rstd, p_w, p_scratch, n, c)
            }),
        ),
        (
            "bias gradient",
            format!("N={n} OC={}", 4 * c),
            Box::new(move |_| {
                let _ = &keep;
                ops.bias_grad(g(&dbias), p_scratch, d(&wide), n, 4 * c)
            }),
        ),
    ])
}

/// The step's other memory-bound operations: the cross-entropy over the logits (its gradient
/// in place), the gradient norm and AdamW over every parameter.
fn step_cases<'a>(ops: &'a Ops<'a>, s: &Shapes, rng: &mut Rng) -> Result<Vec<Case<'a>>> {
    let (gpu, n, cfg) = (ops.gpu, s.n, s.cfg);
    let (v, vp) = (cfg.vocab_size, cfg.padded_vocab_size());
    let layout = ParamLayout::new(&cfg);
    let p = layout.total;
    let logits = bf16s(gpu, n * vp, rng)?;
    let losses = f32s(gpu, n)?;
    let targets = gpu.stream.clone_htod(&(0..n).map(|_| (rng.next_u64() % v as u64) as i32).collect::<Vec<i32>>())?;
    let norm_scratch = gpu.stream.alloc_zeros::<f64>(NORM_BLOCKS + 1)?;
    let (params, grads, master, m, vv) =
        (bf16s(gpu, p, rng)?, f32s(gpu, p)?, f32s(gpu, p)?, f32s(gpu, p)?, f32s(gpu, p)?);
    let chunks: Vec<i32> = adamw_chunks(&layout).concat();
    let n_chunks = chunks.len() / 4;
    let chunks = gpu.stream.clone_htod(&chunks)?;
    let hp = AdamWConfig { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 };
    let header = gpu.stream.clone_htod(&adamw_header(&hp.step(1, 6e-4)))?;
    let state = StepState { loss: 1.0, norm_sq: 1.0, norm: 1.0, grad_scale: 1.0, finite: 1, ..StepState::default() };
    let state = gpu.stream.clone_htod(bytemuck::bytes_of(&state))?;
    let grads_ptr = ptr(gpu, &grads);
    Ok(vec![
        (
            "cross-entropy (+ dlogits in place)",
            format!("N={n} Vp={vp}"),
            Box::new(move |_| {
                let l = ptr(gpu, &logits);
                ops.crossentropy(ptr(gpu, &losses), Some(l), l, ptr(gpu, &targets), n, v, vp, 1.0 / n as f32)
            }),
        ),
        (
            "gradient norm",
            format!("P={p}"),
            Box::new(move |_| {
                let at = ptr(gpu, &norm_scratch);
                ops.grad_norm_squared_into(at.add(NORM_BLOCKS, 8), grads_ptr, p, at)
            }),
        ),
        (
            "AdamW (all tensors)",
            format!("P={p}"),
            Box::new(move |_| {
                let bufs = (ptr(gpu, &params), ptr(gpu, &master), ptr(gpu, &grads), ptr(gpu, &m), ptr(gpu, &vv));
                ops.adamw(bufs, (ptr(gpu, &chunks), n_chunks), p, ptr(gpu, &header), ptr(gpu, &state))
            }),
        ),
    ])
}
