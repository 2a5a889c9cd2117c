//! Llama-family models on disk in Hugging Face's layout: `config.json` (model_type "llama",
//! "qwen2" or "mistral") and `model.safetensors`, or shards listed by
//! `model.safetensors.index.json`, in f32, bf16 or f16. What finch writes loads in
//! `transformers.AutoModelForCausalLM`, and the reverse. A feature finch does not implement
//! (rope scaling, sliding windows, mixtures of experts, another activation) is refused in one
//! line naming the field, never read as a different model.

use crate::formats::huggingface::{
    check_dtype, convert_to_f32, write_model_dir, CONFIG_FILE, TOKENIZER_KEY, WEIGHTS_FILE,
};
use crate::formats::tokenizer::Tokenizer;
use crate::model::layout::{ParamLayout, TensorSpec};
use crate::model::llama::LlamaConfig;
use anyhow::{bail, Context, Result};
use safetensors::tensor::SafeTensors;
use std::collections::HashMap;
use std::path::Path;

/// The index of a sharded checkpoint: tensor name → shard file.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// The model types of the family finch reads.
pub const FAMILY: [&str; 3] = ["llama", "qwen2", "mistral"];

/// Parses a Llama-family `config.json`; `path` names it in errors.
pub fn parse_llama_config(text: &str, path: &Path) -> Result<LlamaConfig> {
    let name = path.display();
    let json: serde_json::Value = serde_json::from_str(text).with_context(|| format!("{name}: not valid JSON"))?;
    let model_type = json.get("model_type").and_then(|v| v.as_str()).unwrap_or("");
    if !FAMILY.contains(&model_type) {
        bail!("{name}: model_type \"{model_type}\" is not a Llama-family model (expected one of {FAMILY:?})");
    }
    let get = |key: &str| json.get(key).filter(|v| !v.is_null());
    let int = |key: &str| -> Result<usize> {
        let v = get(key).with_context(|| format!("{name}: missing \"{key}\""))?;
        v.as_u64().map(|x| x as usize).with_context(|| format!("{name}: {key} must be a non-negative integer, got {v}"))
    };
    let float = |key: &str, default: f64| -> Result<f64> {
        match get(key) {
            None => Ok(default),
            Some(v) => v.as_f64().with_context(|| format!("{name}: {key} must be a number, got {v}")),
        }
    };
    let flag = |key: &str, default: bool| -> Result<bool> {
        match get(key) {
            None => Ok(default),
            Some(v) => v.as_bool().with_context(|| format!("{name}: {key} must be true or false, got {v}")),
        }
    };
    // What finch does not implement: refused, never silently dropped. transformers 5 writes
    // RoPE's settings as rope_parameters {rope_theta, rope_type}; earlier versions as rope_theta
    // and rope_scaling.
    for key in ["rope_scaling", "rope_parameters"] {
        if let Some(v) = get(key) {
            let kind = v.get("rope_type").or_else(|| v.get("type")).and_then(|t| t.as_str()).unwrap_or("default");
            if kind != "default" {
                bail!("{name}: {key} of type \"{kind}\" is not supported (finch implements plain RoPE)");
            }
        }
    }
    let rope_theta = match get("rope_parameters").and_then(|p| p.get("rope_theta")) {
        Some(v) => v.as_f64().with_context(|| format!("{name}: rope_parameters.rope_theta must be a number"))?,
        None => float("rope_theta", 10000.0)?,
    };
    let sliding = match model_type {
        "mistral" => get("sliding_window").is_some(),
        _ => flag("use_sliding_window", false)?,
    };
    if sliding {
        bail!("{name}: sliding_window attention is not supported (finch attends over the whole context)");
    }
    for key in ["num_local_experts", "num_experts", "n_routed_experts"] {
        if get(key).is_some_and(|v| v.as_u64() != Some(0)) {
            bail!("{name}: {key}: mixture-of-experts models are not supported");
        }
    }
    let act = get("hidden_act").and_then(|v| v.as_str()).unwrap_or("silu");
    if act != "silu" {
        bail!("{name}: hidden_act \"{act}\" is not supported (the family's MLP is SwiGLU: silu)");
    }
    if flag("mlp_bias", false)? {
        bail!("{name}: mlp_bias is not supported (the MLP's projections have no biases)");
    }
    let hidden_size = int("hidden_size")?;
    let heads = int("num_attention_heads")?;
    if let Some(hd) = get("head_dim").and_then(|v| v.as_u64()) {
        if heads == 0 || hd as usize * heads != hidden_size {
            bail!("{name}: head_dim {hd} × num_attention_heads {heads} ≠ hidden_size {hidden_size}: not supported");
        }
    }
    // Qwen2 has biases on q, k and v only; Llama's attention_bias puts them on o_proj as well.
    let (attention_bias, o_proj_bias) = match model_type {
        "qwen2" => (true, false),
        _ => {
            let b = flag("attention_bias", false)?;
            (b, b)
        }
    };
    let cfg = LlamaConfig {
        vocab_size: int("vocab_size")?,
        hidden_size,
        intermediate_size: int("intermediate_size")?,
        num_hidden_layers: int("num_hidden_layers")?,
        num_attention_heads: heads,
        num_key_value_heads: match get("num_key_value_heads") {
            Some(_) => int("num_key_value_heads")?,
            None => heads,
        },
        max_position_embeddings: int("max_position_embeddings")?,
        rms_norm_eps: float("rms_norm_eps", 1e-6)?,
        rope_theta,
        attention_bias,
        o_proj_bias,
        tie_word_embeddings: flag("tie_word_embeddings", false)?,
    };
    cfg.validate(&name.to_string())?;
    Ok(cfg)
}

