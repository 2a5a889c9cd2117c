//! The flags of `finch train`: what each means, the checks on them, and the flags a run directory
//! remembers (train_args.json) so that `--resume` continues with them.

use super::memory::host_memory_plan;
use super::schedule::{learning_rate, LrSchedule};
use crate::cuda::model::memory_plan as gpu_memory_plan;
use crate::cuda::Precision;
use crate::formats::rundir::ARGS_FILE;
use crate::formats::tokenizer::Tokenizer;
use crate::formats::tokens::DataFormat;
use crate::model::config::Preset;
use crate::model::family::ModelConfig;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The flags of `finch train`. Serialisable so a run directory remembers them for --resume.
#[derive(clap::Args, Debug, Clone, Serialize, Deserialize)]
#[command(
    allow_negative_numbers = true,
    after_help = "Examples:
  finch train --data train.bin --model gpt2 --batch-size 4 --seq-len 64 --steps 100 --out runs/a
  finch train --data 'shards/train_*.bin' --val val.bin --init gpt2-dir --lr 3e-4 --save out-dir
  finch train --resume runs/a                  # continue an interrupted run bit for bit
  finch train --resume runs/a --steps 2000     # ... or extend it"
)]
pub struct TrainArgs {
    /// Token file(s): an llm.c .bin file, or a quoted glob such as 'dir/train_*.bin' (sorted)
    #[arg(long, value_name = "FILE|GLOB", required_unless_present = "resume")]
    pub data: Option<String>,
    /// Token file format
    #[arg(long, value_enum, default_value = "llmc")]
    pub data_format: DataFormat,
    /// Validation token file(s), same format as --data
    #[arg(long, value_name = "FILE|GLOB")]
    pub val: Option<String>,
    /// Evaluate on --val every K steps (0: only after the last step)
    #[arg(long, value_name = "K", default_value_t = 0)]
    pub val_every: usize,
    /// Batches per validation
    #[arg(long, value_name = "M", default_value_t = 20)]
    pub val_batches: usize,

    /// Start from a model: a Hugging Face GPT-2 directory (config.json + model.safetensors), or a
    /// finch run directory (its model/, or its checkpoint's weights if it has no model yet)
    #[arg(long, value_name = "DIR")]
    pub init: Option<PathBuf>,
    /// Random init of a preset size [default: gpt2]: gpt2 124M (12 layers, 12 heads, 768 channels),
    /// gpt2-medium 350M (24, 16, 1024), gpt2-large 774M (36, 20, 1280), gpt2-xl 1558M (48, 25, 1600),
    /// or llama-135m (a Llama-family model of SmolLM2-135M's shape: 30 layers, 9 heads of which 3
    /// key/value, 576 channels, MLP 1536, context 2048); the flags below override its fields
    #[arg(long, value_enum)]
    pub model: Option<Preset>,
    /// Transformer blocks
    #[arg(long, value_name = "L")]
    pub n_layer: Option<usize>,
    /// Attention heads per block (must divide --n-embd)
    #[arg(long, value_name = "NH")]
    pub n_head: Option<usize>,
    /// Channels: the width of the model
    #[arg(long, value_name = "C")]
    pub n_embd: Option<usize>,
    /// Llama family: key/value heads, each shared by a group of query heads (must divide
    /// --n-head)
    #[arg(long, value_name = "NKV")]
    #[serde(default)]
    pub n_kv_head: Option<usize>,
    /// Llama family: the width of the SwiGLU MLP
    #[arg(long, value_name = "I")]
    #[serde(default)]
    pub intermediate_size: Option<usize>,
    /// Vocabulary size [default: from meta.json beside --data (finch tokenize writes it), else 50257]
    #[arg(long, value_name = "V")]
    pub vocab_size: Option<usize>,
    /// Longest sequence the model can see [default: 1024]
    #[arg(long, value_name = "maxT")]
    pub context_length: Option<usize>,
    /// What the token ids mean, recorded in the saved model for `finch sample` [default: from
    /// meta.json beside --data, else gpt2 for vocabulary 50257 and bytes for 256]
    #[arg(long, value_enum)]
    pub tokenizer: Option<Tokenizer>,
    /// For ids of a tokenizer.json: the directory holding it (beside the data, or the --init
    /// model's), copied into RUN_DIR and the saved model
    #[arg(skip)]
    #[serde(skip)]
    pub tokenizer_dir: Option<PathBuf>,
    /// Seed of the random init
    #[arg(long, default_value_t = 1337)]
    pub seed: u64,

