#!/usr/bin/env python3
"""Writes the seed inputs of the fuzz targets into fuzz/seeds/<target>/ (run from anywhere).

Each seed starts with the target's mode byte, as its fuzz_targets/<target>.rs reads it. The
files are small and committed; rerun this after changing a target's input format. Seeds this
script does not write are inputs that fuzzing found to crash finch, kept so that the bug stays
fixed (.ci/run runs every target over every seed)."""
import json
import struct
from pathlib import Path

SEEDS = Path(__file__).resolve().parent
MAGIC = 20240520


def write(target, name, data):
    d = SEEDS / target
    d.mkdir(exist_ok=True)
    (d / name).write_bytes(data)


def llmc(version, tokens):
    width = "H" if version == 1 else "I"
    header = struct.pack("<3i", MAGIC, version, len(tokens)) + bytes(1024 - 12)
    return header + struct.pack(f"<{len(tokens)}{width}", *tokens)


vocab = struct.pack("<I", 50)
write("token_file", "llmc_u16", b"\x00" + vocab + llmc(1, [1, 2, 3, 49]))
write("token_file", "llmc_u32", b"\x00" + vocab + llmc(2, [7, 0, 49]))
write("token_file", "raw_u16", b"\x01" + vocab + struct.pack("<4H", 1, 2, 3, 4))
write("token_file", "fields", b"\x02" + vocab + struct.pack("<2i", 1, 3) + struct.pack("<3H", 5, 6, 7))

config = {"n_layer": 2, "n_head": 4, "n_embd": 32, "vocab_size": 97, "n_positions": 16,
          "layer_norm_epsilon": 1e-05, "model_type": "gpt2"}
write("model_config", "fixture", json.dumps(config, indent=2).encode())
write("model_config", "no_epsilon", json.dumps({k: v for k, v in config.items() if k != "layer_norm_epsilon"}).encode())
write("model_config", "gpt2", json.dumps(dict(config, n_layer=12, n_head=12, n_embd=768, vocab_size=50257,
                                              n_positions=1024)).encode())

# The one-layer model the targets build (fuzz_targets/common.rs: TINY): C=2, V=3, maxT=2.
C, V, T = 2, 3, 2
block = [("ln_1.weight", [C]), ("ln_1.bias", [C]), ("attn.c_attn.weight", [C, 3 * C]), ("attn.c_attn.bias", [3 * C]),
         ("attn.c_proj.weight", [C, C]), ("attn.c_proj.bias", [C]), ("ln_2.weight", [C]), ("ln_2.bias", [C]),
         ("mlp.c_fc.weight", [C, 4 * C]), ("mlp.c_fc.bias", [4 * C]), ("mlp.c_proj.weight", [4 * C, C]),
         ("mlp.c_proj.bias", [C])]
tensors = [("wte.weight", [V, C]), ("wpe.weight", [T, C])] + [(f"h.0.{n}", s) for n, s in block] + \
          [("ln_f.weight", [C]), ("ln_f.bias", [C])]


