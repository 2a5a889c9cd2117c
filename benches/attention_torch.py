#!/usr/bin/env python3
"""Time PyTorch's causal scaled_dot_product_attention, forward and backward, per SDPA backend.

The reference against which finch's fused attention kernels (kernels/attention.cu) are compared on
the same GPU in the same session. Needs only PyTorch and the standard library; no network.

Shapes follow the FlashAttention benchmark convention (flash-attention/benchmarks):
  * a fixed 16k tokens per batch: batch = tokens // seq_len,
  * a fixed total hidden width of 2048: heads = 2048 // head_dim (32 heads at hd 64, 16 at hd 128).
FLOPs are counted as FlashAttention counts them:
  forward  = 4 * B * H * N^2 * d, halved because the mask is causal,
  backward = 2.5 * forward (the recomputation of P in the backward is not counted).
"""

import argparse
import json
import math
import statistics
import sys
import time
import warnings

import torch
import torch.nn.functional as F

try:
    from torch.nn.attention import SDPBackend, sdpa_kernel
except ImportError:  # PyTorch < 2.3
    sys.exit("error: this PyTorch has no torch.nn.attention.sdpa_kernel (needs PyTorch >= 2.3)")

# CUDNN_ATTENTION appeared later than the others; a missing one is reported as skipped.
BACKENDS = {
    "flash": getattr(SDPBackend, "FLASH_ATTENTION", None),
    "efficient": getattr(SDPBackend, "EFFICIENT_ATTENTION", None),
    "cudnn": getattr(SDPBackend, "CUDNN_ATTENTION", None),
    "math": getattr(SDPBackend, "MATH", None),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args():
    p = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="""examples:
  python3 benches/attention_torch.py                       # full sweep on the GPU
  python3 benches/attention_torch.py --json > attn.jsonl   # one JSON object per row
  python3 benches/attention_torch.py --device cpu --quick  # smoke test, tiny shapes""",
    )
    p.add_argument("--device", default="cuda", help="torch device (default: cuda)")
    p.add_argument("--quick", action="store_true",
                   help="tiny shapes and few repeats: proves the script runs, numbers mean nothing")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object per row on stdout instead of the table")
    p.add_argument("--head-dims", type=int, nargs="+", default=None, metavar="D",
                   help="head dims (default: 64 128)")
    p.add_argument("--seq-lens", type=int, nargs="+", default=None, metavar="N",
                   help="sequence lengths (default: 512 1024 2048 4096 8192)")
    p.add_argument("--tokens", type=int, default=None,
                   help="tokens per batch; batch = tokens // seq_len (default: 16384)")
    p.add_argument("--hidden", type=int, default=None,
                   help="total width; heads = hidden // head_dim (default: 2048)")
    p.add_argument("--backends", nargs="+", default=["flash", "efficient", "cudnn"],
                   choices=list(BACKENDS),
                   help="SDPA backends to force in turn; one that cannot run is reported as "
                        "skipped (default: flash efficient cudnn)")
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16", help="default: bf16")
    p.add_argument("--layout", choices=["bhnd", "packed"], default="bhnd",
                   help="bhnd: contiguous (B, H, N, d) q/k/v, the kernels alone (default). "
                        "packed: strided views of one (B, N, 3, H, d) qkv buffer, as a GPT-2 "
                        "layer (nanoGPT, finch) feeds attention; includes any copies SDPA makes")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed calls per measurement (default: 10)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed calls per measurement (default: 50)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    quick = a.quick
    # --quick only changes what was not given explicitly.
    a.head_dims = a.head_dims or ([32, 64] if quick else [64, 128])
    a.seq_lens = a.seq_lens or ([64, 128] if quick else [512, 1024, 2048, 4096, 8192])
    a.tokens = a.tokens or (256 if quick else 16384)
    a.hidden = a.hidden or (128 if quick else 2048)
    a.warmup = a.warmup if a.warmup is not None else (1 if quick else 10)
    a.repeats = a.repeats if a.repeats is not None else (3 if quick else 50)
    if a.repeats < 1 or a.warmup < 0:
        p.error("--repeats must be >= 1 and --warmup >= 0")
    return a


