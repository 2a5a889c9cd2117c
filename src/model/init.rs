//! Seeded initial weights of both families, drawn with our own RNG so a seed means the same weights on
//! every machine, thread count and backend.

use crate::model::config::GptConfig;
use crate::model::layout::{carve_params, ParamLayout, SlicerMut};
use crate::model::llama::{carve_llama_params, LlamaConfig};
use crate::model::rng::Rng;

/// GPT-2's initialisation, drawn in a fixed order from `seed`: matmul weights, wte and wpe
/// N(0, 0.02); the two residual projections N(0, 0.02/sqrt(2L)); biases 0; LayerNorm weights 1.
/// Only the first V rows of wte are drawn (padding stays 0), so padding changes nothing.
pub fn init_params(cfg: &GptConfig, seed: u64) -> Vec<f32> {
    let layout = ParamLayout::new(cfg);
    let mut buf = vec![0f32; layout.total];
    let mut rng = Rng::new(seed);
    let std = 0.02;
    let residual_std = 0.02 / (2.0 * cfg.n_layer as f64).sqrt();
    let p = carve_params(cfg, &mut SlicerMut(&mut buf));
    rng.fill_normal(&mut p.wte[..cfg.vocab_size * cfg.n_embd], 0.0, std);
    rng.fill_normal(p.wpe, 0.0, std);
    for l in p.layers {
        l.ln_1_w.fill(1.0);
        l.ln_2_w.fill(1.0);
        rng.fill_normal(l.c_attn_w, 0.0, std);
        rng.fill_normal(l.attn_proj_w, 0.0, residual_std);
        rng.fill_normal(l.c_fc_w, 0.0, std);
        rng.fill_normal(l.mlp_proj_w, 0.0, residual_std);
    }
    p.ln_f_w.fill(1.0);
    buf
}

/// The Llama family's initialisation, as transformers' `LlamaPreTrainedModel` does it, drawn in a
/// fixed order from `seed`: every matrix (embedding, projections, untied lm_head) N(0, 0.02),
/// biases 0, RMSNorm weights 1. Only the first V rows of the embedding and lm_head are drawn.
pub fn init_llama_params(cfg: &LlamaConfig, seed: u64) -> Vec<f32> {
    let layout = ParamLayout::llama(cfg);
    let mut buf = vec![0f32; layout.total];
    let mut rng = Rng::new(seed);
    let std = 0.02;
    let rows = cfg.vocab_size * cfg.hidden_size;
    let p = carve_llama_params(cfg, &mut SlicerMut(&mut buf));
    rng.fill_normal(&mut p.embed[..rows], 0.0, std);
    for l in p.layers {
        l.input_norm.fill(1.0);
        l.post_norm.fill(1.0);
        for w in [l.q_w, l.k_w, l.v_w, l.o_w, l.gate_w, l.up_w, l.down_w] {
            rng.fill_normal(w, 0.0, std);
        }
    }
    p.norm.fill(1.0);
    if let Some(head) = p.lm_head {
        rng.fill_normal(&mut head[..rows], 0.0, std);
    }
    buf
}
