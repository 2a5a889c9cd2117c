//! `--device` and `--precision`: which backend a command (train, sample) runs on.

use crate::cuda::llama_model::GpuLlama;
use crate::cuda::model::GpuGpt;
use crate::cuda::{Gpu, Precision, NO_GPU};
use crate::model::family::ModelConfig;
use anyhow::{bail, Result};
use std::sync::Arc;

/// Where training runs.
#[derive(Clone)]
pub enum Device {
    Cpu,
    Cuda(Arc<Gpu>, Precision),
}

impl Device {
    /// Resolves `--device` (cpu, cuda, auto) and `--precision`. Returns the device and, for
    /// `auto`, why it was chosen.
    pub fn choose(device: &str, precision: Option<Precision>) -> Result<(Device, Option<String>)> {
        let gpu_precision = precision.unwrap_or(Precision::Bf16);
        match device {
            "cpu" => {
                if precision == Some(Precision::Bf16) {
                    bail!("--precision bf16 needs --device cuda: the CPU reference computes in f32");
                }
                Ok((Device::Cpu, None))
            }
            "cuda" => match Gpu::open() {
                Ok(gpu) => Ok((Device::Cuda(gpu, gpu_precision), None)),
                Err(e) => bail!("--device cuda: {e:#}"),
            },
            "auto" => match Gpu::open() {
                Ok(gpu) => Ok((Device::Cuda(gpu, gpu_precision), Some("chosen by --device auto".into()))),
                Err(e) if precision == Some(Precision::Bf16) => {
                    bail!("--precision bf16 needs a GPU, and none is usable: {e:#}")
                }
                // No GPU is the usual case for a CPU run: say so briefly, not every reason each time.
                Err(e) if e.to_string().starts_with(NO_GPU) => Ok((Device::Cpu, Some("no GPU found".into()))),
                Err(e) => Ok((Device::Cpu, Some(format!("chosen by --device auto: {e:#}")))),
            },
            other => bail!("--device {other}: unknown device (expected cpu, cuda or auto)"),
        }
    }

    /// A data-parallel rank's device: GPU `local_rank`, whatever `--device` says short of cpu
    /// (which runs one process).
    pub fn for_rank(device: &str, precision: Option<Precision>, local_rank: usize, ranks: usize) -> Result<Device> {
        if device == "cpu" {
            bail!("--device cpu: a job of {ranks} processes trains on GPUs, one per process (NCCL); the CPU runs one");
        }
        match Gpu::open_ordinal(local_rank) {
            Ok(gpu) => Ok(Device::Cuda(gpu, precision.unwrap_or(Precision::Bf16))),
            Err(e) => bail!("--device {device}: {e:#}"),
        }
    }

    /// The device for a model of `cfg`: a GPU whose kernels cannot run it (see
    /// [`GpuGpt::unsupported`]) is refused under `--device cuda` and left for the CPU under
    /// `--device auto`, with the reason.
    pub fn fit(self, reason: Option<String>, flag: &str, cfg: &ModelConfig) -> Result<(Device, Option<String>)> {
        let unsupported = match cfg {
            ModelConfig::Gpt2(c) => GpuGpt::unsupported(c),
            ModelConfig::Llama(c) => GpuLlama::unsupported(c),
        };
        match (&self, unsupported) {
            (Device::Cuda(..), Some(why)) if flag == "auto" => Ok((Device::Cpu, Some(format!("on the CPU: {why}")))),
            (Device::Cuda(..), Some(why)) => bail!("--device cuda: {why}; use --device cpu"),
            _ => Ok((self, reason)),
        }
    }
}
