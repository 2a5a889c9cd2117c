//! One host function per GPU operation: the launch configuration written at the top of each
//! kernels/*.cu file, and the CPU reference's argument order and meaning (src/cpu), so a model
//! step reads the same on both backends. Pointers are raw device addresses ([`DPtr`]); those
//! marked floatX hold the precision's storage type, the others f32 (or i32 for tokens).
//!
//! Unlike the CPU ops, GPU activation gradients are written, not accumulated (each is produced
//! once per backward); parameter gradients are fp32 and accumulated, as on the CPU.

use super::model::MAX_HEAD_DIM;
use super::profile::Work;
use super::{Arg, DPtr, Gpu, Precision};
use crate::cpu::matmul::WeightLayout;
use anyhow::Result;

// Determinism with grids sized from the GPU: every reduction is cut into units of work fixed by
// the problem's shape alone (the constants below, and 64-row chunks of the bias gradient); the
// blocks of the grid take units grid-stride, and the units' results are combined in unit order.
// The SM count decides only which block computes which unit, never the order of any sum.

/// Most workers (warps, each owning rows w, w+G, ...) of the layernorm backward.
const LAYERNORM_WORKERS: usize = 2048;
/// Units of the gradient-norm reduction.
pub const NORM_BLOCKS: usize = 1024;
/// Rows per unit of the bias gradient (kernels/matmul.cu's BIAS_ROWS).
const BIAS_ROWS: usize = 64;

/// Blocks per SM for the memory-bound kernels: 8 × 256 threads fill an SM of 2048 (sm_80, sm_90).
const BLOCKS_PER_SM: usize = 8;

fn blocks(n: usize, per_block: usize) -> u32 {
    u32::try_from(n.div_ceil(per_block).max(1)).expect("grid too large")
}

fn i32_of(n: usize) -> Arg {
    Arg::I32(i32::try_from(n).expect("size exceeds i32"))
}

fn i64_of(n: usize) -> Arg {
    Arg::I64(n as i64)
}

/// Floats of scratch the layernorm backward and the bias gradient need for N rows of C channels
/// (the widest bias is the MLP's, 4·C).
pub fn layernorm_scratch_len(n: usize, c: usize) -> usize {
    (layernorm_workers(n) * 2 * c).max(bias_scratch_len(n, 4 * c))
}

pub(super) fn layernorm_workers(n: usize) -> usize {
    n.clamp(1, LAYERNORM_WORKERS)
}

/// Floats of the bias gradient's partial sums for N rows of OC columns.
pub fn bias_scratch_len(n: usize, oc: usize) -> usize {
    n.div_ceil(BIAS_ROWS) * oc
}

/// Tokens grouped by value for the deterministic wte gradient: bucket u holds `tokens[u]` at
/// the (sorted) positions `positions[starts[u]..starts[u+1]]`.
#[derive(Debug, Default, PartialEq)]
pub struct TokenBuckets {
    pub tokens: Vec<i32>,
    pub starts: Vec<i32>,
    pub positions: Vec<i32>,
}

impl TokenBuckets {
    pub fn new(inputs: &[u32]) -> Self {
        let mut order: Vec<u32> = (0..inputs.len() as u32).collect();
        order.sort_by_key(|&i| (inputs[i as usize], i));
        let mut b = TokenBuckets::default();
        for (k, &pos) in order.iter().enumerate() {
            let token = inputs[pos as usize] as i32;
            if b.tokens.last() != Some(&token) {
                b.tokens.push(token);
                b.starts.push(k as i32);
            }
            b.positions.push(pos as i32);
        }
        b.starts.push(inputs.len() as i32);
        b
    }
}

/// A tensor-core matmul variant of kernels/matmul.cu: its block tile, threads and dynamic shared
/// memory, as the top of that file states.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MatmulVariant {
    /// The kernel name's part: `matmul_{name}_bf16`.
    pub name: &'static str,
    pub bm: usize,
    pub bn: usize,
    pub threads: u32,
    pub smem: u32,
}

