//! Load: from checked flags to what the training loop needs. The run directory (locked, cleared
//! of interrupted writes, its flags saved), the model and batch shape, the memory checks, the
//! token streams and the initial weights (random, `--init`, or the run's checkpoint), and the
//! start-up lines that say what was chosen.

use super::args::{batch_shape, model_config, BatchShape, TrainArgs, ARGS_FILE};
use super::memory::{check_gpu_memory, check_memory, describe_plan, host_memory_plan, plan_bytes};
use crate::cli::device::Device;
use crate::cpu::optimizer::AdamW;
use crate::cuda::model::memory_plan as gpu_memory_plan;
use crate::formats::checkpoint::{self, TrainState};
use crate::formats::huggingface;
use crate::formats::tokens::TokenStream;
use crate::model::config::GptConfig;
use crate::model::init::init_params;
use crate::model::layout::ParamLayout;
use crate::os::files::{create_dir, explain_write_error, lock_run_dir, remove_stale_temp_files, write_atomically};
use crate::os::resources::human_bytes;
use anyhow::{bail, Context, Result};
use std::fs::File;
use std::path::PathBuf;

/// Creates and locks the run directory (`--out`, or `--resume`'s) for the whole run, clears it of
/// what interrupted writes left behind and saves the flags there. The lock goes when the returned
/// file is dropped, or when the process dies.
pub(super) fn prepare_run_dir(args: &TrainArgs) -> Result<Option<File>> {
    let Some(dir) = &args.out else { return Ok(None) };
    let out_flag = out_flag(args);
    create_dir(dir, out_flag)?;
    let lock = lock_run_dir(dir, out_flag)?;
    remove_stale_temp_files(dir);
    remove_stale_temp_files(&dir.join("model"));
    if args.resume.is_none() && dir.join(checkpoint::CHECKPOINT_FILE).exists() {
        bail!(
            "--out {}: this run directory already holds a checkpoint; continue it with --resume {0} or choose another --out",
            dir.display()
        );
    }
    write_atomically(&dir.join(ARGS_FILE), (serde_json::to_string_pretty(args)? + "\n").as_bytes())
        .map_err(|e| explain_write_error(e, out_flag, dir, None))?;
    Ok(Some(lock))
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
    pub config: GptConfig,
    /// Where the initial weights come from, for the console.
    pub init_source: String,
    pub params: Vec<f32>,
    pub b: usize,
    pub t: usize,
    pub steps: usize,
    pub train: TokenStream,
    pub val: Option<TokenStream>,
    pub log_path: Option<PathBuf>,
    /// For --resume from a checkpoint: its optimizer state and where the loop stood.
    pub resumed: Option<(AdamW<f32>, TrainState)>,
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

pub(super) fn plan(a: &TrainArgs, device: &Device) -> Result<Plan> {
    // A resumed run's model is read from its checkpoint's header: the memory check below comes
    // before the checkpoint's tensors are loaded.
    let resume_from = a.resume.as_deref().map(checkpoint::open).transpose()?.flatten();
    let config = match (&resume_from, &a.init) {
        (Some(file), _) => file.config,
        (None, Some(dir)) => huggingface::load_config(dir)?,
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
        (None, Some(dir)) => (huggingface::load_params(dir, &config)?, dir.display().to_string(), None),
        (None, None) => (init_params(&config, a.seed), format!("random init, seed {}", a.seed), None),
    };
    let log_path = a.log.clone().or_else(|| a.out.as_ref().map(|d| d.join("log.jsonl")));
    Ok(Plan { config, init_source, params, b, t, steps, train, val, log_path, resumed })
}

/// The start-up lines: the model, the data, the device and its memory plan.
pub(super) fn print_setup(args: &TrainArgs, plan: &Plan, device: &Device, device_reason: Option<String>) {
    let cfg = &plan.config;
    let (b, t) = (plan.b, plan.t);
    println!(
        "model: {:.2}M parameters ({} layers, {} heads, {} channels, vocab {} padded to {}, context {}) from {}",
        real_params(cfg) as f64 / 1e6,
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
    match device {
        Device::Cpu => {
            println!(
                "device: cpu, {} threads, f32{why}; memory: {}",
                rayon::current_num_threads(),
                describe_plan(&host_memory_plan(false, cfg, b, t))
            );
        }
        Device::Cuda(gpu, precision) => {
            let plan = gpu_memory_plan(cfg, b, t, *precision);
            let total = plan_bytes(&plan);
            println!(
                "device: cuda, {} (compute {}.{}, {} kernels), {precision}{why}",
                gpu.name, gpu.capability.0, gpu.capability.1, gpu.ptx_arch
            );
            println!("GPU memory: {} = {}", human_bytes(total), describe_plan(&plan));
        }
    }
}

/// Parameters without the vocabulary padding: what the model has, and what its export holds.
pub(super) fn real_params(cfg: &GptConfig) -> usize {
    ParamLayout::new(cfg).total - (cfg.padded_vocab_size() - cfg.vocab_size) * cfg.n_embd
}
