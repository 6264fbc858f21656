"""Decode attention over the KV4 cache (qoq.kv4_attention) vs SDPA over a bf16 cache, with the roofline.

GQA 32 query / 8 KV heads, head_dim 128, one query token against a full cache of length L:

    python benchmarks/bench_attention.py out.json                 # on a GPU: the table + JSON
    python benchmarks/bench_attention.py out.json --shapes 1x32768,16x8192,64x4096 --no-sweep
    TRITON_INTERPRET=1 python benchmarks/bench_attention.py out.json --tiny   # the correctness path on CPU

Each row: medians (triton.testing.do_bench) of our op, our launcher alone, SDPA (enable_gqa) and SDPA over
repeat_kv-expanded K/V (transformers' fallback); bytes each must read; the floor = bytes / measured copy
bandwidth; the max error of our output against SDPA over the dequantized cache (the op's spec).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # also without pip install -e

import triton  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from lowering.kv4_append import kv4_alloc, kv4_append, kv4_dequantize  # noqa: E402
from lowering.kv4_attention import kv4_attention, kv4_attention_triton  # noqa: E402

HQ, HKV, D = 32, 8, 128
SHAPES = [(1, 32768), (16, 8192), (64, 4096)]


def copy_bandwidth(device: str, nbytes: int = 1 << 30) -> float:
    """Measured device-to-device copy bandwidth in bytes/s (read + write counted)."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    return 2 * nbytes / (ms * 1e-3)


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


def _repeat_kv(x: torch.Tensor, g: int) -> torch.Tensor:
    b, h, length, d = x.shape
    return x[:, :, None].expand(b, h, g, length, d).reshape(b, h * g, length, d)


def bench_shape(batch: int, length: int, device: str, bandwidth: float, sweep: bool,
                dtype: torch.dtype = torch.bfloat16) -> dict:
    q, k, v, caches, pos = _inputs(batch, length, device, dtype)
    g = HQ // HKV
    kernels = "triton"

    def ours():
        return kv4_attention(q, *caches, pos, None, None, kernels)

    def launcher():
        return kv4_attention_triton(q, *caches, pos)

    def sdpa_gqa():
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

    def sdpa_repeat():
        return F.scaled_dot_product_attention(q, _repeat_kv(k, g), _repeat_kv(v, g))

    # the spec: attention over the dequantized cache (fp32 math in SDPA's hands)
    kd = kv4_dequantize(caches[0], caches[1])
    vd = kv4_dequantize(caches[2], caches[3])
    spec = F.scaled_dot_product_attention(q.float(), kd, vd, enable_gqa=True)
    del kd, vd
    out = ours()
    err = (out.float() - spec).abs().max().item()
    fp_err = (sdpa_gqa().float() - spec).abs().max().item()  # bf16 K/V vs KV4 K/V: the quantization error
    torch.testing.assert_close(out.float(), spec, atol=3e-2, rtol=3e-2)

    times = {}
    for name, fn in (("kv4_op", ours), ("kv4_launcher", launcher), ("sdpa_gqa_bf16", sdpa_gqa),
                     ("sdpa_repeat_kv_bf16", sdpa_repeat)):
        try:
            times[name] = do_bench(fn, warmup=25, rep=200, return_mode="median")
        except Exception as e:  # an SDPA backend can refuse a shape; say so in the row
            times[name] = None
            print(f"  {name} at B={batch} L={length}: {type(e).__name__}: {e}", file=sys.stderr)

    best = None
    if sweep:
        configs = []
        for block_n in (32, 64, 128):
            for splits in (None, 1, 2, 4, 8, 16, 32, 64):
                tiles = triton.cdiv(length, block_n)
                if splits is not None and splits > tiles:
                    continue
                try:
                    ms = do_bench(lambda: kv4_attention_triton(q, *caches, pos, num_splits=splits, block_n=block_n),
                                  warmup=10, rep=50, return_mode="median")
                except Exception as e:  # out of shared memory / registers for a config: skip it
                    print(f"  sweep block_n={block_n} splits={splits}: {type(e).__name__}", file=sys.stderr)
                    continue
                configs.append({"block_n": block_n, "num_splits": splits, "ms": ms})
        best = min(configs, key=lambda c: c["ms"]) if configs else None

    kv4_bytes = sum(t.numel() * t.element_size() for t in caches) + 2 * q.numel() * q.element_size()
    bf16_bytes = (k.numel() + v.numel()) * k.element_size() + 2 * q.numel() * q.element_size()
    row = {
        "batch": batch, "length": length, "q_heads": HQ, "kv_heads": HKV, "head_dim": D, "dtype": str(dtype),
        "ms": times,
        "kv4_bytes": kv4_bytes, "bf16_bytes": bf16_bytes,
        "kv4_floor_ms": kv4_bytes / bandwidth * 1e3, "bf16_floor_ms": bf16_bytes / bandwidth * 1e3,
        "max_abs_err_vs_spec": err, "bf16_sdpa_err_vs_spec": fp_err,
        "sweep_best": best,
    }
    sdpa_times = [t for n, t in times.items() if n.startswith("sdpa") and t is not None]
    row["speedup_vs_sdpa"] = min(sdpa_times) / times["kv4_op"] if sdpa_times else None
    row["kv4_fraction_of_roofline"] = row["kv4_floor_ms"] / times["kv4_op"]
    return row


