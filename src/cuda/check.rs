//! The checks behind `finch check`: every GPU kernel, forward and backward, against the CPU
//! reference on the machine at hand, then a few training steps CPU vs GPU.
//!
//! Inputs are random normals (never zeros), rounded to the storage precision before either side
//! sees them, so both compute from identical values; the reference runs in f64. Outputs are
//! poisoned with NaN before each launch, so an element a kernel forgets to write fails the check.
//! Accumulated outputs (parameter gradients) start from random values, so a kernel that
//! overwrites instead of adding fails too. Shapes include sizes that are not multiples of any
//! tile (7, 33, 100, ...).
//!
//! The error of an output is max |gpu − reference| / max |reference|: relative to the tensor's
//! scale, so values near zero do not blow it up.
//! - f32: 2e-5. The kernels compute in f32 with a different summation order than the reference;
//!   f32's unit roundoff is 6e-8 and our sums have at most a few thousand terms, so errors of
//!   order 1e-6 are expected and 2e-5 leaves a margin without hiding a wrong element (a wrong
//!   element is off by O(1) of the scale).
//! - bf16: 1.6e-2, about four bf16 ulps (2⁻⁸ each) at the top of the range: outputs are rounded to
//!   bf16 once, and some kernels round an intermediate (the fused residual, the GELU input).

use super::model::{adamw_chunks, adamw_header, StepState, STEP_STATE_BYTES};
use super::ops::{
    attention_scratch_len, bias_scratch_len, layernorm_scratch_len, MatmulVariant, Ops, TokenBuckets, MATMUL_VARIANTS,
    NORM_BLOCKS,
};
use super::{DPtr, DeviceBuffer, Gpu, Precision};
use crate::cpu;
use crate::cpu::matmul::WeightLayout::{self, InOut, OutIn};
use crate::cpu::model::Gpt;
use crate::cpu::optimizer::{clip_coefficient, clip_grad_norm, global_norm, AdamW, AdamWConfig};
use crate::model::config::GptConfig;
use crate::model::init::init_params;
use crate::model::layout::ParamLayout;
use crate::model::rng::Rng;
use anyhow::Result;
use std::sync::Arc;

/// One line of the check table.
#[derive(Debug, Clone)]
pub struct CheckRow {
    pub kernel: String,
    pub shape: String,
    pub precision: Precision,
    pub max_error: f64,
    pub tolerance: f64,
}

impl CheckRow {
    pub fn passed(&self) -> bool {
        self.max_error <= self.tolerance // false for NaN
    }
}

pub fn tolerance(precision: Precision) -> f64 {
    match precision {
        Precision::F32 => 2e-5,
        Precision::Bf16 => 1.6e-2,
    }
}

/// max |got − want| / max |want|; NaN if `got` has a NaN (or the lengths differ).
pub fn relative_error(got: &[f32], want: &[f64]) -> f64 {
    if got.len() != want.len() {
        return f64::NAN;
    }
    let scale = want.iter().fold(0f64, |m, w| m.max(w.abs())).max(f64::MIN_POSITIVE);
    let mut worst = 0f64;
    for (&g, &w) in got.iter().zip(want) {
        let e = (g as f64 - w).abs();
        if e.is_nan() {
            return f64::NAN;
        }
        worst = worst.max(e);
    }
    worst / scale
}

pub fn print_table(rows: &[CheckRow]) {
    println!("{:<34} {:<28} {:<9} {:>11} {:>10}  result", "kernel", "shape", "precision", "max error", "tolerance");
    for r in rows {
        println!(
            "{:<34} {:<28} {:<9} {:>11.3e} {:>10.1e}  {}",
            r.kernel,
            r.shape,
            r.precision,
            r.max_error,
            r.tolerance,
            if r.passed() { "PASS" } else { "FAIL" }
        );
    }
}

/// Device buffers and random inputs for one precision's kernel checks.
pub(super) struct Harness<'a> {
    gpu: &'a Gpu,
    pub(super) precision: Precision,
    rng: Rng,
    buffers: Vec<DeviceBuffer>,
    rows: Vec<CheckRow>,
    /// The tensor-core matmul variant under check (bf16), named in each row's shape.
    variant: Option<&'static MatmulVariant>,
}

