//! The Llama family's GPU operations (kernels/rmsnorm.cu, rope.cu, swiglu.cu, gqa.cu), as
//! `ops.rs` does for GPT-2's: each kernel's launch configuration from the top of its file, the
//! CPU reference's argument order. RoPE takes its angles as cos/sin tables (T, hd/2) f32 that the
//! host builds with `cpu::rope::rope_tables` (f64, rounded once), so both backends rotate by the
//! same numbers.

use super::ops::{layernorm_workers, Ops};
use super::profile::Work;
use super::{Arg, DPtr};
use anyhow::Result;

fn i32_of(n: usize) -> Arg {
    Arg::I32(i32::try_from(n).expect("size exceeds i32"))
}

/// Grid of an element-wise kernel over `units` (8 per thread at most), 256 threads a block.
fn elementwise(ops: &Ops, units: usize) -> (u32, u32, u32) {
    ops.grid_for(units.div_ceil(8), 256, 8)
}

/// Floats of scratch the RMSNorm backward needs for N rows of C channels (within
/// [`super::ops::layernorm_scratch_len`]).
pub fn rmsnorm_scratch_len(n: usize, c: usize) -> usize {
    layernorm_workers(n) * c
}

impl Ops<'_> {
    /// out (N,C) floatX, rstd (N) f32 = RMSNorm(inp) · weight.
    pub fn rmsnorm_forward(
        &self,
        out: DPtr,
        rstd: DPtr,
        inp: DPtr,
        weight: DPtr,
        n: usize,
        c: usize,
        eps: f64,
    ) -> Result<()> {
        let args = [out.into(), rstd.into(), inp.into(), weight.into(), i32_of(n), i32_of(c), Arg::F32(eps as f32)];
        let work = Work::bytes(2.0 * self.x(n * c) + 4.0 * n as f64);
        self.launch("rmsnorm_forward", self.grid_for(n, 8, 4), 256, &args, work)
    }

    /// residual = inp1 + inp2 (may be written over inp1), then out, rstd = RMSNorm(residual).
    pub fn residual_rmsnorm_forward(
        &self,
        (residual, out, rstd): (DPtr, DPtr, DPtr),
        inp1: DPtr,
        inp2: DPtr,
        weight: DPtr,
        n: usize,
        c: usize,
        eps: f64,
    ) -> Result<()> {
        let args = [
            residual.into(),
            out.into(),
            rstd.into(),
            inp1.into(),
            inp2.into(),
            weight.into(),
            i32_of(n),
            i32_of(c),
            Arg::F32(eps as f32),
        ];
        let work = Work::bytes(4.0 * self.x(n * c) + 4.0 * n as f64);
        self.launch("residual_rmsnorm_forward", self.grid_for(n, 8, 4), 256, &args, work)
    }

    /// dinp (N,C) floatX = dresidual (NULL: 0; may equal dinp) + the RMSNorm input gradient;
    /// dweight (C) f32 += its gradient. `scratch` holds [`rmsnorm_scratch_len`] f32.
    pub fn rmsnorm_backward(
        &self,
        (dinp, dresidual, dweight): (DPtr, DPtr, DPtr),
        dout: DPtr,
        (inp, weight, rstd): (DPtr, DPtr, DPtr),
        scratch: DPtr,
        n: usize,
        c: usize,
    ) -> Result<()> {
        let g = layernorm_workers(n);
        let args = [
            dinp.into(),
            dresidual.into(),
            scratch.into(),
            dout.into(),
            inp.into(),
            weight.into(),
            rstd.into(),
            i32_of(n),
            i32_of(c),
            i32_of(g),
        ];
        let partials = 4.0 * (g * c) as f64;
        let work = Work::bytes(4.0 * self.x(n * c) + 4.0 * n as f64 + partials);
        self.launch("rmsnorm_backward", self.grid_for(g, 8, 4), 256, &args, work)?;
        let args = [dweight.into(), scratch.into(), i32_of(g), i32_of(c)];
        let work = Work::bytes(partials + 8.0 * c as f64);
        self.run("rmsnorm_param_grads_reduce", (c.div_ceil(256) as u32, 1, 1), 256, 0, &args, work)
    }

    /// out (N, H·hd) = inp rotated (row n at position n % T); may be in place.
    pub fn rope_forward(
        &self,
        out: DPtr,
        inp: DPtr,
        (cos, sin): (DPtr, DPtr),
        (n, t): (usize, usize),
        (h, hd): (usize, usize),
    ) -> Result<()> {
        let args = [out.into(), inp.into(), cos.into(), sin.into(), i32_of(n), i32_of(t), i32_of(h), i32_of(hd)];
        let work = Work::bytes(2.0 * self.x(n * h * hd) + 4.0 * (t * hd) as f64);
        self.launch("rope_forward", elementwise(self, n * h * hd / 2), 256, &args, work)
    }

    /// dinp = (or, `accumulate`, +=) the rotation's transpose of dout.
    pub fn rope_backward(
        &self,
        dinp: DPtr,
        dout: DPtr,
        (cos, sin): (DPtr, DPtr),
        (n, t): (usize, usize),
        (h, hd): (usize, usize),
        accumulate: bool,
    ) -> Result<()> {
        let args = [
            dinp.into(),
            dout.into(),
            cos.into(),
            sin.into(),
            i32_of(n),
            i32_of(t),
            i32_of(h),
            i32_of(hd),
            Arg::I32(accumulate as i32),
        ];
        let work = Work::bytes((2.0 + accumulate as u8 as f64) * self.x(n * h * hd));
        self.launch("rope_backward", elementwise(self, n * h * hd / 2), 256, &args, work)
    }

    /// out (n) = silu(gate) · up.
    pub fn swiglu_forward(&self, out: DPtr, gate: DPtr, up: DPtr, n: usize) -> Result<()> {
        let args = [out.into(), gate.into(), up.into(), Arg::I64(n as i64)];
        self.launch("swiglu_forward", elementwise(self, n), 256, &args, Work::bytes(3.0 * self.x(n)))
    }

    /// dgate, dup (n) = (or, `accumulate`, +=) SwiGLU's gradients from dout.
    pub fn swiglu_backward(
        &self,
        (dgate, dup): (DPtr, DPtr),
        dout: DPtr,
        gate: DPtr,
        up: DPtr,
        n: usize,
        accumulate: bool,
    ) -> Result<()> {
        let args = [
            dgate.into(),
            dup.into(),
            dout.into(),
            gate.into(),
            up.into(),
            Arg::I64(n as i64),
            Arg::I32(accumulate as i32),
        ];
        let work = Work::bytes((5.0 + 2.0 * accumulate as u8 as f64) * self.x(n));
        self.launch("swiglu_backward", elementwise(self, n), 256, &args, work)
    }

    /// qkv (N, 3·NH·hd) = q, and k and v with each of the NKV heads repeated for its NH/NKV query
    /// heads; with `rope` (cos, sin tables), q and k rotated on the way (T: positions per row).
    pub fn pack_qkv(
        &self,
        qkv: DPtr,
        (q, k, v): (DPtr, DPtr, DPtr),
        rope: Option<((DPtr, DPtr), usize)>,
        n: usize,
        (nh, nkv, hd): (usize, usize, usize),
    ) -> Result<()> {
        let (c, kvd) = (nh * hd, nkv * hd);
        let work = Work::bytes(self.x(n * (c + 2 * kvd)) + self.x(3 * n * c));
        let grid = elementwise(self, n * 3 * nh * hd / 2);
        let heads = [i32_of(nh), i32_of(nkv), i32_of(hd)];
        match rope {
            None => {
                let args = [&[qkv.into(), q.into(), k.into(), v.into(), i32_of(n)][..], &heads].concat();
                self.launch("pack_qkv", grid, 256, &args, work)
            }
            Some(((cos, sin), t)) => {
                let args = [
                    &[qkv.into(), q.into(), k.into(), v.into(), cos.into(), sin.into(), i32_of(n), i32_of(t)][..],
                    &heads,
                ]
                .concat();
                self.launch("rope_pack_qkv", grid, 256, &args, work)
            }
        }
    }

    /// The transpose of [`pack_qkv`](Self::pack_qkv): dq = (or, `accumulate`, +=) the q part of
    /// dqkv, dk and dv the sums over each group of query heads (in head order), rotated back
    /// after the sum with `rope`.
    pub fn unpack_dqkv(
        &self,
        (dq, dk, dv): (DPtr, DPtr, DPtr),
        dqkv: DPtr,
        rope: Option<((DPtr, DPtr), usize)>,
        n: usize,
        (nh, nkv, hd): (usize, usize, usize),
        accumulate: bool,
    ) -> Result<()> {
        let (c, kvd) = (nh * hd, nkv * hd);
        let work = Work::bytes(self.x(3 * n * c) + (1.0 + accumulate as u8 as f64) * self.x(n * (c + 2 * kvd)));
        let grid = elementwise(self, n * (nh + 2 * nkv) * hd / 2);
        let tail = [i32_of(nh), i32_of(nkv), i32_of(hd), Arg::I32(accumulate as i32)];
        match rope {
            None => {
                let args = [&[dq.into(), dk.into(), dv.into(), dqkv.into(), i32_of(n)][..], &tail].concat();
                self.launch("unpack_dqkv", grid, 256, &args, work)
            }
            Some(((cos, sin), t)) => {
                let args = [
                    &[dq.into(), dk.into(), dv.into(), dqkv.into(), cos.into(), sin.into(), i32_of(n), i32_of(t)][..],
                    &tail,
                ]
                .concat();
                self.launch("unpack_rope_dqkv", grid, 256, &args, work)
            }
        }
    }
}
