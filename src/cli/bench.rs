//! `finch bench`: the flags, and the tables: our matmul against cuBLAS, our attention in TFLOP/s,
//! the memory-bound kernels in GB/s (the benchmarks themselves are in `cuda::bench` and
//! `cuda::bench_memory`).

use crate::cuda::bench::{
    attention_shapes, bench_attention, bench_shape, gpt2_shapes, shapes, square_shapes, MatmulResult, SWEEP_ROWS,
    TOLERANCE,
};
use crate::cuda::bench_memory::bench_memory;
use crate::cuda::ops::{MatmulVariant, MATMUL_VARIANTS};
use crate::cuda::Gpu;
use crate::model::rng::Rng;
use anyhow::{bail, Context, Result};
use cudarc::cublas::CudaBlas;

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum BenchKind {
    /// The three training products at GPT-2 124M shapes, and square 4096³ and 8192³
    Matmul,
    /// Causal attention forward and backward (bf16), FlashAttention's shapes and FLOP count
    Attention,
    /// The step's memory-bound kernels at GPT-2 124M shapes: GB/s and % of a device-to-device copy
    Memory,
}

#[derive(clap::Args, Debug, Clone)]
#[command(after_help = "Examples:
  finch bench matmul                     # table: ours vs cuBLAS, TFLOP/s, ratio, % of peak
  finch bench matmul --json > mm.jsonl   # one JSON object per shape
  finch bench matmul --shapes square --repeats 100
  finch bench matmul --sweep             # every variant on GPT-2 shapes at B·T 8K-64K and squares
  finch bench attention                  # forward, backward TFLOP/s; compare benches/attention_torch.py
  finch bench memory                     # memory-bound kernels: GB/s, % of the copy bandwidth")]
pub struct BenchArgs {
    pub kind: BenchKind,
    /// Which shapes: gpt2 (forward, dX and dW of GPT-2 124M at B·T = 8192 and 16384), square, or all
    #[arg(long, default_value = "all")]
    pub shapes: String,
    /// Every tensor-core variant on every GPT-2 124M training shape at B·T = 8192 to 65536, and
    /// 4096³ and 8192³: TFLOP/s and % of cuBLAS per variant, and the best per shape
    #[arg(long, conflicts_with = "shapes")]
    pub sweep: bool,
    /// attention, memory: tiny shapes, to show the benchmark runs; the numbers mean nothing
    #[arg(long)]
    pub quick: bool,
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
    if args.repeats == 0 {
        bail!("--repeats must be at least 1");
    }
    if args.kind == BenchKind::Attention {
        return run_attention(&args);
    }
    if args.kind == BenchKind::Memory {
        return run_memory(&args);
    }
    let shapes = match args.sweep {
        true => [gpt2_shapes(&SWEEP_ROWS), square_shapes()].concat(),
        false => shapes(&args.shapes)?,
    };
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
            "device: {} ({} kernels); bf16 in and out, fp32 accumulate; median of {} timed batches",
            gpu.name, gpu.ptx_arch, args.repeats
        );
    }
    for shape in &shapes {
        let variants: Vec<&'static MatmulVariant> = match args.sweep {
            true => MATMUL_VARIANTS.iter().collect(),
            false => vec![MatmulVariant::for_shape(shape.m, shape.n, shape.k)],
        };
        let r = bench_shape(&gpu, &blas, shape, &variants, (args.warmup, args.repeats), &mut rng)?;
        if args.json {
            println!("{}", serde_json::to_string(&r)?);
        }
        results.push(r);
    }
    if !args.json {
        match args.sweep {
            true => print_sweep(&results),
            false => print_table(&results),
        }
    }
    let wrong = results.iter().flat_map(|r| &r.ours).filter(|v| v.error.is_nan() || v.error > TOLERANCE).count();
    if wrong > 0 {
        bail!("{wrong} shape/variant pairs gave wrong results (sampled error above {TOLERANCE})");
    }
    Ok(())
}

/// One row per shape: the variant finch runs there against cuBLAS.
fn print_table(results: &[MatmulResult]) {
    let peak = results.iter().map(|r| r.cublas_tflops).fold(0.0, f64::max);
    println!(
        "{:<16} {:>2} {:>6} {:>6} {:>6} {:>10} {:>9} {:>8} {:>9} {:>8} {:>6} {:>6} {:>9} {:>9}",
        "shape",
        "op",
        "M",
        "N",
        "K",
        "variant",
        "ours ms",
        "TF/s",
        "cuBLAS ms",
        "TF/s",
        "ratio",
        "%peak",
        "err ours",
        "err cuBLAS"
    );
    for r in results {
        let (s, v) = (&r.shape, &r.ours[0]);
        println!(
            "{:<16} {:>2?} {:>6} {:>6} {:>6} {:>10} {:>9.3} {:>8.1} {:>9.3} {:>8.1} {:>6.2} {:>5.0}% {:>9.1e} {:>9.1e}",
            s.name,
            s.op,
            s.m,
            s.n,
            s.k,
            v.variant,
            v.ms,
            v.tflops,
            r.cublas_ms,
            r.cublas_tflops,
            v.ratio,
            100.0 * v.tflops / peak,
            v.error,
            r.cublas_error
        );
    }
    println!("peak = the best cuBLAS result of this run: {peak:.1} TFLOP/s");
}

