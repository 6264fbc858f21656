"""Kernel list of one qoq decode step of a Llama-3-8B-shaped model (few layers: the same kernels and
shapes as the full depth), per batch size: what a decode step spends its time on.

    python benchmarks/profile_decode.py --layers 2 --batches 16 64 --out $OUT/profile.txt
    python benchmarks/profile_decode.py --batches 1 --variants '{"now": {}, "no split": {"inductor_config": {"split_reductions": false}}}'

The last lines are one table: per variant (qoq options each, on top of --options) and batch, the
kernel time of a layer by kind, in us per layer per step; kinds that run once a step (lm_head, the
final norm) in us per step.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_llm import LLAMA3_8B, build_model, make_cache  # noqa: E402

# Kernel name fragments -> kind, first match wins (Inductor names its kernels after the ops it fused).
KINDS = (
    ("_w4a8_gemv_kernel", "gemm"), ("_w4a8_gemm_kernel", "gemm"),
    ("_kv4_attention_merge", "attn merge"), ("_kv4_attention_kernel", "attention"),
    ("_kv4_quantize_store", "kv append"), ("kv4_cache_append", "kv append index"),
    ("kv4_cache_attention", "kv attention index"), ("silu", "silu*mul+quant"),
    ("quantize_act_int8_transpose", "o_proj input quant"), ("quantize_act_int8", "add+norm+quant"),
    ("rsqrt", "final norm"), ("sin", "rope"), ("cos", "rope"), ("Fill", "fill"), ("Memset", "memset"),
)
MATMUL = ("nvjet", "cutlass", "gemm", "gemv", "Kernel2")  # cuBLAS / CUTLASS kernels, named by tile
ONCE = "once a step: "


def kind_of(name: str, per_step: float) -> str:
    """The kind of a kernel; cuBLAS matmuls are told apart by how often they run (lm_head and the
    rotary embedding's once a step, rotate_kv's q and K rotations once a layer)."""
    kind = next((kind for frag, kind in KINDS if frag in name), None)
    if kind is None and any(m in name for m in MATMUL):
        kind = "matmul" if per_step > 1 else ONCE + "matmul (lm_head, rotary)"
    if kind == "final norm" or kind == "memset":
        kind = ONCE + kind
    return kind or "other: " + name[:40]


def profile(model, fwd, batch: int, a) -> tuple[str, dict[str, float], int]:
    """The profiler table of 5 decode steps, and us per step by kernel kind, and kernels per step."""
    cache = make_cache(model, batch, a.prompt + a.gen, a.prompt, "cuda")
    tok = torch.zeros(batch, 1, dtype=torch.long, device="cuda")

    def step(pos):
        return fwd(input_ids=tok, past_key_values=cache, use_cache=True,
                   cache_position=torch.full((1,), pos, device="cuda", dtype=torch.long),
                   position_ids=torch.full((batch, 1), pos, device="cuda", dtype=torch.long))

    with torch.no_grad():
        for i in range(3):
            step(a.prompt + i)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for i in range(5):
                step(a.prompt + 3 + i)
            torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=70)
    # Kernels only (no runtime-API rows): per step, their count and summed time. Under CUDA graphs
    # a step costs about this sum plus a launch gap per kernel.
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    calls: dict[str, int] = defaultdict(int)
    for e in kernels:
        calls[e.name] += 1
    by_kind: dict[str, float] = defaultdict(float)
    for e in kernels:
        by_kind[kind_of(e.name, calls[e.name] / 5)] += e.time_range.elapsed_us() / 5
    # the first step's kernels in launch order: what a kernel of unclear origin sits between
    first = sorted(kernels, key=lambda e: e.time_range.start)[:round(len(kernels) / 5)]
    order = "\n".join(f"  {e.time_range.elapsed_us():7.2f} us  {e.name[:110]}" for e in first)
    return table + "\nkernels of one step in launch order:\n" + order, dict(by_kind), round(len(kernels) / 5)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batches", type=int, nargs="+", default=[16, 64])
    p.add_argument("--prompt", type=int, default=1024)
    p.add_argument("--gen", type=int, default=256)
    p.add_argument("--recipe", default="qoq")
    p.add_argument("--mode", default="default", help="Inductor mode; default: no CUDA graphs, so kernels are listed one by one")
    p.add_argument("--options", default="{}", help="more qoq options as JSON")
    p.add_argument("--variants", default=None, help='JSON {"name": {qoq options}, ...}: profile each, then one table')
    p.add_argument("--out", default=None)
    a = p.parse_args()
    import qcompile

    variants = json.loads(a.variants) if a.variants else {"": {}}
    model = build_model(LLAMA3_8B, a.layers, "cuda", torch.bfloat16)
    lines, summary = [], {}
    for name, extra in variants.items():
        torch._dynamo.reset()
        # release_fp_weights stays off so that the next variant quantizes the same FP model again
        options = {"recipe": a.recipe, "mode": a.mode, **json.loads(a.options), **extra}
        fwd = torch.compile(model.forward, backend="qoq", fullgraph=True, options=options)
        for batch in a.batches:
            table, by_kind, count = profile(model, fwd, batch, a)
            summary[(name, batch)] = (by_kind, count)
            rep = qcompile.report(model)
            graphs = [(g.graph_id, dict(g.qoq_ops)) for g in rep.graphs]
            reasons = sorted({layer.reason for layer in rep.layers if not layer.quantized})
            lines.append(f"== {name + ', ' if name else ''}batch {batch}, {a.layers} layers, 5 steps, options {extra} ==\n"
                         f"graphs (id, qoq ops): {graphs}\nFP reasons: {reasons}\n"
                         f"per step: {count} kernels, {sum(by_kind.values()):.1f} us of kernel time\n{table}")
            print(lines[-1], flush=True)
    kinds = sorted({k for by_kind, _ in summary.values() for k in by_kind}, key=lambda k: (k.startswith(ONCE), k))
    head = ["variant", "batch", "kernels/step", "us/step"] + kinds
    rows = [[name or "-", str(batch), str(count), f"{sum(by_kind.values()):.1f}"]
            + [f"{by_kind.get(k, 0.0) / (1 if k.startswith(ONCE) else a.layers):.2f}" for k in kinds]
            for (name, batch), (by_kind, count) in summary.items()]
    lines.append(f"kernel time by kind, us per layer per step ({a.layers} layers; '{ONCE}...': us per step)\n"
                 + "\n".join("| " + " | ".join(r) + " |" for r in [head] + rows))
    print(lines[-1], flush=True)
    if a.out:
        with open(a.out, "w") as f:
            f.write("\n".join(lines))


if __name__ == "__main__":
    main()