def header(tensors, metadata=None):
    h, offset = {}, 0
    if metadata:
        h["__metadata__"] = metadata
    for name, shape in sorted(tensors):
        n = 4
        for s in shape:
            n *= s
        h[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(h, separators=(",", ":")).encode()
    return text + b" " * (-len(text) % 8), offset


def file(h, size):
    return struct.pack("<Q", len(h)) + h + bytes(size)


h, size = header(tensors)
write("model_weights", "header", b"\x02" + h)
write("model_weights", "whole", b"\x00" + file(h, size))
write("model_weights", "corrupt", b"\x01" + struct.pack("<HB", 20, ord("X")))
write("model_weights", "truncate", b"\x03" + bytes([100, 0]))
fixture = Path(__file__).resolve().parents[2] / "tests/fixtures/tiny_gpt2/init"
write("model_weights", "config", b"\x04" + json.dumps(dict(config, n_layer=1, n_head=1, n_embd=2, vocab_size=3,
                                                               n_positions=2)).encode())
write("model_weights", "config_3_layers", b"\x04" + json.dumps(dict(config, n_layer=3, n_head=1, n_embd=2, vocab_size=3,
                                                                        n_positions=2)).encode())

n = 128 * C + T * C + 12 * C * C + 13 * C + 2 * C
ckpt_config = {"n_layer": 1, "n_head": 1, "n_embd": C, "vocab_size": V, "n_positions": T, "layer_norm_epsilon": 1e-5}
state = {"step": 7, "walker": {"position": 12}, "rng": {"state": 42}}
meta = {"format": "finch-checkpoint-1", "config": json.dumps(ckpt_config), "state": json.dumps(state), "adam_t": "7"}
h, size = header([("params", [n]), ("adam.m", [n]), ("adam.v", [n])], meta)
write("checkpoint", "header", b"\x02" + h)
write("checkpoint", "whole", b"\x00" + file(h, size))
write("checkpoint", "corrupt", b"\x01" + struct.pack("<HB", 30, ord("0")))
write("checkpoint", "metadata", b"\x03" + b"\xff".join(meta[k].encode() for k in ["format", "config", "state", "adam_t"]))

lines = ['{"text": "Hello world"}', '{"text": "caf\\u00e9  \\n\\n  tabs\\t\\tand\\u00a0nbsp 123 4567"}',
         '{"body": "x"}', '[1, 2]', '{"text": 5}', '{"text": "it\'s     spaced    \\r\\n  out"}', 'not json']
write("jsonl_line", "lines", b"\x05" + "\n".join(lines).encode())
write("jsonl_line", "bom", b"\x01\xef\xbb\xbf" + '{"text": "<|endoftext|> stays text"}\r\n'.encode())

log = [{"event": "start", "config": ckpt_config, "args": {"model": None, "lr": 6e-4, "lr_schedule": "cosine",
                                                          "warmup_steps": 10, "grad_accum": 2},
        "params": 338, "batch_size": 4, "seq_len": 64}]
log += [{"step": s, "loss": 5.0 / s, "grad_norm": 1.0, "lr": 6e-4, "ms": 10.0, "tok_per_s": 100.0} for s in range(1, 9)]
log[4]["val_loss"] = 2.5
log[5]["loss"] = None
text = "\n".join(json.dumps(r) for r in log) + "\n"
write("train_log", "one", b"\x00" + text.encode())
write("train_log", "smooth_log_y", b"\x43" + text.encode())
write("train_log", "two_runs", b"\x00" + (text + "\0" + text.replace('"lr": 0.0006', '"lr": 0.001')).encode())
write("train_log", "partial_last_line", b"\x00" + text.encode() + b'{"step": 9, "lo')
write("log_resume", "log", b"\x04" + text.encode() + b'{"event": "resume", "step": 4}\n{"step": 9, "lo')

# train_args.json as `finch train --out` writes it (a one-layer CPU run), and variants that reach
# the other branches: a GPT-2 preset on a GPU in bf16, and an --init run.
args = {"data": "tokens.bin", "data_format": "llmc", "val": None, "val_every": 0, "val_batches": 20, "init": None,
        "model": None, "n_layer": 1, "n_head": 2, "n_embd": 8, "vocab_size": 97, "context_length": 8,
        "seed": 1337, "batch_size": 4, "seq_len": None, "grad_accum": 1, "steps": 2, "lr": 0.0006,
        "lr_schedule": "cosine", "warmup_steps": 0, "min_lr": 0.0, "weight_decay": 0.1, "beta1": 0.9,
        "beta2": 0.95, "eps": 1e-8, "grad_clip": 1.0, "device": "cpu", "precision": None, "threads": None,
        "log": None, "save": None, "out": "runs/a", "checkpoint_every": 0, "resume": None,
        "skip_nonfinite": False}
write("train_args", "cpu", json.dumps(args, indent=2).encode())
write("train_args", "gpu_gpt2", json.dumps(dict(args, model="gpt2-medium", n_layer=None, n_head=None, n_embd=None,
                                                vocab_size=None, context_length=None, seq_len=512, grad_accum=8,
                                                device="cuda", precision="bf16", lr_schedule="linear",
                                                warmup_steps=100, threads=2, val="val.bin", val_every=50,
                                                checkpoint_every=10, skip_nonfinite=True)).encode())
write("train_args", "init", json.dumps(dict(args, init="gpt2-dir", n_layer=None, n_head=None, n_embd=None,
                                            vocab_size=None, context_length=None)).encode())