impl<'a> Harness<'a> {
    pub(super) fn ops(&self) -> Ops<'a> {
        Ops { gpu: self.gpu, precision: self.precision, force_variant: self.variant }
    }

    /// n normals × scale, rounded to the storage precision.
    pub(super) fn random(&mut self, n: usize, scale: f64) -> Vec<f32> {
        let mut x = vec![0f32; n];
        self.rng.fill_normal(&mut x, 0.0, scale);
        x.iter().map(|&v| self.precision.round(v)).collect()
    }

    pub(super) fn alloc(&mut self, bytes: usize) -> Result<DPtr> {
        let buf = self.gpu.alloc(bytes, "check buffers")?;
        let ptr = buf.ptr;
        self.buffers.push(buf);
        Ok(ptr)
    }

    /// Uploads f32 values as f32.
    pub(super) fn f32s(&mut self, data: &[f32]) -> Result<DPtr> {
        let p = self.alloc(4 * data.len())?;
        self.gpu.upload(p, data)?;
        Ok(p)
    }

    pub(super) fn i32s(&mut self, data: &[i32]) -> Result<DPtr> {
        let p = self.alloc(4 * data.len())?;
        self.gpu.upload(p, data)?;
        Ok(p)
    }

    /// Uploads values (already representable) in the storage type.
    pub(super) fn stored(&mut self, data: &[f32]) -> Result<DPtr> {
        let staging = self.f32s(data)?;
        let p = self.alloc(self.precision.size() * data.len())?;
        self.ops().f32_to_floatx(p, staging, data.len())?;
        Ok(p)
    }

    /// A NaN-filled output of n elements (storage type, or f32).
    pub(super) fn poisoned(&mut self, n: usize, f32_type: bool) -> Result<DPtr> {
        let bytes = if f32_type { 4 } else { self.precision.size() } * n;
        let p = self.alloc(bytes)?;
        self.gpu.fill_bytes(p, 0xFF, bytes)?;
        Ok(p)
    }

    pub(super) fn fetch_f32(&self, p: DPtr, n: usize) -> Result<Vec<f32>> {
        let mut out = vec![0f32; n];
        self.gpu.download(&mut out, p)?;
        Ok(out)
    }

    pub(super) fn fetch(&mut self, p: DPtr, n: usize) -> Result<Vec<f32>> {
        if self.precision == Precision::F32 {
            return self.fetch_f32(p, n);
        }
        let tmp = self.alloc(4 * n)?;
        self.ops().floatx_to_f32(tmp, p, n)?;
        self.fetch_f32(tmp, n)
    }

    pub(super) fn record(&mut self, kernel: &str, shape: &str, got: &[f32], want: &[f64]) {
        self.rows.push(CheckRow {
            kernel: kernel.to_string(),
            shape: shape.to_string(),
            precision: self.precision,
            max_error: relative_error(got, want),
            tolerance: tolerance(self.precision),
        });
    }

    /// A row that passes only if `a` and `b` hold the same bits; its error is the fraction of
    /// elements that differ.
    pub(super) fn record_bits(&mut self, kernel: &str, shape: &str, a: &[f32], b: &[f32]) {
        let differ = a.iter().zip(b).filter(|(x, y)| x.to_bits() != y.to_bits()).count();
        self.rows.push(CheckRow {
            kernel: kernel.to_string(),
            shape: shape.to_string(),
            precision: self.precision,
            max_error: if a.len() == b.len() { differ as f64 / a.len().max(1) as f64 } else { f64::NAN },
            tolerance: 0.0,
        });
    }

    pub(super) fn free(&mut self) {
        self.buffers.clear();
    }
}

pub(super) fn f64s(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

/// Runs every kernel check at one precision.
pub fn kernel_checks(gpu: &Gpu, precision: Precision, seed: u64) -> Result<Vec<CheckRow>> {
    let mut h = Harness { gpu, precision, rng: Rng::new(seed), buffers: Vec::new(), rows: Vec::new(), variant: None };
    for (b, t, c, v) in [(2, 7, 33, 50), (4, 64, 768, 1000)] {
        check_encoder(&mut h, b, t, c, v)?;
    }
    for (n, c) in [(7, 5), (100, 33), (256, 768), (33, 1600)] {
        check_layernorm(&mut h, n, c)?;
    }
    // bf16: each tensor-core variant on every shape (a shape alone would pick one).
    let variants: Vec<Option<&'static MatmulVariant>> = match precision {
        Precision::Bf16 => MATMUL_VARIANTS.iter().map(Some).collect(),
        Precision::F32 => vec![None],
    };
    for variant in variants {
        h.variant = variant;
        for (n, c, oc) in [(7, 5, 11), (100, 33, 65), (130, 96, 200), (256, 768, 2304)] {
            check_matmul(&mut h, n, c, oc, InOut)?;
        }
        check_matmul(&mut h, 100, 33, 200, OutIn)?;
        check_matmul(&mut h, 64, 768, 1024, OutIn)?;
    }
    h.variant = None;
    // Head dims 8-128 (the flash kernels pad to 64 or 128), T from 1 to past several 64-row tiles.
    for (b, t, c, nh) in [
        (1, 7, 16, 2),
        (2, 33, 24, 2),
        (2, 100, 128, 2),
        (1, 257, 256, 2),
        (1, 64, 36, 1),
        (1, 1, 64, 1),
        (2, 130, 768, 12),
        (1, 65, 256, 2),
    ] {
        check_attention(&mut h, b, t, c, nh)?;
    }
    for (n, v, vp) in [(5, 11, 16), (64, 1000, 1024), (4, 50257, 50304)] {
        check_crossentropy(&mut h, n, v, vp)?;
    }
    for n in [1000, (1 << 20) + 3] {
        check_optimizer(&mut h, n)?;
    }
    super::check_llama::llama_kernel_checks(&mut h)?;
    Ok(h.rows)
}

