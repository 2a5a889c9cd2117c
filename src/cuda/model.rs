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

use super::nccl::{Dtype, Nccl};
use super::ops::{attention_scratch_len, layernorm_scratch_len, AdamWScalars, Ops, TokenBuckets, NORM_BLOCKS};
use super::profile::{KernelTotal, Profiler};
use super::{DPtr, DeviceBuffer, Gpu, PinnedBuffer, Precision};
use crate::cpu::matmul::WeightLayout::{InOut, OutIn};
use crate::cpu::optimizer::AdamWStep;
use crate::cpu::optimizer::{clip_coefficient, AdamW, AdamWConfig};
use crate::model::config::GptConfig;
use crate::model::layout::{
    carve_activations, carve_params, gets_weight_decay, ActTensors, Carve, ParamLayout, ParamTensors, SpecRecorder,
    TensorSpec,
};
use anyhow::{bail, Context, Result};
use cudarc::driver::CudaGraph;
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

/// The buffer an activation's gradient lives in, by kind; None: never materialised. The
/// backward writes each gradient before it reads it, one block at a time, so one buffer per kind
/// serves every layer (as in llm.c): the residual stream's gradient (embeddings, residual2,
/// residual3 of every block) is one buffer that the LayerNorm backwards update in place, and each
/// block-internal gradient takes one layer's worth.
fn gradient_home(name: &str) -> Option<&'static str> {
    const INNER: [&str; 5] = [".ln_1", ".qkv", ".atty", ".ln_2", ".fch"];
    if name == "encoded" || name.ends_with(".residual2") || name.ends_with(".residual3") {
        Some("residual")
    } else if name == "ln_f" {
        Some("ln_f")
    } else {
        INNER.iter().find(|s| name.ends_with(*s)).copied()
    }
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

/// With `--recompute`, the activations the backward recomputes rather than reads: every
/// layer's LayerNorm outputs and GELU output. Each kind shares one buffer across the layers (the
/// forward uses each right after writing it), so their memory is that of one layer.
fn is_recomputed(name: &str) -> Option<&'static str> {
    match name {
        n if n.ends_with(".ln_1") || n.ends_with(".ln_2") => Some("ln"),
        n if n.ends_with(".fch_gelu") => Some("fch_gelu"),
        _ => None,
    }
}

/// Activations no backward reads: the projections' outputs, which only feed the next residual
/// (and --recompute normalises the stored residual itself). One layer's worth serves every layer.
fn is_transient(name: &str) -> Option<&'static str> {
    match name {
        n if n.ends_with(".attn_proj") => Some("attn_proj"),
        n if n.ends_with(".mlp_proj") => Some("mlp_proj"),
        _ => None,
    }
}

impl ActPlan {
    fn new(cfg: &GptConfig, b: usize, t: usize, precision: Precision, recompute: bool) -> Self {
        let mut rec = SpecRecorder::default();
        carve_activations(cfg, b, t, &mut rec);
        let (mut storage, mut stats, mut grads) = (Buffer::default(), Buffer::default(), Buffer::default());
        let mut homes = Vec::new();
        let mut grad_offsets = Vec::new();
        for spec in &rec.specs {
            let bytes = precision.size() * spec.numel;
            homes.push(if spec.name == "probs" {
                Home::Absent
            } else if let Some(kind) = is_recomputed(&spec.name).filter(|_| recompute).or(is_transient(&spec.name)) {
                Home::Storage(storage.shared(kind, bytes))
            } else if is_statistic(&spec.name) {
                Home::Stats(stats.place(4 * spec.numel))
            } else {
                Home::Storage(storage.place(bytes))
            });
            grad_offsets.push(gradient_home(&spec.name).map(|kind| grads.shared(kind, bytes)));
        }
        ActPlan {
            specs: rec.specs,
            homes,
            grad_offsets,
            storage_bytes: storage.end,
            stats_bytes: stats.end,
            grad_bytes: grads.end,
        }
    }
}

/// One buffer being laid out: tensors placed one after another (ALIGN-ed), and those of a kind
/// that shares one place.
#[derive(Default)]
struct Buffer {
    end: usize,
    kinds: Vec<(&'static str, usize, usize)>,
}

impl Buffer {
    fn place(&mut self, bytes: usize) -> usize {
        let at = self.end;
        self.end += bytes.next_multiple_of(ALIGN);
        at
    }

