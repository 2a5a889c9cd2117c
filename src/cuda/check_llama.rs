//! `finch check` rows of the Llama family's kernels (cuda/llama_ops.rs) against the CPU
//! reference ops in f64: RMSNorm (plain, fused with the residual add, backward), RoPE, SwiGLU,
//! and grouped-query packing with and without RoPE fused in (shapes not multiples of any vector
//! width, then multiples, so both the 1-wide and the 16-byte paths run); and training a small
//! Llama on the CPU and on the GPU (`GpuLlama`) side by side.

use super::check::{f64s, gradient_rows, gradient_tolerance, training_tolerance, CheckRow, Harness};
use super::llama_model::GpuLlama;
use super::llama_ops::rmsnorm_scratch_len;
use super::{DPtr, Gpu, Precision};
use crate::cpu;
use crate::cpu::llama::Llama;
use crate::cpu::optimizer::{clip_grad_norm, global_norm, AdamW, AdamWConfig};
use crate::model::init::init_llama_params;
use crate::model::layout::ParamLayout;
use crate::model::llama::LlamaConfig;
use crate::model::rng::Rng;
use anyhow::Result;
use std::sync::Arc;

pub(super) fn llama_kernel_checks(h: &mut Harness) -> Result<()> {
    for (n, c) in [(7, 5), (100, 48), (33, 576)] {
        check_rmsnorm(h, n, c)?;
    }
    for (n, t, heads, hd) in [(14, 7, 3, 6), (64, 32, 4, 64)] {
        check_rope(h, n, t, heads, hd)?;
    }
    for n in [1001, 4096] {
        check_swiglu(h, n)?;
    }
    for (n, t, nh, nkv, hd) in [(14, 7, 6, 2, 8), (64, 32, 9, 3, 64), (10, 5, 4, 4, 16), (12, 12, 4, 1, 32)] {
        check_gqa(h, n, t, (nh, nkv, hd))?;
    }
    Ok(())
}

fn check_rmsnorm(h: &mut Harness, n: usize, c: usize) -> Result<()> {
    let shape = format!("N={n} C={c}");
    let eps = 1e-5;
    let (x1, x2, w) = (h.random(n * c, 1.0), h.random(n * c, 1.0), h.random(c, 1.0));
    // The fused kernel rounds the residual before normalising it; so does the reference.
    let residual: Vec<f32> = x1.iter().zip(&x2).map(|(a, b)| h.precision.round(a + b)).collect();
    let (mut out, mut rstd) = (vec![0f64; n * c], vec![0f64; n]);
    cpu::rmsnorm::rmsnorm_forward(&mut out, &mut rstd, &f64s(&residual), &f64s(&w), n, c, eps);

    let (x1_d, x2_d, w_d, res_in) = (h.stored(&x1)?, h.stored(&x2)?, h.stored(&w)?, h.stored(&residual)?);
    let (out_d, rstd_d) = (h.poisoned(n * c, false)?, h.poisoned(n, true)?);
    h.ops().rmsnorm_forward(out_d, rstd_d, res_in, w_d, n, c, eps)?;
    let got = h.fetch(out_d, n * c)?;
    h.record("rmsnorm_forward out", &shape, &got, &out);
    let got = h.fetch_f32(rstd_d, n)?;
    h.record("rmsnorm_forward rstd", &shape, &got, &rstd);
    let plain = [h.fetch(out_d, n * c)?, got].concat();

    let (res_d, out2_d, rstd2_d) = (h.poisoned(n * c, false)?, h.poisoned(n * c, false)?, h.poisoned(n, true)?);
    h.ops().residual_rmsnorm_forward((res_d, out2_d, rstd2_d), x1_d, x2_d, w_d, n, c, eps)?;
    let got = h.fetch(res_d, n * c)?;
    h.record("residual_rmsnorm_forward residual", &shape, &got, &f64s(&residual));
    let got = h.fetch(out2_d, n * c)?;
    h.record("residual_rmsnorm_forward out", &shape, &got, &out);
    let fused = [got, h.fetch_f32(rstd2_d, n)?].concat();
    h.record_bits("rmsnorm_forward = residual_ (bits)", &shape, &fused, &plain);

    // Backward from the GPU's own f32 rstd, as a model does; dinp adds to a residual gradient.
    let rstd32 = h.fetch_f32(rstd_d, n)?;
    let (dout, dresidual, dw0) = (h.random(n * c, 1.0), h.random(n * c, 1.0), h.random(c, 1.0));
    let (mut dinp, mut dw) = (f64s(&dresidual), f64s(&dw0));
    let (res64, w64) = (f64s(&residual), f64s(&w));
    cpu::rmsnorm::rmsnorm_backward(&mut dinp, &mut dw, &f64s(&dout), &res64, &w64, &f64s(&rstd32), n, c);
    let (dout_d, dres_d, dw_d) = (h.stored(&dout)?, h.stored(&dresidual)?, h.f32s(&dw0)?);
    let dinp_d = h.poisoned(n * c, false)?;
    let scratch = h.poisoned(rmsnorm_scratch_len(n, c), true)?;
    h.ops().rmsnorm_backward((dinp_d, dres_d, dw_d), dout_d, (res_in, w_d, rstd_d), scratch, n, c)?;
    let got = h.fetch(dinp_d, n * c)?;
    h.record("rmsnorm_backward dinp", &shape, &got, &dinp);
    let got = h.fetch_f32(dw_d, c)?;
    h.record("rmsnorm_backward dweight", &shape, &got, &dw);
    h.free();
    Ok(())
}

