//! GPT-2 on the GPU: the same step as `crate::cpu::model::Gpt`, on our kernels.
//!
//! Buffers, all sized from the config (and the batch shape for activations):
//! - `params` (floatX): the weights the forward reads, in `ParamLayout` order;
//! - `master`, `grads`, `adam_m`, `adam_v` (f32, same layout): master weights, accumulated
//!   gradients and AdamW moments; the optimizer writes `master` and rounds it into `params`;
//! - activations in `carve_activations` order, split by type: floatX tensors in one buffer, the
//!   f32 statistics (LayerNorm mean/rstd, attention log-sum-exp, losses) in another; `probs` is
//!   not stored (the fused cross-entropy never needs it);
//! - activation gradients (floatX) only for the tensors the backward writes.
//!
//! The backward differs from the CPU's in what it stores, not in what it computes: residual
//! adds are fused into the LayerNorms, GELU's gradient into the MLP projection's dX product, and
//! the logits gradient is written over the logits. Parameter gradients match tensor by tensor.

use super::ops::{attention_scratch_len, layernorm_scratch_len, AdamWScalars, Ops, TokenBuckets, NORM_BLOCKS};
use super::{DPtr, DeviceBuffer, Gpu, Precision};
use crate::cpu::matmul::WeightLayout::{InOut, OutIn};
use crate::cpu::optimizer::{clip_coefficient, AdamW, AdamWConfig};
use crate::model::config::GptConfig;
use crate::model::layout::{
    carve_activations, carve_params, gets_weight_decay, ActTensors, Carve, ParamLayout, ParamTensors, SpecRecorder,
    TensorSpec,
};
use anyhow::{bail, Context, Result};
use std::fmt::Arguments;
use std::sync::Arc;

/// Each activation tensor starts on a 256-byte boundary (vector loads, and tidy addresses).
const ALIGN: usize = 256;

/// Where an activation tensor lives on the GPU.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Home {
    /// Not stored.
    Absent,
    /// In the floatX buffer at this byte offset.
    Storage(usize),
    /// In the f32 statistics buffer at this byte offset.
    Stats(usize),
}

fn is_statistic(name: &str) -> bool {
    name.ends_with("_mean") || name.ends_with("_rstd") || name.ends_with("att_lse") || name == "losses"
}

/// The activation gradients the backward writes (the others are never materialised).
fn gradient_is_stored(name: &str) -> bool {
    name == "encoded"
        || name == "ln_f"
        || [".ln_1", ".qkv", ".atty", ".residual2", ".ln_2", ".fch", ".residual3"].iter().any(|s| name.ends_with(s))
}

/// Byte offsets of every activation tensor and its gradient, and the three buffer sizes.
struct ActPlan {
    specs: Vec<TensorSpec>,
    homes: Vec<Home>,
    grad_offsets: Vec<Option<usize>>,
    storage_bytes: usize,
    stats_bytes: usize,
    grad_bytes: usize,
}

impl ActPlan {
    fn new(cfg: &GptConfig, b: usize, t: usize, precision: Precision) -> Self {
        let mut rec = SpecRecorder::default();
        carve_activations(cfg, b, t, &mut rec);
        let (mut storage, mut stats, mut grads) = (0usize, 0usize, 0usize);
        let place = |cursor: &mut usize, bytes: usize| {
            let at = *cursor;
            *cursor += bytes.next_multiple_of(ALIGN);
            at
        };
        let mut homes = Vec::new();
        let mut grad_offsets = Vec::new();
        for spec in &rec.specs {
            homes.push(if spec.name == "probs" {
                Home::Absent
            } else if is_statistic(&spec.name) {
                Home::Stats(place(&mut stats, 4 * spec.numel))
            } else {
                Home::Storage(place(&mut storage, precision.size() * spec.numel))
            });
            grad_offsets.push(gradient_is_stored(&spec.name).then(|| place(&mut grads, precision.size() * spec.numel)));
        }
        ActPlan { specs: rec.specs, homes, grad_offsets, storage_bytes: storage, stats_bytes: stats, grad_bytes: grads }
    }
}

