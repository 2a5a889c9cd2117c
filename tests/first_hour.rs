//! A user's first hour on their own corpus (issue 16): nothing trains the wrong model or loses a
//! run without a word, and the tool says what to do next. Each test is one of the paths a new
//! user took, run through the real binary.

mod common;

use common::{assert_one_line_error, finch, step_lines, text, tokens, TempDir, TINY_MODEL};
use finch::formats::tokens::write_llmc_u16;
use std::path::Path;

/// A small JSONL dump of "posts": `n` objects with the text under "body".
fn posts(dir: &TempDir, name: &str, n: usize) -> String {
    let words = ["the", "cat", "sat", "on", "a", "mat", "today", "I", "saw", "rain", "and", "sun"];
    let lines: Vec<String> = (0..n)
        .map(|i| {
            let body: Vec<&str> = (0..5 + i % 7).map(|j| words[(i * 7 + j * 3) % words.len()]).collect();
            format!("{{\"id\": {i}, \"body\": \"{}\"}}", body.join(" "))
        })
        .collect();
    let path = dir.path(name);
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    path.to_str().unwrap().to_string()
}

/// A few kB of plain English, one document.
fn prose(dir: &TempDir, name: &str) -> String {
    let text = "It was a bright cold day in April, and the clocks were striking thirteen. ".repeat(60);
    let path = dir.path(name);
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_string()
}

/// `train.bin` in `dir`: `n` random token ids below 50.
fn token_file(dir: &TempDir, n: usize, seed: u64) -> std::path::PathBuf {
    let path = dir.path("train.bin");
    write_llmc_u16(&path, &tokens(n, 50, seed)).unwrap();
    path
}

fn run_ok(args: &[&str]) -> (String, String) {
    let out = finch(args);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "finch {}: {stderr}", args.join(" "));
    assert!(!stderr.contains("panicked"), "{stderr}");
    (stdout, stderr)
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

const SMALL: [&str; 8] = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--context-length", "16"];

/// Item 1: byte tokens train a 256-vocabulary model without --vocab-size (meta.json says so), the
/// saved model records its tokenizer, and a contradicting --vocab-size or model is refused naming
/// both values; without meta.json, ids far below the vocabulary get a warning.
#[test]
fn the_vocabulary_and_tokenizer_come_from_the_data() {
    let dir = TempDir::new("vocab");
    let (corpus, data, run) = (prose(&dir, "book.txt"), dir.path("data"), dir.path("run"));
    let (d, r) = (data.to_str().unwrap(), run.to_str().unwrap());
    run_ok(&["tokenize", &corpus, "--tokenizer", "bytes", "--out", d]);
    let shards = format!("{d}/train_*.bin");
    let (stdout, _) = run_ok(
        &["train", "--device", "cpu", "--data", &shards, "--steps", "2", "--batch-size", "2", "--out", r]
            .iter()
            .chain(SMALL.iter())
            .copied()
            .collect::<Vec<_>>(),
    );
    assert!(stdout.contains("vocab 256 padded to 256"), "{stdout}");
    let config = json(&run.join("model/config.json"));
    assert_eq!(config["vocab_size"], 256);
    assert_eq!(config["finch_tokenizer"], "bytes");
    let mode =
        |f: &str| std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(run.join(f)).unwrap().permissions());
    assert_eq!(mode("model/model.safetensors") & 0o777, mode("model/config.json") & 0o777, "exported files differ");
    assert_eq!(mode("model/model.safetensors") & 0o044, 0o044, "the model is not readable by others");

    let mut wrong: Vec<&str> =
        vec!["train", "--device", "cpu", "--data", &shards, "--steps", "1", "--vocab-size", "50257"];
    wrong.extend(SMALL);
    assert_one_line_error(&finch(&wrong), &["--vocab-size 50257 does not match the data", "bytes (vocabulary 256)"]);
    let gpt2_tokens = ["--tokenizer", "gpt2"];
    let mut wrong: Vec<&str> = vec!["train", "--device", "cpu", "--data", &shards, "--steps", "1"];
    wrong.extend(SMALL.iter().chain(&gpt2_tokens));
    assert_one_line_error(&finch(&wrong), &["--tokenizer gpt2 does not match the data", "bytes"]);

    // A model trained on GPT-2 tokens cannot start on byte tokens.
    let (posts_file, gdata, grun) = (posts(&dir, "posts.jsonl", 300), dir.path("gdata"), dir.path("grun"));
    run_ok(&["tokenize", &posts_file, "--field", "body", "--out", gdata.to_str().unwrap()]);
    let gshards = format!("{}/train_*.bin", gdata.display());
    let mut args: Vec<&str> = vec!["train", "--device", "cpu", "--data", &gshards, "--steps", "1", "--batch-size", "1"];
    args.extend(SMALL.iter().chain(&["--out", grun.to_str().unwrap()]));
    run_ok(&args);
    let init = grun.to_str().unwrap();
    assert_one_line_error(
        &finch(&["train", "--device", "cpu", "--data", &shards, "--init", init, "--steps", "1", "--seq-len", "4"]),
        &["has vocabulary 50257, but", "bytes (vocabulary 256)", "tokenize the data with the model's tokenizer"],
    );

    // Without meta.json: byte-sized ids in a GPT-2-sized model get a warning.
    let bare = dir.path("bare.bin");
    write_llmc_u16(&bare, &tokens(500, 200, 1)).unwrap();
    let (_, stderr) = run_ok(&[
        "train",
        "--device",
        "cpu",
        "--data",
        bare.to_str().unwrap(),
        "--steps",
        "1",
        "--batch-size",
        "1",
        "--n-layer",
        "1",
        "--n-head",
        "1",
        "--n-embd",
        "8",
        "--context-length",
        "8",
    ]);
    assert!(
        stderr.contains("the largest token id in --data is 199, far below the model's vocabulary of 50257"),
        "{stderr}"
    );
    assert!(stderr.contains("--vocab-size 256"), "{stderr}");
}

