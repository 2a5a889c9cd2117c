//! Token-by-token inference on the CPU with a KV cache, for sampling.
//!
//! The training forward (`model.rs`) processes whole (B, T) batches. Generation instead feeds one
//! token at a time: each layer appends the token's key and value to a cache, and the new query
//! attends over the cached positions, so a step costs O(T) instead of recomputing the context.
//! The ops are the reference ops with N = 1; the tests check the logits against the training
//! forward on the whole sequence.

use crate::cpu::gelu::gelu_forward;
use crate::cpu::layernorm::layernorm_forward;
use crate::cpu::matmul::{matmul_forward, WeightLayout::*};
use crate::model::config::GptConfig;
use crate::model::layout::{carve_params, Slicer};

/// Keys and values of every layer for positions 0..len, each (L, maxT, C).
pub struct KvCache {
    keys: Vec<f32>,
    values: Vec<f32>,
    pub len: usize,
    capacity: usize,
    c: usize,
}

impl KvCache {
    pub fn new(cfg: &GptConfig) -> Self {
        let n = cfg.n_layer * cfg.n_positions * cfg.n_embd;
        KvCache { keys: vec![0.0; n], values: vec![0.0; n], len: 0, capacity: cfg.n_positions, c: cfg.n_embd }
    }

    pub fn is_full(&self) -> bool {
        self.len == self.capacity
    }

    pub fn clear(&mut self) {
        self.len = 0;
    }

    fn at(&self, layer: usize, pos: usize) -> usize {
        (layer * self.capacity + pos) * self.c
    }
}

/// Scratch vectors of one step, reused across steps.
struct Scratch {
    ln: Vec<f32>,
    qkv: Vec<f32>,
    atty: Vec<f32>,
    proj: Vec<f32>,
    fch: Vec<f32>,
    fch_gelu: Vec<f32>,
    scores: Vec<f32>,
    stats: [f32; 2],
}

/// A model ready for generation: its weights, config and cache.
pub struct Generator<'a> {
    cfg: GptConfig,
    params: &'a [f32],
    pub cache: KvCache,
    scratch: Scratch,
}

impl<'a> Generator<'a> {
    pub fn new(cfg: GptConfig, params: &'a [f32]) -> Self {
        let c = cfg.n_embd;
        let scratch = Scratch {
            ln: vec![0.0; c],
            qkv: vec![0.0; 3 * c],
            atty: vec![0.0; c],
            proj: vec![0.0; c],
            fch: vec![0.0; 4 * c],
            fch_gelu: vec![0.0; 4 * c],
            scores: vec![0.0; cfg.n_positions],
            stats: [0.0; 2],
        };
        Generator { cfg, params, cache: KvCache::new(&cfg), scratch }
    }

