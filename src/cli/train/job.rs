//! The data-parallel side of `finch train`: which rank this process is (the launcher's
//! environment), `--nproc-per-node` starting the local ranks, and joining the job (the
//! rendezvous at MASTER_ADDR:MASTER_PORT, then NCCL). A single process skips all of it.

use super::args::TrainArgs;
use crate::cli::device::Device;
use crate::cuda::nccl::Nccl;
use crate::dist::rendezvous::exchange_id;
use crate::dist::spawn::{is_local_rank, launch_local, JobStatus};
use crate::dist::world::{self, World};
use anyhow::{bail, Result};
use std::time::Duration;

/// What this process is: the launcher of `--nproc-per-node` ranks (which have finished, with
/// the job's status), or a rank (possibly the only one).
pub enum Role {
    Launched(JobStatus),
    Rank(World),
}

/// Reads the launcher's environment; under `--nproc-per-node N` in a plain process, starts the
/// N ranks and waits for them.
pub fn role(args: &TrainArgs) -> Result<Role> {
    let world = world::from_env(&|name| std::env::var(name).ok())?;
    match args.nproc_per_node {
        Some(n) if !is_local_rank() => {
            if !world.is_single() {
                bail!(
                    "--nproc-per-node {n}: this process is already {} under {}, which started the ranks; use one or \
                     the other",
                    world.describe(),
                    world.launcher
                );
            }
            if n == 1 {
                return Ok(Role::Rank(world));
            }
            let argv: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
            Ok(Role::Launched(launch_local(n, &argv)?))
        }
        _ => {
            world::set_current(&world);
            Ok(Role::Rank(world))
        }
    }
}

/// Joins the job's NCCL communicator on this rank's GPU: rank 0 creates the id and hands it out
/// at MASTER_ADDR:MASTER_PORT. None for a single process.
pub fn connect(world: &World, device: &Device, timeout_s: f64) -> Result<Option<Nccl>> {
    if world.is_single() {
        return Ok(None);
    }
    let Device::Cuda(gpu, _) = device else { bail!("{}: a multi-process job trains on GPUs", world.describe()) };
    let timeout = Duration::from_secs_f64(timeout_s);
    let id = match world.rank {
        0 => Some(Nccl::unique_id()?),
        _ => None,
    };
    let id = exchange_id(world, id, timeout)?;
    Ok(Some(Nccl::init(gpu, world.rank, world.size, id, timeout)?))
}
