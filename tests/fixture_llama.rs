//! The Llama family against an independent implementation: Hugging Face transformers'
//! LlamaForCausalLM run in float64 by tests/fixtures/gen_tiny_llama.py (GQA, untied embeddings,
//! q/k/v/o biases, odd sizes; see tests/fixtures/README.md), read through finch's own Hugging Face
//! loader; and finch's writer read back by it.

mod common;

use common::{finch, step_lines, text, TempDir};
use finch::cpu::llama::Llama;
use finch::cpu::optimizer::{clip_grad_norm, global_norm, AdamW, AdamWConfig};
use finch::formats::hf_llama::{load_llama_params, parse_llama_config, save_llama_model};
use finch::formats::tokens::{BatchWalker, DataFormat, TokenStream};
use finch::model::layout::ParamLayout;
use finch::model::llama::LlamaConfig;
use safetensors::SafeTensors;
use std::path::{Path, PathBuf};

const B: usize = 2;
const T: usize = 8;
/// As for GPT-2: both sides compute in f64 and differ only in summation order.
const F64_TOL: f64 = 1e-10;

fn dir() -> PathBuf {
    let base = std::env::var("FINCH_FIXTURES")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures").into());
    Path::new(&base).join("tiny_llama")
}

fn config(d: &Path) -> LlamaConfig {
    let path = d.join("config.json");
    parse_llama_config(&std::fs::read_to_string(&path).unwrap(), &path).unwrap()
}

struct Expected(Vec<u8>);

impl Expected {
    fn get(&self, name: &str) -> Vec<f64> {
        let st = SafeTensors::deserialize(&self.0).unwrap();
        let view = st.tensor(name).unwrap_or_else(|_| panic!("fixture lacks {name}"));
        view.data().chunks_exact(8).map(|b| f64::from_le_bytes(b.try_into().unwrap())).collect()
    }
}

fn expected() -> Expected {
    Expected(std::fs::read(dir().join("expected.safetensors")).unwrap())
}

fn scaled_err(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f64, |m, x| m.max(x.abs())).max(1e-30);
    a.iter().zip(b).fold(0f64, |m, (x, y)| m.max((x - y).abs())) / scale
}

/// A tensor as Hugging Face stores it (the embedding and lm_head without their padding rows).
fn hf_view(buf: &[f64], layout: &ParamLayout, name: &str, cfg: &LlamaConfig) -> Vec<f64> {
    let spec = layout.get(name).unwrap();
    let n = if name.contains("embed_tokens") || name == "lm_head.weight" {
        cfg.vocab_size * cfg.hidden_size
    } else {
        spec.numel
    };
    buf[spec.offset..spec.offset + n].to_vec()
}

fn batches(n: usize) -> Vec<(Vec<u32>, Vec<u32>)> {
    let s = TokenStream::open(dir().join("tokens.bin").to_str().unwrap(), "--data", DataFormat::Llmc, 97).unwrap();
    let mut w = BatchWalker { position: 0 };
    (0..n)
        .map(|_| {
            let (mut buf, mut x, mut y) = (vec![], vec![0; B * T], vec![0; B * T]);
            w.next_batch(&s, &mut buf, &mut x, &mut y);
            (x, y)
        })
        .collect()
}

fn model() -> Llama<f64> {
    let init = dir().join("init");
    let cfg = config(&init);
    let params = load_llama_params(&init, &cfg).unwrap();
    Llama::new(cfg, params.iter().map(|&p| p as f64).collect())
}

#[test]
fn f64_logits_loss_and_every_gradient_match_transformers() {
    let e = expected();
    let mut m = model();
    let cfg = m.config;
    let (v, vp) = (cfg.vocab_size, cfg.padded_vocab_size());
    let (x, y) = batches(1).remove(0);
    let loss = m.forward(&x, Some(&y), B, T).unwrap();
    assert!((loss - e.get("loss")[0]).abs() < F64_TOL, "loss {loss} vs {}", e.get("loss")[0]);
    let logits: Vec<f64> = m.logits().chunks(vp).flat_map(|row| row[..v].to_vec()).collect();
    let err = scaled_err(&logits, &e.get("logits"));
    assert!(err < F64_TOL, "logits err {err:e}");
    m.zero_grad();
    m.backward(1.0);
    let layout = m.layout.clone();
    for spec in &layout.specs {
        let got = hf_view(&m.grads, &layout, &spec.name, &cfg);
        let err = scaled_err(&got, &e.get(&format!("grad.{}", spec.name)));
        assert!(err < F64_TOL, "grad of {}: err {err:e}", spec.name);
    }
}

#[test]
fn f64_training_steps_match_transformers_adamw_with_clipping() {
    let e = expected();
    let mut m = model();
    let cfg = m.config;
    let layout = m.layout.clone();
    let hp = AdamWConfig { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 };
    let mut opt = AdamW::new(layout.total);
    let (want_loss, want_norm) = (e.get("train.loss"), e.get("train.grad_norm"));
    for (step, (x, y)) in batches(want_loss.len()).into_iter().enumerate() {
        let loss = m.forward(&x, Some(&y), B, T).unwrap();
        m.zero_grad();
        m.backward(1.0);
        let norm = global_norm(&m.grads);
        assert!(
            (loss - want_loss[step]).abs() < F64_TOL * 10.0,
            "step {}: loss {loss} vs {}",
            step + 1,
            want_loss[step]
        );
        assert!(
            (norm - want_norm[step]).abs() < F64_TOL * 10.0 * norm,
            "step {}: norm {norm} vs {}",
            step + 1,
            want_norm[step]
        );
        clip_grad_norm(&mut m.grads, norm, 1.0);
        opt.update(&mut m.params, &m.grads, &layout, 1e-2, &hp);
    }
    for spec in &layout.specs {
        let err = scaled_err(&hf_view(&m.params, &layout, &spec.name, &cfg), &e.get(&format!("final.{}", spec.name)));
        assert!(err < 1e-9, "final {}: err {err:e}", spec.name);
    }
}

