//! The Llama family (Llama 2/3, SmolLM2, Qwen2, Mistral shapes): its hyper-parameters, named as
//! in Hugging Face's `LlamaConfig`, and its parameter and activation layout, with Hugging Face's
//! tensor names and (out, in) weight layout. Pre-norm blocks with RMSNorm, rotary position
//! embeddings (rotate_half), grouped-query attention and a SwiGLU MLP; no biases unless
//! `attention_bias` (Qwen2: q, k, v only); embeddings tied or not.

use super::config::VOCAB_PAD_MULTIPLE;
use super::layout::{Carve, ParamLayout, SpecRecorder};
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

/// The shape of a Llama-family model.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    /// C: the residual width.
    pub hidden_size: usize,
    /// I: the MLP's inner width.
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    /// NH: query heads.
    pub num_attention_heads: usize,
    /// NKV: key/value heads, each shared by NH/NKV query heads (grouped-query attention).
    pub num_key_value_heads: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    /// Biases on the q, k and v projections.
    pub attention_bias: bool,
    /// A bias on the output projection (Llama's `attention_bias` sets both; Qwen2 has none here).
    pub o_proj_bias: bool,
    /// The classifier is the embedding matrix (no separate `lm_head.weight`).
    pub tie_word_embeddings: bool,
}