/// cos and sin tables (T, hd/2) on the device, as a model builds them.
fn tables(h: &mut Harness, t: usize, hd: usize) -> Result<(DPtr, DPtr)> {
    let (cos, sin) = cpu::rope::rope_tables::<f32>(t, hd, 10000.0);
    Ok((h.f32s(&cos)?, h.f32s(&sin)?))
}

fn check_rope(h: &mut Harness, n: usize, t: usize, heads: usize, hd: usize) -> Result<()> {
    let shape = format!("N={n} T={t} H={heads} hd={hd}");
    let w = heads * hd;
    let x = h.random(n * w, 1.0);
    let mut want = vec![0f64; n * w];
    cpu::rope::rope_forward(&mut want, &f64s(&x), (n, t), (heads, hd), 10000.0);
    let table = tables(h, t, hd)?;
    let (x_d, out_d) = (h.stored(&x)?, h.poisoned(n * w, false)?);
    h.ops().rope_forward(out_d, x_d, table, (n, t), (heads, hd))?;
    let got = h.fetch(out_d, n * w)?;
    h.record("rope_forward", &shape, &got, &want);

    let (dout, dinp0) = (h.random(n * w, 1.0), h.random(n * w, 1.0));
    let mut dinp = f64s(&dinp0);
    cpu::rope::rope_backward(&mut dinp, &f64s(&dout), (n, t), (heads, hd), 10000.0);
    let (dout_d, dinp_d) = (h.stored(&dout)?, h.stored(&dinp0)?);
    h.ops().rope_backward(dinp_d, dout_d, table, (n, t), (heads, hd), true)?;
    let got = h.fetch(dinp_d, n * w)?;
    h.record("rope_backward (accumulate)", &shape, &got, &dinp);
    h.free();
    Ok(())
}