fn check_encoder(h: &mut Harness, b: usize, t: usize, c: usize, v: usize) -> Result<()> {
    let shape = format!("B={b} T={t} C={c} V={v}");
    let n = b * t;
    let tokens: Vec<u32> = (0..n).map(|_| (h.rng.next_u64() % v as u64) as u32).collect();
    let (wte, wpe) = (h.random(v * c, 1.0), h.random(t * c, 1.0));
    let mut want = vec![0f64; n * c];
    cpu::encoder::encoder_forward(&mut want, &tokens, &f64s(&wte), &f64s(&wpe), b, t, c);
    let tokens_i32: Vec<i32> = tokens.iter().map(|&x| x as i32).collect();
    let (inp, wte_d, wpe_d) = (h.i32s(&tokens_i32)?, h.stored(&wte)?, h.stored(&wpe)?);
    let out = h.poisoned(n * c, false)?;
    h.ops().encoder_forward(out, inp, wte_d, wpe_d, b, t, c)?;
    let got = h.fetch(out, n * c)?;
    h.record("encoder_forward", &shape, &got, &want);

    let dout = h.random(n * c, 1.0);
    let (dwte0, dwpe0) = (h.random(v * c, 1.0), h.random(t * c, 1.0));
    let (mut dwte, mut dwpe) = (f64s(&dwte0), f64s(&dwpe0));
    cpu::encoder::encoder_backward(&mut dwte, &mut dwpe, &f64s(&dout), &tokens, b, t, c);
    let (dwte_d, dwpe_d, dout_d) = (h.f32s(&dwte0)?, h.f32s(&dwpe0)?, h.stored(&dout)?);
    let buckets = TokenBuckets::new(&tokens);
    let count = [buckets.tokens.len() as i32];
    let bucket_ptrs =
        (h.i32s(&buckets.tokens)?, h.i32s(&buckets.starts)?, h.i32s(&buckets.positions)?, h.i32s(&count)?);
    h.ops().encoder_backward(dwte_d, dwpe_d, dout_d, bucket_ptrs, b, t, c)?;
    let (got_wte, got_wpe) = (h.fetch_f32(dwte_d, v * c)?, h.fetch_f32(dwpe_d, t * c)?);
    h.record("encoder_backward dwte", &shape, &got_wte, &dwte);
    h.record("encoder_backward dwpe", &shape, &got_wpe, &dwpe);
    h.free();
    Ok(())
}

