//! `finch plot`: loss curves from training logs (see [`crate::formats::trainlog`]) as SVG or PNG.
//!
//! Text is laid out (and, for PNG, rasterised) with a font embedded in the binary, so plotting
//! works on machines with no system fonts and no network.

use crate::os::files::write_atomically;
use anyhow::{anyhow, bail, Context, Result};
use plotters::coord::ranged1d::{AsRangedCoord, KeyPointHint, NoDefaultFormatting, Ranged, ValueFormatter};
use plotters::coord::Shift;
use plotters::prelude::*;
use serde_json::Value;
use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// The flags of `finch plot`.
#[derive(clap::Args, Debug, Clone)]
#[command(after_help = "Examples:
  finch plot runs/a                            # writes runs/a/loss.svg
  finch plot runs/a runs/b --out cmp.png       # two runs on one chart, as PNG
  finch plot runs/a/log.jsonl --smooth 50 --log-y --title 'GPT-2 124M'")]
pub struct PlotArgs {
    /// Training logs (log.jsonl), or run directories meaning RUN_DIR/log.jsonl
    #[arg(required = true, value_name = "LOG|RUN_DIR")]
    pub logs: Vec<PathBuf>,
    /// Image to write, .svg or .png [default: loss.svg beside the first log]
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// Chart title [default: the run's settings from its log]
    #[arg(long)]
    pub title: Option<String>,
    /// Draw the train loss as a moving average over N steps, the raw loss faintly behind (0: off)
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub smooth: usize,
    /// Logarithmic loss axis
    #[arg(long)]
    pub log_y: bool,
}

/// How to draw: everything but the logs and the output path.
#[derive(Debug, Clone, Default)]
pub struct PlotOptions {
    /// Replaces the title made from the runs' settings.
    pub title: Option<String>,
    /// Moving-average window of the train loss; 0 or 1 draws it raw.
    pub smooth: usize,
    pub log_y: bool,
}

pub fn run(args: PlotArgs) -> Result<()> {
    let out = match &args.out {
        Some(out) => out.clone(),
        None => log_path(&args.logs[0]).with_file_name("loss.svg"),
    };
    let options = PlotOptions { title: args.title, smooth: args.smooth, log_y: args.log_y };
    plot_logs_with(&args.logs, &out, &options)?;
    println!("wrote {}", out.display());
    Ok(())
}

/// Plots the loss of each log (or run directory) into `out` (.svg or .png), written atomically.
pub fn plot_logs(logs: &[PathBuf], out: &Path, title: Option<&str>) -> Result<()> {
    plot_logs_with(logs, out, &PlotOptions { title: title.map(str::to_owned), ..PlotOptions::default() })
}

pub fn plot_logs_with(logs: &[PathBuf], out: &Path, options: &PlotOptions) -> Result<()> {
    let format = ImageFormat::of(out)?;
    if logs.is_empty() {
        bail!("no log to plot");
    }
    let runs = logs.iter().map(|p| read_log(&log_path(p))).collect::<Result<Vec<_>>>()?;
    let bytes = render(&runs, format, options)?;
    write_atomically(out, &bytes).with_context(|| format!("{}: cannot write", out.display()))
}

/// Parses logs given as (path, text) and draws them as [`plot_logs_with`] does, into the bytes
/// of an image: PNG if `png`, SVG otherwise. The paths only name the runs and the errors.
pub fn plot_log_texts(logs: &[(&Path, &str)], png: bool, options: &PlotOptions) -> Result<Vec<u8>> {
    if logs.is_empty() {
        bail!("no log to plot");
    }
    let runs = logs.iter().map(|(path, text)| parse_log(text, path)).collect::<Result<Vec<_>>>()?;
    render(&runs, if png { ImageFormat::Png } else { ImageFormat::Svg }, options)
}

fn render(runs: &[Run], format: ImageFormat, options: &PlotOptions) -> Result<Vec<u8>> {
    if runs.iter().all(|r| r.train.is_empty() && r.val.is_empty()) {
        bail!("{}: no steps to plot", runs[0].path.display());
    }
    let chart = Chart::new(runs, options)?;
    Ok(match format {
        ImageFormat::Svg => render_svg(&chart)?.into_bytes(),
        ImageFormat::Png => render_png(&chart)?,
    })
}

