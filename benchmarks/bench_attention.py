"""Decode attention over the KV4 cache (qoq.kv4_attention) vs SDPA over a bf16 cache, with the roofline.

GQA 32 query / 8 KV heads, head_dim 128, one query token against a full cache of length L:

    python benchmarks/bench_attention.py out.json                    # on a GPU: the table + JSON
    python benchmarks/bench_attention.py out.json --sweep --write-config cfg.json   # tune, store the rule
    TRITON_INTERPRET=1 python benchmarks/bench_attention.py out.json --tiny   # the correctness path on CPU

Timing: each op is captured `--calls` times in one CUDA graph and the replay is timed with events
(median of `--reps` replays / calls; ours twice, before and after the peers, since the first timing of
a shape can read high), so Python dispatch stays out, as under `mode="reduce-overhead"`;
the captured calls rotate over copies of the caches (at least 200 MB in all) so no call finds its
cache in L2 (50 MB on an H100). SDPA (enable_gqa, and over repeat_kv-expanded K/V) is timed the same
way in the same run. Each row also carries the eager `do_bench` time of both (Python dispatch
included), the bytes each must read, the floor = bytes / measured copy bandwidth, and the error of
our output against SDPA over the dequantized cache (the op's spec).

The sweep times config families (num_warps, BLOCK_N, num_stages, maxnreg, LAZY), each with the split
count the launcher's rule gives it (one wave of resident programs, read off the compiled kernel, or
CTAS_PER_SM), at several shapes; --write-config stores, for "decode", the family with the best
geometric mean of time / best time over the swept shapes (lowering/kv4_attention.py reads it from
lowering/configs/kv4-attention-<gpu>.json).
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import json
import math
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # also without pip install -e

import triton  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from lowering.kv4_append import kv4_alloc, kv4_append, kv4_dequantize  # noqa: E402
from lowering import kv4_attention as ka  # noqa: E402
from lowering.kv4_attention import kv4_attention, kv4_attention_triton  # noqa: E402

HQ, HKV, D = 32, 8, 128
SHAPES = [(1, 32768), (16, 8192), (64, 4096)]
SWEEP_SHAPES = [(1, 32768), (16, 8192), (64, 4096), (4, 2048), (8, 16384), (32, 1024)]
ROTATE_BYTES = 200 << 20
# Config families (num_warps, BLOCK_N, num_stages) that fit registers and shared memory; the H100
# sweep of v2 found one warp with 64-token tiles best at 5 of 6 shapes, so the space is around it
FAMILIES = [dict(num_warps=1, BLOCK_N=n, num_stages=st, maxnreg=r, LAZY=True)
            for n, st, r in ((16, 3, None), (16, 4, None), (32, 3, None), (32, 3, 192), (32, 4, 192), (64, 2, None))]
FAMILIES += [dict(num_warps=4, BLOCK_N=128, num_stages=2, maxnreg=None, LAZY=True)]
# None: the split rule reads how many programs an SM holds off the compiled kernel (the default)
CTAS_PER_SM = (None,)


def gtime(calls, n_calls: int, reps: int) -> float:
    """Median ms per call of `n_calls` calls (rotating over `calls`) captured in one CUDA graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (and compile) outside the capture
        for f in calls:
            f()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(n_calls):
            calls[i % len(calls)]()
    g.replay()
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    ts = []
    for _ in range(reps):
        e0.record()
        g.replay()
        e1.record()
        e1.synchronize()
        ts.append(e0.elapsed_time(e1) / n_calls)
    del g
    return statistics.median(ts)


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write), the higher of graph and do_bench timing."""
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    for _ in range(20):  # clocks up first
        y.copy_(x)
    ms = min(gtime([lambda: y.copy_(x)], 10, 10), do_bench(lambda: y.copy_(x), warmup=25, rep=200,
                                                           return_mode="median"))
    return 2 * x.numel() / (ms * 1e-3)


def _inputs(batch: int, length: int, device: str, dtype: torch.dtype, hq: int = HQ, hkv: int = HKV, d: int = D):
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(batch, hq, 1, d, device=device, dtype=dtype, generator=g)
    # K with per-channel outliers, as real post-RoPE keys; V Gaussian
    k = (torch.randn(batch, hkv, length, d, device=device, generator=g)
         * (1 + 4 * torch.rand(d, device=device, generator=g))).to(dtype)
    v = torch.randn(batch, hkv, length, d, device=device, dtype=dtype, generator=g)
    caches = [*kv4_alloc(batch, hkv, length, d, device), *kv4_alloc(batch, hkv, length, d, device)]
    kv4_append(k, v, *caches, torch.arange(length, device=device), kernels="auto")
    pos = torch.tensor([length - 1], device=device)
    return q, k, v, caches, pos


def _copies(nbytes: int) -> int:
    return max(1, min(16, math.ceil(ROTATE_BYTES / nbytes)))


def _repeat_kv(x: torch.Tensor, g: int) -> torch.Tensor:
    b, h, length, d = x.shape
    return x[:, :, None].expand(b, h, g, length, d).reshape(b, h * g, length, d)


def _cfg_kwargs(fam: dict, ctas: int | None) -> dict:
    return dict(block_n=fam["BLOCK_N"], num_warps=fam["num_warps"], num_stages=fam["num_stages"],
                tuning={"LAZY": fam["LAZY"], "CTAS_PER_SM": ctas, "maxnreg": fam["maxnreg"]})


def _compile_job(job):
    """Worker: run one family once at a shape so Triton's disk cache holds its kernels."""
    batch, length, hq, hkv, fam = job
    fails = []
    q = torch.randn(batch, hq, 1, D, device="cuda", dtype=torch.bfloat16)
    caches = [*kv4_alloc(batch, hkv, length, D, "cuda"), *kv4_alloc(batch, hkv, length, D, "cuda")]
    pos = torch.tensor([length - 1], device="cuda")
    for splits in (1, 2):  # the two PARTIAL variants
        try:
            kv4_attention_triton(q, *caches, pos, num_splits=splits, **_cfg_kwargs(fam, None))
        except Exception as e:  # out of registers / shared memory: the sweep skips the family
            fails.append((fam, repr(e)[:200]))
    torch.cuda.synchronize()
    return fails


