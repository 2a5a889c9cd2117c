//! Times one full CPU training step (forward, backward, clip, AdamW) of a GPT-2 model.
//!
//!     cargo bench --bench cpu_train_step -- [--model gpt2] [--batch-size 4] [--seq-len 64] [--steps 10]
//!
//! Prints each step and the median: ms/step and tokens/s. Random tokens and random init: the
//! arithmetic does not depend on the values.

use finch::cpu::model::Gpt;
use finch::cpu::optimizer::{clip_grad_norm, global_norm, AdamW, AdamWConfig};
use finch::model::config::{GptConfig, Preset};
use finch::model::init::init_params;
use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let flag = |name: &str, default: usize| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .map_or(default, |v| v.parse().expect("a number"))
    };
    let preset = match args.iter().position(|a| a == "--model").and_then(|i| args.get(i + 1)).map(String::as_str) {
        Some("gpt2-medium") => Preset::Gpt2Medium,
        Some("gpt2-large") => Preset::Gpt2Large,
        Some("gpt2-xl") => Preset::Gpt2Xl,
        _ => Preset::Gpt2,
    };
    let (b, t, steps) = (flag("--batch-size", 4), flag("--seq-len", 64), flag("--steps", 10));
    let cfg = GptConfig::preset(preset);
    let mut model = Gpt::<f32>::new(cfg, init_params(&cfg, 1));
    let mut opt = AdamW::new(model.params.len());
    let hp = AdamWConfig { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 };
    let layout = model.layout.clone();
    let mut state = 1u64;
    let mut token = || {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((state >> 33) % cfg.vocab_size as u64) as u32
    };
    println!("{preset:?}, B={b}, T={t}, {} threads", rayon::current_num_threads());
    let mut times = Vec::new();
    for step in 0..=steps {
        let x: Vec<u32> = (0..b * t).map(|_| token()).collect();
        let y: Vec<u32> = (0..b * t).map(|_| token()).collect();
        let started = Instant::now();
        let loss = model.forward(&x, Some(&y), b, t).unwrap();
        model.zero_grad();
        model.backward(1.0);
        let norm = global_norm(&model.grads);
        clip_grad_norm(&mut model.grads, norm, 1.0);
        opt.update(&mut model.params, &model.grads, &layout, 6e-4, &hp);
        let ms = started.elapsed().as_secs_f64() * 1e3;
        // Step 0 allocates activations and warms caches; it is reported but not counted.
        println!("step {step}: {ms:.0} ms, loss {loss:.4}{}", if step == 0 { " (warm-up)" } else { "" });
        if step > 0 {
            times.push(ms);
        }
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    println!("median: {median:.0} ms/step, {:.0} tokens/s", (b * t) as f64 / (median / 1e3));
}
