//! What the training loop drives: the CPU reference model or the GPU model, behind one
//! interface (the choice between them is `cli::device`).

use crate::cli::device::Device;
use crate::cpu::llama::Llama;
use crate::cpu::model::Gpt;
use crate::cpu::optimizer::{clip_grad_norm, global_norm, AdamW, AdamWConfig};
use crate::cuda::llama_model::GpuLlama;
use crate::cuda::model::{GpuGpt, StepOutcome, Votes};
use crate::cuda::nccl::Nccl;
use crate::cuda::profile::{dense_bf16_peak, KernelTotal};
use crate::model::family::ModelConfig;
use crate::model::layout::ParamLayout;
use anyhow::bail;
use anyhow::Result;

/// A non-finite value found in a parameter-shaped buffer: which tensor, where, what.
#[derive(Debug, Clone, PartialEq)]
pub struct NonFinite {
    pub tensor: String,
    /// The element's index in each dimension of the tensor.
    pub index: Vec<usize>,
    pub value: f32,
    /// How many elements of the buffer are not finite.
    pub count: usize,
}

impl std::fmt::Display for NonFinite {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        let index: Vec<String> = self.index.iter().map(|i| i.to_string()).collect();
        write!(f, "{}[{}] = {}", self.tensor, index.join(", "), self.value)?;
        if self.count > 1 {
            write!(f, ", and {} more non-finite values", self.count - 1)?;
        }
        Ok(())
    }
}

/// The first non-finite element of `values` (a buffer in `layout`), in layout order, named by
/// its tensor; None if every element is finite.
pub fn first_nonfinite(layout: &ParamLayout, values: &[f32]) -> Option<NonFinite> {
    let first = values.iter().position(|v| !v.is_finite())?;
    let count = values[first..].iter().filter(|v| !v.is_finite()).count();
    let spec = layout.specs.iter().find(|s| s.range().contains(&first)).expect("the layout covers the buffer");
    let mut rest = first - spec.offset;
    let mut index = vec![0; spec.shape.len()];
    for (i, dim) in index.iter_mut().zip(&spec.shape).rev() {
        *i = rest % dim;
        rest /= dim;
    }
    Some(NonFinite { tensor: spec.name.clone(), index, value: values[first], count })
}

/// How a GPU runs the step (TrainArgs' --cuda-graph and --recompute); the CPU ignores them.
#[derive(Debug, Clone, Copy, Default)]
pub struct GpuOptions {
    pub cuda_graph: bool,
    pub recompute: bool,
    pub profile: bool,
}

impl GpuOptions {
    pub fn of(args: &super::args::TrainArgs) -> Self {
        GpuOptions { cuda_graph: args.cuda_graph, recompute: args.recompute, profile: args.profile }
    }
}

/// What the loop asks of a CPU reference model, whichever its family.
pub trait CpuModel: Send {
    /// Mean loss over the batch.
    fn forward(&mut self, x: &[u32], y: &[u32], b: usize, t: usize) -> f64;
    fn backward(&mut self, loss_scale: f64);
    fn zero_grad(&mut self);
    fn params(&self) -> &[f32];
    fn grads(&self) -> &[f32];
    /// The weights (to update), their gradients (to clip) and their layout, at once.
    fn state_mut(&mut self) -> (&mut [f32], &mut [f32], &ParamLayout);
}

macro_rules! cpu_model {
    ($model:ty) => {
        impl CpuModel for $model {
            fn forward(&mut self, x: &[u32], y: &[u32], b: usize, t: usize) -> f64 {
                <$model>::forward(self, x, Some(y), b, t).expect("targets given")
            }
            fn backward(&mut self, loss_scale: f64) {
                <$model>::backward(self, loss_scale)
            }
            fn zero_grad(&mut self) {
                <$model>::zero_grad(self)
            }
            fn params(&self) -> &[f32] {
                &self.params
            }
            fn grads(&self) -> &[f32] {
                &self.grads
            }
            fn state_mut(&mut self) -> (&mut [f32], &mut [f32], &ParamLayout) {
                (&mut self.params, &mut self.grads, &self.layout)
            }
        }
    };
}
cpu_model!(Gpt<f32>);
cpu_model!(Llama<f32>);

/// A model and its optimizer on one device.
pub enum Engine {
    Cpu {
        model: Box<dyn CpuModel>,
        optimizer: AdamW<f32>,
    },
    Gpu(Box<GpuGpt>),
    /// A Llama-family model on a GPU (one host sync per step, no CUDA graph yet).
    GpuLlama(Box<GpuLlama>),
}

