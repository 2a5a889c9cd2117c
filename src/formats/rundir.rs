//! A finch run directory (`finch train --out RUN_DIR`): its flags (train_args.json), log, last
//! checkpoint and, once the run has finished, its model/. And the one way a directory a user names
//! for a model (`sample --model`, `train --init`) is turned into weights: a model directory, a
//! run's model/, or, for a run that has not finished, its checkpoint.

use crate::formats::checkpoint::{self, CHECKPOINT_FILE};
use crate::formats::hf_tokenizer::TOKENIZER_FILE;
use crate::formats::huggingface::{self, CONFIG_FILE};
use crate::formats::model_dir::{load_model_config, load_model_params};
use crate::formats::tokenizer::Tokenizer;
use crate::model::family::ModelConfig;
use anyhow::{bail, Result};
use std::path::{Path, PathBuf};

/// The flags of a run, written when it starts.
pub const ARGS_FILE: &str = "train_args.json";
/// The exported model of a finished run, inside its directory.
pub const MODEL_DIR: &str = "model";

/// Where the weights of a directory named for a model come from.
pub enum ModelSource {
    /// A Hugging Face model directory: config.json + model.safetensors (a run's model/ too).
    Exported(PathBuf),
    /// A run directory without a model yet: the weights of its last checkpoint.
    Checkpoint { run: PathBuf, file: checkpoint::CheckpointFile },
}

impl ModelSource {
    /// Finds the model `dir` holds; `flag` names where `dir` came from in errors.
    pub fn find(dir: &Path, flag: &str) -> Result<ModelSource> {
        let d = dir.display();
        if !dir.exists() {
            bail!("{flag} {d}: no such directory");
        }
        if !dir.is_dir() {
            bail!("{flag} {d}: not a directory (expected a model directory or a finch run directory)");
        }
        if dir.join(CONFIG_FILE).exists() {
            return Ok(ModelSource::Exported(dir.to_path_buf()));
        }
        if dir.join(MODEL_DIR).join(CONFIG_FILE).exists() {
            return Ok(ModelSource::Exported(dir.join(MODEL_DIR)));
        }
        if let Some(file) = checkpoint::open(dir)? {
            return Ok(ModelSource::Checkpoint { run: dir.to_path_buf(), file });
        }
        if dir.join(ARGS_FILE).exists() {
            bail!(
                "{flag} {d}: this run has no model and no checkpoint yet (it stopped before its first \
                 checkpoint); start it again with finch train --resume {d} --restart"
            );
        }
        bail!(
            "{flag} {d}: no {CONFIG_FILE} here: expected a model directory ({CONFIG_FILE} + {}) or a finch run \
             directory",
            huggingface::WEIGHTS_FILE
        )
    }

    pub fn config(&self) -> Result<ModelConfig> {
        match self {
            ModelSource::Exported(dir) => load_model_config(dir),
            ModelSource::Checkpoint { file, .. } => Ok(file.config),
        }
    }

    /// The weights, for `cfg` (from [`config`](Self::config)).
    pub fn params(&self, cfg: &ModelConfig) -> Result<Vec<f32>> {
        match self {
            ModelSource::Exported(dir) => load_model_params(dir, cfg),
            ModelSource::Checkpoint { file, .. } => Ok(file.load()?.params),
        }
    }

    /// The tokenizer recorded with the model: config.json's, a tokenizer.json beside it (as
    /// published models have), or the run's flags'.
    pub fn tokenizer(&self) -> Option<Tokenizer> {
        match self {
            ModelSource::Exported(dir) => huggingface::recorded_tokenizer(dir)
                .or_else(|| dir.join(TOKENIZER_FILE).is_file().then_some(Tokenizer::HuggingFace)),
            ModelSource::Checkpoint { run, .. } => run_tokenizer(run),
        }
    }

    /// Where a tokenizer.json of the model would be: the model directory, or the run's.
    pub fn tokenizer_dir(&self) -> PathBuf {
        match self {
            ModelSource::Exported(dir) => dir.clone(),
            ModelSource::Checkpoint { run, .. } => run.clone(),
        }
    }

    /// Where the weights come from, for messages: the directory, or the run and its checkpoint step.
    pub fn describe(&self) -> String {
        match self {
            ModelSource::Exported(dir) => dir.display().to_string(),
            ModelSource::Checkpoint { run, file } => {
                format!("{} (the checkpoint of step {}; the run has not finished)", run.display(), file.state.step)
            }
        }
    }

    /// Where the weights are, for messages: the directory, or the checkpoint file.
    pub fn path(&self) -> PathBuf {
        match self {
            ModelSource::Exported(dir) => dir.clone(),
            ModelSource::Checkpoint { run, .. } => run.join(CHECKPOINT_FILE),
        }
    }
}

/// The tokenizer a run's flags record (train_args.json's "tokenizer"), if any.
pub fn run_tokenizer(run: &Path) -> Option<Tokenizer> {
    let text = std::fs::read_to_string(run.join(ARGS_FILE)).ok()?;
    let args: serde_json::Value = serde_json::from_str(&text).ok()?;
    serde_json::from_value(args.get("tokenizer")?.clone()).ok()
}