/// A run directory means its log.jsonl.
fn log_path(path: &Path) -> PathBuf {
    if path.is_dir() {
        path.join("log.jsonl")
    } else {
        path.to_owned()
    }
}

#[derive(Clone, Copy)]
enum ImageFormat {
    Svg,
    Png,
}

impl ImageFormat {
    fn of(out: &Path) -> Result<ImageFormat> {
        let ext = out.extension().map(|e| e.to_string_lossy().to_ascii_lowercase());
        match ext.as_deref() {
            Some("svg") => Ok(ImageFormat::Svg),
            Some("png") => Ok(ImageFormat::Png),
            _ => bail!("{}: unknown image format; the name must end in .svg or .png", out.display()),
        }
    }
}

/// One log, as plotted.
struct Run {
    path: PathBuf,
    name: String,
    /// (step, loss), by step; steps whose loss is not finite (logged as null) are left out.
    train: Vec<(u64, f64)>,
    val: Vec<(u64, f64)>,
    /// Short descriptions of the settings in the start event, e.g. "B=4 T=64".
    settings: Vec<String>,
}

fn read_log(path: &Path) -> Result<Run> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
    parse_log(&text, path)
}

/// Parses the text of a training log; `path` names the run and the errors.
fn parse_log(text: &str, path: &Path) -> Result<Run> {
    let name = path.display();
    // By step, the last line wins: a log never repeats a step, but a hand-joined one might.
    let mut steps: BTreeMap<u64, (Option<f64>, Option<f64>)> = BTreeMap::new();
    let mut settings = Vec::new();
    let n_lines = text.lines().count();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let value: Value = match serde_json::from_str(line) {
            Ok(v) => v,
            // A running `finch train` may be halfway through writing its last line.
            Err(_) if i + 1 == n_lines && !text.ends_with('\n') => continue,
            Err(e) => {
                // serde's own "at line 1" would contradict the file's line number.
                let why = e.to_string();
                let why = why.split(" at line ").next().unwrap_or_default();
                bail!("{name}:{}: not valid JSON ({why}, column {})", i + 1, e.column())
            }
        };
        let Some(object) = value.as_object() else { bail!("{name}:{}: not a JSON object", i + 1) };
        let Some(step) = object.get("step") else {
            if object.get("event").and_then(Value::as_str) == Some("start") {
                settings = run_settings(&value);
            }
            continue;
        };
        let step = step.as_u64().ok_or_else(|| anyhow!("{name}:{}: \"step\" is not a whole number", i + 1))?;
        // Null is how serde_json writes a NaN or infinite loss.
        let number = |key: &str| -> Result<Option<f64>> {
            match object.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => v.as_f64().map(Some).ok_or_else(|| anyhow!("{name}:{}: \"{key}\" is not a number", i + 1)),
            }
        };
        if !object.contains_key("loss") {
            bail!("{name}:{}: step line without \"loss\"", i + 1);
        }
        steps.insert(step, (number("loss")?, number("val_loss")?));
    }
    let finite = |(step, v): (&u64, Option<f64>)| v.filter(|v| v.is_finite()).map(|v| (*step, v));
    let train = steps.iter().filter_map(|(s, (loss, _))| finite((s, *loss))).collect();
    let val = steps.iter().filter_map(|(s, (_, val))| finite((s, *val))).collect();
    Ok(Run { path: path.to_owned(), name: run_name(path), train, val, settings })
}

/// RUN_DIR/log.jsonl is named after RUN_DIR; any other log after its file name.
fn run_name(path: &Path) -> String {
    let dir_name = || {
        let full = path.canonicalize().unwrap_or_else(|_| path.to_owned());
        full.parent().and_then(|d| d.file_name()).map(|n| n.to_string_lossy().into_owned())
    };
    let named = |n: Option<&std::ffi::OsStr>| n.map(|n| n.to_string_lossy().into_owned());
    if path.file_name().is_some_and(|n| n == "log.jsonl") {
        dir_name().unwrap_or_else(|| "log".into())
    } else {
        named(path.file_stem()).unwrap_or_else(|| path.display().to_string())
    }
}

