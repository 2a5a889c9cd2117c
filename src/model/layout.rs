//! The one parameter and activation layout every backend shares.
//!
//! All parameters live in one flat buffer, all activations in another (llm.c's design): zeroing,
//! checkpointing, the optimizer and CPU-vs-GPU comparisons then work on whole buffers, and named
//! views give each op its tensors. [`carve_params`] and [`carve_activations`] are the single
//! source of truth for names, shapes and order: the same function either slices a buffer into
//! named views or, with [`SpecRecorder`], lists the tensors with their offsets.
//!
//! Shapes use llm.c's letters: B batch, T time, C channels, NH heads, V vocab, Vp padded vocab,
//! L layers, maxT context length.

use crate::model::config::GptConfig;
use std::fmt::Arguments;

/// One named tensor inside a flat buffer.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub offset: usize,
    pub numel: usize,
}

impl TensorSpec {
    pub fn range(&self) -> std::ops::Range<usize> {
        self.offset..self.offset + self.numel
    }
}

/// Something that hands out consecutive tensors: a buffer being sliced, or a spec list being
/// recorded. `name` is only formatted by the recorder, so slicing allocates nothing.
pub trait Carve {
    type Out;
    fn take(&mut self, name: Arguments, shape: &[usize]) -> Self::Out;
}

/// Records names, shapes and offsets instead of slicing.
#[derive(Default)]
pub struct SpecRecorder {
    pub specs: Vec<TensorSpec>,
    pub total: usize,
}

impl Carve for SpecRecorder {
    type Out = ();
    fn take(&mut self, name: Arguments, shape: &[usize]) {
        let numel = shape.iter().product();
        self.specs.push(TensorSpec { name: name.to_string(), shape: shape.to_vec(), offset: self.total, numel });
        self.total += numel;
    }
}

/// Slices a shared buffer front to back.
pub struct Slicer<'a, T>(pub &'a [T]);
/// Slices a mutable buffer front to back into disjoint mutable views.
pub struct SlicerMut<'a, T>(pub &'a mut [T]);

impl<'a, T> Carve for Slicer<'a, T> {
    type Out = &'a [T];
    fn take(&mut self, _: Arguments, shape: &[usize]) -> &'a [T] {
        let (head, tail) = self.0.split_at(shape.iter().product());
        self.0 = tail;
        head
    }
}

impl<'a, T> Carve for SlicerMut<'a, T> {
    type Out = &'a mut [T];
    fn take(&mut self, _: Arguments, shape: &[usize]) -> &'a mut [T] {
        let (head, tail) = std::mem::take(&mut self.0).split_at_mut(shape.iter().product());
        self.0 = tail;
        head
    }
}

/// The parameters of one transformer block, named as in Hugging Face's GPT-2.
pub struct LayerParams<S> {
    pub ln_1_w: S,      // (C)
    pub ln_1_b: S,      // (C)
    pub c_attn_w: S,    // (C, 3C): Conv1D layout, in × out
    pub c_attn_b: S,    // (3C)
    pub attn_proj_w: S, // (C, C)
    pub attn_proj_b: S, // (C)
    pub ln_2_w: S,      // (C)
    pub ln_2_b: S,      // (C)
    pub c_fc_w: S,      // (C, 4C)
    pub c_fc_b: S,      // (4C)
    pub mlp_proj_w: S,  // (4C, C)
    pub mlp_proj_b: S,  // (C)
}

/// All parameters. `wte` has Vp rows: rows V..Vp are padding, kept at zero.
pub struct ParamTensors<S> {
    pub wte: S, // (Vp, C), also the classifier (tied)
    pub wpe: S, // (maxT, C)
    pub layers: Vec<LayerParams<S>>,
    pub ln_f_w: S, // (C)
    pub ln_f_b: S, // (C)
}

