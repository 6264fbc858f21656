"""One fused W4A4 GEMM (rank-32 branch) at a Flux shape with the tuned config, called a few times:
the program to run under Nsight Compute (ncu -k regex:w4a4_gemm --launch-skip 2 --launch-count 1).

    python benchmarks/profile_w4a4_once.py [M N K]
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from lowering.w4a4_activation_quant import triton_quantize_act  # noqa: E402
from lowering.w4a4_gemm import quantize_weight, triton_gemm, tuned_config  # noqa: E402


def main() -> None:
    m, n, k = (int(v) for v in sys.argv[1:4]) if len(sys.argv) >= 4 else (4608, 3072, 3072)
    dev = torch.device("cuda")
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    w = torch.randn(n, k, device=dev) * 0.02
    ld = (torch.randn(k, 32, device=dev) * 0.02).bfloat16()
    lu = (torch.randn(32, n, device=dev) * 0.02).bfloat16()
    wp, ws = quantize_weight(w)
    a, sa, lr = triton_quantize_act(x, None, ld)
    print("config:", tuned_config(dev, m, n, k // 64))
    for _ in range(4):
        triton_gemm(a, sa, wp, ws, lr, lu, None, torch.bfloat16)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