    /// The place of `kind`, made on its first use (every tensor of a kind has the same size).
    fn shared(&mut self, kind: &'static str, bytes: usize) -> usize {
        match self.kinds.iter().find(|(k, ..)| *k == kind) {
            Some(&(_, at, size)) => {
                assert_eq!(size, bytes, "every {kind} tensor has one size");
                at
            }
            None => {
                let at = self.place(bytes);
                self.kinds.push((kind, at, bytes));
                at
            }
        }
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
/// against the free memory before anything is allocated. With `ranks` > 1 (data parallel,
/// ZeRO-1), what one rank needs: its share of the master weights and moments, and of the summed
/// gradients beside the whole gradients its backward writes.
pub fn memory_plan(
    cfg: &GptConfig,
    (b, t): (usize, usize),
    precision: Precision,
    recompute: bool,
    ranks: usize,
) -> Vec<(&'static str, usize)> {
    let n = ParamLayout::new(cfg).total;
    let (share, padded) = match ranks {
        0 | 1 => (n, n),
        r => (shard_len(n, r), shard_len(n, r) * r),
    };
    let acts = ActPlan::new(cfg, b, t, precision, recompute);
    let bt = b * t;
    let scratch = 8 * (NORM_BLOCKS + 1)
        + 4 * layernorm_scratch_len(bt, cfg.n_embd)
        + 4 * token_buffer_len(bt, 1)
        + 4 * attention_scratch_len(b, t, cfg.n_head);
    vec![
        ("weights", precision.size() * padded),
        ("master weights", 4 * share),
        ("gradients", 4 * padded + if ranks > 1 { 4 * share } else { 0 }),
        ("AdamW moments", 8 * share),
        ("activations", acts.storage_bytes + acts.stats_bytes),
        ("activation gradients", acts.grad_bytes),
        ("scratch", scratch),
    ]
}

/// i32 words of one micro-batch's slot in the token buffer: inputs (B·T), targets (B·T), then
/// the token buckets the encoder backward reads (tokens B·T, starts B·T+1, positions B·T) and
/// their count.
pub(crate) fn slot_len(bt: usize) -> usize {
    5 * bt + 2
}

/// Words before the slots: one step's AdamW scalars (the kernels' AdamWParams, 7 f32 and a
/// spare), then the step's StepState as it starts (zeros and this rank's votes): the one upload
/// of the step initialises both.
pub(crate) const ADAMW_WORDS: usize = 8;
pub(crate) const HEADER_WORDS: usize = ADAMW_WORDS + STEP_STATE_BYTES / 4;

/// i32 words of the token buffer for `slots` micro-batches.
pub(crate) fn token_buffer_len(bt: usize, slots: usize) -> usize {
    HEADER_WORDS + slots * slot_len(bt)
}

/// Where one micro-batch's tokens are on the device.
struct Slot {
    inputs: DPtr,
    targets: DPtr,
    /// Token buckets: tokens, starts, positions, and the i32 count.
    buckets: (DPtr, DPtr, DPtr, DPtr),
}

/// Writes one micro-batch into its slot's words: inputs, targets and the token buckets of the
/// inputs (computed here, on the host) with their count.
pub(crate) fn fill_slot(words: &mut [i32], inputs: &[u32], targets: &[u32]) {
    let bt = inputs.len();
    let buckets = TokenBuckets::new(inputs);
    let (ins, rest) = words.split_at_mut(bt);
    let (tgs, rest) = rest.split_at_mut(bt);
    let (toks, rest) = rest.split_at_mut(bt);
    let (starts, rest) = rest.split_at_mut(bt + 1);
    let (positions, count) = rest.split_at_mut(bt);
    ins.iter_mut().zip(inputs).for_each(|(w, &x)| *w = x as i32);
    tgs.iter_mut().zip(targets).for_each(|(w, &y)| *w = y as i32);
    toks[..buckets.tokens.len()].copy_from_slice(&buckets.tokens);
    starts[..buckets.starts.len()].copy_from_slice(&buckets.starts);
    positions.copy_from_slice(&buckets.positions);
    count[0] = buckets.tokens.len() as i32;
}

/// The step's state the kernels leave on the device (kernels/optimizer.cu's StepState), read
/// back once per step.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct StepState {
    pub loss: f64,
    pub norm_sq: f64,
    /// Data parallel: ranks asking to stop, and to checkpoint, after this step (summed).
    pub stop_votes: f64,
    pub checkpoint_votes: f64,
    pub norm: f64,
    pub grad_scale: f32,
    pub finite: i32,
}
// SAFETY: repr(C), every field plain old data, and no padding (5 × 8 + 4 + 4 = 48 bytes).
unsafe impl bytemuck::Zeroable for StepState {}
unsafe impl bytemuck::Pod for StepState {}
pub(crate) const STEP_STATE_BYTES: usize = std::mem::size_of::<StepState>();

/// What one optimizer step did: its mean loss and gradient norm, and whether the update was
/// applied (both finite); and, across the ranks of a data-parallel job, how many asked to stop
/// and to checkpoint after it (a single process: its own requests).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct StepOutcome {
    pub loss: f64,
    pub grad_norm: f64,
    pub applied: bool,
    pub stop_votes: usize,
    pub checkpoint_votes: usize,
}

/// What this rank asks for after the step: stop (a signal arrived), checkpoint (its timer).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Votes {
    pub stop: bool,
    pub checkpoint: bool,
}

/// Elements per AdamW chunk: one block's share of one tensor.
const ADAMW_CHUNK: usize = 4096;

/// The AdamW chunk table (kernels/optimizer.cu's AdamWChunk: offset i64, len i32, decay i32),
/// as little-endian 16-byte records: every tensor cut into pieces of at most ADAMW_CHUNK.
pub(crate) fn adamw_chunks(layout: &ParamLayout) -> Vec<[i32; 4]> {
    shard_chunks(layout, 0..layout.total)
}

/// The chunk table of the elements `shard` of the layout (a data-parallel rank's share), offsets
/// relative to the shard's start: each tensor's part in the shard, cut as adamw_chunks does.
pub(crate) fn shard_chunks(layout: &ParamLayout, shard: std::ops::Range<usize>) -> Vec<[i32; 4]> {
    let mut chunks = Vec::new();
    for spec in &layout.specs {
        let decay = gets_weight_decay(spec) as i32;
        let (from, to) = (spec.offset.max(shard.start), (spec.offset + spec.numel).min(shard.end));
        for start in (from..to).step_by(ADAMW_CHUNK) {
            let offset = (start - shard.start) as i64;
            let len = ADAMW_CHUNK.min(to - start) as i32;
            chunks.push([offset as i32, (offset >> 32) as i32, len, decay]);
        }
    }
    chunks
}

