//! Global gradient norm, clipping and AdamW, as PyTorch defines them.

use crate::cpu::real::Real;
use crate::model::layout::{gets_weight_decay, ParamLayout};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

const CHUNK: usize = 1 << 16;

/// Global L2 norm of `grads`, accumulated in f64. Partial sums over fixed-size chunks are added
/// in chunk order, so the result does not depend on the thread count.
pub fn global_norm<F: Real>(grads: &[F]) -> f64 {
    let partials: Vec<f64> =
        grads.par_chunks(CHUNK).map(|ch| ch.iter().map(|&g| g.as_f64() * g.as_f64()).sum()).collect();
    partials.iter().sum::<f64>().sqrt()
}

/// torch.nn.utils.clip_grad_norm_'s factor: clip / (norm + 1e-6) when that is below 1, else 1.
/// `max_norm` ≤ 0 disables clipping.
pub fn clip_coefficient(norm: f64, max_norm: f64) -> f64 {
    let coef = max_norm / (norm + 1e-6);
    if max_norm <= 0.0 || coef >= 1.0 {
        1.0
    } else {
        coef
    }
}

/// torch.nn.utils.clip_grad_norm_: scales `grads` by [`clip_coefficient`] when it is below 1.
/// Returns the factor applied.
pub fn clip_grad_norm<F: Real>(grads: &mut [F], norm: f64, max_norm: f64) -> f64 {
    let coef = clip_coefficient(norm, max_norm);
    if coef < 1.0 {
        let coef_f = F::from_f64(coef);
        grads.par_chunks_mut(CHUNK).for_each(|ch| ch.iter_mut().for_each(|g| *g *= coef_f));
    }
    coef
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

/// The scalars of AdamW update number `t`, formed in f64 and rounded once by each backend, as
/// PyTorch does with Python floats. `decay` applies to 2-D tensors only.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWStep {
    pub step_size: f64,
    pub bc2_sqrt: f64,
    pub one_minus_beta1: f64,
    pub beta2: f64,
    pub one_minus_beta2: f64,
    pub eps: f64,
    pub decay: f64,
}

impl AdamWConfig {
    pub fn step(&self, t: u64, lr: f64) -> AdamWStep {
        let t = t as i32;
        AdamWStep {
            step_size: lr / (1.0 - self.beta1.powi(t)),
            bc2_sqrt: (1.0 - self.beta2.powi(t)).sqrt(),
            one_minus_beta1: 1.0 - self.beta1,
            beta2: self.beta2,
            one_minus_beta2: 1.0 - self.beta2,
            eps: self.eps,
            decay: 1.0 - lr * self.weight_decay,
        }
    }
}

/// AdamW state: first and second moments, and the number of updates taken.
#[derive(Debug, Clone)]
pub struct AdamW<F> {
    pub m: Vec<F>,
    pub v: Vec<F>,
    pub t: u64,
}

impl<F: Real> AdamW<F> {
    pub fn new(n: usize) -> Self {
        AdamW { m: vec![F::zero(); n], v: vec![F::zero(); n], t: 0 }
    }

    /// One update of torch.optim.AdamW (single-tensor path), tensor by tensor:
    ///   p ← p·(1 − lr·wd)  (wd only for 2-D tensors);  m ← m + (1−β1)(g − m);
    ///   v ← β2·v + (1−β2)·g²;  p ← p − lr/(1−β1ᵗ) · m / (sqrt(v)/sqrt(1−β2ᵗ) + eps).
    /// Scalars are formed in f64 and rounded once, as PyTorch does with Python floats.
    pub fn update(&mut self, params: &mut [F], grads: &[F], layout: &ParamLayout, lr: f64, hp: &AdamWConfig) {
        self.t += 1;
        let s = hp.step(self.t, lr);
        let step_size = F::from_f64(s.step_size);
        let bc2_sqrt = F::from_f64(s.bc2_sqrt);
        let (one_minus_b1, b2, one_minus_b2) =
            (F::from_f64(s.one_minus_beta1), F::from_f64(s.beta2), F::from_f64(s.one_minus_beta2));
        let eps = F::from_f64(s.eps);
        for spec in &layout.specs {
            let decay = if gets_weight_decay(spec) { F::from_f64(s.decay) } else { F::one() };
            let r = spec.range();
            params[r.clone()]
                .par_chunks_mut(CHUNK)
                .zip(grads[r.clone()].par_chunks(CHUNK))
                .zip(self.m[r.clone()].par_chunks_mut(CHUNK).zip(self.v[r].par_chunks_mut(CHUNK)))
                .for_each(|((p, g), (m, v))| {
                    for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
                        *p *= decay;
                        *m += one_minus_b1 * (g - *m);
                        *v = *v * b2 + one_minus_b2 * g * g;
                        *p -= step_size * *m / (v.sqrt() / bc2_sqrt + eps);
                    }
                });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::GptConfig;

    #[test]
    fn clipping_follows_torch() {
        let mut g = vec![3.0f64, 4.0];
        let norm = global_norm(&g);
        assert_eq!(norm, 5.0);
        assert_eq!(clip_grad_norm(&mut g, norm, 10.0), 1.0);
        assert_eq!(g, [3.0, 4.0]);
        let coef = clip_grad_norm(&mut g, norm, 1.0);
        assert_eq!(coef, 1.0 / (5.0 + 1e-6));
        assert!((global_norm(&g) - 5.0 / (5.0 + 1e-6)).abs() < 1e-15);
    }

    #[test]
    fn adamw_first_steps_match_the_closed_form() {
        // After one step from m = v = 0, Adam moves each parameter by lr·g/(|g| + eps') ≈ lr·sign(g),
        // and decoupled decay multiplies 2-D tensors by (1 − lr·wd) first.
        let cfg =
            GptConfig { n_layer: 1, n_head: 1, n_embd: 2, vocab_size: 3, n_positions: 2, layer_norm_epsilon: 1e-5 };
        let layout = ParamLayout::new(&cfg);
        let mut params = vec![1.0f64; layout.total];
        let grads: Vec<f64> = (0..layout.total).map(|i| if i % 2 == 0 { 0.5 } else { -2.0 }).collect();
        let hp = AdamWConfig { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 };
        let mut opt = AdamW::new(layout.total);
        opt.update(&mut params, &grads, &layout, 0.01, &hp);
        for spec in &layout.specs {
            let decay = if gets_weight_decay(spec) { 1.0 - 0.01 * 0.1 } else { 1.0 };
            for i in spec.range() {
                let g: f64 = grads[i];
                let want = decay - 0.01 * g / (g.abs() + 1e-8);
                assert!((params[i] - want).abs() < 1e-12, "{}: {} vs {want}", spec.name, params[i]);
            }
        }
        assert_eq!(opt.t, 1);
    }
}
