//! finch against an independent implementation: Hugging Face transformers' GPT-2 run in float64
//! by tests/fixtures/gen_tiny_gpt2.py (see tests/fixtures/README.md).

mod common;

use common::{finch, fixture, step_lines, text, TempDir};
use finch::cpu::model::Gpt;
use finch::cpu::optimizer::{clip_grad_norm, global_norm, AdamW, AdamWConfig};
use finch::formats::huggingface;
use finch::formats::tokens::{BatchWalker, DataFormat, TokenStream};
use finch::model::layout::ParamLayout;
use safetensors::SafeTensors;
use std::path::Path;

const B: usize = 2;
const T: usize = 8;

struct Expected {
    bytes: Vec<u8>,
}

impl Expected {
    fn load() -> Expected {
        Expected { bytes: std::fs::read(format!("{}/expected.safetensors", fixture())).unwrap() }
    }

    fn get(&self, name: &str) -> Vec<f64> {
        let st = SafeTensors::deserialize(&self.bytes).unwrap();
        let view = st.tensor(name).unwrap_or_else(|_| panic!("fixture lacks {name}"));
        view.data().chunks_exact(8).map(|b| f64::from_le_bytes(b.try_into().unwrap())).collect()
    }
}

fn init_model<F: finch::cpu::real::Real>() -> Gpt<F> {
    let dir = Path::new(&fixture()).join("init");
    let cfg = huggingface::load_config(&dir).unwrap();
    let params = huggingface::load_params(&dir, &cfg).unwrap();
    Gpt::new(cfg, params.iter().map(|&p| F::from_f64(p as f64)).collect())
}

fn stream() -> TokenStream {
    TokenStream::open(&format!("{}/tokens.bin", fixture()), "--data", DataFormat::Llmc, 97).unwrap()
}

/// Largest |a − b| over the largest |b|: an error relative to the tensor's scale.
fn scaled_err(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f64, |m, x| m.max(x.abs())).max(1e-30);
    a.iter().zip(b).fold(0f64, |m, (x, y)| m.max((x - y).abs())) / scale
}

/// A parameter's values as Hugging Face stores them (wte without its padding rows).
fn hf_view(model_buf: &[f64], layout: &ParamLayout, name: &str, vocab: usize) -> Vec<f64> {
    let spec = layout.get(name).unwrap();
    let n = if name == "wte.weight" { vocab * spec.shape[1] } else { spec.numel };
    model_buf[spec.offset..spec.offset + n].to_vec()
}

fn batch(walker: &mut BatchWalker, s: &TokenStream) -> (Vec<u32>, Vec<u32>) {
    let (mut buf, mut x, mut y) = (vec![], vec![0; B * T], vec![0; B * T]);
    walker.next_batch(s, &mut buf, &mut x, &mut y);
    (x, y)
}

/// Both sides compute in f64 and differ only in summation order (≈1e-15 relative per op, a few
/// dozen ops deep), so 1e-10 leaves four orders of margin; a wrong formula errs by ≳1e-4.
const F64_TOL: f64 = 1e-10;

#[test]
fn f64_logits_loss_and_every_gradient_match_pytorch() {
    let expected = Expected::load();
    let mut model = init_model::<f64>();
    let (v, vp) = (model.config.vocab_size, model.config.padded_vocab_size());
    let (x, y) = batch(&mut BatchWalker { position: 0 }, &stream());
    let loss = model.forward(&x, Some(&y), B, T).unwrap();
    assert!((loss - expected.get("loss")[0]).abs() < F64_TOL, "loss {loss} vs {}", expected.get("loss")[0]);

    // Drop the padded logit columns before comparing; they must be exactly 0 (wte padding is 0).
    let logits: Vec<f64> = model
        .logits()
        .chunks(vp)
        .flat_map(|row| {
            assert!(row[v..].iter().all(|&z| z == 0.0));
            row[..v].to_vec()
        })
        .collect();
    assert!(scaled_err(&logits, &expected.get("logits")) < F64_TOL);

    model.zero_grad();
    model.backward(1.0);
    let layout = model.layout.clone();
    for spec in &layout.specs {
        let got = hf_view(&model.grads, &layout, &spec.name, v);
        let err = scaled_err(&got, &expected.get(&format!("grad.{}", spec.name)));
        assert!(err < F64_TOL, "grad of {}: scaled error {err:e}", spec.name);
    }
    for l in 0..2 {
        // The key bias cannot change any softmax (see the f32 test below): its gradient is 0.
        let bias = expected.get(&format!("grad.h.{l}.attn.c_attn.bias"));
        assert!(bias[32..64].iter().all(|g| g.abs() < 1e-12), "PyTorch's key-bias gradient is not 0");
    }
    let wte = layout.get("wte.weight").unwrap();
    assert!(model.grads[wte.offset + v * 32..wte.offset + wte.numel].iter().all(|&g| g == 0.0), "padding got gradient");
}

