//! Token-by-token inference of the Llama family on the CPU with a KV cache, for sampling, as
//! `infer.rs` does for GPT-2: each layer appends the token's rotated key and its value (NKV heads,
//! not repeated per group) to the cache, and each query head attends over its kv head's cached
//! positions. The ops are the reference ops with N = 1 and the same f32 RoPE tables; the test
//! checks the logits against the training forward on the whole sequence.

use crate::cpu::matmul::{matmul_forward, WeightLayout::OutIn};
use crate::cpu::rmsnorm::rmsnorm_forward;
use crate::cpu::rope::rope_tables;
use crate::cpu::swiglu::swiglu_forward;
use crate::model::layout::Slicer;
use crate::model::llama::{carve_llama_params, LlamaConfig};

/// A Llama-family model ready for generation: its weights, the RoPE tables and the cache of
/// rotated keys and values, (L, maxT, KVD) each.
pub struct LlamaGenerator<'a> {
    cfg: LlamaConfig,
    params: &'a [f32],
    cos: Vec<f32>,
    sin: Vec<f32>,
    keys: Vec<f32>,
    values: Vec<f32>,
    len: usize,
}

impl<'a> LlamaGenerator<'a> {
    pub fn new(cfg: LlamaConfig, params: &'a [f32]) -> Self {
        let (cos, sin) = rope_tables::<f32>(cfg.max_position_embeddings, cfg.head_dim(), cfg.rope_theta);
        let n = cfg.num_hidden_layers * cfg.max_position_embeddings * cfg.kv_dim();
        LlamaGenerator { cfg, params, cos, sin, keys: vec![0.0; n], values: vec![0.0; n], len: 0 }
    }

    pub fn is_full(&self) -> bool {
        self.len == self.cfg.max_position_embeddings
    }

    pub fn clear(&mut self) {
        self.len = 0;
    }

    fn at(&self, layer: usize, pos: usize) -> usize {
        (layer * self.cfg.max_position_embeddings + pos) * self.cfg.kv_dim()
    }

    /// Rotates each head of `x` (heads × hd) to position `pos`, as `cpu::rope::rope_forward`.
    fn rotate(&self, x: &mut [f32], pos: usize) {
        let half = self.cfg.head_dim() / 2;
        let (cos, sin) = (&self.cos[pos * half..][..half], &self.sin[pos * half..][..half]);
        for head in x.chunks_mut(2 * half) {
            for i in 0..half {
                let (a, b) = (head[i], head[i + half]);
                head[i] = a * cos[i] - b * sin[i];
                head[i + half] = b * cos[i] + a * sin[i];
            }
        }
    }

