//! Training logs as `finch plot` reads and draws them: `plot::plot_log_texts`, up to three logs
//! (split at NUL bytes), with fuzzed --smooth and --log-y, as SVG (and sometimes PNG).
#![no_main]

use finch::cli::plot::{plot_log_texts, PlotOptions};
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|input: &[u8]| {
    let Some((&knobs, rest)) = input.split_first() else { return };
    let Ok(text) = std::str::from_utf8(rest) else { return };
    let names = [Path::new("a/log.jsonl"), Path::new("b.jsonl"), Path::new("c")];
    let logs: Vec<(&Path, &str)> = text.split('\0').take(3).enumerate().map(|(i, t)| (names[i], t)).collect();
    let options = PlotOptions { title: None, smooth: (knobs & 0x3f) as usize, log_y: knobs & 0x40 != 0 };
    // PNG rasterises 1000×600 pixels: slow, so only for one knob value in 128.
    let png = knobs & 0x80 != 0 && knobs & 0x3f == 0x3f;
    if let Ok(image) = plot_log_texts(&logs, png, &options) {
        assert!(!image.is_empty());
    }
});