/// Hands out precomputed device pointers in carve order.
struct PtrList(std::vec::IntoIter<DPtr>);

impl Carve for PtrList {
    type Out = DPtr;
    fn take(&mut self, _: Arguments, _: &[usize]) -> DPtr {
        self.0.next().expect("one pointer per tensor")
    }
}

/// Hands out consecutive tensors of a contiguous device buffer.
struct PtrCarver {
    base: DPtr,
    elem: usize,
    offset: usize,
}

impl Carve for PtrCarver {
    type Out = DPtr;
    fn take(&mut self, _: Arguments, shape: &[usize]) -> DPtr {
        let p = self.base.add(self.offset, self.elem);
        self.offset += shape.iter().product::<usize>();
        p
    }
}

/// Device memory a model needs, by buffer, in bytes: printed before training and checked
/// against the free memory before anything is allocated.
pub fn memory_plan(cfg: &GptConfig, b: usize, t: usize, precision: Precision) -> Vec<(&'static str, usize)> {
    let n = ParamLayout::new(cfg).total;
    let acts = ActPlan::new(cfg, b, t, precision);
    let bt = b * t;
    let scratch = 8 * (NORM_BLOCKS + 1)
        + 4 * layernorm_scratch_len(bt, cfg.n_embd)
        + 4 * token_buffer_len(bt)
        + 4 * attention_scratch_len(b, t, cfg.n_head);
    vec![
        ("weights", precision.size() * n),
        ("master weights", 4 * n),
        ("gradients", 4 * n),
        ("AdamW moments", 8 * n),
        ("activations", acts.storage_bytes + acts.stats_bytes),
        ("activation gradients", acts.grad_bytes),
        ("scratch", scratch),
    ]
}

/// i32 elements of the token buffer: inputs, targets, and the token buckets (see BatchBuffers).
fn token_buffer_len(bt: usize) -> usize {
    5 * bt + 1
}

/// The largest head dimension (n_embd / n_head) kernels/attention.cu supports: ATT_HD_MAX.
pub const MAX_HEAD_DIM: usize = 128;

/// Buffers that depend on the batch shape.
struct BatchBuffers {
    b: usize,
    t: usize,
    plan: ActPlan,
    storage: DeviceBuffer,
    stats: DeviceBuffer,
    grads: DeviceBuffer,
    /// i32: inputs (B·T), targets (B·T), then the token buckets (tokens B·T, starts B·T+1,
    /// positions B·T).
    tokens: DeviceBuffer,
    layernorm_scratch: DeviceBuffer,
    /// f32 (B·NH·T): attention's per-query D in the bf16 backward.
    attention_scratch: DeviceBuffer,
}

impl BatchBuffers {
    fn act_ptr(&self, i: usize) -> DPtr {
        match self.plan.homes[i] {
            Home::Absent => DPtr::NULL,
            Home::Storage(at) => self.storage.ptr.add(at, 1),
            Home::Stats(at) => self.stats.ptr.add(at, 1),
        }
    }

    fn acts(&self, cfg: &GptConfig) -> ActTensors<DPtr> {
        let ptrs: Vec<DPtr> = (0..self.plan.specs.len()).map(|i| self.act_ptr(i)).collect();
        carve_activations(cfg, self.b, self.t, &mut PtrList(ptrs.into_iter()))
    }

    fn dacts(&self, cfg: &GptConfig) -> ActTensors<DPtr> {
        let ptrs: Vec<DPtr> =
            self.plan.grad_offsets.iter().map(|o| o.map_or(DPtr::NULL, |at| self.grads.ptr.add(at, 1))).collect();
        carve_activations(cfg, self.b, self.t, &mut PtrList(ptrs.into_iter()))
    }