def resolve_device(name):
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit(f"error: --device {name} requested but CUDA is not available "
                 f"(torch {torch.__version__}, built for CUDA {torch.version.cuda})")
    return device


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def make_inputs(b, h, n, d, dtype, device, layout, gen):
    """One set of q, k, v (leaves requiring grad, as in training) and an output gradient."""
    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device, dtype=dtype)

    if layout == "packed":
        qkv = randn(b, n, 3, h, d)
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # (B, H, N, d), strided
    else:
        q, k, v = randn(b, h, n, d), randn(b, h, n, d), randn(b, h, n, d)
    for t in (q, k, v):
        t.requires_grad_(True)
    return q, k, v, randn(b, h, n, d)


def pool_size(set_bytes, device, repeats):
    """How many input sets to rotate through so that consecutive calls never find their inputs in
    cache: enough that the pool is several times the last-level cache (H100/H200: 50 MB of L2)."""
    cache = 32 << 20
    if device.type == "cuda":
        cache = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20)
    return max(2, min(16, repeats, math.ceil(4 * cache / set_bytes)))


def head_start(device):
    """Queue ~tens of ms of GPU work before a timed loop. The CPU then runs ahead of the GPU, so
    every timed call is already queued when the GPU reaches its start event, and the events bracket
    kernel time rather than Python/launch overhead (which matters for the sub-0.1 ms shapes)."""
    if device.type == "cuda":
        a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
        for _ in range(20):
            a @ a


