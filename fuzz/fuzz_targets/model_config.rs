//! config.json of a model directory, of either family: `model_dir::parse_model_config`.
#![no_main]

use finch::formats::model_dir::parse_model_config;
use finch::model::family::ModelConfig;
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|input: &[u8]| {
    let Ok(text) = std::str::from_utf8(input) else { return };
    if let Ok(cfg) = parse_model_config(text, Path::new("config.json")) {
        // What the rest of finch relies on once a config is accepted.
        match cfg {
            ModelConfig::Gpt2(c) => {
                assert!(c.n_layer > 0 && c.n_head > 0 && c.n_embd % c.n_head == 0);
                assert!(c.layer_norm_epsilon > 0.0 && c.layer_norm_epsilon.is_finite());
            }
            ModelConfig::Llama(c) => {
                assert!(c.num_hidden_layers > 0 && c.num_key_value_heads > 0);
                assert!(c.num_attention_heads % c.num_key_value_heads == 0 && c.head_dim() % 2 == 0);
                assert!(c.rms_norm_eps > 0.0 && c.rope_theta.is_finite());
            }
        }
        let _ = (cfg.padded_vocab_size(), cfg.real_params(), cfg.activation_count(1, 1));
    }
});