fn check_layernorm(h: &mut Harness, n: usize, c: usize) -> Result<()> {
    let shape = format!("N={n} C={c}");
    let eps = 1e-5;
    let (x1, x2) = (h.random(n * c, 1.0), h.random(n * c, 1.0));
    let (w, bias) = (h.random(c, 1.0), h.random(c, 1.0));
    // The fused kernel rounds the residual before normalising it; so does the reference.
    let residual: Vec<f32> = x1.iter().zip(&x2).map(|(a, b)| h.precision.round(a + b)).collect();
    let (mut out, mut mean, mut rstd) = (vec![0f64; n * c], vec![0f64; n], vec![0f64; n]);
    cpu::layernorm::layernorm_forward(
        &mut out,
        &mut mean,
        &mut rstd,
        &f64s(&residual),
        &f64s(&w),
        &f64s(&bias),
        n,
        c,
        eps,
    );

    let (x1_d, x2_d, w_d, b_d, res_in) =
        (h.stored(&x1)?, h.stored(&x2)?, h.stored(&w)?, h.stored(&bias)?, h.stored(&residual)?);
    let (out_d, mean_d, rstd_d) = (h.poisoned(n * c, false)?, h.poisoned(n, true)?, h.poisoned(n, true)?);
    h.ops().layernorm_forward(out_d, mean_d, rstd_d, res_in, w_d, b_d, n, c, eps)?;
    let got = h.fetch(out_d, n * c)?;
    h.record("layernorm_forward out", &shape, &got, &out);
    let got = h.fetch_f32(rstd_d, n)?;
    h.record("layernorm_forward rstd", &shape, &got, &rstd);

    let (res_d, out_d, mean_d, rstd_d) =
        (h.poisoned(n * c, false)?, h.poisoned(n * c, false)?, h.poisoned(n, true)?, h.poisoned(n, true)?);
    h.ops().residual_layernorm_forward(res_d, out_d, mean_d, rstd_d, x1_d, x2_d, w_d, b_d, n, c, eps)?;
    let got = h.fetch(res_d, n * c)?;
    h.record("residual_layernorm_forward residual", &shape, &got, &f64s(&residual));
    let got = h.fetch(out_d, n * c)?;
    h.record("residual_layernorm_forward out", &shape, &got, &out);
    let got = h.fetch_f32(mean_d, n)?;
    h.record("residual_layernorm_forward mean", &shape, &got, &mean);
    // --recompute: the plain LayerNorm of the stored residual must give the fused kernel's bits.
    let fused = [h.fetch(out_d, n * c)?, h.fetch_f32(mean_d, n)?, h.fetch_f32(rstd_d, n)?].concat();
    let (out2_d, mean2_d, rstd2_d) = (h.poisoned(n * c, false)?, h.poisoned(n, true)?, h.poisoned(n, true)?);
    h.ops().layernorm_forward(out2_d, mean2_d, rstd2_d, res_d, w_d, b_d, n, c, eps)?;
    let plain = [h.fetch(out2_d, n * c)?, h.fetch_f32(mean2_d, n)?, h.fetch_f32(rstd2_d, n)?].concat();
    h.record_bits("layernorm_forward = residual_ (bits)", &shape, &fused, &plain);

    // Backward, from the GPU's own (f32) statistics as the model does; the reference uses the same.
    let mean32 = h.fetch_f32(mean_d, n)?;
    let rstd32 = h.fetch_f32(rstd_d, n)?;
    let (dout, dresidual) = (h.random(n * c, 1.0), h.random(n * c, 1.0));
    let (dw0, db0) = (h.random(c, 1.0), h.random(c, 1.0));
    let (mut dinp, mut dw, mut db) = (f64s(&dresidual), f64s(&dw0), f64s(&db0));
    cpu::layernorm::layernorm_backward(
        &mut dinp,
        &mut dw,
        &mut db,
        &f64s(&dout),
        &f64s(&residual),
        &f64s(&w),
        &f64s(&mean32),
        &f64s(&rstd32),
        n,
        c,
    );
    let (dout_d, dres_d, dw_d, db_d) = (h.stored(&dout)?, h.stored(&dresidual)?, h.f32s(&dw0)?, h.f32s(&db0)?);
    let dinp_d = h.poisoned(n * c, false)?;
    let scratch = h.poisoned(layernorm_scratch_len(n, c), true)?;
    h.ops().layernorm_backward(dinp_d, dres_d, (dw_d, db_d), dout_d, res_in, mean_d, rstd_d, w_d, scratch, n, c)?;
    let got = h.fetch(dinp_d, n * c)?;
    h.record("layernorm_backward dinp", &shape, &got, &dinp);
    let got = h.fetch_f32(dw_d, c)?;
    h.record("layernorm_backward dweight", &shape, &got, &dw);
    let got = h.fetch_f32(db_d, c)?;
    h.record("layernorm_backward dbias", &shape, &got, &db);
    h.free();
    Ok(())
}

