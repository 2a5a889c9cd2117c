//! Hugging Face tokenizer.json files end to end, built here with the `tokenizers` crate (no
//! network): `finch tokenize --tokenizer DIR` writes each document between the BOS and EOS of its
//! tokenizer_config.json, exactly the ids `tokenizers` gives, and copies the tokenizer beside the
//! shards; `finch train` carries it into the run and the model; `finch sample` encodes and streams
//! with it. A vocabulary above 65,536 ids writes llm.c's uint32 files.

mod common;

use common::{assert_one_line_error, finch, text, TempDir};
use finch::cli::tokenize::goes_to_val;
use finch::formats::hf_tokenizer::HfTokenizer;
use finch::formats::tokens::{DataFormat, TokenStream};
use std::path::Path;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::AddedToken;

const CORPUS: [&str; 6] = [
    "the cat sat on the mat and posted about it",
    "naïve café owners post every morning",
    "日本語のテキストも少しある",
    "short post",
    "another day, another post about the weather: sunny, 23°C",
    "emoji are bytes too 🐦 and so is ü",
];

/// A byte-level BPE tokenizer (GPT-2 style) with <s> = 0 and </s> = 1, and a tokenizer_config.json
/// naming them, in `dir`.
fn byte_level_bpe(dir: &Path) -> tokenizers::Tokenizer {
    std::fs::create_dir_all(dir).unwrap();
    let corpus = dir.join("corpus.txt");
    std::fs::write(&corpus, CORPUS.join("\n").repeat(20)).unwrap();
    let mut tok = tokenizers::Tokenizer::new(BPE::default());
    tok.with_pre_tokenizer(Some(ByteLevel::default().add_prefix_space(false)));
    tok.with_decoder(Some(ByteLevel::default()));
    let specials = vec![AddedToken::from("<s>", true), AddedToken::from("</s>", true)];
    let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
        .vocab_size(400)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .special_tokens(specials)
        .show_progress(false)
        .build()
        .into();
    tok.train_from_files(&mut trainer, vec![corpus.to_str().unwrap().to_string()]).unwrap();
    std::fs::remove_file(&corpus).unwrap();
    tok.save(dir.join("tokenizer.json"), false).unwrap();
    let config = r#"{"bos_token": "<s>", "eos_token": {"content": "</s>", "special": true}}"#;
    std::fs::write(dir.join("tokenizer_config.json"), config).unwrap();
    assert_eq!((tok.token_to_id("<s>"), tok.token_to_id("</s>")), (Some(0), Some(1)));
    tok
}

fn ids(tok: &tokenizers::Tokenizer, text: &str) -> Vec<u32> {
    tok.encode(text, false).unwrap().get_ids().to_vec()
}

fn read_all(pattern: &str, vocab: usize) -> Vec<u32> {
    let stream = TokenStream::open(pattern, "--data", DataFormat::Llmc, vocab).unwrap();
    let mut out = vec![0; stream.len()];
    stream.read(0, &mut out);
    out
}

