//! The GPT-2 model on the CPU reference ops: forward and backward through the blocks.
//! The training step is four calls: `forward`, `zero_grad`, `backward`, then an optimizer update.

use crate::cpu::attention::{attention_backward, attention_forward};
use crate::cpu::crossentropy::{softmax_crossentropy_backward, softmax_crossentropy_forward};
use crate::cpu::encoder::{encoder_backward, encoder_forward};
use crate::cpu::gelu::{gelu_backward, gelu_forward};
use crate::cpu::layernorm::{layernorm_backward, layernorm_forward};
use crate::cpu::matmul::{matmul_backward, matmul_forward, WeightLayout::*};
use crate::cpu::real::Real;
use crate::cpu::residual::{residual_backward, residual_forward};
use crate::model::config::GptConfig;
use crate::model::layout::{activation_count, carve_activations, carve_params, ParamLayout, Slicer, SlicerMut};

/// A GPT-2 model with its parameters, gradients and activations in flat buffers (see model/layout.rs).
pub struct Gpt<F: Real> {
    pub config: GptConfig,
    pub layout: ParamLayout,
    pub params: Vec<F>,
    pub grads: Vec<F>,
    acts: Vec<F>,
    dacts: Vec<F>,
    /// (B, T) of the last forward, and its inputs and targets, which backward needs.
    batch: Option<(usize, usize)>,
    inputs: Vec<u32>,
    targets: Vec<u32>,
}

impl<F: Real> Gpt<F> {
    /// Wraps a parameter buffer laid out by [`ParamLayout`].
    pub fn new(config: GptConfig, params: Vec<F>) -> Self {
        let layout = ParamLayout::new(&config);
        assert_eq!(params.len(), layout.total, "parameter buffer does not match the layout");
        let grads = vec![F::zero(); layout.total];
        Gpt { config, layout, params, grads, acts: vec![], dacts: vec![], batch: None, inputs: vec![], targets: vec![] }
    }

    /// Runs the model on `inputs` (B·T token ids, row-major). With `targets`, also computes the
    /// per-position cross-entropy and returns the mean loss (accumulated in f64).
    pub fn forward(&mut self, inputs: &[u32], targets: Option<&[u32]>, b: usize, t: usize) -> Option<f64> {
        let cfg = self.config;
        assert!(t >= 1 && t <= cfg.n_positions, "sequence length {t} outside 1..={}", cfg.n_positions);
        assert_eq!(inputs.len(), b * t, "inputs must hold B·T tokens");
        if self.batch != Some((b, t)) {
            let n = activation_count(&cfg, b, t);
            self.acts = vec![F::zero(); n];
            self.dacts = vec![F::zero(); n];
            self.batch = Some((b, t));
        }
        self.inputs.clear();
        self.inputs.extend_from_slice(inputs);
        let (c, nh, v, vp, n) = (cfg.n_embd, cfg.n_head, cfg.vocab_size, cfg.padded_vocab_size(), b * t);
        let eps = cfg.layer_norm_epsilon;
        let p = carve_params(&cfg, &mut Slicer(&self.params));
        let a = carve_activations(&cfg, b, t, &mut SlicerMut(&mut self.acts));

        encoder_forward(a.encoded, inputs, p.wte, p.wpe, b, t, c);
        let mut residual: &[F] = a.encoded;
        for (lp, la) in p.layers.iter().zip(a.layers) {
            layernorm_forward(la.ln_1, la.ln_1_mean, la.ln_1_rstd, residual, lp.ln_1_w, lp.ln_1_b, n, c, eps);
            matmul_forward(la.qkv, la.ln_1, lp.c_attn_w, Some(lp.c_attn_b), n, c, 3 * c, InOut);
            attention_forward(la.atty, la.att_lse, la.qkv, b, t, c, nh);
            matmul_forward(la.attn_proj, la.atty, lp.attn_proj_w, Some(lp.attn_proj_b), n, c, c, InOut);
            residual_forward(la.residual2, residual, la.attn_proj);
            layernorm_forward(la.ln_2, la.ln_2_mean, la.ln_2_rstd, la.residual2, lp.ln_2_w, lp.ln_2_b, n, c, eps);
            matmul_forward(la.fch, la.ln_2, lp.c_fc_w, Some(lp.c_fc_b), n, c, 4 * c, InOut);
            gelu_forward(la.fch_gelu, la.fch);
            matmul_forward(la.mlp_proj, la.fch_gelu, lp.mlp_proj_w, Some(lp.mlp_proj_b), n, 4 * c, c, InOut);
            residual_forward(la.residual3, la.residual2, la.mlp_proj);
            residual = la.residual3;
        }
        layernorm_forward(a.ln_f, a.ln_f_mean, a.ln_f_rstd, residual, p.ln_f_w, p.ln_f_b, n, c, eps);
        matmul_forward(a.logits, a.ln_f, p.wte, None, n, c, vp, OutIn);

        let targets = targets?;
        assert_eq!(targets.len(), n, "targets must hold B·T tokens");
        self.targets.clear();
        self.targets.extend_from_slice(targets);
        softmax_crossentropy_forward(a.probs, a.losses, a.logits, targets, n, v, vp);
        Some(a.losses.iter().map(|&l| l.as_f64()).sum::<f64>() / n as f64)
    }