/// Item 2: a run checkpoints by time by default, so kill -9 loses minutes, not the run; a resume
/// with no checkpoint refuses to restart silently; --restart does it on purpose.
#[test]
fn runs_checkpoint_by_time_and_a_resume_never_restarts_silently() {
    let dir = TempDir::new("cadence");
    let data = token_file(&dir, 20_000, 2);
    let (d, run) = (data.to_str().unwrap(), dir.path("run"));
    let r = run.to_str().unwrap();
    // --checkpoint-minutes is 10 unless given; a tiny value makes the time-based checkpoint
    // observable: the run is killed long before its last step, yet has a checkpoint.
    let mut args: Vec<&str> = vec!["train", "--device", "cpu", "--data", d, "--steps", "100000", "--batch-size", "2"];
    args.extend(TINY_MODEL.iter().chain(&["--checkpoint-minutes", "0.002", "--out", r]));
    let mut child = std::process::Command::new(common::finch_bin())
        .args(&args)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !run.join("checkpoint.safetensors").exists() {
        assert!(std::time::Instant::now() < deadline, "no checkpoint by time");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    std::thread::sleep(std::time::Duration::from_millis(200));
    child.kill().unwrap();
    child.wait().unwrap();
    let out = finch(&["train", "--resume", r, "--steps", "3"]);
    let stdout = text(&out.stdout);
    // Either the checkpoint is past step 3 (nothing to do) or the run continues from it.
    assert!(
        stdout.contains("resuming after step") || text(&out.stderr).contains("already completed"),
        "{stdout}{}",
        text(&out.stderr)
    );

    let help = text(&finch(&["train", "--help"]).stdout);
    assert!(help.contains("--checkpoint-minutes <M>") && help.contains("[default: 10]"), "{help}");

    // Killed before its first checkpoint: --resume says so and asks for --restart.
    let early = dir.path("early");
    std::fs::create_dir_all(&early).unwrap();
    let flags = serde_json::json!({"data": d, "device": "cpu", "steps": 2, "batch_size": 2, "n_layer": 1, "n_head": 2,
        "n_embd": 8, "vocab_size": 50, "context_length": 8, "out": early});
    std::fs::write(early.join("train_args.json"), flags.to_string()).unwrap();
    let e = early.to_str().unwrap();
    assert_one_line_error(
        &finch(&["train", "--resume", e]),
        &["--resume", "no checkpoint yet", "pass --restart to start it again from step 1"],
    );
    let (stdout, _) = run_ok(&["train", "--resume", e, "--restart"]);
    assert!(stdout.contains("done: 2 steps"), "{stdout}");
    let log = std::fs::read_to_string(early.join("log.jsonl")).unwrap();
    assert!(log.contains("\"event\":\"start\""), "a restart begins a fresh log: {log}");
}

/// Item 3: text or JSON given as token data is recognised, with the command that fixes it, also
/// under --data-format raw-u16 (whose byte pairs would otherwise read as token ids).
#[test]
fn text_and_json_given_as_tokens_say_to_tokenize_first() {
    let dir = TempDir::new("textdata");
    let book = prose(&dir, "book.txt");
    let base = ["train", "--device", "cpu", "--steps", "1", "--data"];
    let with = |file: &str, extra: &[&str]| -> Vec<String> {
        base.iter().chain(&[file]).chain(extra).map(|s| s.to_string()).collect()
    };
    let run = |args: Vec<String>| finch(&args.iter().map(|s| s.as_str()).collect::<Vec<_>>());
    let want = format!("finch tokenize {book} --out DIR");
    assert_one_line_error(&run(with(&book, &[])), &["book.txt: this is text, not tokens", &want]);
    assert_one_line_error(&run(with(&book, &["--data-format", "raw-u16"])), &["this is text, not tokens"]);
    let dump = posts(&dir, "dump.jsonl", 20);
    assert_one_line_error(&run(with(&dump, &[])), &["dump.jsonl: this is JSON, not tokens", "--field FIELD"]);
}

/// Item 4: JSONL is JSONL whatever the file is called, and --field says so.
#[test]
fn jsonl_is_recognised_by_field_and_by_ndjson_and_json_names() {
    let dir = TempDir::new("jsonl");
    let dump = posts(&dir, "dump.jsonl", 200);
    let count = |out: &Path| json(&out.join("meta.json"))["documents"]["train"].as_u64().unwrap();
    // From stdin with --field (no --jsonl).
    let stdin_out = dir.path("stdin");
    let out = std::process::Command::new(common::finch_bin())
        .args(["tokenize", "-", "--field", "body", "--val-fraction", "0", "--out", stdin_out.to_str().unwrap()])
        .stdin(std::fs::File::open(&dump).unwrap())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(count(&stdin_out), 200);
    // .ndjson and .json files, and a directory holding only .ndjson.
    for name in ["posts.ndjson", "posts.json", "nd/only.ndjson"] {
        let path = dir.path(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::copy(&dump, &path).unwrap();
        let input = if name.starts_with("nd/") { dir.path("nd") } else { path };
        let out = dir.path(&format!("out-{}", name.replace('/', "-")));
        let o = out.to_str().unwrap();
        run_ok(&["tokenize", input.to_str().unwrap(), "--field", "body", "--val-fraction", "0", "--out", o]);
        assert_eq!(count(&out), 200, "{name}");
    }
    // --field where no input is JSONL is refused; a JSON array is named as such.
    let txt = dir.path("texts");
    std::fs::create_dir_all(&txt).unwrap();
    std::fs::write(txt.join("a.txt"), "some words here").unwrap();
    assert_one_line_error(
        &finch(&["tokenize", txt.to_str().unwrap(), "--field", "body", "--out", dir.path("o1").to_str().unwrap()]),
        &["--field body: none of the inputs is JSONL"],
    );
    let array = dir.path("array.json");
    std::fs::write(&array, "[\n  {\"body\": \"a b\"}\n]\n").unwrap();
    assert_one_line_error(
        &finch(&["tokenize", array.to_str().unwrap(), "--out", dir.path("o2").to_str().unwrap()]),
        &["array.json:1: a JSON array, not JSON lines"],
    );
}

/// Item 5: sample refuses a tokenizer that is not the model's, in both directions.
#[test]
fn sample_refuses_a_tokenizer_that_is_not_the_models() {
    let dir = TempDir::new("sampletok");
    let data = token_file(&dir, 2_000, 3);
    let model = dir.path("model");
    let mut args = vec!["train", "--device", "cpu", "--data", data.to_str().unwrap(), "--steps", "1"];
    args.extend(["--n-layer", "1", "--n-head", "1", "--n-embd", "8", "--context-length", "8", "--batch-size", "1"]);
    args.extend(["--save", model.to_str().unwrap()]);
    run_ok(&args); // GPT-2's vocabulary: recorded as gpt2
    let m = model.to_str().unwrap();
    assert_eq!(json(&model.join("config.json"))["finch_tokenizer"], "gpt2");
    assert_one_line_error(
        &finch(&["sample", "--model", m, "--tokenizer", "bytes", "--device", "cpu"]),
        &["--tokenizer bytes", "was trained on gpt2 tokens"],
    );
    // Without a recorded tokenizer, a vocabulary far from the tokenizer's is refused.
    let mut config = json(&model.join("config.json"));
    config.as_object_mut().unwrap().remove("finch_tokenizer");
    std::fs::write(model.join("config.json"), config.to_string()).unwrap();
    assert_one_line_error(
        &finch(&["sample", "--model", m, "--tokenizer", "bytes", "--device", "cpu"]),
        &["--tokenizer bytes: its vocabulary of 256 does not match the model's 50257"],
    );
}

/// Item 6: a validation set smaller than a batch is evaluated as what it holds; repeated windows
/// are not evaluated twice; one text file gets the last fraction of its tokens as validation.
#[test]
fn small_validation_sets_are_evaluated_and_one_file_gets_a_tail_split() {
    let dir = TempDir::new("val");
    let (book, data) = (prose(&dir, "book.txt"), dir.path("data"));
    let d = data.to_str().unwrap();
    let (stdout, _) = run_ok(&["tokenize", &book, "--tokenizer", "bytes", "--val-fraction", "0.05", "--out", d]);
    assert!(stdout.contains("validation: the last 0.05 of the tokens"), "{stdout}");
    let meta = json(&data.join("meta.json"));
    assert_eq!(meta["val_split"], "tail");
    let (train_n, val_n) = (meta["tokens"]["train"].as_u64().unwrap(), meta["tokens"]["val"].as_u64().unwrap());
    assert_eq!(train_n + val_n, std::fs::metadata(&book).unwrap().len(), "every byte is in one split");
    assert_eq!(val_n, ((train_n + val_n) as f64 * 0.05).floor() as u64);
    // The tail is the end of the book, byte for byte.
    let val_bytes = std::fs::read(data.join("val_000000.bin")).unwrap();
    let tail: Vec<u8> = val_bytes[1024..].chunks(2).map(|c| c[0]).collect();
    assert!(std::fs::read(&book).unwrap().ends_with(&tail));

    // --batch-size 8 × --seq-len 16 is 128 tokens: the val split (222) holds one batch, not 20.
    let (shards, vals, run) = (format!("{d}/train_*.bin"), format!("{d}/val_*.bin"), dir.path("run"));
    let mut args = vec!["train", "--device", "cpu", "--data", &shards, "--val", &vals, "--steps", "2"];
    args.extend(SMALL.iter().chain(&["--batch-size", "8", "--out", run.to_str().unwrap()]));
    let (stdout, _) = run_ok(&args);
    assert!(stdout.contains("holds 1 batch of 8×16 tokens: each validation evaluates those, not the 20"), "{stdout}");
    // --batch-size 64: less than one batch; evaluated as 13 sequences of 16.
    let run2 = dir.path("run2");
    let mut args = vec!["train", "--device", "cpu", "--data", &shards, "--val", &vals, "--steps", "1"];
    args.extend(SMALL.iter().chain(&["--batch-size", "64", "--out", run2.to_str().unwrap()]));
    let (stdout, _) = run_ok(&args);
    let rows = (val_n - 1) / 16;
    let want = format!("less than one batch of 64×16: each validation evaluates {rows} sequences of 16 tokens");
    assert!(stdout.contains(&want), "{stdout}");
    let last = step_lines(&run2.join("log.jsonl")).pop().unwrap();
    assert!(last["val_loss"].as_f64().unwrap().is_finite());
}

/// Item 7: plain output shows elapsed time and an estimate, a line every --print-every steps,
/// and a summary with the commands to run next.
#[test]
fn progress_lines_have_times_and_a_run_ends_with_a_summary() {
    let dir = TempDir::new("times");
    let data = token_file(&dir, 5_000, 4);
    let run = dir.path("run");
    let mut args =
        vec!["train", "--device", "cpu", "--data", data.to_str().unwrap(), "--steps", "12", "--batch-size", "2"];
    args.extend(TINY_MODEL.iter().chain(&["--print-every", "5", "--out", run.to_str().unwrap()]));
    let (stdout, _) = run_ok(&args);
    let steps: Vec<&str> = stdout.lines().filter(|l| l.starts_with("step ")).collect();
    let numbers: Vec<&str> = steps.iter().map(|l| l[5..].trim_start().split('/').next().unwrap()).collect();
    assert_eq!(numbers, ["1", "5", "10", "12"], "{stdout}");
    assert!(steps.iter().all(|l| l.contains(" elapsed, ") && l.ends_with(" left")), "{stdout}");
    assert_eq!(step_lines(&run.join("log.jsonl")).len(), 12, "the log keeps every step");
    assert!(stdout.contains("done: 12 steps in "), "{stdout}");
    let r = run.display();
    assert!(stdout.contains(&format!(" sample --model {r}")) && stdout.contains(&format!(" plot {r}")), "{stdout}");
    // The binary is not on PATH in a test: the next commands name it by a path that runs it.
    let sample = stdout.lines().find(|l| l.contains(" sample --model ")).unwrap();
    let command = sample.split_whitespace().next().unwrap();
    assert!(command != "finch" && Path::new(command).is_file(), "{sample}");
}

/// Item 8: a run directory works wherever a model directory does, a run without a model yet
/// is sampled from its checkpoint, and a missing directory is named as such.
#[test]
fn run_directories_are_models_everywhere() {
    let dir = TempDir::new("rundirs");
    let data = token_file(&dir, 5_000, 5);
    let (d, run) = (data.to_str().unwrap(), dir.path("run"));
    let r = run.to_str().unwrap();
    // GPT-2's vocabulary (the ids are below 50): a model `sample` can decode.
    let mut args = vec!["train", "--device", "cpu", "--data", d, "--steps", "2", "--batch-size", "2"];
    args.extend(["--n-layer", "1", "--n-head", "2", "--n-embd", "8", "--context-length", "8", "--out", r]);
    run_ok(&args);
    let (stdout, _) =
        run_ok(&["train", "--device", "cpu", "--data", d, "--init", r, "--steps", "1", "--batch-size", "1"]);
    assert!(stdout.contains(&format!("from {r}/model")), "{stdout}");
    // Without model/ (as after a kill): sampled from, and started from, its checkpoint.
    std::fs::remove_dir_all(run.join("model")).unwrap();
    let out = finch(&["sample", "--model", r, "--max-new-tokens", "3", "--device", "cpu"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("note: sampling from") && text(&out.stderr).contains("the checkpoint of step 2")
    );
    let (stdout, _) =
        run_ok(&["train", "--device", "cpu", "--data", d, "--init", r, "--steps", "1", "--batch-size", "1"]);
    assert!(stdout.contains("(the checkpoint of step 2; the run has not finished)"), "{stdout}");
    let missing = dir.path("nope");
    assert_one_line_error(
        &finch(&["sample", "--model", missing.to_str().unwrap()]),
        &[&format!("--model {}: no such directory", missing.display())],
    );
}

/// Item 9: extending a finished cosine run says what the schedule does, --new-schedule starts a
/// new one, every resume is an event in the log, and a finished run's resume errs before any
/// start-up line.
#[test]
fn extending_a_run_says_what_the_schedule_does_and_is_logged() {
    let dir = TempDir::new("extend");
    let data = token_file(&dir, 5_000, 6);
    let run = dir.path("run");
    let r = run.to_str().unwrap();
    let mut args =
        vec!["train", "--device", "cpu", "--data", data.to_str().unwrap(), "--steps", "4", "--batch-size", "2"];
    args.extend(TINY_MODEL.iter().chain(&["--out", r]));
    run_ok(&args);
    let out = finch(&["train", "--resume", r]);
    assert_one_line_error(&out, &["already completed 4 of 4 steps"]);
    assert_eq!(text(&out.stdout), "", "start-up lines before the error");

    let (stdout, _) = run_ok(&["train", "--resume", r, "--steps", "6"]);
    assert!(stdout.contains("the cosine schedule of steps 1–4 now stretches to step 6"), "{stdout}");
    assert!(stdout.contains("pass --new-schedule"), "{stdout}");
    let (stdout, _) = run_ok(&["train", "--resume", r, "--steps", "9", "--new-schedule"]);
    // Steps 7–9 are steps 1–3 of a new cosine decay from the peak: 6e-4 · (1 + cos(π/3)) / 2.
    assert!(stdout.contains("a new cosine schedule over steps 7–9: 4.50e-4 at step 7, 0.00e0 at 9"), "{stdout}");
    let lr7 = step_lines(&run.join("log.jsonl"))[6]["lr"].as_f64().unwrap();
    assert!((lr7 - 4.5e-4).abs() < 1e-12, "{lr7}");
    let events: Vec<serde_json::Value> = std::fs::read_to_string(run.join("log.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["event"] == "resume")
        .collect();
    assert_eq!(events.len(), 2, "{events:?}");
    assert_eq!((events[0]["at_step"].as_u64(), events[0]["flags"]["steps"].as_u64()), (Some(4), Some(6)));
    assert_eq!(events[1]["new_schedule"], true);
    // The schedule's start is kept: resuming again continues the new schedule.
    assert_eq!(json(&run.join("train_args.json"))["schedule_start"], 6);
}

/// Item 10: a failed start leaves nothing behind; CPU runs say "no GPU found" and nothing more;
/// every flag has help; counts are pluralised.
#[test]
fn failed_starts_leave_nothing_and_messages_are_short() {
    let dir = TempDir::new("polish");
    let run = dir.path("run");
    let missing = dir.path("missing.bin");
    let mut args =
        vec!["train", "--device", "cpu", "--data", missing.to_str().unwrap(), "--out", run.to_str().unwrap()];
    args.extend(TINY_MODEL);
    assert!(!finch(&args).status.success());
    assert!(!run.exists(), "a failed start left {}", run.display());
    // In a directory that was there before, only its own files stay.
    std::fs::create_dir_all(&run).unwrap();
    std::fs::write(run.join("notes.txt"), "mine").unwrap();
    assert!(!finch(&args).status.success());
    let left: Vec<String> =
        std::fs::read_dir(&run).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(left, ["notes.txt"]);

    let data = token_file(&dir, 2_000, 7);
    let mut args = vec!["train", "--data", data.to_str().unwrap(), "--steps", "1", "--batch-size", "1"];
    args.extend(["--n-layer", "1", "--n-head", "1", "--n-embd", "8", "--vocab-size", "50", "--context-length", "8"]);
    let (stdout, _) = run_ok(&args);
    assert!(stdout.contains("(GPT-2, 1 layer, 1 head, 8 channels"), "{stdout}");
    if !stdout.contains("device: cuda") {
        assert!(stdout.contains("f32 (no GPU found);"), "{stdout}");
    }

    for command in ["train", "sample", "tokenize", "plot", "check", "bench", "quickstart"] {
        let help = text(&finch(&[command, "--help"]).stdout);
        for line in help.lines().map(str::trim_start).filter(|l| l.starts_with("--")) {
            let described = line.split_once("  ").is_some_and(|(_, rest)| !rest.trim().is_empty());
            let next_line_describes = help.contains(&format!("{line}\n          "));
            assert!(described || next_line_describes, "finch {command} --help: {line:?} has no help");
        }
    }
}

/// The README's walkthrough ("Train on your own text"), run as written by bash on a dump of three
/// thousand posts. Only the model is shrunk and the steps cut (flags appended to `train`, which
/// override the README's), so that it runs in seconds on a CPU.
#[test]
fn the_readme_walkthrough_runs_on_a_few_thousand_posts() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let section = readme.split("## Train on your own text").nth(1).unwrap();
    let block = section.split("```sh\n").nth(1).unwrap().split("```").next().unwrap();
    assert!(block.contains("finch tokenize posts.jsonl --field body") && block.contains("--model gpt2"), "{block}");
    let dir = TempDir::new("walkthrough");
    posts(&dir, "posts.jsonl", 3000);
    let script = format!(
        "set -euo pipefail\nfinch() {{\n  case $1 in\n    train) \"$FINCH\" \"$@\" --device cpu --n-layer 1 --n-head 2 \
         --n-embd 16 --batch-size 1 --seq-len 32 --steps 3;;\n    sample) \"$FINCH\" \"$@\" --max-new-tokens 5;;\n    \
         *) \"$FINCH\" \"$@\";;\n  esac\n}}\n{block}"
    );
    let out = std::process::Command::new("bash")
        .args(["-c", &script])
        .current_dir(&dir.0)
        .env("FINCH", common::finch_bin())
        .output()
        .unwrap();
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("documents: 2970 train, 30 val"), "{stdout}");
    assert!(stdout.contains("vocab 50257 padded to 50304") && stdout.contains("done: 3 steps"), "{stdout}");
    let run = dir.path("runs/posts");
    assert!(run.join("loss.svg").is_file() && run.join("model/config.json").is_file());
    assert!(step_lines(&run.join("log.jsonl")).last().unwrap()["val_loss"].as_f64().is_some());
}
