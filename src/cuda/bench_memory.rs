//! The benchmark behind `finch bench memory`: the memory-bound kernels of the training step at
//! GPT-2 124M shapes (B = 8, T = 1024, bf16), in GB/s and as a percentage of the device-to-device
//! copy bandwidth measured in the same run.
//!
//! Bytes are what each launch must move (every input and output once, as `cuda/ops.rs` states them
//! for `--profile`), read from the profiler on one untimed call; times are CUDA-event medians of
//! batches of back-to-back calls, as in the matmul benchmark. The copy moves 256 MiB with
//! cuMemcpyDtoDAsync and counts its read and its write.

use super::bench::{ptr, random_bf16, time_ms};
use super::model::{adamw_chunks, adamw_header, StepState, STEP_STATE_BYTES};
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

/// Runs every memory-bound operation of the step and times it against the copy.
pub fn bench_memory(gpu: &Arc<Gpu>, quick: bool, timing: (usize, usize)) -> Result<MemoryBench> {
    let s = Shapes::new(quick);
    let (n, c, cfg) = (s.n, s.cfg.n_embd, s.cfg);
    let (v, vp) = (cfg.vocab_size, cfg.padded_vocab_size());
    let p = ParamLayout::new(&cfg).total;
    let ops = Ops { gpu, precision: Precision::Bf16, force_variant: None };
    let mut rng = Rng::new(7);
    let copy = copy_gbps(gpu, if quick { 1 << 20 } else { 256 << 20 }, timing)?;
    let bf = |len: usize, rng: &mut Rng| gpu.stream.clone_htod(&random_bf16(len, rng.next_u64()));
    let f32s = |len: usize| gpu.stream.alloc_zeros::<f32>(len);

    // Buffers: activations (N·C and N·4C), the logits, weights, fp32 gradients and moments.
    let (x1, x2, x3) = (bf(n * c, &mut rng)?, bf(n * c, &mut rng)?, bf(n * c, &mut rng)?);
    let (out, res) = (bf(n * c, &mut rng)?, bf(n * c, &mut rng)?);
    let wide = bf(n * 4 * c, &mut rng)?;
    let logits = bf(n * vp, &mut rng)?;
    let (w, bias) = (bf(c, &mut rng)?, bf(c, &mut rng)?);
    let (wte, wpe) = (bf(vp * c, &mut rng)?, bf(s.t * c, &mut rng)?);
    let (mean, rstd, losses) = (f32s(n)?, f32s(n)?, f32s(n)?);
    let (dw, db, dbias) = (f32s(c)?, f32s(c)?, f32s(4 * c)?);
    let (dwte, dwpe) = (f32s(vp * c)?, f32s(s.t * c)?);
    let scratch = f32s(layernorm_scratch_len(n, c).max(bias_scratch_len(n, 4 * c)))?;
    let norm_scratch = gpu.stream.alloc_zeros::<f64>(NORM_BLOCKS + 1)?;
    let (params, grads, master, m, vv) = (bf(p, &mut rng)?, f32s(p)?, f32s(p)?, f32s(p)?, f32s(p)?);
    let tokens: Vec<u32> = (0..n).map(|_| (rng.next_u64() % v as u64) as u32).collect();
    let tokens_i32: Vec<i32> = tokens.iter().map(|&x| x as i32).collect();
    let buckets = TokenBuckets::new(&tokens);
    let inputs = gpu.stream.clone_htod(&tokens_i32)?;
    let targets = gpu.stream.clone_htod(&tokens_i32)?;
    let (bt, bs, bp) = (
        gpu.stream.clone_htod(&buckets.tokens)?,
        gpu.stream.clone_htod(&buckets.starts)?,
        gpu.stream.clone_htod(&buckets.positions)?,
    );
    let count = gpu.stream.clone_htod(&[buckets.tokens.len() as i32])?;
    let layout = ParamLayout::new(&cfg);
    let chunks: Vec<i32> = adamw_chunks(&layout).concat();
    let chunks_d = gpu.stream.clone_htod(&chunks)?;
    let header = gpu.stream.clone_htod(&adamw_header(
        &AdamWConfig { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 }.step(1, 6e-4),
    ))?;
    let state = StepState { loss: 1.0, norm_sq: 1.0, norm: 1.0, grad_scale: 1.0, finite: 1 };
    let state_d = gpu.stream.clone_htod(bytemuck::bytes_of(&state))?;
    debug_assert_eq!(STEP_STATE_BYTES, 32);

    let d = |s: &CudaSlice<bf16>| ptr(gpu, s);
    let g = |s: &CudaSlice<f32>| ptr(gpu, s);
    let (b, t) = (s.b, s.t);
    type Op<'a> = Box<dyn FnMut(usize) -> Result<()> + 'a>;
    let mut cases: Vec<(&str, String, Op)> = vec![
        (
            "encoder forward",
            format!("N={n} C={c}"),
            Box::new(|_| ops.encoder_forward(d(&out), ptr(gpu, &inputs), d(&wte), d(&wpe), b, t, c)),
        ),
        (
            "encoder backward",
            format!("N={n} C={c}"),
            Box::new(|_| {
                let bk = (ptr(gpu, &bt), ptr(gpu, &bs), ptr(gpu, &bp), ptr(gpu, &count));
                ops.encoder_backward(g(&dwte), g(&dwpe), d(&x1), bk, b, t, c)
            }),
        ),
        (
            "residual + layernorm forward",
            format!("N={n} C={c}"),
            Box::new(|_| {
                ops.residual_layernorm_forward(
                    d(&res),
                    d(&out),
                    g(&mean),
                    g(&rstd),
                    d(&x1),
                    d(&x2),
                    d(&w),
                    d(&bias),
                    n,
                    c,
                    1e-5,
                )
            }),
        ),
        (
            "layernorm backward",
            format!("N={n} C={c}"),
            Box::new(|_| {
                let (dw, db) = (g(&dw), g(&db));
                ops.layernorm_backward(
                    d(&x3),
                    d(&x3),
                    (dw, db),
                    d(&x2),
                    d(&x1),
                    g(&mean),
                    g(&rstd),
                    d(&w),
                    g(&scratch),
                    n,
                    c,
                )
            }),
        ),
        (
            "bias gradient",
            format!("N={n} OC={}", 4 * c),
            Box::new(|_| ops.bias_grad(g(&dbias), g(&scratch), d(&wide), n, 4 * c)),
        ),
        (
            "cross-entropy (+ dlogits in place)",
            format!("N={n} Vp={vp}"),
            Box::new(|_| {
                let l = d(&logits);
                ops.crossentropy(g(&losses), Some(l), l, ptr(gpu, &targets), n, v, vp, 1.0 / n as f32)
            }),
        ),
        (
            "gradient norm",
            format!("P={p}"),
            Box::new(|_| {
                ops.grad_norm_squared_into(
                    ptr(gpu, &norm_scratch).add(NORM_BLOCKS, 8),
                    g(&grads),
                    p,
                    ptr(gpu, &norm_scratch),
                )
            }),
        ),
        (
            "AdamW (all tensors)",
            format!("P={p}"),
            Box::new(|_| {
                let bufs = (d(&params), g(&master), g(&grads), g(&m), g(&vv));
                let chunks = (ptr(gpu, &chunks_d), chunks.len() / 4);
                ops.adamw(bufs, chunks, p, ptr(gpu, &header), ptr(gpu, &state_d))
            }),
        ),
    ];
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