    pub fn zero_grad(&mut self) {
        self.grads.fill(F::zero());
    }

    /// Accumulates into `grads` the gradient of `loss_scale` × (the last forward's mean loss).
    /// Gradient accumulation over K micro-batches passes loss_scale = 1/K.
    pub fn backward(&mut self, loss_scale: f64) {
        let cfg = self.config;
        let (b, t) = self.batch.expect("backward needs a forward first");
        assert_eq!(self.targets.len(), b * t, "backward needs a forward with targets");
        let (c, nh, v, vp, n) = (cfg.n_embd, cfg.n_head, cfg.vocab_size, cfg.padded_vocab_size(), b * t);
        self.dacts.fill(F::zero());
        let p = carve_params(&cfg, &mut Slicer(&self.params));
        let g = carve_params(&cfg, &mut SlicerMut(&mut self.grads));
        let a = carve_activations(&cfg, b, t, &mut Slicer(&self.acts));
        let d = carve_activations(&cfg, b, t, &mut SlicerMut(&mut self.dacts));

        let dloss = F::from_f64(loss_scale / n as f64);
        softmax_crossentropy_backward(d.logits, a.probs, &self.targets, dloss, n, v, vp);
        matmul_backward(d.ln_f, g.wte, None, d.logits, a.ln_f, p.wte, n, c, vp, OutIn);

        // Walk the blocks backwards. `dresidual` is the gradient of the current block's output;
        // `d.layers` is consumed from the back so each block's input gradient can be borrowed
        // from the block before it (or from `encoded`).
        let mut dlayers = d.layers;
        let last = cfg.n_layer - 1;
        let residual_out = a.layers[last].residual3;
        layernorm_backward(
            dlayers[last].residual3,
            g.ln_f_w,
            g.ln_f_b,
            d.ln_f,
            residual_out,
            p.ln_f_w,
            a.ln_f_mean,
            a.ln_f_rstd,
            n,
            c,
        );
        let mut glayers = g.layers;
        for l in (0..cfg.n_layer).rev() {
            let dl = dlayers.pop().expect("one gradient view per layer");
            let (gl, pl, al) = (&mut glayers[l], &p.layers[l], &a.layers[l]);
            let (residual_in, dresidual_in): (&[F], &mut [F]) = match dlayers.last_mut() {
                Some(prev) => (a.layers[l - 1].residual3, &mut *prev.residual3),
                None => (a.encoded, &mut *d.encoded),
            };
            residual_backward(dl.residual2, dl.mlp_proj, dl.residual3);
            matmul_backward(
                dl.fch_gelu,
                gl.mlp_proj_w,
                Some(gl.mlp_proj_b),
                dl.mlp_proj,
                al.fch_gelu,
                pl.mlp_proj_w,
                n,
                4 * c,
                c,
                InOut,
            );
            gelu_backward(dl.fch, al.fch, dl.fch_gelu);
            matmul_backward(dl.ln_2, gl.c_fc_w, Some(gl.c_fc_b), dl.fch, al.ln_2, pl.c_fc_w, n, c, 4 * c, InOut);
            layernorm_backward(
                dl.residual2,
                gl.ln_2_w,
                gl.ln_2_b,
                dl.ln_2,
                al.residual2,
                pl.ln_2_w,
                al.ln_2_mean,
                al.ln_2_rstd,
                n,
                c,
            );
            residual_backward(dresidual_in, dl.attn_proj, dl.residual2);
            matmul_backward(
                dl.atty,
                gl.attn_proj_w,
                Some(gl.attn_proj_b),
                dl.attn_proj,
                al.atty,
                pl.attn_proj_w,
                n,
                c,
                c,
                InOut,
            );
            attention_backward(dl.qkv, dl.atty, al.qkv, al.atty, al.att_lse, b, t, c, nh);
            matmul_backward(dl.ln_1, gl.c_attn_w, Some(gl.c_attn_b), dl.qkv, al.ln_1, pl.c_attn_w, n, c, 3 * c, InOut);
            layernorm_backward(
                dresidual_in,
                gl.ln_1_w,
                gl.ln_1_b,
                dl.ln_1,
                residual_in,
                pl.ln_1_w,
                al.ln_1_mean,
                al.ln_1_rstd,
                n,
                c,
            );
        }
        encoder_backward(g.wte, g.wpe, d.encoded, &self.inputs, b, t, c);
    }

    /// Logits (B, T, Vp) of the last forward; columns V..Vp are padding.
    pub fn logits(&self) -> &[F] {
        let (b, t) = self.batch.expect("logits need a forward first");
        carve_activations(&self.config, b, t, &mut Slicer(&self.acts)).logits
    }
}