/// One row per shape: every variant's TFLOP/s and % of cuBLAS, the best, and the one finch
/// chooses; then the worst shape for each.
fn print_sweep(results: &[MatmulResult]) {
    let mut header = format!("{:<16} {:>2} {:>6} {:>6} {:>6} {:>9}", "shape", "op", "M", "N", "K", "cuBLAS");
    for v in &MATMUL_VARIANTS {
        header += &format!(" {:>16}", v.name);
    }
    println!("{header} {:>10} {:>10}", "best", "chosen");
    for r in results {
        let s = &r.shape;
        let mut row = format!("{:<16} {:>2?} {:>6} {:>6} {:>6} {:>9.1}", s.name, s.op, s.m, s.n, s.k, r.cublas_tflops);
        for v in &r.ours {
            row += &format!(" {:>8.1} ({:>4.0}%)", v.tflops, 100.0 * v.ratio);
        }
        let chosen = MatmulVariant::for_shape(s.m, s.n, s.k).name;
        println!("{row} {:>10} {:>10}", r.best().variant, chosen);
    }
    let worst = |pick: &dyn Fn(&MatmulResult) -> f64, square: bool| {
        results.iter().filter(|r| (r.shape.name == "square") == square).map(pick).fold(f64::INFINITY, f64::min)
    };
    let chosen = |r: &MatmulResult| {
        let name = MatmulVariant::for_shape(r.shape.m, r.shape.n, r.shape.k).name;
        r.ours.iter().find(|v| v.variant == name).map_or(0.0, |v| v.ratio)
    };
    let best = |r: &MatmulResult| r.best().ratio;
    println!(
        "% of cuBLAS at the worst GPT-2 shape: {:.0}% with the chosen variant, {:.0}% with the best (target ≥ 70%)",
        100.0 * worst(&chosen, false),
        100.0 * worst(&best, false)
    );
    println!(
        "% of cuBLAS at the worst square shape: {:.0}% chosen, {:.0}% best (target ≥ 80% at 4096³)",
        100.0 * worst(&chosen, true),
        100.0 * worst(&best, true)
    );
}

/// `finch bench attention`: forward, backward and both, TFLOP/s as FlashAttention counts them.
fn run_attention(args: &BenchArgs) -> Result<()> {
    let gpu = Gpu::open()?;
    let mut rng = Rng::new(1);
    if !args.json {
        println!(
            "device: {} ({} kernels); causal, bf16; forward FLOPs 4·B·H·N²·d/2, backward 2.5×; median of {} batches",
            gpu.name, gpu.ptx_arch, args.repeats
        );
        println!(
            "{:>3} {:>5} {:>3} {:>4} {:>9} {:>8} {:>9} {:>8} {:>9}",
            "d", "N", "B", "H", "fwd ms", "TF/s", "bwd ms", "TF/s", "fwd+bwd"
        );
    }
    for shape in attention_shapes(args.quick) {
        let r = bench_attention(&gpu, &shape, (args.warmup, args.repeats), &mut rng)?;
        match args.json {
            true => println!("{}", serde_json::to_string(&r)?),
            false => println!(
                "{:>3} {:>5} {:>3} {:>4} {:>9.3} {:>8.1} {:>9.3} {:>8.1} {:>9.1}",
                shape.d, shape.n, shape.b, shape.h, r.fwd_ms, r.fwd_tflops, r.bwd_ms, r.bwd_tflops, r.total_tflops
            ),
        }
    }
    if !args.json {
        println!("PyTorch's reference on this device: python3 benches/attention_torch.py (same shapes and counts)");
    }
    Ok(())
}

/// `finch bench memory`: each memory-bound operation's GB/s against the copy's, same run.
fn run_memory(args: &BenchArgs) -> Result<()> {
    let gpu = Gpu::open()?;
    let bench = bench_memory(&gpu, args.quick, (args.warmup, args.repeats))?;
    if args.json {
        for r in &bench.results {
            println!("{}", serde_json::to_string(r)?);
        }
        return Ok(());
    }
    println!(
        "device: {} ({} kernels, {} SMs); bf16; bytes = each input and output once; median of {} batches",
        gpu.name, gpu.ptx_arch, gpu.sm_count, args.repeats
    );
    println!("device-to-device copy: {:.0} GB/s (read + write)", bench.copy_gbps);
    println!("{:<36} {:<18} {:>10} {:>9} {:>8} {:>7}", "operation", "shape", "MB", "ms", "GB/s", "% copy");
    for r in &bench.results {
        println!(
            "{:<36} {:<18} {:>10.1} {:>9.3} {:>8.0} {:>6.0}%",
            r.op,
            r.shape,
            r.bytes / 1e6,
            r.ms,
            r.gbps,
            100.0 * r.of_copy
        );
    }
    Ok(())
}