def precompile(jobs, workers: int = 8) -> None:
    import multiprocessing as mp
    t0 = time.time()
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as ex:
        fails = [f for r in ex.map(_compile_job, jobs) for f in r]
    print(f"precompiled {len(jobs)} jobs in {time.time() - t0:.0f} s, {len(fails)} configs failed", flush=True)
    for f in fails[:6]:
        print("  failed:", f, flush=True)


def bench_shape(batch: int, length: int, bandwidth: float, sweep: bool, args, hq: int = HQ, hkv: int = HKV,
                dtype: torch.dtype = torch.bfloat16) -> dict:
    device = "cuda"
    q, k, v, caches, pos = _inputs(batch, length, device, dtype, hq, hkv)
    g = hq // hkv
    kv4_bytes = sum(t.numel() * t.element_size() for t in caches) + 2 * q.numel() * q.element_size()
    bf16_bytes = (k.numel() + v.numel()) * k.element_size() + 2 * q.numel() * q.element_size()
    cache_copies = [caches] + [[t.clone() for t in caches] for _ in range(_copies(kv4_bytes) - 1)]
    kv_copies = [(k, v)] + [(k.clone(), v.clone()) for _ in range(_copies(bf16_bytes) - 1)]

    # the spec: attention over the dequantized cache (fp32 math in SDPA's hands)
    kd = kv4_dequantize(caches[0], caches[1])
    vd = kv4_dequantize(caches[2], caches[3])
    spec = F.scaled_dot_product_attention(q.float(), kd, vd, enable_gqa=True)
    del kd, vd
    out = kv4_attention(q, *caches, pos, None, None, "triton")
    err = (out.float() - spec).abs().max().item()
    rel = ((out.float() - spec).norm() / spec.norm()).item()
    fp_err = (F.scaled_dot_product_attention(q, k, v, enable_gqa=True).float() - spec).abs().max().item()
    torch.testing.assert_close(out.float(), spec, atol=3e-2, rtol=3e-2)

    ours = [lambda c=c: kv4_attention(q, *c, pos, None, None, "triton") for c in cache_copies]
    sdpa_gqa = [lambda kv=kv: F.scaled_dot_product_attention(q, kv[0], kv[1], enable_gqa=True) for kv in kv_copies]
    sdpa_rep = [lambda kv=kv: F.scaled_dot_product_attention(q, _repeat_kv(kv[0], g), _repeat_kv(kv[1], g))
                for kv in kv_copies]
    times, eager = {}, {}
    for name, fns in (("kv4_op", ours), ("sdpa_gqa_bf16", sdpa_gqa), ("sdpa_repeat_kv_bf16", sdpa_rep)):
        try:
            times[name] = gtime(fns, args.calls, args.reps)
            eager[name] = do_bench(fns[0], warmup=25, rep=100, return_mode="median")
        except Exception as e:  # an SDPA backend can refuse a shape; say so in the row
            times[name] = eager[name] = None
            print(f"  {name} at B={batch} L={length}: {type(e).__name__}: {e}", file=sys.stderr)
        torch.cuda.empty_cache()
    times["kv4_op_again"] = gtime(ours, args.calls, args.reps)  # the same op after the peers: the spread
    # With a boolean [B, 1, 1, L] mask, as transformers passes with a static cache (here all visible):
    # the mask loads' cost in the decode graph.
    mask = torch.ones(batch, 1, 1, length, dtype=torch.bool, device=device)
    times["kv4_op_bool_mask"] = gtime([lambda c=c: kv4_attention(q, *c, pos, mask, None, "triton") for c in cache_copies],
                                      args.calls, args.reps)
    cfg = kv4_attention_triton(q, *caches, pos, plan_only=True)
    try:  # the same default config with the pure-Triton unpack: what the inline PTX buys
        times["kv4_pure_triton_unpack"] = gtime(
            [lambda c=c: kv4_attention_triton(q, *c, pos, use_asm=False) for c in cache_copies], args.calls, args.reps)
    except Exception as e:
        times["kv4_pure_triton_unpack"] = None
        print(f"  pure-Triton unpack: {type(e).__name__}: {e}", file=sys.stderr)

    # The default config at other split counts, with the decode graph's boolean mask: whether the split
    # rule's choice is the best one at this shape (short contexts at small batch leave most SMs idle).
    by_splits = {}
    for n in args.splits:
        by_splits[n] = gtime([lambda c=c: kv4_attention_triton(q, *c, pos, attn_mask=mask, num_splits=n)
                              for c in cache_copies], max(4, args.calls // 2), max(3, args.reps // 2))

    swept = []
    if sweep:
        timed: dict = {}  # (family, splits) -> ms, or None where it failed
        for fam, ctas in itertools.product(FAMILIES, CTAS_PER_SM):
            kw = _cfg_kwargs(fam, ctas)
            splits = kv4_attention_triton(q, *caches, pos, plan_only=True, **kw)["num_splits"]
            key = (tuple(sorted(fam.items())), splits)
            if key not in timed:  # a larger CTAS_PER_SM often gives the same split: same kernel, timed once
                try:
                    timed[key] = gtime([lambda c=c: kv4_attention_triton(q, *c, pos, **kw) for c in cache_copies],
                                       max(4, args.calls // 2), max(3, args.reps // 2))
                except Exception as e:  # registers / shared memory: skip the family here
                    print(f"  sweep {fam} ctas={ctas}: {type(e).__name__}: {str(e)[:120]}", file=sys.stderr)
                    timed[key] = None
            if timed[key] is not None:
                swept.append({**fam, "CTAS_PER_SM": ctas, "num_splits": splits, "ms": timed[key]})
    best = min(swept, key=lambda s: s["ms"]) if swept else None

    row = {
        "batch": batch, "length": length, "q_heads": hq, "kv_heads": hkv, "head_dim": D, "dtype": str(dtype),
        "ms": times, "eager_ms": eager, "config": cfg,
        "kv4_bytes": kv4_bytes, "bf16_bytes": bf16_bytes,
        "kv4_floor_ms": kv4_bytes / bandwidth * 1e3, "bf16_floor_ms": bf16_bytes / bandwidth * 1e3,
        "max_abs_err_vs_spec": err, "rel_err_vs_spec": rel, "bf16_sdpa_err_vs_spec": fp_err,
        "sweep": swept, "sweep_best": best, "bool_mask_ms_by_splits": by_splits,
    }
    sdpa_times = [t for n, t in times.items() if n.startswith("sdpa") and t is not None]
    ours_ms = statistics.median([times["kv4_op"], times["kv4_op_again"]]) if times["kv4_op"] else None
    row["kv4_ms"] = ours_ms  # the mean of the two timings of the op (median of two)
    row["speedup_vs_sdpa"] = min(sdpa_times) / ours_ms if sdpa_times and ours_ms else None
    row["kv4_fraction_of_roofline"] = row["kv4_floor_ms"] / ours_ms if ours_ms else None
    row["sdpa_fraction_of_roofline"] = row["bf16_floor_ms"] / min(sdpa_times) if sdpa_times else None
    del cache_copies, kv_copies
    torch.cuda.empty_cache()
    return row


def fit_config(rows: list[dict]) -> dict | None:
    """The family + CTAS_PER_SM with the best geometric mean of time / best time over the swept shapes."""
    scores: dict = {}
    for r in rows:
        if not r["sweep"]:
            continue
        best = min(s["ms"] for s in r["sweep"])
        for s in r["sweep"]:
            key = (s["num_warps"], s["BLOCK_N"], s["num_stages"], s["maxnreg"], s["LAZY"], s["CTAS_PER_SM"])
            scores.setdefault(key, []).append(math.log(s["ms"] / best))
    n = max((len(v) for v in scores.values()), default=0)
    full = {k: v for k, v in scores.items() if len(v) == n and n > 0}  # families that ran at every shape
    if not full:
        return None
    (w, bn, st, reg, lazy, ctas), logs = min(full.items(), key=lambda kv: sum(kv[1]))
    return {"BLOCK_N": bn, "num_warps": w, "num_stages": st, "maxnreg": reg, "LAZY": lazy, "CTAS_PER_SM": ctas,
            "MIN_SPLIT_LEN": ka.DEFAULT_CONFIGS["decode"]["MIN_SPLIT_LEN"],
            "SHORT_SPLIT_LEN": ka.DEFAULT_CONFIGS["decode"]["SHORT_SPLIT_LEN"],
            "geomean_vs_best": math.exp(sum(logs) / len(logs))}


def print_table(rows: list[dict]) -> None:
    head = (f"{'B':>3} {'L':>6} {'Hq/Hkv':>6} | {'kv4 op':>8} {'again':>8} {'mask':>8} {'floor':>7} {'%roof':>6} | {'sdpa gqa':>8} "
            f"{'sdpa rep':>8} {'%roof':>6} | {'speedup':>7} | {'pure':>7} | {'splits':>6} | {'eager kv4/sdpa':>15} | "
            f"{'best swept (ms)':>30} | {'rel err':>7}")
    print(head)
    print("-" * len(head))
    fmt = lambda x: f"{x:8.4f}" if x is not None else f"{'n/a':>8}"  # noqa: E731
    for r in rows:
        t, e = r["ms"], r["eager_ms"]
        b = r["sweep_best"]
        best_s = (f"w{b['num_warps']} n{b['BLOCK_N']} s{b['num_stages']} r{b['maxnreg'] or '-'} x{b['num_splits']} "
                  f"{b['ms']:.4f}" if b else "-")
        pure = t.get("kv4_pure_triton_unpack")
        print(f"{r['batch']:>3} {r['length']:>6} {r['q_heads']:>3}/{r['kv_heads']:<2} | {fmt(t['kv4_op'])} "
              f"{fmt(t.get('kv4_op_again'))} {fmt(t.get('kv4_op_bool_mask'))} {r['kv4_floor_ms']:7.4f} "
              f"{100 * (r['kv4_fraction_of_roofline'] or 0):5.1f}% | "
              f"{fmt(t['sdpa_gqa_bf16'])} {fmt(t['sdpa_repeat_kv_bf16'])} "
              f"{100 * (r['sdpa_fraction_of_roofline'] or 0):5.1f}% | {r['speedup_vs_sdpa'] or 0:6.2f}x | "
              f"{pure or 0:7.4f} | {r['config']['num_splits']:>6} | "
              f"{e['kv4_op'] or 0:7.4f}/{e['sdpa_gqa_bf16'] or 0:7.4f} | "
              f"{best_s:>30} | {r['rel_err_vs_spec']:7.1e}")
    print("ms per call, CUDA-graph medians (eager = do_bench of one Python call); kv4 op timed before and again after "
          "the peers, %roof and speedup use the median of the two; floor = bytes read / copy bandwidth; speedup = "
          "best SDPA / kv4; pure = kv4 with the pure-Triton unpack")


def tiny_check(device: str = "cpu") -> list[dict]:
    """The correctness path at toy sizes (CPU: Triton interpreter): our op vs SDPA over the dequantized cache."""
    rows = []
    for batch, length in ((1, 40), (2, 70)):
        q, k, v, caches, pos = _inputs(batch, length, device, torch.float32, hq=4, hkv=2, d=32)
        spec = F.scaled_dot_product_attention(q, kv4_dequantize(*caches[:2]), kv4_dequantize(*caches[2:]),
                                              enable_gqa=True)
        out = kv4_attention(q, *caches, pos, None, None, "triton")
        err = (out - spec).abs().max().item()
        fp = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        rows.append({"batch": batch, "length": length, "max_abs_err_vs_spec": err,
                     "cosine_vs_fp": F.cosine_similarity(out.flatten(), fp.flatten(), dim=0).item()})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="path of the JSON file to write")
    ap.add_argument("--shapes", default=None, help="BxL[xHqxHkv],... (default: the issue's three, or the "
                    "sweep's six with --sweep)")
    ap.add_argument("--sweep", action="store_true", help="time the config families at every shape")
    ap.add_argument("--write-config", default=None, help="with --sweep: write the fitted decode config here")
    ap.add_argument("--calls", type=int, default=20, help="calls captured per CUDA graph")
    ap.add_argument("--reps", type=int, default=10, help="graph replays timed")
    ap.add_argument("--splits", default="", help="comma-separated split counts to time the default config "
                    "at, with a boolean mask, beside the split rule's choice")
    ap.add_argument("--tiny", action="store_true", help="correctness path only, toy sizes (CPU interpreter)")
    args = ap.parse_args(argv)
    args.splits = [int(n) for n in args.splits.split(",") if n]

    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "triton": triton.__version__}
    if args.tiny:
        rows = tiny_check("cuda" if torch.cuda.is_available() else "cpu")
        for r in rows:
            print(r)
        result = {**meta, "device": "tiny check", "rows": rows}
    else:
        if not torch.cuda.is_available():
            print("bench_attention: needs a CUDA GPU (use --tiny for the CPU correctness path)", file=sys.stderr)
            return 2
        shapes = []
        default_shapes = ",".join(f"{b}x{l}" for b, l in (SWEEP_SHAPES if args.sweep else SHAPES))
        for spec in (args.shapes or default_shapes).split(","):
            parts = [int(x) for x in spec.lower().split("x")]
            shapes.append((parts[0], parts[1], *(parts[2:4] if len(parts) >= 4 else (HQ, HKV))))
        if args.sweep:
            precompile([(1, 4096, hq, hkv, fam) for hq, hkv in sorted({(hq, hkv) for _, _, hq, hkv in shapes})
                        for fam in FAMILIES])
        bandwidth = copy_bandwidth()
        name = torch.cuda.get_device_name()
        print(f"{name}: copy bandwidth {bandwidth / 1e9:.0f} GB/s", flush=True)
        rows = []
        for b, l, hq, hkv in shapes:
            t0 = time.time()
            rows.append(bench_shape(b, l, bandwidth, args.sweep, args, hq, hkv))
            r = rows[-1]
            print(f"  B={b} L={l} {hq}/{hkv}: kv4 {r['ms']['kv4_op']:.4f} ms, bool mask {r['ms']['kv4_op_bool_mask']:.4f} "
                  f"at {r['config']['num_splits']} splits, sdpa {r['ms']['sdpa_gqa_bf16']} ({time.time() - t0:.0f} s)"
                  + "".join(f"; {n} splits {t:.4f}" for n, t in r["bool_mask_ms_by_splits"].items()), flush=True)
            with open(args.out, "w") as f:  # after every shape, so a run cut short still leaves its rows
                json.dump({**meta, "device": name, "copy_bandwidth_Bps": bandwidth, "rows": rows}, f, indent=1)
        print_table(rows)
        result = {**meta, "device": name, "copy_bandwidth_Bps": bandwidth,
                  "timing": f"CUDA graph of {args.calls} calls, median of {args.reps} replays, caches rotated "
                            f"over >= {ROTATE_BYTES >> 20} MB", "rows": rows}
        if args.sweep:
            fitted = fit_config(rows)
            result["fitted_decode_config"] = fitted
            print("fitted decode config:", fitted)
            if args.write_config and fitted:
                with open(args.write_config, "w") as f:
                    json.dump({"device": name, "date": meta["date"][:10], "triton": triton.__version__,
                               "source": "benchmarks/bench_attention.py --sweep",
                               "configs": {"decode": {k: v for k, v in fitted.items() if k != "geomean_vs_best"}}},
                              f, indent=1)
                print(f"wrote {args.write_config}")
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