/// "gpt2 12L 12H 768C (124M)", "B=4 T=64", "lr 6e-4 cosine" from a start event. Missing fields
/// are skipped: the log may come from an older or hand-edited run.
fn run_settings(start: &Value) -> Vec<String> {
    let (config, args) = (&start["config"], &start["args"]);
    let mut settings = Vec::new();
    let mut model = Vec::new();
    if let Some(preset) = args["model"].as_str() {
        model.push(preset.to_owned());
    } else if let Some(init) = args["init"].as_str() {
        model.push(Path::new(init).file_name().map_or(init.to_owned(), |n| n.to_string_lossy().into_owned()));
    } else if config.is_object() {
        model.push("gpt2".to_owned());
    }
    if let (Some(l), Some(h), Some(c)) =
        (config["n_layer"].as_u64(), config["n_head"].as_u64(), config["n_embd"].as_u64())
    {
        model.push(format!("{l}L {h}H {c}C"));
    }
    if let Some(params) = start["params"].as_u64() {
        model.push(format!("({})", human_count(params)));
    }
    if !model.is_empty() {
        settings.push(model.join(" "));
    }
    if let (Some(b), Some(t)) = (start["batch_size"].as_u64(), start["seq_len"].as_u64()) {
        let accum = args["grad_accum"].as_u64().filter(|&k| k > 1).map(|k| format!(" accum {k}")).unwrap_or_default();
        settings.push(format!("B={b} T={t}{accum}"));
    }
    if let Some(lr) = args["lr"].as_f64() {
        let mut text = format!("lr {lr:e}");
        if let Some(schedule) = args["lr_schedule"].as_str() {
            text += &format!(" {schedule}");
        }
        if let Some(warmup) = args["warmup_steps"].as_u64().filter(|&w| w > 0) {
            text += &format!(" warmup {warmup}");
        }
        settings.push(text);
    }
    settings
}

/// 124439808 -> "124M", 1557611200 -> "1.56B".
fn human_count(n: u64) -> String {
    let (value, unit) = match n {
        0..1_000 => return n.to_string(),
        1_000..1_000_000 => (n as f64 / 1e3, "K"),
        1_000_000..1_000_000_000 => (n as f64 / 1e6, "M"),
        _ => (n as f64 / 1e9, "B"),
    };
    // Three significant digits (value is in 1..1000).
    let digits = 2 - (value.log10().floor() as usize).min(2);
    let text = format!("{value:.digits$}");
    let text = if text.contains('.') { text.trim_end_matches('0').trim_end_matches('.') } else { &text };
    format!("{text}{unit}")
}

const SIZE: (u32, u32) = (1000, 600);
const FONT: &str = "sans-serif";
/// Tableau 10: distinct hues that stay readable on white.
const PALETTE: [(u8, u8, u8); 10] = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
];

/// One line (or set of points) on the chart.
struct Series {
    label: Option<String>,
    points: Vec<(u64, f64)>,
    color: RGBAColor,
    width: u32,
    /// Radius of a dot at each point (0: none).
    dots: u32,
}

/// Everything to draw, independent of the backend.
struct Chart {
    title: String,
    series: Vec<Series>,
    x: Range<u64>,
    y: Range<f64>,
    log_y: bool,
    y_desc: String,
}