    fn inputs(&self) -> DPtr {
        self.tokens.ptr
    }
    fn targets(&self) -> DPtr {
        self.tokens.ptr.add(self.b * self.t, 4)
    }
}

pub struct GpuGpt {
    pub gpu: Arc<Gpu>,
    pub config: GptConfig,
    pub precision: Precision,
    pub layout: ParamLayout,
    params: DeviceBuffer,
    master: DeviceBuffer,
    grads: DeviceBuffer,
    adam_m: DeviceBuffer,
    adam_v: DeviceBuffer,
    /// AdamW updates taken.
    pub adam_t: u64,
    norm_scratch: DeviceBuffer,
    batch: Option<BatchBuffers>,
    /// The last forward's inputs (the encoder backward groups them by token on the host).
    inputs: Vec<u32>,
    /// Whether the logits buffer holds logits of a forward with targets (the backward turns
    /// them into their gradient in place).
    ready_for_backward: bool,
}

impl GpuGpt {
    /// Allocates the model and uploads `params` (f32, `ParamLayout` order) as master weights.
    /// Why the kernels cannot run a model of `config`, if they cannot: attention keeps a head's
    /// rows in shared-memory tiles of [`MAX_HEAD_DIM`] columns.
    pub fn unsupported(config: &GptConfig) -> Option<String> {
        let hd = config.head_dim();
        (hd > MAX_HEAD_DIM).then(|| {
            format!(
                "the GPU kernels support head dimensions up to {MAX_HEAD_DIM}, and this model's is {hd} \
                 (n_embd {} / n_head {}); more heads would fit",
                config.n_embd, config.n_head
            )
        })
    }

    pub fn new(gpu: Arc<Gpu>, config: GptConfig, precision: Precision, params: &[f32]) -> Result<Self> {
        if let Some(why) = Self::unsupported(&config) {
            bail!("{why}");
        }
        let layout = ParamLayout::new(&config);
        assert_eq!(params.len(), layout.total, "parameter buffer does not match the layout");
        let n = layout.total;
        let alloc = |bytes, what| gpu.alloc(bytes, what);
        let mut model = GpuGpt {
            params: alloc(precision.size() * n, "weights")?,
            master: alloc(4 * n, "master weights")?,
            grads: alloc(4 * n, "gradients")?,
            adam_m: alloc(4 * n, "AdamW moments")?,
            adam_v: alloc(4 * n, "AdamW moments")?,
            norm_scratch: alloc(8 * (NORM_BLOCKS + 1), "scratch")?,
            adam_t: 0,
            batch: None,
            inputs: Vec::new(),
            ready_for_backward: false,
            gpu: gpu.clone(),
            config,
            precision,
            layout,
        };
        model.set_params(params)?;
        Ok(model)
    }