    /// Sequences per micro-batch (B)
    #[arg(long, value_name = "B", default_value_t = 4)]
    pub batch_size: usize,
    /// Tokens per sequence (T) [default: the model's context length]
    #[arg(long, value_name = "T")]
    pub seq_len: Option<usize>,
    /// Micro-batches per optimizer step
    #[arg(long, value_name = "K", default_value_t = 1)]
    pub grad_accum: usize,
    /// Optimizer steps [default: one pass over the data]
    #[arg(long, value_name = "N")]
    pub steps: Option<usize>,

    /// Peak learning rate
    #[arg(long, default_value_t = 6e-4)]
    pub lr: f64,
    /// How the learning rate falls after warm-up: cosine or linear down to --min-lr at the last
    /// step, or constant
    #[arg(long, value_enum, default_value = "cosine")]
    pub lr_schedule: LrSchedule,
    /// Linear warm-up steps before the schedule
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub warmup_steps: usize,
    /// Where cosine and linear decay end
    #[arg(long, default_value_t = 0.0)]
    pub min_lr: f64,
    /// AdamW decoupled weight decay, applied to 2-D tensors only
    #[arg(long, default_value_t = 0.1)]
    pub weight_decay: f64,
    /// AdamW's first-moment decay
    #[arg(long, default_value_t = 0.9)]
    pub beta1: f64,
    /// AdamW's second-moment decay
    #[arg(long, default_value_t = 0.95)]
    pub beta2: f64,
    /// AdamW's epsilon
    #[arg(long, default_value_t = 1e-8)]
    pub eps: f64,
    /// Clip the global gradient norm to this (0: no clipping)
    #[arg(long, default_value_t = 1.0)]
    pub grad_clip: f64,

    /// Where to train: cpu, cuda, or auto (CUDA when a GPU and kernels are usable, else CPU)
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// GPU storage type of weights and activations [default: bf16 on a GPU, f32 on the CPU]
    #[arg(long, value_enum)]
    pub precision: Option<Precision>,
    /// CPU threads [default: all cores]
    #[arg(long)]
    pub threads: Option<usize>,
    /// On a GPU, capture the training step into a CUDA graph once and replay it every step
    /// (fewer launches' overhead; the results are the same bits)
    #[arg(long, value_name = "BOOL", default_value_t = true, action = clap::ArgAction::Set)]
    #[serde(default = "yes")]
    pub cuda_graph: bool,
    /// On a GPU, keep fewer activations: recompute every layer's LayerNorm and GELU outputs in
    /// the backward instead of storing them (less memory, a few percent more time; the results
    /// are the same bits)
    #[arg(long)]
    #[serde(default)]
    pub recompute: bool,
    /// On a GPU, time every kernel of every step (CUDA events) and print, at the end, each
    /// kernel's share of the step and its TFLOP/s or GB/s; also logged. Turns --cuda-graph off
    #[arg(long)]
    #[serde(default)]
    pub profile: bool,
    /// Start N processes on this machine, one per GPU, and train on all of them (data parallel
    /// over NCCL), as torchrun does; --batch-size is per GPU. Not needed under torchrun, srun or
    /// mpirun, whose environment finch reads itself
    #[arg(long, value_name = "N")]
    #[serde(skip)]
    pub nproc_per_node: Option<usize>,
    /// Multi-GPU: how long the ranks wait for each other (to meet at start, and for a step's
    /// collectives) before the job stops with an error naming the rank
    #[arg(long, value_name = "SECONDS", default_value_t = 600.0)]
    #[serde(default = "dist_timeout")]
    pub dist_timeout: f64,