impl Chart {
    fn new(runs: &[Run], options: &PlotOptions) -> Result<Chart> {
        // Settings every run shares go in the title; the rest tell the runs apart in the legend.
        let common: Vec<&String> =
            runs[0].settings.iter().filter(|s| runs.iter().all(|r| r.settings.contains(s))).collect();
        let title = options.title.clone().unwrap_or_else(|| {
            let shared = common.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(" · ");
            match runs.len() {
                1 if shared.is_empty() => runs[0].name.clone(),
                1 => shared,
                n if shared.is_empty() => format!("{n} runs"),
                n => format!("{n} runs · {shared}"),
            }
        });
        let keep = |p: &(u64, f64)| p.1.is_finite() && (!options.log_y || p.1 > 0.0);
        let mut series = Vec::new();
        for (i, run) in runs.iter().enumerate() {
            let (r, g, b) = PALETTE[i % PALETTE.len()];
            let color = RGBColor(r, g, b);
            let darker = RGBColor((r as f64 * 0.55) as u8, (g as f64 * 0.55) as u8, (b as f64 * 0.55) as u8);
            let own: Vec<&str> = run.settings.iter().filter(|s| !common.contains(s)).map(|s| s.as_str()).collect();
            let name = if runs.len() > 1 && !own.is_empty() {
                format!("{} · {}", run.name, own.join(" · "))
            } else {
                run.name.clone()
            };
            let train: Vec<_> = run.train.iter().copied().filter(keep).collect();
            let val: Vec<_> = run.val.iter().copied().filter(keep).collect();
            let dots = if train.len() == 1 { 3 } else { 0 };
            if options.smooth > 1 && train.len() > 1 {
                series.push(Series { label: None, points: decimate(&train), color: color.mix(0.25), width: 1, dots });
                // Means of finite losses can still overflow to infinity.
                let smooth: Vec<_> = moving_average(&train, options.smooth).into_iter().filter(keep).collect();
                series.push(Series {
                    label: Some(name.clone()),
                    points: decimate(&smooth),
                    color: color.to_rgba(),
                    width: 2,
                    dots,
                });
            } else {
                let label = Some(name.clone());
                series.push(Series { label, points: decimate(&train), color: color.to_rgba(), width: 1, dots });
            }
            if !val.is_empty() {
                let label = Some(format!("{} val", run.name));
                series.push(Series { label, points: val, color: darker.to_rgba(), width: 2, dots: 3 });
            }
        }
        let points = || series.iter().flat_map(|s| s.points.iter());
        if points().next().is_none() {
            bail!("--log-y: {} has no positive loss to plot", runs[0].path.display());
        }
        let x0 = points().map(|p| p.0).min().expect("there are points");
        let x1 = points().map(|p| p.0).max().expect("there are points");
        let y0 = points().map(|p| p.1).fold(f64::INFINITY, f64::min);
        let y1 = points().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
        // One step (or a flat loss) would give an empty range.
        let x = if x1 > x0 { x0..x1 } else { x0.saturating_sub(1)..x1.saturating_add(1) };
        // The losses are finite, but padding ones near ±f64::MAX would overflow the range's ends
        // or its width, and then the tick search never ends (plotters' linear one, or ours
        // through 2^31 decades): keep both finite.
        let finite = |v: f64| v.clamp(-f64::MAX / 4.0, f64::MAX / 4.0);
        let y = if options.log_y {
            finite(y0 / 1.1)..finite(y1 * 1.1)
        } else {
            let pad = if y1 > y0 { 0.05 * y1 - 0.05 * y0 } else { 0.05 * y0.abs().max(1.0) };
            finite(y0 - pad)..finite(y1 + pad)
        };
        let y_desc = match options.smooth {
            0 | 1 => "loss".to_owned(),
            n => format!("loss (train: mean of {n} steps)"),
        };
        Ok(Chart { title, series, x, y, log_y: options.log_y, y_desc })
    }
}

/// Trailing moving average: point i is the mean of points i+1-n..=i (fewer at the start).
///
/// The window's sum is never updated by subtraction: after a huge loss (a divergence, say) left a
/// running sum, the rest would be lost to cancellation, and the mean of positive losses could come
/// out zero or negative. The window is a queue of two stacks instead: new values go on the back
/// (with their running sum), and the front holds the older values as suffix sums, so removing the
/// oldest is a pop. Every sum is of values in the window only.
fn moving_average(points: &[(u64, f64)], n: usize) -> Vec<(u64, f64)> {
    let mut front: Vec<f64> = Vec::new(); // front[j]: the sum of front values j.. (the top is the oldest)
    let (mut back, mut back_sum) = (Vec::new(), 0.0);
    let mut out = Vec::with_capacity(points.len());
    for (i, &(x, y)) in points.iter().enumerate() {
        back.push(y);
        back_sum += y;
        if i >= n {
            if front.is_empty() {
                let mut suffix = 0.0;
                for v in back.drain(..).rev() {
                    suffix += v;
                    front.push(suffix);
                }
                back_sum = 0.0;
            }
            front.pop();
        }
        let sum = front.last().copied().unwrap_or(0.0) + back_sum;
        out.push((x, sum / (i + 1).min(n) as f64));
    }
    out
}