/// Every tensor-core variant. The first one is the default; `for_shape` is the one place that
/// chooses.
pub const MATMUL_VARIANTS: [MatmulVariant; 2] = [
    MatmulVariant { name: "tc128x128", bm: 128, bn: 128, threads: 256, smem: 67584 },
    MatmulVariant { name: "tc128x64", bm: 128, bn: 64, threads: 128, smem: 49152 },
];

impl MatmulVariant {
    /// The variant for an M×N×K product. Narrow outputs (GPT-2's N = 768 products) get the
    /// 128×64 tile, which gives twice the blocks to fill the GPU; the rest the 128×128 tile,
    /// which reads each loaded element more often. Which variant runs changes no result: each
    /// output element is summed in the same k order by both. To be tuned with `finch bench
    /// matmul --sweep` on a GPU.
    pub fn for_shape(m: usize, n: usize, _k: usize) -> &'static MatmulVariant {
        let wide_blocks = m.div_ceil(128) * n.div_ceil(128);
        if n <= 1024 || wide_blocks < 128 {
            &MATMUL_VARIANTS[1]
        } else {
            &MATMUL_VARIANTS[0]
        }
    }
}

pub struct Ops<'a> {
    pub gpu: &'a Gpu,
    pub precision: Precision,
    /// Runs every bf16 matmul on this variant instead of the one `MatmulVariant::for_shape`
    /// chooses: `finch check` checks each variant this way.
    pub force_variant: Option<&'static MatmulVariant>,
}

