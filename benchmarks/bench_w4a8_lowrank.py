"""W4A8 + low-rank (recipe w4a8-svd) GEMM at Flux shapes: the rank-32 branch in the GEMM's epilogue
vs the GEMM plus an aten branch ((X̂·L_down)·L_up and an add: what the recipe ran before v11) vs the
GEMM without a branch vs cuBLAS bf16. Checks the fused output against the reference in the run.

    pip install --no-deps -e . && python benchmarks/bench_w4a8_lowrank.py --out w4a8_lowrank.json
    TRITON_INTERPRET=1 python benchmarks/bench_w4a8_lowrank.py --smoke     # the script itself, CPU

X̂·L_down is computed once outside all timed variants (the recipe shares it across a group).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_w4a4  # noqa: E402  (bench: do_bench median on the GPU, wall clock on the CPU)
from bench_w4a4 import FLUX_LINEARS, RANK  # noqa: E402
from lowering.activation_quant import quantize_act_int8_reference  # noqa: E402
from lowering.w4a8_gemm import w4a8_gemm_reference, w4a8_gemm_triton  # noqa: E402
from passes.quantize import quantize_per_channel, quantize_progressive  # noqa: E402


def run_shape(m: int, n: int, k: int, group: int, dev: str) -> dict:
    g = torch.Generator(device="cpu").manual_seed(0)
    w = torch.randn(n, k, generator=g) / k ** 0.5
    qw = (quantize_progressive(w, group) if group > 0 else quantize_per_channel(w)).to(dev)
    x = torch.randn(m, k, generator=g).to(dev, torch.bfloat16)
    x8, sx, xsum = quantize_act_int8_reference(x)
    lr = (torch.randn(m, RANK, generator=g) / 4).to(dev, torch.bfloat16)
    l_up = (torch.randn(RANK, n, generator=g) / 4).to(dev, torch.bfloat16)
    args = (x8, sx, xsum, qw.qweight, qw.wscale, qw.gscale, qw.gzero, None, torch.bfloat16)
    fused = w4a8_gemm_triton(*args, lr_act=lr, l_up=l_up)
    want = w4a8_gemm_reference(*args, lr_act=lr, l_up=l_up)
    err = float((fused.float() - want.float()).norm() / want.float().norm())
    wb = w.to(dev, torch.bfloat16)
    times = {
        "bf16": bench_w4a4.bench(lambda: x @ wb.t()),
        "w4a8": bench_w4a4.bench(lambda: w4a8_gemm_triton(*args)),
        "w4a8_aten_branch": bench_w4a4.bench(lambda: torch.add(w4a8_gemm_triton(*args), lr @ l_up)),
        "w4a8_fused_branch": bench_w4a4.bench(lambda: w4a8_gemm_triton(*args, lr_act=lr, l_up=l_up)),
    }
    return {"M": m, "N": n, "K": k, "group": group, "rel_err_vs_reference": err,
            **{f"{key}_ms": round(v, 4) for key, v in times.items()}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--m", type=int, nargs="+", default=[4096])
    p.add_argument("--groups", type=int, nargs="+", default=[-1, 128], help="-1: per-channel weights")
    p.add_argument("--smoke", action="store_true", help="small shapes on the CPU (TRITON_INTERPRET=1)")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    dev = "cpu" if a.smoke else "cuda"
    bench_w4a4.DEVICE = dev
    shapes = [(16, 64, 256)] if a.smoke else [(n, k) for _, n, k in FLUX_LINEARS]
    rows = []
    for group in a.groups:
        for m in ([24] if a.smoke else a.m):
            for shape in shapes:
                n, k = shape[-2:]
                rows.append(run_shape(m, n, k, group, dev))
                print(rows[-1], flush=True)
    info = {"device": bench_w4a4.device_name(), "torch": torch.__version__, "date": str(datetime.date.today()),
            "rank": RANK}
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"info": info, "rows": rows}, f, indent=1)
    print(f"\n{info['device']}, {info['date']}, rank {RANK}, bf16 out; ms (x bf16)")
    print(f"{'M':>5} {'N':>6} {'K':>6} {'grp':>4} {'bf16':>8} {'w4a8':>15} {'+aten branch':>15} {'+fused branch':>15} {'err':>8}")
    for r in rows:
        b = r["bf16_ms"]
        cell = lambda key: f"{r[key]:.4f} ({b / r[key]:.2f}x)"  # noqa: E731
        print(f"{r['M']:>5} {r['N']:>6} {r['K']:>6} {r['group']:>4} {b:>8.4f} {cell('w4a8_ms'):>15} "
              f"{cell('w4a8_aten_branch_ms'):>15} {cell('w4a8_fused_branch_ms'):>15} {r['rel_err_vs_reference']:>8.1e}")


if __name__ == "__main__":
    main()