/// Long runs have more steps than the chart has pixels: keep each bucket's lowest and highest
/// point, which draws the same envelope with far fewer points (a smaller SVG).
fn decimate(points: &[(u64, f64)]) -> Vec<(u64, f64)> {
    let buckets = SIZE.0 as usize;
    if points.len() <= 2 * buckets {
        return points.to_vec();
    }
    let by_y = |a: &&(u64, f64), b: &&(u64, f64)| a.1.total_cmp(&b.1);
    points
        .chunks(points.len().div_ceil(buckets))
        .flat_map(|chunk| {
            let lo = *chunk.iter().min_by(by_y).expect("chunks are not empty");
            let hi = *chunk.iter().max_by(by_y).expect("chunks are not empty");
            if lo.0 <= hi.0 {
                [lo, hi]
            } else {
                [hi, lo]
            }
        })
        .collect()
}

/// The embedded font, registered once: plotters' ab_glyph text needs it to measure and draw.
fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let font: &'static [u8] = include_bytes!("../../assets/DejaVuSans-subset.ttf");
        let ok = plotters::style::register_font(FONT, FontStyle::Normal, font).is_ok();
        assert!(ok, "the embedded font is a valid TrueType file");
    });
}

fn render_svg(chart: &Chart) -> Result<String> {
    register_font();
    let mut svg = String::new();
    draw(SVGBackend::with_string(&mut svg, SIZE).into_drawing_area(), chart)?;
    Ok(svg)
}

fn render_png(chart: &Chart) -> Result<Vec<u8>> {
    register_font();
    let (w, h) = SIZE;
    let mut rgb = vec![0u8; (w * h * 3) as usize];
    draw(BitMapBackend::with_buffer(&mut rgb, SIZE).into_drawing_area(), chart)?;
    let mut png = Vec::new();
    let mut encoder = png::Encoder::new(&mut png, w, h);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header().context("cannot encode the PNG")?;
    writer.write_image_data(&rgb).context("cannot encode the PNG")?;
    writer.finish().context("cannot encode the PNG")?;
    Ok(png)
}

fn draw<DB: DrawingBackend>(root: DrawingArea<DB, Shift>, chart: &Chart) -> Result<()> {
    let fail = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow!("cannot draw the plot: {e}");
    root.fill(&WHITE).map_err(fail)?;
    if chart.log_y {
        draw_axes(&root, chart, LogAxis(chart.y.clone()))?;
    } else {
        draw_axes(&root, chart, chart.y.clone())?;
    }
    root.present().map_err(fail)
}

/// Generic over the y axis so one body draws linear and logarithmic charts.
fn draw_axes<DB, Y>(root: &DrawingArea<DB, Shift>, chart: &Chart, y: Y) -> Result<()>
where
    DB: DrawingBackend,
    Y: AsRangedCoord<Value = f64>,
    Y::CoordDescType: Ranged<ValueType = f64> + ValueFormatter<f64>,
{
    let fail = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow!("cannot draw the plot: {e}");
    let title = fit_title(root, &chart.title)?;
    let mut ctx = ChartBuilder::on(root)
        .caption(&title.0, (FONT, title.1))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(chart.x.clone(), y)
        .map_err(fail)?;
    ctx.configure_mesh()
        .x_desc("step")
        .y_desc(&chart.y_desc)
        .label_style((FONT, 14))
        .axis_desc_style((FONT, 16))
        .bold_line_style(BLACK.mix(0.12))
        .light_line_style(TRANSPARENT)
        .draw()
        .map_err(fail)?;
    for s in &chart.series {
        let style = ShapeStyle { color: s.color, filled: true, stroke_width: s.width };
        let drawn = ctx.draw_series(LineSeries::new(s.points.iter().copied(), style)).map_err(fail)?;
        if let Some(label) = &s.label {
            let (color, dots) = (s.color, s.dots);
            drawn.label(label).legend(move |(x, y)| {
                EmptyElement::at((x, y))
                    + PathElement::new([(0, 0), (20, 0)], color.stroke_width(2))
                    + Circle::new((10, 0), dots, color.filled())
            });
        }
        if s.dots > 0 {
            ctx.draw_series(s.points.iter().map(|&p| Circle::new(p, s.dots, s.color.filled()))).map_err(fail)?;
        }
    }
    ctx.configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .label_font((FONT, 14))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.3))
        .draw()
        .map_err(fail)?;
    Ok(())
}

