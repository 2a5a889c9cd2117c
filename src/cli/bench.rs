//! `finch bench`: the flags, and the table of our kernels against cuBLAS (the benchmark itself is
//! in `cuda::bench`).

use crate::cuda::bench::{bench_shape, shapes, MatmulResult, TOLERANCE};
use crate::cuda::Gpu;
use crate::model::rng::Rng;
use anyhow::{bail, Context, Result};
use cudarc::cublas::CudaBlas;

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum BenchKind {
    /// The three training products at GPT-2 124M shapes, and square 4096³ and 8192³
    Matmul,
}

#[derive(clap::Args, Debug, Clone)]
#[command(after_help = "Examples:
  finch bench matmul                     # table: ours vs cuBLAS, TFLOP/s, ratio, % of peak
  finch bench matmul --json > mm.jsonl   # one JSON object per shape
  finch bench matmul --shapes square --repeats 100")]
pub struct BenchArgs {
    pub kind: BenchKind,
    /// Which shapes: gpt2 (forward, dX and dW of GPT-2 124M at B·T = 8192 and 16384), square, or all
    #[arg(long, default_value = "all")]
    pub shapes: String,
    /// Timed runs per kernel and shape (the median is reported)
    #[arg(long, default_value_t = 30)]
    pub repeats: usize,
    /// Untimed runs before timing
    #[arg(long, default_value_t = 5)]
    pub warmup: usize,
    /// One JSON object per shape instead of the table
    #[arg(long)]
    pub json: bool,
}

/// Runs `finch bench`.
pub fn run(args: BenchArgs) -> Result<()> {
    let BenchKind::Matmul = args.kind;
    if args.repeats == 0 {
        bail!("--repeats must be at least 1");
    }
    let shapes = shapes(&args.shapes)?;
    let gpu = Gpu::open()?;
    // cudarc loads libcublas lazily and panics if it is missing; ask first.
    if !unsafe { cudarc::cublas::sys::is_culib_present() } {
        bail!(
            "cuBLAS (libcublas.so) could not be loaded; install the CUDA toolkit's cuBLAS or add it to LD_LIBRARY_PATH"
        );
    }
    let blas = CudaBlas::new(gpu.stream.clone()).context("cannot start cuBLAS (is libcublas installed?)")?;
    let mut rng = Rng::new(1);
    let mut results = Vec::new();
    if !args.json {
        println!(
            "device: {} ({} kernels); bf16 in and out, fp32 accumulate; median of {} runs",
            gpu.name, gpu.ptx_arch, args.repeats
        );
    }
    for shape in &shapes {
        let r = bench_shape(&gpu, &blas, shape, (args.warmup, args.repeats), &mut rng)?;
        if args.json {
            println!("{}", serde_json::to_string(&r)?);
        }
        results.push(r);
    }
    let peak = results.iter().map(|r| r.cublas_tflops).fold(0.0, f64::max);
    if !args.json {
        println!(
            "{:<16} {:>2} {:>6} {:>6} {:>6} {:>9} {:>8} {:>9} {:>8} {:>6} {:>6} {:>9} {:>9}",
            "shape",
            "op",
            "M",
            "N",
            "K",
            "ours ms",
            "TF/s",
            "cuBLAS ms",
            "TF/s",
            "ratio",
            "%peak",
            "err ours",
            "err cuBLAS"
        );
        for r in &results {
            let s = &r.shape;
            println!(
                "{:<16} {:>2?} {:>6} {:>6} {:>6} {:>9.3} {:>8.1} {:>9.3} {:>8.1} {:>6.2} {:>5.0}% {:>9.1e} {:>9.1e}",
                s.name,
                s.op,
                s.m,
                s.n,
                s.k,
                r.ours_ms,
                r.ours_tflops,
                r.cublas_ms,
                r.cublas_tflops,
                r.ratio,
                100.0 * r.ours_tflops / peak,
                r.ours_error,
                r.cublas_error
            );
        }
        println!("peak = the best cuBLAS result of this run: {peak:.1} TFLOP/s");
    }
    let wrong: Vec<&MatmulResult> =
        results.iter().filter(|r| r.ours_error.is_nan() || r.ours_error > TOLERANCE).collect();
    if !wrong.is_empty() {
        bail!("{} shapes gave wrong results (sampled error above {TOLERANCE})", wrong.len());
    }
    Ok(())
}