def time_calls(device, count, prepare, timed):
    """Milliseconds of `timed(prepare(i))` for i < count. prepare's work is queued before the start
    mark and is not counted. On CUDA: events, one synchronisation at the end."""
    if device.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(count)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(count)]
        head_start(device)
        for i in range(count):
            state = prepare(i)
            starts[i].record()
            timed(state)
            ends[i].record()
        torch.cuda.synchronize(device)
        return [s.elapsed_time(e) for s, e in zip(starts, ends)]
    times = []
    for i in range(count):
        state = prepare(i)
        t0 = time.perf_counter()
        timed(state)
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def probe(backend, q, k, v, do):
    """Run forward and backward once under the forced backend. Returns None if it works, else why
    not: PyTorch raises a generic error and gives the per-backend reasons as warnings."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with sdpa_kernel(backend):
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
                torch.autograd.grad(out, (q, k, v), do)
            return None
        except RuntimeError as e:
            # The first warning is often only a heading ("... kernel not used because:").
            reasons = list(dict.fromkeys(str(w.message).strip() for w in caught))
            return " ".join(reasons or [str(e)]).replace("\n", " ")[:200]


def bench_row(args, device, dtype, hd, n, backend_name):
    b, h = args.tokens // n, args.hidden // hd
    fwd_flops = 4 * b * h * n * n * hd / 2  # causal: half the score matrix
    bwd_flops = 2.5 * fwd_flops
    row = {
        "shape": {"batch": b, "heads": h, "seq_len": n, "head_dim": hd, "hidden": h * hd,
                  "causal": True, "dtype": args.dtype, "layout": args.layout},
        "backend": backend_name, "status": "ok",
        "fwd_ms": None, "fwd_tflops": None, "bwd_ms": None, "bwd_tflops": None,
        "fwd_ms_min": None, "bwd_ms_min": None, "repeats": args.repeats,
        "device": device_name(device), "torch": torch.__version__, "cuda": torch.version.cuda,
    }
    backend = BACKENDS[backend_name]
    if backend is None:
        row["status"] = "skipped: not in this PyTorch"
        return row

    gen = torch.Generator(device=device).manual_seed(args.seed)
    set_bytes = 4 * b * h * n * hd * torch.finfo(dtype).bits // 8
    try:
        pool = [make_inputs(b, h, n, hd, dtype, device, args.layout, gen)
                for _ in range(pool_size(set_bytes, device, args.repeats))]
        why_not = probe(backend, *pool[0])
        if why_not:
            row["status"] = f"skipped: {why_not}"
            return row

        def fwd_prepare(i):
            return pool[i % len(pool)]

        def fwd(s):
            F.scaled_dot_product_attention(s[0], s[1], s[2], is_causal=True)

        # The backward is timed alone: its forward (which saves what the backward needs) is queued
        # before the start mark.
        def bwd_prepare(i):
            q, k, v, do = pool[i % len(pool)]
            return F.scaled_dot_product_attention(q, k, v, is_causal=True), q, k, v, do

        def bwd(s):
            out, q, k, v, do = s
            torch.autograd.grad(out, (q, k, v), do)

        # The forced backend must also cover the backward, which dispatches on the forward's op.
        with sdpa_kernel(backend):
            time_calls(device, args.warmup, fwd_prepare, fwd)
            fwd_ms = time_calls(device, args.repeats, fwd_prepare, fwd)
            time_calls(device, args.warmup, bwd_prepare, bwd)
            bwd_ms = time_calls(device, args.repeats, bwd_prepare, bwd)
    except RuntimeError as e:  # includes torch.OutOfMemoryError
        row["status"] = f"skipped: {str(e).splitlines()[0][:160]}"
        return row
    finally:
        pool = None
        if device.type == "cuda":
            torch.cuda.empty_cache()

    f, bk = statistics.median(fwd_ms), statistics.median(bwd_ms)
    row.update(fwd_ms=f, fwd_tflops=fwd_flops / (f * 1e-3) / 1e12, fwd_ms_min=min(fwd_ms),
               bwd_ms=bk, bwd_tflops=bwd_flops / (bk * 1e-3) / 1e12, bwd_ms_min=min(bwd_ms))
    return row


def main():
    args = parse_args()
    device = resolve_device(args.device)
    dtype = DTYPES[args.dtype]
    torch.manual_seed(args.seed)

    info = (f"# {device_name(device)}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
            f"{args.dtype}, causal, layout {args.layout}\n"
            f"# shapes: {args.tokens} tokens per batch (B = {args.tokens} // N), hidden "
            f"{args.hidden} (H = {args.hidden} // hd)\n"
            f"# FLOPs: fwd = 4*B*H*N^2*d / 2 (causal), bwd = 2.5 * fwd;  times: median of "
            f"{args.repeats} after {args.warmup} warm-up, inputs rotated")
    print(info, file=sys.stderr if args.json else sys.stdout, flush=True)
    header = (f"{'hd':>4} {'N':>6} {'B':>4} {'H':>4}  {'backend':<10}"
              f"{'fwd ms':>9} {'TFLOP/s':>8} {'bwd ms':>9} {'TFLOP/s':>8}")
    if not args.json:
        print(header)

    for hd in args.head_dims:
        for n in args.seq_lens:
            if args.tokens // n < 1 or args.hidden // hd < 1:
                print(f"# skipping hd={hd} N={n}: fewer than one sequence or head", file=sys.stderr)
                continue
            for name in args.backends:
                row = bench_row(args, device, dtype, hd, n, name)
                if args.json:
                    print(json.dumps(row), flush=True)
                    continue
                s = row["shape"]
                lead = f"{hd:>4} {n:>6} {s['batch']:>4} {s['heads']:>4}  {name:<10}"
                if row["status"] == "ok":
                    print(f"{lead}{row['fwd_ms']:>9.3f} {row['fwd_tflops']:>8.4g}"
                          f"{row['bwd_ms']:>10.3f} {row['bwd_tflops']:>8.4g}", flush=True)
                else:
                    print(f"{lead}  {row['status']}", flush=True)


if __name__ == "__main__":
    main()
