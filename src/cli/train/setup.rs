//! Load: from checked flags to what the training loop needs. The run directory (locked, cleared
//! of interrupted writes, its flags saved), the model and batch shape (the vocabulary and
//! tokenizer from meta.json beside the data), the memory checks, the token streams and what a
//! validation evaluates, the initial weights (random, `--init`, or the run's checkpoint), and the
//! start-up lines that say what was chosen.

use super::args::{batch_shape, model_config, BatchShape, TrainArgs};
use super::memory::{check_gpu_memory, check_memory, describe_plan, gpu_plan, host_memory_plan, plan_bytes};
use crate::cli::device::Device;
use crate::cpu::optimizer::AdamW;
use crate::dist::world::World;
use crate::formats::checkpoint::{self, TrainState};
use crate::formats::hf_tokenizer::{HfTokenizer, TOKENIZER_FILE};
use crate::formats::rundir::{ModelSource, ARGS_FILE, MODEL_DIR};
use crate::formats::tokenizer::Tokenizer;
use crate::formats::tokens::{expand_paths, read_meta, DataMeta, TokenStream};
use crate::formats::trainlog::{human_duration, plural};
use crate::model::family::ModelConfig;
use crate::os::files::{
    create_dir, explain_write_error, lock_run_dir, remove_stale_temp_files, write_atomically, LOCK_FILE,
};
use crate::os::resources::human_bytes;
use anyhow::{bail, Context, Result};
use std::fs::File;
use std::path::PathBuf;
use std::time::Instant;

/// The run directory (`--out`, or `--resume`'s), locked for the whole run. A start that fails
/// before the first step leaves the directory as it found it: the lock file goes, and so does the
/// directory if this start created it (and nothing else was put there).
pub(super) struct RunDir {
    pub dir: PathBuf,
    _lock: File,
    created: bool,
    started: bool,
}

impl RunDir {
    /// The run has started: from now on the directory is its.
    pub fn started(&mut self) {
        self.started = true;
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        if !self.started {
            let _ = std::fs::remove_file(self.dir.join(LOCK_FILE));
            if self.created {
                let _ = std::fs::remove_dir(&self.dir); // only if empty
            }
        }
    }
}

/// Creates and locks the run directory and clears it of what interrupted writes left behind.
pub(super) fn prepare_run_dir(args: &TrainArgs) -> Result<Option<RunDir>> {
    let Some(dir) = &args.out else { return Ok(None) };
    let out_flag = out_flag(args);
    let created = !dir.exists();
    create_dir(dir, out_flag)?;
    let lock = lock_run_dir(dir, out_flag)?;
    let run_dir = RunDir { dir: dir.clone(), _lock: lock, created, started: false };
    remove_stale_temp_files(dir);
    remove_stale_temp_files(&dir.join(MODEL_DIR));
    if args.resume.is_none() && dir.join(checkpoint::CHECKPOINT_FILE).exists() {
        bail!(
            "--out {}: this run directory already holds a checkpoint; continue it with --resume {0} or choose another --out",
            dir.display()
        );
    }
    Ok(Some(run_dir))
}

/// Saves the run's flags in its directory, for --resume, and the tokenizer.json its ids are of.
pub(super) fn save_args(args: &TrainArgs) -> Result<()> {
    let Some(dir) = &args.out else { return Ok(()) };
    if let Some(from) = &args.tokenizer_dir {
        HfTokenizer::load(from, "tokenizer")?.copy_into(dir, out_flag(args))?;
    }
    write_atomically(&dir.join(ARGS_FILE), (serde_json::to_string_pretty(args)? + "\n").as_bytes())
        .map_err(|e| explain_write_error(e, out_flag(args), dir, None))
}

/// The flag that named the run directory, for messages.
pub(super) fn out_flag(args: &TrainArgs) -> &'static str {
    if args.resume.is_some() {
        "--resume"
    } else {
        "--out"
    }
}

