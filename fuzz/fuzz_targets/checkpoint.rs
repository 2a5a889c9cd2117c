//! Training checkpoints: `checkpoint::parse` (safetensors + JSON metadata).
#![no_main]

mod common;

use common::{corrupt, split_safetensors, with_header, CHECKPOINT};
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|input: &[u8]| {
    let Some((&mode, rest)) = input.split_first() else { return };
    let valid = &*CHECKPOINT;
    let (header, data) = split_safetensors(valid);
    let file = match mode % 4 {
        0 => rest.to_vec(),
        1 => {
            let mut file = valid.clone();
            corrupt(&mut file, rest);
            file
        }
        // A fuzzed JSON header (tensors and metadata) in front of the valid data.
        2 => with_header(rest, data),
        // The valid header with its metadata values replaced: the input holds
        // "format\xffconfig\xffstate\xffadam_t", any of which may be missing.
        _ => {
            let Ok(mut json) = serde_json::from_slice::<serde_json::Value>(header) else { unreachable!() };
            let meta = json["__metadata__"].as_object_mut().expect("checkpoints have metadata");
            for (key, value) in ["format", "config", "state", "adam_t"].iter().zip(rest.split(|&b| b == 0xff)) {
                match std::str::from_utf8(value) {
                    Ok(v) => meta.insert(key.to_string(), v.into()),
                    Err(_) => meta.remove(*key),
                };
            }
            with_header(&serde_json::to_vec(&json).unwrap(), data)
        }
    };
    if let Ok(ckpt) = finch::formats::checkpoint::parse(&file, Path::new("checkpoint.safetensors")) {
        let n = ckpt.config.layout().total;
        assert_eq!(ckpt.params.len(), n);
        assert_eq!(ckpt.optimizer.m.len(), n);
        assert_eq!(ckpt.optimizer.v.len(), n);
    }
});