def print_table(rows: list[dict]) -> None:
    head = (f"{'B':>4} {'L':>6} | {'kv4 op':>8} {'launch':>8} {'floor':>7} {'%roof':>6} | {'sdpa gqa':>8} "
            f"{'sdpa rep':>8} {'bf16 flr':>8} | {'speedup':>7} | {'best cfg (ms)':>22} | {'err':>8}")
    print(head)
    print("-" * len(head))
    for r in rows:
        t = r["ms"]
        fmt = lambda x: f"{x:8.4f}" if x is not None else f"{'n/a':>8}"  # noqa: E731
        best = r["sweep_best"]
        best_s = f"n={best['block_n']} s={best['num_splits']} {best['ms']:.4f}" if best else "-"
        print(f"{r['batch']:>4} {r['length']:>6} | {fmt(t['kv4_op'])} {fmt(t['kv4_launcher'])} "
              f"{r['kv4_floor_ms']:7.4f} {100 * r['kv4_fraction_of_roofline']:5.1f}% | {fmt(t['sdpa_gqa_bf16'])} "
              f"{fmt(t['sdpa_repeat_kv_bf16'])} {r['bf16_floor_ms']:8.4f} | {r['speedup_vs_sdpa'] or 0:6.2f}x | "
              f"{best_s:>22} | {r['max_abs_err_vs_spec']:8.1e}")
    print("times in ms (medians); floor = bytes read / measured copy bandwidth; speedup = best SDPA / kv4 op")


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
    ap.add_argument("--shapes", default=",".join(f"{b}x{l}" for b, l in SHAPES), help="BxL,BxL,...")
    ap.add_argument("--no-sweep", action="store_true", help="skip the block_n x num_splits sweep")
    ap.add_argument("--tiny", action="store_true", help="correctness path only, toy sizes (CPU interpreter)")
    args = ap.parse_args(argv)

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
        device = "cuda"
        bandwidth = copy_bandwidth(device)
        name = torch.cuda.get_device_name()
        print(f"{name}: copy bandwidth {bandwidth / 1e9:.0f} GB/s")
        rows = []
        for spec in args.shapes.split(","):
            b, l = (int(x) for x in spec.lower().split("x"))
            rows.append(bench_shape(b, l, device, bandwidth, sweep=not args.no_sweep))
            torch.cuda.empty_cache()
        print_table(rows)
        result = {**meta, "device": name, "copy_bandwidth_Bps": bandwidth, "rows": rows}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