    /// Write the JSONL log here [default: RUN_DIR/log.jsonl with --out]
    #[arg(long, value_name = "FILE")]
    pub log: Option<PathBuf>,
    /// Save the final model here (Hugging Face layout)
    #[arg(long, value_name = "DIR")]
    pub save: Option<PathBuf>,
    /// Run directory: flags, log, checkpoints and the final model
    #[arg(long, value_name = "RUN_DIR")]
    pub out: Option<PathBuf>,
    /// Also checkpoint to RUN_DIR every K steps (0: only by time, and after the last step)
    #[arg(long, value_name = "K", default_value_t = 0)]
    pub checkpoint_every: usize,
    /// Checkpoint to RUN_DIR when M minutes have passed since the last checkpoint (0: never by
    /// time); there is always one after the last step
    #[arg(long, value_name = "M", default_value_t = 10.0)]
    pub checkpoint_minutes: f64,
    /// Continue the run in RUN_DIR from its last checkpoint, with its saved flags;
    /// flags given now override them
    #[arg(long, value_name = "RUN_DIR")]
    pub resume: Option<PathBuf>,
    /// With --resume of a run that stopped before its first checkpoint: start it again from step 1
    #[arg(long, requires = "resume")]
    #[serde(skip)]
    pub restart: bool,
    /// With --resume and a larger --steps: a new warm-up and decay of the learning rate over the
    /// added steps, rather than stretching the schedule to the new last step
    #[arg(long, requires = "resume")]
    #[serde(skip)]
    pub new_schedule: bool,
    /// The step after which the learning-rate schedule starts (set by --new-schedule)
    #[arg(skip)]
    #[serde(default)]
    pub schedule_start: usize,
    /// For --resume: the --steps the run had before this command line
    #[arg(skip)]
    #[serde(skip)]
    pub previous_steps: Option<usize>,
    /// Off a terminal, print a line every N steps (and at validation and the last step); the
    /// JSONL log has every step
    #[arg(long, value_name = "N", default_value_t = 10)]
    pub print_every: usize,
    /// When a step's loss or gradient norm is not finite, skip its update (the data position
    /// still advances) instead of stopping the run; skipped steps are logged and counted
    #[arg(long)]
    pub skip_nonfinite: bool,
}

fn yes() -> bool {
    true
}

impl TrainArgs {
    /// The learning rate of step `step` (1-based) of `steps`: the schedule runs from the step after
    /// `schedule_start` (0, or where --new-schedule began a new segment) to `steps`.
    pub fn learning_rate(&self, step: usize, steps: usize) -> f64 {
        let start = self.schedule_start.min(step.saturating_sub(1));
        learning_rate(self.lr_schedule, step - start, steps - start, self.lr, self.min_lr, self.warmup_steps)
    }
}

const MODEL_FLAGS: [&str; 8] =
    ["model", "n_layer", "n_head", "n_embd", "n_kv_head", "intermediate_size", "vocab_size", "context_length"];

/// For --resume: the run's saved flags, overridden by those given on this command line.
pub fn merge_resumed_args(cli: &TrainArgs, is_explicit: impl Fn(&str) -> bool) -> Result<TrainArgs> {
    let dir = cli.resume.as_ref().expect("called for --resume");
    let path = dir.join(ARGS_FILE);
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("--resume {}: not a finch run directory (cannot read {ARGS_FILE})", dir.display()))?;
    merge_saved_args(cli, &text, &path, is_explicit)
}

/// `cli`'s flags, those not given on the command line replaced by the ones saved in `text`, the
/// contents of the run directory's train_args.json at `path`.
fn dist_timeout() -> f64 {
    600.0
}

fn merge_saved_args(cli: &TrainArgs, text: &str, path: &Path, is_explicit: impl Fn(&str) -> bool) -> Result<TrainArgs> {
    let dir = cli.resume.as_ref().expect("called for --resume");
    let saved: serde_json::Value =
        serde_json::from_str(text).with_context(|| format!("{}: not valid JSON", path.display()))?;
    if !saved.is_object() {
        bail!("{}: not the flags of a finch run (expected a JSON object)", path.display());
    }
    let mut merged = serde_json::to_value(cli)?;
    for (key, value) in merged.as_object_mut().expect("flags serialise as an object") {
        if !is_explicit(key) {
            if let Some(saved_value) = saved.get(key.as_str()) {
                *value = saved_value.clone();
            }
        }
    }
    let mut args: TrainArgs =
        serde_json::from_value(merged).with_context(|| format!("{}: unreadable flags", path.display()))?;
    args.resume = Some(dir.clone());
    args.out = Some(dir.clone());
    // One-shot flags: never taken from the file.
    args.restart = cli.restart;
    args.new_schedule = cli.new_schedule;
    // How this run is launched is not a property of the run.
    args.nproc_per_node = cli.nproc_per_node;
    args.previous_steps = saved.get("steps").and_then(|s| s.as_u64()).map(|s| s as usize);
    Ok(args)
}