#[test]
fn f64_training_steps_match_pytorch_adamw_with_clipping() {
    let expected = Expected::load();
    let mut model = init_model::<f64>();
    let layout = model.layout.clone();
    let v = model.config.vocab_size;
    let hp = AdamWConfig { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 };
    let mut opt = AdamW::<f64>::new(layout.total);
    let (s, mut walker) = (stream(), BatchWalker { position: 0 });
    let (want_loss, want_norm) = (expected.get("train.loss"), expected.get("train.grad_norm"));
    for step in 0..6 {
        let (x, y) = batch(&mut walker, &s);
        let loss = model.forward(&x, Some(&y), B, T).unwrap();
        model.zero_grad();
        model.backward(1.0);
        let norm = global_norm(&model.grads);
        assert!(
            (loss - want_loss[step]).abs() < F64_TOL * want_loss[step],
            "step {}: loss {loss} vs {}",
            step + 1,
            want_loss[step]
        );
        assert!(
            (norm - want_norm[step]).abs() < F64_TOL * want_norm[step],
            "step {}: norm {norm} vs {}",
            step + 1,
            want_norm[step]
        );
        clip_grad_norm(&mut model.grads, norm, 1.0);
        opt.update(&mut model.params, &model.grads, &layout, 1e-2, &hp);
    }
    for spec in &layout.specs {
        let err =
            scaled_err(&hf_view(&model.params, &layout, &spec.name, v), &expected.get(&format!("final.{}", spec.name)));
        // Six Adam steps divide by sqrt(v) of gradients, amplifying f64 noise a little: still ≪ 1e-8.
        assert!(err < 1e-8, "final {}: scaled error {err:e}", spec.name);
    }
}

/// The exact training contract, through the binary, in f32.
#[test]
fn cli_training_contract_matches_pytorch_in_f32() {
    let dir = TempDir::new("contract");
    let (log, save) = (dir.path("log.jsonl"), dir.path("out"));
    let out = finch(&[
        "train",
        "--data",
        &format!("{}/tokens.bin", fixture()),
        "--init",
        &format!("{}/init", fixture()),
        "--batch-size",
        "2",
        "--seq-len",
        "8",
        "--steps",
        "6",
        "--lr",
        "0.01",
        "--lr-schedule",
        "constant",
        "--warmup-steps",
        "0",
        "--weight-decay",
        "0.1",
        "--beta1",
        "0.9",
        "--beta2",
        "0.95",
        "--eps",
        "1e-8",
        "--grad-clip",
        "1.0",
        "--device",
        "cpu",
        "--log",
        log.to_str().unwrap(),
        "--save",
        save.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let expected = Expected::load();
    let (want_loss, want_norm) = (expected.get("train.loss"), expected.get("train.grad_norm"));
    let lines = step_lines(&log);
    assert_eq!(lines.len(), 6);
    for (i, line) in lines.iter().enumerate() {
        let get = |k: &str| line[k].as_f64().unwrap_or_else(|| panic!("step line lacks {k}: {line}"));
        assert_eq!(line["step"].as_u64(), Some(i as u64 + 1));
        assert_eq!(get("lr"), 0.01);
        assert!(get("ms") > 0.0 && get("tok_per_s") > 0.0);
        // f32 rounding (≈6e-8 relative per op) grows through the network and six Adam steps to
        // ≈1e-6 relative in what we measured; 2e-5 fails for any real discrepancy, e.g. one
        // step's clipping or decay wrong, which moves the loss by >1e-3.
        for (key, want) in [("loss", want_loss[i]), ("grad_norm", want_norm[i])] {
            let rel = (get(key) - want).abs() / want;
            assert!(rel < 2e-5, "step {}: {key} {} vs PyTorch {want} (rel {rel:e})", i + 1, get(key));
        }
    }
    // The saved model is the HF layout and holds the trained weights. One slice is exempt: the
    // key bias. Adding a constant to every key of a query shifts all its scores equally, which
    // softmax ignores, so that bias's true gradient is exactly 0 (asserted in the f64 test). In
    // f32 it is rounding noise of ~1e-9, comparable to eps, and Adam's g/sqrt(v) turns noise into
    // steps of ~lr, so it drifts differently in any two implementations. Every other tensor
    // agreed within 3.4e-5 of its scale when measured; 1e-4 is the bound.
    let cfg = huggingface::load_config(&save).unwrap();
    let params: Vec<f64> = huggingface::load_params(&save, &cfg).unwrap().iter().map(|&p| p as f64).collect();
    let layout = ParamLayout::new(&cfg);
    let c = cfg.n_embd;
    for spec in &layout.specs {
        let (mut got, mut want) =
            (hf_view(&params, &layout, &spec.name, 97), expected.get(&format!("final.{}", spec.name)));
        if spec.name.ends_with("attn.c_attn.bias") {
            got.drain(c..2 * c);
            want.drain(c..2 * c);
        }
        let err = scaled_err(&got, &want);
        assert!(err < 1e-4, "saved {}: scaled error {err:e}", spec.name);
    }
}
