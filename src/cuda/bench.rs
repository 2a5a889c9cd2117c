//! The matmul benchmark behind `finch bench matmul`: our kernel against cuBLAS on the same data, in
//! the same run.
//!
//! For each shape and each tensor-core variant timed (the one finch runs for the shape, or with
//! `--sweep` every one): random normal bf16 inputs (two sets, alternated so caches do not flatter,
//! generated on all cores), a correctness check of both against an f64 CPU dot product at
//! sampled outputs, then timing with CUDA events after warm-up: the median of the repeats, each
//! a batch of back-to-back launches lasting about 2 ms. cuBLAS runs bf16 in, bf16 out, fp32
//! compute (cublasGemmEx). TFLOP/s = 2·M·N·K / time; "% peak" is relative to the best cuBLAS
//! figure measured in the same run (the achievable peak on this device, not the datasheet's).

use super::ops::{Epilogue, MatmulVariant, Ops};
use super::{DPtr, Gpu, Precision};
use crate::model::rng::Rng;
use anyhow::{bail, Context, Result};
use cudarc::cublas::sys::cublasOperation_t::{CUBLAS_OP_N, CUBLAS_OP_T};
use cudarc::cublas::{CudaBlas, Gemm, GemmConfig};
use cudarc::driver::{CudaSlice, DevicePtr};
use half::bf16;
use serde::Serialize;
use std::sync::Arc;

/// Which operand is transposed, as the training products need: forward Y = X·W (NN),
/// dX = dY·Wᵀ (NT), dW = Xᵀ·dY (TN). All matrices are row-major.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Op {
    NN,
    NT,
    TN,
}

#[derive(Debug, Clone, Serialize)]
pub struct Shape {
    pub name: String,
    pub op: Op,
    pub m: usize,
    pub n: usize,
    pub k: usize,
}

/// The rows (B·T) of GPT-2 shapes `--shapes gpt2` times, and the sweep's.
pub const GPT2_ROWS: [usize; 2] = [8192, 16384];
pub const SWEEP_ROWS: [usize; 4] = [8192, 16384, 32768, 65536];

/// GPT-2 124M's products at B·T rows: for each layer (C, OC) the forward, dX and dW shapes.
pub fn gpt2_shapes(rows: &[usize]) -> Vec<Shape> {
    let layers = [
        ("qkv", 768, 2304),
        ("attn_proj", 768, 768),
        ("fc", 768, 3072),
        ("mlp_proj", 3072, 768),
        ("logits", 768, 50304),
    ];
    let mut out = Vec::new();
    for &rows in rows {
        for (name, c, oc) in layers {
            out.push(Shape { name: format!("{name} fwd"), op: Op::NN, m: rows, n: oc, k: c });
            out.push(Shape { name: format!("{name} dX"), op: Op::NT, m: rows, n: c, k: oc });
            out.push(Shape { name: format!("{name} dW"), op: Op::TN, m: c, n: oc, k: rows });
        }
    }
    out
}

/// 4096³ and 8192³.
pub fn square_shapes() -> Vec<Shape> {
    [4096, 8192].map(|s| Shape { name: "square".into(), op: Op::NN, m: s, n: s, k: s }).to_vec()
}

/// `--shapes`: gpt2 (at [`GPT2_ROWS`]), square, or all.
pub fn shapes(which: &str) -> Result<Vec<Shape>> {
    match which {
        "gpt2" => Ok(gpt2_shapes(&GPT2_ROWS)),
        "square" => Ok(square_shapes()),
        "all" => Ok([gpt2_shapes(&GPT2_ROWS), square_shapes()].concat()),
        _ => bail!("--shapes {which}: expected gpt2, square or all"),
    }
}

impl Shape {
    /// Elements of the stored A and B.
    fn sizes(&self) -> (usize, usize) {
        (self.m * self.k, self.k * self.n)
    }

    /// A[m,k] and B[k,n] as (row stride, column stride) into their storage.
    fn strides(&self) -> ((usize, usize), (usize, usize)) {
        let (m, n, k) = (self.m, self.n, self.k);
        match self.op {
            Op::NN => ((k, 1), (n, 1)),
            Op::NT => ((k, 1), (1, k)), // B stored (N, K)
            Op::TN => ((1, m), (n, 1)), // A stored (K, M)
        }
    }
}

