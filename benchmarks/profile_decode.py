"""Kernel list of one qoq decode step of a Llama-3-8B-shaped model (few layers: the same kernels and
shapes as the full depth), per batch size: what a decode step spends its time on.

    python benchmarks/profile_decode.py --layers 2 --batches 16 64 --out $OUT/profile.txt
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_llm import LLAMA3_8B, build_model, make_cache  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batches", type=int, nargs="+", default=[16, 64])
    p.add_argument("--prompt", type=int, default=1024)
    p.add_argument("--gen", type=int, default=256)
    p.add_argument("--recipe", default="qoq")
    p.add_argument("--mode", default="default", help="Inductor mode; default: no CUDA graphs, so kernels are listed one by one")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    model = build_model(LLAMA3_8B, a.layers, "cuda", torch.bfloat16)
    fwd = torch.compile(model.forward, backend="qoq", fullgraph=True,
                        options={"recipe": a.recipe, "mode": a.mode, "release_fp_weights": True, "release_fp_cache": True})
    lines = []
    for batch in a.batches:
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
        averages = prof.key_averages()
        table = averages.table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=70)
        # Kernels only (no runtime-API rows): per step, their count and summed time. Under CUDA graphs
        # a step costs about this sum plus a launch gap per kernel.
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        kernel_us = sum(e.time_range.elapsed_us() for e in kernels) / 5
        table = f"per step: {len(kernels) / 5:.0f} kernels, {kernel_us:.1f} us of kernel time\n" + table
        import qcompile

        rep = qcompile.report(model)
        graphs = [(g.graph_id, dict(g.qoq_ops)) for g in rep.graphs]
        reasons = sorted({layer.reason for layer in rep.layers if not layer.quantized})
        lines.append(f"== batch {batch}, {a.layers} layers, 5 steps ==\ngraphs (id, qoq ops): {graphs}\n"
                     f"FP reasons: {reasons}\n{table}")
        print(lines[-1], flush=True)
        del cache
    if a.out:
        with open(a.out, "w") as f:
            f.write("\n".join(lines))


if __name__ == "__main__":
    main()
