//! A Hugging Face model directory of either family: config.json's `model_type` chooses the
//! reader ("gpt2", or none as older GPT-2 files have; "llama", "qwen2", "mistral"); anything
//! else is refused in one line naming it.

use crate::formats::hf_llama::{self, FAMILY};
use crate::formats::huggingface::{self, CONFIG_FILE};
use crate::formats::tokenizer::Tokenizer;
use crate::model::family::ModelConfig;
use anyhow::{bail, Context, Result};
use std::path::Path;

/// Reads `dir/config.json` as the model it describes.
pub fn load_model_config(dir: &Path) -> Result<ModelConfig> {
    let path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&path).with_context(|| format!("{}: cannot read", path.display()))?;
    parse_model_config(&text, &path)
}

/// Parses the text of a `config.json` as [`load_model_config`] does; `path` names it in errors.
pub fn parse_model_config(text: &str, path: &Path) -> Result<ModelConfig> {
    let name = path.display();
    let json: serde_json::Value = serde_json::from_str(text).with_context(|| format!("{name}: not valid JSON"))?;
    match json.get("model_type").and_then(|v| v.as_str()) {
        None | Some("gpt2") => Ok(ModelConfig::Gpt2(huggingface::parse_config(text, path)?)),
        Some(t) if FAMILY.contains(&t) => Ok(ModelConfig::Llama(hf_llama::parse_llama_config(text, path)?)),
        Some(other) => bail!(
            "{name}: model_type \"{other}\" is not supported (finch reads gpt2 and the Llama family: {})",
            FAMILY.join(", ")
        ),
    }
}

/// The weights of `dir` for `cfg` (from [`load_model_config`]), padding rows zero.
pub fn load_model_params(dir: &Path, cfg: &ModelConfig) -> Result<Vec<f32>> {
    match cfg {
        ModelConfig::Gpt2(c) => huggingface::load_params(dir, c),
        ModelConfig::Llama(c) => hf_llama::load_llama_params(dir, c),
    }
}

/// The config.json finch writes for `cfg`.
pub fn model_config_json(cfg: &ModelConfig, tokenizer: Option<Tokenizer>) -> serde_json::Value {
    match cfg {
        ModelConfig::Gpt2(c) => huggingface::config_json(c, tokenizer),
        ModelConfig::Llama(c) => hf_llama::llama_config_json(c, tokenizer),
    }
}

/// Writes the model directory of `cfg` and `params`, each file atomically.
pub fn save_model_dir(
    dir: &Path,
    cfg: &ModelConfig,
    params: &[f32],
    tokenizer: Option<Tokenizer>,
    flag: &str,
) -> Result<()> {
    match cfg {
        ModelConfig::Gpt2(c) => huggingface::save_model(dir, c, params, tokenizer, flag),
        ModelConfig::Llama(c) => hf_llama::save_llama_model(dir, c, params, tokenizer, flag),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_type_chooses_the_family_and_others_are_named() {
        let path = Path::new("m/config.json");
        let gpt = r#"{"n_layer": 1, "n_head": 1, "n_embd": 8, "vocab_size": 10, "n_positions": 4}"#;
        assert!(matches!(parse_model_config(gpt, path).unwrap(), ModelConfig::Gpt2(_)));
        let llama = hf_llama::llama_config_json(&crate::model::llama::tiny(), None).to_string();
        assert_eq!(parse_model_config(&llama, path).unwrap(), ModelConfig::Llama(crate::model::llama::tiny()));
        let e = parse_model_config(r#"{"model_type": "mixtral"}"#, path).unwrap_err().to_string();
        assert_eq!(
            e,
            "m/config.json: model_type \"mixtral\" is not supported (finch reads gpt2 and the Llama family: llama, \
             qwen2, mistral)"
        );
    }
}
