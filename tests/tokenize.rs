//! `finch tokenize` through the library: GPT-2 ids, document separators, JSONL, shards, the
//! validation split, thread-count independence and every error path.

mod common;

use clap::Parser;
use common::TempDir;
use finch::cli::tokenize::{goes_to_val, run, TokenizeArgs};
use finch::formats::tokenizer::gpt2_encode;
use finch::formats::tokens::{DataFormat, TokenStream};
use std::path::Path;

const EOT: u32 = 50256;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: TokenizeArgs,
}

/// Parses `finch tokenize` flags, so the tests use the real defaults.
fn parse(flags: &[&str]) -> TokenizeArgs {
    Cli::try_parse_from(std::iter::once("tokenize").chain(flags.iter().copied())).unwrap().args
}

fn tokenize(flags: &[&str]) {
    run(parse(flags)).unwrap();
}

fn write(dir: &TempDir, name: &str, bytes: &[u8]) -> String {
    let path = dir.path(name);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, bytes).unwrap();
    path.to_str().unwrap().to_string()
}

/// All tokens of `out/{prefix}_*.bin`, or none when there is no such shard.
fn read_split(out: &Path, prefix: &str, vocab: usize) -> Vec<u32> {
    let pattern = format!("{}/{prefix}_*.bin", out.display());
    if glob::glob(&pattern).unwrap().next().is_none() {
        return Vec::new();
    }
    let stream = TokenStream::open(&pattern, "--data", DataFormat::Llmc, vocab).unwrap();
    let mut tokens = vec![0; stream.len()];
    stream.read(0, &mut tokens);
    tokens
}

fn meta(out: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(out.join("meta.json")).unwrap()).unwrap()
}

fn decode(tokens: &[u32]) -> String {
    tiktoken_rs::r50k_base_singleton().decode(tokens).unwrap()
}

/// Documents of a GPT-2 stream: the pieces after each <|endoftext|>.
fn documents(tokens: &[u32]) -> Vec<String> {
    assert_eq!(tokens.first(), Some(&EOT), "a stream starts with <|endoftext|>");
    tokens[1..].split(|&t| t == EOT).map(decode).collect()
}

#[test]
fn gpt2_ids_match_tiktoken_and_round_trip() {
    // Python: tiktoken.get_encoding("gpt2").encode(...)
    assert_eq!(gpt2_encode("Hello world"), [15496, 995]);
    assert_eq!(gpt2_encode("<|endoftext|>"), [27, 91, 437, 1659, 5239, 91, 29]);
    let text = "Naïve café — 日本語, 'tis 1234 spaces   and\ttabs\r\n\n".repeat(5000);
    let ids = gpt2_encode(&text);
    assert!(ids.iter().all(|&t| t < EOT));
    assert_eq!(decode(&ids), text);
    // Long texts are encoded in parallel chunks; the ids must equal one whole encoding.
    assert_eq!(ids, tiktoken_rs::r50k_base_singleton().encode_ordinary(&text));
}

#[test]
fn eot_before_each_document_and_directories_in_sorted_order() {
    let dir = TempDir::new("tok-eot");
    write(&dir, "in/b.txt", b"Hello world");
    write(&dir, "in/a.txt", b"Hello");
    write(&dir, "in/sub/c.md", b" world");
    write(&dir, "in/.hidden.txt", b"hidden");
    write(&dir, "in/.git/d.txt", b"hidden too");
    write(&dir, "in/notes.json", b"{}");
    write(&dir, "in/empty.txt", b"");
    let out = dir.path("out");
    tokenize(&[dir.path("in").to_str().unwrap(), "--out", out.to_str().unwrap(), "--val-fraction", "0"]);
    // a.txt, b.txt, sub/c.md; empty.txt is skipped.
    assert_eq!(read_split(&out, "train", 50257), [EOT, 15496, EOT, 15496, 995, EOT, 995]);
    assert!(read_split(&out, "val", 50257).is_empty());
    let m = meta(&out);
    assert_eq!(m["tokenizer"], "gpt2");
    assert_eq!(m["vocab_size"], 50257);
    assert_eq!(m["eot_token"], EOT);
    assert_eq!(m["documents"]["train"], 3);
    assert_eq!(m["tokens"]["train"], 7);
    assert_eq!(m["shards"]["train"], serde_json::json!(["train_000000.bin"]));
    assert_eq!(m["skipped_empty_documents"], 1);
}

