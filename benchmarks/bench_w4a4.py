"""W4A4 (SVDQuant) GEMM at Flux shapes: the rank-32 low-rank branch fused in the epilogue vs the
same GEMM without it vs cuBLAS bf16, torch._int_mm and a plain Triton int8 GEMM (the int8 peak a
Triton kernel reaches on the shape), with the activation quantization and a roofline floor.

    pip install --no-deps -e . && python benchmarks/bench_w4a4.py results/w4a4.json [--quick]
    python benchmarks/bench_w4a4.py out.json --sweep --configs-out w4a4-<gpu>.json   # tune, store

Prints a table and writes the rows as JSON. Targets: the fused branch adds at most 15% (issue 4);
W4A4 + branch at M = 4096 at least 1.3x cuBLAS bf16 (issue 6).
"""
from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import sys
import time

import torch
import triton
import triton.testing

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_gemm import INT8_CONFIGS, triton_int8_gemm  # noqa: E402  (the plain int8 GEMM)
from lowering.w4a4_activation_quant import triton_quantize_act  # noqa: E402
from lowering.w4a4_gemm import (  # noqa: E402
    CONFIG_FIELDS, GPU_CONFIGS, OPTIONAL_FIELDS, _w4a4_gemm_kernel, m_bucket, quantize_weight,
    reference,
    triton_gemm, tuned_config,
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


def int8_peer(m: int, n: int, k: int) -> float | None:
    """The plain Triton int8 GEMM (benchmarks/bench_gemm.py's comparison kernel) on [m, k] x
    [n, k]: fastest of its configs, in ms. None off the GPU (its loop has no K mask)."""
    if DEVICE != "cuda":
        return None
    x8 = torch.randint(-128, 127, (m, k), dtype=torch.int8, device=DEVICE)
    w8 = torch.randint(-128, 127, (n, k), dtype=torch.int8, device=DEVICE)
    return min(bench(lambda c=c: triton_int8_gemm(x8, w8, c)) for c in INT8_CONFIGS
               if k % c["BLOCK_K"] == 0)


def measure_ceilings() -> dict:
    """Bandwidth (device-to-device copy) and int8 MMA peak (torch._int_mm and the plain Triton
    int8 GEMM at 8192^3), in this run."""
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
    t8 = int8_peer(n, n, n)
    return {"bandwidth_Bps": bw, "int8_peak_ops": peak,
            "triton_int8_peak_ops": 2 * n**3 / (t8 * 1e-3) if t8 else None}


def check(m: int, n: int, k: int, dtype: torch.dtype, cfg: dict | None) -> dict:
    """Numbers before speed: the inline-PTX and pure-Triton unpacks, the two k-orders and the two
    int->float conversions give the same bits, and the result matches the reference."""
    g = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(m, k, device=DEVICE, dtype=dtype, generator=g)
    w = torch.randn(n, k, device=DEVICE, generator=g) * 0.02
    ld = (torch.randn(k, RANK, device=DEVICE, generator=g) * 0.02).to(dtype)
    lu = (torch.randn(RANK, n, device=DEVICE, generator=g) * 0.02).to(dtype)
    bias = torch.randn(n, device=DEVICE, generator=g).to(dtype)
    wp, ws = quantize_weight(w)
    a, sa, lr = triton_quantize_act(x, None, ld)
    def run(**kw):
        return triton_gemm(a, sa, wp, ws, lr, lu, bias, dtype, config=cfg, **kw)

    # The inline-PTX unpack exists on the GPU only; elsewhere both paths are the pure-Triton one.
    y_asm = run(unpack_asm=DEVICE == "cuda")
    y_ref = reference(a, sa, wp, ws, lr, lu, bias, dtype)
    y_fp = x.float() @ w.T + (x.float() @ ld.float()) @ lu.float() + bias.float()
    rel = lambda u, v: float((u.float() - v.float()).norm() / v.float().norm())  # noqa: E731
    out = {"asm_eq_triton": bool(torch.equal(y_asm, run(unpack_asm=False))),
           "magic_eq_i2f": bool(torch.equal(y_asm, run(magic_i2f=True))),
           "kperm_eq_natural": bool(torch.equal(y_asm, run(k_perm=False))),
           "prefetch_eq_plain": cfg is None or bool(torch.equal(y_asm, triton_gemm(
               a, sa, wp, ws, lr, lu, bias, dtype,
               config=dict(cfg, PREFETCH=1 - int(cfg.get("PREFETCH", 0)))))),
           "rel_err_vs_reference": rel(y_asm, y_ref), "rel_err_vs_fp": rel(y_asm, y_fp)}
    if not all(out[k] for k in ("asm_eq_triton", "magic_eq_i2f", "kperm_eq_natural",
                                "prefetch_eq_plain")) \
            or out["rel_err_vs_reference"] > 1e-2:
        raise SystemExit(f"W4A4 kernel disagrees at {m}x{n}x{k}: {out}")
    return out


def run_shape(m: int, n: int, k: int, dtype: torch.dtype, ceil: dict, cfg: dict | None
              ) -> tuple[list[dict], dict]:
    """Every kernel on one shape; cfg: the W4A4 tile (None: the stored table, else autotune)."""
    x = torch.randn(m, k, device=DEVICE, dtype=dtype)
    w = torch.randn(n, k, device=DEVICE) * 0.02
    w16 = w.to(dtype)
    ld = (torch.randn(k, RANK, device=DEVICE) * 0.02).to(dtype)
    lu = (torch.randn(RANK, n, device=DEVICE) * 0.02).to(dtype)
    bias = torch.randn(n, device=DEVICE).to(dtype)
    wp, ws = quantize_weight(w)
    a, sa, lr = triton_quantize_act(x, None, ld)
    a_nolr, sa_nolr, _ = triton_quantize_act(x, None, None)
    gemm = lambda *o, **kw: triton_gemm(*o, bias, dtype, config=cfg, **kw)  # noqa: E731

    def naive_branch():
        q, s, _ = triton_quantize_act(x, None, None)
        return gemm(q, s, wp, ws, None, None) + (x @ ld) @ lu

    def fused_linear():
        q, s, r = triton_quantize_act(x, None, ld)
        return gemm(q, s, wp, ws, r, lu)

    x8 = torch.randint(-128, 127, (m, k), dtype=torch.int8, device=DEVICE)
    w8 = torch.randint(-128, 127, (n, k), dtype=torch.int8, device=DEVICE)
    times = {
        "cublas_bf16": bench(lambda: torch.mm(x, w16.T)),
        "int_mm_int8": bench(lambda: torch._int_mm(x8, w8.T)),
        "triton_int8": int8_peer(m, n, k),
        "w4a4_gemm": bench(lambda: gemm(a_nolr, sa_nolr, wp, ws, None, None)),
        "w4a4_gemm_lr_fused": bench(lambda: gemm(a, sa, wp, ws, lr, lu)),
        # the same tile with one change undone each: what each change of v3 is worth
        "w4a4_gemm_natural_k_order": bench(lambda: gemm(a, sa, wp, ws, lr, lu, k_perm=False)),
        "w4a4_gemm_magic_convert": bench(lambda: gemm(a, sa, wp, ws, lr, lu, magic_i2f=True)),
        "w4a4_gemm_pure_triton_unpack": bench(lambda: gemm(a, sa, wp, ws, lr, lu,
                                                           unpack_asm=False)),
        "quant_act": bench(lambda: triton_quantize_act(x, None, None)),
        "quant_act_lr_fused": bench(lambda: triton_quantize_act(x, None, ld)),
        "linear_no_branch": bench(
            lambda: gemm(*triton_quantize_act(x, None, None)[:2], wp, ws, None, None)),
        "linear_lr_fused": bench(fused_linear),
        "linear_lr_unfused": bench(naive_branch),
    }
    times = {k_: v for k_, v in times.items() if v is not None}

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
    t8 = times.get("triton_int8")
    rows = []
    for name, ms in times.items():
        is_gemm = not name.startswith("quant")
        rows.append({
            "name": name, "M": m, "N": n, "K": k, "dtype": str(dtype).removeprefix("torch."),
            "ms": ms, "TOPS": ops / (ms * 1e-3) / 1e12 if is_gemm else None,
            "vs_cublas_bf16": times["cublas_bf16"] / ms,
            # share of the int8 MMA rate a plain Triton kernel reaches on this shape
            "pct_triton_int8": 100 * t8 / ms if (t8 and is_gemm) else None,
            "floor_ms": floors.get(name),
        })
    summary = {
        "M": m, "N": n, "K": k, "config": cfg,
        "gemm_vs_bf16": times["cublas_bf16"] / times["w4a4_gemm"],
        "gemm_lr_fused_vs_bf16": times["cublas_bf16"] / times["w4a4_gemm_lr_fused"],
        "linear_lr_fused_vs_bf16": times["cublas_bf16"] / times["linear_lr_fused"],
        "pct_triton_int8_lr_fused": 100 * t8 / times["w4a4_gemm_lr_fused"] if t8 else None,
        "gemm_branch_overhead": times["w4a4_gemm_lr_fused"] / times["w4a4_gemm"] - 1,
        "linear_branch_overhead_fused": times["linear_lr_fused"] / times["linear_no_branch"] - 1,
        "linear_branch_overhead_unfused":
            times["linear_lr_unfused"] / times["linear_no_branch"] - 1,
        "k_perm_speedup": times["w4a4_gemm_natural_k_order"] / times["w4a4_gemm_lr_fused"],
        "asm_unpack_speedup": times["w4a4_gemm_pure_triton_unpack"] / times["w4a4_gemm_lr_fused"],
        "i2f_vs_magic_speedup": times["w4a4_gemm_magic_convert"] / times["w4a4_gemm_lr_fused"],
    }
    return rows, summary


def config_name(cfg: dict) -> str:
    reg = f" r{cfg['maxnreg']}" if cfg.get("maxnreg") else ""
    reg += " pf" if cfg.get("PREFETCH") else ""
    return "{BLOCK_M}x{BLOCK_N} w{num_warps} s{num_stages} g{GROUPS}".format(**cfg) + reg


def stored_fields(cfg: dict) -> dict:
    return {k: cfg[k] for k in CONFIG_FIELDS + OPTIONAL_FIELDS if cfg.get(k) is not None}


def sweep_shape(m: int, n: int, k: int, dtype: torch.dtype) -> dict:
    """Every tile config of GPU_CONFIGS (BLOCK_M >= 64) with and without the branch, in one run:
    which tile is fastest for the shape (the tuned table's entry) and what the branch costs."""
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
        cfg = stored_fields(dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages,
                                 maxnreg=c.maxnreg))
        row = {"config": config_name(cfg), "cfg": cfg}
        for variant, has_lr in (("none", False), ("lr", True)):
            args = (a, sa, wp, ws, lr, lu) if has_lr else (a, sa, wp, ws, None, None)
            try:
                if has_lr:
                    y = triton_gemm(*args, bias, torch.float32, config=cfg)
                    err = float((y - y_ref).norm() / y_ref.norm())
                    if err > 1e-4:
                        raise RuntimeError(f"disagrees with the reference config ({err:.1e})")
                row[variant] = bench(lambda: triton_gemm(*args, bias, dtype, config=cfg), rep=60)
            except Exception as e:  # noqa: BLE001 - a config that cannot compile here is a row
                row[variant] = None
                row[f"{variant}_error"] = f"{type(e).__name__}: {str(e)[:120]}"
        rows.append(row)
        torch.cuda.empty_cache()
    ok = lambda v: [r for r in rows if r.get(v) is not None]  # noqa: E731
    best = {v: min(ok(v), key=lambda r: r[v]) for v in ("none", "lr") if ok(v)}
    return {"M": m, "N": n, "K": k, "rows": rows,
            "best": {v: {"config": r["config"], "cfg": r["cfg"], "ms": r[v]}
                     for v, r in best.items()}}


