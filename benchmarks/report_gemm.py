"""Turn a bench_gemm.py JSON into the markdown table of BENCHMARKS.md (ratios vs cuBLAS bf16)."""
from __future__ import annotations

import json
import sys


def table(path: str) -> str:
    data = json.load(open(path))
    meta, rows = data["meta"], data["rows"]
    cols = ["qoq_g128", "qoq_chn", "int_mm", "triton_int8", "tinygemm_int4", "fp8_scaled_mm"]
    out = [f"{meta['device']}, {meta['date']}, torch {meta['torch']}, triton {meta['triton']}, "
           f"copy bandwidth {meta['copy_bandwidth_TBps']:.2f} TB/s. Times in ms (median of do_bench); "
           "(x) = speed-up over cuBLAS bf16; roof = max(bytes / bandwidth, int8 ops / 1030 TOP/s).", "",
           "| M | N | K | bf16 ms | " + " | ".join(cols) + " | roof ms | qoq_g128 % of roof |",
           "|---" * (len(cols) + 6) + "|"]
    for r in rows:
        base = r["bf16_cublas"]
        cells = [f"{r[c]:.4f} ({base / r[c]:.2f}x)" if c in r else "-" for c in cols]
        roof = max(r["roofline_mem_ms"], r["roofline_int8_ms"])
        out.append(f"| {r['M']} | {r['N']} | {r['K']} | {base:.4f} | " + " | ".join(cells)
                   + f" | {roof:.4f} | {100 * roof / r['qoq_g128']:.0f}% |")
    return "\n".join(out)


if __name__ == "__main__":
    print(table(sys.argv[1]))