fn check_swiglu(h: &mut Harness, n: usize) -> Result<()> {
    let shape = format!("n={n}");
    let (gate, up) = (h.random(n, 2.0), h.random(n, 1.0));
    let mut want = vec![0f64; n];
    cpu::swiglu::swiglu_forward(&mut want, &f64s(&gate), &f64s(&up));
    let (gate_d, up_d, out_d) = (h.stored(&gate)?, h.stored(&up)?, h.poisoned(n, false)?);
    h.ops().swiglu_forward(out_d, gate_d, up_d, n)?;
    let got = h.fetch(out_d, n)?;
    h.record("swiglu_forward", &shape, &got, &want);

    let dout = h.random(n, 1.0);
    let (mut dgate, mut dup) = (vec![0f64; n], vec![0f64; n]);
    cpu::swiglu::swiglu_backward(&mut dgate, &mut dup, &f64s(&dout), &f64s(&gate), &f64s(&up));
    let (dout_d, dgate_d, dup_d) = (h.stored(&dout)?, h.poisoned(n, false)?, h.poisoned(n, false)?);
    h.ops().swiglu_backward((dgate_d, dup_d), dout_d, gate_d, up_d, n, false)?;
    let got = h.fetch(dgate_d, n)?;
    h.record("swiglu_backward dgate", &shape, &got, &dgate);
    let got = h.fetch(dup_d, n)?;
    h.record("swiglu_backward dup", &shape, &got, &dup);
    h.free();
    Ok(())
}

/// q (N,C), k and v (N,KVD) → the packed (N,3C) of attention, k/v heads repeated per group.
fn pack(q: &[f64], k: &[f64], v: &[f64], n: usize, (nh, nkv, hd): (usize, usize, usize)) -> Vec<f64> {
    let (c, kvd, group) = (nh * hd, nkv * hd, nh / nkv);
    let mut qkv = vec![0f64; 3 * n * c];
    for row in 0..n {
        qkv[row * 3 * c..row * 3 * c + c].copy_from_slice(&q[row * c..(row + 1) * c]);
        for hh in 0..nh {
            let kv = row * kvd + (hh / group) * hd;
            let at = row * 3 * c + hh * hd;
            qkv[at + c..at + c + hd].copy_from_slice(&k[kv..kv + hd]);
            qkv[at + 2 * c..at + 2 * c + hd].copy_from_slice(&v[kv..kv + hd]);
        }
    }
    qkv
}

fn check_gqa(h: &mut Harness, n: usize, t: usize, heads: (usize, usize, usize)) -> Result<()> {
    let (nh, nkv, hd) = heads;
    let shape = format!("N={n} T={t} NH={nh} NKV={nkv} hd={hd}");
    let (c, kvd) = (nh * hd, nkv * hd);
    let (q, k, v) = (h.random(n * c, 1.0), h.random(n * kvd, 1.0), h.random(n * kvd, 1.0));
    let (mut qr, mut kr) = (vec![0f64; n * c], vec![0f64; n * kvd]);
    cpu::rope::rope_forward(&mut qr, &f64s(&q), (n, t), (nh, hd), 10000.0);
    cpu::rope::rope_forward(&mut kr, &f64s(&k), (n, t), (nkv, hd), 10000.0);
    let table = tables(h, t, hd)?;
    let (q_d, k_d, v_d) = (h.stored(&q)?, h.stored(&k)?, h.stored(&v)?);
    for (rope, name) in [(false, "pack_qkv"), (true, "rope_pack_qkv")] {
        let want = match rope {
            false => pack(&f64s(&q), &f64s(&k), &f64s(&v), n, heads),
            true => pack(&qr, &kr, &f64s(&v), n, heads),
        };
        let qkv_d = h.poisoned(3 * n * c, false)?;
        h.ops().pack_qkv(qkv_d, (q_d, k_d, v_d), rope.then_some((table, t)), n, heads)?;
        let got = h.fetch(qkv_d, 3 * n * c)?;
        h.record(name, &shape, &got, &want);
    }

    // The transpose: dq, and dk, dv summed over each group, rotated back after the sum.
    let dqkv = h.random(3 * n * c, 1.0);
    let dqkv_d = h.stored(&dqkv)?;
    for (rope, name) in [(false, "unpack_dqkv"), (true, "unpack_rope_dqkv")] {
        let (mut dq, mut dk, mut dv) = (vec![0f64; n * c], vec![0f64; n * kvd], vec![0f64; n * kvd]);
        let group = nh / nkv;
        for row in 0..n {
            let d = &dqkv[row * 3 * c..(row + 1) * 3 * c];
            for x in 0..c {
                dq[row * c + x] = d[x] as f64;
            }
            for hh in 0..nh {
                for x in 0..hd {
                    dk[row * kvd + (hh / group) * hd + x] += d[c + hh * hd + x] as f64;
                    dv[row * kvd + (hh / group) * hd + x] += d[2 * c + hh * hd + x] as f64;
                }
            }
        }
        if rope {
            let (mut dq2, mut dk2) = (vec![0f64; n * c], vec![0f64; n * kvd]);
            cpu::rope::rope_backward(&mut dq2, &dq, (n, t), (nh, hd), 10000.0);
            cpu::rope::rope_backward(&mut dk2, &dk, (n, t), (nkv, hd), 10000.0);
            (dq, dk) = (dq2, dk2);
        }
        let (dq_d, dk_d, dv_d) = (h.poisoned(n * c, false)?, h.poisoned(n * kvd, false)?, h.poisoned(n * kvd, false)?);
        h.ops().unpack_dqkv((dq_d, dk_d, dv_d), dqkv_d, rope.then_some((table, t)), n, heads, false)?;
        let got = [h.fetch(dq_d, n * c)?, h.fetch(dk_d, n * kvd)?, h.fetch(dv_d, n * kvd)?].concat();
        h.record(name, &shape, &got, &[dq, dk, dv].concat());
    }
    h.free();
    Ok(())
}

