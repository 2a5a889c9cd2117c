//! `finch check`: the flags, and the table of every GPU kernel and a short training run against
//! the CPU reference (the checks themselves are in `cuda::check`).

use crate::cuda::check::{print_table, run_checks};
use crate::cuda::{Gpu, Precision};
use anyhow::Result;

/// The flags of `finch check`.
#[derive(clap::Args, Debug, Clone)]
#[command(after_help = "Examples:
  finch check                    # every kernel at f32 and bf16, then 10 training steps CPU vs GPU
  finch check --precision f32    # one precision only
  finch check --ptxas            # also show registers, shared memory and spills of every kernel")]
pub struct CheckArgs {
    /// Check one precision only [default: f32 and bf16]
    #[arg(long, value_enum)]
    pub precision: Option<Precision>,
    /// Seed of the random inputs
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Print the ptxas report (registers, shared memory, spills) of the embedded kernels
    #[arg(long)]
    pub ptxas: bool,
}

/// `finch check`: prints the table; fails if any row fails.
pub fn run(args: CheckArgs) -> Result<()> {
    if args.ptxas {
        println!("ptxas report ({}):\n{}", crate::cuda::ptx::NVCC.unwrap_or("no nvcc"), crate::cuda::ptx::PTXAS_REPORT);
    }
    let gpu = Gpu::open()?;
    println!("device: {} (compute {}.{}), {} kernels", gpu.name, gpu.capability.0, gpu.capability.1, gpu.ptx_arch);
    let precisions = match args.precision {
        Some(p) => vec![p],
        None => vec![Precision::F32, Precision::Bf16],
    };
    let rows = run_checks(&gpu, &precisions, args.seed)?;
    print_table(&rows);
    let failed = rows.iter().filter(|r| !r.passed()).count();
    if failed > 0 {
        anyhow::bail!("{failed} of {} checks failed", rows.len());
    }
    println!("all {} checks passed", rows.len());
    Ok(())
}
