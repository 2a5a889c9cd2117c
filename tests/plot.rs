//! `finch plot` through the library: SVG and PNG output from synthetic logs, and its errors.

mod common;

use clap::Parser;
use common::TempDir;
use finch::cli::plot::{plot_logs, plot_logs_with, run, PlotArgs, PlotOptions};
use serde_json::json;
use std::path::{Path, PathBuf};

/// `finch plot`'s flags as the binary parses them.
#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    plot: PlotArgs,
}

const TRAIN_BLUE: &str = "#1F77B4";
const VAL_BLUE: &str = "#114163";
const TRAIN_ORANGE: &str = "#FF7F0E";

fn start_event(lr: f64) -> serde_json::Value {
    json!({
        "event": "start",
        "config": {"n_layer": 2, "n_head": 4, "n_embd": 64, "vocab_size": 256, "n_positions": 64,
                   "layer_norm_epsilon": 1e-5},
        "params": 120_000,
        "args": {"model": null, "init": null, "lr": lr, "lr_schedule": "cosine", "grad_accum": 1,
                 "warmup_steps": 0},
        "batch_size": 4, "seq_len": 64, "steps": 50,
    })
}

/// RUN_DIR/log.jsonl with `steps` step lines (val_loss every `val_every` steps when non-zero).
fn write_log(dir: &Path, start: Option<serde_json::Value>, steps: usize, val_every: usize) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let mut text = start.map(|s| s.to_string() + "\n").unwrap_or_default();
    for step in 1..=steps {
        let loss = 2.0 + 4.0 / step as f64;
        let mut line = json!({"step": step, "loss": loss, "grad_norm": 1.0, "lr": 1e-3, "ms": 5.0, "tok_per_s": 1e4});
        if val_every > 0 && step % val_every == 0 {
            line["val_loss"] = json!(loss + 0.1);
        }
        text += &(line.to_string() + "\n");
    }
    let path = dir.join("log.jsonl");
    std::fs::write(&path, text).unwrap();
    path
}

/// The number of points of each `<polyline>` drawn in `color`.
fn polylines(svg: &str, color: &str) -> Vec<usize> {
    svg.split("<polyline")
        .skip(1)
        .filter(|p| p[..p.find('>').unwrap()].contains(&format!("stroke=\"{color}\"")))
        .map(|p| {
            let points = &p[p.find("points=\"").unwrap() + 8..];
            points[..points.find('"').unwrap()].split_whitespace().count()
        })
        .collect()
}

/// The error of `result`, checked to be one line containing each of `wants`.
fn one_line_error(result: anyhow::Result<()>, wants: &[&str]) {
    let err = format!("{:#}", result.expect_err("should fail"));
    assert_eq!(err.lines().count(), 1, "not one line: {err}");
    for w in wants {
        assert!(err.contains(w), "{err:?} lacks {w:?}");
    }
}

/// Width, height and RGB pixels of a PNG.
fn decode_png(bytes: &[u8]) -> (u32, u32, Vec<u8>) {
    let mut reader = png::Decoder::new(std::io::Cursor::new(bytes)).read_info().unwrap();
    let mut rgb = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut rgb).unwrap();
    assert_eq!(info.color_type, png::ColorType::Rgb);
    (info.width, info.height, rgb)
}

#[test]
fn svg_has_the_title_and_a_line_per_series() {
    let tmp = TempDir::new("plot-svg");
    let log = write_log(&tmp.path("small-run"), Some(start_event(6e-4)), 50, 10);
    let out = tmp.path("loss.svg");
    plot_logs(&[log], &out, None).unwrap();
    let svg = std::fs::read_to_string(&out).unwrap();
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    assert!(svg.contains("gpt2 2L 4H 64C (120K) · B=4 T=64 · lr 6e-4 cosine"), "title missing");
    for text in ["small-run", "small-run val", ">\nstep\n<", ">\nloss\n<"] {
        assert!(svg.contains(text), "{text:?} missing");
    }
    // Each series is one polyline through every point (plus a short one in the legend).
    assert!(polylines(&svg, TRAIN_BLUE).contains(&50), "{:?}", polylines(&svg, TRAIN_BLUE));
    assert!(polylines(&svg, VAL_BLUE).contains(&5), "{:?}", polylines(&svg, VAL_BLUE));
    let leftovers: Vec<_> =
        std::fs::read_dir(&tmp.0).unwrap().filter(|e| e.as_ref().unwrap().path().is_file()).collect();
    assert_eq!(leftovers.len(), 1, "a temporary file was left behind");
}