def _smallest_config() -> dict:
    return {"BLOCK_M": 64, "BLOCK_N": 64, "GROUP_M": 8, "GROUPS": 1, "num_warps": 4,
            "num_stages": 3}


def config_table(sweeps: list[dict], meta: dict) -> dict:
    """The tuned-config JSON (lowering/configs/w4a4-<gpu>.json) from the sweeps: per weight shape
    and M bucket the fastest tile with the branch (what the svdquant recipe runs); the default
    per bucket is the tile that won most shapes."""
    configs: dict = {}
    wins: dict = collections.defaultdict(collections.Counter)
    for sw in sweeps:
        if "lr" not in sw["best"]:
            continue
        cfg = stored_fields(sw["best"]["lr"]["cfg"])
        bucket = m_bucket(sw["M"])
        configs.setdefault(f"{sw['N']},{sw['K']}", {})[bucket] = cfg
        wins[bucket][json.dumps(cfg, sort_keys=True)] += 1
    default = {b: json.loads(c.most_common(1)[0][0]) for b, c in wins.items()}
    # M above the largest swept bucket runs the same tiles (as many or more programs per SM)
    if default and "big" not in default:
        default["big"] = default[max((b for b in default), key=lambda b: int(b) if b.isdigit()
                                     else 1 << 40)]
    return {**meta, "configs": configs, "default": default}