fn check_matmul(h: &mut Harness, n: usize, c: usize, oc: usize, layout: WeightLayout) -> Result<()> {
    let variant = h.variant.map(|v| format!(" {}", v.name)).unwrap_or_default();
    let shape = format!("N={n} C={c} OC={oc} {layout:?}{variant}");
    let (inp, w, bias) = (h.random(n * c, 1.0), h.random(c * oc, 1.0 / (c as f64).sqrt()), h.random(oc, 1.0));
    let (inp_d, w_d, bias_d) = (h.stored(&inp)?, h.stored(&w)?, h.stored(&bias)?);
    let mut want = vec![0f64; n * oc];
    let bias_ref = (layout == InOut).then(|| f64s(&bias));
    cpu::matmul::matmul_forward(&mut want, &f64s(&inp), &f64s(&w), bias_ref.as_deref(), n, c, oc, layout);
    let out_d = h.poisoned(n * oc, false)?;
    let bias_arg = (layout == InOut).then_some(bias_d);
    h.ops().matmul_forward(out_d, None, inp_d, w_d, bias_arg, n, c, oc, layout)?;
    let got = h.fetch(out_d, n * oc)?;
    h.record("matmul_forward", &shape, &got, &want);

    if layout == InOut {
        // GELU epilogue: pre-activation stored (rounded), GELU of the rounded value.
        let pre_d = h.poisoned(n * oc, false)?;
        let out_d = h.poisoned(n * oc, false)?;
        h.ops().matmul_forward(out_d, Some(pre_d), inp_d, w_d, bias_arg, n, c, oc, layout)?;
        let pre = h.fetch(pre_d, n * oc)?;
        h.record("matmul_forward +gelu pre", &shape, &pre, &want);
        let mut gelu = vec![0f64; n * oc];
        cpu::gelu::gelu_forward(&mut gelu, &f64s(&pre));
        let got = h.fetch(out_d, n * oc)?;
        h.record("matmul_forward +gelu out", &shape, &got, &gelu);
        // --recompute: gelu_forward from the stored pre-activation must give the same bits.
        let again_d = h.poisoned(n * oc, false)?;
        h.ops().gelu_forward(again_d, pre_d, n * oc)?;
        let again = h.fetch(again_d, n * oc)?;
        h.record("gelu_forward", &shape, &again, &gelu);
        h.record_bits("gelu_forward = epilogue (bits)", &shape, &got, &again);
    }

    // Backward: dX, dW (accumulated onto random values), dbias.
    let dout = h.random(n * oc, 1.0);
    let (dw0, db0) = (h.random(c * oc, 1.0), h.random(oc, 1.0));
    let (mut dinp, mut dw, mut db) = (vec![0f64; n * c], f64s(&dw0), f64s(&db0));
    let db_ref = (layout == InOut).then_some(&mut db[..]);
    cpu::matmul::matmul_backward(&mut dinp, &mut dw, db_ref, &f64s(&dout), &f64s(&inp), &f64s(&w), n, c, oc, layout);
    let (dout_d, dw_d, db_d) = (h.stored(&dout)?, h.f32s(&dw0)?, h.f32s(&db0)?);
    let dinp_d = h.poisoned(n * c, false)?;
    // The bias gradient's partial sums go through NaN-filled scratch: every one must be written.
    let bias_scratch = h.poisoned(bias_scratch_len(n, oc), true)?;
    let db_arg = (layout == InOut).then_some((db_d, bias_scratch));
    h.ops().matmul_backward(dinp_d, dw_d, db_arg, dout_d, inp_d, w_d, None, n, c, oc, layout)?;
    let got = h.fetch(dinp_d, n * c)?;
    h.record("matmul_backward dinp", &shape, &got, &dinp);
    let got = h.fetch_f32(dw_d, c * oc)?;
    h.record("matmul_backward dweight", &shape, &got, &dw);
    if layout == InOut {
        let got = h.fetch_f32(db_d, oc)?;
        h.record("matmul_backward dbias", &shape, &got, &db);

        // dX through a GELU: the input here plays the GELU's pre-activation, of shape (N, C).
        let pre = h.random(n * c, 1.0);
        let pre_d = h.stored(&pre)?;
        let dinp_d = h.poisoned(n * c, false)?;
        let scratch_dw = h.f32s(&dw0)?;
        h.ops().matmul_backward(dinp_d, scratch_dw, None, dout_d, inp_d, w_d, Some(pre_d), n, c, oc, layout)?;
        let mut through_gelu = vec![0f64; n * c];
        cpu::gelu::gelu_backward(&mut through_gelu, &f64s(&pre), &dinp);
        let got = h.fetch(dinp_d, n * c)?;
        h.record("matmul_backward dinp +gelu'", &shape, &got, &through_gelu);
    }
    h.free();
    Ok(())
}

fn check_attention(h: &mut Harness, b: usize, t: usize, c: usize, nh: usize) -> Result<()> {
    let shape = format!("B={b} T={t} C={c} NH={nh}");
    let qkv = h.random(b * t * 3 * c, 1.0);
    let (mut out, mut lse) = (vec![0f64; b * t * c], vec![0f64; b * nh * t]);
    cpu::attention::attention_forward(&mut out, &mut lse, &f64s(&qkv), b, t, c, nh);
    let qkv_d = h.stored(&qkv)?;
    let (out_d, lse_d) = (h.poisoned(b * t * c, false)?, h.poisoned(b * nh * t, true)?);
    h.ops().attention_forward(out_d, lse_d, qkv_d, b, t, c, nh)?;
    let got_out = h.fetch(out_d, b * t * c)?;
    h.record("attention_forward out", &shape, &got_out, &out);
    let got_lse = h.fetch_f32(lse_d, b * nh * t)?;
    h.record("attention_forward lse", &shape, &got_lse, &lse);

    // Backward from the GPU's own forward outputs, as in training; the reference uses the same.
    let dout = h.random(b * t * c, 1.0);
    let mut dqkv = vec![0f64; b * t * 3 * c];
    cpu::attention::attention_backward(
        &mut dqkv,
        &f64s(&dout),
        &f64s(&qkv),
        &f64s(&got_out),
        &f64s(&got_lse),
        b,
        t,
        c,
        nh,
    );
    let dout_d = h.stored(&dout)?;
    let dqkv_d = h.poisoned(b * t * 3 * c, false)?;
    let scratch_d = h.poisoned(attention_scratch_len(b, t, nh), true)?;
    h.ops().attention_backward(dqkv_d, dout_d, qkv_d, out_d, lse_d, scratch_d, b, t, c, nh)?;
    let got = h.fetch(dqkv_d, b * t * 3 * c)?;
    h.record("attention_backward dqkv", &shape, &got, &dqkv);
    h.free();
    Ok(())
}

