//! `finch sample`: generate text from a saved model, streaming tokens as they come.
//!
//! On the CPU each new token costs one step of a KV cache ([`Generator`], [`LlamaGenerator`]). On
//! a GPU the context is recomputed by the training forward for every token (no GPU KV cache yet).

use crate::cli::device::Device;
use crate::cpu::infer::Generator;
use crate::cpu::infer_llama::LlamaGenerator;
use crate::cuda::llama_model::GpuLlama;
use crate::cuda::model::GpuGpt;
use crate::cuda::Precision;
use crate::formats::hf_tokenizer::HfTokenizer;
use crate::formats::rundir::ModelSource;
use crate::formats::tokenizer::{TextTokenizer, Tokenizer};
use crate::model::config::VOCAB_PAD_MULTIPLE;
use crate::model::family::ModelConfig;
use crate::model::rng::Rng;
use anyhow::{bail, Context, Result};
use std::io::Write;
use std::path::PathBuf;

#[derive(clap::Args, Debug, Clone)]
#[command(
    allow_negative_numbers = true,
    after_help = "Examples:
  finch sample --model runs/quickstart                 # a run directory (its model/) or a model directory
  finch sample --model my-model --prompt 'Once upon a time' --max-new-tokens 100
  finch sample --model my-model --temperature 0        # greedy
  finch sample --model my-model --top-k 50 --top-p 0.9 --num-samples 3 --seed 7"
)]
pub struct SampleArgs {
    /// A model directory (config.json + model.safetensors), or a run directory: its model/, or the
    /// weights of its last checkpoint while it has no model yet
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// Text to continue [default: start of a document]
    #[arg(long, default_value = "")]
    pub prompt: String,
    /// Tokens to generate per sample (fewer if the model ends the text)
    #[arg(long, value_name = "N", default_value_t = 200)]
    pub max_new_tokens: usize,
    /// Softmax temperature; 0 picks the most likely token every time
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f64,
    /// Sample only among the K most likely tokens (0: all)
    #[arg(long, value_name = "K", default_value_t = 0)]
    pub top_k: usize,
    /// Sample only among the most likely tokens whose probabilities add up to P (1: all)
    #[arg(long, value_name = "P", default_value_t = 1.0)]
    pub top_p: f64,
    /// Seed of the sampling: the same seed, model and flags give the same text
    #[arg(long, default_value_t = 1337)]
    pub seed: u64,
    /// Independent samples to generate from the same prompt
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub num_samples: usize,
    /// How text maps to tokens [default: the one recorded with the model, else from its vocabulary size]
    #[arg(long, value_enum)]
    pub tokenizer: Option<Tokenizer>,
    /// Where to run: cpu, cuda, or auto
    #[arg(long, default_value = "auto")]
    pub device: String,
}

/// Picks the next token from `logits` (V): greedy at temperature 0, else a draw from the
/// softmax of logits/temperature restricted to the top-k tokens and then to the top-p mass.
pub fn sample_token(logits: &[f32], temperature: f64, top_k: usize, top_p: f64, rng: &mut Rng) -> u32 {
    let argmax = || logits.iter().enumerate().fold(0, |best, (i, &x)| if x > logits[best] { i } else { best }) as u32;
    if temperature == 0.0 {
        return argmax();
    }
    let mut order: Vec<u32> = (0..logits.len() as u32).collect();
    order.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]).then(a.cmp(&b)));
    if top_k > 0 {
        order.truncate(top_k);
    }
    let max = logits[order[0] as usize] as f64;
    let mut probs: Vec<f64> = order.iter().map(|&i| ((logits[i as usize] as f64 - max) / temperature).exp()).collect();
    let total: f64 = probs.iter().sum();
    if top_p < 1.0 {
        let mut cumulative = 0.0;
        let keep = probs
            .iter()
            .position(|p| {
                cumulative += p / total;
                cumulative >= top_p
            })
            .map_or(probs.len(), |i| i + 1);
        probs.truncate(keep);
    }
    let total: f64 = probs.iter().sum();
    let mut u = rng.uniform() * total;
    for (&token, p) in order.iter().zip(&probs) {
        if u < *p {
            return token;
        }
        u -= p;
    }
    order[probs.len() - 1]
}