#[test]
fn bytes_tokenizer_joins_documents_with_a_blank_line() {
    let dir = TempDir::new("tok-bytes");
    let one = write(&dir, "one.txt", b"ab\xff");
    let two = write(&dir, "two.txt", b"c");
    let out = dir.path("out");
    let out_s = out.to_str().unwrap();
    tokenize(&[&one, &two, "--out", out_s, "--tokenizer", "bytes", "--val-fraction", "0"]);
    assert_eq!(read_split(&out, "train", 256), [b'a', b'b', 0xff, b'\n', b'\n', b'c'].map(u32::from));
    assert_eq!(meta(&out)["eot_token"], serde_json::Value::Null);
    // One file comes out as exactly its bytes.
    tokenize(&[&one, "--out", out_s, "--tokenizer", "bytes", "--force"]);
    assert_eq!(read_split(&out, "train", 256), [b'a', b'b', 0xff].map(u32::from));
}

#[test]
fn jsonl_takes_the_field_and_skips_blank_lines() {
    let dir = TempDir::new("tok-jsonl");
    let jsonl = write(
        &dir,
        "docs.jsonl",
        b"{\"text\": \"Hello\", \"body\": \"Hello world\"}\n\n{\"body\": \"<|endoftext|>\", \"id\": 2}\r\n",
    );
    let out = dir.path("out");
    tokenize(&[&jsonl, "--out", out.to_str().unwrap(), "--field", "body", "--val-fraction", "0"]);
    let tokens = read_split(&out, "train", 50257);
    // A literal "<|endoftext|>" in a document is text, not the special token.
    assert_eq!(tokens, [EOT, 15496, 995, EOT, 27, 91, 437, 1659, 5239, 91, 29]);
    assert_eq!(documents(&tokens), ["Hello world", "<|endoftext|>"]);

    // --jsonl reads a file of any name as JSONL; a byte-order mark is dropped.
    let renamed = write(&dir, "docs.data", b"\xef\xbb\xbf{\"text\": \"Hello\"}\n");
    tokenize(&[&renamed, "--out", out.to_str().unwrap(), "--jsonl", "--force"]);
    assert_eq!(read_split(&out, "train", 50257), [EOT, 15496]);
}

#[test]
fn shards_split_at_shard_tokens_and_concatenate_to_the_whole() {
    let dir = TempDir::new("tok-shards");
    let lines: Vec<String> = (0..30).map(|i| format!("{{\"text\": \"Document number {i} says hello.\"}}")).collect();
    let jsonl = write(&dir, "docs.jsonl", lines.join("\n").as_bytes());
    let whole = dir.path("whole");
    tokenize(&[&jsonl, "--out", whole.to_str().unwrap(), "--val-fraction", "0"]);
    let sharded = dir.path("sharded");
    tokenize(&[&jsonl, "--out", sharded.to_str().unwrap(), "--val-fraction", "0", "--shard-tokens", "7"]);

    let all = read_split(&whole, "train", 50257);
    let count = all.len();
    let shards = meta(&sharded)["shards"]["train"].as_array().unwrap().len();
    assert_eq!(shards, count.div_ceil(7));
    for i in 0..shards {
        let path = sharded.join(format!("train_{i:06}.bin"));
        let stream = TokenStream::open(path.to_str().unwrap(), "--data", DataFormat::Llmc, 50257).unwrap();
        let expected = if i + 1 < shards { 7 } else { count - 7 * (shards - 1) };
        assert_eq!(stream.len(), expected, "shard {i}");
    }
    assert_eq!(read_split(&sharded, "train", 50257), all);
    assert_eq!(documents(&all).len(), 30);
}

