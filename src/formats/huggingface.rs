//! Models on disk in Hugging Face's GPT-2 layout: `config.json` + `model.safetensors` (f32).
//! A directory finch writes loads in `transformers.GPT2LMHeadModel`, and vice versa.

use crate::formats::tokenizer::Tokenizer;
use crate::model::config::GptConfig;
use crate::model::layout::ParamLayout;
use crate::os::files::{create_dir, write_atomically, write_atomically_with};
use anyhow::{bail, Context, Result};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use std::collections::HashMap;
use std::path::Path;

#[cfg(target_endian = "big")]
compile_error!("finch reads and writes little-endian files by reinterpreting memory");

pub const CONFIG_FILE: &str = "config.json";
pub const WEIGHTS_FILE: &str = "model.safetensors";

/// Reads `dir/config.json`. `layer_norm_epsilon` defaults to GPT-2's 1e-5 when absent.
pub fn load_config(dir: &Path) -> Result<GptConfig> {
    let path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&path).with_context(|| format!("{}: cannot read", path.display()))?;
    parse_config(&text, &path)
}

/// Parses the text of a `config.json` as [`load_config`] does; `path` only names it in errors.
pub fn parse_config(text: &str, path: &Path) -> Result<GptConfig> {
    let name = path.display();
    let json: serde_json::Value = serde_json::from_str(text).with_context(|| format!("{name}: not valid JSON"))?;
    let field = |key: &str| -> Result<usize> {
        match json.get(key) {
            Some(v) => v
                .as_u64()
                .map(|x| x as usize)
                .with_context(|| format!("{name}: {key} must be a non-negative integer, got {v}")),
            None => bail!("{name}: missing \"{key}\""),
        }
    };
    let layer_norm_epsilon = match json.get("layer_norm_epsilon") {
        None => 1e-5,
        Some(v) => v.as_f64().with_context(|| format!("{name}: layer_norm_epsilon must be a number, got {v}"))?,
    };
    let cfg = GptConfig {
        n_layer: field("n_layer")?,
        n_head: field("n_head")?,
        n_embd: field("n_embd")?,
        vocab_size: field("vocab_size")?,
        n_positions: field("n_positions")?,
        layer_norm_epsilon,
    };
    cfg.validate(&name.to_string())?;
    Ok(cfg)
}

/// The `config.json` key where finch records the tokenizer a model's ids belong to (transformers
/// ignores it), so that `finch sample` need not guess.
pub const TOKENIZER_KEY: &str = "finch_tokenizer";

/// The tokenizer `dir/config.json` records, if any.
pub fn recorded_tokenizer(dir: &Path) -> Option<Tokenizer> {
    let text = std::fs::read_to_string(dir.join(CONFIG_FILE)).ok()?;
    let json: serde_json::Value = serde_json::from_str(&text).ok()?;
    serde_json::from_value(json.get(TOKENIZER_KEY)?.clone()).ok()
}

/// The `config.json` finch writes: our fields plus what transformers needs to load GPT-2, and the
/// tokenizer when it is known.
pub fn config_json(cfg: &GptConfig, tokenizer: Option<Tokenizer>) -> serde_json::Value {
    let mut json = serde_json::json!({
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_embd": cfg.n_embd,
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.n_positions,
        "n_ctx": cfg.n_positions,
        "layer_norm_epsilon": cfg.layer_norm_epsilon,
        "activation_function": "gelu_new",
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "tie_word_embeddings": true,
    });
    if let Some(t) = tokenizer {
        json[TOKENIZER_KEY] = t.name().into();
    }
    json
}

/// Buffers in Hugging Face checkpoints that are not parameters (or are tied to wte).
fn is_ignored(name: &str) -> bool {
    name == "lm_head.weight" || name.ends_with(".attn.bias") || name.ends_with(".attn.masked_bias")
}

/// Rows of a tensor as stored on disk: wte has V rows there, Vp in memory.
fn disk_shape(layout_shape: &[usize], name: &str, cfg: &GptConfig) -> Vec<usize> {
    if name == "wte.weight" {
        vec![cfg.vocab_size, cfg.n_embd]
    } else {
        layout_shape.to_vec()
    }
}

/// Reads `dir/model.safetensors` into a parameter buffer for `cfg` (padding rows zero).
pub fn load_params(dir: &Path, cfg: &GptConfig) -> Result<Vec<f32>> {
    let path = dir.join(WEIGHTS_FILE);
    let map = crate::os::mapfile::MappedFile::open(&path, "")?;
    parse_params(&map, &path, cfg)
}