#[test]
fn tokenize_train_and_sample_with_a_tokenizer_json() {
    let tmp = TempDir::new("hf-tok");
    let tok_dir = tmp.path("tok");
    let tok = byte_level_bpe(&tok_dir);
    let vocab = tok.get_vocab_size(true);
    let docs: Vec<String> = (0..40).map(|i| format!("{} #{i}", CORPUS[i % CORPUS.len()])).collect();
    let jsonl: String = docs.iter().map(|d| serde_json::json!({ "text": d }).to_string() + "\n").collect();
    let input = tmp.path("posts.jsonl");
    std::fs::write(&input, jsonl).unwrap();
    let data = tmp.path("data");
    let out = finch(&[
        "tokenize",
        input.to_str().unwrap(),
        "--tokenizer",
        tok_dir.to_str().unwrap(),
        "--out",
        data.to_str().unwrap(),
        "--val-fraction",
        "0.1",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("<s> (0) before and </s> (1) after each document"), "{}", text(&out.stdout));
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(data.join("meta.json")).unwrap()).unwrap();
    assert_eq!(meta["tokenizer"], "tokenizer.json");
    assert_eq!(meta["vocab_size"], vocab);
    assert_eq!(
        (meta["bos_token"].as_u64(), meta["eos_token"].as_u64(), meta["token_bytes"].as_u64()),
        (Some(0), Some(1), Some(2))
    );
    assert_eq!(
        std::fs::read(data.join("tokenizer.json")).unwrap(),
        std::fs::read(tok_dir.join("tokenizer.json")).unwrap()
    );

    // Exactly the ids of the tokenizers crate, each document framed by <s> ... </s>.
    let (mut train, mut val) = (vec![], vec![]);
    for (i, d) in docs.iter().enumerate() {
        let split = if goes_to_val(i as u64, 0.1) { &mut val } else { &mut train };
        split.push(0);
        split.extend(ids(&tok, d));
        split.push(1);
    }
    assert_eq!(read_all(data.join("train_*.bin").to_str().unwrap(), vocab), train);
    assert_eq!(read_all(data.join("val_*.bin").to_str().unwrap(), vocab), val);

    // Train a small Llama on them: the run and its model carry the tokenizer.
    let run = tmp.path("run");
    #[rustfmt::skip]
    let out = finch(&[
        "train", "--data", data.join("train_*.bin").to_str().unwrap(), "--model", "llama-135m",
        "--n-layer", "1", "--n-head", "2", "--n-kv-head", "1", "--n-embd", "16", "--intermediate-size", "24",
        "--context-length", "32", "--batch-size", "2", "--seq-len", "32", "--steps", "3", "--device", "cpu",
        "--out", run.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains(&format!("vocab {vocab} padded to")), "{}", text(&out.stdout));
    for dir in [run.clone(), run.join("model")] {
        assert!(dir.join("tokenizer.json").is_file() && dir.join("tokenizer_config.json").is_file(), "{dir:?}");
    }
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("model/config.json")).unwrap()).unwrap();
    assert_eq!(config["finch_tokenizer"], "tokenizer.json");
    assert_eq!(config["vocab_size"], vocab);

    let out = finch(&["sample", "--model", run.to_str().unwrap(), "--prompt", "naïve café", "--max-new-tokens", "40"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).starts_with("naïve café"), "{}", text(&out.stdout));
}

#[test]
fn streamed_decoding_equals_decoding_the_whole_sequence() {
    let tmp = TempDir::new("hf-stream");
    let tok = byte_level_bpe(&tmp.path("tok"));
    let hf = HfTokenizer::load(&tmp.path("tok"), "--tokenizer").unwrap();
    assert_eq!((hf.bos, hf.eos, hf.vocab_size), (Some(0), Some(1), tok.get_vocab_size(true)));
    // Characters the tokenizer never saw are split into byte tokens, cut mid-character.
    let text = "naïve café: Ω𝄞 日本語 🐦🐦 done";
    let ids = ids(&tok, text);
    assert!(ids.len() > text.chars().count() / 2, "expected byte pieces");
    let mut stream = hf.stream();
    let mut streamed = String::new();
    for &id in &ids {
        let piece = stream.push(id).unwrap();
        assert!(!piece.contains('\u{FFFD}'), "a partial character was shown: {piece:?}");
        streamed += &piece;
    }
    streamed += &stream.finish().unwrap();
    assert_eq!(streamed, text);
    assert_eq!(hf.decode(&ids).unwrap(), text);
}

/// A word-level tokenizer of 70,002 ids: its ids need four bytes.
fn wide_vocab(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let mut vocab = serde_json::Map::new();
    for i in 0..70_000u32 {
        vocab.insert(format!("w{i}"), i.into());
    }
    vocab.insert("<unk>".into(), 70_000.into());
    vocab.insert("<|end|>".into(), 70_001.into());
    let json = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [], "normalizer": null,
        "pre_tokenizer": {"type": "WhitespaceSplit"}, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"},
    });
    std::fs::write(dir.join("tokenizer.json"), json.to_string()).unwrap();
    std::fs::write(dir.join("tokenizer_config.json"), r#"{"eos_token": "<|end|>"}"#).unwrap();
}

