//! `finch quickstart`: zero setup. Builds a small synthetic corpus from code (sentences from a
//! tiny grammar and small-number arithmetic: structured enough that learning shows within a
//! couple of minutes on a laptop CPU), byte-tokenizes it, trains a small GPT on the best device,
//! and shows a sample before and after training, the loss curve and what to try next.

use crate::cli::sample::sample_token;
use crate::cli::train::{self, TrainArgs};
use crate::cpu::infer::Generator;
use crate::formats::tokenizer::{Tokenizer, Utf8Stream};
use crate::formats::tokens::write_llmc_u16;
use crate::model::init::init_params;
use crate::model::rng::Rng;
use anyhow::{bail, Context, Result};
use clap::Parser;
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug, Clone)]
#[command(after_help = "Examples:
  finch quickstart                      # about two minutes on a 2-core CPU
  finch quickstart --steps 2000         # longer, better samples
  finch quickstart --out runs/qs2 --device cpu")]
pub struct QuickstartArgs {
    /// Run directory (replaced if an earlier quickstart made it)
    #[arg(long, value_name = "DIR", default_value = "runs/quickstart")]
    pub out: PathBuf,
    /// Training steps
    #[arg(long, value_name = "N", default_value_t = 400)]
    pub steps: usize,
    /// Where to train: cpu, cuda, or auto
    #[arg(long, default_value = "auto")]
    pub device: String,
    #[arg(long, default_value_t = 1337)]
    pub seed: u64,
}

/// Marks a directory as made by quickstart, so a rerun may replace it.
const MARKER: &str = "quickstart.txt";

const NOUNS: [&str; 12] =
    ["cat", "dog", "bird", "fox", "child", "robot", "king", "farmer", "horse", "wizard", "sailor", "baker"];
const ADJECTIVES: [&str; 8] = ["small", "red", "quiet", "old", "happy", "clever", "brave", "sleepy"];
const VERBS: [&str; 8] = ["sees", "follows", "helps", "finds", "likes", "chases", "greets", "feeds"];
const PLACES: [&str; 6] =
    ["in the garden", "by the river", "on the hill", "near the house", "at the market", "in the forest"];

/// The synthetic corpus: `n` lines, each a grammar sentence or an arithmetic fact, from `seed`.
pub fn synthetic_corpus(n: usize, seed: u64) -> String {
    let mut rng = Rng::new(seed);
    let mut pick = |k: usize| (rng.next_u64() % k as u64) as usize;
    let mut text = String::new();
    for _ in 0..n {
        match pick(3) {
            0 => {
                let (a, b) = (pick(50), pick(50));
                text += &format!("{a} + {b} = {}.\n", a + b);
            }
            _ => {
                let subject = format!("the {} {}", ADJECTIVES[pick(8)], NOUNS[pick(12)]);
                let object = format!("the {}", NOUNS[pick(12)]);
                text += &format!("{subject} {} {object} {}.\n", VERBS[pick(8)], PLACES[pick(6)]);
            }
        }
    }
    text
}

/// `lines` sampled lines, each started afresh after a newline (the corpus's lines are
/// independent), at temperature 0.8; control characters show as '·'.
fn sample_lines(cfg: crate::model::config::GptConfig, params: &[f32], lines: usize, seed: u64) -> Vec<String> {
    let mut g = Generator::new(cfg, params);
    let mut rng = Rng::new(seed);
    (0..lines)
        .map(|_| {
            g.cache.clear();
            let mut logits = g.step(b'\n' as u32);
            let mut bytes = Vec::new();
            while !g.cache.is_full() {
                let t = sample_token(&logits, 0.8, 0, 1.0, &mut rng);
                if t == b'\n' as u32 {
                    break;
                }
                bytes.push(t as u8);
                logits = g.step(t);
            }
            let mut text = Utf8Stream::default();
            let line = text.push(&bytes) + &text.finish();
            line.chars().map(|c| if c.is_control() { '·' } else { c }).collect()
        })
        .collect()
}

fn show_samples(when: &str, lines: &[String]) {
    println!("sample {when} training:");
    for line in lines {
        println!("    {line}");
    }
    println!();
}

fn prepare_dir(dir: &Path) -> Result<()> {
    if dir.exists() {
        if !dir.join(MARKER).exists() {
            bail!(
                "--out {}: the directory exists and was not made by finch quickstart; remove it or choose another --out",
                dir.display()
            );
        }
        std::fs::remove_dir_all(dir).with_context(|| format!("--out {}: cannot remove the old run", dir.display()))?;
    }
    crate::os::files::create_dir(dir, "--out")?;
    std::fs::write(dir.join(MARKER), "made by `finch quickstart`; a rerun replaces this directory\n")
        .with_context(|| format!("--out {}: cannot write", dir.display()))
}