fn check_crossentropy(h: &mut Harness, n: usize, v: usize, vp: usize) -> Result<()> {
    let shape = format!("N={n} V={v} Vp={vp}");
    let mut logits = h.random(n * vp, 3.0);
    for row in logits.chunks_mut(vp) {
        row[v..].fill(1e3); // padding must not enter the softmax (stored as is in bf16 too)
    }
    let targets: Vec<u32> = (0..n).map(|_| (h.rng.next_u64() % v as u64) as u32).collect();
    let (mut probs, mut losses) = (vec![0f64; n * vp], vec![0f64; n]);
    cpu::crossentropy::softmax_crossentropy_forward(&mut probs, &mut losses, &f64s(&logits), &targets, n, v, vp);
    let dloss = 1.0 / n as f64;
    let mut dlogits = vec![0f64; n * vp];
    cpu::crossentropy::softmax_crossentropy_backward(&mut dlogits, &probs, &targets, dloss, n, v, vp);

    let targets_i32: Vec<i32> = targets.iter().map(|&x| x as i32).collect();
    let (logits_d, targets_d) = (h.stored(&logits)?, h.i32s(&targets_i32)?);
    let losses_d = h.poisoned(n, true)?;
    h.ops().crossentropy(losses_d, None, logits_d, targets_d, n, v, vp, 0.0)?;
    let got = h.fetch_f32(losses_d, n)?;
    h.record("crossentropy_forward losses", &shape, &got, &losses);
    // In place, as the model runs it.
    let losses_d = h.poisoned(n, true)?;
    h.ops().crossentropy(losses_d, Some(logits_d), logits_d, targets_d, n, v, vp, dloss as f32)?;
    let got = h.fetch(logits_d, n * vp)?;
    h.record("crossentropy dlogits (in place)", &shape, &got, &dlogits);
    h.free();
    Ok(())
}