/// The tokenizer of a model: the one recorded with it (config.json, a tokenizer.json beside it, or
/// the run's flags), else a guess from the vocabulary size; `--tokenizer` may name it, but not
/// contradict it, and a tokenizer whose vocabulary is not the model's is refused.
pub fn model_tokenizer(source: &ModelSource, cfg: &ModelConfig, flag: Option<Tokenizer>) -> Result<TextTokenizer> {
    let recorded = source.tokenizer();
    if let (Some(flag), Some(recorded)) = (flag, recorded) {
        if flag != recorded {
            bail!(
                "--tokenizer {}: {} was trained on {} tokens; drop --tokenizer",
                flag.name(),
                source.path().display(),
                recorded.name()
            );
        }
    }
    let kind = match flag.or(recorded).or_else(|| Tokenizer::guess_from_vocab(cfg.vocab_size())) {
        Some(t) => t,
        None => bail!(
            "{}: cannot tell which tokenizer a model with vocabulary {} uses; pass --tokenizer gpt2 or bytes",
            source.path().display(),
            cfg.vocab_size()
        ),
    };
    let tokenizer = match kind {
        Tokenizer::HuggingFace => TextTokenizer::File(Box::new(HfTokenizer::load(&source.tokenizer_dir(), "--model")?)),
        builtin => TextTokenizer::Builtin(builtin),
    };
    // A model may pad its vocabulary (to a multiple of 128, say), but not be far larger or
    // smaller; published models often pad a tokenizer.json's vocabulary by more (Qwen2.5 holds
    // 151,665 ids in 151,936 rows).
    let (v, model_v) = (tokenizer.vocab_size(), cfg.vocab_size());
    let fits = v <= model_v && (kind == Tokenizer::HuggingFace || model_v <= v.next_multiple_of(VOCAB_PAD_MULTIPLE));
    if !fits {
        bail!("--tokenizer {}: its vocabulary of {v} does not match the model's {model_v}", kind.name());
    }
    Ok(tokenizer)
}

/// Next-token logits given a growing context, on the CPU (KV cache) or the GPU (recompute).
/// A CPU model that takes one token at a time into its KV cache.
trait Incremental {
    fn is_full(&self) -> bool;
    fn clear(&mut self);
    /// The logits (V) after appending `token`.
    fn step(&mut self, token: u32) -> Vec<f32>;
}

impl Incremental for Generator<'_> {
    fn is_full(&self) -> bool {
        self.cache.is_full()
    }
    fn clear(&mut self) {
        self.cache.clear()
    }
    fn step(&mut self, token: u32) -> Vec<f32> {
        Generator::step(self, token)
    }
}

impl Incremental for LlamaGenerator<'_> {
    fn is_full(&self) -> bool {
        LlamaGenerator::is_full(self)
    }
    fn clear(&mut self) {
        LlamaGenerator::clear(self)
    }
    fn step(&mut self, token: u32) -> Vec<f32> {
        LlamaGenerator::step(self, token)
    }
}

enum Runner<'a> {
    Cpu(Box<dyn Incremental + 'a>),
    Gpu(Box<GpuGpt>, Vec<u32>),
    GpuLlama(Box<GpuLlama>, Vec<u32>),
}

impl Runner<'_> {
    /// Clears the context.
    fn reset(&mut self) {
        match self {
            Runner::Cpu(g) => g.clear(),
            Runner::Gpu(_, context) | Runner::GpuLlama(_, context) => context.clear(),
        }
    }

    /// Appends `tokens` to the context (whose tokens so far are `history`) and returns the
    /// logits after the last one. When the context would exceed the model's, its oldest half is
    /// dropped and the rest re-read.
    fn feed(&mut self, tokens: &[u32], history: &[u32], max_t: usize) -> Result<Vec<f32>> {
        match self {
            Runner::Cpu(g) => {
                let mut logits = Vec::new();
                for &t in tokens {
                    if g.is_full() {
                        g.clear();
                        let keep = &history[history.len().saturating_sub(max_t / 2)..];
                        for &h in keep {
                            g.step(h);
                        }
                    }
                    logits = g.step(t);
                }
                Ok(logits)
            }
            Runner::GpuLlama(model, context) => {
                extend_context(context, tokens, max_t);
                let t = context.len();
                model.forward(context, None, 1, t)?;
                let (vp, v) = (model.config.padded_vocab_size(), model.config.vocab_size);
                Ok(model.logits()?[(t - 1) * vp..(t - 1) * vp + v].to_vec())
            }
            Runner::Gpu(model, context) => {
                extend_context(context, tokens, max_t);
                let t = context.len();
                model.forward(context, None, 1, t)?;
                let logits = model.activation("logits")?.context("the GPU model keeps its logits")?;
                let (vp, v) = (model.config.padded_vocab_size(), model.config.vocab_size);
                Ok(logits[(t - 1) * vp..(t - 1) * vp + v].to_vec())
            }
        }
    }
}

/// Appends `tokens` to a recomputed context, dropping its oldest half when it would exceed `max_t`.
fn extend_context(context: &mut Vec<u32>, tokens: &[u32], max_t: usize) {
    context.extend_from_slice(tokens);
    if context.len() > max_t {
        context.drain(..context.len() - max_t / 2);
    }
}

