//! config.json of a model directory: `huggingface::parse_config`.
#![no_main]

use finch::formats::huggingface::parse_config;
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|input: &[u8]| {
    let Ok(text) = std::str::from_utf8(input) else { return };
    if let Ok(cfg) = parse_config(text, Path::new("config.json")) {
        // What the rest of finch relies on once a config is accepted.
        assert!(cfg.n_layer > 0 && cfg.n_head > 0 && cfg.n_embd % cfg.n_head == 0);
        assert!(cfg.layer_norm_epsilon > 0.0 && cfg.layer_norm_epsilon.is_finite());
        let _ = cfg.padded_vocab_size();
    }
});
