"""W4A4 (SVDQuant) GEMM at Flux shapes: the rank-32 low-rank branch fused in the epilogue vs the
same GEMM without it vs cuBLAS bf16, with the activation quantization and a roofline floor.

    pip install --no-deps -e . && python benchmarks/bench_w4a4.py results/w4a4.json [--quick]

Prints a table and writes the rows as JSON. Target (issue 4): the fused branch adds at most 15%.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import time

import torch
import triton
import triton.testing

from lowering.w4a4_activation_quant import triton_quantize_act
from lowering.w4a4_gemm import (
    GPU_CONFIGS, _w4a4_gemm_kernel, _w4a4_gemm_tuned, quantize_weight, reference, triton_gemm,
)

# Flux.1 transformer linears: (name, N, K). Double-stream blocks: q/k/v/out 3072x3072, MLP
# 3072 -> 12288 -> 3072; single-stream blocks: proj_out reads attention ++ MLP (15360).
FLUX_LINEARS = [
    ("attn_qkv_out", 3072, 3072),
    ("mlp_up", 12288, 3072),
    ("mlp_down", 3072, 12288),
    ("single_proj_out", 3072, 15360),
]
TOKENS = [4608, 4096]   # 4096 image + 512 text tokens, and image only
RANK = 32
DEVICE = "cuda"         # --smoke: "cpu" under TRITON_INTERPRET=1, to check the script itself


def bench(fn, rep: int = 200) -> float:
    if DEVICE != "cuda":
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    return float(triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median"))


def device_name() -> str:
    return torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (Triton interpreter)"


def measure_ceilings() -> dict:
    """Bandwidth (device-to-device copy) and int8 MMA peak (torch._int_mm), in this run."""
    size = 1 << 30 if DEVICE == "cuda" else 1 << 20
    src = torch.empty(size, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    bw = 2 * src.numel() / (ms * 1e-3)
    n = 8192 if DEVICE == "cuda" else 256
    a = torch.randint(-128, 127, (n, n), dtype=torch.int8, device=DEVICE)
    b = torch.randint(-128, 127, (n, n), dtype=torch.int8, device=DEVICE).T
    ms = bench(lambda: torch._int_mm(a, b))
    peak = 2 * n**3 / (ms * 1e-3)
    del src, dst, a, b
    return {"bandwidth_Bps": bw, "int8_peak_ops": peak}


def check(m: int, n: int, k: int, dtype: torch.dtype) -> dict:
    """Numbers before speed: both unpack paths give the same bits, and match the reference."""
    g = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(m, k, device=DEVICE, dtype=dtype, generator=g)
    w = torch.randn(n, k, device=DEVICE, generator=g) * 0.02
    ld = (torch.randn(k, RANK, device=DEVICE, generator=g) * 0.02).to(dtype)
    lu = (torch.randn(RANK, n, device=DEVICE, generator=g) * 0.02).to(dtype)
    bias = torch.randn(n, device=DEVICE, generator=g).to(dtype)
    wp, ws = quantize_weight(w)
    a, sa, lr = triton_quantize_act(x, None, ld)
    # The inline-PTX unpack exists on the GPU only; elsewhere both paths are the pure-Triton one.
    y_asm = triton_gemm(a, sa, wp, ws, lr, lu, bias, dtype, unpack_asm=DEVICE == "cuda")
    y_tri = triton_gemm(a, sa, wp, ws, lr, lu, bias, dtype, unpack_asm=False)
    y_i2f = triton_gemm(a, sa, wp, ws, lr, lu, bias, dtype, magic_i2f=False)
    y_ref = reference(a, sa, wp, ws, lr, lu, bias, dtype)
    y_fp = x.float() @ w.T + (x.float() @ ld.float()) @ lu.float() + bias.float()
    rel = lambda u, v: float((u.float() - v.float()).norm() / v.float().norm())  # noqa: E731
    out = {"asm_eq_triton": bool(torch.equal(y_asm, y_tri)),
           "magic_eq_i2f": bool(torch.equal(y_asm, y_i2f)),
           "rel_err_vs_reference": rel(y_asm, y_ref), "rel_err_vs_fp": rel(y_asm, y_fp)}
    if not (out["asm_eq_triton"] and out["magic_eq_i2f"]) or out["rel_err_vs_reference"] > 1e-2:
        raise SystemExit(f"W4A4 kernel disagrees at {m}x{n}x{k}: {out}")
    return out


def run_shape(m: int, n: int, k: int, dtype: torch.dtype, ceil: dict
              ) -> tuple[list[dict], dict]:
    x = torch.randn(m, k, device=DEVICE, dtype=dtype)
    w = torch.randn(n, k, device=DEVICE) * 0.02
    w16 = w.to(dtype)
    ld = (torch.randn(k, RANK, device=DEVICE) * 0.02).to(dtype)
    lu = (torch.randn(RANK, n, device=DEVICE) * 0.02).to(dtype)
    bias = torch.randn(n, device=DEVICE).to(dtype)
    wp, ws = quantize_weight(w)
    a, sa, lr = triton_quantize_act(x, None, ld)
    a_nolr, sa_nolr, _ = triton_quantize_act(x, None, None)

    def naive_branch():
        q, s, _ = triton_quantize_act(x, None, None)
        y = triton_gemm(q, s, wp, ws, None, None, bias, dtype)
        return y + (x @ ld) @ lu

    x8 = torch.randint(-128, 127, (m, k), dtype=torch.int8, device=DEVICE)
    w8 = torch.randint(-128, 127, (n, k), dtype=torch.int8, device=DEVICE)
    times = {
        "cublas_bf16": bench(lambda: torch.mm(x, w16.T)),
        "int_mm_int8": bench(lambda: torch._int_mm(x8, w8.T)),
        "w4a4_gemm": bench(lambda: triton_gemm(a_nolr, sa_nolr, wp, ws, None, None, bias, dtype)),
        "w4a4_gemm_lr_fused": bench(lambda: triton_gemm(a, sa, wp, ws, lr, lu, bias, dtype)),
        "w4a4_gemm_pure_triton_unpack": bench(
            lambda: triton_gemm(a, sa, wp, ws, lr, lu, bias, dtype, unpack_asm=False)),
        "w4a4_gemm_i2f_convert": bench(
            lambda: triton_gemm(a, sa, wp, ws, lr, lu, bias, dtype, magic_i2f=False)),
        "quant_act": bench(lambda: triton_quantize_act(x, None, None)),
        "quant_act_lr_fused": bench(lambda: triton_quantize_act(x, None, ld)),
    }
    times["linear_no_branch"] = bench(
        lambda: triton_gemm(*triton_quantize_act(x, None, None)[:2], wp, ws, None, None, bias, dtype))

    def fused_linear():
        q, s, r = triton_quantize_act(x, None, ld)
        return triton_gemm(q, s, wp, ws, r, lu, bias, dtype)

    times["linear_lr_fused"] = bench(fused_linear)
    times["linear_lr_unfused"] = bench(naive_branch)

    g = k // 64
    ops = 2.0 * m * n * k
    gemm_bytes = m * k // 2 + n * k // 2 + 4 * m * g + 2 * n * g + 2 * m * n
    lr_bytes = 2 * (m * RANK + RANK * n)
    quant_bytes = 2 * m * k + m * k // 2 + 4 * m * g
    floors = {
        "w4a4_gemm": max(gemm_bytes / ceil["bandwidth_Bps"], ops / ceil["int8_peak_ops"]) * 1e3,
        "w4a4_gemm_lr_fused": max((gemm_bytes + lr_bytes) / ceil["bandwidth_Bps"],
                                  ops / ceil["int8_peak_ops"]) * 1e3,
        "quant_act": quant_bytes / ceil["bandwidth_Bps"] * 1e3,
        "quant_act_lr_fused": (quant_bytes + 2 * m * RANK) / ceil["bandwidth_Bps"] * 1e3,
    }
    floors["linear_no_branch"] = floors["w4a4_gemm"] + floors["quant_act"]
    floors["linear_lr_fused"] = floors["w4a4_gemm_lr_fused"] + floors["quant_act_lr_fused"]
    rows = []
    for name, ms in times.items():
        rows.append({
            "name": name, "M": m, "N": n, "K": k, "dtype": str(dtype).removeprefix("torch."),
            "ms": ms, "TOPS": ops / (ms * 1e-3) / 1e12 if not name.startswith("quant") else None,
            "vs_cublas_bf16": times["cublas_bf16"] / ms,
            "floor_ms": floors.get(name),
        })
    summary = {
        "M": m, "N": n, "K": k,
        "gemm_branch_overhead": times["w4a4_gemm_lr_fused"] / times["w4a4_gemm"] - 1,
        "linear_branch_overhead_fused": times["linear_lr_fused"] / times["linear_no_branch"] - 1,
        "linear_branch_overhead_unfused": times["linear_lr_unfused"] / times["linear_no_branch"] - 1,
        "asm_unpack_speedup": times["w4a4_gemm_pure_triton_unpack"] / times["w4a4_gemm_lr_fused"],
        "magic_i2f_speedup": times["w4a4_gemm_i2f_convert"] / times["w4a4_gemm_lr_fused"],
    }
    return rows, summary


def sweep_shape(m: int, n: int, k: int, dtype: torch.dtype) -> dict:
    """Every tile config of GPU_CONFIGS with no branch and with the branch in each LR_MODE, in one
    run: where the branch's time goes (a different tile choice, or the epilogue itself), and
    which (config, mode) is fastest. Also the autotuner's own picks and the kernels' register
    use and spills (as compiled on this device)."""
    x = torch.randn(m, k, device=DEVICE, dtype=dtype)
    w = torch.randn(n, k, device=DEVICE) * 0.02
    ld = (torch.randn(k, RANK, device=DEVICE) * 0.02).to(dtype)
    lu = (torch.randn(RANK, n, device=DEVICE) * 0.02).to(dtype)
    bias = torch.randn(n, device=DEVICE).to(dtype)
    wp, ws = quantize_weight(w)
    a, sa, lr = triton_quantize_act(x, None, ld)
    y_ref = triton_gemm(a, sa, wp, ws, lr, lu, bias, torch.float32, config=_smallest_config())
    rows = []
    for c in GPU_CONFIGS:
        if c.kwargs["BLOCK_M"] < 64:   # small-M tiles: not in the running at Flux's M
            continue
        cfg = dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
        name = "{BLOCK_M}x{BLOCK_N} w{num_warps} s{num_stages} g{GROUPS}".format(**cfg)
        row = {"config": name}
        for variant, mode in (("none", None), ("lr0", 0), ("lr2", 2)):
            # (lr1 compiles to the same registers as lr0 on sm_90; timed by the autotuned rows)
            args = (a, sa, wp, ws, lr, lu) if mode is not None else (a, sa, wp, ws, None, None)
            try:
                y = triton_gemm(*args, bias, torch.float32, config=cfg, lr_mode=mode)
                if mode is not None:
                    err = float((y - y_ref).norm() / y_ref.norm())
                    if err > 1e-4:
                        raise RuntimeError(f"disagrees with the reference config ({err:.1e})")
                row[variant] = bench(lambda: triton_gemm(*args, bias, dtype, config=cfg,
                                                         lr_mode=mode), rep=60)
            except Exception as e:  # noqa: BLE001 - a config that cannot compile here is a row
                row[variant] = None
                row[f"{variant}_error"] = f"{type(e).__name__}: {str(e)[:120]}"
        rows.append(row)
        torch.cuda.empty_cache()
    picks = {}
    for variant, mode, has_lr in (("none", 0, False), ("lr0", 0, True), ("lr1", 1, True),
                                  ("lr2", 2, True)):
        args = (a, sa, wp, ws, lr, lu) if has_lr else (a, sa, wp, ws, None, None)
        t = bench(lambda: triton_gemm(*args, bias, dtype, lr_mode=mode))
        best = getattr(_w4a4_gemm_tuned, "best_config", None)
        picks[variant] = {"ms": t, "config": str(best)}
    ok = lambda v: [r for r in rows if r.get(v) is not None]  # noqa: E731
    best = {v: min(ok(v), key=lambda r: r[v]) for v in ("none", "lr0", "lr1", "lr2") if ok(v)}
    return {"M": m, "N": n, "K": k, "rows": rows, "autotuned": picks,
            "best": {v: {"config": r["config"], "ms": r[v]} for v, r in best.items()}}


def _smallest_config() -> dict:
    return {"BLOCK_M": 64, "BLOCK_N": 64, "GROUP_M": 8, "GROUPS": 1, "num_warps": 4,
            "num_stages": 3}


def compiled_resources() -> list[dict]:
    """Registers and spills of every compiled variant of the kernel (Triton's own cache):
    whether a tile config or the branch makes ptxas spill on this device."""
    out = []
    try:
        names = _w4a4_gemm_kernel.arg_names
        for dev_cache in _w4a4_gemm_kernel.device_caches.values():
            for k in dev_cache[0].values():
                k._init_handles()
                consts = {}
                for key, v in getattr(k.src, "constants", {}).items():
                    idx = key[0] if isinstance(key, tuple) else key
                    name = names[idx] if isinstance(idx, int) and idx < len(names) else str(idx)
                    if name in ("BLOCK_M", "BLOCK_N", "GROUPS", "HAS_LR", "LR_MODE",
                                "UNPACK_ASM", "MAGIC_I2F"):
                        consts[name] = v if isinstance(v, (int, bool)) else str(v)
                out.append({**consts, "num_warps": k.metadata.num_warps,
                            "num_stages": k.metadata.num_stages, "n_regs": k.n_regs,
                            "n_spills": k.n_spills})
    except Exception as e:  # noqa: BLE001 - diagnostics only; Triton versions differ here
        out.append({"error": f"{type(e).__name__}: {str(e)[:160]}"})
    return out


def print_sweep(sw: dict) -> None:
    print(f"\nsweep M={sw['M']} N={sw['N']} K={sw['K']} (ms; lr0: into the accumulator, lr1: own "
          f"accumulator added, lr2: branch first)")
    print(f"{'config':24} {'none':>8} {'lr0':>8} {'lr1':>8} {'lr2':>8} {'+lr best':>8}")
    for r in sw["rows"]:
        vals = [r.get(v) for v in ("none", "lr0", "lr1", "lr2")]
        lrs = [v for v in vals[1:] if v is not None]
        over = f"{100 * (min(lrs) / vals[0] - 1):7.1f}%" if lrs and vals[0] else "-"
        cells = " ".join(f"{v:8.4f}" if v is not None else f"{'err':>8}" for v in vals)
        print(f"{r['config']:24} {cells} {over:>8}")
    b = sw["best"]
    if "none" in b:
        for v in ("lr0", "lr1", "lr2"):
            if v in b:
                print(f"best {v}: {b[v]['config']} {b[v]['ms']:.4f} ms, "
                      f"{100 * (b[v]['ms'] / b['none']['ms'] - 1):+.1f}% over the best no-branch "
                      f"({b['none']['config']} {b['none']['ms']:.4f} ms)")
    for v, p in sw["autotuned"].items():
        print(f"autotuned {v}: {p['ms']:.4f} ms  {p['config']}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("json_out", help="where to write the results (JSON)")
    p.add_argument("--quick", action="store_true", help="one token count, two shapes")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes on the CPU (run with TRITON_INTERPRET=1): checks the script")
    p.add_argument("--sweep", action="store_true",
                   help="also time every tile config with and without the branch (each LR_MODE)")
    args = p.parse_args(argv)
    global DEVICE
    if args.smoke:
        DEVICE = "cpu"
    elif not torch.cuda.is_available():
        raise SystemExit("bench_w4a4 needs a CUDA GPU (or --smoke with TRITON_INTERPRET=1)")
    dtype = getattr(torch, args.dtype)
    tokens = TOKENS[:1] if args.quick else TOKENS
    linears = FLUX_LINEARS[:2] if args.quick else FLUX_LINEARS
    if args.smoke:
        tokens, linears = [48], [("smoke", 96, 192)]
    ceil = measure_ceilings()
    checks = {f"{n}x{k}": check(32 if args.smoke else 256, n, k, dtype) for _, n, k in linears}
    rows, summaries = [], []
    for m in tokens:
        for lname, n, k in linears:
            r, s = run_shape(m, n, k, dtype, ceil)
            for row in r:
                row["linear"] = lname
            s["linear"] = lname
            rows += r
            summaries.append(s)
            if DEVICE == "cuda":
                torch.cuda.empty_cache()

    sweeps, resources = [], []
    if args.sweep and DEVICE == "cuda":
        for m in tokens[:1]:
            for _, n, k in linears[:2]:
                sweeps.append(sweep_shape(m, n, k, dtype))
                print_sweep(sweeps[-1])
        resources = compiled_resources()
        spilling = [r for r in resources if r.get("n_spills")]
        print(f"compiled variants: {len(resources)}, spilling: "
              + ", ".join(f"{r.get('BLOCK_M')}x{r.get('BLOCK_N')} w{r['num_warps']} "
                          f"lr{int(bool(r.get('HAS_LR')))} {r['n_spills']}B" for r in spilling))

    print(f"{device_name()}  torch {torch.__version__}  triton {triton.__version__}"
          f"  bandwidth {ceil['bandwidth_Bps'] / 1e12:.2f} TB/s  int8 peak "
          f"{ceil['int8_peak_ops'] / 1e12:.0f} TOP/s  rank {RANK}")
    print(f"{'linear':16} {'M':>5} {'N':>6} {'K':>6} {'kernel':30} {'ms':>8} {'TOP/s':>7} "
          f"{'x bf16':>7} {'floor ms':>8}")
    for r in rows:
        tops = f"{r['TOPS']:.0f}" if r["TOPS"] is not None else "-"
        floor = f"{r['floor_ms']:.4f}" if r["floor_ms"] is not None else "-"
        print(f"{r['linear']:16} {r['M']:>5} {r['N']:>6} {r['K']:>6} {r['name']:30} "
              f"{r['ms']:8.4f} {tops:>7} {r['vs_cublas_bf16']:7.2f} {floor:>8}")
    print("\nbranch overhead (target <= 15%): GEMM fused | whole linear fused | whole linear unfused"
          " | asm unpack speedup | magic int->float speedup")
    for s in summaries:
        print(f"{s['linear']:16} {s['M']:>5}  {100 * s['gemm_branch_overhead']:6.1f}% | "
              f"{100 * s['linear_branch_overhead_fused']:6.1f}% | "
              f"{100 * s['linear_branch_overhead_unfused']:6.1f}% | {s['asm_unpack_speedup']:.2f}x"
              f" | {s['magic_i2f_speedup']:.2f}x")
    with open(args.json_out, "w") as f:
        json.dump({"device": device_name(), "torch": torch.__version__,
                   "triton": triton.__version__,
                   "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                   "rank": RANK, "ceilings": ceil, "checks": checks, "rows": rows,
                   "summary": summaries, "sweeps": sweeps,
                   "compiled": resources}, f, indent=1)
    print(f"wrote {args.json_out}", file=sys.stderr)


if __name__ == "__main__":
    main()