#[test]
fn png_has_its_size_and_drawn_text_with_no_system_fonts() {
    let tmp = TempDir::new("plot-png");
    let log = write_log(&tmp.path("run"), Some(start_event(6e-4)), 50, 10);
    let out = tmp.path("loss.png");
    plot_logs(&[log], &out, Some("Title text")).unwrap();
    let bytes = std::fs::read(&out).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    let (w, h, rgb) = decode_png(&bytes);
    assert_eq!((w, h), (1000, 600));
    let dark = |x0: u32, x1: u32, y0: u32, y1: u32| {
        (y0..y1).flat_map(|y| (x0..x1).map(move |x| ((y * w + x) * 3) as usize)).filter(|&i| rgb[i] < 128).count()
    };
    // The title band holds nothing but the title: dark pixels there are glyphs from the embedded font.
    assert!(dark(300, 700, 0, 40) > 150, "no title text drawn");
    assert_eq!(dark(0, 300, 0, 40), 0, "the title band is not just the title");
    // The line and the legend's text draw too.
    assert!(dark(80, 980, 45, 540) > 500);
}

#[test]
fn several_runs_share_a_title_and_differ_in_the_legend() {
    let tmp = TempDir::new("plot-runs");
    let a = write_log(&tmp.path("a"), Some(start_event(1e-3)), 30, 0);
    let b = write_log(&tmp.path("b"), Some(start_event(3e-4)), 20, 5);
    let out = tmp.path("both.svg");
    // Run directories stand for their log.jsonl.
    plot_logs(&[a.parent().unwrap().to_owned(), b], &out, None).unwrap();
    let svg = std::fs::read_to_string(&out).unwrap();
    assert!(svg.contains("2 runs · gpt2 2L 4H 64C (120K) · B=4 T=64\n"), "title missing");
    assert!(svg.contains("a · lr 1e-3 cosine") && svg.contains("b · lr 3e-4 cosine") && svg.contains("b val"));
    assert!(polylines(&svg, TRAIN_BLUE).contains(&30));
    assert!(polylines(&svg, TRAIN_ORANGE).contains(&20));
}

#[test]
fn plots_one_step_and_logs_without_a_start_event() {
    let tmp = TempDir::new("plot-one");
    let log = write_log(&tmp.path("lonely"), None, 1, 1);
    for name in ["one.svg", "one.png"] {
        plot_logs(std::slice::from_ref(&log), &tmp.path(name), None).unwrap();
    }
    let svg = std::fs::read_to_string(tmp.path("one.svg")).unwrap();
    // No settings to show: the run's name is the title.
    assert!(svg.contains(">\nlonely\n<"));
    assert!(svg.contains("<circle"), "a single step is drawn as a dot");
    // A name other than log.jsonl names the run after the file.
    let other = tmp.path("other.jsonl");
    std::fs::copy(&log, &other).unwrap();
    plot_logs(&[other], &tmp.path("other.svg"), None).unwrap();
    assert!(std::fs::read_to_string(tmp.path("other.svg")).unwrap().contains(">\nother\n<"));
}

#[test]
fn smoothing_and_a_log_axis() {
    let tmp = TempDir::new("plot-smooth");
    let log = write_log(&tmp.path("run"), Some(start_event(6e-4)), 100, 0);
    let options = PlotOptions { title: Some("a <title> & more".into()), smooth: 10, log_y: true };
    for name in ["s.svg", "s.png"] {
        plot_logs_with(std::slice::from_ref(&log), &tmp.path(name), &options).unwrap();
    }
    let svg = std::fs::read_to_string(tmp.path("s.svg")).unwrap();
    assert!(svg.contains("a &lt;title&gt; &amp; more"));
    assert!(svg.contains("loss (train: mean of 10 steps)"));
    // The raw loss (faint) and its moving average: two lines through all 100 steps.
    assert_eq!(polylines(&svg, TRAIN_BLUE).iter().filter(|&&n| n == 100).count(), 2);
    // Log ticks at round values: losses run from 2.04 to 6.
    for tick in [">\n3\n<", ">\n4\n<", ">\n5\n<"] {
        assert!(svg.contains(tick), "tick {tick:?} missing");
    }
}

