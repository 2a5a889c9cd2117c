//! `finch train`: flags, validation, and the training loop on the CPU reference.

use crate::checkpoint::{self, TrainState};
use crate::config::{GptConfig, Preset};
use crate::cpu::optimizer::{AdamW, AdamWConfig};
use crate::cuda::model::memory_plan as gpu_memory_plan;
use crate::cuda::{Gpu, Precision};
use crate::data::{BatchWalker, DataFormat, TokenStream};
use crate::engine::{first_nonfinite, Device, Engine};
use crate::fsutil::{
    check_free_space, create_dir, explain_write_error, lock_run_dir, remove_stale_temp_files, write_atomically,
};
use crate::interrupt::{signal_name, Interrupted, StopOnSignal};
use crate::layout::{activation_count, ParamLayout};
use crate::model::init_params;
use crate::modelio;
use crate::resources::{available_memory, human_bytes, AvailableMemory};
use crate::rng::Rng;
use crate::schedule::{learning_rate, LrSchedule};
use crate::trainlog::{Console, JsonlLog, StepRecord};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Instant;

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

    /// Start from a Hugging Face GPT-2 directory (config.json + model.safetensors)
    #[arg(long, value_name = "DIR")]
    pub init: Option<PathBuf>,
    /// Random init of a GPT-2 size [default: gpt2]; the flags below override its fields
    #[arg(long, value_enum)]
    pub model: Option<Preset>,
    #[arg(long, value_name = "L")]
    pub n_layer: Option<usize>,
    #[arg(long, value_name = "NH")]
    pub n_head: Option<usize>,
    #[arg(long, value_name = "C")]
    pub n_embd: Option<usize>,
    #[arg(long, value_name = "V")]
    pub vocab_size: Option<usize>,
    #[arg(long, value_name = "maxT")]
    pub context_length: Option<usize>,
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
    #[arg(long, default_value_t = 0.9)]
    pub beta1: f64,
    #[arg(long, default_value_t = 0.95)]
    pub beta2: f64,
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

    /// Write the JSONL log here [default: RUN_DIR/log.jsonl with --out]
    #[arg(long, value_name = "FILE")]
    pub log: Option<PathBuf>,
    /// Save the final model here (Hugging Face layout)
    #[arg(long, value_name = "DIR")]
    pub save: Option<PathBuf>,
    /// Run directory: flags, log, checkpoints and the final model
    #[arg(long, value_name = "RUN_DIR")]
    pub out: Option<PathBuf>,
    /// Checkpoint to RUN_DIR every K steps (and always after the last)
    #[arg(long, value_name = "K", default_value_t = 0)]
    pub checkpoint_every: usize,
    /// Continue the run in RUN_DIR from its last checkpoint, with its saved flags;
    /// flags given now override them
    #[arg(long, value_name = "RUN_DIR")]
    pub resume: Option<PathBuf>,
    /// When a step's loss or gradient norm is not finite, skip its update (the data position
    /// still advances) instead of stopping the run; skipped steps are logged and counted
    #[arg(long)]
    pub skip_nonfinite: bool,
}

const ARGS_FILE: &str = "train_args.json";
const MODEL_FLAGS: [&str; 6] = ["model", "n_layer", "n_head", "n_embd", "vocab_size", "context_length"];

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
    Ok(args)
}

/// Flags checked and combined into what the loop needs.
struct Plan {
    config: GptConfig,
    /// Where the initial weights come from, for the console.
    init_source: String,
    params: Vec<f32>,
    b: usize,
    t: usize,
    steps: usize,
    train: TokenStream,
    val: Option<TokenStream>,
    log_path: Option<PathBuf>,
    /// For --resume from a checkpoint: its optimizer state and where the loop stood.
    resumed: Option<(AdamW<f32>, TrainState)>,
}