/// A logarithmic loss axis with ticks at 1, 1.5, 2, 3, … × 10^k. plotters' own log axis labels
/// only powers of ten, and a loss curve rarely spans more than one decade.
struct LogAxis(Range<f64>);

impl Ranged for LogAxis {
    type FormatOption = NoDefaultFormatting;
    type ValueType = f64;

    fn map(&self, value: &f64, limit: (i32, i32)) -> i32 {
        let (lo, hi) = (self.0.start.ln(), self.0.end.ln());
        let t = (value.ln() - lo) / (hi - lo);
        limit.0 + (t * (limit.1 - limit.0) as f64).round() as i32
    }

    fn key_points<Hint: KeyPointHint>(&self, hint: Hint) -> Vec<f64> {
        let max = hint.max_num_points();
        let (lo, hi) = (self.0.start, self.0.end);
        // The chart keeps the range positive and finite, so at most ~630 decades; anything else
        // would make the decade range below unbounded.
        if !(lo > 0.0 && hi.is_finite() && lo < hi) {
            return plotters::coord::types::RangedCoordf64::from(lo..hi).key_points(hint);
        }
        let mantissas: [&[f64]; 4] = [&[1., 1.5, 2., 3., 4., 5., 6., 8.], &[1., 2., 3., 5.], &[1., 2., 5.], &[1.]];
        let decades = lo.log10().floor() as i32..=hi.log10().ceil() as i32;
        for set in mantissas {
            // Dividing by an exact power of ten rounds to the nearest double, so 3/10 prints "0.3".
            let ticks: Vec<f64> = decades
                .clone()
                .flat_map(|k| set.iter().map(move |m| if k < 0 { m / 10f64.powi(-k) } else { m * 10f64.powi(k) }))
                .filter(|v| (lo..=hi).contains(v))
                .collect();
            if ticks.len() <= max {
                if ticks.len() >= 2 {
                    return ticks;
                }
                break;
            }
        }
        // A range too narrow for two such ticks: plain linear ones.
        plotters::coord::types::RangedCoordf64::from(lo..hi).key_points(hint)
    }

    fn range(&self) -> Range<f64> {
        self.0.clone()
    }
}

impl ValueFormatter<f64> for LogAxis {
    fn format(value: &f64) -> String {
        // Four significant digits: enough for any tick, and no 3.0100000000000002.
        let scale = 10f64.powi(3 - value.abs().log10().floor() as i32);
        format!("{}", (value * scale).round() / scale)
    }
}

