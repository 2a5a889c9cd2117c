//! What a run leaves behind: checkpoints during the run, and at its end the model
//! (`RUN_DIR/model`, `--save`) and the loss plot; with the free-space checks and the messages that
//! say what is intact when a write fails.

use super::args::TrainArgs;
use super::engine::{first_nonfinite, Engine};
use crate::formats::checkpoint::{self, TrainState};
use crate::formats::hf_tokenizer::HfTokenizer;
use crate::formats::huggingface;
use crate::formats::model_dir::{load_model_params, model_config_json, save_model_dir};
use crate::formats::rundir::MODEL_DIR;
use crate::formats::trainlog::JsonlLog;
use crate::model::family::ModelConfig;
use crate::model::layout::ParamLayout;
use crate::os::files::{check_free_space, create_dir, explain_write_error};
use anyhow::{bail, Result};
use std::path::Path;

/// Room for a safetensors header and metadata on top of the tensors, in the space checks.
pub(super) const HEADER_ALLOWANCE: u64 = 64 << 10;

/// Writes the checkpoint of the step just finished, after syncing the log (so a power cut never
/// leaves a checkpoint ahead of its log) and checking the disk has room. Weights that are not
/// finite are never written over the last good checkpoint.
pub(super) fn save_checkpoint(
    dir: &Path,
    engine: &Engine,
    layout: &ParamLayout,
    cfg: &ModelConfig,
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
pub(super) fn mid_run(e: anyhow::Error, out: Option<&Path>, last_checkpoint: Option<usize>) -> anyhow::Error {
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
pub(super) fn check_writable(dir: &Path, flag: &str) -> Result<()> {
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
pub(super) fn final_outputs_are_current(args: &TrainArgs, cfg: &ModelConfig, params: &[f32]) -> bool {
    let current = |dir: &Path| {
        let config = std::fs::read_to_string(dir.join(huggingface::CONFIG_FILE))
            .ok()
            .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok());
        config == Some(model_config_json(cfg, args.tokenizer))
            && load_model_params(dir, cfg).is_ok_and(|saved| {
                saved.len() == params.len()
                    && saved.iter().zip(params).all(|(a, b)| a.to_bits() == b.to_bits() || *a == 0.0 && *b == 0.0)
            })
    };
    args.out.as_ref().is_none_or(|d| current(&d.join("model"))) && args.save.as_deref().is_none_or(current)
}

/// What a finished run writes: `RUN_DIR/model` first, then the loss plot, then --save.
pub(super) fn write_final_outputs(
    args: &TrainArgs,
    cfg: &ModelConfig,
    params: &[f32],
    log_path: Option<&Path>,
    real_params: usize,
) -> Result<()> {
    if let Some(bad) = first_nonfinite(&cfg.layout(), params) {
        bail!("the final weights are not finite ({bad}); not saving them as the model");
    }
    let model_bytes = 4 * real_params as u64 + HEADER_ALLOWANCE;
    if let Some(dir) = &args.out {
        save_model_dir(&dir.join(MODEL_DIR), cfg, params, args.tokenizer, "--out")
            .and_then(|()| copy_tokenizer(args, &dir.join(MODEL_DIR), "--out"))
            .map_err(|e| explain_write_error(e, "--out", dir, Some((model_bytes, "the model"))))?;
        // The plot is a convenience: a failure to draw it must not fail a finished run.
        let plotted = match log_path {
            Some(log) => match crate::cli::plot::plot_logs(&[log.to_path_buf()], &dir.join("loss.svg"), None) {
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
        save_model_dir(dir, cfg, params, args.tokenizer, "--save")
            .and_then(|()| copy_tokenizer(args, dir, "--save"))
            .map_err(|e| explain_write_error(e, "--save", dir, Some((model_bytes, "the model"))))?;
        println!("saved model to {}", dir.display());
    }
    Ok(())
}

/// A model directory gets the tokenizer.json its ids are of, as published models have.
fn copy_tokenizer(args: &TrainArgs, dir: &Path, flag: &str) -> Result<()> {
    match &args.tokenizer_dir {
        Some(from) => HfTokenizer::load(from, "tokenizer")?.copy_into(dir, flag),
        None => Ok(()),
    }
}