    /// Appends `token` at the next position and returns the logits (V, padding dropped) for the
    /// token after it. Panics if the cache is full (callers check `is_full`).
    pub fn step(&mut self, token: u32) -> Vec<f32> {
        let cfg = self.cfg;
        assert!(!self.is_full(), "KV cache full: {} positions", cfg.max_position_embeddings);
        let (c, kvd, inner, v, eps) =
            (cfg.hidden_size, cfg.kv_dim(), cfg.intermediate_size, cfg.vocab_size, cfg.rms_norm_eps);
        let (nh, hd, pos) = (cfg.num_attention_heads, cfg.head_dim(), self.len);
        let group = nh / cfg.num_key_value_heads;
        let p = carve_llama_params(&cfg, &mut Slicer(self.params));
        let mut x = p.embed[token as usize * c..][..c].to_vec();
        let (mut norm, mut rstd) = (vec![0f32; c], [0f32]);
        let (mut q, mut k, mut val) = (vec![0f32; c], vec![0f32; kvd], vec![0f32; kvd]);
        let (mut atty, mut proj, mut scores) = (vec![0f32; c], vec![0f32; c], vec![0f32; pos + 1]);
        let (mut gate, mut up, mut act) = (vec![0f32; inner], vec![0f32; inner], vec![0f32; inner]);
        let scale = 1.0 / (hd as f32).sqrt();
        for (l, lp) in p.layers.iter().enumerate() {
            rmsnorm_forward(&mut norm, &mut rstd, &x, lp.input_norm, 1, c, eps);
            matmul_forward(&mut q, &norm, lp.q_w, lp.q_b, 1, c, c, OutIn);
            matmul_forward(&mut k, &norm, lp.k_w, lp.k_b, 1, c, kvd, OutIn);
            matmul_forward(&mut val, &norm, lp.v_w, lp.v_b, 1, c, kvd, OutIn);
            self.rotate(&mut q, pos);
            self.rotate(&mut k, pos);
            let at = self.at(l, pos);
            self.keys[at..at + kvd].copy_from_slice(&k);
            self.values[at..at + kvd].copy_from_slice(&val);
            for h in 0..nh {
                let (qh, kv) = (&q[h * hd..][..hd], (h / group) * hd);
                let mut max = f32::NEG_INFINITY;
                for (j, score) in scores.iter_mut().enumerate() {
                    let key = &self.keys[self.at(l, j) + kv..][..hd];
                    *score = qh.iter().zip(key).map(|(a, b)| a * b).sum::<f32>() * scale;
                    max = max.max(*score);
                }
                let sum: f32 = scores.iter().map(|&s| (s - max).exp()).sum();
                let lse = max + sum.ln();
                let out = &mut atty[h * hd..][..hd];
                out.fill(0.0);
                for (j, &s) in scores.iter().enumerate() {
                    let w = (s - lse).exp();
                    for (o, &vv) in out.iter_mut().zip(&self.values[self.at(l, j) + kv..][..hd]) {
                        *o += w * vv;
                    }
                }
            }
            matmul_forward(&mut proj, &atty, lp.o_w, lp.o_b, 1, c, c, OutIn);
            x.iter_mut().zip(&proj).for_each(|(x, p)| *x += p);
            rmsnorm_forward(&mut norm, &mut rstd, &x, lp.post_norm, 1, c, eps);
            matmul_forward(&mut gate, &norm, lp.gate_w, None, 1, c, inner, OutIn);
            matmul_forward(&mut up, &norm, lp.up_w, None, 1, c, inner, OutIn);
            swiglu_forward(&mut act, &gate, &up);
            matmul_forward(&mut proj, &act, lp.down_w, None, 1, inner, c, OutIn);
            x.iter_mut().zip(&proj).for_each(|(x, p)| *x += p);
        }
        rmsnorm_forward(&mut norm, &mut rstd, &x, p.norm, 1, c, eps);
        let mut logits = vec![0.0; v];
        // Only the first V rows of the classifier: the padding rows are not tokens.
        matmul_forward(&mut logits, &norm, &p.lm_head.unwrap_or(p.embed)[..v * c], None, 1, c, v, OutIn);
        self.len += 1;
        logits
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::llama::Llama;
    use crate::model::init::init_llama_params;
    use crate::model::llama::tiny;

    #[test]
    fn cached_logits_equal_the_training_forward_on_the_whole_sequence() {
        for cfg in
            [tiny(), LlamaConfig { tie_word_embeddings: true, attention_bias: false, o_proj_bias: false, ..tiny() }]
        {
            let mut params = init_llama_params(&cfg, 5);
            // Larger weights than the init's, so that attention is far from uniform.
            params.iter_mut().for_each(|p| *p *= 8.0);
            let tokens: Vec<u32> = (0..16).map(|i| (i * 7 + 3) % 97).collect();
            let mut full = Llama::<f32>::new(cfg, params.clone());
            full.forward(&tokens, None, 1, tokens.len());
            let vp = cfg.padded_vocab_size();
            let want = full.logits().to_vec();
            let mut g = LlamaGenerator::new(cfg, &params);
            for (pos, &tok) in tokens.iter().enumerate() {
                let got = g.step(tok);
                let row = &want[pos * vp..pos * vp + cfg.vocab_size];
                let scale = row.iter().fold(0f32, |m, x| m.max(x.abs()));
                let err = got.iter().zip(row).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                assert!(err <= 1e-5 * scale, "position {pos}: max error {err} (scale {scale})");
            }
            assert!(g.is_full());
        }
    }
}
