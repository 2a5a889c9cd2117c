//! The model families finch trains, behind one config: GPT-2 (`config`) and the Llama family
//! (`llama`). What the training loop, the checkpoints and the files need to know of a model
//! whichever it is: its layout, sizes, seeded init, arithmetic and a one-line description.

use super::config::{GptConfig, Preset};
use super::init::{init_llama_params, init_params};
use super::layout::{activation_count, ParamLayout};
use super::llama::{llama_activation_count, LlamaConfig};
use anyhow::Result;
use serde::{Deserialize, Serialize};

/// A model's shape. Serialized as the family's own config (untagged): a GPT-2 checkpoint or log
/// written before Llama existed reads back unchanged, and the two field sets cannot be confused
/// (GPT-2's has `n_layer`, Llama's `num_hidden_layers`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ModelConfig {
    Gpt2(GptConfig),
    Llama(LlamaConfig),
}

impl ModelConfig {
    /// A preset's shape, with its family's default vocabulary (GPT-2's 50257).
    pub fn preset(preset: Preset) -> Self {
        match preset {
            Preset::Llama135m => ModelConfig::Llama(LlamaConfig::small()),
            gpt2 => ModelConfig::Gpt2(GptConfig::preset(gpt2)),
        }
    }

    /// The family's name, as Hugging Face's `model_type` says it.
    pub fn family(&self) -> &'static str {
        match self {
            ModelConfig::Gpt2(_) => "gpt2",
            ModelConfig::Llama(_) => "llama",
        }
    }

    pub fn gpt(&self) -> Option<&GptConfig> {
        match self {
            ModelConfig::Gpt2(c) => Some(c),
            ModelConfig::Llama(_) => None,
        }
    }

    pub fn layout(&self) -> ParamLayout {
        match self {
            ModelConfig::Gpt2(c) => ParamLayout::new(c),
            ModelConfig::Llama(c) => ParamLayout::llama(c),
        }
    }

    pub fn vocab_size(&self) -> usize {
        match self {
            ModelConfig::Gpt2(c) => c.vocab_size,
            ModelConfig::Llama(c) => c.vocab_size,
        }
    }

    pub fn padded_vocab_size(&self) -> usize {
        match self {
            ModelConfig::Gpt2(c) => c.padded_vocab_size(),
            ModelConfig::Llama(c) => c.padded_vocab_size(),
        }
    }

    /// The longest sequence the model takes.
    pub fn context_length(&self) -> usize {
        match self {
            ModelConfig::Gpt2(c) => c.n_positions,
            ModelConfig::Llama(c) => c.max_position_embeddings,
        }
    }

    /// C: the residual width.
    pub fn width(&self) -> usize {
        match self {
            ModelConfig::Gpt2(c) => c.n_embd,
            ModelConfig::Llama(c) => c.hidden_size,
        }
    }

    pub fn n_layer(&self) -> usize {
        match self {
            ModelConfig::Gpt2(c) => c.n_layer,
            ModelConfig::Llama(c) => c.num_hidden_layers,
        }
    }

    pub fn validate(&self, source: &str) -> Result<()> {
        match self {
            ModelConfig::Gpt2(c) => c.validate(source),
            ModelConfig::Llama(c) => c.validate(source),
        }
    }

    /// Activation elements at batch shape (B, T), on the CPU reference.
    pub fn activation_count(&self, b: usize, t: usize) -> usize {
        match self {
            ModelConfig::Gpt2(c) => activation_count(c, b, t),
            ModelConfig::Llama(c) => llama_activation_count(c, b, t),
        }
    }

    /// The family's seeded initial weights.
    pub fn init_params(&self, seed: u64) -> Vec<f32> {
        match self {
            ModelConfig::Gpt2(c) => init_params(c, seed),
            ModelConfig::Llama(c) => init_llama_params(c, seed),
        }
    }

    /// Parameters without the vocabulary padding: what the model has, and what its export holds.
    pub fn real_params(&self) -> usize {
        let padding = self.padded_vocab_size() - self.vocab_size();
        let padded_matrices = match self {
            ModelConfig::Llama(c) if !c.tie_word_embeddings => 2,
            _ => 1,
        };
        self.layout().total - padded_matrices * padding * self.width()
    }

    /// The parameters that multiply activations (every matrix; GPT-2's position table and the
    /// embedding lookup do not, but a tied embedding is also the classifier), for FLOP counts.
    pub fn matmul_params(&self) -> usize {
        let lookup_only = |name: &str| match self {
            ModelConfig::Gpt2(_) => name == "wpe.weight",
            ModelConfig::Llama(c) => !c.tie_word_embeddings && name == "model.embed_tokens.weight",
        };
        let layout = self.layout();
        let matrices = layout.specs.iter().filter(|s| s.shape.len() == 2 && !lookup_only(&s.name));
        matrices.map(|s| s.shape.iter().product::<usize>()).sum()
    }

    /// FLOPs of one micro-batch's forward and backward: 3× the forward's 2 per multiply-add, over
    /// the matmuls and attention's two products (causal: half of B·T² per head dimension and layer,
    /// which GPT-2's and Llama's width C both equal heads × head dimension).
    pub fn step_flops(&self, b: usize, t: usize) -> f64 {
        let (bt, c, l) = ((b * t) as f64, self.width() as f64, self.n_layer() as f64);
        let attention = 2.0 * l * b as f64 * (t as f64).powi(2) * c;
        3.0 * (2.0 * self.matmul_params() as f64 * bt + attention)
    }

    /// The shape in words, for the console.
    pub fn describe(&self) -> String {
        let plural = |n: u64, what: &str| format!("{n} {what}{}", if n == 1 { "" } else { "s" });
        match self {
            ModelConfig::Gpt2(c) => format!(
                "GPT-2, {}, {}, {} channels, vocab {} padded to {}, context {}",
                plural(c.n_layer as u64, "layer"),
                plural(c.n_head as u64, "head"),
                c.n_embd,
                c.vocab_size,
                c.padded_vocab_size(),
                c.n_positions
            ),
            ModelConfig::Llama(c) => format!(
                "Llama, {}, {} query and {} key/value heads, {} channels, MLP {}, vocab {} padded to {}, context {}{}",
                plural(c.num_hidden_layers as u64, "layer"),
                c.num_attention_heads,
                c.num_key_value_heads,
                c.hidden_size,
                c.intermediate_size,
                c.vocab_size,
                c.padded_vocab_size(),
                c.max_position_embeddings,
                if c.tie_word_embeddings { ", tied embeddings" } else { "" }
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::llama::tiny;

    #[test]
    fn configs_round_trip_through_json_and_old_gpt2_json_still_reads() {
        let gpt = ModelConfig::preset(Preset::Gpt2);
        let llama = ModelConfig::Llama(tiny());
        for cfg in [gpt, llama] {
            let back: ModelConfig = serde_json::from_str(&serde_json::to_string(&cfg).unwrap()).unwrap();
            assert_eq!(back, cfg);
        }
        // What checkpoints held before the Llama family: GptConfig's own fields.
        let old = serde_json::to_string(&GptConfig::preset(Preset::Gpt2)).unwrap();
        assert_eq!(serde_json::from_str::<ModelConfig>(&old).unwrap(), gpt);
    }

    #[test]
    fn sizes_count_what_the_exported_files_hold() {
        let gpt = ModelConfig::preset(Preset::Gpt2);
        assert_eq!(gpt.real_params(), 124_439_808); // GPT-2 small, as Hugging Face counts it
                                                    // SmolLM2-135M's shape with its own vocabulary of 49152 (no padding), tied: 134,515,008.
        let ModelConfig::Llama(small) = ModelConfig::preset(Preset::Llama135m) else { unreachable!() };
        let smol = ModelConfig::Llama(LlamaConfig { vocab_size: 49152, ..small });
        assert_eq!(smol.real_params(), 134_515_008);
        // Matmuls: everything but GPT-2's position table; untied Llama's lookup table is not one.
        // GPT-2: 12·L·C² in the blocks, and wte as the classifier (llm.c's count).
        assert_eq!(gpt.matmul_params(), 12 * 12 * 768 * 768 + 50304 * 768);
        let untied = ModelConfig::Llama(tiny());
        let lookup = untied.padded_vocab_size() * 48;
        let vectors: usize = untied.layout().specs.iter().filter(|s| s.shape.len() == 1).map(|s| s.shape[0]).sum();
        assert_eq!(untied.matmul_params(), untied.layout().total - lookup - vectors);
    }
}