pub fn run(args: SampleArgs) -> Result<()> {
    if !(args.temperature.is_finite() && args.temperature >= 0.0) {
        bail!("--temperature must be a finite number ≥ 0, got {}", args.temperature);
    }
    if !(args.top_p > 0.0 && args.top_p <= 1.0) {
        bail!("--top-p must be in (0, 1], got {}", args.top_p);
    }
    if args.num_samples == 0 {
        bail!("--num-samples must be at least 1");
    }
    let source = ModelSource::find(&args.model, "--model")?;
    let cfg = source.config()?;
    let tokenizer = model_tokenizer(&source, &cfg, args.tokenizer)?;
    if let ModelSource::Checkpoint { .. } = source {
        eprintln!("note: sampling from {}", source.describe());
    }
    let params = source.params(&cfg)?;
    let mut prompt = tokenizer.prompt(&args.prompt)?;
    // Only the last context-length tokens of a long prompt can be seen.
    prompt.drain(..prompt.len().saturating_sub(cfg.context_length()));
    let (device, reason) = Device::choose(&args.device, None)?;
    let (device, _) = device.fit(reason, &args.device, &cfg)?;
    let mut runner = match (&device, cfg) {
        (Device::Cpu, ModelConfig::Gpt2(cfg)) => Runner::Cpu(Box::new(Generator::new(cfg, &params))),
        (Device::Cpu, ModelConfig::Llama(cfg)) => Runner::Cpu(Box::new(LlamaGenerator::new(cfg, &params))),
        (Device::Cuda(gpu, _), ModelConfig::Gpt2(cfg)) => {
            Runner::Gpu(Box::new(GpuGpt::new(gpu.clone(), cfg, Precision::F32, &params)?), Vec::new())
        }
        (Device::Cuda(gpu, _), ModelConfig::Llama(cfg)) => {
            Runner::GpuLlama(Box::new(GpuLlama::new(gpu.clone(), cfg, Precision::F32, &params)?), Vec::new())
        }
    };
    let mut rng = Rng::new(args.seed);
    let mut out = std::io::stdout().lock();
    for sample in 1..=args.num_samples {
        if args.num_samples > 1 {
            writeln!(out, "--- sample {sample} ---")?;
        }
        runner.reset();
        let mut history = prompt.clone();
        let mut text = tokenizer.decoder();
        write!(out, "{}", args.prompt)?;
        let mut logits = runner.feed(&prompt, &[], cfg.context_length())?;
        for _ in 0..args.max_new_tokens {
            let token = sample_token(&logits, args.temperature, args.top_k, args.top_p, &mut rng);
            if Some(token) == tokenizer.stop_token() {
                break;
            }
            write!(out, "{}", text.push(token)?)?;
            out.flush()?;
            history.push(token);
            logits = runner.feed(&[token], &history[..history.len() - 1], cfg.context_length())?;
        }
        writeln!(out, "{}", text.finish()?)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_top_k_one_and_tiny_top_p_pick_the_argmax() {
        let logits = [0.1f32, 2.0, -1.0, 1.9];
        let mut rng = Rng::new(1);
        assert_eq!(sample_token(&logits, 0.0, 0, 1.0, &mut rng), 1);
        for _ in 0..20 {
            assert_eq!(sample_token(&logits, 1.0, 1, 1.0, &mut rng), 1);
            assert_eq!(sample_token(&logits, 1.0, 0, 1e-6, &mut rng), 1);
        }
    }

    #[test]
    fn draws_follow_the_softmax_and_respect_top_k() {
        let logits = [0.0f32, (2f32).ln(), (3f32).ln(), -50.0]; // probabilities 1/6, 2/6, 3/6, ~0
        let mut rng = Rng::new(9);
        let mut counts = [0usize; 4];
        let n = 60_000;
        for _ in 0..n {
            counts[sample_token(&logits, 1.0, 0, 1.0, &mut rng) as usize] += 1;
        }
        for (i, want) in [1.0 / 6.0, 2.0 / 6.0, 3.0 / 6.0].iter().enumerate() {
            let got = counts[i] as f64 / n as f64;
            assert!((got - want).abs() < 0.01, "token {i}: {got} vs {want}");
        }
        for _ in 0..1000 {
            let token = sample_token(&logits, 1.0, 2, 1.0, &mut rng);
            assert!(token == 1 || token == 2, "top-k 2 drew {token}");
        }
        // top-p 0.5 keeps only the most likely token (3/6 reaches 0.5).
        for _ in 0..100 {
            assert_eq!(sample_token(&logits, 1.0, 0, 0.5, &mut rng), 2);
        }
    }
}
