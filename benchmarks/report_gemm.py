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


def _plain(r: dict, fmt: str) -> float:
    """Our time without programmatic dependent launch (the same config launched plainly)."""
    return r.get(f"qoq_{fmt}_nopdl", r[f"qoq_{fmt}"])


def small_table(path: str) -> str:
    """The M <= 16 rows (issue 6's memory-bound band), in µs, with and without PDL."""
    data = json.load(open(path))
    meta, rows = data["meta"], [r for r in data["rows"] if r["M"] <= 16]
    out = [f"{meta['device']}, {meta['date']}, torch {meta['torch']}, triton {meta['triton']}, copy bandwidth "
           f"{meta['copy_bandwidth_TBps']:.2f} TB/s; {meta.get('timing', '')}. Times in µs. Ours without PDL first, "
           "as (x cuBLAS bf16 / x tinygemm / % of roof); `PDL b2b` = the same config launched as a programmatic "
           "dependent, back to back with its own previous call; `+quant` = after the activation-quantization kernel "
           "(plain / PDL). roof = bytes / copy bandwidth; `stream` = a kernel that only reads the packed weights.", "",
           "| M | N | K | bf16 | tinygemm | int_mm (32 rows) | stream | roof | g128 | g128 PDL b2b | g128 +quant | chn "
           "| chn PDL b2b | chn +quant | x int_mm g128 / chn | kernel g128 / chn |",
           "|---" * 16 + "|"]
    for r in rows:
        roof = r["roofline_mem_ms"]
        cells = [str(r["M"]), str(r["N"]), str(r["K"]), f"{1e3 * r['bf16_cublas']:.1f}",
                 f"{1e3 * r['tinygemm_int4']:.1f}" if "tinygemm_int4" in r else "-",
                 f"{1e3 * r['int_mm']:.1f}" if "int_mm" in r else "-",
                 f"{1e3 * r['stream_read']:.1f}" if "stream_read" in r else "-", f"{1e3 * roof:.1f}"]
        kinds = []
        for fmt in ("g128", "chn"):
            if f"qoq_{fmt}" not in r:
                cells += ["-", "-", "-"]
                continue
            t = _plain(r, fmt)
            tiny = f" / {r['tinygemm_int4'] / t:.2f}x" if "tinygemm_int4" in r else ""
            cells.append(f"{1e3 * t:.1f} ({r['bf16_cublas'] / t:.2f}x{tiny} / {100 * roof / t:.0f}%)")
            cfg = r[f"qoq_{fmt}_cfg"]
            if cfg.get("PDL"):
                tp = r[f"qoq_{fmt}"]
                cells.append(f"{1e3 * tp:.1f} ({r['bf16_cublas'] / tp:.2f}x / {100 * roof / tp:.0f}%)")
                cells.append(f"{1e3 * r[f'qoq_{fmt}_with_act_quant_nopdl']:.1f} / {1e3 * r[f'qoq_{fmt}_with_act_quant']:.1f}")
            else:
                cells.append("-")
                cells.append(f"{1e3 * r[f'qoq_{fmt}_with_act_quant']:.1f}")
            kinds.append(("GEMV" if cfg.get("GEMV") else "MMA") + (f" {cfg['BLOCK_N']}x{cfg['UNROLL']}"))
        cells.append(" / ".join(f"{r['int_mm'] / _plain(r, f):.2f}x" for f in ("g128", "chn")
                                if "int_mm" in r and f"qoq_{f}" in r) or "-")
        cells.append(" / ".join(kinds))
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def small_targets(path: str) -> str:
    """Issue 6's M = 1-16 targets per format and M, worst shape, without and with PDL."""
    rows = [r for r in json.load(open(path))["rows"] if r["M"] <= 16]
    out = ["| format | M | launch | vs bf16 (min, want ≥3.0x) | vs tinygemm (min, want ≥1.3x) | % roof (min, want ≥70%) | met (shapes meeting all three) |",
           "|---|---|---|---|---|---|---|"]
    for fmt in ("g128", "chn"):
        for M in sorted({r["M"] for r in rows}):
            rs = [r for r in rows if r["M"] == M and f"qoq_{fmt}" in r]
            for name, get in (("plain", lambda r: _plain(r, fmt)), ("PDL b2b", lambda r: r[f"qoq_{fmt}"])):
                if name != "plain" and not any(r[f"qoq_{fmt}_cfg"].get("PDL") for r in rs):
                    continue
                b = min(r["bf16_cublas"] / get(r) for r in rs)
                t = min(r["tinygemm_int4"] / get(r) for r in rs if "tinygemm_int4" in r)
                p = min(r["roofline_mem_ms"] / get(r) for r in rs)
                ok = b >= 3.0 and t >= 1.3 and p >= 0.7
                each = sum(r["bf16_cublas"] / get(r) >= 3.0 and r.get("tinygemm_int4", 0) / get(r) >= 1.3
                           and r["roofline_mem_ms"] / get(r) >= 0.7 for r in rs)
                out.append(f"| {fmt} | {M} | {name} | {b:.2f}x | {t:.2f}x | {100 * p:.0f}% | "
                           f"{'yes' if ok else 'no'} ({each} of {len(rs)} shapes) |")
    return "\n".join(out)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[2] == "--small":
        print(small_table(sys.argv[1]))
        print()
        print(small_targets(sys.argv[1]))
    else:
        print(table(sys.argv[1]))
        print()
        print(targets(sys.argv[1]))
