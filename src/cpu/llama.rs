//! The Llama-family model on the CPU reference ops: forward and backward through pre-norm blocks
//! of RMSNorm, q/k/v projections, rotary embeddings, grouped-query causal attention (the GPT-2
//! attention op on k and v repeated per query head: its backward then sums each group's
//! gradients, which is exactly the gradient of the repetition), the output projection, RMSNorm
//! and the SwiGLU MLP. The same four calls train it as `Gpt`: `forward`, `zero_grad`,
//! `backward`, then an optimizer update over `layout`.

use crate::cpu::attention::{attention_backward, attention_forward};
use crate::cpu::crossentropy::{softmax_crossentropy_backward, softmax_crossentropy_forward};
use crate::cpu::matmul::{matmul_backward, matmul_forward, WeightLayout::OutIn};
use crate::cpu::real::Real;
use crate::cpu::rmsnorm::{rmsnorm_backward, rmsnorm_forward};
use crate::cpu::rope::{rope_backward, rope_forward};
use crate::cpu::swiglu::{swiglu_backward, swiglu_forward};
use crate::model::layout::{ParamLayout, Slicer, SlicerMut};
use crate::model::llama::{carve_llama_activations, carve_llama_params, llama_activation_count, LlamaConfig};

pub struct Llama<F: Real> {
    pub config: LlamaConfig,
    pub layout: ParamLayout,
    pub params: Vec<F>,
    pub grads: Vec<F>,
    acts: Vec<F>,
    batch: Option<(usize, usize)>,
    inputs: Vec<u32>,
    targets: Vec<u32>,
}

/// Copies q (N, C) and k, v (N, KVD) into the packed (N, 3C) the attention op reads, each kv
/// head repeated for the `group` query heads that share it (query head h uses kv head h / group).
fn pack_qkv<F: Real>(qkv: &mut [F], q: &[F], k: &[F], v: &[F], cfg: &LlamaConfig, n: usize) {
    let (c, kvd, hd) = (cfg.hidden_size, cfg.kv_dim(), cfg.head_dim());
    let group = cfg.num_attention_heads / cfg.num_key_value_heads;
    for row in 0..n {
        let out = &mut qkv[row * 3 * c..(row + 1) * 3 * c];
        out[..c].copy_from_slice(&q[row * c..(row + 1) * c]);
        for h in 0..cfg.num_attention_heads {
            let kv = row * kvd + (h / group) * hd;
            out[c + h * hd..c + (h + 1) * hd].copy_from_slice(&k[kv..kv + hd]);
            out[2 * c + h * hd..2 * c + (h + 1) * hd].copy_from_slice(&v[kv..kv + hd]);
        }
    }
}

/// The transpose of `pack_qkv`: dq = the first C columns, dk and dv summed over each group.
fn unpack_dqkv<F: Real>(dq: &mut [F], dk: &mut [F], dv: &mut [F], dqkv: &[F], cfg: &LlamaConfig, n: usize) {
    let (c, kvd, hd) = (cfg.hidden_size, cfg.kv_dim(), cfg.head_dim());
    let group = cfg.num_attention_heads / cfg.num_key_value_heads;
    for row in 0..n {
        let d = &dqkv[row * 3 * c..(row + 1) * 3 * c];
        dq[row * c..(row + 1) * c].copy_from_slice(&d[..c]);
        for h in 0..cfg.num_attention_heads {
            let kv = row * kvd + (h / group) * hd;
            for x in 0..hd {
                dk[kv + x] += d[c + h * hd + x];
                dv[kv + x] += d[2 * c + h * hd + x];
            }
        }
    }
}

fn add_into<F: Real>(out: &mut [F], a: &[F], b: &[F]) {
    for ((o, &x), &y) in out.iter_mut().zip(a).zip(b) {
        *o = x + y;
    }
}

impl<F: Real> Llama<F> {
    pub fn new(config: LlamaConfig, params: Vec<F>) -> Self {
        let layout = ParamLayout::llama(&config);
        assert_eq!(params.len(), layout.total, "parameter buffer does not match the layout");
        let grads = vec![F::zero(); layout.total];
        Llama { config, layout, params, grads, acts: vec![], batch: None, inputs: vec![], targets: vec![] }
    }

    pub fn zero_grad(&mut self) {
        self.grads.fill(F::zero());
    }