impl Ops<'_> {
    /// A grid for `units` independent pieces of work (rows, groups, chunks) taken grid-stride:
    /// no more blocks than the GPU runs at once.
    pub(super) fn grid_for(&self, units: usize, per_block: usize, per_sm: usize) -> (u32, u32, u32) {
        let most = self.gpu.sm_count as usize * per_sm;
        (blocks(units, per_block).min(most.max(1) as u32), 1, 1)
    }

    /// Launches `family` at this precision (its `_bf16` or `_f32` kernel), doing `work`.
    pub(super) fn launch(
        &self,
        family: &str,
        grid: (u32, u32, u32),
        block: u32,
        args: &[Arg],
        work: Work,
    ) -> Result<()> {
        self.run(&format!("{family}_{}", self.precision.suffix()), grid, block, 0, args, work)
    }

    /// Launches kernel `name` with `smem` bytes of dynamic shared memory, doing `work`.
    pub(super) fn run(
        &self,
        name: &str,
        grid: (u32, u32, u32),
        block: u32,
        smem: u32,
        args: &[Arg],
        work: Work,
    ) -> Result<()> {
        self.gpu.launch_measured(name, grid, block, smem, args, work)
    }

    /// Bytes of `n` elements at this precision (activations, weights).
    pub(super) fn x(&self, n: usize) -> f64 {
        (n * self.precision.size()) as f64
    }

    /// out (B,T,C) floatX = wte[inp] + wpe[t]; inp (B·T) i32.
    pub fn encoder_forward(
        &self,
        out: DPtr,
        inp: DPtr,
        wte: DPtr,
        wpe: DPtr,
        b: usize,
        t: usize,
        c: usize,
    ) -> Result<()> {
        let args = [out.into(), inp.into(), wte.into(), wpe.into(), i32_of(b * t), i32_of(t), i32_of(c)];
        // Rows of wte and wpe in, the sum out.
        let work = Work::bytes(3.0 * self.x(b * t * c) + 4.0 * (b * t) as f64);
        self.launch("encoder_forward", self.grid_for((b * t * c).div_ceil(8), 256, BLOCKS_PER_SM), 256, &args, work)
    }

    /// dwte (f32) and dwpe (f32) += the gradient from dout (B,T,C) floatX. `buckets` lives on
    /// the device at (tokens, starts, positions) with `n_buckets` buckets.
    pub fn encoder_backward(
        &self,
        dwte: DPtr,
        dwpe: DPtr,
        dout: DPtr,
        buckets: (DPtr, DPtr, DPtr, DPtr),
        b: usize,
        t: usize,
        c: usize,
    ) -> Result<()> {
        let args = [dwpe.into(), dout.into(), i32_of(b), i32_of(t), i32_of(c)];
        let work = Work::bytes(self.x(b * t * c) + 8.0 * (t * c) as f64);
        let grid = self.grid_for((t * c).div_ceil(8), 256, BLOCKS_PER_SM);
        self.launch("encoder_backward_wpe", grid, 256, &args, work)?;
        // One block per possible bucket (B·T); those past the count in device memory return.
        let (tokens, starts, positions, count) = buckets;
        let args = [dwte.into(), dout.into(), tokens.into(), starts.into(), positions.into(), count.into(), i32_of(c)];
        // At most B·T distinct rows of dwte read and written (the count is on the device).
        let work = Work::bytes(self.x(b * t * c) + 8.0 * (b * t * c) as f64 + 12.0 * (b * t) as f64);
        self.launch("encoder_backward_wte", (blocks(b * t, 1), 1, 1), 256, &args, work)
    }

    /// out (n) floatX = GELU(inp (n) floatX), as the matmul epilogue computes it (--recompute).
    pub fn gelu_forward(&self, out: DPtr, inp: DPtr, n: usize) -> Result<()> {
        self.launch(
            "gelu_forward",
            (blocks(n, 256), 1, 1),
            256,
            &[out.into(), inp.into(), i64_of(n)],
            Work::bytes(2.0 * self.x(n)),
        )
    }

    /// out (N,C) floatX, mean and rstd (N) f32 = LayerNorm(inp).
    pub fn layernorm_forward(
        &self,
        out: DPtr,
        mean: DPtr,
        rstd: DPtr,
        inp: DPtr,
        weight: DPtr,
        bias: DPtr,
        n: usize,
        c: usize,
        eps: f64,
    ) -> Result<()> {
        let args = [
            out.into(),
            mean.into(),
            rstd.into(),
            inp.into(),
            weight.into(),
            bias.into(),
            i32_of(n),
            i32_of(c),
            Arg::F32(eps as f32),
        ];
        let work = Work::bytes(2.0 * self.x(n * c) + 8.0 * n as f64);
        self.launch("layernorm_forward", self.grid_for(n, 8, 4), 256, &args, work)
    }

    /// residual = inp1 + inp2, then out, mean, rstd = LayerNorm(residual): the residual add of
    /// one block fused with the LayerNorm that follows it.
    pub fn residual_layernorm_forward(
        &self,
        residual: DPtr,
        out: DPtr,
        mean: DPtr,
        rstd: DPtr,
        inp1: DPtr,
        inp2: DPtr,
        weight: DPtr,
        bias: DPtr,
        n: usize,
        c: usize,
        eps: f64,
    ) -> Result<()> {
        let args = [
            residual.into(),
            out.into(),
            mean.into(),
            rstd.into(),
            inp1.into(),
            inp2.into(),
            weight.into(),
            bias.into(),
            i32_of(n),
            i32_of(c),
            Arg::F32(eps as f32),
        ];
        let work = Work::bytes(4.0 * self.x(n * c) + 8.0 * n as f64);
        self.launch("residual_layernorm_forward", self.grid_for(n, 8, 4), 256, &args, work)
    }

    /// dinp (N,C) floatX = dresidual (NULL: 0; may equal dinp) + the LayerNorm input gradient;
    /// (dweight, dbias) (C) f32 += their gradients. `scratch` holds [`layernorm_scratch_len`] f32.
    pub fn layernorm_backward(
        &self,
        dinp: DPtr,
        dresidual: DPtr,
        (dweight, dbias): (DPtr, DPtr),
        dout: DPtr,
        inp: DPtr,
        mean: DPtr,
        rstd: DPtr,
        weight: DPtr,
        scratch: DPtr,
        n: usize,
        c: usize,
    ) -> Result<()> {
        let args = [
            dinp.into(),
            dresidual.into(),
            scratch.into(),
            dout.into(),
            inp.into(),
            mean.into(),
            rstd.into(),
            weight.into(),
            i32_of(n),
            i32_of(c),
            i32_of(layernorm_workers(n)),
        ];
        // dout, the input and the residual gradient in, the input gradient out; partials out.
        let partials = 4.0 * (layernorm_workers(n) * 2 * c) as f64;
        let work = Work::bytes(4.0 * self.x(n * c) + 8.0 * n as f64 + partials);
        self.launch("layernorm_backward", self.grid_for(layernorm_workers(n), 8, 4), 256, &args, work)?;
        let args = [dweight.into(), dbias.into(), scratch.into(), i32_of(layernorm_workers(n)), i32_of(c)];
        let work = Work::bytes(partials + 16.0 * c as f64);
        self.run("layernorm_param_grads_reduce", (blocks(2 * c, 256), 1, 1), 256, 0, &args, work)
    }

    /// The general product: out (M,N) = A·B with A[m,k] = a[m·a_rs + k·a_cs] and
    /// B[k,n] = b[k·b_rs + n·b_cs], then the epilogue of kernels/matmul.cu (bias, GELU, GELU',
    /// accumulate). `out_f32` picks an f32 output (parameter gradients) over floatX.
    pub fn matmul(
        &self,
        out: DPtr,
        out_f32: bool,
        a: (DPtr, usize, usize),
        b: (DPtr, usize, usize),
        epilogue: Epilogue,
        m: usize,
        n: usize,
        k: usize,
    ) -> Result<()> {
        let variant = match self.precision {
            Precision::Bf16 => Some(self.force_variant.unwrap_or_else(|| MatmulVariant::for_shape(m, n, k))),
            Precision::F32 => None,
        };
        self.matmul_variant(variant, out, out_f32, a, b, epilogue, m, n, k)
    }

    /// [`matmul`](Self::matmul) on a given tensor-core variant (bf16 only; None: the f32 kernel),
    /// for the benchmark's sweep.
    pub fn matmul_variant(
        &self,
        variant: Option<&MatmulVariant>,
        out: DPtr,
        out_f32: bool,
        a: (DPtr, usize, usize),
        b: (DPtr, usize, usize),
        epilogue: Epilogue,
        m: usize,
        n: usize,
        k: usize,
    ) -> Result<()> {
        let args = [
            out.into(),
            a.0.into(),
            b.0.into(),
            epilogue.bias.into(),
            epilogue.pre_gelu.into(),
            epilogue.gelu_input.into(),
            i32_of(m),
            i32_of(n),
            i32_of(k),
            i64_of(a.1),
            i64_of(a.2),
            i64_of(b.1),
            i64_of(b.2),
            Arg::I32(epilogue.accumulate as i32),
        ];
        let out_suffix = if out_f32 { "_f32out" } else { "" };
        let work = Work::flops(2.0 * (m * n * k) as f64);
        match variant {
            Some(v) => {
                assert!(self.precision == Precision::Bf16, "tensor-core matmuls are bf16");
                // The kernel reads each operand along a contiguous dimension.
                assert!(a.2 == 1 || a.1 == 1, "matmul: A has no contiguous dimension (strides {}, {})", a.1, a.2);
                assert!(b.1 == 1 || b.2 == 1, "matmul: B has no contiguous dimension (strides {}, {})", b.1, b.2);
                let name = format!("matmul_{}{out_suffix}_bf16", v.name);
                let grid = (blocks(n, v.bn), blocks(m, v.bm), 1);
                self.run(&name, grid, v.threads, v.smem, &args, work)
            }
            None => self.launch(&format!("matmul{out_suffix}"), (blocks(n, 64), blocks(m, 64), 1), 128, &args, work),
        }
    }

    /// out (N, OC) floatX = inp (N, C) · W + bias, W stored as `layout` says. With `pre_gelu`,
    /// the sum goes to pre_gelu and GELU of it to out (the MLP's first layer in one pass).
    pub fn matmul_forward(
        &self,
        out: DPtr,
        pre_gelu: Option<DPtr>,
        inp: DPtr,
        weight: DPtr,
        bias: Option<DPtr>,
        n: usize,
        c: usize,
        oc: usize,
        layout: WeightLayout,
    ) -> Result<()> {
        let (w_rs, w_cs) = layout.in_out_strides(c, oc);
        let epilogue = Epilogue { bias: DPtr::or_null(bias), pre_gelu: DPtr::or_null(pre_gelu), ..Epilogue::default() };
        self.matmul(out, false, (inp, c, 1), (weight, w_rs, w_cs), epilogue, n, oc, c)
    }

    /// dinp (N, C) floatX = dout · Wᵀ (times GELU'(gelu_input) when given: the gradient through
    /// a GELU whose output was this layer's input); dweight f32 += its gradient in W's layout;
    /// dbias (OC) f32 += Σ_rows dout, through `scratch` (bias_scratch_len floats): (dbias, scratch).
    pub fn matmul_backward(
        &self,
        dinp: DPtr,
        dweight: DPtr,
        dbias: Option<(DPtr, DPtr)>,
        dout: DPtr,
        inp: DPtr,
        weight: DPtr,
        gelu_input: Option<DPtr>,
        n: usize,
        c: usize,
        oc: usize,
        layout: WeightLayout,
    ) -> Result<()> {
        let (wt_rs, wt_cs) = layout.out_in_strides(c, oc);
        let dx_epilogue = Epilogue { gelu_input: DPtr::or_null(gelu_input), ..Epilogue::default() };
        self.matmul(dinp, false, (dout, oc, 1), (weight, wt_rs, wt_cs), dx_epilogue, n, c, oc)?;
        let accumulate = Epilogue { accumulate: true, ..Epilogue::default() };
        match layout {
            // dW (C × OC) += inpᵀ · dout
            WeightLayout::InOut => self.matmul(dweight, true, (inp, 1, c), (dout, oc, 1), accumulate, c, oc, n)?,
            // dW (OC × C) += doutᵀ · inp
            WeightLayout::OutIn => self.matmul(dweight, true, (dout, 1, oc), (inp, c, 1), accumulate, oc, c, n)?,
        }
        if let Some((dbias, scratch)) = dbias {
            self.bias_grad(dbias, scratch, dout, n, oc)?;
        }
        Ok(())
    }

    /// dbias (OC) f32 += Σ_rows dout (N, OC) floatX: partial sums per 64-row chunk into
    /// `scratch` (bias_scratch_len floats), then added in chunk order.
    pub fn bias_grad(&self, dbias: DPtr, scratch: DPtr, dout: DPtr, n: usize, oc: usize) -> Result<()> {
        let args = [scratch.into(), dout.into(), i32_of(n), i32_of(oc)];
        let units = n.div_ceil(BIAS_ROWS) * oc.div_ceil(256);
        let partials = 4.0 * bias_scratch_len(n, oc) as f64;
        let work = Work::bytes(self.x(n * oc) + partials);
        self.launch("bias_grad_partial", self.grid_for(units, 1, BLOCKS_PER_SM), 256, &args, work)?;
        let args = [dbias.into(), scratch.into(), i32_of(n.div_ceil(BIAS_ROWS)), i32_of(oc)];
        let work = Work::bytes(partials + 8.0 * oc as f64);
        self.run("bias_grad_reduce", (blocks(oc, 256), 1, 1), 256, 0, &args, work)
    }

    /// out (B,T,C) floatX and lse (B,NH,T) f32 from qkv (B,T,3C) floatX. bf16 runs the
    /// tensor-core (flash) kernel for the head dimension padded to 64 or 128.
    pub fn attention_forward(
        &self,
        out: DPtr,
        lse: DPtr,
        qkv: DPtr,
        b: usize,
        t: usize,
        c: usize,
        nh: usize,
    ) -> Result<()> {
        assert!(c / nh <= MAX_HEAD_DIM, "attention: head dim {} above {MAX_HEAD_DIM}", c / nh);
        let args = [out.into(), lse.into(), qkv.into(), i32_of(b), i32_of(t), i32_of(c), i32_of(nh)];
        // Q·Kᵀ and P·V under the causal mask: 2 matmuls of 2·T·T·hd, halved.
        let work = Work::flops(attention_flops(b, t, c, 2));
        match self.precision {
            Precision::Bf16 => {
                let hd = flash_head_dim(c / nh);
                let name = format!("flash_forward_hd{hd}_bf16");
                self.run(&name, flash_grid(b, t, nh), ATTENTION_THREADS, flash_smem(hd).0, &args, work)
            }
            Precision::F32 => {
                self.launch("attention_forward", attention_grid(b, t, nh), ATTENTION_THREADS, &args, work)
            }
        }
    }

    /// dqkv (B,T,3C) floatX, written, from dout (B,T,C) and the forward's qkv, out and lse.
    /// `scratch` holds B·NH·T f32: the per-query D = rowsum(dout ∘ out) of the bf16 kernels.
    pub fn attention_backward(
        &self,
        dqkv: DPtr,
        dout: DPtr,
        qkv: DPtr,
        out: DPtr,
        lse: DPtr,
        scratch: DPtr,
        b: usize,
        t: usize,
        c: usize,
        nh: usize,
    ) -> Result<()> {
        assert!(c / nh <= MAX_HEAD_DIM, "attention: head dim {} above {MAX_HEAD_DIM}", c / nh);
        let dims = [i32_of(b), i32_of(t), i32_of(c), i32_of(nh)];
        match self.precision {
            Precision::Bf16 => {
                let hd = flash_head_dim(c / nh);
                let (_, dkdv_smem, dq_smem) = flash_smem(hd);
                let d_args = [scratch.into(), dout.into(), out.into(), dims[0], dims[1], dims[2], dims[3]];
                let work = Work::bytes(2.0 * self.x(b * t * c) + 4.0 * (b * nh * t) as f64);
                self.run("attention_d_bf16", (blocks(b * nh * t, 128), 1, 1), 128, 0, &d_args, work)?;
                let args = [
                    dqkv.into(),
                    dout.into(),
                    qkv.into(),
                    lse.into(),
                    scratch.into(),
                    dims[0],
                    dims[1],
                    dims[2],
                    dims[3],
                ];
                let grid = flash_grid(b, t, nh);
                // dK, dV: S = Q·Kᵀ, dP = dO·Vᵀ, dV += Pᵀ·dO, dK += dSᵀ·Q. dQ: S, dP, dQ += dS·K.
                let (dkdv, dq) = (Work::flops(attention_flops(b, t, c, 4)), Work::flops(attention_flops(b, t, c, 3)));
                self.run(&format!("flash_backward_dkdv_hd{hd}_bf16"), grid, 128, dkdv_smem, &args, dkdv)?;
                self.run(&format!("flash_backward_dq_hd{hd}_bf16"), grid, 128, dq_smem, &args, dq)
            }
            Precision::F32 => {
                let args =
                    [dqkv.into(), dout.into(), qkv.into(), out.into(), lse.into(), dims[0], dims[1], dims[2], dims[3]];
                let (dkdv, dq) = (Work::flops(attention_flops(b, t, c, 4)), Work::flops(attention_flops(b, t, c, 3)));
                self.launch("attention_backward_dkdv", attention_grid(b, t, nh), ATTENTION_THREADS, &args, dkdv)?;
                self.launch("attention_backward_dq", attention_grid(b, t, nh), ATTENTION_THREADS, &args, dq)
            }
        }
    }

    /// losses (N) f32 = cross-entropy of logits (N, Vp) floatX over the first V columns. With
    /// `dlogits` (may equal `logits`), also writes (softmax − onehot)·dloss there.
    pub fn crossentropy(
        &self,
        losses: DPtr,
        dlogits: Option<DPtr>,
        logits: DPtr,
        targets: DPtr,
        n: usize,
        v: usize,
        vp: usize,
        dloss: f32,
    ) -> Result<()> {
        let args = [
            losses.into(),
            DPtr::or_null(dlogits).into(),
            logits.into(),
            targets.into(),
            i32_of(n),
            i32_of(v),
            i32_of(vp),
            Arg::F32(dloss),
        ];
        // The logits in, their gradient out when asked.
        let work = Work::bytes(self.x(n * vp) * if dlogits.is_some() { 2.0 } else { 1.0 } + 8.0 * n as f64);
        self.launch("crossentropy_forward", self.grid_for(n, 1, BLOCKS_PER_SM), 256, &args, work)
    }

    /// The squared L2 norm of `n` f32 at `grads`, via `scratch` (NORM_BLOCKS + 1 f64), read back.
    pub fn grad_norm_squared(&self, grads: DPtr, n: usize, scratch: DPtr) -> Result<f64> {
        let total = scratch.add(NORM_BLOCKS, 8);
        self.grad_norm_squared_into(total, grads, n, scratch)?;
        let mut out = [0f64];
        self.gpu.download(&mut out, total)?;
        Ok(out[0])
    }

    /// out (one f64, on the device) = the squared L2 norm of `n` f32 at `grads`, via `scratch`
    /// (NORM_BLOCKS f64); nothing read back.
    pub fn grad_norm_squared_into(&self, out: DPtr, grads: DPtr, n: usize, scratch: DPtr) -> Result<()> {
        // grads: a buffer's start, 16-byte aligned (the kernel reads 4 floats at a time).
        assert!(grads.0 % 16 == 0, "grad_norm_squares: misaligned gradients");
        let args = [scratch.into(), grads.into(), i64_of(n), i32_of(NORM_BLOCKS)];
        let grid = self.grid_for(NORM_BLOCKS, 1, BLOCKS_PER_SM);
        self.run("grad_norm_squares", grid, 256, 0, &args, Work::bytes(4.0 * n as f64))?;
        let args = [out.into(), scratch.into(), i32_of(NORM_BLOCKS)];
        self.run("grad_norm_finish", (1, 1, 1), 256, 0, &args, Work::bytes(8.0 * NORM_BLOCKS as f64))
    }

    /// acc (one f64) += mean(losses (N) f32) / accum, on the device.
    pub fn loss_accumulate(&self, acc: DPtr, losses: DPtr, n: usize, accum: usize) -> Result<()> {
        let args = [acc.into(), losses.into(), i32_of(n), i32_of(accum)];
        self.run("loss_accumulate", (1, 1, 1), 256, 0, &args, Work::bytes(4.0 * n as f64))
    }

    /// The step's norm, finiteness and clipping factor from its loss and squared norm (StepState).
    pub fn step_finish(&self, state: DPtr, max_norm: f64) -> Result<()> {
        self.run("step_finish", (1, 1, 1), 32, 0, &[state.into(), Arg::F64(max_norm)], Work::default())
    }

    /// AdamW on every tensor in one launch (see kernels/optimizer.cu for the formula): `chunks`
    /// (AdamWChunk × n_chunks), scalars at `hp` (AdamWParams), clipping factor and finiteness
    /// from `state` (StepState); all read on the device.
    pub fn adamw(
        &self,
        (params, master, grads, m, v): (DPtr, DPtr, DPtr, DPtr, DPtr),
        (chunks, n_chunks): (DPtr, usize),
        n: usize,
        hp: DPtr,
        state: DPtr,
    ) -> Result<()> {
        let args = [
            params.into(),
            master.into(),
            grads.into(),
            m.into(),
            v.into(),
            chunks.into(),
            i32_of(n_chunks),
            hp.into(),
            state.into(),
        ];
        // Per element: the gradient, master weight and moments in; those three and params out.
        let work = Work::bytes((28 * n) as f64 + self.x(n));
        self.launch("adamw", self.grid_for(n_chunks, 1, BLOCKS_PER_SM), 256, &args, work)
    }

    /// out (n) floatX = round(inp (n) f32).
    pub fn f32_to_floatx(&self, out: DPtr, inp: DPtr, n: usize) -> Result<()> {
        let work = Work::bytes(4.0 * n as f64 + self.x(n));
        self.launch(
            "f32_to_floatx",
            self.grid_for(n, 256, BLOCKS_PER_SM),
            256,
            &[out.into(), inp.into(), i64_of(n)],
            work,
        )
    }

    /// out (n) f32 = inp (n) floatX.
    pub fn floatx_to_f32(&self, out: DPtr, inp: DPtr, n: usize) -> Result<()> {
        let work = Work::bytes(4.0 * n as f64 + self.x(n));
        self.launch(
            "floatx_to_f32",
            self.grid_for(n, 256, BLOCKS_PER_SM),
            256,
            &[out.into(), inp.into(), i64_of(n)],
            work,
        )
    }
}

