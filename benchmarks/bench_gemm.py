"""W4A8 GEMM vs its peers at Llama-3-8B shapes: cuBLAS bf16, torch._int_mm (W8A8), torch._scaled_mm
fp8, tinygemm int4 (`_weight_int4pack_mm`, torchao's int4 weight-only kernel) and a plain Triton
int8 GEMM; gemlite where installed. Prints a table, writes JSON. Run on a GPU:

    python benchmarks/bench_gemm.py --out bench_gemm.json
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import triton
import triton.language as tl

from lowering.activation_quant import quantize_act_int8
from lowering.w4a8_gemm import w4a8_gemm_triton
from passes.quantize import quantize_per_channel, quantize_progressive

SHAPES = [(4096, 4096), (6144, 4096), (14336, 4096), (4096, 14336)]  # (N, K) of Llama-3-8B
MS = [1, 16, 64, 256, 1024, 4096]


@triton.jit
def _int8_gemm_kernel(a_ptr, b_ptr, c_ptr, M, N, K, sam, sbn, scm,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    # The comparison kernel: a plain int8 x int8 -> int32 tl.dot GEMM (B given as [N, K]).
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * num_pid_n)
    first_m = group * GROUP_M
    size_m = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_pid_n)) % size_m
    pid_n = (pid % (GROUP_M * num_pid_n)) // size_m
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(a_ptr + rm[:, None] * sam + (k0 + rk)[None, :], mask=rm[:, None] < M, other=0)
        b = tl.load(b_ptr + rn[:, None] * sbn + (k0 + rk)[None, :], mask=rn[:, None] < N, other=0)
        acc += tl.dot(a, tl.trans(b), out_dtype=tl.int32)
    tl.store(c_ptr + rm[:, None] * scm + rn[None, :], acc.to(tl.float32).to(tl.bfloat16),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


def triton_int8_gemm(a: torch.Tensor, b: torch.Tensor, cfg: dict) -> torch.Tensor:
    M, K = a.shape
    N = b.shape[0]
    c = torch.empty((M, N), dtype=torch.bfloat16, device=a.device)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
    _int8_gemm_kernel[grid](a, b, c, M, N, K, a.stride(0), b.stride(0), c.stride(0), **cfg)
    return c


INT8_CONFIGS = [
    dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=4),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4),
    dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=4),
]


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def measure_bandwidth() -> float:
    x = torch.empty(2**29, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    ms = bench(lambda: y.copy_(x))
    return 2 * x.numel() / ms / 1e9  # TB/s (read + write)


def run(out_path: str | None, shapes, ms_list, formats) -> list[dict]:
    dev = "cuda"
    torch.manual_seed(0)
    bw = measure_bandwidth()
    rows = []
    for N, K in shapes:
        w = torch.randn(N, K, device=dev, dtype=torch.bfloat16)
        qws = {"g128": quantize_progressive(w, 128), "chn": quantize_per_channel(w)}
        w8 = torch.randint(-127, 128, (N, K), device=dev, dtype=torch.int8)
        wfp8 = w.to(torch.float8_e4m3fn)
        scale_w = torch.ones(1, N, device=dev)
        tiny = None
        try:
            wq = torch.randint(0, 16, (N, K // 2), device=dev, dtype=torch.uint8)
            packed = torch.ops.aten._convert_weight_to_int4pack(wq, 8)
            sz = torch.randn(K // 128, N, 2, device=dev, dtype=torch.bfloat16)
            tiny = (packed, sz)
        except Exception as e:  # tinygemm's packing API moved between releases
            print("tinygemm unavailable:", e)
        for M in ms_list:
            x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
            x8 = torch.randint(-127, 128, (M, K), device=dev, dtype=torch.int8)
            xs = torch.rand(M, device=dev)
            xsum = x8.sum(-1, dtype=torch.int32)
            row = {"M": M, "N": N, "K": K}
            row["bf16_cublas"] = bench(lambda: x @ w.t())
            if M >= 17:
                row["int_mm"] = bench(lambda: torch._int_mm(x8, w8.t()))
            xf8 = x.to(torch.float8_e4m3fn)
            row["fp8_scaled_mm"] = bench(lambda: torch._scaled_mm(
                xf8, wfp8.t(), scale_a=torch.ones(M, 1, device=dev), scale_b=scale_w, out_dtype=torch.bfloat16))
            if tiny is not None:
                row["tinygemm_int4"] = bench(lambda: torch.ops.aten._weight_int4pack_mm(x, tiny[0], 128, tiny[1]))
            if M >= 64:
                row["triton_int8"] = min(bench(lambda c=c: triton_int8_gemm(x8, w8, c)) for c in INT8_CONFIGS)
            for name in formats:
                qw = qws[name]
                row[f"qoq_{name}"] = bench(lambda: w4a8_gemm_triton(
                    x8, xs, xsum, qw.qweight, qw.wscale, qw.gscale, qw.gzero, None, torch.bfloat16))
                row[f"qoq_{name}_with_act_quant"] = bench(lambda: w4a8_gemm_triton(
                    *quantize_act_int8(x, "triton"), qw.qweight, qw.wscale, qw.gscale, qw.gzero, None, torch.bfloat16))
            wbytes = N * K / 2 + M * K + M * N * 2
            row["roofline_mem_ms"] = wbytes / (bw * 1e12) * 1e3
            row["roofline_int8_ms"] = 2 * M * N * K / 1030e12 * 1e3  # the plain Triton int8 GEMM peak (anchor)
            rows.append(row)
            print(_fmt(row), flush=True)
    meta = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
            "triton": triton.__version__, "copy_bandwidth_TBps": bw}
    if out_path:
        with open(out_path, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print(meta)
    return rows


def _fmt(r: dict) -> str:
    base = r["bf16_cublas"]
    parts = [f"M={r['M']:5d} N={r['N']:5d} K={r['K']:5d} bf16={base:.4f}ms"]
    for k in ("qoq_g128", "qoq_chn", "int_mm", "triton_int8", "tinygemm_int4", "fp8_scaled_mm"):
        if k in r:
            parts.append(f"{k}={r[k]:.4f} ({base / r[k]:.2f}x)")
    parts.append(f"roof={max(r['roofline_mem_ms'], r['roofline_int8_ms']):.4f}")
    return " ".join(parts)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    p.add_argument("--m", type=int, nargs="*", default=MS)
    p.add_argument("--quick", action="store_true", help="first two shapes only")
    p.add_argument("--formats", nargs="*", default=["g128", "chn"])
    a = p.parse_args()
    run(a.out, SHAPES[:2] if a.quick else SHAPES, a.m, a.formats)


if __name__ == "__main__":
    main()