/// The `config.json` finch writes: what transformers needs to build the same model, and the
/// tokenizer when it is known.
pub fn llama_config_json(cfg: &LlamaConfig, tokenizer: Option<Tokenizer>) -> serde_json::Value {
    let qwen2 = cfg.attention_bias && !cfg.o_proj_bias;
    let (model_type, arch) = if qwen2 { ("qwen2", "Qwen2ForCausalLM") } else { ("llama", "LlamaForCausalLM") };
    let mut json = serde_json::json!({
        "model_type": model_type,
        "architectures": [arch],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim(),
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "hidden_act": "silu",
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_dropout": 0.0,
        "torch_dtype": "float32",
    });
    if !qwen2 {
        json["attention_bias"] = cfg.attention_bias.into();
        json["mlp_bias"] = false.into();
    }
    if let Some(t) = tokenizer {
        json[TOKENIZER_KEY] = t.name().into();
    }
    json
}

/// Tensors of Hugging Face checkpoints that are not parameters.
fn is_ignored(name: &str, cfg: &LlamaConfig) -> bool {
    name.ends_with(".rotary_emb.inv_freq") || (cfg.tie_word_embeddings && name == "lm_head.weight")
}

/// The shape on disk: the embedding and lm_head have V rows there, Vp in memory.
fn disk_shape(shape: &[usize], name: &str, cfg: &LlamaConfig) -> Vec<usize> {
    match name {
        "model.embed_tokens.weight" | "lm_head.weight" => vec![cfg.vocab_size, cfg.hidden_size],
        _ => shape.to_vec(),
    }
}

/// The safetensors files of `dir`: `model.safetensors`, or the shards the index names.
fn weight_files(dir: &Path) -> Result<Vec<std::path::PathBuf>> {
    let index = dir.join(INDEX_FILE);
    if !index.exists() {
        return Ok(vec![dir.join(WEIGHTS_FILE)]);
    }
    let name = index.display();
    let text = std::fs::read_to_string(&index).with_context(|| format!("{name}: cannot read"))?;
    let json: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{name}: not valid JSON"))?;
    let map =
        json.get("weight_map").and_then(|m| m.as_object()).with_context(|| format!("{name}: no \"weight_map\""))?;
    let mut files: Vec<String> = map.values().filter_map(|v| v.as_str().map(str::to_string)).collect();
    files.sort();
    files.dedup();
    if files.iter().any(|f| f.contains('/') || f.contains("..")) {
        bail!("{name}: a shard name leaves the model directory");
    }
    Ok(files.into_iter().map(|f| dir.join(f)).collect())
}