pub(super) fn check_flags(a: &TrainArgs, is_explicit: &dyn Fn(&str) -> bool) -> Result<()> {
    let positive = [("--batch-size", a.batch_size), ("--grad-accum", a.grad_accum), ("--val-batches", a.val_batches)];
    for (flag, v) in positive {
        if v == 0 {
            bail!("{flag} must be at least 1");
        }
    }
    if let Some(n) = a.threads {
        crate::os::resources::check_threads(n)?;
    }
    for (flag, v) in [("--seq-len", a.seq_len), ("--steps", a.steps)] {
        if v == Some(0) {
            bail!("{flag} must be at least 1");
        }
    }
    let finite_nonneg =
        [("--lr", a.lr), ("--min-lr", a.min_lr), ("--weight-decay", a.weight_decay), ("--grad-clip", a.grad_clip)];
    for (flag, v) in finite_nonneg {
        if !(v.is_finite() && v >= 0.0) {
            bail!("{flag} must be a finite number ≥ 0, got {v}");
        }
    }
    if a.lr == 0.0 {
        bail!("--lr must be above 0");
    }
    for (flag, v) in [("--beta1", a.beta1), ("--beta2", a.beta2)] {
        if !(0.0..1.0).contains(&v) {
            bail!("{flag} must be in [0, 1), got {v}");
        }
    }
    if !(a.eps.is_finite() && a.eps > 0.0) {
        bail!("--eps must be above 0, got {}", a.eps);
    }
    if a.checkpoint_every > 0 && a.out.is_none() {
        bail!("--checkpoint-every needs --out RUN_DIR to write the checkpoints to");
    }
    if !(a.checkpoint_minutes.is_finite() && a.checkpoint_minutes >= 0.0) {
        bail!("--checkpoint-minutes must be a finite number ≥ 0, got {}", a.checkpoint_minutes);
    }
    if a.nproc_per_node == Some(0) {
        bail!("--nproc-per-node must be at least 1");
    }
    if !(a.dist_timeout.is_finite() && a.dist_timeout > 0.0) {
        bail!("--dist-timeout must be a number of seconds above 0, got {}", a.dist_timeout);
    }
    if a.print_every == 0 {
        bail!("--print-every must be at least 1");
    }
    if a.val.is_none() && (is_explicit("val_every") || is_explicit("val_batches")) {
        bail!("--val-every and --val-batches need --val FILE");
    }
    if a.init.is_some() {
        if let Some(flag) = MODEL_FLAGS.iter().find(|f| is_explicit(f)) {
            bail!("--init takes the model's shape from its config.json; drop --{}", flag.replace('_', "-"));
        }
    }
    match a.device.as_str() {
        "cpu" | "cuda" | "auto" => Ok(()),
        other => bail!("--device {other}: unknown device (expected cpu, cuda or auto)"),
    }
}

/// The model the flags describe; `data_vocab` (from the data's meta.json) is the vocabulary when
/// --vocab-size is not given.
pub(super) fn model_config(a: &TrainArgs, data_vocab: Option<usize>) -> Result<ModelConfig> {
    let mut cfg = ModelConfig::preset(a.model.unwrap_or(Preset::Gpt2));
    let common = [a.n_layer, a.n_head, a.n_embd, a.vocab_size.or(data_vocab), a.context_length];
    let common = |i: usize, field: &mut usize| *field = common[i].unwrap_or(*field);
    let llama_only = [("--n-kv-head", a.n_kv_head), ("--intermediate-size", a.intermediate_size)];
    match &mut cfg {
        ModelConfig::Gpt2(c) => {
            if let Some((flag, _)) = llama_only.iter().find(|(_, v)| v.is_some()) {
                bail!("{flag} is a Llama-family flag; GPT-2 has neither (use --model llama-135m)");
            }
            for (i, field) in [&mut c.n_layer, &mut c.n_head, &mut c.n_embd, &mut c.vocab_size, &mut c.n_positions]
                .into_iter()
                .enumerate()
            {
                common(i, field);
            }
        }
        ModelConfig::Llama(c) => {
            let fields = [
                &mut c.num_hidden_layers,
                &mut c.num_attention_heads,
                &mut c.hidden_size,
                &mut c.vocab_size,
                &mut c.max_position_embeddings,
            ];
            for (i, field) in fields.into_iter().enumerate() {
                common(i, field);
            }
            c.num_key_value_heads = a.n_kv_head.unwrap_or(c.num_key_value_heads);
            c.intermediate_size = a.intermediate_size.unwrap_or(c.intermediate_size);
        }
    }
    cfg.validate("model flags (--n-layer, --n-head, --n-embd, --vocab-size, --context-length)")?;
    Ok(cfg)
}

