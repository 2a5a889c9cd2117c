//! Every user mistake gets one line on stderr naming the file or flag, a non-zero exit, and no
//! panic or backtrace.

mod common;

use common::{assert_one_line_error, finch, fixture, text, tokens, TempDir, TINY_MODEL};
use finch::formats::tokens::{llmc_header, write_llmc_u16};

/// Runs `finch train` with a tiny model and asserts it fails with one line containing `wants`.
fn fails_with(extra: &[&str], wants: &[&str]) {
    let mut args = vec!["train", "--device", "cpu", "--steps", "1", "--batch-size", "2", "--seq-len", "4"];
    args.extend_from_slice(&TINY_MODEL);
    args.extend_from_slice(extra);
    assert_one_line_error(&finch(&args), wants);
}

fn write(dir: &TempDir, name: &str, bytes: &[u8]) -> String {
    let path = dir.path(name);
    std::fs::write(&path, bytes).unwrap();
    path.to_str().unwrap().to_string()
}

#[test]
fn token_file_errors_name_the_file_and_the_problem() {
    let dir = TempDir::new("errors");
    let empty = write(&dir, "empty.bin", b"");
    fails_with(&["--data", &empty], &["empty.bin", "empty"]);

    let raw = write(&dir, "train.bin", &[1, 0, 2, 0, 3, 0]);
    fails_with(&["--data", &raw], &["train.bin", "not an llm.c token file", "--data-format raw-u16"]);
    let odd = write(&dir, "odd.bin", &[1, 0, 2]);
    fails_with(&["--data", &odd, "--data-format", "raw-u16"], &["odd.bin", "odd size"]);

    let short_header = write(&dir, "short.bin", &llmc_header(1, 10)[..100]);
    fails_with(&["--data", &short_header], &["short.bin", "truncated", "header"]);

    let mut truncated = llmc_header(1, 100);
    truncated.extend(vec![0u8; 50]);
    let truncated = write(&dir, "trunc.bin", &truncated);
    fails_with(&["--data", &truncated], &["trunc.bin", "truncated", "100 tokens"]);

    let mut long = llmc_header(1, 2);
    long.extend(vec![0u8; 10]);
    let long = write(&dir, "long.bin", &long);
    fails_with(&["--data", &long], &["long.bin", "mismatch", "2 tokens"]);

    let version = write(&dir, "v9.bin", &llmc_header(9, 0));
    fails_with(&["--data", &version], &["v9.bin", "version 9"]);

    let few = dir.path("few.bin");
    write_llmc_u16(&few, &[1, 2, 3, 4, 5]).unwrap();
    fails_with(&["--data", few.to_str().unwrap()], &["few.bin", "5 tokens", "too few", "9 tokens"]);

    let mut ids = tokens(100, 50, 1);
    ids[37] = 50;
    let big = dir.path("big.bin");
    write_llmc_u16(&big, &ids).unwrap();
    fails_with(
        &["--data", big.to_str().unwrap()],
        &["big.bin", "token 37", "byte offset 1098", "id 50", "vocab size is 50"],
    );

    let missing = dir.path("nope.bin");
    fails_with(&["--data", missing.to_str().unwrap()], &["nope.bin", "cannot open"]);
    let pattern = format!("{}/none_*.bin", dir.0.display());
    fails_with(&["--data", &pattern], &["none_*.bin", "no file matches"]);
}