/// finch's writer and reader: the fixture's weights saved by finch, read back, give the same
/// buffer and config (the padding rows stay zero); the directory is what transformers loads
/// (`python3 tests/fixtures/check_hf_load.py DIR` says so on a machine with transformers).
#[test]
fn a_model_finch_saves_reads_back_the_same() {
    let init = dir().join("init");
    let cfg = config(&init);
    let params = load_llama_params(&init, &cfg).unwrap();
    let tmp = TempDir::new("llama-save");
    let out = tmp.path("model");
    save_llama_model(&out, &cfg, &params, None, "--save").unwrap();
    // FINCH_LLAMA_SAVE_TO=DIR keeps a copy, for check_hf_load.py on a machine with transformers.
    if let Ok(keep) = std::env::var("FINCH_LLAMA_SAVE_TO") {
        save_llama_model(Path::new(&keep), &cfg, &params, None, "--save").unwrap();
    }
    assert_eq!(config(&out), cfg);
    assert_eq!(load_llama_params(&out, &cfg).unwrap(), params);
    // Sharded: the same tensors split over two files and an index.
    let sharded = tmp.path("sharded");
    std::fs::create_dir(&sharded).unwrap();
    std::fs::copy(out.join("config.json"), sharded.join("config.json")).unwrap();
    let bytes = std::fs::read(out.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let (mut a, mut b, mut map) = (Vec::new(), Vec::new(), serde_json::Map::new());
    for (i, (name, view)) in st.tensors().into_iter().enumerate() {
        let file = if i % 2 == 0 { "model-00001-of-00002.safetensors" } else { "model-00002-of-00002.safetensors" };
        map.insert(name.clone(), file.into());
        if i % 2 == 0 {
            a.push((name, view))
        } else {
            b.push((name, view))
        }
    }
    safetensors::serialize_to_file(a, None, &sharded.join("model-00001-of-00002.safetensors")).unwrap();
    safetensors::serialize_to_file(b, None, &sharded.join("model-00002-of-00002.safetensors")).unwrap();
    std::fs::write(sharded.join("model.safetensors.index.json"), serde_json::json!({"weight_map": map}).to_string())
        .unwrap();
    assert_eq!(load_llama_params(&sharded, &cfg).unwrap(), params);
    // A missing tensor is one line naming it.
    let e = format!("{:#}", load_llama_params(&sharded, &LlamaConfig { num_hidden_layers: 3, ..cfg }).unwrap_err());
    assert!(e.contains("missing tensor \"model.layers.2.input_layernorm.weight\""), "{e}");
}

/// The training contract through the binary, in f32: `finch train --init` on the fixture's model
/// and tokens, with its optimizer settings, logs transformers' losses and gradient norms and saves
/// its final weights.
#[test]
fn cli_training_contract_matches_transformers_in_f32() {
    let tmp = TempDir::new("llama-contract");
    let (log, save) = (tmp.path("log.jsonl"), tmp.path("out"));
    let (data, init) = (dir().join("tokens.bin"), dir().join("init"));
    #[rustfmt::skip]
    let out = finch(&[
        "train", "--data", data.to_str().unwrap(), "--init", init.to_str().unwrap(),
        "--batch-size", "2", "--seq-len", "8", "--steps", "6", "--lr", "0.01", "--lr-schedule", "constant",
        "--weight-decay", "0.1", "--beta1", "0.9", "--beta2", "0.95", "--eps", "1e-8", "--grad-clip", "1.0",
        "--device", "cpu", "--log", log.to_str().unwrap(), "--save", save.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("(Llama, 2 layers, 6 query and 2 key/value heads, 48 channels, MLP 72"));
    let e = expected();
    let (want_loss, want_norm) = (e.get("train.loss"), e.get("train.grad_norm"));
    let lines = step_lines(&log);
    assert_eq!(lines.len(), 6);
    for (i, line) in lines.iter().enumerate() {
        // As for GPT-2: f32 rounding through the network and six Adam steps stays near 1e-6
        // relative; one step's clipping or decay wrong moves the loss by more than 1e-3.
        for (key, want) in [("loss", want_loss[i]), ("grad_norm", want_norm[i])] {
            let got = line[key].as_f64().unwrap();
            let rel = (got - want).abs() / want;
            assert!(rel < 2e-5, "step {}: {key} {got} vs transformers {want} (rel {rel:e})", i + 1);
        }
    }
    let cfg = config(&save);
    let params: Vec<f64> = load_llama_params(&save, &cfg).unwrap().iter().map(|&p| p as f64).collect();
    let layout = ParamLayout::llama(&cfg);
    for spec in &layout.specs {
        let err = scaled_err(&hf_view(&params, &layout, &spec.name, &cfg), &e.get(&format!("final.{}", spec.name)));
        assert!(err < 1e-4, "saved {}: scaled error {err:e}", spec.name);
    }
}
