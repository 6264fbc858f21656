"""Turn a bench_gemm.py JSON into the markdown tables of BENCHMARKS.md and a target check (issue 6)."""
from __future__ import annotations

import json
import sys


def _r(r: dict, k: str) -> str:
    return f"{r[k]:.4f} ({r['bf16_cublas'] / r[k]:.2f}x)" if k in r else "-"


def table(path: str) -> str:
    data = json.load(open(path))
    meta, rows = data["meta"], data["rows"]
    cols = ["qoq_g128", "qoq_chn", "int_mm", "triton_int8", "tinygemm_int4", "fp8_scaled_mm"]
    out = [f"{meta['device']}, {meta['date']}, torch {meta['torch']}, triton {meta['triton']}, "
           f"copy bandwidth {meta['copy_bandwidth_TBps']:.2f} TB/s; {meta.get('timing', 'do_bench medians')}. "
           "Times in ms; (x) = speed-up over cuBLAS bf16; roof = max(bytes / copy bandwidth, int8 ops / 1030 TOP/s); "
           "% roof = roof / our time.", "",
           "| M | N | K | bf16 ms | " + " | ".join(cols) + " | roof ms | g128 % roof | chn % roof |",
           "|---" * (len(cols) + 7) + "|"]
    for r in rows:
        roof = max(r["roofline_mem_ms"], r["roofline_int8_ms"])
        pct = [f"{100 * roof / r[k]:.0f}%" if k in r else "-" for k in ("qoq_g128", "qoq_chn")]
        out.append(f"| {r['M']} | {r['N']} | {r['K']} | {r['bf16_cublas']:.4f} | "
                   + " | ".join(_r(r, c) for c in cols) + f" | {roof:.4f} | {pct[0]} | {pct[1]} |")
    return "\n".join(out)


def targets(path: str) -> str:
    """Issue 6's W4A8 targets, row by row: the worst ratio per M band and format."""
    rows = json.load(open(path))["rows"]
    out = ["| format | M band | vs bf16 (min) | second target | min | met |", "|---|---|---|---|---|---|"]
    for fmt in ("g128", "chn"):
        k = f"qoq_{fmt}"
        bands = [
            ("1-16", lambda m: m <= 16, 3.0, "tinygemm (≥1.3x) / % roof (≥70%)"),
            ("256-1024", lambda m: 256 <= m <= 1024, 1.3, "int_mm (≥1.0x)"),
            ("≥4096", lambda m: m >= 4096, 1.25, "plain Triton int8 (≥85%)"),
        ]
        for name, sel, want, second in bands:
            rs = [r for r in rows if sel(r["M"]) and k in r]
            if not rs:
                continue
            vs_bf16 = min(r["bf16_cublas"] / r[k] for r in rs)
            if name == "1-16":
                s1 = min(r["tinygemm_int4"] / r[k] for r in rs if "tinygemm_int4" in r)
                s2 = min(max(r["roofline_mem_ms"], r["roofline_int8_ms"]) / r[k] for r in rs)
                sec = f"{s1:.2f}x / {100 * s2:.0f}%"
                ok = vs_bf16 >= want and s1 >= 1.3 and s2 >= 0.7
            elif name == "256-1024":
                s1 = min(r["int_mm"] / r[k] for r in rs if "int_mm" in r)
                sec, ok = f"{s1:.2f}x", vs_bf16 >= want and s1 >= 1.0
            else:
                s1 = min(r["triton_int8"] / r[k] for r in rs if "triton_int8" in r)
                sec, ok = f"{100 * s1:.0f}%", vs_bf16 >= want and s1 >= 0.85
            out.append(f"| {fmt} | {name} | {vs_bf16:.2f}x (want ≥{want}x) | {second} | {sec} | {'yes' if ok else 'no'} |")
    return "\n".join(out)


if __name__ == "__main__":
    print(table(sys.argv[1]))
    print()
    print(targets(sys.argv[1]))
