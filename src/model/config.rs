//! Model hyper-parameters: the presets (GPT-2's sizes and a Llama one) and the `config.json` fields they map to.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

/// The shape of a GPT-2-style model. Field names follow Hugging Face's `config.json`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct GptConfig {
    /// L: number of transformer blocks.
    pub n_layer: usize,
    /// NH: attention heads per block.
    pub n_head: usize,
    /// C: channels (embedding width).
    pub n_embd: usize,
    /// V: vocabulary size (token ids are `0..V`).
    pub vocab_size: usize,
    /// maxT: longest sequence the position embedding covers.
    pub n_positions: usize,
    /// LayerNorm epsilon (1e-5 for GPT-2).
    pub layer_norm_epsilon: f64,
}

/// The published GPT-2 sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Preset {
    /// 124M parameters: 12 layers, 12 heads, 768 channels.
    Gpt2,
    /// 350M: 24 layers, 16 heads, 1024 channels.
    Gpt2Medium,
    /// 774M: 36 layers, 20 heads, 1280 channels.
    Gpt2Large,
    /// 1558M: 48 layers, 25 heads, 1600 channels.
    Gpt2Xl,
    /// A Llama-family model of SmolLM2-135M's shape: 30 layers, 9 query and 3 key/value heads,
    /// 576 channels, MLP 1536, tied embeddings, context 2048.
    #[value(name = "llama-135m")]
    #[serde(rename = "llama-135m")]
    Llama135m,
}

/// Every padded vocabulary is a multiple of this, so the classifier matmul tiles evenly on a GPU
/// (50257 -> 50304). The padded rows of `wte` stay zero and are never part of a softmax.
pub const VOCAB_PAD_MULTIPLE: usize = 128;

/// The most transformer blocks a config may have: far more than any model finch can train.
pub const MAX_LAYERS: usize = 10_000;

impl GptConfig {
    pub fn preset(preset: Preset) -> Self {
        let (n_layer, n_head, n_embd) = match preset {
            Preset::Gpt2 => (12, 12, 768),
            Preset::Gpt2Medium => (24, 16, 1024),
            Preset::Gpt2Large => (36, 20, 1280),
            Preset::Gpt2Xl => (48, 25, 1600),
            // ModelConfig::preset takes the Llama presets before they come here.
            Preset::Llama135m => panic!("llama-135m is not a GPT-2 size"),
        };
        GptConfig { n_layer, n_head, n_embd, vocab_size: 50257, n_positions: 1024, layer_norm_epsilon: 1e-5 }
    }

    /// Vp: the vocabulary rounded up to [`VOCAB_PAD_MULTIPLE`].
    ///
    /// ```
    /// use finch::model::config::{GptConfig, Preset};
    /// let gpt2 = GptConfig::preset(Preset::Gpt2);
    /// assert_eq!(gpt2.padded_vocab_size(), 50304);
    /// assert_eq!(GptConfig { vocab_size: 256, ..gpt2 }.padded_vocab_size(), 256);
    /// ```
    pub fn padded_vocab_size(&self) -> usize {
        self.vocab_size.div_ceil(VOCAB_PAD_MULTIPLE) * VOCAB_PAD_MULTIPLE
    }

    pub fn head_dim(&self) -> usize {
        self.n_embd / self.n_head
    }

    /// Rejects shapes the model cannot be built with; `source` names where the values came from.
    pub fn validate(&self, source: &str) -> Result<()> {
        let fields = [
            ("n_layer", self.n_layer),
            ("n_head", self.n_head),
            ("n_embd", self.n_embd),
            ("vocab_size", self.vocab_size),
            ("n_positions", self.n_positions),
        ];
        for (name, value) in fields {
            if value == 0 {
                bail!("{source}: {name} must be at least 1, got 0");
            }
        }
        // A config.json or checkpoint is read before the weights it describes: without a bound,
        // a file claiming billions of layers would make every per-layer list (the parameter
        // specs, the activation layout) exhaust memory long before the weights are checked.
        if self.n_layer > MAX_LAYERS {
            bail!("{source}: n_layer must be at most {MAX_LAYERS}, got {}", self.n_layer);
        }
        if self.n_embd % self.n_head != 0 {
            bail!("{source}: n_embd ({}) must be a multiple of n_head ({})", self.n_embd, self.n_head);
        }
        if self.vocab_size > u32::MAX as usize {
            bail!("{source}: vocab_size {} does not fit token ids in 32 bits", self.vocab_size);
        }
        if !(self.layer_norm_epsilon.is_finite() && self.layer_norm_epsilon > 0.0) {
            bail!("{source}: layer_norm_epsilon must be a positive number, got {}", self.layer_norm_epsilon);
        }
        // Guard the size arithmetic everything else does unchecked; checked itself, since any
        // field may be near u64::MAX (and 12·C² then overflows even u128).
        let c = self.n_embd as u128;
        let params = (|| {
            let embeddings = (self.padded_vocab_size() as u128 + self.n_positions as u128).checked_mul(c)?;
            let per_layer = c.checked_mul(c)?.checked_mul(12)?.checked_add(13 * c)?;
            embeddings.checked_add((self.n_layer as u128).checked_mul(per_layer)?)?.checked_add(2 * c)
        })();
        match params {
            Some(params) if params <= 1 << 40 => Ok(()),
            Some(params) => {
                bail!("{source}: the model would have {params} parameters, which is beyond anything finch can hold")
            }
            None => bail!(
                "{source}: the model would have more than 2^128 parameters, which is beyond anything finch can hold"
            ),
        }
    }
}