/// What the matmul kernel does to each sum before storing it (NULL pointers: nothing).
#[derive(Debug, Clone, Copy, Default)]
pub struct Epilogue {
    pub bias: DPtr,
    pub pre_gelu: DPtr,
    pub gelu_input: DPtr,
    pub accumulate: bool,
}

/// The AdamW scalars, formed in f64 and rounded once, exactly as the CPU optimizer does.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWScalars {
    pub grad_scale: f32,
    pub step_size: f32,
    pub bc2_sqrt: f32,
    pub one_minus_beta1: f32,
    pub beta2: f32,
    pub one_minus_beta2: f32,
    pub eps: f32,
    pub decay: f32,
}

impl AdamWScalars {
    /// One step's scalars, rounded to f32; `decay` applies `s.decay` (2-D tensors) or not.
    pub fn new(s: &crate::cpu::optimizer::AdamWStep, grad_scale: f64, decay: bool) -> Self {
        AdamWScalars {
            grad_scale: grad_scale as f32,
            step_size: s.step_size as f32,
            bc2_sqrt: s.bc2_sqrt as f32,
            one_minus_beta1: s.one_minus_beta1 as f32,
            beta2: s.beta2 as f32,
            one_minus_beta2: s.one_minus_beta2 as f32,
            eps: s.eps as f32,
            decay: if decay { s.decay as f32 } else { 1.0 },
        }
    }
}