    /// Runs the model on `inputs` (B·T ids); with `targets`, returns the mean cross-entropy.
    pub fn forward(&mut self, inputs: &[u32], targets: Option<&[u32]>, b: usize, t: usize) -> Option<f64> {
        let cfg = self.config;
        assert!(t >= 1 && t <= cfg.max_position_embeddings, "sequence length {t} outside the context");
        assert_eq!(inputs.len(), b * t, "inputs must hold B·T tokens");
        if self.batch != Some((b, t)) {
            self.acts = vec![F::zero(); llama_activation_count(&cfg, b, t)];
            self.batch = Some((b, t));
        }
        self.inputs = inputs.to_vec();
        let (c, kvd, inner, n) = (cfg.hidden_size, cfg.kv_dim(), cfg.intermediate_size, b * t);
        let (v, vp, nh, nkv, hd) =
            (cfg.vocab_size, cfg.padded_vocab_size(), cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim());
        let (eps, theta) = (cfg.rms_norm_eps, cfg.rope_theta);
        let p = carve_llama_params(&cfg, &mut Slicer(&self.params));
        let a = carve_llama_activations(&cfg, b, t, &mut SlicerMut(&mut self.acts));

        // The embedding rows; each block then adds to its input.
        let mut x: Vec<F> = inputs.iter().flat_map(|&tok| p.embed[tok as usize * c..][..c].to_vec()).collect();
        let zeros = |len: usize| vec![F::zero(); len];
        let (mut qr, mut kr, mut o, mut down) = (zeros(n * c), zeros(n * kvd), zeros(n * c), zeros(n * c));
        for (lp, la) in p.layers.iter().zip(a.layers) {
            la.input.copy_from_slice(&x);
            rmsnorm_forward(la.norm1, la.norm1_rstd, la.input, lp.input_norm, n, c, eps);
            matmul_forward(la.q, la.norm1, lp.q_w, lp.q_b, n, c, c, OutIn);
            matmul_forward(la.k, la.norm1, lp.k_w, lp.k_b, n, c, kvd, OutIn);
            matmul_forward(la.v, la.norm1, lp.v_w, lp.v_b, n, c, kvd, OutIn);
            rope_forward(&mut qr, la.q, (n, t), (nh, hd), theta);
            rope_forward(&mut kr, la.k, (n, t), (nkv, hd), theta);
            pack_qkv(la.qkv, &qr, &kr, la.v, &cfg, n);
            attention_forward(la.atty, la.att_lse, la.qkv, b, t, c, nh);
            matmul_forward(&mut o, la.atty, lp.o_w, lp.o_b, n, c, c, OutIn);
            add_into(la.residual2, la.input, &o);
            rmsnorm_forward(la.norm2, la.norm2_rstd, la.residual2, lp.post_norm, n, c, eps);
            matmul_forward(la.gate, la.norm2, lp.gate_w, None, n, c, inner, OutIn);
            matmul_forward(la.up, la.norm2, lp.up_w, None, n, c, inner, OutIn);
            swiglu_forward(la.act, la.gate, la.up);
            matmul_forward(&mut down, la.act, lp.down_w, None, n, inner, c, OutIn);
            add_into(&mut x, la.residual2, &down);
        }
        a.output.copy_from_slice(&x);
        rmsnorm_forward(a.norm, a.norm_rstd, a.output, p.norm, n, c, eps);
        let head = p.lm_head.unwrap_or(p.embed);
        matmul_forward(a.logits, a.norm, head, None, n, c, vp, OutIn);

        let targets = targets?;
        assert_eq!(targets.len(), n, "targets must hold B·T tokens");
        self.targets = targets.to_vec();
        softmax_crossentropy_forward(a.probs, a.losses, a.logits, targets, n, v, vp);
        Some(a.losses.iter().map(|&l| l.as_f64()).sum::<f64>() / n as f64)
    }