/// The batch shape of a run: B, T, their product and the tokens of one optimizer step.
pub(super) struct BatchShape {
    pub b: usize,
    pub t: usize,
    pub window: usize,
    pub step_tokens: usize,
}

pub(super) fn batch_shape(a: &TrainArgs, config: &ModelConfig) -> Result<BatchShape> {
    let context = config.context_length();
    let t = a.seq_len.unwrap_or(context);
    if t > context {
        bail!("--seq-len {t} exceeds the model's context length {context}");
    }
    let b = a.batch_size;
    // Every size computed from the shape (activations and their gradients, at most 16 bytes per
    // value in all, on either device) must fit in a usize; no machine comes near that bound.
    let too_large =
        || format!("--batch-size {b} × --seq-len {t} is too large: its activations alone exceed any memory");
    let window = b.checked_mul(t).with_context(too_large)?;
    window.checked_mul(config.activation_count(1, 1)).and_then(|n| n.checked_mul(16)).with_context(too_large)?;
    // The tokens of one step; bounded, so that later products cannot overflow.
    let step_tokens = window
        .checked_mul(a.grad_accum)
        .filter(|&w| w < usize::MAX / 4)
        .context("--batch-size × --seq-len × --grad-accum is too large")?;
    Ok(BatchShape { b, t, window, step_tokens })
}

/// Checks the flags of `finch train --resume DIR` given `text`, DIR's train_args.json, and no
/// other flag, as far as `run` can without opening a file: the flags, the model they describe,
/// the batch shape, the memory plans and the learning-rate schedule. For the train_args fuzz
/// target: whatever the file holds, this returns, never panics.
#[doc(hidden)]
pub fn check_saved_args(text: &str) -> Result<()> {
    use clap::{Args, FromArgMatches};
    let command = TrainArgs::augment_args(clap::Command::new("train").args_override_self(true));
    let cli = TrainArgs::from_arg_matches(&command.try_get_matches_from(["train", "--resume", "RUN"])?)?;
    let args = merge_saved_args(&cli, text, Path::new("RUN/train_args.json"), |_| false)?;
    check_flags(&args, &|_| false)?;
    if args.init.is_some() {
        return Ok(()); // the model comes from files
    }
    let config = model_config(&args, None)?;
    let shape = batch_shape(&args, &config)?;
    for on_gpu in [false, true] {
        host_memory_plan(on_gpu, &config, shape.b, shape.t);
    }
    for precision in [Precision::F32, Precision::Bf16] {
        if let Some(gpt) = config.gpt() {
            gpu_memory_plan(gpt, (shape.b, shape.t), precision, args.recompute, 1);
        }
    }
    let steps = args.steps.unwrap_or(1);
    for step in [1, steps / 2, steps] {
        args.learning_rate(step, steps);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saved_flags_are_checked_like_typed_ones() {
        // Keys the file lacks keep their defaults (GPT-2, B=4, T=1024).
        check_saved_args("{}").unwrap();
        check_saved_args(r#"{"n_layer": 1, "n_embd": 8, "n_head": 2, "device": "cpu", "batch_size": 2}"#).unwrap();
        let refused = |text: &str| check_saved_args(text).unwrap_err().to_string();
        assert!(refused("[1, 2]").contains("not the flags of a finch run (expected a JSON object)"));
        assert!(refused("{").starts_with("RUN/train_args.json: not valid JSON"));
        assert!(refused(r#"{"batch_size": -1}"#).contains("unreadable flags"));
        assert!(refused(r#"{"device": "tpu"}"#).contains("--device tpu: unknown device"));
        assert!(refused(r#"{"n_head": 5}"#).contains("n_embd (768) must be a multiple of n_head (5)"));
        assert!(refused(r#"{"batch_size": 100000000000000}"#).contains("is too large: its activations alone"));
        assert!(refused(r#"{"threads": 5000}"#).contains("--threads must be at most 1024"));
    }
}