/// Carves the parameter buffer. The names are the Hugging Face ones used in `model.safetensors`.
pub fn carve_params<K: Carve>(cfg: &GptConfig, k: &mut K) -> ParamTensors<K::Out> {
    let (c, vp, maxt) = (cfg.n_embd, cfg.padded_vocab_size(), cfg.n_positions);
    let wte = k.take(format_args!("wte.weight"), &[vp, c]);
    let wpe = k.take(format_args!("wpe.weight"), &[maxt, c]);
    let layers = (0..cfg.n_layer)
        .map(|i| LayerParams {
            ln_1_w: k.take(format_args!("h.{i}.ln_1.weight"), &[c]),
            ln_1_b: k.take(format_args!("h.{i}.ln_1.bias"), &[c]),
            c_attn_w: k.take(format_args!("h.{i}.attn.c_attn.weight"), &[c, 3 * c]),
            c_attn_b: k.take(format_args!("h.{i}.attn.c_attn.bias"), &[3 * c]),
            attn_proj_w: k.take(format_args!("h.{i}.attn.c_proj.weight"), &[c, c]),
            attn_proj_b: k.take(format_args!("h.{i}.attn.c_proj.bias"), &[c]),
            ln_2_w: k.take(format_args!("h.{i}.ln_2.weight"), &[c]),
            ln_2_b: k.take(format_args!("h.{i}.ln_2.bias"), &[c]),
            c_fc_w: k.take(format_args!("h.{i}.mlp.c_fc.weight"), &[c, 4 * c]),
            c_fc_b: k.take(format_args!("h.{i}.mlp.c_fc.bias"), &[4 * c]),
            mlp_proj_w: k.take(format_args!("h.{i}.mlp.c_proj.weight"), &[4 * c, c]),
            mlp_proj_b: k.take(format_args!("h.{i}.mlp.c_proj.bias"), &[c]),
        })
        .collect();
    let ln_f_w = k.take(format_args!("ln_f.weight"), &[c]);
    let ln_f_b = k.take(format_args!("ln_f.bias"), &[c]);
    ParamTensors { wte, wpe, layers, ln_f_w, ln_f_b }
}

/// Saved forward activations of one block (what its backward needs).
pub struct LayerActs<S> {
    pub ln_1: S,      // (B, T, C)
    pub ln_1_mean: S, // (B, T)
    pub ln_1_rstd: S, // (B, T)
    pub qkv: S,       // (B, T, 3C)
    pub atty: S,      // (B, T, C): attention output before the projection
    pub att_lse: S,   // (B, NH, T): log-sum-exp of each softmax row; backward recomputes the rest
    pub attn_proj: S, // (B, T, C)
    pub residual2: S, // (B, T, C)
    pub ln_2: S,      // (B, T, C)
    pub ln_2_mean: S, // (B, T)
    pub ln_2_rstd: S, // (B, T)
    pub fch: S,       // (B, T, 4C)
    pub fch_gelu: S,  // (B, T, 4C)
    pub mlp_proj: S,  // (B, T, C)
    pub residual3: S, // (B, T, C): this block's output
}

/// All activations of one forward pass at batch shape (B, T). Attention keeps only its
/// log-sum-exp, never the T×T probabilities, so the CPU and a flash-attention GPU kernel share
/// this layout.
pub struct ActTensors<S> {
    pub encoded: S, // (B, T, C)
    pub layers: Vec<LayerActs<S>>,
    pub ln_f: S,      // (B, T, C)
    pub ln_f_mean: S, // (B, T)
    pub ln_f_rstd: S, // (B, T)
    pub logits: S,    // (B, T, Vp)
    pub probs: S,     // (B, T, Vp): softmax over the first V columns, zero beyond
    pub losses: S,    // (B, T)
}

pub fn carve_activations<K: Carve>(cfg: &GptConfig, b: usize, t: usize, k: &mut K) -> ActTensors<K::Out> {
    let (c, nh, vp) = (cfg.n_embd, cfg.n_head, cfg.padded_vocab_size());
    let bt = b * t;
    let encoded = k.take(format_args!("encoded"), &[b, t, c]);
    let layers = (0..cfg.n_layer)
        .map(|i| LayerActs {
            ln_1: k.take(format_args!("h.{i}.ln_1"), &[b, t, c]),
            ln_1_mean: k.take(format_args!("h.{i}.ln_1_mean"), &[bt]),
            ln_1_rstd: k.take(format_args!("h.{i}.ln_1_rstd"), &[bt]),
            qkv: k.take(format_args!("h.{i}.qkv"), &[b, t, 3 * c]),
            atty: k.take(format_args!("h.{i}.atty"), &[b, t, c]),
            att_lse: k.take(format_args!("h.{i}.att_lse"), &[b, nh, t]),
            attn_proj: k.take(format_args!("h.{i}.attn_proj"), &[b, t, c]),
            residual2: k.take(format_args!("h.{i}.residual2"), &[b, t, c]),
            ln_2: k.take(format_args!("h.{i}.ln_2"), &[b, t, c]),
            ln_2_mean: k.take(format_args!("h.{i}.ln_2_mean"), &[bt]),
            ln_2_rstd: k.take(format_args!("h.{i}.ln_2_rstd"), &[bt]),
            fch: k.take(format_args!("h.{i}.fch"), &[b, t, 4 * c]),
            fch_gelu: k.take(format_args!("h.{i}.fch_gelu"), &[b, t, 4 * c]),
            mlp_proj: k.take(format_args!("h.{i}.mlp_proj"), &[b, t, c]),
            residual3: k.take(format_args!("h.{i}.residual3"), &[b, t, c]),
        })
        .collect();
    ActTensors {
        encoded,
        layers,
        ln_f: k.take(format_args!("ln_f"), &[b, t, c]),
        ln_f_mean: k.take(format_args!("ln_f_mean"), &[bt]),
        ln_f_rstd: k.take(format_args!("ln_f_rstd"), &[bt]),
        logits: k.take(format_args!("logits"), &[b, t, vp]),
        probs: k.take(format_args!("probs"), &[b, t, vp]),
        losses: k.take(format_args!("losses"), &[bt]),
    }
}