impl LlamaConfig {
    /// SmolLM2-135M's shape (the `llama-135m` preset) with GPT-2's vocabulary, which the data's
    /// meta.json or --vocab-size replaces.
    pub fn small() -> Self {
        LlamaConfig {
            vocab_size: 50257,
            hidden_size: 576,
            intermediate_size: 1536,
            num_hidden_layers: 30,
            num_attention_heads: 9,
            num_key_value_heads: 3,
            max_position_embeddings: 2048,
            rms_norm_eps: 1e-5,
            rope_theta: 100000.0,
            attention_bias: false,
            o_proj_bias: false,
            tie_word_embeddings: true,
        }
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// The width of k and v: NKV · head_dim.
    pub fn kv_dim(&self) -> usize {
        self.num_key_value_heads * self.head_dim()
    }

    /// Vp: the vocabulary rounded up as GPT-2's is; the padding rows stay zero.
    pub fn padded_vocab_size(&self) -> usize {
        self.vocab_size.div_ceil(VOCAB_PAD_MULTIPLE) * VOCAB_PAD_MULTIPLE
    }

    /// Rejects shapes the model cannot be built with; `source` names where they came from.
    pub fn validate(&self, source: &str) -> Result<()> {
        let fields = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (name, value) in fields {
            if value == 0 {
                bail!("{source}: {name} must be at least 1, got 0");
            }
            if value > 1 << 24 {
                bail!("{source}: {name} = {value} is beyond anything finch can hold");
            }
        }
        let (nh, nkv) = (self.num_attention_heads, self.num_key_value_heads);
        if self.hidden_size % nh != 0 {
            bail!("{source}: hidden_size ({}) must be a multiple of num_attention_heads ({nh})", self.hidden_size);
        }
        if nh % nkv != 0 {
            bail!("{source}: num_key_value_heads ({nkv}) must divide num_attention_heads ({nh})");
        }
        if self.head_dim() % 2 != 0 {
            bail!("{source}: the head dimension ({}) must be even for rotary embeddings", self.head_dim());
        }
        for (name, v) in [("rms_norm_eps", self.rms_norm_eps), ("rope_theta", self.rope_theta)] {
            if !(v.is_finite() && v > 0.0) {
                bail!("{source}: {name} must be a positive number, got {v}");
            }
        }
        let params = ParamLayout::llama(self).total as u128;
        if params > 1 << 40 {
            bail!("{source}: the model would have {params} parameters, which is beyond anything finch can hold");
        }
        Ok(())
    }
}

/// One block's parameters. Linear weights are (out, in), as in Hugging Face's files.
pub struct LlamaLayerParams<S> {
    pub input_norm: S, // (C): input_layernorm.weight
    pub q_w: S,        // (C, C)
    pub q_b: Option<S>,
    pub k_w: S, // (KVD, C)
    pub k_b: Option<S>,
    pub v_w: S, // (KVD, C)
    pub v_b: Option<S>,
    pub o_w: S, // (C, C)
    pub o_b: Option<S>,
    pub post_norm: S, // (C): post_attention_layernorm.weight
    pub gate_w: S,    // (I, C)
    pub up_w: S,      // (I, C)
    pub down_w: S,    // (C, I)
}

/// All parameters. `embed` (and `lm_head`) have Vp rows; rows V..Vp are padding, kept at zero.
pub struct LlamaParams<S> {
    pub embed: S, // (Vp, C)
    pub layers: Vec<LlamaLayerParams<S>>,
    pub norm: S,            // (C)
    pub lm_head: Option<S>, // (Vp, C) when untied
}

pub fn carve_llama_params<K: Carve>(cfg: &LlamaConfig, k: &mut K) -> LlamaParams<K::Out> {
    let (c, kvd, inner, vp) = (cfg.hidden_size, cfg.kv_dim(), cfg.intermediate_size, cfg.padded_vocab_size());
    let (qkv_bias, o_bias) = (cfg.attention_bias, cfg.o_proj_bias);
    let embed = k.take(format_args!("model.embed_tokens.weight"), &[vp, c]);
    let layers = (0..cfg.num_hidden_layers)
        .map(|i| {
            let input_norm = k.take(format_args!("model.layers.{i}.input_layernorm.weight"), &[c]);
            let q_w = k.take(format_args!("model.layers.{i}.self_attn.q_proj.weight"), &[c, c]);
            let q_b = qkv_bias.then(|| k.take(format_args!("model.layers.{i}.self_attn.q_proj.bias"), &[c]));
            let k_w = k.take(format_args!("model.layers.{i}.self_attn.k_proj.weight"), &[kvd, c]);
            let k_b = qkv_bias.then(|| k.take(format_args!("model.layers.{i}.self_attn.k_proj.bias"), &[kvd]));
            let v_w = k.take(format_args!("model.layers.{i}.self_attn.v_proj.weight"), &[kvd, c]);
            let v_b = qkv_bias.then(|| k.take(format_args!("model.layers.{i}.self_attn.v_proj.bias"), &[kvd]));
            let o_w = k.take(format_args!("model.layers.{i}.self_attn.o_proj.weight"), &[c, c]);
            let o_b = o_bias.then(|| k.take(format_args!("model.layers.{i}.self_attn.o_proj.bias"), &[c]));
            LlamaLayerParams {
                input_norm,
                q_w,
                q_b,
                k_w,
                k_b,
                v_w,
                v_b,
                o_w,
                o_b,
                post_norm: k.take(format_args!("model.layers.{i}.post_attention_layernorm.weight"), &[c]),
                gate_w: k.take(format_args!("model.layers.{i}.mlp.gate_proj.weight"), &[inner, c]),
                up_w: k.take(format_args!("model.layers.{i}.mlp.up_proj.weight"), &[inner, c]),
                down_w: k.take(format_args!("model.layers.{i}.mlp.down_proj.weight"), &[c, inner]),
            }
        })
        .collect();
    let norm = k.take(format_args!("model.norm.weight"), &[c]);
    let lm_head = (!cfg.tie_word_embeddings).then(|| k.take(format_args!("lm_head.weight"), &[vp, c]));
    LlamaParams { embed, layers, norm, lm_head }
}

/// Saved forward activations of one block.
pub struct LlamaLayerActs<S> {
    pub input: S,      // (N, C): the block's input residual
    pub norm1: S,      // (N, C)
    pub norm1_rstd: S, // (N)
    pub q: S,          // (N, C): after the projection, before RoPE
    pub k: S,          // (N, KVD)
    pub v: S,          // (N, KVD)
    pub qkv: S,        // (N, 3C): RoPE'd q, and k and v repeated per query head, for attention
    pub atty: S,       // (N, C)
    pub att_lse: S,    // (B, NH, T)
    pub residual2: S,  // (N, C): input + o_proj(atty)
    pub norm2: S,      // (N, C)
    pub norm2_rstd: S, // (N)
    pub gate: S,       // (N, I)
    pub up: S,         // (N, I)
    pub act: S,        // (N, I): silu(gate) · up
}

pub struct LlamaActs<S> {
    pub layers: Vec<LlamaLayerActs<S>>,
    pub output: S,    // (N, C): the last block's output residual
    pub norm: S,      // (N, C)
    pub norm_rstd: S, // (N)
    pub logits: S,    // (N, Vp)
    pub probs: S,     // (N, Vp)
    pub losses: S,    // (N)
}

pub fn carve_llama_activations<K: Carve>(cfg: &LlamaConfig, b: usize, t: usize, k: &mut K) -> LlamaActs<K::Out> {
    let (c, kvd, inner, vp, n) = (cfg.hidden_size, cfg.kv_dim(), cfg.intermediate_size, cfg.padded_vocab_size(), b * t);
    let layers = (0..cfg.num_hidden_layers)
        .map(|i| LlamaLayerActs {
            input: k.take(format_args!("layers.{i}.input"), &[n, c]),
            norm1: k.take(format_args!("layers.{i}.norm1"), &[n, c]),
            norm1_rstd: k.take(format_args!("layers.{i}.norm1_rstd"), &[n]),
            q: k.take(format_args!("layers.{i}.q"), &[n, c]),
            k: k.take(format_args!("layers.{i}.k"), &[n, kvd]),
            v: k.take(format_args!("layers.{i}.v"), &[n, kvd]),
            qkv: k.take(format_args!("layers.{i}.qkv"), &[n, 3 * c]),
            atty: k.take(format_args!("layers.{i}.atty"), &[n, c]),
            att_lse: k.take(format_args!("layers.{i}.att_lse"), &[b, cfg.num_attention_heads, t]),
            residual2: k.take(format_args!("layers.{i}.residual2"), &[n, c]),
            norm2: k.take(format_args!("layers.{i}.norm2"), &[n, c]),
            norm2_rstd: k.take(format_args!("layers.{i}.norm2_rstd"), &[n]),
            gate: k.take(format_args!("layers.{i}.gate"), &[n, inner]),
            up: k.take(format_args!("layers.{i}.up"), &[n, inner]),
            act: k.take(format_args!("layers.{i}.act"), &[n, inner]),
        })
        .collect();
    LlamaActs {
        layers,
        output: k.take(format_args!("output"), &[n, c]),
        norm: k.take(format_args!("norm"), &[n, c]),
        norm_rstd: k.take(format_args!("norm_rstd"), &[n]),
        logits: k.take(format_args!("logits"), &[n, vp]),
        probs: k.take(format_args!("probs"), &[n, vp]),
        losses: k.take(format_args!("losses"), &[n]),
    }
}

impl ParamLayout {
    /// The parameters of a Llama-family model.
    pub fn llama(cfg: &LlamaConfig) -> Self {
        let mut rec = SpecRecorder::default();
        carve_llama_params(cfg, &mut rec);
        ParamLayout { specs: rec.specs, total: rec.total }
    }
}

/// Activation elements at batch shape (B, T).
pub fn llama_activation_count(cfg: &LlamaConfig, b: usize, t: usize) -> usize {
    let mut rec = SpecRecorder::default();
    carve_llama_activations(cfg, b, t, &mut rec);
    rec.total
}

#[cfg(test)]
pub(crate) fn tiny() -> LlamaConfig {
    LlamaConfig {
        vocab_size: 97,
        hidden_size: 48,
        intermediate_size: 72,
        num_hidden_layers: 2,
        num_attention_heads: 6,
        num_key_value_heads: 2,
        max_position_embeddings: 16,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        attention_bias: true,
        o_proj_bias: true,
        tie_word_embeddings: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::layout::{gets_weight_decay, Slicer};

    #[test]
    fn the_layout_has_hugging_face_names_and_shapes() {
        let cfg = tiny();
        let layout = ParamLayout::llama(&cfg);
        let shape = |n: &str| layout.get(n).unwrap_or_else(|| panic!("{n}")).shape.clone();
        assert_eq!(shape("model.embed_tokens.weight"), [128, 48]);
        assert_eq!(shape("model.layers.1.self_attn.k_proj.weight"), [16, 48]);
        assert_eq!(shape("model.layers.0.self_attn.v_proj.bias"), [16]);
        assert_eq!(shape("model.layers.0.mlp.down_proj.weight"), [48, 72]);
        assert_eq!(shape("lm_head.weight"), [128, 48]);
        let buf: Vec<usize> = (0..layout.total).collect();
        let p = carve_llama_params(&cfg, &mut Slicer(&buf));
        assert_eq!(p.layers[1].up_w[0], layout.get("model.layers.1.mlp.up_proj.weight").unwrap().offset);
        assert_eq!(*p.lm_head.unwrap().last().unwrap(), layout.total - 1);
        // Decay on the matrices only: norms and biases get none.
        let decayed = layout.specs.iter().filter(|s| gets_weight_decay(s)).count();
        assert_eq!(decayed, 2 + 2 * 7);
        let tied = LlamaConfig { tie_word_embeddings: true, attention_bias: false, o_proj_bias: false, ..cfg };
        let t = ParamLayout::llama(&tied);
        assert!(t.get("lm_head.weight").is_none() && t.get("model.layers.0.self_attn.q_proj.bias").is_none());
    }

    #[test]
    fn bad_shapes_are_named() {
        let cfg = tiny();
        let err = |c: LlamaConfig| format!("{:#}", c.validate("config.json").unwrap_err());
        assert!(err(LlamaConfig { num_key_value_heads: 4, ..cfg }).contains("num_key_value_heads (4) must divide"));
        assert!(err(LlamaConfig { hidden_size: 50, ..cfg }).contains("multiple of num_attention_heads"));
        assert!(err(LlamaConfig { rope_theta: 0.0, ..cfg }).contains("rope_theta must be a positive number"));
        assert!(err(LlamaConfig { num_hidden_layers: 0, ..cfg }).contains("num_hidden_layers must be at least 1"));
        cfg.validate("x").unwrap();
    }
}
