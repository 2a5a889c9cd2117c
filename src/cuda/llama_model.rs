//! `GpuLlama`: the Llama family on the GPU, op for op as `cpu/llama.rs`, over the same
//! parameter layout (Hugging Face names, (out, in) weights): the embedding lookup, then per block
//! RMSNorm (fused with the residual add that precedes it), the q/k/v projections, RoPE fused into
//! the grouped-query packing that the attention kernels read, attention, the output projection,
//! RMSNorm, the SwiGLU MLP; the final RMSNorm and the classifier (lm_head, or the embedding when
//! tied). bf16 (or f32) weights and activations, f32 master weights, gradients and AdamW moments.
//!
//! Training runs `train_step`: tokens and the step's scalars up in one copy, every micro-batch's
//! forward and backward, the loss, norm, clipping and AdamW on the device, and one wait for the
//! 48-byte state (as GPT-2's step, but not yet captured into a CUDA graph); no data parallelism or
//! --recompute yet. `forward`, `backward`, `grad_norm` and `update` are the per-call API that
//! `finch check` and sampling use, each waiting.

use super::llama_ops::rmsnorm_scratch_len;
use super::model::{
    adamw_chunks, adamw_header, fill_slot, slot_len, token_buffer_len, StepOutcome, StepState, Votes, ADAMW_WORDS,
    HEADER_WORDS, MAX_HEAD_DIM, STEP_STATE_BYTES,
};
use super::ops::{attention_scratch_len, bias_scratch_len, Epilogue, Ops, NORM_BLOCKS};
use super::{DPtr, DeviceBuffer, Gpu, PinnedBuffer, Precision};
use crate::cpu::matmul::WeightLayout::{self, OutIn};
use crate::cpu::optimizer::{clip_coefficient, AdamW, AdamWConfig};
use crate::cpu::rope::rope_tables;
use crate::model::layout::{Carve, ParamLayout};
use crate::model::llama::{carve_llama_params, LlamaConfig, LlamaParams};
use anyhow::{bail, Context, Result};
use std::fmt::Arguments;
use std::sync::Arc;

/// Carves pointers out of a device buffer of `elem`-byte elements, in layout order.
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

/// One block's saved activations (floatX, except the f32 statistics).
struct LayerActs {
    input: DPtr, // (N, C): the block's input residual
    norm1: DPtr, // (N, C)
    rstd1: DPtr, // (N) f32
    q: DPtr,     // (N, C)
    k: DPtr,     // (N, KVD)
    v: DPtr,     // (N, KVD)
    qkv: DPtr,   // (N, 3C): rotated q, k; heads repeated per group
    atty: DPtr,  // (N, C)
    lse: DPtr,   // (B, NH, T) f32
    o: DPtr,     // (N, C)
    res2: DPtr,  // (N, C): input + o
    norm2: DPtr, // (N, C)
    rstd2: DPtr, // (N) f32
    gate: DPtr,  // (N, I)
    up: DPtr,    // (N, I)
    act: DPtr,   // (N, I)
    down: DPtr,  // (N, C)
}

/// The buffers of one batch shape: activations, one layer's worth of activation gradients,
/// scratch, and the tokens.
struct Batch {
    b: usize,
    t: usize,
    _buffers: Vec<DeviceBuffer>,
    layers: Vec<LayerActs>,
    out: DPtr,    // (N, C): the last block's output residual
    normf: DPtr,  // (N, C)
    rstdf: DPtr,  // (N) f32
    logits: DPtr, // (N, Vp), its gradient written over it
    losses: DPtr, // (N) f32
    // Gradients, reused by every block.
    d_a: DPtr,    // (N, C): of a residual
    d_b: DPtr,    // (N, C): of the other
    d_norm: DPtr, // (N, C): of a norm's output
    d_atty: DPtr, // (N, C)
    d_qkv: DPtr,  // (N, 3C)
    d_q: DPtr,    // (N, C)
    d_k: DPtr,    // (N, KVD)
    d_v: DPtr,    // (N, KVD)
    d_act: DPtr,  // (N, I)
    d_gate: DPtr, // (N, I)
    d_up: DPtr,   // (N, I)
    norm_scratch: DPtr,
    bias_scratch: DPtr,
    att_scratch: DPtr,
}