/// Names, shapes and offsets of every parameter, in buffer order.
#[derive(Debug, Clone)]
pub struct ParamLayout {
    pub specs: Vec<TensorSpec>,
    pub total: usize,
}

impl ParamLayout {
    pub fn new(cfg: &GptConfig) -> Self {
        let mut rec = SpecRecorder::default();
        carve_params(cfg, &mut rec);
        ParamLayout { specs: rec.specs, total: rec.total }
    }

    pub fn get(&self, name: &str) -> Option<&TensorSpec> {
        self.specs.iter().find(|s| s.name == name)
    }
}

/// AdamW's weight decay applies to 2-D tensors only (matmul weights, wte, wpe); biases and
/// LayerNorm parameters get none.
pub fn gets_weight_decay(spec: &TensorSpec) -> bool {
    spec.shape.len() == 2
}

/// Number of activation elements at batch shape (B, T).
pub fn activation_count(cfg: &GptConfig, b: usize, t: usize) -> usize {
    let mut rec = SpecRecorder::default();
    carve_activations(cfg, b, t, &mut rec);
    rec.total
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> GptConfig {
        GptConfig { n_layer: 2, n_head: 2, n_embd: 8, vocab_size: 50, n_positions: 6, layer_norm_epsilon: 1e-5 }
    }

    #[test]
    fn views_and_specs_agree_on_every_offset() {
        // Fill a buffer with each element's own index; every view must then start at the offset
        // the spec list gives for that name.
        let cfg = tiny();
        let layout = ParamLayout::new(&cfg);
        let buf: Vec<usize> = (0..layout.total).collect();
        let p = carve_params(&cfg, &mut Slicer(&buf));
        let at = |name: &str| layout.get(name).unwrap().offset;
        assert_eq!(p.wte[0], at("wte.weight"));
        assert_eq!(p.wpe[0], at("wpe.weight"));
        assert_eq!(p.layers[1].c_fc_b[0], at("h.1.mlp.c_fc.bias"));
        assert_eq!(p.layers[0].mlp_proj_w.len(), 4 * 8 * 8);
        assert_eq!(p.ln_f_b[0], at("ln_f.bias"));
        assert_eq!(*p.ln_f_b.last().unwrap(), layout.total - 1);
        assert_eq!(layout.specs.len(), 2 + 12 * 2 + 2);
    }

    #[test]
    fn gpt2_small_has_the_published_parameter_count() {
        let cfg = GptConfig::preset(crate::model::config::Preset::Gpt2);
        let layout = ParamLayout::new(&cfg);
        let padding = (cfg.padded_vocab_size() - cfg.vocab_size) * cfg.n_embd;
        assert_eq!(layout.total - padding, 124_439_808);
        assert_eq!(cfg.padded_vocab_size(), 50304);
    }

    #[test]
    fn decay_goes_to_matrices_only() {
        let layout = ParamLayout::new(&tiny());
        let decayed: Vec<&str> =
            layout.specs.iter().filter(|s| gets_weight_decay(s)).map(|s| s.name.as_str()).collect();
        assert_eq!(decayed.len(), 2 + 4 * 2);
        assert!(decayed.contains(&"wpe.weight") && decayed.contains(&"h.0.attn.c_proj.weight"));
        assert!(!decayed.iter().any(|n| n.contains("bias") || n.contains("ln_")));
    }
}