    /// Accumulates into `grads` the gradient of `loss_scale` × (the last forward's mean loss).
    pub fn backward(&mut self, loss_scale: f64) {
        let cfg = self.config;
        let (b, t) = self.batch.expect("backward needs a forward first");
        assert_eq!(self.targets.len(), b * t, "backward needs a forward with targets");
        let (c, kvd, inner, n) = (cfg.hidden_size, cfg.kv_dim(), cfg.intermediate_size, b * t);
        let (v, vp, nh, nkv, hd) =
            (cfg.vocab_size, cfg.padded_vocab_size(), cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim());
        let theta = cfg.rope_theta;
        let p = carve_llama_params(&cfg, &mut Slicer(&self.params));
        let g = carve_llama_params(&cfg, &mut SlicerMut(&mut self.grads));
        let a = carve_llama_activations(&cfg, b, t, &mut Slicer(&self.acts));
        let zeros = |len: usize| vec![F::zero(); len];

        let mut dlogits = zeros(n * vp);
        softmax_crossentropy_backward(
            &mut dlogits,
            a.probs,
            &self.targets,
            F::from_f64(loss_scale / n as f64),
            n,
            v,
            vp,
        );
        let mut dnorm = zeros(n * c);
        let (head, dembed, dhead) = match (p.lm_head, g.lm_head) {
            (Some(h), Some(dh)) => (h, g.embed, Some(dh)),
            _ => (p.embed, g.embed, None),
        };
        match dhead {
            Some(dh) => matmul_backward(&mut dnorm, dh, None, &dlogits, a.norm, head, n, c, vp, OutIn),
            None => matmul_backward(&mut dnorm, &mut *dembed, None, &dlogits, a.norm, head, n, c, vp, OutIn),
        }
        let mut dres = zeros(n * c);
        rmsnorm_backward(&mut dres, g.norm, &dnorm, a.output, p.norm, a.norm_rstd, n, c);

        for ((lp, gl), la) in p.layers.iter().zip(g.layers).zip(&a.layers).rev() {
            // x_out = residual2 + down(act): both get dres.
            let mut dact = zeros(n * inner);
            matmul_backward(&mut dact, gl.down_w, None, &dres, la.act, lp.down_w, n, inner, c, OutIn);
            let (mut dgate, mut dup) = (zeros(n * inner), zeros(n * inner));
            swiglu_backward(&mut dgate, &mut dup, &dact, la.gate, la.up);
            let mut dnorm2 = zeros(n * c);
            matmul_backward(&mut dnorm2, gl.gate_w, None, &dgate, la.norm2, lp.gate_w, n, c, inner, OutIn);
            matmul_backward(&mut dnorm2, gl.up_w, None, &dup, la.norm2, lp.up_w, n, c, inner, OutIn);
            let mut dres2 = dres.clone();
            rmsnorm_backward(&mut dres2, gl.post_norm, &dnorm2, la.residual2, lp.post_norm, la.norm2_rstd, n, c);
            // residual2 = input + o_proj(atty).
            let mut datty = zeros(n * c);
            matmul_backward(&mut datty, gl.o_w, gl.o_b, &dres2, la.atty, lp.o_w, n, c, c, OutIn);
            let mut dqkv = zeros(n * 3 * c);
            attention_backward(&mut dqkv, &datty, la.qkv, la.atty, la.att_lse, b, t, c, nh);
            let (mut dqr, mut dkr, mut dv) = (zeros(n * c), zeros(n * kvd), zeros(n * kvd));
            unpack_dqkv(&mut dqr, &mut dkr, &mut dv, &dqkv, &cfg, n);
            let (mut dq, mut dk) = (zeros(n * c), zeros(n * kvd));
            rope_backward(&mut dq, &dqr, (n, t), (nh, hd), theta);
            rope_backward(&mut dk, &dkr, (n, t), (nkv, hd), theta);
            let mut dnorm1 = zeros(n * c);
            matmul_backward(&mut dnorm1, gl.q_w, gl.q_b, &dq, la.norm1, lp.q_w, n, c, c, OutIn);
            matmul_backward(&mut dnorm1, gl.k_w, gl.k_b, &dk, la.norm1, lp.k_w, n, c, kvd, OutIn);
            matmul_backward(&mut dnorm1, gl.v_w, gl.v_b, &dv, la.norm1, lp.v_w, n, c, kvd, OutIn);
            dres = dres2;
            rmsnorm_backward(&mut dres, gl.input_norm, &dnorm1, la.input, lp.input_norm, la.norm1_rstd, n, c);
        }
        // The embedding rows: positions in order, so repeated tokens sum in a fixed order.
        for (pos, &tok) in self.inputs.iter().enumerate() {
            let row = &mut dembed[tok as usize * c..][..c];
            for (d, &x) in row.iter_mut().zip(&dres[pos * c..][..c]) {
                *d += x;
            }
        }
    }

    pub fn logits(&self) -> &[F] {
        let (b, t) = self.batch.expect("a forward ran");
        carve_llama_activations(&self.config, b, t, &mut Slicer(&self.acts)).logits
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::gradcheck::random;
    use crate::model::llama::tiny;

    /// The whole model's gradient against central differences of its loss, in f64, on a sample
    /// of every tensor (tied and untied embeddings, with and without biases).
    #[test]
    fn model_gradients_match_finite_differences() {
        for (tie, bias) in [(false, true), (true, false)] {
            let cfg = LlamaConfig { tie_word_embeddings: tie, attention_bias: bias, o_proj_bias: bias, ..tiny() };
            let layout = ParamLayout::llama(&cfg);
            let params: Vec<f64> = random(layout.total, 7).iter().map(|x| 0.3 * x).collect();
            let (b, t) = (2, 5);
            let inputs: Vec<u32> = (0..b * t).map(|i| (i * 37 % 97) as u32).collect();
            let targets: Vec<u32> = (0..b * t).map(|i| (i * 11 % 97) as u32).collect();
            let mut m = Llama::new(cfg, params.clone());
            m.forward(&inputs, Some(&targets), b, t);
            m.backward(1.0);
            let loss = |p: &[f64]| Llama::new(cfg, p.to_vec()).forward(&inputs, Some(&targets), b, t).unwrap();
            let h = 1e-5;
            for spec in &layout.specs {
                // Three elements of each tensor (padding rows excluded: they have no gradient).
                let rows =
                    if spec.name.contains("embed") || spec.name.contains("lm_head") { 97 * 48 } else { spec.numel };
                for j in [0, rows / 2, rows - 1] {
                    let i = spec.offset + j;
                    let (mut up, mut down) = (params.clone(), params.clone());
                    up[i] += h;
                    down[i] -= h;
                    let numeric = (loss(&up) - loss(&down)) / (2.0 * h);
                    let err = (numeric - m.grads[i]).abs() / m.grads[i].abs().max(1e-3);
                    assert!(err < 1e-5, "{}[{j}]: analytic {} numeric {numeric}", spec.name, m.grads[i]);
                }
            }
        }
    }
}