/// Flags checked and combined into what the loop needs.
pub(super) struct Plan {
    pub config: ModelConfig,
    /// Where the initial weights come from, for the console.
    pub init_source: String,
    pub params: Vec<f32>,
    pub b: usize,
    pub t: usize,
    pub steps: usize,
    pub train: TokenStream,
    pub val: Option<ValSet>,
    pub log_path: Option<PathBuf>,
    /// For --resume from a checkpoint: its optimizer state and where the loop stood.
    pub resumed: Option<(AdamW<f32>, TrainState)>,
    /// What the token ids mean, when known: recorded with the saved model.
    pub tokenizer: Option<Tokenizer>,
    /// For a tokenizer.json: the directory holding it, copied into the run's and the saved model.
    pub tokenizer_dir: Option<PathBuf>,
    pub device: Device,
    /// Why `device` was chosen, for the console (under `--device auto`).
    pub device_reason: Option<String>,
}

/// The validation data and what one validation evaluates: `batches` batches of B×T tokens, or
/// fewer rows (or shorter ones) when the data holds less than a batch.
pub(super) struct ValSet {
    pub stream: TokenStream,
    pub b: usize,
    pub t: usize,
    pub batches: usize,
    /// Why it evaluates less than --val-batches full batches, for the console.
    pub note: Option<String>,
}