#[test]
fn val_split_takes_whole_documents_by_a_fixed_rule() {
    assert_eq!((0..1000).filter(|&i| goes_to_val(i, 0.01)).count(), 10);
    assert_eq!((0..1000).filter(|&i| goes_to_val(i, 0.1)).count(), 100);
    assert_eq!((0..8).filter(|&i| goes_to_val(i, 0.25)).collect::<Vec<_>>(), [3, 7]);
    assert!(!goes_to_val(0, 0.99) && (0..100).all(|i| !goes_to_val(i, 0.0)));

    let dir = TempDir::new("tok-val");
    let docs: Vec<String> = (0..20).map(|i| format!("Document {i}: {}", "lorem ipsum ".repeat(i))).collect();
    let lines: Vec<String> = docs.iter().map(|d| serde_json::json!({ "text": d }).to_string()).collect();
    let jsonl = write(&dir, "docs.jsonl", lines.join("\n").as_bytes());
    let mut outputs = Vec::new();
    for name in ["a", "b"] {
        let out = dir.path(name);
        tokenize(&[&jsonl, "--out", out.to_str().unwrap(), "--val-fraction", "0.25", "--shard-tokens", "10"]);
        let (train, val) = (read_split(&out, "train", 50257), read_split(&out, "val", 50257));
        let want_val: Vec<String> = [3, 7, 11, 15, 19].iter().map(|&i| docs[i].clone()).collect();
        let want_train: Vec<String> =
            docs.iter().enumerate().filter(|(i, _)| (i + 1) % 4 != 0).map(|(_, d)| d.clone()).collect();
        assert_eq!(documents(&val), want_val);
        assert_eq!(documents(&train), want_train);
        let m = meta(&out);
        assert_eq!((m["documents"]["train"].as_u64(), m["documents"]["val"].as_u64()), (Some(15), Some(5)));
        assert_eq!(m["tokens"]["val"].as_u64(), Some(val.len() as u64));
        outputs.push(dir_bytes(&out));
    }
    assert_eq!(outputs[0], outputs[1]);
}

/// Every file of a directory, by name.
fn dir_bytes(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .map(|e| (e.file_name().to_string_lossy().into_owned(), std::fs::read(e.path()).unwrap()))
        .collect();
    files.sort();
    files
}

#[test]
fn output_is_the_same_on_one_and_two_threads() {
    let dir = TempDir::new("tok-threads");
    // One document large enough to be encoded in parallel chunks, and many small ones.
    let big = "It is a truth universally acknowledged, that a single man in possession of a good fortune,\n\
               must be in want of a wife. 1813 — Austen's café.\n\n"
        .repeat(1500);
    write(&dir, "in/big.txt", big.as_bytes());
    let lines: Vec<String> = (0..400)
        .map(|i| serde_json::json!({ "text": format!("small document {i} {}", "x".repeat(i % 37)) }).to_string())
        .collect();
    write(&dir, "in/small.jsonl", lines.join("\n").as_bytes());
    let input = dir.path("in");
    let mut outputs = Vec::new();
    for threads in [1, 2] {
        let out = dir.path(&format!("out{threads}"));
        let args = parse(&[input.to_str().unwrap(), "--out", out.to_str().unwrap(), "--shard-tokens", "10000"]);
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| run(args)).unwrap();
        outputs.push(dir_bytes(&out));
    }
    assert!(outputs[0].len() > 3, "several shards and meta.json");
    assert_eq!(outputs[0], outputs[1]);
    // --threads gives the same bytes too.
    let out = dir.path("out-flag");
    tokenize(&[input.to_str().unwrap(), "--out", out.to_str().unwrap(), "--shard-tokens", "10000", "--threads", "2"]);
    assert_eq!(dir_bytes(&out), outputs[0]);
}

/// Runs with `flags` and asserts one error line containing each of `wants`.
fn fails_with(flags: &[&str], wants: &[&str]) {
    let err = format!("{:#}", run(parse(flags)).expect_err("should fail"));
    assert_eq!(err.lines().count(), 1, "not one line: {err}");
    for w in wants {
        assert!(err.contains(w), "{err:?} lacks {w:?}");
    }
}