/// Reads the bytes of a `model.safetensors` as [`load_params`] does; `path` only names the file
/// in errors. Every tensor is checked against `cfg` before the parameter buffer is allocated, so
/// a `config.json` describing a model far larger than the file costs nothing.
pub fn parse_params(bytes: &[u8], path: &Path, cfg: &GptConfig) -> Result<Vec<f32>> {
    let name = path.display();
    let st =
        SafeTensors::deserialize(bytes).map_err(|e| anyhow::anyhow!("{name}: not a valid safetensors file: {e}"))?;
    let layout = ParamLayout::new(cfg);
    let mut found = Vec::new();
    let mut seen = vec![false; layout.specs.len()];
    let index: HashMap<&str, usize> = layout.specs.iter().enumerate().map(|(i, s)| (s.name.as_str(), i)).collect();
    for (full_name, view) in st.iter() {
        let tname = full_name.strip_prefix("transformer.").unwrap_or(full_name);
        if is_ignored(tname) {
            continue;
        }
        let Some(&i) = index.get(tname) else {
            bail!("{name}: unexpected tensor \"{full_name}\" (not part of a GPT-2 model with {} layers)", cfg.n_layer);
        };
        let want = disk_shape(&layout.specs[i].shape, tname, cfg);
        if view.shape() != want.as_slice() {
            bail!("{name}: tensor \"{full_name}\" has shape {:?}, expected {want:?} from {CONFIG_FILE}", view.shape());
        }
        check_dtype(view.dtype()).with_context(|| format!("{name}: tensor \"{full_name}\""))?;
        seen[i] = true;
        found.push((i, view));
    }
    if let Some(missing) = layout.specs.iter().zip(&seen).find(|(_, &s)| !s) {
        bail!("{name}: missing tensor \"{}\"", missing.0.name);
    }
    let mut params = vec![0f32; layout.total];
    for (i, view) in &found {
        let spec = &layout.specs[*i];
        let numel = view.shape().iter().product::<usize>();
        convert_to_f32(view, &mut params[spec.offset..spec.offset + numel]);
    }
    Ok(params)
}

pub(crate) fn check_dtype(dtype: Dtype) -> Result<()> {
    match dtype {
        Dtype::F32 | Dtype::BF16 | Dtype::F16 => Ok(()),
        other => bail!("dtype {other:?} is not supported (expected F32, BF16 or F16)"),
    }
}

/// Converts a tensor whose dtype passed [`check_dtype`].
pub(crate) fn convert_to_f32(view: &TensorView, dst: &mut [f32]) {
    let bytes = view.data();
    match view.dtype() {
        Dtype::F32 => {
            dst.iter_mut().zip(bytes.chunks_exact(4)).for_each(|(d, b)| *d = f32::from_le_bytes(b.try_into().unwrap()))
        }
        Dtype::BF16 => dst
            .iter_mut()
            .zip(bytes.chunks_exact(2))
            .for_each(|(d, b)| *d = half::bf16::from_le_bytes([b[0], b[1]]).to_f32()),
        Dtype::F16 => dst
            .iter_mut()
            .zip(bytes.chunks_exact(2))
            .for_each(|(d, b)| *d = half::f16::from_le_bytes([b[0], b[1]]).to_f32()),
        other => unreachable!("check_dtype refuses {other:?}"),
    }
}

/// Writes `dir/config.json` and `dir/model.safetensors` (f32, without wte's padding rows),
/// each atomically; creates `dir` if needed.
pub fn save_model(dir: &Path, cfg: &GptConfig, params: &[f32], tokenizer: Option<Tokenizer>, flag: &str) -> Result<()> {
    let layout = ParamLayout::new(cfg);
    write_model_dir(
        dir,
        flag,
        &layout,
        params,
        |spec| disk_shape(&spec.shape, &spec.name, cfg),
        &config_json(cfg, tokenizer),
    )
}

/// A model directory: every tensor of `layout` from `params` in f32 at its shape on disk
/// (`disk_shape`: the leading rows of the buffer's), then `config`; each file atomically.
pub(crate) fn write_model_dir(
    dir: &Path,
    flag: &str,
    layout: &ParamLayout,
    params: &[f32],
    disk_shape: impl Fn(&crate::model::layout::TensorSpec) -> Vec<usize>,
    config: &serde_json::Value,
) -> Result<()> {
    create_dir(dir, flag)?;
    let mut views = Vec::with_capacity(layout.specs.len());
    for spec in &layout.specs {
        let shape = disk_shape(spec);
        let data = &params[spec.offset..spec.offset + shape.iter().product::<usize>()];
        views.push((spec.name.clone(), TensorView::new(Dtype::F32, shape, bytemuck::cast_slice(data))?));
    }
    let path = dir.join(WEIGHTS_FILE);
    write_atomically_with(&path, |tmp| {
        safetensors::serialize_to_file(views, None, tmp).with_context(|| format!("{}: cannot write", tmp.display()))
    })?;
    let config = serde_json::to_string_pretty(config)? + "\n";
    write_atomically(&dir.join(CONFIG_FILE), config.as_bytes())
}
