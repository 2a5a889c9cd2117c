//! model.safetensors of a model directory: `huggingface::parse_params`, against a fixed or a
//! fuzzed config.json.
#![no_main]

mod common;

use common::{corrupt, split_safetensors, with_header, MODEL, TINY};
use finch::model::layout::ParamLayout;
use finch::formats::huggingface::{parse_config, parse_params};
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|input: &[u8]| {
    let Some((&mode, rest)) = input.split_first() else { return };
    let (_, valid) = &*MODEL;
    let (header, data) = split_safetensors(valid);
    let mut cfg = TINY;
    let file = match mode % 5 {
        // Arbitrary bytes.
        0 => rest.to_vec(),
        // The valid file with bytes overwritten anywhere (length prefix, header, data).
        1 => {
            let mut file = valid.clone();
            corrupt(&mut file, rest);
            file
        }
        // A fuzzed JSON header in front of the valid data.
        2 => with_header(rest, data),
        // The valid file, truncated or extended.
        3 => {
            let n = rest.first().map_or(0, |&b| b as usize * valid.len() / 128);
            let mut file = valid.clone();
            file.resize(n, rest.get(1).copied().unwrap_or(0));
            file
        }
        // A fuzzed config.json against the valid weights (or, after a NUL, fuzzed weights).
        _ => {
            let (text, weights) = match rest.iter().position(|&b| b == 0) {
                Some(i) => (&rest[..i], rest[i + 1..].to_vec()),
                None => (rest, valid.clone()),
            };
            let Ok(text) = std::str::from_utf8(text) else { return };
            let Ok(fuzzed) = parse_config(text, Path::new("config.json")) else { return };
            cfg = fuzzed;
            let _ = header;
            weights
        }
    };
    if let Ok(params) = parse_params(&file, Path::new("model.safetensors"), &cfg) {
        let layout = ParamLayout::new(&cfg);
        assert_eq!(params.len(), layout.total);
        // The padding rows of wte stay zero.
        let wte = layout.get("wte.weight").unwrap();
        assert!(params[cfg.vocab_size * cfg.n_embd..wte.numel].iter().all(|&p| p == 0.0));
    }
});