#[test]
fn bad_flag_values_are_refused_by_name() {
    let dir = TempDir::new("flags");
    let data = dir.path("ok.bin");
    write_llmc_u16(&data, &tokens(200, 50, 2)).unwrap();
    let d = data.to_str().unwrap();
    fails_with(&["--data", d, "--batch-size", "0"], &["--batch-size", "at least 1"]);
    fails_with(&["--data", d, "--seq-len", "0"], &["--seq-len", "at least 1"]);
    fails_with(&["--data", d, "--seq-len", "9"], &["--seq-len 9", "context length 8"]);
    fails_with(&["--data", d, "--steps", "0"], &["--steps", "at least 1"]);
    fails_with(&["--data", d, "--grad-accum", "0"], &["--grad-accum"]);
    // Values no one means: refused at once, not an overflow panic or minutes starting threads.
    let huge = u64::MAX.to_string();
    fails_with(&["--data", d, "--grad-accum", &huge], &["--batch-size × --seq-len × --grad-accum is too large"]);
    // A batch whose activation sizes overflow (B·T·per-token values) panicked in the memory check.
    fails_with(
        &["--data", d, "--batch-size", "100000000000000000"],
        &["--batch-size 100000000000000000 × --seq-len 4 is too large: its activations alone exceed any memory"],
    );
    fails_with(&["--data", d, "--threads", "100000000"], &["--threads must be at most 1024, got 100000000"]);
    fails_with(&["--data", d, "--threads", "0"], &["--threads", "at least 1"]);
    fails_with(&["--data", d, "--lr", "-1"], &["--lr"]);
    fails_with(&["--data", d, "--lr", "nan"], &["--lr"]);
    fails_with(&["--data", d, "--beta2", "1"], &["--beta2", "[0, 1)"]);
    fails_with(&["--data", d, "--eps", "0"], &["--eps"]);
    fails_with(&["--data", d, "--device", "tpu"], &["--device tpu", "unknown device"]);
    fails_with(&["--data", d, "--precision", "bf16"], &["--precision bf16", "--device cuda"]);
    // Without a usable GPU, --device cuda says why in one line (with one, it trains).
    if let Err(e) = finch::cuda::Gpu::open() {
        let reason = format!("{e:#}");
        fails_with(&["--data", d, "--device", "cuda"], &["--device cuda", &reason]);
    }
    fails_with(&["--data", d, "--checkpoint-every", "5"], &["--checkpoint-every", "--out"]);
    fails_with(&["--data", d, "--val-every", "5"], &["--val"]);
    fails_with(&["--data", d, "--n-head", "3"], &["n_embd (8)", "multiple of n_head (3)"]);
    fails_with(&["--data", d, "--init", &format!("{}/init", fixture())], &["--init", "--n-layer"]);
    // clap's own messages for values that are not numbers are one line too (plus a usage hint).
    let out = finch(&["train", "--data", d, "--batch-size", "-3"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("--batch-size"));
}

#[test]
fn model_directory_errors_name_the_file() {
    let dir = TempDir::new("init");
    let data = dir.path("ok.bin");
    write_llmc_u16(&data, &tokens(200, 50, 3)).unwrap(); // ids fit both vocabularies used below
    let d = data.to_str().unwrap();
    let run = |init: &std::path::Path, wants: &[&str]| {
        let out = finch(&[
            "train",
            "--data",
            d,
            "--init",
            init.to_str().unwrap(),
            "--steps",
            "1",
            "--batch-size",
            "1",
            "--seq-len",
            "4",
        ]);
        assert_one_line_error(&out, wants);
    };
    let init = dir.path("init");
    run(&init, &["--init", "init: no such directory"]);
    std::fs::create_dir_all(&init).unwrap();
    run(&init, &["--init", "no config.json here: expected a model directory"]);
    std::fs::write(init.join("config.json"), "{not json").unwrap();
    run(&init, &["config.json", "not valid JSON"]);
    std::fs::write(init.join("config.json"), r#"{"n_layer":2,"n_head":4,"n_embd":32,"vocab_size":97}"#).unwrap();
    run(&init, &["config.json", "n_positions"]);
    let good_config = std::fs::read(format!("{}/init/config.json", fixture())).unwrap();
    std::fs::write(init.join("config.json"), &good_config).unwrap();
    std::fs::write(init.join("model.safetensors"), b"garbage").unwrap();
    run(&init, &["model.safetensors", "not a valid safetensors file"]);
    // A model with one layer fewer than config.json says.
    let weights = std::fs::read(format!("{}/init/model.safetensors", fixture())).unwrap();
    std::fs::write(init.join("model.safetensors"), &weights).unwrap();
    let three_layers = String::from_utf8(good_config)
        .unwrap()
        .replace("\"n_layer\": 2", "\"n_layer\": 3")
        .replace("\"n_layer\":2", "\"n_layer\":3");
    std::fs::write(init.join("config.json"), three_layers).unwrap();
    run(&init, &["model.safetensors", "missing tensor \"h.2."]);
    // Token ids must fit the model loaded from --init (vocab 97).
    let small = dir.path("small");
    std::fs::create_dir_all(&small).unwrap();
    std::fs::write(
        small.join("config.json"),
        r#"{"n_layer":2,"n_head":4,"n_embd":32,"vocab_size":50,"n_positions":16}"#,
    )
    .unwrap();
    std::fs::write(small.join("model.safetensors"), &weights).unwrap();
    run(&small, &["model.safetensors", "wte.weight", "[97, 32]", "[50, 32]"]);
}

#[test]
fn a_run_that_cannot_fit_in_memory_is_refused_before_allocating() {
    if !std::path::Path::new("/proc/meminfo").exists() {
        eprintln!("skipped: no /proc/meminfo on this system");
        return;
    }
    let dir = TempDir::new("memory");
    let data = dir.path("big.bin");
    // GPT-2 XL at B=4096, T=1024 needs ~40 TB of activations: more than any machine has.
    write_llmc_u16(&data, &tokens(4096 * 1024 + 1, 50257, 5)).unwrap();
    let out = finch(&[
        "train",
        "--device",
        "cpu",
        "--data",
        data.to_str().unwrap(),
        "--model",
        "gpt2-xl",
        "--batch-size",
        "4096",
        "--seq-len",
        "1024",
        "--steps",
        "1",
    ]);
    assert_one_line_error(&out, &["not enough memory", "--batch-size", "available"]);
}