impl Engine {
    /// The model on `device`, with `options` when it is a GPU, as one rank of a data-parallel
    /// job when `nccl` is given.
    pub fn new(
        device: &Device,
        config: ModelConfig,
        params: Vec<f32>,
        optimizer: Option<AdamW<f32>>,
        options: GpuOptions,
        nccl: Option<Nccl>,
    ) -> Result<Engine> {
        let n = config.layout().total;
        Ok(match (device, config) {
            (Device::Cpu, config) => Engine::Cpu {
                model: match config {
                    ModelConfig::Gpt2(c) => Box::new(Gpt::new(c, params)),
                    ModelConfig::Llama(c) => Box::new(Llama::new(c, params)),
                },
                optimizer: optimizer.unwrap_or_else(|| AdamW::new(n)),
            },
            (Device::Cuda(gpu, precision), ModelConfig::Llama(config)) => {
                if nccl.is_some() {
                    bail!("data-parallel training of Llama-family models is not implemented yet; use one GPU");
                }
                let mut model = GpuLlama::new(gpu.clone(), config, *precision, &params)?;
                if let Some(opt) = optimizer {
                    model.set_optimizer(&opt)?;
                }
                Engine::GpuLlama(Box::new(model))
            }
            (Device::Cuda(gpu, precision), ModelConfig::Gpt2(config)) => {
                let mut model = match nccl {
                    Some(nccl) => GpuGpt::new_sharded(gpu.clone(), config, *precision, &params, nccl)?,
                    None => GpuGpt::new(gpu.clone(), config, *precision, &params)?,
                };
                model.use_graph = options.cuda_graph;
                model.set_recompute(options.recompute);
                if options.profile {
                    model.set_profile();
                }
                if let Some(opt) = optimizer {
                    model.set_optimizer(&opt)?;
                }
                Engine::Gpu(Box::new(model))
            }
        })
    }

    /// One optimizer step over `micro_batches` (inputs, targets; B·T each): the gradient of
    /// the mean loss over them, its global norm and, when both are finite, clipping and AdamW;
    /// otherwise nothing is updated (the gradients stay, for naming the culprit). The GPU does
    /// it all on the device with one synchronisation.
    pub fn step(
        &mut self,
        micro_batches: &[(Vec<u32>, Vec<u32>)],
        (b, t): (usize, usize),
        lr: f64,
        hp: &AdamWConfig,
        grad_clip: f64,
        votes: Votes,
    ) -> Result<StepOutcome> {
        let accum = micro_batches.len() as f64;
        match self {
            Engine::Cpu { model, optimizer } => {
                model.zero_grad();
                let mut loss = 0.0;
                for (x, y) in micro_batches {
                    loss += model.forward(x, y, b, t) / accum;
                    model.backward(1.0 / accum);
                }
                let grad_norm = global_norm(model.grads());
                let applied = loss.is_finite() && grad_norm.is_finite();
                if applied {
                    let (params, grads, layout) = model.state_mut();
                    clip_grad_norm(grads, grad_norm, grad_clip);
                    optimizer.update(params, grads, layout, lr, hp);
                }
                let (stop_votes, checkpoint_votes) = (votes.stop as usize, votes.checkpoint as usize);
                Ok(StepOutcome { loss, grad_norm, applied, stop_votes, checkpoint_votes })
            }
            Engine::Gpu(m) => {
                let batches: Vec<(&[u32], &[u32])> = micro_batches.iter().map(|(x, y)| (&x[..], &y[..])).collect();
                m.train_step(&batches, (b, t), (lr, hp), grad_clip, votes)
            }
            Engine::GpuLlama(m) => {
                let batches: Vec<(&[u32], &[u32])> = micro_batches.iter().map(|(x, y)| (&x[..], &y[..])).collect();
                m.train_step(&batches, (b, t), (lr, hp), grad_clip, votes)
            }
        }
    }

    /// The GPU's dense bf16 peak (FLOP/s) and its name, for MFU; None on the CPU or a GPU
    /// the table lacks.
    pub fn peak(&self) -> Option<(f64, &'static str)> {
        match self {
            Engine::Cpu { .. } | Engine::GpuLlama(_) => None,
            Engine::Gpu(m) => dense_bf16_peak(&m.gpu_name()),
        }
    }

    /// --profile's per-kernel totals and the steps they cover.
    pub fn profile(&self) -> Option<(Vec<KernelTotal>, usize)> {
        match self {
            Engine::Cpu { .. } | Engine::GpuLlama(_) => None,
            Engine::Gpu(m) => m.profile(),
        }
    }