fn check_optimizer(h: &mut Harness, n: usize) -> Result<()> {
    let shape = format!("n={n}");
    // A matrix of n elements (decayed) and a vector of 100 (not): the parameters AdamW updates.
    let layout = two_tensor_layout(n, 100);
    let total = layout.total;
    let grads = h.random(total, 1.0);
    let grads_d = h.f32s(&grads)?;
    let scratch = h.alloc(8 * (NORM_BLOCKS + 1))?; // f64s
    h.gpu.fill_bytes(scratch, 0xFF, 8 * (NORM_BLOCKS + 1))?;
    let got = h.ops().grad_norm_squared(grads_d, total, scratch)?.sqrt();
    let want = global_norm(&grads);
    h.rows.push(CheckRow {
        kernel: "grad_norm".into(),
        shape: shape.clone(),
        precision: h.precision,
        max_error: ((got - want) / want).abs(),
        tolerance: 1e-6, // f32 squares summed in f32 per thread, f64 across threads
    });

    // step_finish from a loss and the squared norm (as the step leaves them), clipping to half
    // the norm: the factor ≈ 0.5 AdamW then applies.
    let max_norm = want / 2.0;
    let state_d = h.alloc(STEP_STATE_BYTES)?;
    let state = StepState { loss: 3.0, norm_sq: got * got, ..StepState::default() };
    h.gpu.upload(state_d, bytemuck::bytes_of(&state))?;
    h.ops().step_finish(state_d, max_norm)?;
    let state = read_state(h, state_d)?;
    let coef = clip_coefficient(got, max_norm);
    h.rows.push(CheckRow {
        kernel: "step_finish grad_scale".into(),
        shape: shape.clone(),
        precision: h.precision,
        max_error: if state.finite == 1 { (state.grad_scale as f64 - coef).abs() / coef } else { f64::NAN },
        tolerance: 1e-7, // the same f64 formula, rounded to f32 once
    });

    // AdamW step 3 from random state, with that clipping factor.
    let (master, m0) = (h.random(total, 1.0), h.random(total, 0.1));
    let v0: Vec<f32> = h.random(total, 0.1).iter().map(|x| x * x).collect();
    let hp = AdamWConfig { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 };
    let (t, lr) = (3u64, 1e-3);
    let (chunks, header) = (adamw_chunks(&layout), adamw_header(&hp.step(t, lr)));
    let (chunks_d, header_d) = (h.i32s(bytemuck::cast_slice(&chunks))?, h.f32s(&header)?);
    let (master_d, m_d, v_d) = (h.f32s(&master)?, h.f32s(&m0)?, h.f32s(&v0)?);
    let params_d = h.poisoned(total, false)?;
    let buffers = (params_d, master_d, grads_d, m_d, v_d);
    h.ops().adamw(buffers, (chunks_d, chunks.len()), total, header_d, state_d)?;
    // Reference: the CPU optimizer on the same layout, in f64, on the clipped gradient.
    let (mut p, mut g) = (f64s(&master), f64s(&grads));
    g.iter_mut().for_each(|g| *g *= state.grad_scale as f64);
    let mut opt = AdamW { m: f64s(&m0), v: f64s(&v0), t: t - 1 };
    opt.update(&mut p, &g, &layout, lr, &hp);
    let got = h.fetch_f32(master_d, total)?;
    h.record("adamw master", &shape, &got, &p);
    let got = h.fetch_f32(m_d, total)?;
    h.record("adamw m", &shape, &got, &opt.m);
    let got = h.fetch_f32(v_d, total)?;
    h.record("adamw v", &shape, &got, &opt.v);
    let got = h.fetch(params_d, total)?;
    h.record("adamw params (rounded copy)", &shape, &got, &p);

    // A step whose loss is not finite: no update at all.
    let state = StepState { loss: f64::NAN, norm_sq: 1.0, ..StepState::default() };
    h.gpu.upload(state_d, bytemuck::bytes_of(&state))?;
    h.ops().step_finish(state_d, max_norm)?;
    let before = h.fetch_f32(master_d, total)?;
    h.ops().adamw(buffers, (chunks_d, chunks.len()), total, header_d, state_d)?;
    let after = h.fetch_f32(master_d, total)?;
    let skipped = read_state(h, state_d)?.finite == 0 && before == after;
    h.rows.push(CheckRow {
        kernel: "adamw skips a non-finite step".into(),
        shape,
        precision: h.precision,
        max_error: if skipped { 0.0 } else { 1.0 },
        tolerance: 0.0,
    });
    h.free();
    Ok(())
}

fn read_state(h: &Harness, state_d: DPtr) -> Result<StepState> {
    let mut bytes = vec![0u8; STEP_STATE_BYTES];
    h.gpu.download(&mut bytes, state_d)?;
    Ok(bytemuck::pod_read_unaligned(&bytes))
}

/// A parameter layout of a 2-D tensor of `n` elements (weight decay) and a 1-D one of `m` (none).
fn two_tensor_layout(n: usize, m: usize) -> ParamLayout {
    use crate::model::layout::TensorSpec;
    ParamLayout {
        specs: vec![
            TensorSpec { name: "w".into(), shape: vec![1, n], offset: 0, numel: n },
            TensorSpec { name: "b".into(), shape: vec![m], offset: n, numel: m },
        ],
        total: n + m,
    }
}

/// The model the training comparison uses: 2 layers, odd sizes, hd 16.
pub fn small_model() -> GptConfig {
    GptConfig { n_layer: 2, n_head: 4, n_embd: 64, vocab_size: 500, n_positions: 64, layer_norm_epsilon: 1e-5 }
}

/// Per-step loss tolerance of the training comparison (absolute, in nats):
/// - f32: 1e-4. Both sides compute in f32 with different summation orders; the loss (≈ 6.2)
///   agrees to ~1e-6 at step 1 and AdamW's normalised steps keep the drift to a few 1e-6 over
///   10 steps; 1e-4 is a wide margin that still catches any wrong gradient (a wrong gradient
///   changes the loss trajectory by ≥ 1e-2 within a few steps at lr 1e-3).
/// - bf16: 5e-2. Weights and activations are rounded to bf16 (relative 2⁻⁹), which moves the
///   loss by about 1e-2; the CPU has no such rounding.
pub fn training_tolerance(precision: Precision) -> f64 {
    match precision {
        Precision::F32 => 1e-4,
        Precision::Bf16 => 5e-2,
    }
}