pub fn run(args: QuickstartArgs) -> Result<()> {
    if args.steps == 0 {
        bail!("--steps must be at least 1");
    }
    let dir = &args.out;
    prepare_dir(dir)?;
    let data_dir = dir.join("data");
    crate::os::files::create_dir(&data_dir, "--out")?;
    let (train_text, val_text) = (synthetic_corpus(40_000, args.seed), synthetic_corpus(2_000, args.seed + 1));
    println!("corpus: {} lines of generated sentences and sums, e.g.", 42_000);
    for line in train_text.lines().take(3) {
        println!("    {line}");
    }
    let to_u16 = |text: &str| Tokenizer::Bytes.encode(text).into_iter().map(|t| t as u16).collect::<Vec<u16>>();
    let (train_path, val_path) = (data_dir.join("train.bin"), data_dir.join("val.bin"));
    write_llmc_u16(&train_path, &to_u16(&train_text))?;
    write_llmc_u16(&val_path, &to_u16(&val_text))?;
    println!(
        "tokenized with the byte tokenizer: {} train and {} val tokens in {}\n",
        train_text.len(),
        val_text.len(),
        data_dir.display()
    );

    // A small model: 4 layers, 128 channels, context 64 (0.8M parameters).
    let (layers, heads, channels, context) = ("4", "4", "128", "64");
    let flags: Vec<String> = [
        "train",
        "--data",
        train_path.to_str().context("--out must be valid UTF-8")?,
        "--val",
        val_path.to_str().context("--out must be valid UTF-8")?,
        "--val-every",
        "100",
        "--val-batches",
        "10",
        "--n-layer",
        layers,
        "--n-head",
        heads,
        "--n-embd",
        channels,
        "--vocab-size",
        "256",
        "--context-length",
        context,
        "--batch-size",
        "16",
        "--lr",
        "2e-3",
        "--warmup-steps",
        "30",
        "--min-lr",
        "2e-4",
        "--weight-decay",
        "0.0",
        "--device",
        &args.device,
        "--out",
        dir.to_str().context("--out must be valid UTF-8")?,
    ]
    .iter()
    .map(|s| s.to_string())
    .chain(["--steps".to_string(), args.steps.to_string(), "--seed".to_string(), args.seed.to_string()])
    .collect();

    #[derive(Parser)]
    struct Wrapper {
        #[command(flatten)]
        train: TrainArgs,
    }
    let given: Vec<String> = flags.iter().filter_map(|f| f.strip_prefix("--").map(|f| f.replace('-', "_"))).collect();
    let parsed = Wrapper::try_parse_from(&flags).context("quickstart's training flags")?;
    let cfg = crate::model::config::GptConfig {
        n_layer: 4,
        n_head: 4,
        n_embd: 128,
        vocab_size: 256,
        n_positions: 64,
        layer_norm_epsilon: 1e-5,
    };
    show_samples("before", &sample_lines(cfg, &init_params(&cfg, args.seed), 3, 1));
    train::run(parsed.train, &|id: &str| given.iter().any(|g| g == id))?;

    let model_dir = dir.join("model");
    let trained = crate::formats::huggingface::load_params(&model_dir, &cfg)?;
    println!();
    show_samples("after", &sample_lines(cfg, &trained, 3, 1));
    let log = dir.join("log.jsonl");
    let losses: Vec<f64> = std::fs::read_to_string(&log)?
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?.get("loss")?.as_f64())
        .collect();
    if let (Some(first), Some(last)) = (losses.first(), losses.last()) {
        println!(
            "loss: {first:.3} at step 1 → {last:.3} at step {} ({:.0}% of the first)",
            losses.len(),
            100.0 * last / first
        );
    }
    let (d, finch) = (dir.display(), crate::cli::finch_command());
    println!(
        "\nMore to try:
  {finch} sample --model {d} --prompt '17 + 25 ='
  {finch} tokenize my_texts/ --out data/mine            # your own text, then train on it:
  {finch} train --data 'data/mine/train_*.bin' --val 'data/mine/val_*.bin' --out runs/mine"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_corpus_is_deterministic_and_arithmetic_is_right() {
        let text = synthetic_corpus(300, 4);
        assert_eq!(text, synthetic_corpus(300, 4));
        let sums: Vec<&str> = text.lines().filter(|l| l.contains('+')).collect();
        assert!(sums.len() > 50, "about a third of the lines are sums");
        for line in sums {
            let (lhs, rhs) = line.trim_end_matches('.').split_once(" = ").unwrap();
            let (a, b) = lhs.split_once(" + ").unwrap();
            assert_eq!(a.parse::<u32>().unwrap() + b.parse::<u32>().unwrap(), rhs.parse::<u32>().unwrap());
        }
    }
}