    /// Appends `token` at the next position and returns the logits (V, padding dropped) for the
    /// token after it. Panics if the cache is full (callers check `cache.is_full()`).
    pub fn step(&mut self, token: u32) -> Vec<f32> {
        let cfg = self.cfg;
        assert!(!self.cache.is_full(), "KV cache full: {} positions", cfg.n_positions);
        let (c, nh, v, eps) = (cfg.n_embd, cfg.n_head, cfg.vocab_size, cfg.layer_norm_epsilon);
        let (hd, pos) = (c / nh, self.cache.len);
        let p = carve_params(&cfg, &mut Slicer(self.params));
        let s = &mut self.scratch;
        let [mean, rstd] = &mut s.stats;
        let (mean, rstd) = (std::slice::from_mut(mean), std::slice::from_mut(rstd));

        let mut x: Vec<f32> = (0..c).map(|i| p.wte[token as usize * c + i] + p.wpe[pos * c + i]).collect();
        let scale = 1.0 / (hd as f32).sqrt();
        for (l, lp) in p.layers.iter().enumerate() {
            layernorm_forward(&mut s.ln, mean, rstd, &x, lp.ln_1_w, lp.ln_1_b, 1, c, eps);
            matmul_forward(&mut s.qkv, &s.ln, lp.c_attn_w, Some(lp.c_attn_b), 1, c, 3 * c, InOut);
            let at = self.cache.at(l, pos);
            self.cache.keys[at..at + c].copy_from_slice(&s.qkv[c..2 * c]);
            self.cache.values[at..at + c].copy_from_slice(&s.qkv[2 * c..]);
            for h in 0..nh {
                let q = &s.qkv[h * hd..][..hd];
                let scores = &mut s.scores[..=pos];
                let mut max = f32::NEG_INFINITY;
                for (j, score) in scores.iter_mut().enumerate() {
                    let k = &self.cache.keys[self.cache.at(l, j) + h * hd..][..hd];
                    *score = q.iter().zip(k).map(|(a, b)| a * b).sum::<f32>() * scale;
                    max = max.max(*score);
                }
                let mut sum = 0.0;
                for score in scores.iter_mut() {
                    *score = (*score - max).exp();
                    sum += *score;
                }
                let out = &mut s.atty[h * hd..][..hd];
                out.fill(0.0);
                for (j, &w) in scores.iter().enumerate() {
                    let val = &self.cache.values[self.cache.at(l, j) + h * hd..][..hd];
                    for (o, &vv) in out.iter_mut().zip(val) {
                        *o += w / sum * vv;
                    }
                }
            }
            matmul_forward(&mut s.proj, &s.atty, lp.attn_proj_w, Some(lp.attn_proj_b), 1, c, c, InOut);
            x.iter_mut().zip(&s.proj).for_each(|(x, p)| *x += p);
            layernorm_forward(&mut s.ln, mean, rstd, &x, lp.ln_2_w, lp.ln_2_b, 1, c, eps);
            matmul_forward(&mut s.fch, &s.ln, lp.c_fc_w, Some(lp.c_fc_b), 1, c, 4 * c, InOut);
            gelu_forward(&mut s.fch_gelu, &s.fch);
            matmul_forward(&mut s.proj, &s.fch_gelu, lp.mlp_proj_w, Some(lp.mlp_proj_b), 1, 4 * c, c, InOut);
            x.iter_mut().zip(&s.proj).for_each(|(x, p)| *x += p);
        }
        layernorm_forward(&mut s.ln, mean, rstd, &x, p.ln_f_w, p.ln_f_b, 1, c, eps);
        let mut logits = vec![0.0; v];
        // Only the first V rows of wte: the padding rows are not tokens.
        matmul_forward(&mut logits, &s.ln, &p.wte[..v * c], None, 1, c, v, OutIn);
        self.cache.len += 1;
        logits
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::model::Gpt;
    use crate::model::init::init_params;

    #[test]
    fn cached_logits_equal_the_training_forward_on_the_whole_sequence() {
        let cfg =
            GptConfig { n_layer: 2, n_head: 2, n_embd: 16, vocab_size: 37, n_positions: 12, layer_norm_epsilon: 1e-5 };
        let params = init_params(&cfg, 5);
        let tokens: Vec<u32> = (0..12).map(|i| (i * 7 + 3) % 37).collect();
        let mut full = Gpt::<f32>::new(cfg, params.clone());
        full.forward(&tokens, None, 1, tokens.len());
        let vp = cfg.padded_vocab_size();
        let want = full.logits().to_vec();

        let mut g = Generator::new(cfg, &params);
        for (pos, &tok) in tokens.iter().enumerate() {
            let got = g.step(tok);
            let row = &want[pos * vp..pos * vp + cfg.vocab_size];
            let scale = row.iter().fold(0f32, |m, x| m.max(x.abs()));
            let err = got.iter().zip(row).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(err <= 1e-5 * scale, "position {pos}: max error {err} (scale {scale})");
        }
        assert!(g.cache.is_full());
    }
}