/// Ten training steps of [`small_model`] on the CPU (f32) and on the GPU at `precision`, from
/// the same init and data; one row per step comparing losses.
pub fn training_check(gpu: &Arc<Gpu>, precision: Precision) -> Result<Vec<CheckRow>> {
    let cfg = small_model();
    let (b, t, steps, lr) = (4, 32, 10, 1e-3);
    let hp = AdamWConfig { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 };
    let params = init_params(&cfg, 7);
    let mut rng = Rng::new(11);
    let data: Vec<u32> = (0..b * t + 1).map(|_| (rng.next_u64() % cfg.vocab_size as u64) as u32).collect();
    let (x, y) = (&data[..b * t], &data[1..]);

    let layout = ParamLayout::new(&cfg);
    let mut cpu_model = Gpt::<f32>::new(cfg, params.clone());
    let mut cpu_opt = AdamW::<f32>::new(layout.total);
    let mut gpu_model = super::model::GpuGpt::new(gpu.clone(), cfg, precision, &params)?;
    let mut rows = Vec::new();
    for step in 1..=steps {
        cpu_model.zero_grad();
        let cpu_loss = cpu_model.forward(x, Some(y), b, t).expect("targets given");
        cpu_model.backward(1.0);
        let norm = global_norm(&cpu_model.grads);

        gpu_model.zero_grad()?;
        gpu_model.poison_activations()?;
        let gpu_loss = gpu_model.forward(x, Some(y), b, t)?.expect("targets given");
        gpu_model.backward(1.0)?;
        let gpu_norm = gpu_model.grad_norm()?;
        let shape = format!("L=2 C=64 NH=4 V=500 B={b} T={t}");
        if step == 1 {
            // From identical weights, every parameter gradient, tensor by tensor, both before
            // clipping (the fake CUDA driver found this comparing the CPU's clipped gradients).
            rows.extend(gradient_rows(&layout, &cpu_model.grads, &gpu_model.grads()?, precision, &shape));
        }
        clip_grad_norm(&mut cpu_model.grads, norm, 1.0);
        cpu_opt.update(&mut cpu_model.params, &cpu_model.grads, &layout, lr, &hp);
        gpu_model.update(lr, &hp, gpu_norm, 1.0)?;
        let row = |what: &str, max_error, tolerance| CheckRow {
            kernel: format!("training step {step} {what}"),
            shape: shape.clone(),
            precision,
            max_error,
            tolerance,
        };
        rows.push(row("loss", (gpu_loss - cpu_loss).abs(), training_tolerance(precision)));
        rows.push(row("grad norm", (gpu_norm - norm).abs() / norm, gradient_tolerance(precision)));
    }
    Ok(rows)
}

/// Relative error (to the tensor's largest value) of each parameter gradient.
/// - f32: 1e-4; gradients pass through the whole network, each op adding f32 rounding in a
///   different order than the CPU.
/// - bf16: 5e-2; every activation and weight the backward reads is rounded to bf16.
pub fn gradient_tolerance(precision: Precision) -> f64 {
    match precision {
        Precision::F32 => 1e-4,
        Precision::Bf16 => 5e-2,
    }
}

pub(super) fn gradient_rows(
    layout: &ParamLayout,
    cpu: &[f32],
    gpu: &[f32],
    precision: Precision,
    shape: &str,
) -> Vec<CheckRow> {
    let mut rows = Vec::new();
    for spec in &layout.specs {
        let (mut want, mut got) = (f64s(&cpu[spec.range()]), gpu[spec.range()].to_vec());
        if spec.name.ends_with("attn.c_attn.bias") {
            // The key part of this bias has a true gradient of exactly 0 (a shift equal for every
            // key leaves the softmax unchanged), so both sides hold only rounding noise there;
            // compare the query and value parts.
            let c = spec.numel / 3;
            want.drain(c..2 * c);
            got.drain(c..2 * c);
        }
        rows.push(CheckRow {
            kernel: format!("gradient {}", spec.name),
            shape: shape.to_string(),
            precision,
            max_error: relative_error(&got, &want),
            tolerance: gradient_tolerance(precision),
        });
    }
    rows
}

pub use super::check_llama::llama_training_check;

/// Every kernel check, then the training comparisons (GPT-2, Llama), at each requested precision.
pub fn run_checks(gpu: &Arc<Gpu>, precisions: &[Precision], seed: u64) -> Result<Vec<CheckRow>> {
    let mut rows = Vec::new();
    for &precision in precisions {
        rows.extend(kernel_checks(gpu, precision, seed)?);
        rows.extend(training_check(gpu, precision)?);
        rows.extend(llama_training_check(gpu, precision)?);
    }
    Ok(rows)
}