#[test]
fn a_vocabulary_above_65536_writes_uint32_tokens() {
    let tmp = TempDir::new("hf-wide");
    wide_vocab(&tmp.path("tok"));
    let input = tmp.path("doc.txt");
    std::fs::write(&input, "w1 w69999 w65536 w42").unwrap();
    let data = tmp.path("data");
    let out = finch(&[
        "tokenize",
        input.to_str().unwrap(),
        "--tokenizer",
        tmp.path("tok/tokenizer.json").to_str().unwrap(),
        "--out",
        data.to_str().unwrap(),
        "--val-fraction",
        "0",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let shard = std::fs::read(data.join("train_000000.bin")).unwrap();
    let int = |i: usize| i32::from_le_bytes(shard[4 * i..4 * i + 4].try_into().unwrap());
    assert_eq!((int(0), int(1), int(2)), (20240801, 7, 5));
    assert_eq!(shard.len(), 1024 + 5 * 4);
    assert_eq!(read_all(data.join("train_*.bin").to_str().unwrap(), 70_002), [1, 69_999, 65_536, 42, 70_001]);

    // No tokenizer_config.json: documents could not be told apart, so it is refused.
    std::fs::remove_file(tmp.path("tok/tokenizer_config.json")).unwrap();
    let out = finch(&[
        "tokenize",
        input.to_str().unwrap(),
        "--tokenizer",
        tmp.path("tok").to_str().unwrap(),
        "--out",
        tmp.path("d2").to_str().unwrap(),
    ]);
    assert_one_line_error(&out, &["no tokenizer_config.json beside it naming a bos_token or eos_token"]);
    let out =
        finch(&["tokenize", input.to_str().unwrap(), "--tokenizer", "gpt3", "--out", tmp.path("d3").to_str().unwrap()]);
    assert_one_line_error(&out, &["--tokenizer gpt3: expected gpt2, bytes, or a tokenizer.json"]);
}

/// The README's Llama walkthrough ("Fine-tune a published model on your own posts"), run as
/// written by bash, on a stand-in for SmolLM2-135M: a tiny Llama with a byte-level BPE
/// tokenizer.json, in a directory of that name. Only the batch and the steps are cut (flags
/// appended, which override the README's), so that it runs in seconds on a CPU.
#[test]
fn the_readme_llama_walkthrough_fine_tunes_a_model_directory() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let section = readme.split("**Fine-tune a published model on your own posts.**").nth(1).unwrap();
    let block = section.split("```sh\n").nth(1).unwrap().split("```").next().unwrap();
    assert!(block.contains("--tokenizer SmolLM2-135M") && block.contains("--init SmolLM2-135M"), "{block}");
    let tmp = TempDir::new("llama-walkthrough");
    let model = tmp.path("SmolLM2-135M");
    let tok = byte_level_bpe(&model);
    let cfg = finch::model::llama::LlamaConfig {
        vocab_size: tok.get_vocab_size(true),
        hidden_size: 16,
        intermediate_size: 24,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        max_position_embeddings: 64,
        rms_norm_eps: 1e-5,
        rope_theta: 100000.0,
        attention_bias: false,
        o_proj_bias: false,
        tie_word_embeddings: true,
    };
    let params = finch::model::family::ModelConfig::Llama(cfg).init_params(5);
    finch::formats::hf_llama::save_llama_model(&model, &cfg, &params, None, "--save").unwrap();
    let posts: String = (0..300)
        .map(|i| serde_json::json!({ "text": format!("{} ({i})", CORPUS[i % CORPUS.len()]) }).to_string() + "\n")
        .collect();
    std::fs::write(tmp.path("posts.jsonl"), posts).unwrap();
    let script = format!(
        "set -euo pipefail\nfinch() {{\n  case $1 in\n    train) \"$FINCH\" \"$@\" --device cpu --batch-size 2 \
         --seq-len 32 --steps 3;;\n    sample) \"$FINCH\" \"$@\" --max-new-tokens 8;;\n    *) \"$FINCH\" \"$@\";;\n  \
         esac\n}}\n{block}"
    );
    let out = std::process::Command::new("bash")
        .args(["-c", &script])
        .current_dir(&tmp.0)
        .env("FINCH", common::finch_bin())
        .output()
        .unwrap();
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("(Llama, 2 layers, 4 query and 2 key/value heads") && stdout.contains("from SmolLM2-135M"));
    assert!(stdout.contains("done: 3 steps") && stdout.contains("Today I"), "{stdout}");
    let saved = tmp.path("runs/smol-posts/model");
    assert_eq!(
        std::fs::read(saved.join("tokenizer.json")).unwrap(),
        std::fs::read(model.join("tokenizer.json")).unwrap()
    );
    let step = |i: usize| common::step_lines(&tmp.path("runs/smol-posts/log.jsonl"))[i]["loss"].as_f64().unwrap();
    assert!(step(2).is_finite() && step(0) < (cfg.vocab_size as f64).ln() + 0.5);
}