/// A step's AdamW scalars as the kernels' AdamWParams words (formed in f64, rounded once).
pub(crate) fn adamw_header(s: &AdamWStep) -> [f32; ADAMW_WORDS] {
    let r = AdamWScalars::new(s, 1.0, true);
    [r.step_size, r.bc2_sqrt, r.one_minus_beta1, r.beta2, r.one_minus_beta2, r.eps, r.decay, 0.0]
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
    /// i32: AdamW's scalars (HEADER_WORDS), then `slots` micro-batch slots (see slot_len).
    tokens: DeviceBuffer,
    slots: usize,
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

    fn slot(&self, k: usize) -> Slot {
        assert!(k < self.slots, "micro-batch {k} has no slot");
        let bt = self.b * self.t;
        let inputs = self.tokens.ptr.add(HEADER_WORDS + k * slot_len(bt), 4);
        let targets = inputs.add(bt, 4);
        let tokens = targets.add(bt, 4);
        let starts = tokens.add(bt, 4);
        let positions = starts.add(bt + 1, 4);
        Slot { inputs, targets, buckets: (tokens, starts, positions, positions.add(bt, 4)) }
    }

    /// AdamW's scalars for the step (AdamWParams).
    fn header(&self) -> DPtr {
        self.tokens.ptr
    }

    /// The step's StepState, right after the scalars.
    fn state(&self) -> DPtr {
        self.tokens.ptr.add(ADAMW_WORDS, 4)
    }
}

/// Data parallelism with a sharded optimizer (ZeRO-1): the communicator, and the elements
/// [start, start + len) of the parameters this rank updates. It keeps the master weights, AdamW
/// moments and summed gradients of that share only; the bf16 weights are whole on every rank.
pub struct Sharding {
    pub nccl: Nccl,
    pub start: usize,
    pub len: usize,
}