/// Training steps of a small Llama (2 layers, grouped-query attention, odd sizes) on the CPU
/// (f32) and on the GPU at `precision`, from the same init and data: every parameter gradient of
/// the first step, then each step's loss and gradient norm, with GPT-2's tolerances (see
/// `check::training_tolerance`). Untied with q/k/v/o biases for 10 steps, then tied without
/// biases for 3 (the classifier's gradient then adds into the embedding's).
pub fn llama_training_check(gpu: &Arc<Gpu>, precision: Precision) -> Result<Vec<CheckRow>> {
    let base = LlamaConfig {
        vocab_size: 500,
        hidden_size: 64,
        intermediate_size: 96,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        max_position_embeddings: 64,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        attention_bias: true,
        o_proj_bias: true,
        tie_word_embeddings: false,
    };
    let tied = LlamaConfig { attention_bias: false, o_proj_bias: false, tie_word_embeddings: true, ..base };
    let mut rows = train_both(gpu, precision, base, 10)?;
    rows.extend(train_both(gpu, precision, tied, 3)?);
    Ok(rows)
}

fn train_both(gpu: &Arc<Gpu>, precision: Precision, cfg: LlamaConfig, steps: usize) -> Result<Vec<CheckRow>> {
    let (b, t, lr) = (4, 32, 1e-3);
    let hp = AdamWConfig { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 };
    let params = init_llama_params(&cfg, 7);
    let mut rng = Rng::new(11);
    let data: Vec<u32> = (0..b * t + 1).map(|_| (rng.next_u64() % cfg.vocab_size as u64) as u32).collect();
    let (x, y) = (&data[..b * t], &data[1..]);
    let layout = ParamLayout::llama(&cfg);
    let mut cpu_model = Llama::<f32>::new(cfg, params.clone());
    let mut cpu_opt = AdamW::<f32>::new(layout.total);
    let mut gpu_model = GpuLlama::new(gpu.clone(), cfg, precision, &params)?;
    let shape = format!(
        "Llama L=2 C=64 NH=4 NKV=2 V=500 B={b} T={t}{}",
        if cfg.tie_word_embeddings { " tied" } else { " biases" }
    );
    let mut rows = Vec::new();
    for step in 1..=steps {
        cpu_model.zero_grad();
        let cpu_loss = cpu_model.forward(x, Some(y), b, t).expect("targets given");
        cpu_model.backward(1.0);
        let norm = global_norm(&cpu_model.grads);
        gpu_model.zero_grad()?;
        let gpu_loss = gpu_model.forward(x, Some(y), b, t)?.expect("targets given");
        gpu_model.backward(1.0)?;
        let gpu_norm = gpu_model.grad_norm()?;
        if step == 1 {
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