    /// Values each rank computed (a validation loss's sum and count), summed over the ranks.
    pub fn sum_over_ranks(&self, values: &[f64]) -> Result<Vec<f64>> {
        match self {
            Engine::Cpu { .. } | Engine::GpuLlama(_) => Ok(values.to_vec()),
            Engine::Gpu(m) => m.sum_over_ranks(values),
        }
    }

    pub fn zero_grad(&mut self) -> Result<()> {
        match self {
            Engine::Cpu { model, .. } => model.zero_grad(),
            Engine::Gpu(m) => m.zero_grad()?,
            Engine::GpuLlama(m) => m.zero_grad()?,
        }
        Ok(())
    }

    /// Mean loss over the batch.
    pub fn forward(&mut self, x: &[u32], y: &[u32], b: usize, t: usize) -> Result<f64> {
        Ok(match self {
            Engine::Cpu { model, .. } => model.forward(x, y, b, t),
            Engine::Gpu(m) => m.forward(x, Some(y), b, t)?.expect("targets given"),
            Engine::GpuLlama(m) => m.forward(x, Some(y), b, t)?.expect("targets given"),
        })
    }

    pub fn backward(&mut self, loss_scale: f64) -> Result<()> {
        match self {
            Engine::Cpu { model, .. } => model.backward(loss_scale),
            Engine::Gpu(m) => m.backward(loss_scale)?,
            Engine::GpuLlama(m) => m.backward(loss_scale)?,
        }
        Ok(())
    }

    pub fn grad_norm(&self) -> Result<f64> {
        match self {
            Engine::Cpu { model, .. } => Ok(global_norm(model.grads())),
            Engine::Gpu(m) => m.grad_norm(),
            Engine::GpuLlama(m) => m.grad_norm(),
        }
    }

    /// The first non-finite parameter gradient, named (downloaded from the GPU when training
    /// there); None if all are finite.
    pub fn first_nonfinite_grad(&self, layout: &ParamLayout) -> Result<Option<NonFinite>> {
        Ok(match self {
            Engine::Cpu { model, .. } => first_nonfinite(layout, model.grads()),
            Engine::Gpu(m) => first_nonfinite(layout, &m.grads()?),
            Engine::GpuLlama(m) => first_nonfinite(layout, &m.grads()?),
        })
    }

    /// Clips the gradients given their norm (torch's rule), then one AdamW step.
    pub fn update(&mut self, lr: f64, hp: &AdamWConfig, grad_norm: f64, grad_clip: f64) -> Result<()> {
        match self {
            Engine::Cpu { model, optimizer } => {
                let (params, grads, layout) = model.state_mut();
                clip_grad_norm(grads, grad_norm, grad_clip);
                optimizer.update(params, grads, layout, lr, hp);
                Ok(())
            }
            Engine::Gpu(m) => m.update(lr, hp, grad_norm, grad_clip),
            Engine::GpuLlama(m) => m.update(lr, hp, grad_norm, grad_clip),
        }
    }

    /// Calls `f` with the f32 (master) weights and the optimizer state, copied from the GPU
    /// when training there.
    pub fn with_state<R>(&self, f: impl FnOnce(&[f32], &AdamW<f32>) -> Result<R>) -> Result<R> {
        match self {
            Engine::Cpu { model, optimizer } => f(model.params(), optimizer),
            Engine::Gpu(m) => f(&m.master_params()?, &m.optimizer()?),
            Engine::GpuLlama(m) => f(&m.master_params()?, &m.optimizer()?),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_nonfinite_value_is_named_by_tensor_and_index() {
        let cfg = crate::model::config::GptConfig {
            n_layer: 2,
            n_head: 2,
            n_embd: 8,
            vocab_size: 50,
            n_positions: 8,
            layer_norm_epsilon: 1e-5,
        };
        let layout = ParamLayout::new(&cfg);
        let mut values = vec![0.5f32; layout.total];
        assert_eq!(first_nonfinite(&layout, &values), None);
        let spec = layout.get("h.1.attn.c_attn.weight").unwrap().clone();
        assert_eq!(spec.shape, [8, 24]);
        values[spec.offset + 3 * 24 + 17] = f32::NAN;
        values[layout.total - 1] = f32::INFINITY;
        let found = first_nonfinite(&layout, &values).unwrap();
        assert_eq!(found.to_string(), "h.1.attn.c_attn.weight[3, 17] = NaN, and 1 more non-finite values");
        values[spec.offset + 3 * 24 + 17] = 0.0;
        let last = layout.specs.last().unwrap();
        let found = first_nonfinite(&layout, &values).unwrap();
        assert_eq!((found.tensor.as_str(), found.value, found.count), (last.name.as_str(), f32::INFINITY, 1));
    }
}