/// Where one micro-batch's tokens are in the token buffer (see `cuda/model.rs`'s `fill_slot`).
struct Slot {
    inputs: DPtr,
    targets: DPtr,
    buckets: (DPtr, DPtr, DPtr, DPtr),
}

pub struct GpuLlama {
    gpu: Arc<Gpu>,
    pub config: LlamaConfig,
    pub precision: Precision,
    pub layout: ParamLayout,
    params: DeviceBuffer,
    master: DeviceBuffer,
    grads: DeviceBuffer,
    adam_m: DeviceBuffer,
    adam_v: DeviceBuffer,
    adam_t: u64,
    chunks: DeviceBuffer,
    n_chunks: usize,
    /// i32 words: AdamW's scalars and the StepState (HEADER_WORDS), then one slot of tokens per
    /// micro-batch; grown to the largest step seen.
    tokens: Option<DeviceBuffer>,
    /// Page-locked copies of a step's upload and of its state read back: copies from and to them
    /// do not wait.
    staging: Option<PinnedBuffer>,
    readback: PinnedBuffer,
    grad_norm_scratch: DeviceBuffer,
    /// Zeros standing in for GPT-2's position table in the shared embedding kernels, and a sink
    /// for its gradient.
    zero_wpe: DeviceBuffer,
    dwpe_sink: DeviceBuffer,
    /// cos and sin (maxT, hd/2) f32, built on the host in f64 as the CPU does.
    rope: (DeviceBuffer, DeviceBuffer),
    batch: Option<Batch>,
    inputs: Vec<u32>,
    ready_for_backward: bool,
}

impl GpuLlama {
    /// Why this GPU backend cannot run the model, if it cannot.
    pub fn unsupported(config: &LlamaConfig) -> Option<String> {
        let hd = config.head_dim();
        (hd > MAX_HEAD_DIM).then(|| format!("head dimension {hd} is above the attention kernels' {MAX_HEAD_DIM}"))
    }

    pub fn new(gpu: Arc<Gpu>, config: LlamaConfig, precision: Precision, params: &[f32]) -> Result<Self> {
        if let Some(why) = Self::unsupported(&config) {
            bail!("{why}");
        }
        let layout = ParamLayout::llama(&config);
        let n = layout.total;
        assert_eq!(params.len(), n, "parameter buffer does not match the layout");
        let f32s = |what: &str| gpu.alloc(4 * n, what);
        let (master, grads) = (f32s("master weights")?, f32s("gradients")?);
        let (adam_m, adam_v) = (f32s("AdamW moments")?, f32s("AdamW moments")?);
        let chunk_table = adamw_chunks(&layout);
        let chunks = gpu.alloc(16 * chunk_table.len(), "the AdamW chunk table")?;
        gpu.upload(chunks.ptr, &chunk_table)?;
        let (max_t, c, hd) = (config.max_position_embeddings, config.hidden_size, config.head_dim());
        let (cos, sin) = rope_tables::<f32>(max_t, hd, config.rope_theta);
        let rope = (gpu.alloc(4 * cos.len(), "RoPE tables")?, gpu.alloc(4 * sin.len(), "RoPE tables")?);
        gpu.upload(rope.0.ptr, &cos)?;
        gpu.upload(rope.1.ptr, &sin)?;
        let mut model = GpuLlama {
            params: gpu.alloc(precision.size() * n, "weights")?,
            tokens: None,
            staging: None,
            readback: gpu.alloc_pinned(STEP_STATE_BYTES, "the step's state")?,
            grad_norm_scratch: gpu.alloc(8 * (NORM_BLOCKS + 1), "the gradient norm")?,
            zero_wpe: gpu.alloc(precision.size() * max_t * c, "zeros")?,
            dwpe_sink: gpu.alloc(4 * max_t * c, "scratch")?,
            gpu,
            config,
            precision,
            layout,
            master,
            grads,
            adam_m,
            adam_v,
            adam_t: 0,
            n_chunks: chunk_table.len(),
            chunks,
            rope,
            batch: None,
            inputs: Vec::new(),
            ready_for_backward: false,
        };
        model.set_params(params)?;
        Ok(model)
    }