#[test]
fn every_error_is_one_line_naming_the_file_or_flag() {
    let dir = TempDir::new("tok-errors");
    let out = dir.path("out");
    let out = out.to_str().unwrap();
    let good = write(&dir, "good.txt", b"Hello world");

    fails_with(&["--out", out], &["no inputs"]);
    fails_with(&["missing.txt", "--out", out], &["missing.txt", "no such file"]);
    write(&dir, "nothing/.hidden.txt", b"x");
    write(&dir, "nothing/data.csv", b"x");
    fails_with(&[dir.path("nothing").to_str().unwrap(), "--out", out], &["nothing", "no .txt, .md, .jsonl or .ndjson"]);
    let latin1 = write(&dir, "latin1.txt", b"caf\xe9 au lait");
    fails_with(&[&latin1, "--out", out], &["latin1.txt", "UTF-8", "byte offset 3"]);

    let jsonl =
        write(&dir, "bad.jsonl", b"{\"text\": \"fine\"}\n{\"text\": oops}\n{\"body\": \"x\"}\n[1]\n{\"text\": 5}\n");
    fails_with(&[&jsonl, "--out", out], &["bad.jsonl:2", "not valid JSON", "--skip-bad-lines"]);
    let missing = write(&dir, "missing_field.jsonl", b"{\"body\": \"x\"}\n");
    fails_with(&[&missing, "--out", out], &["missing_field.jsonl:1", "no \"text\" field", "--field"]);
    let number = write(&dir, "number.jsonl", b"{\"text\": 5}\n");
    fails_with(&[&number, "--out", out], &["number.jsonl:1", "\"text\"", "a number, expected a string"]);
    // --skip-bad-lines counts them instead.
    tokenize(&[&jsonl, "--out", out, "--skip-bad-lines"]);
    assert_eq!(meta(Path::new(out))["skipped_bad_lines"], 4);
    assert_eq!(documents(&read_split(Path::new(out), "train", 50257)), ["fine"]);

    fails_with(&[&good, "--out", &good], &["--out", "good.txt", "is a file"]);
    fails_with(&[&good, "--out", out, "--shard-tokens", "0"], &["--shard-tokens"]);
    fails_with(&[&good, "--out", out, "--threads", "100000000"], &["--threads must be at most 1024"]);
    for f in ["1", "1.5", "-0.1", "NaN"] {
        fails_with(&[&good, "--out", out, "--force", &format!("--val-fraction={f}")], &["--val-fraction", "[0, 1)"]);
    }
    let empty = write(&dir, "empty.txt", b"");
    fails_with(&[&empty, "--out", out, "--force"], &["empty.txt", "no text to tokenize"]);
    let blank = write(&dir, "blank.jsonl", b"\n  \n");
    fails_with(&[&blank, "--out", out, "--force"], &["blank.jsonl", "no text to tokenize"]);
    // An earlier run's output is kept unless --force.
    fails_with(&[&good, "--out", out], &["--out", "already holds", "--force"]);
    tokenize(&[&good, "--out", out, "--force"]);
}

#[test]
fn a_failed_run_leaves_the_output_directory_as_it_was() {
    let dir = TempDir::new("tok-cleanup");
    let out = dir.path("out");
    let out_s = out.to_str().unwrap();
    let good = write(&dir, "good.txt", b"Hello world");
    tokenize(&[&good, "--out", out_s, "--shard-tokens", "1"]);
    let before = dir_bytes(&out);
    assert_eq!(before.len(), 4, "3 shards and meta.json");

    let mut text = String::new();
    for i in 0..200 {
        text.push_str(&format!("{{\"text\": \"document {i}\"}}\n"));
    }
    text.push_str("not json\n");
    let jsonl = write(&dir, "late_error.jsonl", text.as_bytes());
    fails_with(&[&jsonl, "--out", out_s, "--shard-tokens", "3", "--force"], &["late_error.jsonl:201"]);
    assert_eq!(dir_bytes(&out), before);
    // A successful --force run replaces the earlier output, shards it does not rewrite included.
    tokenize(&[&good, "--out", out_s, "--force"]);
    let names: Vec<String> = dir_bytes(&out).into_iter().map(|(name, _)| name).collect();
    assert_eq!(names, ["meta.json", "train_000000.bin"]);
}
