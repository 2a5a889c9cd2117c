//! Training checkpoints: everything a run needs to continue bit for bit — weights, AdamW
//! moments, the step, the data position and the RNG — in one safetensors file, written
//! atomically so the run directory always holds a complete last checkpoint.

use crate::cpu::optimizer::AdamW;
use crate::formats::tokens::BatchWalker;
use crate::model::family::ModelConfig;
use crate::model::rng::Rng;
use crate::os::files::write_atomically_with;
use crate::os::mapfile::MappedFile;
use anyhow::{bail, Context, Result};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub const CHECKPOINT_FILE: &str = "checkpoint.safetensors";
const FORMAT: &str = "finch-checkpoint-1";

/// Where the training loop stands, besides weights and optimizer moments.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Steps completed.
    pub step: usize,
    pub walker: BatchWalker,
    pub rng: Rng,
}

pub struct Checkpoint {
    pub config: ModelConfig,
    pub params: Vec<f32>,
    pub optimizer: AdamW<f32>,
    pub state: TrainState,
}

pub fn save(
    dir: &Path,
    config: &ModelConfig,
    params: &[f32],
    optimizer: &AdamW<f32>,
    state: &TrainState,
) -> Result<()> {
    let n = params.len();
    let tensors = [("params", params), ("adam.m", &optimizer.m[..]), ("adam.v", &optimizer.v[..])]
        .map(|(name, data)| Ok((name, TensorView::new(Dtype::F32, vec![n], bytemuck::cast_slice(data))?)))
        .into_iter()
        .collect::<Result<Vec<_>>>()?;
    let metadata = HashMap::from([
        ("format".to_string(), FORMAT.to_string()),
        ("config".to_string(), serde_json::to_string(config)?),
        ("state".to_string(), serde_json::to_string(state)?),
        ("adam_t".to_string(), optimizer.t.to_string()),
    ]);
    write_atomically_with(&dir.join(CHECKPOINT_FILE), |tmp| {
        safetensors::serialize_to_file(tensors, Some(metadata), tmp)
            .with_context(|| format!("{}: cannot write", tmp.display()))
    })
}

/// Reads `dir/checkpoint.safetensors`; `Ok(None)` when the directory has none yet.
pub fn load(dir: &Path) -> Result<Option<Checkpoint>> {
    open(dir)?.map(|file| file.load()).transpose()
}

/// A checkpoint file, mapped, whose header has been read: its model is known before its tensors
/// are loaded, so that a resumed run can check it fits in memory first.
pub struct CheckpointFile {
    path: PathBuf,
    bytes: MappedFile,
    pub config: ModelConfig,
    /// Where the run stood: its step tells whether a resumed run has anything left to do.
    pub state: TrainState,
}

/// Maps `dir/checkpoint.safetensors` and reads its header; `Ok(None)` when there is none yet.
pub fn open(dir: &Path) -> Result<Option<CheckpointFile>> {
    let path = dir.join(CHECKPOINT_FILE);
    if !path.exists() {
        return Ok(None);
    }
    let bytes = MappedFile::open(&path, "")?;
    let meta = metadata(&bytes, &path)?;
    let config = config_of(&meta, &path)?;
    let state = state_of(&meta, &path)?;
    Ok(Some(CheckpointFile { path, bytes, config, state }))
}

impl CheckpointFile {
    pub fn load(&self) -> Result<Checkpoint> {
        parse(&self.bytes, &self.path)
    }
}

/// The checked metadata of a checkpoint file's header.
fn metadata(bytes: &[u8], path: &Path) -> Result<HashMap<String, String>> {
    let name = path.display();
    let (_, header) =
        SafeTensors::read_metadata(bytes).map_err(|e| anyhow::anyhow!("{name}: not a valid checkpoint: {e}"))?;
    let meta = header.metadata().clone().with_context(|| format!("{name}: not a finch checkpoint (no metadata)"))?;
    let format = get(&meta, "format", path)?;
    if format != FORMAT {
        bail!("{name}: unsupported checkpoint format {format:?} (expected {FORMAT})");
    }
    Ok(meta)
}

fn get<'a>(meta: &'a HashMap<String, String>, key: &str, path: &Path) -> Result<&'a String> {
    meta.get(key).with_context(|| format!("{}: checkpoint metadata lacks \"{key}\"", path.display()))
}

fn config_of(meta: &HashMap<String, String>, path: &Path) -> Result<ModelConfig> {
    let name = path.display();
    let config: ModelConfig =
        serde_json::from_str(get(meta, "config", path)?).with_context(|| format!("{name}: bad \"config\""))?;
    config.validate(&name.to_string())?;
    Ok(config)
}

fn state_of(meta: &HashMap<String, String>, path: &Path) -> Result<TrainState> {
    serde_json::from_str(get(meta, "state", path)?).with_context(|| format!("{}: bad \"state\"", path.display()))
}

/// Parses the bytes of a checkpoint file as [`load`] does; `path` only names the file in errors.
pub fn parse(bytes: &[u8], path: &Path) -> Result<Checkpoint> {
    let name = path.display();
    let meta = metadata(bytes, path)?;
    let config = config_of(&meta, path)?;
    let st = SafeTensors::deserialize(bytes).map_err(|e| anyhow::anyhow!("{name}: not a valid checkpoint: {e}"))?;
    let get = |key: &str| get(&meta, key, path);
    let state = state_of(&meta, path)?;
    let adam_t: u64 = get("adam_t")?.parse().with_context(|| format!("{name}: bad \"adam_t\""))?;
    let n = config.layout().total;
    let tensor = |key: &str| -> Result<Vec<f32>> {
        let view = st.tensor(key).map_err(|e| anyhow::anyhow!("{name}: {key}: {e}"))?;
        if view.dtype() != Dtype::F32 || view.shape() != [n] {
            bail!("{name}: {key} is {:?} {:?}, expected F32 [{n}]", view.dtype(), view.shape());
        }
        Ok(view.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect())
    };
    let optimizer = AdamW { m: tensor("adam.m")?, v: tensor("adam.v")?, t: adam_t };
    Ok(Checkpoint { config, params: tensor("params")?, optimizer, state })
}