/// One tensor-core variant on one shape.
#[derive(Debug, Clone, Serialize)]
pub struct VariantResult {
    pub variant: &'static str,
    pub ms: f64,
    pub tflops: f64,
    /// ours / cuBLAS throughput.
    pub ratio: f64,
    pub error: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct MatmulResult {
    pub shape: Shape,
    /// One entry per variant timed: the one finch runs for this shape, or all with `--sweep`.
    pub ours: Vec<VariantResult>,
    pub cublas_ms: f64,
    pub cublas_tflops: f64,
    pub cublas_error: f64,
    pub device: String,
}

impl MatmulResult {
    /// The fastest of the variants timed.
    pub fn best(&self) -> &VariantResult {
        self.ours.iter().max_by(|a, b| a.tflops.total_cmp(&b.tflops)).expect("at least one variant")
    }
}

/// Back-to-back launches per timed batch aim at this much GPU time: one launch of a small shape
/// lasts microseconds, less than the launch and event overhead a single timing would include.
const BATCH_MS: f64 = 2.0;
/// Launches per batch at most.
const MAX_BATCH: usize = 200;

/// Median over `repeats` timed batches of the time of one call of `f`, in ms, with CUDA events.
/// Each batch is `n` back-to-back calls, `n` chosen from the warm-up so that a batch lasts about
/// [`BATCH_MS`]: small shapes are then timed as cuBLAS is usually quoted, without per-launch
/// overhead.
pub(super) fn time_ms(gpu: &Gpu, warmup: usize, repeats: usize, mut f: impl FnMut(usize) -> Result<()>) -> Result<f64> {
    let flags = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
    let (start, end) = (gpu.ctx.new_event(flags)?, gpu.ctx.new_event(flags)?);
    let mut one = f64::INFINITY;
    for i in 0..warmup.max(1) {
        start.record(&gpu.stream)?;
        f(i)?;
        end.record(&gpu.stream)?;
        one = one.min(start.elapsed_ms(&end)? as f64);
    }
    let n = batch_size(one);
    let mut times = Vec::with_capacity(repeats);
    for i in 0..repeats {
        start.record(&gpu.stream)?;
        for j in 0..n {
            f(i * n + j)?;
        }
        end.record(&gpu.stream)?;
        times.push(start.elapsed_ms(&end)? as f64 / n as f64);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// Launches per timed batch for a call that takes `one_ms`.
fn batch_size(one_ms: f64) -> usize {
    ((BATCH_MS / one_ms.max(1e-6)).ceil() as usize).clamp(1, MAX_BATCH)
}

/// `n` normal bf16 values, generated in parallel: chunk i draws from its own generator seeded
/// from `seed` and i, so the values depend on neither the thread count nor the schedule.
pub(super) fn random_bf16(n: usize, seed: u64) -> Vec<bf16> {
    use rayon::prelude::*;
    const CHUNK: usize = 1 << 20;
    let mut x = vec![bf16::ZERO; n];
    x.par_chunks_mut(CHUNK).enumerate().for_each(|(i, chunk)| {
        let mut rng = Rng::new(seed ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let mut values = vec![0f32; chunk.len()];
        rng.fill_normal(&mut values, 0.0, 1.0);
        chunk.iter_mut().zip(values).for_each(|(out, v)| *out = bf16::from_f32(v));
    });
    x
}

pub(super) fn ptr<T>(gpu: &Gpu, s: &CudaSlice<T>) -> DPtr {
    DPtr(s.device_ptr(&gpu.stream).0)
}

/// max |got − ref| / max |ref| over sampled outputs, ref in f64 from the host inputs.
fn sampled_error(shape: &Shape, a: &[bf16], b: &[bf16], c: &[bf16], rng: &mut Rng) -> f64 {
    let ((a_rs, a_cs), (b_rs, b_cs)) = shape.strides();
    let (mut worst, mut scale) = (0f64, f64::MIN_POSITIVE);
    for _ in 0..256 {
        let (i, j) = ((rng.next_u64() % shape.m as u64) as usize, (rng.next_u64() % shape.n as u64) as usize);
        let want: f64 = (0..shape.k).map(|k| a[i * a_rs + k * a_cs].to_f64() * b[k * b_rs + j * b_cs].to_f64()).sum();
        let got = c[i * shape.n + j].to_f64();
        if got.is_nan() {
            return f64::NAN;
        }
        worst = worst.max((got - want).abs());
        scale = scale.max(want.abs());
    }
    worst / scale
}

/// One shape: correctness of each variant, then timing of each and of cuBLAS.
pub fn bench_shape(
    gpu: &Arc<Gpu>,
    blas: &CudaBlas,
    shape: &Shape,
    variants: &[&'static MatmulVariant],
    (warmup, repeats): (usize, usize),
    rng: &mut Rng,
) -> Result<MatmulResult> {
    let (a_len, b_len) = shape.sizes();
    // Several billion values for the largest shapes: generated on all cores.
    let host: Vec<(Vec<bf16>, Vec<bf16>)> =
        (0..2).map(|_| (random_bf16(a_len, rng.next_u64()), random_bf16(b_len, rng.next_u64()))).collect();
    let dev: Vec<(CudaSlice<bf16>, CudaSlice<bf16>)> = host
        .iter()
        .map(|(a, b)| Ok((gpu.stream.clone_htod(a)?, gpu.stream.clone_htod(b)?)))
        .collect::<Result<_>>()
        .context("cannot upload the benchmark inputs")?;
    let mut c: CudaSlice<bf16> = gpu.stream.alloc_zeros(shape.m * shape.n)?;
    let ops = Ops { gpu, precision: Precision::Bf16, force_variant: None };
    let ((a_rs, a_cs), (b_rs, b_cs)) = shape.strides();
    let c_ptr = ptr(gpu, &c);
    let ours = |variant: &MatmulVariant, set: usize| {
        let (a, b) = &dev[set % 2];
        ops.matmul_variant(
            Some(variant),
            c_ptr,
            false,
            (ptr(gpu, a), a_rs, a_cs),
            (ptr(gpu, b), b_rs, b_cs),
            Epilogue::default(),
            shape.m,
            shape.n,
            shape.k,
        )
    };
    // Row-major C = op(A)·op(B) is column-major Cᵀ = op(B)ᵀ·op(A)ᵀ: swap the operands.
    let (m, n, k) = (shape.m as i32, shape.n as i32, shape.k as i32);
    let cfg = match shape.op {
        Op::NN => GemmConfig {
            transa: CUBLAS_OP_N,
            transb: CUBLAS_OP_N,
            m: n,
            n: m,
            k,
            alpha: bf16::ONE,
            lda: n,
            ldb: k,
            beta: bf16::ZERO,
            ldc: n,
        },
        Op::NT => GemmConfig {
            transa: CUBLAS_OP_T,
            transb: CUBLAS_OP_N,
            m: n,
            n: m,
            k,
            alpha: bf16::ONE,
            lda: k,
            ldb: k,
            beta: bf16::ZERO,
            ldc: n,
        },
        Op::TN => GemmConfig {
            transa: CUBLAS_OP_N,
            transb: CUBLAS_OP_T,
            m: n,
            n: m,
            k,
            alpha: bf16::ONE,
            lda: n,
            ldb: m,
            beta: bf16::ZERO,
            ldc: n,
        },
    };
    let cublas = |set: usize, c: &mut CudaSlice<bf16>| -> Result<()> {
        let (a, b) = &dev[set % 2];
        // Safety: the sizes in `cfg` match the allocations above.
        unsafe { blas.gemm(cfg, b, a, c) }.context("cuBLAS gemm failed")
    };

    // Correctness first, on input set 0, with the output poisoned beforehand.
    let mut check = |run: &mut dyn FnMut(&mut CudaSlice<bf16>) -> Result<()>| -> Result<f64> {
        gpu.fill_bytes(c_ptr, 0xFF, 2 * shape.m * shape.n)?;
        run(&mut c)?;
        let got = gpu.stream.clone_dtoh(&c)?;
        Ok(sampled_error(shape, &host[0].0, &host[0].1, &got, rng))
    };
    let cublas_error = check(&mut |c| cublas(0, c))?;
    let errors: Vec<f64> = variants.iter().map(|v| check(&mut |_| ours(v, 0))).collect::<Result<_>>()?;

    let cublas_ms = time_ms(gpu, warmup, repeats, |set| cublas(set, &mut c))?;
    let flops = 2.0 * shape.m as f64 * shape.n as f64 * shape.k as f64;
    let tflops = |ms: f64| flops / (ms * 1e-3) / 1e12;
    let mut results = Vec::new();
    for (variant, error) in variants.iter().zip(errors) {
        let ms = time_ms(gpu, warmup, repeats, |set| ours(variant, set))?;
        results.push(VariantResult { variant: variant.name, ms, tflops: tflops(ms), ratio: cublas_ms / ms, error });
    }
    Ok(MatmulResult {
        shape: shape.clone(),
        ours: results,
        cublas_ms,
        cublas_tflops: tflops(cublas_ms),
        cublas_error,
        device: gpu.name.clone(),
    })
}

/// One attention shape: B sequences of N tokens, H heads of dimension d (causal, bf16).
#[derive(Debug, Clone, Copy, Serialize)]
pub struct AttentionShape {
    pub b: usize,
    pub n: usize,
    pub h: usize,
    pub d: usize,
}

/// FlashAttention's benchmark shapes: 16K tokens per batch (B = 16384 / N), width 2048
/// (H = 2048 / d), N from 256 to 4096, d = 64 and 128. `quick`: two tiny ones, to show the
/// benchmark runs (through the fake CUDA driver, say); their numbers mean nothing.
pub fn attention_shapes(quick: bool) -> Vec<AttentionShape> {
    if quick {
        return vec![AttentionShape { b: 1, n: 65, h: 2, d: 64 }, AttentionShape { b: 2, n: 33, h: 1, d: 128 }];
    }
    let mut out = Vec::new();
    for d in [64, 128] {
        for n in [256, 512, 1024, 2048, 4096] {
            out.push(AttentionShape { b: 16384 / n, n, h: 2048 / d, d });
        }
    }
    out
}

#[derive(Debug, Clone, Serialize)]
pub struct AttentionResult {
    pub shape: AttentionShape,
    pub fwd_ms: f64,
    pub bwd_ms: f64,
    pub fwd_tflops: f64,
    pub bwd_tflops: f64,
    /// Forward and backward together.
    pub total_tflops: f64,
    pub device: String,
}

/// FLOPs of the causal forward, FlashAttention's convention: 4·B·H·N²·d / 2; the backward is
/// counted as 2.5 times that.
pub fn attention_forward_flops(s: &AttentionShape) -> f64 {
    4.0 * (s.b * s.h) as f64 * (s.n as f64).powi(2) * s.d as f64 / 2.0
}

/// Times finch's bf16 attention forward and backward (its D kernel included) on random inputs,
/// after checking the outputs are finite.
pub fn bench_attention(
    gpu: &Arc<Gpu>,
    shape: &AttentionShape,
    (warmup, repeats): (usize, usize),
    rng: &mut Rng,
) -> Result<AttentionResult> {
    let AttentionShape { b, n, h, d } = *shape;
    let c = h * d;
    let qkv = gpu.stream.clone_htod(&random_bf16(b * n * 3 * c, rng.next_u64()))?;
    let dout = gpu.stream.clone_htod(&random_bf16(b * n * c, rng.next_u64()))?;
    let out: CudaSlice<bf16> = gpu.stream.alloc_zeros(b * n * c)?;
    let dqkv: CudaSlice<bf16> = gpu.stream.alloc_zeros(b * n * 3 * c)?;
    let lse: CudaSlice<f32> = gpu.stream.alloc_zeros(b * h * n)?;
    let scratch: CudaSlice<f32> = gpu.stream.alloc_zeros(super::ops::attention_scratch_len(b, n, h))?;
    let ops = Ops { gpu, precision: Precision::Bf16, force_variant: None };
    let (qkv, dout, out, dqkv, lse, scratch) =
        (ptr(gpu, &qkv), ptr(gpu, &dout), ptr(gpu, &out), ptr(gpu, &dqkv), ptr(gpu, &lse), ptr(gpu, &scratch));
    let forward = |_| ops.attention_forward(out, lse, qkv, b, n, c, h);
    let backward = |_| ops.attention_backward(dqkv, dout, qkv, out, lse, scratch, b, n, c, h);
    forward(0)?;
    backward(0)?;
    let mut got = vec![bf16::ZERO; b * n * 3 * c];
    gpu.download(&mut got, dqkv)?;
    if let Some(bad) = got.iter().position(|x| !x.to_f32().is_finite()) {
        bail!("attention backward at {shape:?}: dqkv[{bad}] is not finite");
    }
    let fwd_ms = time_ms(gpu, warmup, repeats, forward)?;
    let bwd_ms = time_ms(gpu, warmup, repeats, backward)?;
    let flops = attention_forward_flops(shape);
    let tf = |f: f64, ms: f64| f / (ms * 1e-3) / 1e12;
    Ok(AttentionResult {
        shape: *shape,
        fwd_ms,
        bwd_ms,
        fwd_tflops: tf(flops, fwd_ms),
        bwd_tflops: tf(2.5 * flops, bwd_ms),
        total_tflops: tf(3.5 * flops, fwd_ms + bwd_ms),
        device: gpu.name.clone(),
    })
}

/// Correctness bound of the sampled check: bf16 output rounding (2⁻⁸ relative) plus fp32
/// accumulation, as in `finch check`.
pub const TOLERANCE: f64 = 1.6e-2;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_cover_the_three_products() {
        let all = shapes("all").unwrap();
        assert_eq!(all.len(), 2 * 5 * 3 + 2);
        assert_eq!(gpt2_shapes(&SWEEP_ROWS).len(), 4 * 5 * 3);
        let logits_dw = all.iter().find(|s| s.name == "logits dW" && s.k == 16384).unwrap();
        assert_eq!((logits_dw.op, logits_dw.m, logits_dw.n), (Op::TN, 768, 50304));
        assert!(shapes("bogus").is_err());
    }

    #[test]
    fn inputs_are_normal_and_the_same_on_any_thread_count() {
        let x = random_bf16(3 << 20, 5);
        let one_thread = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
        assert!(x == one_thread.install(|| random_bf16(3 << 20, 5)));
        let mean = x.iter().map(|v| v.to_f64()).sum::<f64>() / x.len() as f64;
        let var = x.iter().map(|v| (v.to_f64() - mean).powi(2)).sum::<f64>() / x.len() as f64;
        assert!(mean.abs() < 2e-3 && (var - 1.0).abs() < 5e-3, "mean {mean}, variance {var}");
        assert!(x[..1 << 20] != x[1 << 20..2 << 20], "chunks must not repeat");
    }

    #[test]
    fn attention_shapes_and_flops_follow_flashattention() {
        let shapes = attention_shapes(false);
        assert_eq!(shapes.len(), 10);
        assert!(shapes.iter().all(|s| s.b * s.n == 16384 && s.h * s.d == 2048));
        // B=16, N=1024, H=32, d=64: 4·16·32·1024²·64/2 = 68.7 GFLOP.
        let s = AttentionShape { b: 16, n: 1024, h: 32, d: 64 };
        assert_eq!(attention_forward_flops(&s), 68_719_476_736.0);
    }

    #[test]
    fn batches_last_about_two_milliseconds() {
        assert_eq!(batch_size(0.01), 200);
        assert_eq!(batch_size(0.5), 4);
        assert_eq!(batch_size(5.0), 1);
    }

    #[test]
    fn sampled_error_uses_the_op_strides() {
        // C = Aᵀ·B with A stored (K, M): check against a hand computation.
        let shape = Shape { name: "t".into(), op: Op::TN, m: 2, n: 1, k: 2 };
        let a: Vec<bf16> = [1.0, 2.0, 3.0, 4.0].map(bf16::from_f32).to_vec(); // A stored (K=2, M=2)
        let b: Vec<bf16> = [5.0, 6.0].map(bf16::from_f32).to_vec(); // (K=2, N=1)
                                                                    // C[0] = 1·5 + 3·6 = 23, C[1] = 2·5 + 4·6 = 34.
        let c: Vec<bf16> = [23.0, 34.0].map(bf16::from_f32).to_vec();
        assert_eq!(sampled_error(&shape, &a, &b, &c, &mut Rng::new(3)), 0.0);
        let wrong: Vec<bf16> = [23.0, 35.0].map(bf16::from_f32).to_vec();
        assert!(sampled_error(&shape, &a, &b, &wrong, &mut Rng::new(3)) > 0.0);
    }
}
