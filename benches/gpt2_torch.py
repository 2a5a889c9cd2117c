#!/usr/bin/env python3
"""Time a PyTorch GPT-2 (124M) training step: the reference for `finch train` on the same GPU.

The model is nanoGPT's, written out here so the script needs only PyTorch and the standard
library (no network, no checkpoint): 12 layers, 12 heads, width 768, context 1024, vocabulary
50257 padded to 50304, token embedding tied to the output layer, GELU (tanh), LayerNorm with bias,
causal scaled_dot_product_attention, random init as nanoGPT does it.

One step = --grad-accum micro-batches of forward + backward under bf16 autocast (weights, grads
and optimizer state stay fp32), then global-norm clipping to 1.0 and AdamW (fused on CUDA;
lr 6e-4, betas 0.9/0.95, eps 1e-8, weight decay 0.1 on 2-D tensors only, as finch does).
Tokens are random (seeded) and already on the device: data loading is not timed. Each timed
step is bracketed by device synchronisations, so ms/step is wall time including CPU overhead.

MFU uses nanoGPT's estimate_mfu (PaLM appendix B):
  FLOPs/token = 6*N + 12*L*C*T,  N = parameters excluding the position embedding (wpe),
  with T the sequence length actually trained on (nanoGPT uses block_size; equal by default).
llm.c's variant, 6*N_all + 6*L*C*T (attention halved for the causal mask, N counting every
parameter), is printed beside it.
"""

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

GPT2_VOCAB = 50257  # real token ids; the padded rows of wte are never looked up


@dataclass
class GPTConfig:
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    vocab_size: int = 50304
    context_length: int = 1024


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)

    def forward(self, x):
        b, t, c = x.size()
        q, k, v = self.c_attn(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(b, t, c))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = MLP(cfg)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.context_length, cfg.n_embd)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.wte.weight = self.lm_head.weight  # tied: one tensor, counted and updated once
        self.apply(self._init_weights)
        # GPT-2's scaled init of the projections that write into the residual stream.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, idx, targets):
        t = idx.size(1)
        pos = torch.arange(t, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        # Under autocast cross_entropy runs in fp32 on the bf16 logits.
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def parse_args():
    p = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="""examples:
  python3 benches/gpt2_torch.py                             # B=16, T=1024, torch.compile
  python3 benches/gpt2_torch.py --no-compile --json         # eager PyTorch, one JSON object
  python3 benches/gpt2_torch.py --batch-size 4 --seq-len 64 # finch's small CPU-bench shape
  python3 benches/gpt2_torch.py --device cpu --quick --no-compile  # smoke test""",
    )
    p.add_argument("--device", default="cuda", help="torch device (default: cuda)")
    p.add_argument("--quick", action="store_true",
                   help="tiny model and batch, few steps: proves the script runs, "
                        "numbers mean nothing")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object on stdout (progress goes to stderr)")
    p.add_argument("--batch-size", type=int, default=None, metavar="B",
                   help="sequences per micro-batch, as finch's --batch-size "
                        "(default: 16; finch's is 4)")
    p.add_argument("--seq-len", type=int, default=None, metavar="T",
                   help="tokens per sequence, as finch's --seq-len "
                        "(default: 1024, the context length)")
    p.add_argument("--grad-accum", type=int, default=1, metavar="K",
                   help="micro-batches per optimizer step, as finch's --grad-accum (default: 1)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default: 20)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed steps first; the first one compiles (default: 5)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (default: on for CUDA, off otherwise)")
    p.add_argument("--peak-tflops", type=float, default=989.0,
                   help="peak dense bf16 TFLOP/s that MFU divides by (default: 989, H100 SXM and "
                        "H200; H100 PCIe: 756; A100: 312)")
    p.add_argument("--lr", type=float, default=6e-4)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--n-layer", type=int, default=None, help="default: 12")
    p.add_argument("--n-head", type=int, default=None, help="default: 12")
    p.add_argument("--n-embd", type=int, default=None, help="default: 768")
    p.add_argument("--vocab-size", type=int, default=None, help="default: 50304 (50257 padded)")
    p.add_argument("--context-length", type=int, default=None,
                   help="rows of the position embedding (default: 1024)")
    p.add_argument("--seed", type=int, default=1337)
    a = p.parse_args()
    q = a.quick
    # --quick only changes what was not given explicitly.
    defaults = dict(batch_size=(2, 16), seq_len=(64, 1024), steps=(3, 20), warmup=(1, 5),
                    n_layer=(2, 12), n_head=(4, 12), n_embd=(128, 768), vocab_size=(512, 50304),
                    context_length=(64, 1024))
    for key, (quick_value, full_value) in defaults.items():
        if getattr(a, key) is None:
            setattr(a, key, quick_value if q else full_value)
    return a


