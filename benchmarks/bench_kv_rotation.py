"""What rotate_kv's H costs in the KV4 kernels, by the precision of the dots that apply it.

Llama-3-8B decode shapes (32 query / 8 KV heads, head_dim 128, one new token, cache position 1027):
qoq.kv4_attention and qoq.kv4_append timed without a rotation, with H applied in the kernels at each
`tl.dot` input precision ("ieee": fp32 FMAs; "tf32x3"; "tf32"), and with H applied by two torch
matmuls around the attention (q·H before, out·Hᵀ after: what the graph did before the kernels took
H). Each call is captured 20 times in a CUDA graph (bench_attention.gtime), as decode runs under
`mode="reduce-overhead"`. Errors are against the float32 reference (kv4_attention_reference).

    python benchmarks/bench_kv_rotation.py out.json          # on a GPU
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks.bench_attention import _inputs, gtime  # noqa: E402
from lowering import kv4_append as kapp  # noqa: E402
from lowering.kv4_attention import kv4_attention_reference, kv4_attention_triton  # noqa: E402
from passes.rotate_kv import kv_rotation  # noqa: E402

PRECISIONS = ("ieee", "tf32x3", "tf32")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64, 256])
    ap.add_argument("--length", type=int, default=1027)
    args = ap.parse_args()
    rot = kv_rotation(128).cuda()
    default_dot = kapp.ROTATION_DOT
    rows = []
    for batch in args.batches:
        q, k, v, caches, pos = _inputs(batch, args.length, "cuda", torch.bfloat16)
        k1, v1 = k[:, :, -1:].contiguous(), v[:, :, -1:].contiguous()
        pos1 = pos[-1:]
        scratch = [c.clone() for c in caches]  # the appends write here: the attention's cache stays as made
        row = {"batch": batch, "length": args.length}
        row["attn_none"] = gtime([lambda: kv4_attention_triton(q, *caches, pos)], 20, 10)
        row["append_none"] = gtime([lambda: kapp.kv4_append(k1, v1, *scratch, pos1, kernels="triton")], 20, 10)
        ref = kv4_attention_reference(q, *caches, pos, None, None, rot).float()
        for prec in PRECISIONS:
            kapp.ROTATION_DOT = prec
            out = kv4_attention_triton(q, *caches, pos, None, None, rot)
            row[f"err_{prec}"] = float((out.float() - ref).abs().max())
            row[f"attn_{prec}"] = gtime([lambda: kv4_attention_triton(q, *caches, pos, None, None, rot)], 20, 10)
            row[f"append_{prec}"] = gtime(
                [lambda: kapp.kv4_append(k1, v1, *scratch, pos1, kernels="triton", rotation=rot)], 20, 10)

        def in_graph():
            qr = (q.float() @ rot).to(q.dtype)
            out = kv4_attention_triton(qr, *caches, pos)
            return (out.float() @ rot.t()).to(out.dtype)

        row["attn_matmuls"] = gtime([in_graph], 20, 10)
        row["err_matmuls"] = float((in_graph().float() - ref).abs().max())
        kapp.ROTATION_DOT = default_dot
        rows.append(row)
        print(row, flush=True)
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)
    cols = ["none", *PRECISIONS]
    print(f"{'B':>4} | " + " ".join(f"{'attn ' + c:>12}" for c in cols) + f" {'attn+2 mm':>12} | "
          + " ".join(f"{'append ' + c:>14}" for c in cols) + " | max err " + " ".join(PRECISIONS) + " mm")
    for r in rows:
        print(f"{r['batch']:>4} | " + " ".join(f"{r['attn_' + c] * 1e3:10.1f}us" for c in cols)
              + f" {r['attn_matmuls'] * 1e3:10.1f}us | " + " ".join(f"{r['append_' + c] * 1e3:12.1f}us" for c in cols)
              + " | " + " ".join(f"{r['err_' + p]:.1e}" for p in (*PRECISIONS, "matmuls")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