fn check_flags(a: &TrainArgs, is_explicit: &dyn Fn(&str) -> bool) -> Result<()> {
    let positive = [("--batch-size", a.batch_size), ("--grad-accum", a.grad_accum), ("--val-batches", a.val_batches)];
    for (flag, v) in positive {
        if v == 0 {
            bail!("{flag} must be at least 1");
        }
    }
    if let Some(n) = a.threads {
        crate::resources::check_threads(n)?;
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

fn model_config(a: &TrainArgs) -> Result<GptConfig> {
    let mut cfg = GptConfig::preset(a.model.unwrap_or(Preset::Gpt2));
    let overrides = [
        (&mut cfg.n_layer, a.n_layer),
        (&mut cfg.n_head, a.n_head),
        (&mut cfg.n_embd, a.n_embd),
        (&mut cfg.vocab_size, a.vocab_size),
        (&mut cfg.n_positions, a.context_length),
    ];
    for (field, value) in overrides {
        if let Some(v) = value {
            *field = v;
        }
    }
    cfg.validate("model flags (--n-layer, --n-head, --n-embd, --vocab-size, --context-length)")?;
    Ok(cfg)
}

fn open_stream(pattern: &str, flag: &str, a: &TrainArgs, cfg: &GptConfig, window: usize) -> Result<TokenStream> {
    let stream = TokenStream::open(pattern, flag, a.data_format, cfg.vocab_size)?;
    if stream.len() <= window {
        bail!(
            "{flag} {}: {} tokens, too few for one batch (--batch-size × --seq-len + 1 = {} tokens)",
            stream.describe(),
            stream.len(),
            window + 1
        );
    }
    Ok(stream)
}

fn plan(a: &TrainArgs, device: &Device) -> Result<Plan> {
    // A resumed run's model is read from its checkpoint's header: the memory check below comes
    // before the checkpoint's tensors are loaded.
    let resume_from = a.resume.as_deref().map(checkpoint::open).transpose()?.flatten();
    let config = match (&resume_from, &a.init) {
        (Some(file), _) => file.config,
        (None, Some(dir)) => modelio::load_config(dir)?,
        (None, None) => model_config(a)?,
    };
    let BatchShape { b, t, window, step_tokens } = batch_shape(a, &config)?;
    // The CPU's needs depend on the batch shape; a GPU run's host needs do not.
    let on_gpu = matches!(device, Device::Cuda(..));
    check_memory(&host_memory_plan(on_gpu, &config, b, t), (!on_gpu).then_some((b, t)))?;
    if let Device::Cuda(gpu, precision) = device {
        check_gpu_memory(gpu, &config, b, t, *precision)?;
    }
    let data = a.data.as_deref().context("--data is required")?;
    let train = open_stream(data, "--data", a, &config, window)?;
    let val = a.val.as_deref().map(|v| open_stream(v, "--val", a, &config, window)).transpose()?;
    let steps = a.steps.unwrap_or_else(|| (train.len() / step_tokens).max(1));
    let (params, init_source, resumed) = match (resume_from, &a.init) {
        (Some(file), _) => {
            let ck = file.load()?;
            (ck.params, "the run's checkpoint".to_string(), Some((ck.optimizer, ck.state)))
        }
        (None, Some(dir)) => (modelio::load_params(dir, &config)?, dir.display().to_string(), None),
        (None, None) => (init_params(&config, a.seed), format!("random init, seed {}", a.seed), None),
    };
    let log_path = a.log.clone().or_else(|| a.out.as_ref().map(|d| d.join("log.jsonl")));
    Ok(Plan { config, init_source, params, b, t, steps, train, val, log_path, resumed })
}

/// The batch shape of a run: B, T, their product and the tokens of one optimizer step.
struct BatchShape {
    b: usize,
    t: usize,
    window: usize,
    step_tokens: usize,
}

fn batch_shape(a: &TrainArgs, config: &GptConfig) -> Result<BatchShape> {
    let t = a.seq_len.unwrap_or(config.n_positions);
    if t > config.n_positions {
        bail!("--seq-len {t} exceeds the model's context length {}", config.n_positions);
    }
    let b = a.batch_size;
    // Every size computed from the shape (activations and their gradients, at most 16 bytes per
    // value in all, on either device) must fit in a usize; no machine comes near that bound.
    let too_large =
        || format!("--batch-size {b} × --seq-len {t} is too large: its activations alone exceed any memory");
    let window = b.checked_mul(t).with_context(too_large)?;
    window.checked_mul(activation_count(config, 1, 1)).and_then(|n| n.checked_mul(16)).with_context(too_large)?;
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
    let config = model_config(&args)?;
    let shape = batch_shape(&args, &config)?;
    for on_gpu in [false, true] {
        host_memory_plan(on_gpu, &config, shape.b, shape.t);
    }
    for precision in [Precision::F32, Precision::Bf16] {
        gpu_memory_plan(&config, shape.b, shape.t, precision);
    }
    let steps = args.steps.unwrap_or(1);
    for step in [1, steps / 2, steps] {
        learning_rate(args.lr_schedule, step, steps, args.lr, args.min_lr, args.warmup_steps);
    }
    Ok(())
}

/// Bytes of host memory a run needs, by part. On the CPU: weights, gradients and AdamW's m and
/// v, then the activations and their gradients, all f32. On a GPU everything lives on the
/// device, but each checkpoint copies the f32 weights and both moments to the host (as a resumed
/// run holds its loaded checkpoint there until the upload).
fn host_memory_plan(on_gpu: bool, cfg: &GptConfig, b: usize, t: usize) -> Vec<(&'static str, usize)> {
    let n = ParamLayout::new(cfg).total;
    match on_gpu {
        false => {
            vec![("weights+grads+optimizer", 4 * 4 * n), ("activations", 2 * 4 * activation_count(cfg, b, t))]
        }
        true => vec![("weights and AdamW moments copied from the GPU for each checkpoint", 3 * 4 * n)],
    }
}

/// Refuses a run whose host memory `plan` cannot fit, before anything large is allocated.
/// `batch` is (B, T) when the plan grows with them.
fn check_memory(plan: &[(&str, usize)], batch: Option<(usize, usize)>) -> Result<()> {
    match available_memory().and_then(|available| memory_refusal(plan, batch, &available)) {
        Some(refusal) => bail!(refusal),
        None => Ok(()),
    }
}

/// The one-line refusal of a run whose host memory `plan` exceeds `available`, if it does.
fn memory_refusal(
    plan: &[(&str, usize)],
    batch: Option<(usize, usize)>,
    available: &AvailableMemory,
) -> Option<String> {
    let needed = plan_bytes(plan);
    if needed as u64 <= available.bytes {
        return None;
    }
    let (what, lower) = match batch {
        Some((b, t)) => (format!("{} at B={b}, T={t}", describe_plan(plan)), "lower --batch-size or --seq-len, or "),
        None => (describe_plan(plan), ""),
    };
    Some(format!(
        "not enough memory: training needs {} ({what}) but {} is available{}; {lower}use a smaller model",
        human_bytes(needed),
        human_bytes(available.bytes as usize),
        available.limited_by.as_ref().map(|why| format!(" under {why}")).unwrap_or_default()
    ))
}

/// Refuses a GPU run whose buffers cannot fit in the free device memory.
fn check_gpu_memory(gpu: &Gpu, cfg: &GptConfig, b: usize, t: usize, precision: Precision) -> Result<()> {
    let (free, _) = gpu.memory()?;
    match gpu_memory_refusal(&gpu_memory_plan(cfg, b, t, precision), free, &gpu.name, precision) {
        Some(refusal) => bail!(refusal),
        None => Ok(()),
    }
}

/// The one-line refusal of a GPU run whose buffers (`plan`) exceed the `free` device memory.
fn gpu_memory_refusal(plan: &[(&str, usize)], free: usize, gpu_name: &str, precision: Precision) -> Option<String> {
    let needed = plan_bytes(plan);
    (needed > free).then(|| {
        format!(
            "not enough GPU memory: training needs {} ({}) but {} is free on {gpu_name}; lower --batch-size or \
             --seq-len{}, or use a smaller model",
            human_bytes(needed),
            describe_plan(plan),
            human_bytes(free),
            if precision == Precision::F32 { ", use --precision bf16" } else { "" }
        )
    })
}

/// The bytes of a memory plan, all parts together.
fn plan_bytes(plan: &[(&str, usize)]) -> usize {
    plan.iter().map(|(_, bytes)| bytes).sum()
}

fn describe_plan(plan: &[(&str, usize)]) -> String {
    plan.iter().map(|(what, bytes)| format!("{} {what}", human_bytes(*bytes))).collect::<Vec<_>>().join(", ")
}

fn mean_loss_over(engine: &mut Engine, stream: &TokenStream, b: usize, t: usize, batches: usize) -> Result<f64> {
    let mut walker = BatchWalker { position: 0 };
    let (mut buf, mut x, mut y) = (Vec::new(), vec![0; b * t], vec![0; b * t]);
    let mut total = 0.0;
    for _ in 0..batches {
        walker.next_batch(stream, &mut buf, &mut x, &mut y);
        total += engine.forward(&x, &y, b, t)?;
    }
    Ok(total / batches as f64)
}

/// Runs `finch train`. `is_explicit(id)` tells whether a flag was given on the command line.
pub fn run(cli: TrainArgs, is_explicit: &dyn Fn(&str) -> bool) -> Result<()> {
    let args = match &cli.resume {
        Some(_) => merge_resumed_args(&cli, is_explicit)?,
        None => cli,
    };
    check_flags(&args, is_explicit)?;
    if let Some(n) = args.threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .context("--threads: cannot start the thread pool")?;
    }
    let out_flag = if args.resume.is_some() { "--resume" } else { "--out" };
    // The run directory is locked for the whole run (the lock goes when `_lock` is dropped, or
    // when the process dies), then cleared of what interrupted writes left behind.
    let _lock = match &args.out {
        Some(dir) => {
            create_dir(dir, out_flag)?;
            let lock = lock_run_dir(dir, out_flag)?;
            remove_stale_temp_files(dir);
            remove_stale_temp_files(&dir.join("model"));
            Some(lock)
        }
        None => None,
    };
    if let Some(dir) = &args.out {
        if args.resume.is_none() && dir.join(checkpoint::CHECKPOINT_FILE).exists() {
            bail!(
                "--out {}: this run directory already holds a checkpoint; continue it with --resume {0} or choose another --out",
                dir.display()
            );
        }
        write_atomically(&dir.join(ARGS_FILE), (serde_json::to_string_pretty(&args)? + "\n").as_bytes())
            .map_err(|e| explain_write_error(e, out_flag, dir, None))?;
    }
    // A token file that shrinks or fails mid-run stops it (see sigbus); say how to go on.
    crate::sigbus::set_advice(match &args.out {
        Some(dir) => format!("; restore it, then continue with --resume {}", dir.display()),
        None => "; restore it and start again".to_string(),
    });
    let (device, device_reason) = Device::choose(&args.device, args.precision)?;
    let plan = plan(&args, &device)?;
    let cfg = plan.config;
    let layout = ParamLayout::new(&cfg);
    let (b, t) = (plan.b, plan.t);
    let tokens_per_step = b * t * args.grad_accum;

    let real_params = layout.total - (cfg.padded_vocab_size() - cfg.vocab_size) * cfg.n_embd;
    println!(
        "model: {:.2}M parameters ({} layers, {} heads, {} channels, vocab {} padded to {}, context {}) from {}",
        real_params as f64 / 1e6,
        cfg.n_layer,
        cfg.n_head,
        cfg.n_embd,
        cfg.vocab_size,
        cfg.padded_vocab_size(),
        cfg.n_positions,
        plan.init_source
    );
    println!(
        "data: {} ({} tokens); {} steps of {b}×{t}×{} tokens",
        plan.train.describe(),
        plan.train.len(),
        plan.steps,
        args.grad_accum
    );
    let why = device_reason.map(|r| format!(" ({r})")).unwrap_or_default();
    match &device {
        Device::Cpu => {
            println!(
                "device: cpu, {} threads, f32{why}; memory: {}",
                rayon::current_num_threads(),
                describe_plan(&host_memory_plan(false, &cfg, b, t))
            );
        }
        Device::Cuda(gpu, precision) => {
            let plan = gpu_memory_plan(&cfg, b, t, *precision);
            let total = plan_bytes(&plan);
            println!(
                "device: cuda, {} (compute {}.{}, {} kernels), {precision}{why}",
                gpu.name, gpu.capability.0, gpu.capability.1, gpu.ptx_arch
            );
            println!("GPU memory: {} = {}", human_bytes(total), describe_plan(&plan));
        }
    }

    let hp = AdamWConfig { beta1: args.beta1, beta2: args.beta2, eps: args.eps, weight_decay: args.weight_decay };
    let (optimizer, mut state) = match plan.resumed {
        Some((optimizer, state)) => (Some(optimizer), state),
        None => (None, TrainState { step: 0, walker: BatchWalker { position: 0 }, rng: Rng::new(args.seed) }),
    };
    if state.step >= plan.steps {
        // A run killed after its last checkpoint but before its final outputs were complete is
        // finished now; one whose outputs are all there has nothing left to do.
        if state.step > plan.steps || final_outputs_are_current(&args, &cfg, &plan.params) {
            bail!(
                "the run already completed {} of {} steps; pass a larger --steps to continue it",
                state.step,
                plan.steps
            );
        }
        println!("the run completed its {} steps before it was interrupted; writing its final outputs", state.step);
        return write_final_outputs(&args, &cfg, &plan.params, plan.log_path.as_deref(), real_params);
    }
    // Fail now, not after hours of training, when the checkpoint and the model cannot fit.
    let checkpoint_bytes = 3 * 4 * layout.total as u64 + HEADER_ALLOWANCE;
    let model_bytes = 4 * real_params as u64 + HEADER_ALLOWANCE;
    if let Some(dir) = &args.out {
        check_free_space(dir, out_flag, checkpoint_bytes + model_bytes, "the checkpoint and the final model")?;
    }
    if let Some(dir) = &args.save {
        check_writable(dir, "--save")?;
        check_free_space(dir, "--save", model_bytes, "the model")?;
    }
    let mut last_checkpoint = (state.step > 0).then_some(state.step);
    let mut engine = Engine::new(&device, cfg, plan.params, optimizer)?;
    if state.step > 0 {
        println!("resuming after step {} (data position {})", state.step, state.walker.position);
    }
    let mut log = match &plan.log_path {
        // A resumed run without a checkpoint (killed before its first) starts its log afresh.
        Some(path) if args.resume.is_some() && state.step > 0 => Some(JsonlLog::resume(path, state.step)?),
        Some(path) => {
            let mut log = JsonlLog::create(path)?;
            log.write(&serde_json::json!({
                "event": "start", "config": cfg, "params": real_params, "args": args,
                "batch_size": b, "seq_len": t, "steps": plan.steps,
            }))?;
            Some(log)
        }
        None => None,
    };
    let mut skipped: Vec<usize> = log.as_ref().map(|l| l.skipped_before.clone()).unwrap_or_default();

    let console = Console::new(state.step, plan.steps);
    // From here on Ctrl-C or SIGTERM finishes the step under way and checkpoints it (see
    // interrupt); before, there is nothing to save, and a signal stops the run at once.
    let stop_on_signal = args.out.as_deref().map(|dir| StopOnSignal::install(dir, last_checkpoint.is_some()));
    let (mut buf, mut x, mut y) = (Vec::new(), vec![0u32; b * t], vec![0u32; b * t]);
    while state.step < plan.steps {
        let step = state.step + 1;
        let started = Instant::now();
        engine.zero_grad()?;
        let mut loss = 0.0;
        for _ in 0..args.grad_accum {
            state.walker.next_batch(&plan.train, &mut buf, &mut x, &mut y);
            loss += engine.forward(&x, &y, b, t)? / args.grad_accum as f64;
            engine.backward(1.0 / args.grad_accum as f64)?;
        }
        let grad_norm = engine.grad_norm()?;
        let lr = learning_rate(args.lr_schedule, step, plan.steps, args.lr, args.min_lr, args.warmup_steps);
        let finite = loss.is_finite() && grad_norm.is_finite();
        if finite {
            engine.update(lr, &hp, grad_norm, args.grad_clip)?;
        } else {
            let culprit = match engine.first_nonfinite_grad(&layout)? {
                Some(bad) => format!("first non-finite gradient: {bad}"),
                None => "every parameter gradient is finite".to_string(),
            };
            let what = format!("the loss is {loss} and the gradient norm is {grad_norm} ({culprit})");
            if !args.skip_nonfinite {
                console.finish();
                let kept = match (&args.out, last_checkpoint) {
                    (Some(dir), Some(s)) => format!(" (the checkpoint of step {s} in {} is intact)", dir.display()),
                    (Some(_), None) => " (no checkpoint had been written yet)".to_string(),
                    (None, _) => String::new(),
                };
                bail!(
                    "step {step}: {what}; stopped before applying its update{kept}; lower --lr, or pass \
                     --skip-nonfinite to skip such steps"
                );
            }
            // The data position has advanced; the weights and optimizer state have not.
            console.println(&format!("step {step}: {what}; skipped its update (--skip-nonfinite)"));
            skipped.push(step);
        }
        let seconds = started.elapsed().as_secs_f64();
        state.step = step;

        let val_due = args.val_every > 0 && step % args.val_every == 0 || step == plan.steps;
        let val_loss = match &plan.val {
            Some(val) if val_due => Some(mean_loss_over(&mut engine, val, b, t, args.val_batches)?),
            _ => None,
        };
        let record = StepRecord {
            step,
            loss,
            grad_norm,
            lr,
            ms: seconds * 1e3,
            tok_per_s: tokens_per_step as f64 / seconds,
            val_loss,
            skipped: !finite,
        };
        console.step(&record);
        if let Some(log) = &mut log {
            log.write(&record).map_err(|e| mid_run(e, args.out.as_deref(), last_checkpoint))?;
        }
        let stop = stop_on_signal.as_ref().and_then(StopOnSignal::requested).filter(|_| step < plan.steps);
        if let Some(dir) = &args.out {
            let due = args.checkpoint_every > 0 && step % args.checkpoint_every == 0 || step == plan.steps;
            if due || stop.is_some() {
                save_checkpoint(dir, &engine, &layout, &cfg, &state, log.as_ref(), checkpoint_bytes)
                    .map_err(|e| mid_run(e, Some(dir), last_checkpoint))?;
                last_checkpoint = Some(step);
                if let Some(watch) = &stop_on_signal {
                    watch.checkpoint_written();
                }
            }
            if let Some(signal) = stop {
                console.finish();
                return Err(Interrupted {
                    signal,
                    message: format!(
                        "stopped by {} after step {step} of {}; its checkpoint is in {}: continue with finch train \
                         --resume {2}",
                        signal_name(signal),
                        plan.steps,
                        dir.display()
                    ),
                }
                .into());
            }
        }
    }
    // A signal now lets the final outputs be written; a second one stops at once, and --resume
    // writes them from the last checkpoint.
    console.finish();
    engine.with_state(|params, _| write_final_outputs(&args, &cfg, params, plan.log_path.as_deref(), real_params))?;
    if !skipped.is_empty() {
        let mut list: Vec<String> = skipped.iter().take(10).map(|s| s.to_string()).collect();
        if skipped.len() > 10 {
            list.push("…".into());
        }
        println!(
            "skipped {} of {} updates whose loss or gradient norm was not finite (--skip-nonfinite): steps {}",
            skipped.len(),
            plan.steps,
            list.join(", ")
        );
    }
    Ok(())
}

/// Room for a safetensors header and metadata on top of the tensors, in the space checks.
const HEADER_ALLOWANCE: u64 = 64 << 10;

/// Writes the checkpoint of the step just finished, after syncing the log (so a power cut never
/// leaves a checkpoint ahead of its log) and checking the disk has room. Weights that are not
/// finite are never written over the last good checkpoint.
fn save_checkpoint(
    dir: &Path,
    engine: &Engine,
    layout: &ParamLayout,
    cfg: &GptConfig,
    state: &TrainState,
    log: Option<&JsonlLog>,
    bytes: u64,
) -> Result<()> {
    if let Some(log) = log {
        log.sync()?;
    }
    check_free_space(dir, "--out", bytes, "the checkpoint")?;
    engine.with_state(|params, optimizer| {
        if let Some(bad) = first_nonfinite(layout, params) {
            bail!("step {}: the weights are not finite ({bad}); not saving them as the checkpoint", state.step);
        }
        checkpoint::save(dir, cfg, params, optimizer, state)
            .map_err(|e| explain_write_error(e, "--out", dir, Some((bytes, "the checkpoint"))))
    })
}

/// Adds, to a failure in the middle of a run, what is left and how to go on.
fn mid_run(e: anyhow::Error, out: Option<&Path>, last_checkpoint: Option<usize>) -> anyhow::Error {
    match (out, last_checkpoint) {
        (Some(dir), Some(s)) => anyhow::anyhow!(
            "{e:#}; the checkpoint of step {s} is intact: fix this, then continue with --resume {}",
            dir.display()
        ),
        (Some(_), None) => anyhow::anyhow!("{e:#}; no checkpoint had been written yet"),
        (None, _) => e,
    }
}

/// Creates `dir` and checks a file can be created in it, so an unwritable --save fails at the
/// start of a run rather than at its end.
fn check_writable(dir: &Path, flag: &str) -> Result<()> {
    create_dir(dir, flag)?;
    let probe = dir.join(".finch-write-test.tmp");
    std::fs::File::create(&probe).map_err(|e| {
        let e = anyhow::Error::new(e).context(format!("{flag} {}: cannot write", dir.display()));
        explain_write_error(e, flag, dir, None)
    })?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

/// Whether the model directories a finished run writes (`RUN_DIR/model`, and --save) hold
/// exactly `params` and the config.
fn final_outputs_are_current(args: &TrainArgs, cfg: &GptConfig, params: &[f32]) -> bool {
    let current = |dir: &Path| {
        let config = std::fs::read_to_string(dir.join(modelio::CONFIG_FILE))
            .ok()
            .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok());
        config == Some(modelio::config_json(cfg))
            && modelio::load_params(dir, cfg).is_ok_and(|saved| {
                saved.len() == params.len()
                    && saved.iter().zip(params).all(|(a, b)| a.to_bits() == b.to_bits() || *a == 0.0 && *b == 0.0)
            })
    };
    args.out.as_ref().is_none_or(|d| current(&d.join("model"))) && args.save.as_deref().is_none_or(current)
}

/// What a finished run writes: `RUN_DIR/model` first, then the loss plot, then --save.
fn write_final_outputs(
    args: &TrainArgs,
    cfg: &GptConfig,
    params: &[f32],
    log_path: Option<&Path>,
    real_params: usize,
) -> Result<()> {
    if let Some(bad) = first_nonfinite(&ParamLayout::new(cfg), params) {
        bail!("the final weights are not finite ({bad}); not saving them as the model");
    }
    let model_bytes = 4 * real_params as u64 + HEADER_ALLOWANCE;
    if let Some(dir) = &args.out {
        modelio::save_model(&dir.join("model"), cfg, params, "--out")
            .map_err(|e| explain_write_error(e, "--out", dir, Some((model_bytes, "the model"))))?;
        // The plot is a convenience: a failure to draw it must not fail a finished run.
        let plotted = match log_path {
            Some(log) => match crate::plot::plot_logs(&[log.to_path_buf()], &dir.join("loss.svg"), None) {
                Ok(()) => ", loss.svg",
                Err(e) => {
                    eprintln!("warning: could not plot the loss: {e:#}");
                    ""
                }
            },
            None => "",
        };
        println!("run directory: {} (log.jsonl, checkpoint, model/{plotted})", dir.display());
    }
    if let Some(dir) = &args.save {
        modelio::save_model(dir, cfg, params, "--save")
            .map_err(|e| explain_write_error(e, "--save", dir, Some((model_bytes, "the model"))))?;
        println!("saved model to {}", dir.display());
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

    #[test]
    fn a_run_beyond_the_available_host_memory_is_refused_with_the_numbers() {
        let cfg = GptConfig::preset(Preset::Gpt2);
        let n = ParamLayout::new(&cfg).total;
        let cpu = host_memory_plan(false, &cfg, 4, 64);
        let needed = 16 * n + 8 * activation_count(&cfg, 4, 64);
        let room = |bytes: usize| AvailableMemory { bytes: bytes as u64, limited_by: None };
        assert_eq!(memory_refusal(&cpu, Some((4, 64)), &room(needed)), None);
        let refusal = memory_refusal(&cpu, Some((4, 64)), &room(needed - 1)).expect("one byte short");
        assert!(refusal.starts_with("not enough memory: training needs "), "{refusal}");
        assert!(refusal.contains(" weights+grads+optimizer, ") && refusal.contains(" activations at B=4, T=64) but "));
        assert!(refusal.ends_with(" is available; lower --batch-size or --seq-len, or use a smaller model"));

        // A GPU run (no device needed to plan it) holds a checkpoint's worth on the host, whatever
        // the batch; the refusal names the cgroup that limits it.
        let limited = AvailableMemory {
            bytes: (12 * n - 1) as u64,
            limited_by: Some("the memory limit of cgroup /job (1.0 GiB)".into()),
        };
        let gpu = host_memory_plan(true, &cfg, 4, 64);
        assert_eq!(gpu, host_memory_plan(true, &cfg, 64, 1024));
        let refusal = memory_refusal(&gpu, None, &limited).expect("one byte short");
        assert_eq!(
            refusal,
            format!(
                "not enough memory: training needs {} ({} weights and AdamW moments copied from the GPU for each \
                 checkpoint) but {} is available under the memory limit of cgroup /job (1.0 GiB); use a smaller model",
                human_bytes(12 * n),
                human_bytes(12 * n),
                human_bytes(12 * n - 1)
            )
        );
        assert_eq!(memory_refusal(&gpu, None, &room(12 * n)), None);
    }

    #[test]
    fn a_gpu_run_beyond_the_free_device_memory_is_refused_with_its_plan() {
        // The refusal of check_gpu_memory, planned without a GPU: GPT-2 small at B=8, T=1024.
        let cfg = GptConfig::preset(Preset::Gpt2);
        for precision in [Precision::Bf16, Precision::F32] {
            let plan = gpu_memory_plan(&cfg, 8, 1024, precision);
            let needed = plan_bytes(&plan);
            assert_eq!(gpu_memory_refusal(&plan, needed, "H200", precision), None);
            let refusal = gpu_memory_refusal(&plan, needed - 1, "H200", precision).expect("one byte short");
            assert!(refusal.starts_with(&format!("not enough GPU memory: training needs {} (", human_bytes(needed))));
            for part in ["weights, ", "master weights, ", "AdamW moments, ", "activations, ", "activation gradients, "]
            {
                assert!(refusal.contains(part), "{refusal} lacks {part}");
            }
            assert!(refusal.contains(" is free on H200; lower --batch-size or --seq-len"));
            assert_eq!(refusal.contains("--precision bf16"), precision == Precision::F32, "{refusal}");
        }
        // bf16 storage halves the weights and the activations the plan counts.
        let bytes = |p| plan_bytes(&gpu_memory_plan(&cfg, 8, 1024, p));
        assert!(bytes(Precision::Bf16) < bytes(Precision::F32));
    }
}