def sass_loop_mix(cubin: bytes) -> dict:
    """Instruction mix of a kernel's main loop (the longest backward branch) in its SASS, by
    opcode: what the scaling costs against the MMAs, and whether anything spills (LDL/STL)."""
    import re
    import subprocess
    import tempfile

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True).stdout
    lines = [(int(m.group(1), 16), m.group(2)) for m in
             (re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+([^;]*);", ln) for ln in sass.splitlines()) if m]
    loop = None
    for addr, ins in lines:
        br = re.search(r"BRA\s+.*?0x([0-9a-f]+)", ins)
        if br and int(br.group(1), 16) < addr:
            start = int(br.group(1), 16)
            if loop is None or addr - start > loop[1] - loop[0]:
                loop = (start, addr)
    ops = collections.Counter()
    for addr, ins in lines:
        if loop and loop[0] <= addr <= loop[1]:
            ops[re.sub(r"^@!?U?P\w+\s+", "", ins).split()[0].split(".")[0]] += 1
    return {"loop_instructions": sum(ops.values()), "loop_ops": dict(ops.most_common(16))}


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
                                "UNPACK_ASM", "MAGIC_I2F", "K_PERM", "PREFETCH"):
                        consts[name] = v if isinstance(v, (int, bool)) else str(v)
                row = {**consts, "num_warps": k.metadata.num_warps,
                       "num_stages": k.metadata.num_stages,
                       "maxnreg": getattr(k.metadata, "maxnreg", None), "n_regs": k.n_regs,
                       "n_spills": k.n_spills}
                try:
                    row.update(sass_loop_mix(k.asm["cubin"]))
                except Exception as e:  # noqa: BLE001 - diagnostics only
                    row["sass_error"] = f"{type(e).__name__}: {str(e)[:120]}"
                out.append(row)
    except Exception as e:  # noqa: BLE001 - diagnostics only; Triton versions differ here
        out.append({"error": f"{type(e).__name__}: {str(e)[:160]}"})
    return out


def print_sweep(sw: dict) -> None:
    print(f"\nsweep M={sw['M']} N={sw['N']} K={sw['K']} (ms)")
    print(f"{'config':24} {'none':>8} {'lr':>8} {'+lr':>8}")
    for r in sw["rows"]:
        vals = [r.get(v) for v in ("none", "lr")]
        over = f"{100 * (vals[1] / vals[0] - 1):7.1f}%" if all(vals) else "-"
        cells = " ".join(f"{v:8.4f}" if v is not None else f"{'err':>8}" for v in vals)
        print(f"{r['config']:24} {cells} {over:>8}")
    for v, b in sw["best"].items():
        print(f"best {v}: {b['config']} {b['ms']:.4f} ms")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("json_out", help="where to write the results (JSON)")
    p.add_argument("--quick", action="store_true", help="two shapes (the sweep's)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes on the CPU (run with TRITON_INTERPRET=1): checks the script")
    p.add_argument("--sweep", action="store_true",
                   help="time every tile config with and without the branch first, at each token "
                        "count and the first two shapes, and run the table's rows with the winners")
    p.add_argument("--configs-out", default=None,
                   help="with --sweep: write the winners as the tuned-config JSON "
                        "(lowering/configs/w4a4-<gpu>.json)")
    args = p.parse_args(argv)
    global DEVICE
    if args.smoke:
        DEVICE = "cpu"
    elif not torch.cuda.is_available():
        raise SystemExit("bench_w4a4 needs a CUDA GPU (or --smoke with TRITON_INTERPRET=1)")
    dtype = getattr(torch, args.dtype)
    tokens = TOKENS
    linears = FLUX_LINEARS[:2] if args.quick else FLUX_LINEARS
    if args.smoke:
        tokens, linears = [48], [("smoke", 96, 192)]
    ceil = measure_ceilings()
    date = datetime.datetime.now(datetime.timezone.utc).isoformat()

    sweeps, chosen = [], {}
    if args.sweep and DEVICE == "cuda":
        for m in tokens:
            for _, n, k in linears[:2]:
                sweeps.append(sweep_shape(m, n, k, dtype))
                print_sweep(sweeps[-1])
                if "lr" in sweeps[-1]["best"]:
                    chosen[(m, n, k)] = stored_fields(sweeps[-1]["best"]["lr"]["cfg"])
        if args.configs_out:
            table = config_table(sweeps, {
                "device": device_name(), "date": date[:10], "triton": triton.__version__,
                "source": f"benchmarks/bench_w4a4.py --sweep, M {tokens}: fastest tile with the "
                          "rank-32 branch per weight shape; shapes not swept use 'default'"})
            with open(args.configs_out, "w") as f:
                json.dump(table, f, indent=1, sort_keys=True)
            print(f"wrote {args.configs_out}", file=sys.stderr)

    swept_default = config_table(sweeps, {})["default"] if sweeps else {}

    def cfg_for(m, n, k):
        if (m, n, k) in chosen:
            return chosen[(m, n, k)]
        if DEVICE != "cuda":
            return None
        # shapes the sweep skipped: the stored table, else the sweep's most frequent winner
        # (not the autotuner: it would compile every candidate for each of five variants)
        return tuned_config(torch.device(DEVICE), m, n, k // 64) or swept_default.get(m_bucket(m))

    checks = {f"{n}x{k}": check(32 if args.smoke else 256, n, k, dtype,
                                cfg_for(tokens[0], n, k)) for _, n, k in linears}
    rows, summaries = [], []
    for m in tokens:
        for lname, n, k in linears:
            r, s = run_shape(m, n, k, dtype, ceil, cfg_for(m, n, k))
            for row in r:
                row["linear"] = lname
            s["linear"] = lname
            rows += r
            summaries.append(s)
            if DEVICE == "cuda":
                torch.cuda.empty_cache()
    resources = compiled_resources() if DEVICE == "cuda" else []
    spilling = [r for r in resources if r.get("n_spills")]

    for r in resources:
        if r.get("HAS_LR") and r.get("UNPACK_ASM") and "loop_instructions" in r:
            print(f"sass {r.get('BLOCK_M')}x{r.get('BLOCK_N')} w{r['num_warps']} "
                  f"s{r['num_stages']} "
                  f"r{r.get('maxnreg')} pf{r.get('PREFETCH')} K_PERM={r.get('K_PERM')} "
                  f"MAGIC={r.get('MAGIC_I2F')}: "
                  f"regs {r['n_regs']} spills {r['n_spills']} loop {r['loop_instructions']} "
                  + " ".join(f"{o}:{c}" for o, c in list(r["loop_ops"].items())[:8]))
    t8 = ceil.get("triton_int8_peak_ops")
    print(f"\n{device_name()}  torch {torch.__version__}  triton {triton.__version__}"
          f"  bandwidth {ceil['bandwidth_Bps'] / 1e12:.2f} TB/s  int8 peak: _int_mm "
          f"{ceil['int8_peak_ops'] / 1e12:.0f}, Triton {t8 / 1e12 if t8 else 0:.0f} TOP/s  "
          f"rank {RANK}  compiled variants {len(resources)}, spilling {len(spilling)}")
    print(f"{'linear':16} {'M':>5} {'N':>6} {'K':>6} {'kernel':30} {'ms':>8} {'TOP/s':>7} "
          f"{'x bf16':>7} {'%int8':>6} {'floor ms':>8}")
    for r in rows:
        tops = f"{r['TOPS']:.0f}" if r["TOPS"] is not None else "-"
        pct = f"{r['pct_triton_int8']:.0f}" if r["pct_triton_int8"] is not None else "-"
        floor = f"{r['floor_ms']:.4f}" if r["floor_ms"] is not None else "-"
        print(f"{r['linear']:16} {r['M']:>5} {r['N']:>6} {r['K']:>6} {r['name']:30} "
              f"{r['ms']:8.4f} {tops:>7} {r['vs_cublas_bf16']:7.2f} {pct:>6} {floor:>8}")
    print("\nsummary: tile | GEMM+branch x bf16 (target 1.3) | % Triton int8 | branch overhead "
          "(target <= 15%) | linear fused x bf16 | k-order, asm unpack, I2F speedups")
    for s in summaries:
        pct = f"{s['pct_triton_int8_lr_fused']:.0f}%" if s["pct_triton_int8_lr_fused"] else "-"
        tile = config_name(s["config"]) if s["config"] else "autotuned"
        print(f"{s['linear']:16} {s['M']:>5} {tile:22} {s['gemm_lr_fused_vs_bf16']:5.2f}x | "
              f"{pct:>4} | {100 * s['gemm_branch_overhead']:6.1f}% | "
              f"{s['linear_lr_fused_vs_bf16']:5.2f}x | {s['k_perm_speedup']:.2f}x "
              f"{s['asm_unpack_speedup']:.2f}x {s['i2f_vs_magic_speedup']:.2f}x")
    with open(args.json_out, "w") as f:
        json.dump({"device": device_name(), "torch": torch.__version__,
                   "triton": triton.__version__, "date": date,
                   "rank": RANK, "ceilings": ceil, "checks": checks, "rows": rows,
                   "summary": summaries, "sweeps": sweeps,
                   "compiled": resources}, f, indent=1)
    print(f"wrote {args.json_out}", file=sys.stderr)


if __name__ == "__main__":
    main()
