//! Valid inputs the targets mutate: a one-layer model and its checkpoint, built with finch's own
//! writers so they follow the formats as they are.
#![allow(dead_code)]

use finch::formats::checkpoint::{TrainState, CHECKPOINT_FILE};
use finch::model::config::GptConfig;
use finch::cpu::optimizer::AdamW;
use finch::formats::tokens::BatchWalker;
use finch::model::layout::ParamLayout;
use finch::formats::huggingface::{CONFIG_FILE, WEIGHTS_FILE};
use finch::model::rng::Rng;
use std::path::PathBuf;
use std::sync::LazyLock;

/// The smallest model there is (vocab 3 pads to 128 rows).
pub const TINY: GptConfig =
    GptConfig { n_layer: 1, n_head: 1, n_embd: 2, vocab_size: 3, n_positions: 2, layer_norm_epsilon: 1e-5 };

/// A directory of its own per process, in memory when /dev/shm exists.
pub fn scratch_dir(name: &str) -> PathBuf {
    let base = if std::path::Path::new("/dev/shm").is_dir() { PathBuf::from("/dev/shm") } else { std::env::temp_dir() };
    let dir = base.join(format!("finch-fuzz-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch directory");
    dir
}

fn params() -> Vec<f32> {
    (0..ParamLayout::new(&TINY).total).map(|i| i as f32 * 0.25 - 3.0).collect()
}

/// (config.json, model.safetensors) of TINY, as `save_model` writes them.
pub static MODEL: LazyLock<(Vec<u8>, Vec<u8>)> = LazyLock::new(|| {
    let dir = scratch_dir("model");
    finch::formats::huggingface::save_model(&dir, &TINY, &params(), None, "--out").expect("save_model");
    let files = (std::fs::read(dir.join(CONFIG_FILE)).unwrap(), std::fs::read(dir.join(WEIGHTS_FILE)).unwrap());
    std::fs::remove_dir_all(&dir).ok();
    files
});

/// checkpoint.safetensors of TINY, as `checkpoint::save` writes it.
pub static CHECKPOINT: LazyLock<Vec<u8>> = LazyLock::new(|| {
    let dir = scratch_dir("checkpoint");
    let p = params();
    let mut adam = AdamW::new(p.len());
    adam.t = 7;
    adam.v.iter_mut().for_each(|v| *v = 0.5);
    let state = TrainState { step: 7, walker: BatchWalker { position: 12 }, rng: Rng::new(42) };
    finch::formats::checkpoint::save(&dir, &finch::model::family::ModelConfig::Gpt2(TINY), &p, &adam, &state).expect("checkpoint::save");
    let bytes = std::fs::read(dir.join(CHECKPOINT_FILE)).unwrap();
    std::fs::remove_dir_all(&dir).ok();
    bytes
});

/// Splits a safetensors file into (header JSON, data).
pub fn split_safetensors(file: &[u8]) -> (&[u8], &[u8]) {
    let n = u64::from_le_bytes(file[..8].try_into().unwrap()) as usize;
    (&file[8..8 + n], &file[8 + n..])
}

/// A safetensors file with `header` as its JSON header and `data` after it; the length prefix
/// is right, so parsing gets past it to the header itself.
pub fn with_header(header: &[u8], data: &[u8]) -> Vec<u8> {
    let mut file = (header.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(header);
    file.extend_from_slice(data);
    file
}

/// Overwrites bytes of `file` at fuzzer-chosen places: each 3 input bytes are (offset u16, byte).
pub fn corrupt(file: &mut [u8], edits: &[u8]) {
    if file.is_empty() {
        return;
    }
    for e in edits.chunks_exact(3) {
        let at = u16::from_le_bytes([e[0], e[1]]) as usize % file.len();
        file[at] = e[2];
    }
}