fn open_stream(pattern: &str, flag: &str, a: &TrainArgs, cfg: &ModelConfig, window: usize) -> Result<TokenStream> {
    let stream = TokenStream::open(pattern, flag, a.data_format, cfg.vocab_size())?;
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

/// What each validation evaluates of `stream`: as many distinct batches as it holds, up to
/// --val-batches (more would evaluate the same windows again); less than one batch is evaluated
/// as fewer, or shorter, sequences.
pub(super) fn val_set(stream: TokenStream, flag: &str, b: usize, t: usize, val_batches: usize) -> Result<ValSet> {
    let n = stream.len();
    let name = stream.describe();
    if n < 2 {
        bail!("{flag} {name}: {n} token, too few to validate on (a sequence needs at least 2)");
    }
    let full = (n - 1) / (b * t);
    let (vb, vt, batches, note) = if full >= val_batches {
        (b, t, val_batches, None)
    } else if full >= 1 {
        let note = format!(
            "{flag} {name} holds {} of {b}×{t} tokens: each validation evaluates those, not the {val_batches} of \
             --val-batches (more would repeat them)",
            plural(full as u64, "batch")
        );
        (b, t, full, Some(note))
    } else {
        let (rows, len) = if n > t { ((n - 1) / t, t) } else { (1, n - 1) };
        let note = format!(
            "{flag} {name} holds {n} tokens, less than one batch of {b}×{t}: each validation evaluates {} of {len} \
             tokens",
            plural(rows as u64, "sequence")
        );
        (rows, len, 1, Some(note))
    };
    Ok(ValSet { stream, b: vb, t: vt, batches, note })
}

/// Everything the run needs before its first step; `device` gives way to the CPU under `--device
/// auto` when the GPU's kernels cannot run the model.
/// `ranks`: the processes of a data-parallel job (1 alone), each training on its share.
pub(super) fn plan(a: &TrainArgs, device: Device, device_reason: Option<String>, ranks: usize) -> Result<Plan> {
    let data = a.data.as_deref().context("--data is required")?;
    let meta = read_meta(&expand_paths(data, "--data")?[0]);
    // A resumed run's model is read from its checkpoint's header: the memory check below comes
    // before the checkpoint's tensors are loaded.
    let resume_from = a.resume.as_deref().map(checkpoint::open).transpose()?.flatten();
    if let (Some(dir), None, false) = (&a.resume, &resume_from, a.restart) {
        bail!(
            "--resume {}: the run has no checkpoint yet (it stopped before its first); pass --restart to start it \
             again from step 1",
            dir.display()
        );
    }
    let init = a.init.as_deref().map(|dir| ModelSource::find(dir, "--init")).transpose()?;
    let (config, recorded) = match (&resume_from, &init) {
        (Some(file), _) => (file.config, a.tokenizer),
        (None, Some(source)) => (source.config()?, source.tokenizer()),
        (None, None) => (model_config(a, meta.as_ref().map(|(_, m)| m.vocab_size))?, a.tokenizer),
    };
    let tokenizer = resolve_tokenizer(a, meta.as_ref(), recorded, &config, init.as_ref())?;
    let tokenizer_dir = match tokenizer {
        Some(Tokenizer::HuggingFace) => Some(tokenizer_json_dir(a, meta.as_ref(), init.as_ref(), &config)?),
        _ => None,
    };
    let (device, device_reason) = device.fit(device_reason, &a.device, &config)?;
    let device = &device;
    let BatchShape { b, t, window, step_tokens } = batch_shape(a, &config)?;
    // The CPU's needs depend on the batch shape; a GPU run's host needs do not.
    let on_gpu = matches!(device, Device::Cuda(..));
    check_memory(&host_memory_plan(on_gpu, &config, b, t), (!on_gpu).then_some((b, t)))?;
    if let Device::Cuda(gpu, precision) = device {
        check_gpu_memory(gpu, &config, (b, t), *precision, (a.recompute, ranks))?;
    }
    // A job's ranks read disjoint windows of each global batch (BatchWalker::next_batch_of).
    let train = open_stream(data, "--data", a, &config, window * ranks)?;
    if meta.is_none() {
        warn_if_ids_look_smaller(&train, &config);
    }
    let val = match a.val.as_deref() {
        Some(pattern) => {
            check_val_meta(pattern, meta.as_ref())?;
            let stream = TokenStream::open(pattern, "--val", a.data_format, config.vocab_size())?;
            Some(val_set(stream, "--val", b, t, a.val_batches)?)
        }
        None => None,
    };
    let steps = a.steps.unwrap_or_else(|| (train.len() / step_tokens).max(1));
    let (params, init_source, resumed) = match (resume_from, &init) {
        (Some(file), _) => {
            let ck = file.load()?;
            (ck.params, "the run's checkpoint".to_string(), Some((ck.optimizer, ck.state)))
        }
        (None, Some(source)) => (source.params(&config)?, source.describe(), None),
        (None, None) => (config.init_params(a.seed), format!("random init, seed {}", a.seed), None),
    };
    let log_path = a.log.clone().or_else(|| a.out.as_ref().map(|d| d.join("log.jsonl")));
    let device = device.clone();
    Ok(Plan {
        config,
        init_source,
        params,
        b,
        t,
        steps,
        train,
        val,
        log_path,
        resumed,
        tokenizer,
        tokenizer_dir,
        device,
        device_reason,
    })
}

/// Where the tokenizer.json of a run whose ids are a tokenizer.json's is: beside the data (finch
/// tokenize copies it there), in the --init model, or in the run directory; checked against the
/// model's vocabulary.
fn tokenizer_json_dir(
    a: &TrainArgs,
    meta: Option<&(PathBuf, DataMeta)>,
    init: Option<&ModelSource>,
    config: &ModelConfig,
) -> Result<PathBuf> {
    let beside_data = meta.map(|(path, _)| path.parent().unwrap_or(std::path::Path::new(".")).to_path_buf());
    let candidates = [beside_data, init.map(|s| s.tokenizer_dir()), a.resume.clone()];
    let Some(dir) = candidates.into_iter().flatten().find(|d| d.join(TOKENIZER_FILE).is_file()) else {
        bail!(
            "the data's ids are a tokenizer.json's, but there is no {TOKENIZER_FILE} beside --data, in --init or in              the run directory; put the one the data was tokenized with beside it"
        );
    };
    let tokenizer = HfTokenizer::load(&dir, "tokenizer")?;
    if tokenizer.vocab_size > config.vocab_size() {
        bail!(
            "{}: its {} tokens do not fit the model's vocabulary of {}",
            dir.join(TOKENIZER_FILE).display(),
            tokenizer.vocab_size,
            config.vocab_size()
        );
    }
    Ok(dir)
}

/// What the token ids mean: meta.json beside --data when `finch tokenize` wrote one (refusing a
/// model or a --tokenizer that does not match it), else --tokenizer, the tokenizer recorded with
/// the --init model or the run, or the one the vocabulary size implies (50257: gpt2, 256: bytes).
fn resolve_tokenizer(
    a: &TrainArgs,
    meta: Option<&(PathBuf, DataMeta)>,
    recorded: Option<Tokenizer>,
    config: &ModelConfig,
    init: Option<&ModelSource>,
) -> Result<Option<Tokenizer>> {
    if let Some((path, m)) = meta {
        let tokens =
            format!("{} says its tokens are {} (vocabulary {})", path.display(), m.tokenizer.name(), m.vocab_size);
        if let Some(t) = a.tokenizer.filter(|t| *t != m.tokenizer) {
            bail!("--tokenizer {} does not match the data: {tokens}; drop --tokenizer", t.name());
        }
        if config.vocab_size() != m.vocab_size {
            let v = config.vocab_size();
            let (model, advice) = match (init, a.resume.is_some()) {
                (_, true) => {
                    (format!("the run's model has vocabulary {v}"), "resume it on the tokens it was trained on")
                }
                (Some(source), _) => (
                    format!("--init {} has vocabulary {v}", source.path().display()),
                    "tokenize the data with the model's tokenizer",
                ),
                (None, _) => {
                    (format!("--vocab-size {v} does not match the data"), "drop --vocab-size: meta.json sets it")
                }
            };
            bail!("{model}, but {tokens}; {advice}");
        }
        return Ok(Some(m.tokenizer));
    }
    let tokenizer = a.tokenizer.or(recorded).or_else(|| Tokenizer::guess_from_vocab(config.vocab_size()));
    if let Some((t, v)) = tokenizer.and_then(|t| Some((t, t.vocab_size()?))).filter(|&(_, v)| v > config.vocab_size()) {
        bail!("--tokenizer {}: its {v} tokens do not fit the model's vocabulary of {}", t.name(), config.vocab_size());
    }
    Ok(tokenizer)
}

/// Without meta.json to say what the tokens are: a warning when the largest id is far below the
/// vocabulary, the mark of byte tokens (or another small tokenizer's) in a GPT-2-sized model.
fn warn_if_ids_look_smaller(train: &TokenStream, config: &ModelConfig) {
    let largest = train.largest_id() as usize;
    if largest < config.vocab_size() / 4 {
        eprintln!(
            "warning: the largest token id in --data is {largest}, far below the model's vocabulary of {}: if \
             these are byte tokens, pass --vocab-size 256 (finch tokenize writes a meta.json beside its shards \
             that sets it)",
            config.vocab_size()
        );
    }
}

/// --val's meta.json, if it has one, must describe the same tokens as --data's.
fn check_val_meta(pattern: &str, train: Option<&(PathBuf, DataMeta)>) -> Result<()> {
    let val = read_meta(&expand_paths(pattern, "--val")?[0]);
    if let (Some((vp, v)), Some((tp, t))) = (&val, train) {
        if v != t {
            bail!(
                "--val: {} says its tokens are {} but {} says --data's are {}",
                vp.display(),
                v.tokenizer.name(),
                tp.display(),
                t.tokenizer.name()
            );
        }
    }
    Ok(())
}

/// The start-up lines: the model, the data, the device and its memory plan.
pub(super) fn print_setup(args: &TrainArgs, plan: &Plan, world: &World) {
    let (device, device_reason) = (&plan.device, plan.device_reason.as_ref());
    let cfg = &plan.config;
    let (b, t) = (plan.b, plan.t);
    println!("model: {:.2}M parameters ({}) from {}", cfg.real_params() as f64 / 1e6, cfg.describe(), plan.init_source);
    println!(
        "data: {} ({} tokens{}); {} of {b}×{t}×{} tokens",
        plan.train.describe(),
        plan.train.len(),
        plan.tokenizer.map(|t| format!(", {}", t.name())).unwrap_or_default(),
        plural(plan.steps as u64, "step"),
        args.grad_accum
    );
    if !world.is_single() {
        println!(
            "data parallel: {} processes ({}), one GPU each, over NCCL; each step takes {}×{b}×{t}×{} tokens, as one \
             process at --batch-size {}; each rank keeps 1/{0} of the master weights and AdamW's state (ZeRO-1)",
            world.size,
            world.launcher,
            world.size,
            args.grad_accum,
            world.size * b
        );
    }
    if let Some(note) = plan.val.as_ref().and_then(|v| v.note.as_ref()) {
        println!("validation: {note}");
    }
    let why = device_reason.map(|r| format!(" ({r})")).unwrap_or_default();
    match device {
        Device::Cpu => {
            println!(
                "device: cpu, {} threads, f32{why}; memory: {}",
                rayon::current_num_threads(),
                describe_plan(&host_memory_plan(false, cfg, b, t))
            );
            if let Some(note) = cpu_time_note(cfg, b, t, args.grad_accum, plan.steps) {
                println!("{note}");
            }
        }
        Device::Cuda(gpu, precision) => {
            let plan = gpu_plan(cfg, (b, t), *precision, args.recompute, world.size);
            let total = plan_bytes(&plan);
            println!(
                "device: cuda, {} (compute {}.{}, {} kernels), {precision}{why}",
                gpu.name, gpu.capability.0, gpu.capability.1, gpu.ptx_arch
            );
            let recompute = if args.recompute { " (--recompute: LayerNorm and GELU outputs recomputed)" } else { "" };
            println!("GPU memory: {} = {}{recompute}", human_bytes(total), describe_plan(&plan));
        }
    }
}

/// Runs longer than this on the CPU get a note at the start.
const LONG_RUN_SECONDS: f64 = 3600.0;

/// For a CPU run that would take hours: about how long a step and the run take, from the model's
/// arithmetic and the speed of this machine's matmul, measured now (a fraction of a second).
fn cpu_time_note(cfg: &ModelConfig, b: usize, t: usize, accum: usize, steps: usize) -> Option<String> {
    let flops = cfg.step_flops(b, t) * accum as f64;
    // No CPU does 2 TFLOP/s: below that bound, the run is short whatever the machine.
    if flops * steps as f64 / 2e12 < LONG_RUN_SECONDS {
        return None;
    }
    let seconds = flops / measured_matmul_flops();
    let total = seconds * steps as f64;
    (total >= LONG_RUN_SECONDS).then(|| {
        format!(
            "note: at about {} per step on this CPU, {} take about {}; a GPU (--device cuda), a smaller model \
             (--n-layer, --n-embd) or fewer --steps finish sooner",
            human_duration(seconds),
            plural(steps as u64, "step"),
            human_duration(total)
        )
    })
}

/// FLOP/s of the reference matmul on this machine, at a GPT-2-like shape, all threads; training
/// steps also spend time outside matmuls, which the 0.8 allows for.
fn measured_matmul_flops() -> f64 {
    use crate::cpu::matmul::{matmul_forward, WeightLayout};
    let (n, c, oc) = (512, 768, 768);
    let (inp, weight, mut out) = (vec![0.5f32; n * c], vec![0.25f32; c * oc], vec![0f32; n * oc]);
    matmul_forward(&mut out, &inp, &weight, None, n, c, oc, WeightLayout::InOut); // warm up
    let started = Instant::now();
    let mut runs = 0;
    while runs < 3 || started.elapsed().as_secs_f64() < 0.2 {
        matmul_forward(&mut out, &inp, &weight, None, n, c, oc, WeightLayout::InOut);
        runs += 1;
    }
    0.8 * 2.0 * (n * c * oc * runs) as f64 / started.elapsed().as_secs_f64()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::Preset;

    #[test]
    fn a_long_cpu_run_is_projected_from_its_arithmetic() {
        // GPT-2 124M at B=8, T=1024: 3 × (2 · 124M · 8192 + attention) ≈ 6.5 TFLOP a step.
        let gpt2 = ModelConfig::preset(Preset::Gpt2);
        let flops = gpt2.step_flops(8, 1024);
        assert!((6.0e12..7.0e12).contains(&flops), "{flops:e}");
        let note = cpu_time_note(&gpt2, 8, 1024, 1, 5000).expect("days on any CPU");
        assert!(note.starts_with("note: at about ") && note.contains(" per step on this CPU, 5000 steps take about "));
        let tiny = ModelConfig::Gpt2(crate::model::config::GptConfig {
            n_layer: 1,
            n_head: 1,
            n_embd: 8,
            vocab_size: 50,
            n_positions: 8,
            layer_norm_epsilon: 1e-5,
        });
        assert_eq!(cpu_time_note(&tiny, 1, 8, 1, 100), None);
    }
}
