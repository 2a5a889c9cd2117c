//! `finch quickstart` end to end (few steps), then `finch sample` on the model it wrote.

mod common;

use common::{assert_one_line_error, finch, text, TempDir};

#[test]
fn quickstart_writes_a_run_that_sample_can_read() {
    let dir = TempDir::new("quickstart");
    let run = dir.path("qs");
    let run_s = run.to_str().unwrap();
    let out = finch(&["quickstart", "--steps", "8", "--device", "cpu", "--out", run_s]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}\n{stdout}", text(&out.stderr));
    for part in ["sample before training", "sample after training", "loss:", "finch sample --model"] {
        assert!(stdout.contains(part), "output lacks {part:?}:\n{stdout}");
    }
    for file in
        ["log.jsonl", "model/config.json", "model/model.safetensors", "loss.svg", "data/train.bin", "data/val.bin"]
    {
        assert!(run.join(file).exists(), "{file} missing");
    }
    // A rerun replaces its own directory; a directory it did not make is refused.
    let again = finch(&["quickstart", "--steps", "2", "--device", "cpu", "--out", run_s]);
    assert!(again.status.success(), "{}", text(&again.stderr));
    let foreign = dir.path("foreign");
    std::fs::create_dir(&foreign).unwrap();
    assert_one_line_error(
        &finch(&["quickstart", "--steps", "2", "--out", foreign.to_str().unwrap()]),
        &["--out", "not made by finch quickstart"],
    );

    // Sampling: deterministic for a seed, streaming the prompt first, greedy works.
    let sample = |extra: &[&str]| {
        let mut args = vec!["sample", "--model", run_s, "--device", "cpu", "--max-new-tokens", "30"];
        args.extend_from_slice(extra);
        finch(&args)
    };
    let (a, b) = (sample(&["--seed", "5", "--prompt", "the "]), sample(&["--seed", "5", "--prompt", "the "]));
    assert!(a.status.success(), "{}", text(&a.stderr));
    assert_eq!(a.stdout, b.stdout);
    assert!(text(&a.stdout).starts_with("the "));
    let greedy = sample(&["--temperature", "0", "--num-samples", "2"]);
    assert!(greedy.status.success(), "{}", text(&greedy.stderr));
    assert!(text(&greedy.stdout).contains("--- sample 2 ---"));

    assert_one_line_error(&sample(&["--top-p", "0"]), &["--top-p"]);
    assert_one_line_error(&sample(&["--temperature", "-1"]), &["--temperature"]);
    assert_one_line_error(&finch(&["sample", "--model", dir.path("nope").to_str().unwrap()]), &["nope"]);
}