    fn ops(&self) -> Ops<'_> {
        Ops { gpu: &self.gpu, precision: self.precision, force_variant: None }
    }

    /// Uploads f32 weights: the master copy, and its rounding to the storage type.
    pub fn set_params(&mut self, params: &[f32]) -> Result<()> {
        self.gpu.upload(self.master.ptr, params)?;
        self.ops().f32_to_floatx(self.params.ptr, self.master.ptr, params.len())?;
        self.gpu.synchronize()
    }

    /// Continues from a saved optimizer state (a resumed run).
    pub fn set_optimizer(&mut self, opt: &AdamW<f32>) -> Result<()> {
        self.gpu.upload(self.adam_m.ptr, &opt.m)?;
        self.gpu.upload(self.adam_v.ptr, &opt.v)?;
        self.adam_t = opt.t;
        self.gpu.synchronize()
    }

    fn download_f32(&self, ptr: DPtr, n: usize) -> Result<Vec<f32>> {
        let mut out = vec![0f32; n];
        self.gpu.download(&mut out, ptr)?;
        self.gpu.synchronize()?;
        Ok(out)
    }

    pub fn master_params(&self) -> Result<Vec<f32>> {
        self.download_f32(self.master.ptr, self.layout.total)
    }

    pub fn grads(&self) -> Result<Vec<f32>> {
        self.download_f32(self.grads.ptr, self.layout.total)
    }

    pub fn optimizer(&self) -> Result<AdamW<f32>> {
        let n = self.layout.total;
        Ok(AdamW {
            m: self.download_f32(self.adam_m.ptr, n)?,
            v: self.download_f32(self.adam_v.ptr, n)?,
            t: self.adam_t,
        })
    }

    /// The logits (N, Vp) of the last forward, as f32.
    pub fn logits(&self) -> Result<Vec<f32>> {
        let bb = self.batch.as_ref().context("no forward has run")?;
        let n = bb.b * bb.t * self.config.padded_vocab_size();
        let tmp = self.gpu.alloc(4 * n, "the logits")?;
        self.ops().floatx_to_f32(tmp.ptr, bb.logits, n)?;
        self.download_f32(tmp.ptr, n)
    }

    fn param_ptrs(&self, base: DPtr, elem: usize) -> LlamaParams<DPtr> {
        carve_llama_params(&self.config, &mut PtrCarver { base, elem, offset: 0 })
    }

    /// Allocates the buffers of batch shape (B, T), unless they are there.
    fn ensure_batch(&mut self, b: usize, t: usize) -> Result<()> {
        if self.batch.as_ref().is_some_and(|bb| bb.b == b && bb.t == t) {
            return Ok(());
        }
        self.batch = None;
        let cfg = self.config;
        let (c, kvd, inner, vp, nh, n) = (
            cfg.hidden_size,
            cfg.kv_dim(),
            cfg.intermediate_size,
            cfg.padded_vocab_size(),
            cfg.num_attention_heads,
            b * t,
        );
        let gpu = self.gpu.clone();
        let x = self.precision.size();
        let mut buffers = Vec::new();
        let mut alloc = |bytes: usize| -> Result<DPtr> {
            let buf = gpu.alloc(bytes, "activations")?;
            let p = buf.ptr;
            buffers.push(buf);
            Ok(p)
        };
        let layers = (0..cfg.num_hidden_layers)
            .map(|_| {
                Ok(LayerActs {
                    input: alloc(x * n * c)?,
                    norm1: alloc(x * n * c)?,
                    rstd1: alloc(4 * n)?,
                    q: alloc(x * n * c)?,
                    k: alloc(x * n * kvd)?,
                    v: alloc(x * n * kvd)?,
                    qkv: alloc(x * n * 3 * c)?,
                    atty: alloc(x * n * c)?,
                    lse: alloc(4 * b * nh * t)?,
                    o: alloc(x * n * c)?,
                    res2: alloc(x * n * c)?,
                    norm2: alloc(x * n * c)?,
                    rstd2: alloc(4 * n)?,
                    gate: alloc(x * n * inner)?,
                    up: alloc(x * n * inner)?,
                    act: alloc(x * n * inner)?,
                    down: alloc(x * n * c)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let batch = Batch {
            b,
            t,
            layers,
            out: alloc(x * n * c)?,
            normf: alloc(x * n * c)?,
            rstdf: alloc(4 * n)?,
            logits: alloc(x * n * vp)?,
            losses: alloc(4 * n)?,
            d_a: alloc(x * n * c)?,
            d_b: alloc(x * n * c)?,
            d_norm: alloc(x * n * c)?,
            d_atty: alloc(x * n * c)?,
            d_qkv: alloc(x * n * 3 * c)?,
            d_q: alloc(x * n * c)?,
            d_k: alloc(x * n * kvd)?,
            d_v: alloc(x * n * kvd)?,
            d_act: alloc(x * n * inner)?,
            d_gate: alloc(x * n * inner)?,
            d_up: alloc(x * n * inner)?,
            norm_scratch: alloc(4 * rmsnorm_scratch_len(n, c))?,
            bias_scratch: alloc(4 * bias_scratch_len(n, c.max(kvd)))?,
            att_scratch: alloc(4 * attention_scratch_len(b, t, nh))?,
            _buffers: Vec::new(),
        };
        self.batch = Some(Batch { _buffers: buffers, ..batch });
        Ok(())
    }

    /// Makes the token buffer hold `slots` micro-batches of B·T = `n` tokens.
    fn ensure_tokens(&mut self, n: usize, slots: usize) -> Result<()> {
        let bytes = 4 * token_buffer_len(n, slots);
        if self.tokens.as_ref().is_none_or(|buf| buf.bytes < bytes) {
            self.tokens = None;
            self.tokens = Some(self.gpu.alloc(bytes, "the step's tokens")?);
        }
        Ok(())
    }

    /// Micro-batch k's tokens (B·T = `n`).
    fn slot(&self, k: usize, n: usize) -> Slot {
        let base = self.tokens.as_ref().expect("ensure_tokens ran").ptr.add(HEADER_WORDS + k * slot_len(n), 4);
        let at = |words: usize| base.add(words, 4);
        Slot { inputs: at(0), targets: at(n), buckets: (at(2 * n), at(3 * n), at(4 * n + 1), at(5 * n + 1)) }
    }

    /// The AdamW scalars and, after them, the step's StepState.
    fn header(&self) -> (DPtr, DPtr) {
        let base = self.tokens.as_ref().expect("ensure_tokens ran").ptr;
        (base, base.add(ADAMW_WORDS, 4))
    }

    /// Runs the model on `inputs` (B·T token ids). With `targets`, returns the mean loss
    /// (per-position losses summed in f64 on the host, as the CPU does).
    pub fn forward(&mut self, inputs: &[u32], targets: Option<&[u32]>, b: usize, t: usize) -> Result<Option<f64>> {
        let cfg = self.config;
        assert!(t >= 1 && t <= cfg.max_position_embeddings, "sequence length {t} outside the context");
        assert_eq!(inputs.len(), b * t, "inputs must hold B·T tokens");
        self.ensure_batch(b, t)?;
        let n = b * t;
        self.ensure_tokens(n, 1)?;
        self.ready_for_backward = false;
        let (bb, slot) = (self.batch.as_ref().expect("allocated above"), self.slot(0, n));
        let as_i32 = |x: &[u32]| x.iter().map(|&x| x as i32).collect::<Vec<i32>>();
        self.gpu.upload(slot.inputs, &as_i32(inputs))?;
        self.inputs = inputs.to_vec();
        self.forward_launches(bb, &slot)?;
        let Some(targets) = targets else {
            self.gpu.synchronize()?;
            return Ok(None);
        };
        assert_eq!(targets.len(), n, "targets must hold B·T tokens");
        self.gpu.upload(slot.targets, &as_i32(targets))?;
        let (v, vp) = (cfg.vocab_size, cfg.padded_vocab_size());
        self.ops().crossentropy(bb.losses, None, bb.logits, slot.targets, n, v, vp, 0.0)?;
        let losses = self.download_f32(bb.losses, n)?;
        self.ready_for_backward = true;
        Ok(Some(losses.iter().map(|&l| l as f64).sum::<f64>() / n as f64))
    }

    fn forward_launches(&self, bb: &Batch, slot: &Slot) -> Result<()> {
        let cfg = self.config;
        let (b, t, n) = (bb.b, bb.t, bb.b * bb.t);
        let (c, kvd, inner, vp, eps) =
            (cfg.hidden_size, cfg.kv_dim(), cfg.intermediate_size, cfg.padded_vocab_size(), cfg.rms_norm_eps);
        let heads = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim());
        let p = self.param_ptrs(self.params.ptr, self.precision.size());
        let ops = self.ops();
        let rope = Some(((self.rope.0.ptr, self.rope.1.ptr), t));
        let first = &bb.layers[0];
        ops.encoder_forward(first.input, slot.inputs, p.embed, self.zero_wpe.ptr, b, t, c)?;
        ops.rmsnorm_forward(first.norm1, first.rstd1, first.input, p.layers[0].input_norm, n, c, eps)?;
        for (l, (lp, la)) in p.layers.iter().zip(&bb.layers).enumerate() {
            if l > 0 {
                let prev = &bb.layers[l - 1];
                ops.residual_rmsnorm_forward(
                    (la.input, la.norm1, la.rstd1),
                    prev.res2,
                    prev.down,
                    lp.input_norm,
                    n,
                    c,
                    eps,
                )?;
            }
            ops.matmul_forward(la.q, None, la.norm1, lp.q_w, lp.q_b, n, c, c, OutIn)?;
            ops.matmul_forward(la.k, None, la.norm1, lp.k_w, lp.k_b, n, c, kvd, OutIn)?;
            ops.matmul_forward(la.v, None, la.norm1, lp.v_w, lp.v_b, n, c, kvd, OutIn)?;
            ops.pack_qkv(la.qkv, (la.q, la.k, la.v), rope, n, heads)?;
            ops.attention_forward(la.atty, la.lse, la.qkv, b, t, c, heads.0)?;
            ops.matmul_forward(la.o, None, la.atty, lp.o_w, lp.o_b, n, c, c, OutIn)?;
            ops.residual_rmsnorm_forward((la.res2, la.norm2, la.rstd2), la.input, la.o, lp.post_norm, n, c, eps)?;
            ops.matmul_forward(la.gate, None, la.norm2, lp.gate_w, None, n, c, inner, OutIn)?;
            ops.matmul_forward(la.up, None, la.norm2, lp.up_w, None, n, c, inner, OutIn)?;
            ops.swiglu_forward(la.act, la.gate, la.up, n * inner)?;
            ops.matmul_forward(la.down, None, la.act, lp.down_w, None, n, inner, c, OutIn)?;
        }
        let last = bb.layers.last().expect("at least one layer");
        ops.residual_rmsnorm_forward((bb.out, bb.normf, bb.rstdf), last.res2, last.down, p.norm, n, c, eps)?;
        ops.matmul_forward(bb.logits, None, bb.normf, p.lm_head.unwrap_or(p.embed), None, n, c, vp, OutIn)
    }

    pub fn zero_grad(&mut self) -> Result<()> {
        self.gpu.fill_bytes(self.grads.ptr, 0, self.grads.bytes)
    }

    /// Accumulates into the gradients that of `loss_scale` × (the last forward's mean loss).
    pub fn backward(&mut self, loss_scale: f64) -> Result<()> {
        if !self.ready_for_backward {
            bail!("backward needs a forward with targets first");
        }
        self.ready_for_backward = false;
        let bb = self.batch.as_ref().expect("a forward ran");
        let n = bb.b * bb.t;
        let slot = self.slot(0, n);
        // The targets are in slot 0 already; the token buckets of the inputs go beside them.
        let mut words = vec![0i32; slot_len(n)];
        fill_slot(&mut words, &self.inputs, &vec![0; n]);
        self.gpu.upload(slot.buckets.0, &words[2 * n..])?;
        let cfg = self.config;
        let dloss = (loss_scale / n as f64) as f32;
        let (v, vp) = (cfg.vocab_size, cfg.padded_vocab_size());
        self.ops().crossentropy(bb.losses, Some(bb.logits), bb.logits, slot.targets, n, v, vp, dloss)?;
        self.backward_launches(bb, &slot)?;
        self.gpu.synchronize()
    }

    fn backward_launches(&self, bb: &Batch, slot: &Slot) -> Result<()> {
        let cfg = self.config;
        let (b, t, n) = (bb.b, bb.t, bb.b * bb.t);
        let (c, kvd, inner, vp) = (cfg.hidden_size, cfg.kv_dim(), cfg.intermediate_size, cfg.padded_vocab_size());
        let heads = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim());
        let p = self.param_ptrs(self.params.ptr, self.precision.size());
        let g = self.param_ptrs(self.grads.ptr, 4);
        let ops = self.ops();
        let rope = Some(((self.rope.0.ptr, self.rope.1.ptr), t));
        let bias = |grad: Option<DPtr>| grad.map(|g| (g, bb.bias_scratch));
        let head = (p.lm_head.unwrap_or(p.embed), g.lm_head.unwrap_or(g.embed));
        ops.matmul_backward(bb.d_norm, head.1, None, bb.logits, bb.normf, head.0, None, n, c, vp, OutIn)?;
        // d_a: the gradient of the residual stream after the block being differentiated.
        ops.rmsnorm_backward(
            (bb.d_a, DPtr::NULL, g.norm),
            bb.d_norm,
            (bb.out, p.norm, bb.rstdf),
            bb.norm_scratch,
            n,
            c,
        )?;
        for ((lp, lg), la) in p.layers.iter().zip(&g.layers).zip(&bb.layers).rev() {
            // The MLP: out = res2 + down(swiglu(gate(norm2), up(norm2))).
            ops.matmul_backward(bb.d_act, lg.down_w, None, bb.d_a, la.act, lp.down_w, None, n, inner, c, OutIn)?;
            ops.swiglu_backward((bb.d_gate, bb.d_up), bb.d_act, la.gate, la.up, n * inner, false)?;
            ops.matmul_backward(bb.d_norm, lg.gate_w, None, bb.d_gate, la.norm2, lp.gate_w, None, n, c, inner, OutIn)?;
            matmul_backward_acc(&ops, bb.d_norm, lg.up_w, None, bb.d_up, la.norm2, lp.up_w, (n, c, inner))?;
            // d_b: of res2, the residual and the post-attention norm's input gradients summed.
            let norm2 = (la.res2, lp.post_norm, la.rstd2);
            ops.rmsnorm_backward((bb.d_b, bb.d_a, lg.post_norm), bb.d_norm, norm2, bb.norm_scratch, n, c)?;
            // Attention: res2 = input + o(attention(rope_pack(q, k, v)(norm1))).
            ops.matmul_backward(bb.d_atty, lg.o_w, bias(lg.o_b), bb.d_b, la.atty, lp.o_w, None, n, c, c, OutIn)?;
            let (qkv, scratch) = (la.qkv, bb.att_scratch);
            ops.attention_backward(bb.d_qkv, bb.d_atty, qkv, la.atty, la.lse, scratch, b, t, c, heads.0)?;
            ops.unpack_dqkv((bb.d_q, bb.d_k, bb.d_v), bb.d_qkv, rope, n, heads, false)?;
            ops.matmul_backward(bb.d_norm, lg.q_w, bias(lg.q_b), bb.d_q, la.norm1, lp.q_w, None, n, c, c, OutIn)?;
            matmul_backward_acc(&ops, bb.d_norm, lg.k_w, bias(lg.k_b), bb.d_k, la.norm1, lp.k_w, (n, c, kvd))?;
            matmul_backward_acc(&ops, bb.d_norm, lg.v_w, bias(lg.v_b), bb.d_v, la.norm1, lp.v_w, (n, c, kvd))?;
            // d_a: of the block's input, the residual and the input norm's gradients summed.
            let norm1 = (la.input, lp.input_norm, la.rstd1);
            ops.rmsnorm_backward((bb.d_a, bb.d_b, lg.input_norm), bb.d_norm, norm1, bb.norm_scratch, n, c)?;
        }
        ops.encoder_backward(g.embed, self.dwpe_sink.ptr, bb.d_a, slot.buckets, b, t, c)
    }

    /// The global L2 norm of the gradients (f64).
    pub fn grad_norm(&self) -> Result<f64> {
        Ok(self.ops().grad_norm_squared(self.grads.ptr, self.layout.total, self.grad_norm_scratch.ptr)?.sqrt())
    }

    /// Clips the gradients to `grad_clip` given their norm (torch's rule) and takes one AdamW
    /// step on every tensor, writing the master weights and their rounded copy.
    pub fn update(&mut self, lr: f64, hp: &AdamWConfig, grad_norm: f64, grad_clip: f64) -> Result<()> {
        self.adam_t += 1;
        let header = adamw_header(&hp.step(self.adam_t, lr));
        let state = StepState {
            norm: grad_norm,
            grad_scale: clip_coefficient(grad_norm, grad_clip) as f32,
            finite: 1,
            ..StepState::default()
        };
        self.tokens.as_ref().context("an update needs a forward and backward first")?;
        let (header_ptr, state_ptr) = self.header();
        self.gpu.upload(header_ptr, &header)?;
        self.gpu.upload(state_ptr, bytemuck::bytes_of(&state))?;
        self.adamw_launch()?;
        self.gpu.synchronize()
    }

    fn adamw_launch(&self) -> Result<()> {
        let (header, state) = self.header();
        let buffers = (self.params.ptr, self.master.ptr, self.grads.ptr, self.adam_m.ptr, self.adam_v.ptr);
        self.ops().adamw(buffers, (self.chunks.ptr, self.n_chunks), self.layout.total, header, state)
    }

    /// One optimizer step over `micro_batches` (inputs, targets; B·T each): the gradient of the
    /// mean loss, its norm, clipping and AdamW, all on the device after one upload (the AdamW
    /// scalars, the step's initial state and every micro-batch's tokens), with one host wait at
    /// the end for the step's state: the loss, the norm and whether the update was applied (both
    /// finite; otherwise the weights and moments are untouched).
    pub fn train_step(
        &mut self,
        micro_batches: &[(&[u32], &[u32])],
        (b, t): (usize, usize),
        (lr, hp): (f64, &AdamWConfig),
        grad_clip: f64,
        votes: Votes,
    ) -> Result<StepOutcome> {
        let (accum, n) = (micro_batches.len(), b * t);
        assert!(accum >= 1, "a step needs a micro-batch");
        assert!(t >= 1 && t <= self.config.max_position_embeddings, "sequence length {t} outside the context");
        self.ensure_batch(b, t)?;
        self.ensure_tokens(n, accum)?;
        self.ready_for_backward = false;
        self.adam_t += 1;
        let header = adamw_header(&hp.step(self.adam_t, lr));
        let start = StepState {
            stop_votes: votes.stop as u8 as f64,
            checkpoint_votes: votes.checkpoint as u8 as f64,
            ..StepState::default()
        };
        let len = token_buffer_len(n, accum);
        if self.staging.as_ref().is_none_or(|s| s.bytes < 4 * len) {
            self.staging = Some(self.gpu.alloc_pinned(4 * len, "the step's tokens")?);
        }
        let words = &mut self.staging.as_mut().expect("allocated above").as_mut_slice::<i32>()[..len];
        words[..ADAMW_WORDS].copy_from_slice(bytemuck::cast_slice(&header));
        words[ADAMW_WORDS..HEADER_WORDS].copy_from_slice(bytemuck::cast_slice(bytemuck::bytes_of(&start)));
        for (k, (x, y)) in micro_batches.iter().enumerate() {
            assert!(x.len() == n && y.len() == n, "micro-batch {k} is not B·T tokens");
            let at = HEADER_WORDS + k * slot_len(n);
            fill_slot(&mut words[at..at + slot_len(n)], x, y);
        }
        let tokens = self.tokens.as_ref().expect("allocated above").ptr;
        self.gpu.upload_async(tokens, self.staging.as_ref().expect("allocated above"), 4 * len)?;
        self.issue_step(accum, grad_clip)?;
        self.gpu.download_async(&self.readback, self.header().1, STEP_STATE_BYTES)?;
        self.gpu.synchronize()?;
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

    /// The step's launches: zeroed gradients; per micro-batch the forward, the fused
    /// cross-entropy (loss and logits gradient), the loss added to the step's, the backward; the
    /// squared norm, the norm, clipping factor and finiteness (step_finish), AdamW. No host wait.
    fn issue_step(&self, accum: usize, grad_clip: f64) -> Result<()> {
        let bb = self.batch.as_ref().expect("train_step allocated it");
        let cfg = self.config;
        let n = bb.b * bb.t;
        let (v, vp) = (cfg.vocab_size, cfg.padded_vocab_size());
        let (ops, state) = (self.ops(), self.header().1);
        self.gpu.fill_bytes(self.grads.ptr, 0, self.grads.bytes)?;
        let dloss = (1.0 / accum as f64 / n as f64) as f32;
        for k in 0..accum {
            let slot = self.slot(k, n);
            self.forward_launches(bb, &slot)?;
            ops.crossentropy(bb.losses, Some(bb.logits), bb.logits, slot.targets, n, v, vp, dloss)?;
            ops.loss_accumulate(state, bb.losses, n, accum)?;
            self.backward_launches(bb, &slot)?;
        }
        ops.grad_norm_squared_into(state.add(1, 8), self.grads.ptr, self.layout.total, self.grad_norm_scratch.ptr)?;
        ops.step_finish(state, grad_clip)?;
        self.adamw_launch()
    }
}

/// As `Ops::matmul_backward`, but the input gradient is added to `dinp` (a layer input that
/// feeds several projections: q, k and v; gate and up).
#[allow(clippy::too_many_arguments)]
fn matmul_backward_acc(
    ops: &Ops,
    dinp: DPtr,
    dweight: DPtr,
    dbias: Option<(DPtr, DPtr)>,
    dout: DPtr,
    inp: DPtr,
    weight: DPtr,
    (n, c, oc): (usize, usize, usize),
) -> Result<()> {
    let layout = WeightLayout::OutIn;
    let (wt_rs, wt_cs) = layout.out_in_strides(c, oc);
    let accumulate = Epilogue { accumulate: true, ..Epilogue::default() };
    ops.matmul(dinp, false, (dout, oc, 1), (weight, wt_rs, wt_cs), accumulate, n, c, oc)?;
    // dW (OC × C) += doutᵀ · inp
    ops.matmul(dweight, true, (dout, 1, oc), (inp, c, 1), accumulate, oc, c, n)?;
    if let Some((dbias, scratch)) = dbias {
        ops.bias_grad(dbias, scratch, dout, n, oc)?;
    }
    Ok(())
}

/// The device memory a `GpuLlama` of `cfg` allocates at batch shape (B, T), by part: what
/// `new` and `ensure_batch` allocate.
pub fn llama_memory_plan(
    cfg: &LlamaConfig,
    (b, t): (usize, usize),
    precision: Precision,
) -> Vec<(&'static str, usize)> {
    let (x, n, p) = (precision.size(), b * t, ParamLayout::llama(cfg).total);
    let (c, kvd, inner, vp, nh) =
        (cfg.hidden_size, cfg.kv_dim(), cfg.intermediate_size, cfg.padded_vocab_size(), cfg.num_attention_heads);
    let per_layer = x * n * (11 * c + 2 * kvd + 3 * inner) + 4 * (2 * n + b * nh * t);
    let activations = cfg.num_hidden_layers * per_layer + x * n * (2 * c + vp) + 8 * n;
    let gradients = x * n * (8 * c + 2 * kvd + 3 * inner);
    let scratch = 4 * (rmsnorm_scratch_len(n, c) + bias_scratch_len(n, c.max(kvd)) + attention_scratch_len(b, t, nh))
        + 4 * (4 * n + 2)
        + (x + 4) * cfg.max_position_embeddings * c;
    vec![
        ("weights", x * p),
        ("master weights+grads+AdamW", 16 * p),
        ("activations", activations),
        ("activation gradients", gradients),
        ("scratch", scratch),
    ]
}