/// The title and a font size at which it fits the width, shortened with "…" if even 12 px is too wide.
fn fit_title<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, title: &str) -> Result<(String, u32)> {
    let max_width = SIZE.0 - 40;
    let width = |text: &str, size: u32| {
        root.estimate_text_size(text, &(FONT, size).into_font().into_text_style(root))
            .map(|(w, _)| w)
            .map_err(|e| anyhow!("cannot draw the plot: {e}"))
    };
    for size in (12..=22).rev().step_by(2) {
        if width(title, size)? <= max_width {
            return Ok((title.to_owned(), size));
        }
    }
    let mut chars: Vec<char> = title.chars().collect();
    while !chars.is_empty() && width(&format!("{}…", chars.iter().collect::<String>()), 12)? > max_width {
        chars.pop();
    }
    Ok((format!("{}…", chars.iter().collect::<String>().trim_end()), 12))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_read_as_people_write_them() {
        assert_eq!(human_count(999), "999");
        assert_eq!(human_count(7_100), "7.1K");
        assert_eq!(human_count(124_439_808), "124M");
        assert_eq!(human_count(1_557_611_200), "1.56B");
        assert_eq!(human_count(2_000_000), "2M");
    }

    #[test]
    fn moving_average_is_trailing() {
        let points = [(1, 4.0), (2, 2.0), (3, 0.0), (4, 6.0)];
        assert_eq!(moving_average(&points, 2), [(1, 4.0), (2, 3.0), (3, 1.0), (4, 3.0)]);
    }

    #[test]
    fn log_ticks_are_round_numbers() {
        let axis = LogAxis(2.7..12.0);
        assert_eq!(axis.key_points(10), [3.0, 4.0, 5.0, 6.0, 8.0, 10.0]);
        assert_eq!(axis.key_points(3), [3.0, 5.0, 10.0]);
        assert_eq!(LogAxis(0.12..0.4).key_points(10), [0.15, 0.2, 0.3, 0.4]);
        assert_eq!(LogAxis::format(&0.30000000000000004), "0.3");
    }

    #[test]
    fn decimation_keeps_the_extremes() {
        let points: Vec<_> = (0..10_000).map(|i| (i, if i == 5_000 { -1.0 } else { (i % 7) as f64 })).collect();
        let kept = decimate(&points);
        assert!(kept.len() <= 2 * SIZE.0 as usize);
        assert!(kept.contains(&(5_000, -1.0)));
        assert!(kept.windows(2).all(|w| w[0].0 <= w[1].0));
    }

    /// Found by fuzzing (fuzz/fuzz_targets/train_log.rs): finite losses near ±f64::MAX made the
    /// padded axis range infinite, and the tick search never ended. Each case must finish.
    #[test]
    fn losses_near_the_largest_double_plot_in_bounded_time() {
        let max = f64::MAX;
        let cases = [
            (format!("{{\"step\":1,\"loss\":{max:e}}}\n{{\"step\":2,\"loss\":{:e}}}\n", -max), false),
            (format!("{{\"step\":1,\"loss\":{max:e}}}\n{{\"step\":2,\"loss\":{:e}}}\n", max / 2.0), true),
            (format!("{{\"step\":1,\"loss\":{max:e}}}\n"), false),
            (format!("{{\"step\":{},\"loss\":{max:e}}}\n", u64::MAX), true),
        ];
        for (log, log_y) in cases {
            plots_within_a_minute(&log, PlotOptions { log_y, ..PlotOptions::default() });
        }
    }

    /// Draws `log` as an SVG in another thread; fails if that panics, errs or takes a minute.
    fn plots_within_a_minute(log: &str, options: PlotOptions) {
        let (done, finished) = std::sync::mpsc::channel();
        let text = log.to_owned();
        let what = format!("plotting {log:?} with {options:?}");
        std::thread::spawn(move || {
            let _ = done.send(plot_log_texts(&[(Path::new("log.jsonl"), &text)], false, &options).map(|b| b.len()));
        });
        match finished.recv_timeout(std::time::Duration::from_secs(60)) {
            Ok(image) => assert!(image.expect(&what) > 0, "{what}"),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => panic!("{what} did not finish in 60 s"),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => panic!("{what} panicked"),
        }
    }

    /// Found by fuzzing: a running sum lost everything but the huge first loss to cancellation, so
    /// the smoothed loss came out 0 after it, and a log axis down to 0 panicked (or, in release,
    /// tried to allocate ticks for 2^31 decades).
    #[test]
    fn a_huge_loss_does_not_swamp_the_moving_average() {
        let points = [(1, 5.9e22), (2, 2.0), (3, 1.0), (4, 0.5), (5, 0.25)];
        let smooth = moving_average(&points, 2);
        assert_eq!(smooth[2..], [(3, 1.5), (4, 0.75), (5, 0.375)]);
        let log: String =
            points.iter().map(|(step, loss)| format!("{{\"step\":{step},\"loss\":{loss:e}}}\n")).collect();
        for smooth in [2, 3] {
            plots_within_a_minute(&log, PlotOptions { log_y: true, smooth, title: None });
        }
    }
}