/// Reads the weights of `dir` for `cfg` (padding rows zero): every tensor checked against the
/// config before the buffer is filled; missing, unexpected and misshapen tensors are one line.
pub fn load_llama_params(dir: &Path, cfg: &LlamaConfig) -> Result<Vec<f32>> {
    let layout = ParamLayout::llama(cfg);
    let index: HashMap<&str, usize> = layout.specs.iter().enumerate().map(|(i, s)| (s.name.as_str(), i)).collect();
    let mut params = vec![0f32; layout.total];
    let mut seen = vec![false; layout.specs.len()];
    for path in weight_files(dir)? {
        let name = path.display();
        let map = crate::os::mapfile::MappedFile::open(&path, "")?;
        let st =
            SafeTensors::deserialize(&map).map_err(|e| anyhow::anyhow!("{name}: not a valid safetensors file: {e}"))?;
        for (tname, view) in st.iter() {
            if is_ignored(tname, cfg) {
                continue;
            }
            let Some(&i) = index.get(tname) else {
                bail!("{name}: unexpected tensor \"{tname}\" (not part of this config's model)");
            };
            let want = disk_shape(&layout.specs[i].shape, tname, cfg);
            if view.shape() != want.as_slice() {
                bail!("{name}: tensor \"{tname}\" has shape {:?}, expected {want:?} from {CONFIG_FILE}", view.shape());
            }
            check_dtype(view.dtype()).with_context(|| format!("{name}: tensor \"{tname}\""))?;
            let spec = &layout.specs[i];
            convert_to_f32(&view, &mut params[spec.offset..spec.offset + want.iter().product::<usize>()]);
            seen[i] = true;
        }
    }
    if let Some((spec, _)) = layout.specs.iter().zip(&seen).find(|(_, &s)| !s) {
        bail!("{}: missing tensor \"{}\"", dir.display(), spec.name);
    }
    Ok(params)
}

/// Writes `dir/config.json` (recording the tokenizer when it is known) and
/// `dir/model.safetensors` (f32, without the padding rows).
pub fn save_llama_model(
    dir: &Path,
    cfg: &LlamaConfig,
    params: &[f32],
    tokenizer: Option<Tokenizer>,
    flag: &str,
) -> Result<()> {
    let layout = ParamLayout::llama(cfg);
    let disk_shape = |spec: &TensorSpec| disk_shape(&spec.shape, &spec.name, cfg);
    write_model_dir(dir, flag, &layout, params, disk_shape, &llama_config_json(cfg, tokenizer))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::llama::tiny;

    fn parse(json: serde_json::Value) -> Result<LlamaConfig> {
        parse_llama_config(&json.to_string(), Path::new("m/config.json"))
    }

    fn base() -> serde_json::Value {
        serde_json::json!({
            "model_type": "llama", "vocab_size": 97, "hidden_size": 48, "intermediate_size": 72,
            "num_hidden_layers": 2, "num_attention_heads": 6, "num_key_value_heads": 2,
            "max_position_embeddings": 16, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "attention_bias": true, "tie_word_embeddings": false, "rope_scaling": null
        })
    }

    #[test]
    fn configs_round_trip_and_the_family_s_flags_are_read() {
        assert_eq!(parse(base()).unwrap(), tiny());
        assert_eq!(parse(llama_config_json(&tiny(), None)).unwrap(), tiny());
        let mut q = base();
        q["model_type"] = "qwen2".into();
        q["use_sliding_window"] = false.into();
        let qwen = parse(q).unwrap();
        assert!(qwen.attention_bias && !qwen.o_proj_bias);
        assert_eq!(parse(llama_config_json(&qwen, None)).unwrap(), qwen);
        let mut m = base();
        m.as_object_mut().unwrap().remove("num_key_value_heads");
        assert_eq!(parse(m).unwrap().num_key_value_heads, 6);
    }

    #[test]
    fn unsupported_features_are_named() {
        let with = |key: &str, v: serde_json::Value| {
            let mut j = base();
            j[key] = v;
            format!("{:#}", parse(j).unwrap_err())
        };
        assert!(with("rope_scaling", serde_json::json!({"rope_type": "llama3", "factor": 8.0}))
            .contains("rope_scaling of type \"llama3\""));
        assert!(with("rope_parameters", serde_json::json!({"rope_type": "yarn"}))
            .contains("rope_parameters of type \"yarn\""));
        assert!(with("model_type", "gpt_neox".into()).contains("model_type \"gpt_neox\" is not a Llama-family model"));
        assert!(with("num_local_experts", 8.into()).contains("num_local_experts: mixture-of-experts"));
        assert!(with("hidden_act", "gelu".into()).contains("hidden_act \"gelu\""));
        assert!(with("mlp_bias", true.into()).contains("mlp_bias"));
        let mut m = base();
        m["model_type"] = "mistral".into();
        m["sliding_window"] = 4096.into();
        assert!(format!("{:#}", parse(m).unwrap_err()).contains("sliding_window"));
    }
}