    fn ops(&self) -> Ops<'_> {
        Ops { gpu: &self.gpu, precision: self.precision, force_variant: None }
    }

    /// Replaces the master weights (f32) and their rounded copy.
    pub fn set_params(&mut self, params: &[f32]) -> Result<()> {
        assert_eq!(params.len(), self.layout.total);
        self.gpu.upload(self.master.ptr, params)?;
        self.ops().f32_to_floatx(self.params.ptr, self.master.ptr, params.len())?;
        self.gpu.synchronize()
    }

    /// Replaces the AdamW state.
    pub fn set_optimizer(&mut self, opt: &AdamW<f32>) -> Result<()> {
        assert_eq!(opt.m.len(), self.layout.total);
        self.gpu.upload(self.adam_m.ptr, &opt.m)?;
        self.gpu.upload(self.adam_v.ptr, &opt.v)?;
        self.adam_t = opt.t;
        Ok(())
    }

    fn download_f32(&self, ptr: DPtr, n: usize) -> Result<Vec<f32>> {
        let mut out = vec![0f32; n];
        self.gpu.download(&mut out, ptr)?;
        Ok(out)
    }

    /// `n` floatX values at `ptr`, widened to f32.
    fn download_floatx(&self, ptr: DPtr, n: usize) -> Result<Vec<f32>> {
        if self.precision == Precision::F32 {
            return self.download_f32(ptr, n);
        }
        let tmp = self.gpu.alloc(4 * n, "a download buffer")?;
        self.ops().floatx_to_f32(tmp.ptr, ptr, n)?;
        self.download_f32(tmp.ptr, n)
    }

    /// The f32 master weights.
    pub fn master_params(&self) -> Result<Vec<f32>> {
        self.download_f32(self.master.ptr, self.layout.total)
    }

    /// The weights the forward reads (the master weights rounded to the storage type).
    pub fn params(&self) -> Result<Vec<f32>> {
        self.download_floatx(self.params.ptr, self.layout.total)
    }

    pub fn grads(&self) -> Result<Vec<f32>> {
        self.download_f32(self.grads.ptr, self.layout.total)
    }

    pub fn optimizer(&self) -> Result<AdamW<f32>> {
        Ok(AdamW {
            m: self.download_f32(self.adam_m.ptr, self.layout.total)?,
            v: self.download_f32(self.adam_v.ptr, self.layout.total)?,
            t: self.adam_t,
        })
    }

    /// An activation of the last forward (or, with `gradient`, its gradient from the last
    /// backward) by its layout name, as f32; None if the GPU does not store it.
    pub fn activation(&self, name: &str, gradient: bool) -> Result<Option<Vec<f32>>> {
        let bb = self.batch.as_ref().context("no forward has run yet")?;
        let i = bb.plan.specs.iter().position(|s| s.name == name).with_context(|| format!("no activation {name}"))?;
        let n = bb.plan.specs[i].numel;
        if gradient {
            return match bb.plan.grad_offsets[i] {
                Some(at) => self.download_floatx(bb.grads.ptr.add(at, 1), n).map(Some),
                None => Ok(None),
            };
        }
        match bb.plan.homes[i] {
            Home::Absent => Ok(None),
            Home::Storage(at) => self.download_floatx(bb.storage.ptr.add(at, 1), n).map(Some),
            Home::Stats(at) => self.download_f32(bb.stats.ptr.add(at, 1), n).map(Some),
        }
    }

    /// Fills every activation and activation-gradient buffer with NaN, so that an element a
    /// kernel should write but does not shows up in any comparison.
    pub fn poison_activations(&self) -> Result<()> {
        if let Some(bb) = &self.batch {
            for buf in [&bb.storage, &bb.stats, &bb.grads] {
                self.gpu.fill_bytes(buf.ptr, 0xFF, buf.bytes)?;
            }
        }
        Ok(())
    }

    fn ensure_batch(&mut self, b: usize, t: usize) -> Result<()> {
        if self.batch.as_ref().is_some_and(|bb| (bb.b, bb.t) == (b, t)) {
            return Ok(());
        }
        self.batch = None; // free the old buffers first
        let plan = ActPlan::new(&self.config, b, t, self.precision);
        let gpu = &self.gpu;
        let bt = b * t;
        self.batch = Some(BatchBuffers {
            storage: gpu.alloc(plan.storage_bytes, "activations")?,
            stats: gpu.alloc(plan.stats_bytes, "activations")?,
            grads: gpu.alloc(plan.grad_bytes, "activation gradients")?,
            tokens: gpu.alloc(4 * token_buffer_len(bt), "token buffers")?,
            layernorm_scratch: gpu.alloc(4 * layernorm_scratch_len(bt, self.config.n_embd), "scratch")?,
            attention_scratch: gpu.alloc(4 * attention_scratch_len(b, t, self.config.n_head), "scratch")?,
            plan,
            b,
            t,
        });
        Ok(())
    }

    fn param_ptrs(&self, base: DPtr, elem: usize) -> ParamTensors<DPtr> {
        carve_params(&self.config, &mut PtrCarver { base, elem, offset: 0 })
    }

    /// Runs the model on `inputs` (B·T token ids). With `targets`, returns the mean loss
    /// (per-position losses summed in f64 on the host, as the CPU does).
    pub fn forward(&mut self, inputs: &[u32], targets: Option<&[u32]>, b: usize, t: usize) -> Result<Option<f64>> {
        let cfg = self.config;
        assert!(t >= 1 && t <= cfg.n_positions, "sequence length {t} outside 1..={}", cfg.n_positions);
        assert_eq!(inputs.len(), b * t, "inputs must hold B·T tokens");
        self.ensure_batch(b, t)?;
        self.ready_for_backward = false;
        let (c, nh, v, vp, n, eps) =
            (cfg.n_embd, cfg.n_head, cfg.vocab_size, cfg.padded_vocab_size(), b * t, cfg.layer_norm_epsilon);
        let bb = self.batch.as_ref().expect("allocated above");
        let as_i32 = |x: &[u32]| x.iter().map(|&x| x as i32).collect::<Vec<i32>>();
        self.gpu.upload(bb.inputs(), &as_i32(inputs))?;
        self.inputs.clear();
        self.inputs.extend_from_slice(inputs);
        let p = self.param_ptrs(self.params.ptr, self.precision.size());
        let a = bb.acts(&cfg);
        let ops = self.ops();

        ops.encoder_forward(a.encoded, bb.inputs(), p.wte, p.wpe, b, t, c)?;
        let l0 = &a.layers[0];
        ops.layernorm_forward(
            l0.ln_1,
            l0.ln_1_mean,
            l0.ln_1_rstd,
            a.encoded,
            p.layers[0].ln_1_w,
            p.layers[0].ln_1_b,
            n,
            c,
            eps,
        )?;
        for l in 0..cfg.n_layer {
            let (lp, la) = (&p.layers[l], &a.layers[l]);
            let residual = if l == 0 { a.encoded } else { a.layers[l - 1].residual3 };
            ops.matmul_forward(la.qkv, None, la.ln_1, lp.c_attn_w, Some(lp.c_attn_b), n, c, 3 * c, InOut)?;
            ops.attention_forward(la.atty, la.att_lse, la.qkv, b, t, c, nh)?;
            ops.matmul_forward(la.attn_proj, None, la.atty, lp.attn_proj_w, Some(lp.attn_proj_b), n, c, c, InOut)?;
            ops.residual_layernorm_forward(
                la.residual2,
                la.ln_2,
                la.ln_2_mean,
                la.ln_2_rstd,
                residual,
                la.attn_proj,
                lp.ln_2_w,
                lp.ln_2_b,
                n,
                c,
                eps,
            )?;
            ops.matmul_forward(la.fch_gelu, Some(la.fch), la.ln_2, lp.c_fc_w, Some(lp.c_fc_b), n, c, 4 * c, InOut)?;
            ops.matmul_forward(la.mlp_proj, None, la.fch_gelu, lp.mlp_proj_w, Some(lp.mlp_proj_b), n, 4 * c, c, InOut)?;
            // The block's output residual, fused with the LayerNorm that reads it next.
            let (out, mean, rstd, w, bias) = match a.layers.get(l + 1) {
                Some(next) => {
                    (next.ln_1, next.ln_1_mean, next.ln_1_rstd, p.layers[l + 1].ln_1_w, p.layers[l + 1].ln_1_b)
                }
                None => (a.ln_f, a.ln_f_mean, a.ln_f_rstd, p.ln_f_w, p.ln_f_b),
            };
            ops.residual_layernorm_forward(
                la.residual3,
                out,
                mean,
                rstd,
                la.residual2,
                la.mlp_proj,
                w,
                bias,
                n,
                c,
                eps,
            )?;
        }
        ops.matmul_forward(a.logits, None, a.ln_f, p.wte, None, n, c, vp, OutIn)?;

        let Some(targets) = targets else {
            self.gpu.synchronize()?;
            return Ok(None);
        };
        assert_eq!(targets.len(), n, "targets must hold B·T tokens");
        self.gpu.upload(bb.targets(), &as_i32(targets))?;
        ops.crossentropy(a.losses, None, a.logits, bb.targets(), n, v, vp, 0.0)?;
        let losses = self.download_f32(a.losses, n)?;
        self.ready_for_backward = true;
        Ok(Some(losses.iter().map(|&l| l as f64).sum::<f64>() / n as f64))
    }

    pub fn zero_grad(&mut self) -> Result<()> {
        self.gpu.fill_bytes(self.grads.ptr, 0, self.grads.bytes)
    }

    /// Accumulates into the gradients that of `loss_scale` × (the last forward's mean loss).
    /// Needs a forward with targets since the last backward (it overwrites the logits).
    pub fn backward(&mut self, loss_scale: f64) -> Result<()> {
        if !self.ready_for_backward {
            bail!("backward needs a forward with targets first");
        }
        self.ready_for_backward = false;
        let cfg = self.config;
        let bb = self.batch.as_ref().expect("a forward ran");
        let (b, t) = (bb.b, bb.t);
        let (c, nh, v, vp, n) = (cfg.n_embd, cfg.n_head, cfg.vocab_size, cfg.padded_vocab_size(), b * t);
        let p = self.param_ptrs(self.params.ptr, self.precision.size());
        let g = self.param_ptrs(self.grads.ptr, 4);
        let a = bb.acts(&cfg);
        let d = bb.dacts(&cfg);
        let scratch = bb.layernorm_scratch.ptr;
        let ops = self.ops();

        let dloss = (loss_scale / n as f64) as f32;
        let dlogits = a.logits; // written in place
        ops.crossentropy(a.losses, Some(dlogits), a.logits, bb.targets(), n, v, vp, dloss)?;
        ops.matmul_backward(d.ln_f, g.wte, None, dlogits, a.ln_f, p.wte, None, n, c, vp, OutIn)?;
        let last = cfg.n_layer - 1;
        let (dl, al) = (&d.layers[last], &a.layers[last]);
        ops.layernorm_backward(
            dl.residual3,
            DPtr::NULL,
            (g.ln_f_w, g.ln_f_b),
            d.ln_f,
            al.residual3,
            a.ln_f_mean,
            a.ln_f_rstd,
            p.ln_f_w,
            scratch,
            n,
            c,
        )?;
        for l in (0..cfg.n_layer).rev() {
            block_backward(&ops, l, (&p, &g), (&a, &d), (scratch, bb.attention_scratch.ptr), (b, t, c, nh))?;
        }
        let buckets = TokenBuckets::new(&self.inputs);
        let tokens = bb.targets().add(n, 4);
        let starts = tokens.add(n, 4);
        let positions = starts.add(n + 1, 4);
        assert!(4 * (4 * n + 1) + 4 * n <= bb.tokens.bytes, "token buckets overflow their buffer");
        self.gpu.upload(tokens, &buckets.tokens)?;
        self.gpu.upload(starts, &buckets.starts)?;
        self.gpu.upload(positions, &buckets.positions)?;
        ops.encoder_backward(g.wte, g.wpe, d.encoded, (tokens, starts, positions), buckets.tokens.len(), b, t, c)?;
        self.gpu.synchronize()
    }

    /// The global L2 norm of the gradients (f64).
    pub fn grad_norm(&self) -> Result<f64> {
        Ok(self.ops().grad_norm_squared(self.grads.ptr, self.layout.total, self.norm_scratch.ptr)?.sqrt())
    }

    /// Clips the gradients to `grad_clip` given their norm (torch's rule) and takes one AdamW
    /// step, tensor by tensor, writing the master weights and their rounded copy.
    pub fn update(&mut self, lr: f64, hp: &AdamWConfig, grad_norm: f64, grad_clip: f64) -> Result<()> {
        self.adam_t += 1;
        let s = hp.step(self.adam_t, lr);
        let grad_scale = clip_coefficient(grad_norm, grad_clip);
        let ops = self.ops();
        let x = self.precision.size();
        for spec in &self.layout.specs {
            let scalars = AdamWScalars::new(&s, grad_scale, gets_weight_decay(spec));
            let at = |buf: &DeviceBuffer, elem| buf.ptr.add(spec.offset, elem);
            ops.adamw(
                at(&self.params, x),
                at(&self.master, 4),
                at(&self.grads, 4),
                at(&self.adam_m, 4),
                at(&self.adam_v, 4),
                spec.numel,
                &scalars,
            )?;
        }
        self.gpu.synchronize()
    }
}