#[test]
fn tolerates_a_half_written_last_line_and_non_finite_losses() {
    let tmp = TempDir::new("plot-live");
    let log = write_log(&tmp.path("run"), Some(start_event(6e-4)), 10, 0);
    let mut text = std::fs::read_to_string(&log).unwrap();
    text += "{\"step\":11,\"loss\":null,\"grad_norm\":null,\"lr\":0.001,\"ms\":5,\"tok_per_s\":1}\n";
    text += "{\"step\":12,\"loss\":2.3,\"gra"; // `finch train` is mid-write
    std::fs::write(&log, text).unwrap();
    plot_logs(&[log], &tmp.path("live.svg"), None).unwrap();
    let svg = std::fs::read_to_string(tmp.path("live.svg")).unwrap();
    assert!(polylines(&svg, TRAIN_BLUE).contains(&10));
}

#[test]
fn default_output_is_loss_svg_in_the_run_directory() {
    let tmp = TempDir::new("plot-run");
    write_log(&tmp.path("run"), Some(start_event(6e-4)), 5, 0);
    let cli = Cli::try_parse_from(["plot", tmp.path("run").to_str().unwrap()]).unwrap();
    run(cli.plot).unwrap();
    assert!(tmp.path("run/loss.svg").is_file());
    let cli = Cli::try_parse_from(["plot", "a", "b", "--out", "x.png", "--smooth", "5", "--log-y", "--title", "t"]);
    let args = cli.unwrap().plot;
    assert_eq!((args.logs.len(), args.smooth, args.log_y), (2, 5, true));
    assert!(Cli::try_parse_from(["plot"]).is_err(), "a log is required");
}

#[test]
fn user_mistakes_are_one_line_errors_naming_the_file() {
    let tmp = TempDir::new("plot-errors");
    let good = write_log(&tmp.path("good"), Some(start_event(6e-4)), 5, 0);
    let svg = tmp.path("out.svg");

    one_line_error(plot_logs(&[tmp.path("missing.jsonl")], &svg, None), &["missing.jsonl", "cannot read"]);
    std::fs::create_dir(tmp.path("empty-run")).unwrap();
    one_line_error(plot_logs(&[tmp.path("empty-run")], &svg, None), &["empty-run/log.jsonl"]);
    one_line_error(plot_logs(std::slice::from_ref(&good), &tmp.path("out.pdf"), None), &["out.pdf", ".svg or .png"]);
    one_line_error(plot_logs(std::slice::from_ref(&good), &tmp.path("no-such-dir/out.svg"), None), &["out.svg"]);

    let bad = |name: &str, lines: &[&str]| {
        let path = tmp.path(name);
        std::fs::write(&path, lines.join("\n") + "\n").unwrap();
        plot_logs(&[path], &svg, None)
    };
    let step = r#"{"step":1,"loss":3.5,"grad_norm":1,"lr":0.001,"ms":5,"tok_per_s":1}"#;
    one_line_error(bad("json.jsonl", &[step, "", "{oops", step]), &["json.jsonl:3", "not valid JSON"]);
    one_line_error(bad("array.jsonl", &[step, "[1,2]"]), &["array.jsonl:2", "not a JSON object"]);
    one_line_error(bad("step.jsonl", &[r#"{"step":"one","loss":3}"#]), &["step.jsonl:1", "\"step\""]);
    one_line_error(bad("loss.jsonl", &[step, r#"{"step":2,"loss":"low"}"#]), &["loss.jsonl:2", "\"loss\""]);
    one_line_error(bad("noloss.jsonl", &[r#"{"step":2}"#]), &["noloss.jsonl:1", "\"loss\""]);
    let start = start_event(6e-4).to_string();
    one_line_error(bad("nosteps.jsonl", &[&start]), &["nosteps.jsonl", "no steps"]);
    assert!(!svg.exists(), "a failed plot wrote its output");
}