/// Threads per block of the attention kernels.
const ATTENTION_THREADS: u32 = 128;

fn attention_grid(b: usize, t: usize, nh: usize) -> (u32, u32, u32) {
    (blocks(t, 16), nh as u32, b as u32)
}

/// FLOPs of `matmuls` (T×T×hd) products per head under the causal mask (half of the T×T
/// scores): matmuls · 2·T·T·hd / 2 per head, B·NH heads, hd·NH = C.
fn attention_flops(b: usize, t: usize, c: usize, matmuls: usize) -> f64 {
    (matmuls * b * t * t * c) as f64
}

/// The flash kernels' grid: one block per 64 rows, per head, per sequence.
fn flash_grid(b: usize, t: usize, nh: usize) -> (u32, u32, u32) {
    (blocks(t, 64), nh as u32, b as u32)
}

/// The head dimension a flash kernel is compiled for: hd padded with zeros to 64 or 128.
fn flash_head_dim(hd: usize) -> usize {
    if hd <= 64 {
        64
    } else {
        128
    }
}

/// Dynamic shared memory of the flash kernels for head dimension `hd` (64 or 128), as the top of
/// kernels/attention.cu states: forward, dkdv, dq.
fn flash_smem(hd: usize) -> (u32, u32, u32) {
    let hd = hd as u32;
    (5 * 64 * hd * 2, (2 * 64 + 4 * 32) * hd * 2 + 4 * 32 * 4, 6 * 64 * hd * 2)
}

/// f32 elements of the scratch `attention_backward` needs (D per query row).
pub fn attention_scratch_len(b: usize, t: usize, nh: usize) -> usize {
    b * nh * t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_buckets_group_positions_in_order() {
        let b = TokenBuckets::new(&[5, 2, 5, 7, 2, 5]);
        assert_eq!(b.tokens, [2, 5, 7]);
        assert_eq!(b.starts, [0, 2, 5, 6]);
        assert_eq!(b.positions, [1, 4, 0, 2, 5, 3]);
    }
}
