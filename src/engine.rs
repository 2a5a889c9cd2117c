//! What the training loop drives: the CPU reference model or the GPU model, behind one
//! interface, and the choice between them (`--device`, `--precision`).

use crate::config::GptConfig;
use crate::cpu::optimizer::{clip_grad_norm, global_norm, AdamW, AdamWConfig};
use crate::cuda::model::GpuGpt;
use crate::cuda::{Gpu, Precision};
use crate::layout::ParamLayout;
use crate::model::Gpt;
use anyhow::{bail, Result};
use std::sync::Arc;

/// Where training runs.
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
                Err(e) => Ok((Device::Cpu, Some(format!("chosen by --device auto: {e:#}")))),
            },
            other => bail!("--device {other}: unknown device (expected cpu, cuda or auto)"),
        }
    }
}

/// A model and its optimizer on one device.
pub enum Engine {
    Cpu { model: Box<Gpt<f32>>, optimizer: AdamW<f32> },
    Gpu(Box<GpuGpt>),
}

impl Engine {
    pub fn new(device: &Device, config: GptConfig, params: Vec<f32>, optimizer: Option<AdamW<f32>>) -> Result<Engine> {
        let n = ParamLayout::new(&config).total;
        Ok(match device {
            Device::Cpu => Engine::Cpu {
                model: Box::new(Gpt::new(config, params)),
                optimizer: optimizer.unwrap_or_else(|| AdamW::new(n)),
            },
            Device::Cuda(gpu, precision) => {
                let mut model = GpuGpt::new(gpu.clone(), config, *precision, &params)?;
                if let Some(opt) = optimizer {
                    model.set_optimizer(&opt)?;
                }
                Engine::Gpu(Box::new(model))
            }
        })
    }

    pub fn zero_grad(&mut self) -> Result<()> {
        match self {
            Engine::Cpu { model, .. } => model.zero_grad(),
            Engine::Gpu(m) => m.zero_grad()?,
        }
        Ok(())
    }

    /// Mean loss over the batch.
    pub fn forward(&mut self, x: &[u32], y: &[u32], b: usize, t: usize) -> Result<f64> {
        let loss = match self {
            Engine::Cpu { model, .. } => model.forward(x, Some(y), b, t),
            Engine::Gpu(m) => m.forward(x, Some(y), b, t)?,
        };
        Ok(loss.expect("targets given"))
    }

    pub fn backward(&mut self, loss_scale: f64) -> Result<()> {
        match self {
            Engine::Cpu { model, .. } => model.backward(loss_scale),
            Engine::Gpu(m) => m.backward(loss_scale)?,
        }
        Ok(())
    }

    pub fn grad_norm(&self) -> Result<f64> {
        match self {
            Engine::Cpu { model, .. } => Ok(global_norm(&model.grads)),
            Engine::Gpu(m) => m.grad_norm(),
        }
    }

    /// Clips the gradients given their norm (torch's rule), then one AdamW step.
    pub fn update(&mut self, lr: f64, hp: &AdamWConfig, grad_norm: f64, grad_clip: f64) -> Result<()> {
        match self {
            Engine::Cpu { model, optimizer } => {
                clip_grad_norm(&mut model.grads, grad_norm, grad_clip);
                optimizer.update(&mut model.params, &model.grads, &model.layout, lr, hp);
                Ok(())
            }
            Engine::Gpu(m) => m.update(lr, hp, grad_norm, grad_clip),
        }
    }

    /// Calls `f` with the f32 (master) weights and the optimizer state, copied from the GPU
    /// when training there.
    pub fn with_state<R>(&self, f: impl FnOnce(&[f32], &AdamW<f32>) -> Result<R>) -> Result<R> {
        match self {
            Engine::Cpu { model, optimizer } => f(&model.params, optimizer),
            Engine::Gpu(m) => f(&m.master_params()?, &m.optimizer()?),
        }
    }
}