def resolve_device(name):
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit(f"error: --device {name} requested but CUDA is not available "
                 f"(torch {torch.__version__}, built for CUDA {torch.version.cuda})")
    return device


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main():
    args = parse_args()
    device = resolve_device(args.device)
    use_compile = args.compile if args.compile is not None else device.type == "cuda"
    cfg = GPTConfig(args.n_layer, args.n_head, args.n_embd, args.vocab_size, args.context_length)
    b, t, accum = args.batch_size, args.seq_len, args.grad_accum
    if cfg.n_embd % cfg.n_head:
        sys.exit(f"error: --n-embd {cfg.n_embd} is not a multiple of --n-head {cfg.n_head}")
    if min(b, t, accum, args.steps) < 1 or args.warmup < 0:
        sys.exit("error: --batch-size, --seq-len, --grad-accum and --steps must be >= 1")
    if t > cfg.context_length:
        sys.exit(f"error: --seq-len {t} exceeds --context-length {cfg.context_length}")
    log = sys.stderr if args.json else sys.stdout

    torch.manual_seed(args.seed)
    # Only fp32 matmuls outside autocast are affected (none on the hot path); nanoGPT sets it too.
    torch.set_float32_matmul_precision("high")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    model = GPT(cfg).to(device)
    params = list(model.parameters())  # the tied tensor appears once
    n_all = sum(p.numel() for p in params)
    n_no_wpe = n_all - model.wpe.weight.numel()
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), eps=1e-8, **({"fused": True} if fused else {}))
    step_model = torch.compile(model) if use_compile else model

    # A pool of distinct random micro-batches, rotated; the values do not change the arithmetic.
    gen = torch.Generator().manual_seed(args.seed)
    n_pool = min((args.warmup + args.steps) * accum, 64)
    high = min(GPT2_VOCAB, cfg.vocab_size)
    pool = [(torch.randint(0, high, (b, t), generator=gen).to(device),
             torch.randint(0, high, (b, t), generator=gen).to(device)) for _ in range(n_pool)]

    def train_step(first):
        loss_sum = torch.zeros((), device=device)
        for i in range(accum):
            x, y = pool[(first + i) % n_pool]
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
                loss = step_model(x, y)
            (loss / accum).backward()
            loss_sum += loss.detach()
        norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss_sum / accum, norm

    tokens_per_step = b * t * accum
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"cpu ({torch.get_num_threads()} threads)"
    print(f"# {dev_name}, torch {torch.__version__} (CUDA {torch.version.cuda})\n"
          f"# GPT-2: L={cfg.n_layer} H={cfg.n_head} C={cfg.n_embd} V={cfg.vocab_size} "
          f"ctx={cfg.context_length}; {n_all:,} parameters ({n_no_wpe:,} without wpe)\n"
          f"# step: B={b} T={t} grad_accum={accum} ({tokens_per_step:,} tokens), bf16 autocast, "
          f"AdamW{' (fused)' if fused else ''} lr {args.lr:g} wd {args.weight_decay:g} on 2-D, "
          f"clip {args.grad_clip:g}, torch.compile {'on' if use_compile else 'off'}",
          file=log, flush=True)

    step_ms, losses = [], []
    for step in range(args.warmup + args.steps):
        sync(device)
        t0 = time.perf_counter()
        loss, norm = train_step(step * accum)
        sync(device)
        ms = (time.perf_counter() - t0) * 1e3
        loss, norm = loss.item(), norm.item()
        warm = step < args.warmup
        if not warm:
            step_ms.append(ms)
            losses.append(loss)
        print(f"step {step}: {ms:.1f} ms, loss {loss:.4f}, grad norm {norm:.3f}"
              f"{' (warm-up)' if warm else ''}", file=log, flush=True)

    ms = statistics.median(step_ms)
    tok_s = tokens_per_step / (ms / 1e3)
    L, C = cfg.n_layer, cfg.n_embd
    flops_tok = 6 * n_no_wpe + 12 * L * C * t           # nanoGPT estimate_mfu
    flops_tok_llmc = 6 * n_all + 6 * L * C * t          # llm.c gpt2_estimate_mfu
    tflops = flops_tok * tok_s / 1e12
    tflops_llmc = flops_tok_llmc * tok_s / 1e12
    mem = None
    if device.type == "cuda":
        mem = (torch.cuda.max_memory_allocated(device) / 2**30,
               torch.cuda.max_memory_reserved(device) / 2**30)

    if args.json:
        print(json.dumps({
            "device": dev_name, "torch": torch.__version__, "cuda": torch.version.cuda,
            "model": asdict(cfg), "params": n_all, "params_no_wpe": n_no_wpe,
            "batch_size": b, "seq_len": t, "grad_accum": accum, "tokens_per_step": tokens_per_step,
            "compile": use_compile, "fused_adamw": fused, "warmup": args.warmup,
            "steps": args.steps, "step_ms": step_ms, "ms_per_step": ms, "tokens_per_s": tok_s,
            "flops_per_token": flops_tok, "achieved_tflops": tflops,
            "peak_tflops": args.peak_tflops, "mfu": tflops / args.peak_tflops,
            "flops_per_token_llmc": flops_tok_llmc, "mfu_llmc": tflops_llmc / args.peak_tflops,
            "peak_mem_allocated_gib": mem and mem[0], "peak_mem_reserved_gib": mem and mem[1],
            "final_loss": losses[-1],
        }))
        return
    print(f"median of {len(step_ms)} steps: {ms:.2f} ms/step "
          f"(min {min(step_ms):.2f}, max {max(step_ms):.2f}), {tok_s:,.0f} tokens/s")
    print(f"MFU {100 * tflops / args.peak_tflops:.3g}% = {tflops:.4g} / "
          f"{args.peak_tflops:g} TFLOP/s"
          f"  [nanoGPT: 6*N + 12*L*C*T = {flops_tok:,} FLOPs/token, N = params without wpe]")
    print(f"MFU {100 * tflops_llmc / args.peak_tflops:.3g}% = {tflops_llmc:.4g} / "
          f"{args.peak_tflops:g} TFLOP/s  [llm.c: 6*N + 6*L*C*T = {flops_tok_llmc:,} FLOPs/token, "
          f"N = all params]")
    if mem:
        print(f"peak GPU memory: {mem[0]:.2f} GiB allocated, {mem[1]:.2f} GiB reserved")
    else:
        print("peak GPU memory: n/a (not a CUDA device)")


if __name__ == "__main__":
    main()
