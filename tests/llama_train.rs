//! The Llama family through the CLI on the CPU: a preset trained from scratch with its fields
//! overridden, a resumed run identical to an uninterrupted one, sampling from the result, and the
//! flags that do not apply refused.

mod common;

use common::{assert_one_line_error, deterministic_step_lines, finch, text, tokens, TempDir};
use finch::formats::model_dir::load_model_config;
use finch::formats::tokens::write_llmc_u16;
use finch::model::family::ModelConfig;

/// A small model of the llama-135m preset's family, on byte-sized ids.
const SHAPE: [&str; 14] = [
    "--model",
    "llama-135m",
    "--n-layer",
    "2",
    "--n-head",
    "4",
    "--n-kv-head",
    "2",
    "--n-embd",
    "32",
    "--intermediate-size",
    "40",
    "--context-length",
    "16",
];

fn train(data: &str, out: &str, steps: &str, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["train", "--data", data, "--vocab-size", "256", "--batch-size", "2", "--seq-len", "16"];
    args.extend_from_slice(&[
        "--steps",
        steps,
        "--out",
        out,
        "--device",
        "cpu",
        "--lr",
        "3e-3",
        "--lr-schedule",
        "constant",
    ]);
    args.extend_from_slice(extra);
    finch(&args)
}

#[test]
fn a_llama_preset_trains_resumes_bit_for_bit_and_samples() {
    let tmp = TempDir::new("llama-train");
    let data = tmp.path("bytes.bin");
    write_llmc_u16(&data, &tokens(4000, 256, 7)).unwrap();
    let (data, whole, split) = (data.to_str().unwrap(), tmp.path("whole"), tmp.path("split"));
    let out = train(data, whole.to_str().unwrap(), "6", &SHAPE);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("(Llama, 2 layers, 4 query and 2 key/value heads, 32 channels, MLP 40"));
    let cfg = load_model_config(&whole.join("model")).unwrap();
    let ModelConfig::Llama(c) = cfg else { panic!("saved {cfg:?}") };
    assert_eq!((c.num_key_value_heads, c.intermediate_size, c.vocab_size), (2, 40, 256));
    assert!(c.tie_word_embeddings && !c.attention_bias, "the preset's own fields stay");

    // 3 steps, then --resume to 6 (a constant rate: a longer cosine would stretch): the same losses and norms, bit for bit, and the same model.
    let out = train(data, split.to_str().unwrap(), "3", &SHAPE);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = finch(&["train", "--resume", split.to_str().unwrap(), "--steps", "6"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let lines = |d: &std::path::Path| deterministic_step_lines(&d.join("log.jsonl"));
    assert_eq!(lines(&whole), lines(&split));
    let first = lines(&whole)[0]["loss"].as_f64().unwrap();
    assert!((first - 256f64.ln()).abs() < 0.1, "a fresh model guesses uniformly: loss {first}");
    let weights = |d: &std::path::Path| std::fs::read(d.join("model/model.safetensors")).unwrap();
    assert_eq!(weights(&whole), weights(&split));

    // The saved model samples (bytes: the tokenizer the vocabulary implies), reproducibly.
    let sample = || finch(&["sample", "--model", whole.to_str().unwrap(), "--prompt", "ab", "--max-new-tokens", "20"]);
    let (a, b) = (sample(), sample());
    assert!(a.status.success(), "{}", text(&a.stderr));
    assert!(text(&a.stdout).starts_with("ab") && text(&a.stdout).len() > 3);
    assert_eq!(a.stdout, b.stdout);
}

#[test]
fn flags_of_the_other_family_and_bad_shapes_are_refused() {
    let tmp = TempDir::new("llama-flags");
    let data = tmp.path("bytes.bin");
    write_llmc_u16(&data, &tokens(500, 256, 1)).unwrap();
    let data = data.to_str().unwrap();
    let out = train(data, tmp.path("a").to_str().unwrap(), "1", &["--n-kv-head", "2"]);
    assert_one_line_error(&out, &["--n-kv-head is a Llama-family flag", "--model llama-135m"]);
    let mut shape = SHAPE.to_vec();
    shape.extend_from_slice(&["--n-kv-head", "3"]);
    let out = train(data, tmp.path("b").to_str().unwrap(), "1", &shape);
    assert_one_line_error(&out, &["num_key_value_heads (3) must divide num_attention_heads (4)"]);
}