/// Block `l`'s backward: from the gradient of its output residual (`d.layers[l].residual3`) to
/// that of its input residual, accumulating its parameter gradients into `g`.
fn block_backward(
    ops: &Ops,
    l: usize,
    (p, g): (&ParamTensors<DPtr>, &ParamTensors<DPtr>),
    (a, d): (&ActTensors<DPtr>, &ActTensors<DPtr>),
    (scratch, att_scratch): (DPtr, DPtr),
    (b, t, c, nh): (usize, usize, usize, usize),
) -> Result<()> {
    let n = b * t;
    let (gl, pl, al, dl) = (&g.layers[l], &p.layers[l], &a.layers[l], &d.layers[l]);
    // residual3 = residual2 + mlp_proj: both get dres3, so dmlp_proj is dres3 itself.
    let dres3 = dl.residual3;
    ops.matmul_backward(
        dl.fch,
        gl.mlp_proj_w,
        Some(gl.mlp_proj_b),
        dres3,
        al.fch_gelu,
        pl.mlp_proj_w,
        Some(al.fch),
        n,
        4 * c,
        c,
        InOut,
    )?;
    ops.matmul_backward(dl.ln_2, gl.c_fc_w, Some(gl.c_fc_b), dl.fch, al.ln_2, pl.c_fc_w, None, n, c, 4 * c, InOut)?;
    ops.layernorm_backward(
        dl.residual2,
        dres3,
        (gl.ln_2_w, gl.ln_2_b),
        dl.ln_2,
        al.residual2,
        al.ln_2_mean,
        al.ln_2_rstd,
        pl.ln_2_w,
        scratch,
        n,
        c,
    )?;
    // residual2 = residual_in + attn_proj: dattn_proj is dres2 itself.
    ops.matmul_backward(
        dl.atty,
        gl.attn_proj_w,
        Some(gl.attn_proj_b),
        dl.residual2,
        al.atty,
        pl.attn_proj_w,
        None,
        n,
        c,
        c,
        InOut,
    )?;
    ops.attention_backward(dl.qkv, dl.atty, al.qkv, al.atty, al.att_lse, att_scratch, b, t, c, nh)?;
    ops.matmul_backward(
        dl.ln_1,
        gl.c_attn_w,
        Some(gl.c_attn_b),
        dl.qkv,
        al.ln_1,
        pl.c_attn_w,
        None,
        n,
        c,
        3 * c,
        InOut,
    )?;
    let (dresidual_in, residual_in) = match l {
        0 => (d.encoded, a.encoded),
        _ => (d.layers[l - 1].residual3, a.layers[l - 1].residual3),
    };
    ops.layernorm_backward(
        dresidual_in,
        dl.residual2,
        (gl.ln_1_w, gl.ln_1_b),
        dl.ln_1,
        residual_in,
        al.ln_1_mean,
        al.ln_1_rstd,
        pl.ln_1_w,
        scratch,
        n,
        c,
    )?;
    Ok(())
}