/// Every rank's share of `total` parameters: equal, a multiple of 64 elements (aligned for the
/// all-gather), the last one padded.
pub fn shard_len(total: usize, ranks: usize) -> usize {
    total.div_ceil(ranks.max(1)).next_multiple_of(64)
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
    /// AdamW's chunk table (adamw_chunks) and its length.
    chunks: DeviceBuffer,
    n_chunks: usize,
    /// The page-locked copy the step's StepState is read back into.
    readback: PinnedBuffer,
    /// Data parallel: the communicator and this rank's share; None for a single process.
    dist: Option<Sharding>,
    /// Data parallel: this rank's share of the summed gradients (reduce-scattered).
    shard_grads: Option<DeviceBuffer>,
    /// Page-locked staging for a step's token buffer: filled on the host, copied in one go.
    staging: Option<PinnedBuffer>,
    /// Capture each step's launches once into a CUDA graph and replay it (--cuda-graph).
    pub use_graph: bool,
    /// Recompute LayerNorm and GELU outputs in the backward instead of storing every layer's
    /// (--recompute); set with `set_recompute`.
    recompute: bool,
    /// The captured step, for (B, T, micro-batches, clip).
    graph: Option<((usize, usize, usize, u64), CudaGraph)>,
    /// Training steps timed by --profile (set_profile), the first of which is forgotten.
    profiled_steps: Option<usize>,
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
        Self::new_with(gpu, config, precision, params, None)
    }

    /// The model as one rank of a data-parallel job over `nccl`: it keeps its share (shard_len)
    /// of the optimizer's state, and every rank must make the same calls in the same order.
    pub fn new_sharded(
        gpu: Arc<Gpu>,
        config: GptConfig,
        precision: Precision,
        params: &[f32],
        nccl: Nccl,
    ) -> Result<Self> {
        Self::new_with(gpu, config, precision, params, Some(nccl))
    }

    fn new_with(
        gpu: Arc<Gpu>,
        config: GptConfig,
        precision: Precision,
        params: &[f32],
        nccl: Option<Nccl>,
    ) -> Result<Self> {
        if let Some(why) = Self::unsupported(&config) {
            bail!("{why}");
        }
        let layout = ParamLayout::new(&config);
        assert_eq!(params.len(), layout.total, "parameter buffer does not match the layout");
        let n = layout.total;
        let dist = nccl.filter(|c| c.size > 1).map(|nccl| {
            let len = shard_len(n, nccl.size);
            Sharding { start: nccl.rank * len, len, nccl }
        });
        // Whole buffers are padded to ranks × share, so that every share is the same size.
        let (shard, padded) = match &dist {
            Some(d) => (d.start..d.start + d.len, d.len * d.nccl.size),
            None => (0..n, n),
        };
        let alloc = |bytes, what| gpu.alloc(bytes, what);
        let chunks = shard_chunks(&layout, shard.clone());
        let mut model = GpuGpt {
            params: alloc(precision.size() * padded, "weights")?,
            master: alloc(4 * shard.len(), "master weights")?,
            grads: alloc(4 * padded, "gradients")?,
            adam_m: alloc(4 * shard.len(), "AdamW moments")?,
            adam_v: alloc(4 * shard.len(), "AdamW moments")?,
            shard_grads: match dist {
                Some(_) => Some(alloc(4 * shard.len(), "gradients")?),
                None => None,
            },
            norm_scratch: alloc(8 * (NORM_BLOCKS + 1), "scratch")?,
            adam_t: 0,
            batch: None,
            inputs: Vec::new(),
            chunks: alloc(16 * chunks.len(), "the optimizer's chunk table")?,
            n_chunks: chunks.len(),
            readback: gpu.alloc_pinned(STEP_STATE_BYTES, "the step's results")?,
            dist,
            staging: None,
            use_graph: false,
            profiled_steps: None,
            recompute: false,
            graph: None,
            ready_for_backward: false,
            gpu: gpu.clone(),
            config,
            precision,
            layout,
        };
        model.gpu.upload(model.chunks.ptr, &chunks)?;
        model.set_params(params)?;
        Ok(model)
    }

    /// This rank's share of the parameters (all of them for a single process).
    fn shard(&self) -> std::ops::Range<usize> {
        match &self.dist {
            Some(d) => d.start..d.start + d.len,
            None => 0..self.layout.total,
        }
    }

    /// Elements of the whole (padded) parameter-shaped buffers.
    fn padded(&self) -> usize {
        self.dist.as_ref().map_or(self.layout.total, |d| d.len * d.nccl.size)
    }

    /// The ranks of the job (1 for a single process).
    pub fn ranks(&self) -> usize {
        self.dist.as_ref().map_or(1, |d| d.nccl.size)
    }

    /// Waits for the stream: with data parallelism, with NCCL's deadline and error checks.
    fn wait(&self) -> Result<()> {
        match &self.dist {
            Some(d) => d.nccl.wait(&self.gpu),
            None => self.gpu.synchronize(),
        }
    }

    /// Values each rank has (a validation loss's sum and count, at most NORM_BLOCKS), summed
    /// over the ranks; the values themselves for a single process.
    pub fn sum_over_ranks(&self, values: &[f64]) -> Result<Vec<f64>> {
        let Some(d) = &self.dist else { return Ok(values.to_vec()) };
        assert!(values.len() <= NORM_BLOCKS);
        let at = self.norm_scratch.ptr;
        self.gpu.upload(at, values)?;
        d.nccl.all_reduce_sum(&self.gpu, at, at, values.len(), Dtype::F64)?;
        d.nccl.wait(&self.gpu)?;
        let mut out = vec![0f64; values.len()];
        self.gpu.download(&mut out, at)?;
        Ok(out)
    }

    /// `buf` (this rank's share, f32) gathered from every rank into the whole parameter order.
    fn gathered(&self, buf: DPtr) -> Result<Vec<f32>> {
        let n = self.layout.total;
        let Some(d) = &self.dist else { return self.download_f32(buf, n) };
        // The gradient buffer (whole and padded) is free between steps.
        d.nccl.all_gather(&self.gpu, buf, self.grads.ptr, d.len, Dtype::F32)?;
        d.nccl.wait(&self.gpu)?;
        self.download_f32(self.grads.ptr, n)
    }

    /// This rank's share of a whole parameter-shaped vector, zero-padded to the share's size.
    fn share_of(&self, whole: &[f32]) -> Vec<f32> {
        let shard = self.shard();
        let mut out = vec![0f32; shard.len()];
        let end = shard.end.min(whole.len());
        if shard.start < end {
            out[..end - shard.start].copy_from_slice(&whole[shard.start..end]);
        }
        out
    }

    /// --profile: times every launch of the training steps from now on (with CUDA events, so
    /// the steps are issued launch by launch, not replayed from a graph).
    pub fn set_profile(&mut self) {
        *self.gpu.profiler.lock().unwrap_or_else(|e| e.into_inner()) = Some(Profiler::default());
        self.profiled_steps = Some(0);
    }

    /// After a profiled step has finished: its kernels' times into the totals. The first step
    /// (kernel attributes set, caches cold) is timed and then forgotten.
    fn end_profiled_step(&mut self) -> Result<()> {
        let Some(steps) = self.profiled_steps.as_mut() else { return Ok(()) };
        let mut profiler = self.gpu.profiler.lock().unwrap_or_else(|e| e.into_inner());
        let p = profiler.as_mut().expect("set_profile made one");
        p.end_step()?;
        if *steps == 0 {
            p.reset();
        }
        *steps += 1;
        Ok(())
    }

    /// The per-kernel totals of the profiled steps and how many steps they cover (None without
    /// --profile, or before a second step).
    pub fn profile(&self) -> Option<(Vec<KernelTotal>, usize)> {
        let steps = self.profiled_steps.filter(|&s| s > 1)? - 1;
        let profiler = self.gpu.profiler.lock().unwrap_or_else(|e| e.into_inner());
        Some((profiler.as_ref()?.totals.clone(), steps))
    }

    /// The GPU's name, as the driver reports it.
    pub fn gpu_name(&self) -> String {
        self.gpu.name.clone()
    }

    /// --recompute on or off; the activation buffers are laid out again at the next forward.
    pub fn set_recompute(&mut self, recompute: bool) {
        if recompute != self.recompute {
            self.recompute = recompute;
            self.graph = None;
            self.batch = None;
        }
    }

    fn ops(&self) -> Ops<'_> {
        Ops { gpu: &self.gpu, precision: self.precision, force_variant: None }
    }

    /// Replaces the master weights (f32; this rank's share of them) and their rounded copy
    /// (whole, on every rank). Every rank passes the same `params`.
    pub fn set_params(&mut self, params: &[f32]) -> Result<()> {
        assert_eq!(params.len(), self.layout.total);
        // Through the (whole, padded) gradient buffer, which is free between steps.
        let padded = self.padded();
        self.gpu.fill_bytes(self.grads.ptr, 0, 4 * padded)?;
        self.gpu.upload(self.grads.ptr, params)?;
        self.ops().f32_to_floatx(self.params.ptr, self.grads.ptr, padded)?;
        self.gpu.upload(self.master.ptr, &self.share_of(params))?;
        self.gpu.synchronize()
    }

    /// Replaces the AdamW state (whole; this rank keeps its share).
    pub fn set_optimizer(&mut self, opt: &AdamW<f32>) -> Result<()> {
        assert_eq!(opt.m.len(), self.layout.total);
        self.gpu.upload(self.adam_m.ptr, &self.share_of(&opt.m))?;
        self.gpu.upload(self.adam_v.ptr, &self.share_of(&opt.v))?;
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

    /// The f32 master weights, whole (with data parallelism, gathered from every rank: every
    /// rank must call this at the same point).
    pub fn master_params(&self) -> Result<Vec<f32>> {
        self.gathered(self.master.ptr)
    }

    /// The weights the forward reads (the master weights rounded to the storage type).
    pub fn params(&self) -> Result<Vec<f32>> {
        self.download_floatx(self.params.ptr, self.layout.total)
    }

    pub fn grads(&self) -> Result<Vec<f32>> {
        self.download_f32(self.grads.ptr, self.layout.total)
    }

    /// The AdamW state, whole (gathered, as master_params).
    pub fn optimizer(&self) -> Result<AdamW<f32>> {
        Ok(AdamW { m: self.gathered(self.adam_m.ptr)?, v: self.gathered(self.adam_v.ptr)?, t: self.adam_t })
    }

    /// An activation of the last forward by its layout name, as f32; None if the GPU does not
    /// store it (or, with --recompute, holds it for one layer at a time). Activation gradients
    /// are not offered: their buffers serve every layer in turn (gradient_home).
    pub fn activation(&self, name: &str) -> Result<Option<Vec<f32>>> {
        let bb = self.batch.as_ref().context("no forward has run yet")?;
        let i = bb.plan.specs.iter().position(|s| s.name == name).with_context(|| format!("no activation {name}"))?;
        let n = bb.plan.specs[i].numel;
        if self.recompute && is_recomputed(name).is_some() {
            return Ok(None);
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

    fn ensure_batch(&mut self, b: usize, t: usize, slots: usize) -> Result<()> {
        if self.batch.as_ref().is_some_and(|bb| (bb.b, bb.t) == (b, t) && bb.slots >= slots) {
            return Ok(());
        }
        self.graph = None; // it names the buffers freed next
        self.batch = None; // free the old buffers first
        let plan = ActPlan::new(&self.config, b, t, self.precision, self.recompute);
        let gpu = &self.gpu;
        let bt = b * t;
        self.batch = Some(BatchBuffers {
            storage: gpu.alloc(plan.storage_bytes, "activations")?,
            stats: gpu.alloc(plan.stats_bytes, "activations")?,
            grads: gpu.alloc(plan.grad_bytes, "activation gradients")?,
            tokens: gpu.alloc(4 * token_buffer_len(bt, slots), "token buffers")?,
            slots,
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
        self.ensure_batch(b, t, 1)?;
        self.ready_for_backward = false;
        let (v, vp, n) = (cfg.vocab_size, cfg.padded_vocab_size(), b * t);
        let bb = self.batch.as_ref().expect("allocated above");
        let slot = bb.slot(0);
        let as_i32 = |x: &[u32]| x.iter().map(|&x| x as i32).collect::<Vec<i32>>();
        self.gpu.upload(slot.inputs, &as_i32(inputs))?;
        self.inputs.clear();
        self.inputs.extend_from_slice(inputs);
        self.forward_launches(bb, &slot)?;
        let Some(targets) = targets else {
            self.gpu.synchronize()?;
            return Ok(None);
        };
        assert_eq!(targets.len(), n, "targets must hold B·T tokens");
        self.gpu.upload(slot.targets, &as_i32(targets))?;
        let a = bb.acts(&cfg);
        self.ops().crossentropy(a.losses, None, a.logits, slot.targets, n, v, vp, 0.0)?;
        let losses = self.download_f32(a.losses, n)?;
        self.ready_for_backward = true;
        Ok(Some(losses.iter().map(|&l| l as f64).sum::<f64>() / n as f64))
    }

    /// The forward's launches, from the inputs in `slot` to the logits; nothing waits.
    fn forward_launches(&self, bb: &BatchBuffers, slot: &Slot) -> Result<()> {
        let cfg = self.config;
        let (b, t) = (bb.b, bb.t);
        let (c, nh, vp, n, eps) = (cfg.n_embd, cfg.n_head, cfg.padded_vocab_size(), b * t, cfg.layer_norm_epsilon);
        let p = self.param_ptrs(self.params.ptr, self.precision.size());
        let a = bb.acts(&cfg);
        let ops = self.ops();

        ops.encoder_forward(a.encoded, slot.inputs, p.wte, p.wpe, b, t, c)?;
        layer_input_norm(&ops, &p, &a, 0, n, c, eps)?;
        for l in 0..cfg.n_layer {
            let (lp, la) = (&p.layers[l], &a.layers[l]);
            ops.matmul_forward(la.qkv, None, la.ln_1, lp.c_attn_w, Some(lp.c_attn_b), n, c, 3 * c, InOut)?;
            ops.attention_forward(la.atty, la.att_lse, la.qkv, b, t, c, nh)?;
            ops.matmul_forward(la.attn_proj, None, la.atty, lp.attn_proj_w, Some(lp.attn_proj_b), n, c, c, InOut)?;
            mlp_input_norm(&ops, &p, &a, l, n, c, eps)?;
            ops.matmul_forward(la.fch_gelu, Some(la.fch), la.ln_2, lp.c_fc_w, Some(lp.c_fc_b), n, c, 4 * c, InOut)?;
            ops.matmul_forward(la.mlp_proj, None, la.fch_gelu, lp.mlp_proj_w, Some(lp.mlp_proj_b), n, 4 * c, c, InOut)?;
            // The block's output residual, fused with the LayerNorm that reads it next.
            layer_input_norm(&ops, &p, &a, l + 1, n, c, eps)?;
        }
        ops.matmul_forward(a.logits, None, a.ln_f, p.wte, None, n, c, vp, OutIn)?;

        Ok(())
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
        let bb = self.batch.as_ref().expect("a forward ran");
        let slot = bb.slot(0);
        // The targets are in slot 0 already; the token buckets of the inputs go beside them.
        let bt = bb.b * bb.t;
        let mut words = vec![0i32; slot_len(bt)];
        fill_slot(&mut words, &self.inputs, &vec![0; bt]);
        self.gpu.upload(slot.buckets.0, &words[2 * bt..])?;
        let cfg = self.config;
        let a = bb.acts(&cfg);
        let (n, v, vp) = (bt, cfg.vocab_size, cfg.padded_vocab_size());
        // The logits gradient, written over the logits; the losses are written again.
        let dloss = (loss_scale / n as f64) as f32;
        self.ops().crossentropy(a.losses, Some(a.logits), a.logits, slot.targets, n, v, vp, dloss)?;
        self.backward_launches(bb, &slot)?;
        self.gpu.synchronize()
    }

    /// The backward's launches after the cross-entropy has written the logits gradient over the
    /// logits: accumulates every parameter gradient; nothing waits.
    fn backward_launches(&self, bb: &BatchBuffers, slot: &Slot) -> Result<()> {
        let cfg = self.config;
        let (b, t) = (bb.b, bb.t);
        let (c, nh, vp, n) = (cfg.n_embd, cfg.n_head, cfg.padded_vocab_size(), b * t);
        let p = self.param_ptrs(self.params.ptr, self.precision.size());
        let g = self.param_ptrs(self.grads.ptr, 4);
        let a = bb.acts(&cfg);
        let d = bb.dacts(&cfg);
        let scratch = bb.layernorm_scratch.ptr;
        let ops = self.ops();
        let dlogits = a.logits; // written in place
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
            let recompute_eps = self.recompute.then_some(cfg.layer_norm_epsilon);
            if let Some(eps) = recompute_eps {
                // The GELU output and ln_2, which the block's backward reads first: the forward's
                // kernels' arithmetic on the stored pre-activation and residual, so the same bits.
                let (lp, la) = (&p.layers[l], &a.layers[l]);
                ops.gelu_forward(la.fch_gelu, la.fch, n * 4 * c)?;
                ops.layernorm_forward(
                    la.ln_2,
                    la.ln_2_mean,
                    la.ln_2_rstd,
                    la.residual2,
                    lp.ln_2_w,
                    lp.ln_2_b,
                    n,
                    c,
                    eps,
                )?;
            }
            let scratches = (scratch, bb.attention_scratch.ptr);
            block_backward(&ops, l, (&p, &g), (&a, &d), scratches, (b, t, c, nh), recompute_eps)?;
        }
        ops.encoder_backward(g.wte, g.wpe, d.encoded, slot.buckets, b, t, c)
    }

    /// The global L2 norm of the gradients (f64). A single process's (the per-call API that
    /// `finch check` and the tests drive; training uses train_step).
    pub fn grad_norm(&self) -> Result<f64> {
        assert!(self.dist.is_none(), "grad_norm: data-parallel training runs train_step");
        Ok(self.ops().grad_norm_squared(self.grads.ptr, self.layout.total, self.norm_scratch.ptr)?.sqrt())
    }

    /// Clips the gradients to `grad_clip` given their norm (torch's rule) and takes one AdamW
    /// step on every tensor (one launch), writing the master weights and their rounded copy.
    pub fn update(&mut self, lr: f64, hp: &AdamWConfig, grad_norm: f64, grad_clip: f64) -> Result<()> {
        self.adam_t += 1;
        let header = adamw_header(&hp.step(self.adam_t, lr));
        let state = StepState {
            norm: grad_norm,
            grad_scale: clip_coefficient(grad_norm, grad_clip) as f32,
            finite: 1,
            ..StepState::default()
        };
        // The header and the state live in the token buffer, which exists once a forward has run.
        assert!(self.dist.is_none(), "update: data-parallel training runs train_step");
        let bb = self.batch.as_ref().context("an update needs a forward and backward first")?;
        self.gpu.upload(bb.header(), &header)?;
        self.gpu.upload(bb.state(), bytemuck::bytes_of(&state))?;
        self.adamw_launch(bb)?;
        self.gpu.synchronize()
    }

    /// AdamW on this rank's share: the share of the bf16 weights, its master weights, summed
    /// gradients and moments.
    fn adamw_launch(&self, bb: &BatchBuffers) -> Result<()> {
        let shard = self.shard();
        let grads = self.shard_grads.as_ref().map_or(self.grads.ptr, |g| g.ptr);
        let params = self.params.ptr.add(shard.start, self.precision.size());
        let buffers = (params, self.master.ptr, grads, self.adam_m.ptr, self.adam_v.ptr);
        self.ops().adamw(buffers, (self.chunks.ptr, self.n_chunks), shard.len(), bb.header(), bb.state())
    }

    /// One optimizer step over `micro_batches` (inputs, targets; B·T each): the gradient of the
    /// mean loss, its norm, clipping and AdamW, all on the device, with one host synchronisation
    /// at the end, after which the loss, the norm and whether the update was applied (both
    /// finite; otherwise the weights and moments are untouched) are read back. The tokens and
    /// the step's scalars go up in one copy from page-locked memory. With `use_graph`, the
    /// launches are captured once into a CUDA graph and replayed every step.
    pub fn train_step(
        &mut self,
        micro_batches: &[(&[u32], &[u32])],
        (b, t): (usize, usize),
        (lr, hp): (f64, &AdamWConfig),
        grad_clip: f64,
        votes: Votes,
    ) -> Result<StepOutcome> {
        let accum = micro_batches.len();
        assert!(accum >= 1, "a step needs a micro-batch");
        self.ensure_batch(b, t, accum)?;
        let bt = b * t;
        let words = token_buffer_len(bt, accum);
        if self.staging.as_ref().is_none_or(|s| s.bytes < 4 * words) {
            self.graph = None; // it copies from the old staging buffer
            self.staging = Some(self.gpu.alloc_pinned(4 * words, "the step's tokens")?);
        }
        self.adam_t += 1;
        let header = adamw_header(&hp.step(self.adam_t, lr));
        let start = StepState {
            stop_votes: votes.stop as u8 as f64,
            checkpoint_votes: votes.checkpoint as u8 as f64,
            ..StepState::default()
        };
        {
            let staging: &mut [i32] = self.staging.as_mut().expect("allocated above").as_mut_slice();
            staging[..ADAMW_WORDS].copy_from_slice(bytemuck::cast_slice(&header));
            staging[ADAMW_WORDS..HEADER_WORDS].copy_from_slice(bytemuck::cast_slice(bytemuck::bytes_of(&start)));
            for (k, (x, y)) in micro_batches.iter().enumerate() {
                assert!(x.len() == bt && y.len() == bt, "micro-batch {k} is not B·T tokens");
                let at = HEADER_WORDS + k * slot_len(bt);
                fill_slot(&mut staging[at..at + slot_len(bt)], x, y);
            }
        }
        let key = (b, t, accum, grad_clip.to_bits());
        if self.profiled_steps.is_some() {
            self.gpu.profiler.lock().unwrap_or_else(|e| e.into_inner()).as_mut().expect("profiling").recording = true;
        }
        match self.use_graph && self.profiled_steps.is_none() {
            true => {
                if self.graph.as_ref().is_none_or(|(k, _)| *k != key) {
                    self.graph = None;
                    self.graph = Some((key, self.capture_step(accum, grad_clip)?));
                }
                let (_, graph) = self.graph.as_ref().expect("captured above");
                graph.launch().context("cannot launch the captured training step")?;
            }
            false => self.issue_step(accum, grad_clip)?,
        }
        self.wait()?;
        self.end_profiled_step()?;
        let state: StepState = bytemuck::pod_read_unaligned(&self.readback.as_slice::<u8>()[..STEP_STATE_BYTES]);
        let applied = state.finite != 0;
        if !applied {
            self.adam_t -= 1; // the device skipped the update
        }
        Ok(StepOutcome {
            loss: state.loss,
            grad_norm: state.norm,
            applied,
            stop_votes: state.stop_votes as usize,
            checkpoint_votes: state.checkpoint_votes as usize,
        })
    }

    /// Records one step's work (issue_step) on the stream into a CUDA graph.
    fn capture_step(&self, accum: usize, grad_clip: f64) -> Result<CudaGraph> {
        use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
        let stream = &self.gpu.stream;
        stream.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_GLOBAL).context("cannot capture the step")?;
        let issued = self.issue_step(accum, grad_clip);
        // The capture must end whatever happened while it ran.
        let graph = stream.end_capture(CUgraphInstantiate_flags(0));
        issued?;
        graph.context("cannot capture the step")?.context("the captured step is empty")
    }

    /// One step's work on the stream, in order: the tokens, scalars and initial state up, zeroed
    /// gradients, per micro-batch the forward, the fused cross-entropy (loss and logits
    /// gradient), the loss added to the step's and the backward; then (data parallel: the
    /// gradients reduce-scattered, the norm of this rank's share, the loss, squared norm and votes
    /// summed across ranks) the norm, the clipping factor and finiteness, AdamW (on this rank's
    /// share, then the weights all-gathered), and the state down. No host wait.
    fn issue_step(&self, accum: usize, grad_clip: f64) -> Result<()> {
        let bb = self.batch.as_ref().expect("train_step allocated it");
        let cfg = self.config;
        let n = bb.b * bb.t;
        let (v, vp) = (cfg.vocab_size, cfg.padded_vocab_size());
        let staging = self.staging.as_ref().expect("train_step allocated it");
        let ops = self.ops();
        let st = bb.state();
        let ranks = self.ranks();
        self.gpu.upload_async(bb.tokens.ptr, staging, 4 * token_buffer_len(n, accum))?;
        self.gpu.fill_bytes(self.grads.ptr, 0, self.grads.bytes)?;
        let a = bb.acts(&cfg);
        // The gradient of the mean loss over every rank's micro-batches: summing the ranks'
        // gradients (the reduce-scatter) then gives the mean.
        let dloss = (1.0 / (accum * ranks) as f64 / n as f64) as f32;
        for k in 0..accum {
            let slot = bb.slot(k);
            self.forward_launches(bb, &slot)?;
            ops.crossentropy(a.losses, Some(a.logits), a.logits, slot.targets, n, v, vp, dloss)?;
            ops.loss_accumulate(st, a.losses, n, accum * ranks)?;
            self.backward_launches(bb, &slot)?;
        }
        let shard = self.shard();
        let grads = match (&self.dist, &self.shard_grads) {
            (Some(d), Some(g)) => {
                d.nccl.reduce_scatter_sum(&self.gpu, self.grads.ptr, g.ptr, d.len, Dtype::F32)?;
                g.ptr
            }
            _ => self.grads.ptr,
        };
        ops.grad_norm_squared_into(st.add(1, 8), grads, shard.len(), self.norm_scratch.ptr)?;
        if let Some(d) = &self.dist {
            d.nccl.all_reduce_sum(&self.gpu, st, st, 4, Dtype::F64)?;
        }
        ops.step_finish(st, grad_clip)?;
        self.adamw_launch(bb)?;
        if let Some(d) = &self.dist {
            let dtype = if self.precision == Precision::Bf16 { Dtype::Bf16 } else { Dtype::F32 };
            let mine = self.params.ptr.add(shard.start, self.precision.size());
            d.nccl.all_gather(&self.gpu, mine, self.params.ptr, d.len, dtype)?;
        }
        self.gpu.download_async(&self.readback, st, STEP_STATE_BYTES)
    }
}

/// The LayerNorm at the input of block `l` (ln_f for l = n_layer): of the embeddings for block
/// 0, else fused with the residual that block l−1 outputs.
fn layer_input_norm(
    ops: &Ops,
    p: &ParamTensors<DPtr>,
    a: &ActTensors<DPtr>,
    l: usize,
    n: usize,
    c: usize,
    eps: f64,
) -> Result<()> {
    let (out, mean, rstd, w, bias) = match a.layers.get(l) {
        Some(al) => (al.ln_1, al.ln_1_mean, al.ln_1_rstd, p.layers[l].ln_1_w, p.layers[l].ln_1_b),
        None => (a.ln_f, a.ln_f_mean, a.ln_f_rstd, p.ln_f_w, p.ln_f_b),
    };
    match l.checked_sub(1) {
        None => ops.layernorm_forward(out, mean, rstd, a.encoded, w, bias, n, c, eps),
        Some(prev) => {
            let ap = &a.layers[prev];
            ops.residual_layernorm_forward(ap.residual3, out, mean, rstd, ap.residual2, ap.mlp_proj, w, bias, n, c, eps)
        }
    }
}

/// Block `l`'s second LayerNorm (ln_2), fused with its residual after attention.
fn mlp_input_norm(
    ops: &Ops,
    p: &ParamTensors<DPtr>,
    a: &ActTensors<DPtr>,
    l: usize,
    n: usize,
    c: usize,
    eps: f64,
) -> Result<()> {
    let (lp, la) = (&p.layers[l], &a.layers[l]);
    let residual = if l == 0 { a.encoded } else { a.layers[l - 1].residual3 };
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
    )
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
    recompute_eps: Option<f64>,
) -> Result<()> {
    let n = b * t;
    let (gl, pl, al, dl) = (&g.layers[l], &p.layers[l], &a.layers[l], &d.layers[l]);
    // residual3 = residual2 + mlp_proj: both get dres3, so dmlp_proj is dres3 itself.
    let dres3 = dl.residual3;
    ops.matmul_backward(
        dl.fch,
        gl.mlp_proj_w,
        Some((gl.mlp_proj_b, scratch)),
        dres3,
        al.fch_gelu,
        pl.mlp_proj_w,
        Some(al.fch),
        n,
        4 * c,
        c,
        InOut,
    )?;
    ops.matmul_backward(
        dl.ln_2,
        gl.c_fc_w,
        Some((gl.c_fc_b, scratch)),
        dl.fch,
        al.ln_2,
        pl.c_fc_w,
        None,
        n,
        c,
        4 * c,
        InOut,
    )?;
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
        Some((gl.attn_proj_b, scratch)),
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
    let (dresidual_in, residual_in) = match l {
        0 => (d.encoded, a.encoded),
        _ => (d.layers[l - 1].residual3, a.layers[l - 1].residual3),
    };
    if let Some(eps) = recompute_eps {
        // --recompute: ln_1, over ln_2 (read above), whose buffer it shares.
        ops.layernorm_forward(al.ln_1, al.ln_1_mean, al.ln_1_rstd, residual_in, pl.ln_1_w, pl.ln_1_b, n, c, eps)?;
    }
    ops.matmul_backward(
        dl.ln_1,
        gl.c_attn_w,
        Some((gl.c_attn_b, scratch)),
        dl.qkv,
        al.ln_1,
        pl.c_attn_w,
        None,
        n,
        c,
        3 * c,
        InOut,
    )?;
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
