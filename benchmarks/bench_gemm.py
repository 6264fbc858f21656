"""W4A8 GEMM vs its peers at Llama-3-8B shapes: cuBLAS bf16, torch._int_mm (W8A8), torch._scaled_mm
fp8, tinygemm int4 (`_weight_int4pack_mm`, torchao's int4 weight-only kernel), a plain Triton
int8 GEMM, and gemlite's A8W4 / A16W4 layers where gemlite is installed (a wheel carried to the GPU
machine; skipped otherwise). Prints a table, writes JSON. Run on a GPU:

    python benchmarks/bench_gemm.py --out bench_gemm.json                 # stored configs
    python benchmarks/bench_gemm.py --sweep --configs-out cfg.json ...    # tune per bucket, store

Timing: every kernel is captured `--calls` times in one CUDA graph and the replay is timed with
events (median of `--reps` replays, divided by the calls), so Python launch overhead stays out and
back-to-back kernels look as they do under `mode="reduce-overhead"`. The captured calls rotate
over enough copies of the weights (at least 160 MB in all) that no call finds its weights in L2
(50 MB on an H100): memory-bound rows measure HBM, not the cache.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from lowering.activation_quant import quantize_act_int8  # noqa: E402
from lowering import w4a8_gemm as wg  # noqa: E402

SHAPES = [(4096, 4096), (6144, 4096), (14336, 4096), (4096, 14336)]  # (N, K) of Llama-3-8B
MS = [1, 2, 4, 8, 16, 64, 256, 1024, 4096]
ROTATE_BYTES = 160 << 20


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


@triton.jit
def _stream_read_kernel(w_ptr, out_ptr, N, KW, stride_wn, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
                        PREFETCH: tl.constexpr):
    # The calibration kernel for small M: reads the packed weight words once (16-byte loads, a
    # register double buffer) and xors each row down to one word. No unpack, no activations: the
    # time a kernel that only streams these bytes takes in the same CUDA-graph timing, launch and
    # ramp included, which bytes / copy bandwidth leaves out.
    pid = tl.program_id(0)
    rn = tl.minimum(pid * BLOCK_N + tl.arange(0, BLOCK_N), N - 1)
    cols = tl.arange(0, BLOCK_W)
    ptrs = w_ptr + rn[:, None] * stride_wn + cols[None, :]
    acc = tl.zeros([BLOCK_N, BLOCK_W], dtype=tl.int32)
    nxt = tl.load(ptrs, mask=cols[None, :] < KW, other=0)
    for k0 in range(0, KW, BLOCK_W):
        cur = nxt
        if PREFETCH:
            nxt = tl.load(ptrs + k0 + BLOCK_W, mask=(k0 + BLOCK_W + cols)[None, :] < KW, other=0)
        else:
            cur = tl.load(ptrs + k0, mask=(k0 + cols)[None, :] < KW, other=0)
        acc ^= cur
    tl.store(out_ptr + pid * BLOCK_N + tl.arange(0, BLOCK_N), tl.xor_sum(acc, axis=1),
             mask=pid * BLOCK_N + tl.arange(0, BLOCK_N) < N)


STREAM_CONFIGS = [dict(BLOCK_N=4, BLOCK_W=256, PREFETCH=True, num_warps=4),
                  dict(BLOCK_N=2, BLOCK_W=256, PREFETCH=True, num_warps=2),
                  dict(BLOCK_N=8, BLOCK_W=256, PREFETCH=True, num_warps=4),
                  dict(BLOCK_N=4, BLOCK_W=512, PREFETCH=False, num_warps=4)]


def stream_read(q: torch.Tensor, out: torch.Tensor, cfg: dict) -> None:
    w = q.view(torch.int32)
    N, KW = w.shape
    cfg = dict(cfg)
    _stream_read_kernel[(triton.cdiv(N, cfg["BLOCK_N"]),)](w, out, N, KW, w.stride(0), **cfg)


INT8_CONFIGS = [
    dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=4),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4),
    dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=4),
]


def _c(bm, bn, nw, ns, unroll=1, split=1, swap=False, gm=8, vec=False, pf=False):
    return dict(BLOCK_M=bm, BLOCK_N=bn, GROUP_M=gm, SPLIT_K=split, num_warps=nw, num_stages=ns,
                SWAP=swap, UNROLL=unroll, VEC=vec, GEMV=False, **({"PREFETCH_SCALES": True} if pf else {}))


def _g(bm, bn, unroll, nw, prefetch=True, pdl=False, s2_after=False):
    # The CUDA-core GEMV kernel: bn weight rows x unroll 128-wide K chunks per iteration; num_stages
    # 2 = the next tile's loads issued before this one is computed (register double buffer).
    return dict(BLOCK_M=bm, BLOCK_N=bn, GROUP_M=1, SPLIT_K=1, num_warps=nw, num_stages=2 if prefetch else 1,
                SWAP=False, UNROLL=unroll, VEC=False, GEMV=True, PDL=pdl, **({"S2_AFTER": True} if s2_after else {}))


def _gemv_space_s2(bm):
    # v8's progressive unpack (q − z, times s2 after the dot) on the GEMV tiles that won somewhere
    return [_g(bm, 4, 8, 4, s2_after=True), _g(bm, 4, 16, 4, s2_after=True), _g(bm, 8, 4, 4, s2_after=True),
            _g(bm, 16, 4, 4, s2_after=True), _g(bm, 2, 16, 2, s2_after=True), _g(bm, 4, 8, 2, s2_after=True)]





def _gemv_space(bm):
    return [_g(bm, 4, 8, 4), _g(bm, 4, 16, 4), _g(bm, 8, 4, 4), _g(bm, 8, 8, 4), _g(bm, 8, 8, 4, prefetch=False),
            _g(bm, 8, 16, 4), _g(bm, 16, 4, 4), _g(bm, 16, 8, 4), _g(bm, 8, 8, 8), _g(bm, 16, 8, 8),
            _g(bm, 4, 8, 2), _g(bm, 2, 16, 2)]


# The search space per M bucket (bench --sweep times each on every shape and keeps the fastest).
_SMALL = [
    _c(16, 32, 4, 4, 4), _c(16, 32, 4, 3, 4), _c(16, 16, 2, 4, 4), _c(16, 64, 4, 4, 4), _c(16, 64, 4, 3, 4, split=4),
    _c(16, 32, 4, 3, 4, split=4), _c(16, 64, 4, 3, 4, split=2), _c(16, 64, 4, 3, 4, swap=True),
    _c(16, 64, 4, 4, 2, swap=True), _c(16, 64, 4, 4, 2, swap=True, vec=True), _c(16, 128, 8, 3, 4),
    _c(16, 32, 4, 4, 2, vec=True),
    # No software pipeline: plain loads into registers, as the GEMV kernel does, many small CTAs.
    _c(16, 32, 4, 1, 4, gm=1), _c(16, 16, 4, 1, 4, gm=1), _c(16, 64, 4, 1, 2, gm=1), _c(16, 32, 4, 2, 4, gm=1),
]
def _gemv_space8(bm):
    return [_g(bm, 4, 8, 4), _g(bm, 4, 8, 2), _g(bm, 8, 8, 4), _g(bm, 4, 16, 4), _g(bm, 2, 8, 2), _g(bm, 8, 4, 4),
            _g(bm, 16, 4, 4)]


# M = 8-16 (v8): the tensor-core kernel with M padded to 16 (mma.sync: the unpacked weights stay in
# registers) and split-K reduced inside the launch, so wide N tiles (less activation traffic per
# weight byte) still give every SM programs. The v7 winners stay in the race.
_SMALL_SPLIT = [
    _c(16, 16, 2, 4, 4), _c(16, 32, 4, 3, 4), _c(16, 32, 4, 4, 4), _c(16, 64, 4, 3, 4, split=4),
    _c(16, 32, 4, 3, 4, split=4), _c(16, 16, 2, 4, 4, split=2), _c(16, 32, 4, 3, 4, split=2),
    _c(16, 64, 4, 3, 4, split=2), _c(16, 64, 4, 4, 4, split=8), _c(16, 128, 4, 3, 2, split=4),
    _c(16, 128, 4, 3, 2, split=8), _c(16, 128, 8, 3, 4, split=4), _c(16, 32, 4, 3, 4, split=8),
    _c(16, 64, 4, 4, 2, split=4), _c(16, 128, 4, 4, 2, split=2),
    # v9: the UNROLL 4 ones with the group-scale words loaded one iteration ahead
    _c(16, 16, 2, 4, 4, pf=True), _c(16, 32, 4, 3, 4, pf=True), _c(16, 32, 4, 4, 4, pf=True),
    _c(16, 64, 4, 3, 4, split=4, pf=True), _c(16, 32, 4, 3, 4, split=4, pf=True), _c(16, 16, 2, 4, 4, split=2, pf=True),
    _c(16, 32, 4, 3, 4, split=2, pf=True), _c(16, 64, 4, 3, 4, split=2, pf=True), _c(16, 64, 4, 4, 4, split=8, pf=True),
    _c(16, 32, 4, 3, 4, split=8, pf=True), _c(16, 64, 4, 4, 4, pf=True), _c(32, 64, 4, 4, 4, swap=True, pf=True),
]

CANDIDATES = {
    "1": _gemv_space(1) + _gemv_space_s2(1),
    "2": _gemv_space(2) + _gemv_space_s2(2),
    "4": _gemv_space(4) + _gemv_space_s2(4) + _SMALL_SPLIT[:5] + _SMALL_SPLIT[15:20] + [_c(64, 64, 4, 4, 2, swap=True)],
    # Eight tokens: one accumulator tile per token (v7); 9-16 tokens run as two token tiles of 8
    # (the second reads the weight block from L2) or one of 16 (per-iteration reductions).
    "8": [_g(8, 4, 16, 4), _g(8, 4, 8, 2), _g(8, 16, 4, 4)] + _SMALL_SPLIT,
    "16": [_g(8, 4, 8, 2), _g(8, 8, 8, 4)] + _SMALL_SPLIT,
    "64": [_c(32, 64, 4, 4, 2), _c(32, 64, 4, 3, 4), _c(32, 64, 4, 4, 2, vec=True), _c(64, 64, 4, 4, swap=True),
           _c(64, 64, 4, 3, 2, swap=True), _c(32, 64, 4, 3, 2, split=2), _c(64, 128, 4, 4, swap=True),
           _c(64, 64, 4, 4, swap=True, vec=True), _c(32, 64, 4, 4, 2, pf=True), _c(32, 64, 4, 3, 4, pf=True),
           _c(64, 64, 4, 4, swap=True, pf=True), _c(32, 64, 4, 4, 2, vec=True, pf=True)],
    "256": [_c(128, 64, 4, 4), _c(64, 128, 4, 3, 4), _c(128, 128, 8, 3, swap=True), _c(128, 128, 4, 4, swap=True),
            _c(128, 64, 4, 4, swap=True), _c(64, 128, 4, 4, swap=True), _c(64, 128, 4, 4, swap=True, vec=True),
            _c(128, 64, 4, 4, swap=True, vec=True), _c(128, 128, 4, 3, 2, split=2, swap=True),
            _c(128, 128, 4, 3, 2, split=2, swap=True, vec=True), _c(64, 64, 4, 4, swap=True),
            # v8: split-K reduced in the launch: 128x128 tiles (the MMA-efficient ones) on enough SMs
            _c(128, 128, 4, 4, swap=True, split=2), _c(128, 128, 8, 4, swap=True, split=2),
            _c(64, 128, 4, 4, swap=True, split=2), _c(128, 64, 4, 4, swap=True, split=2),
            _c(128, 128, 4, 4, swap=True, split=3),
            # v9: four tiles an iteration with the scale words one iteration ahead
            _c(64, 128, 4, 3, 4, pf=True), _c(128, 128, 4, 4, 4, swap=True, pf=True),
            _c(64, 128, 4, 4, 4, swap=True, pf=True), _c(128, 64, 4, 4, 4, swap=True, pf=True),
            # v10: the prefetch for one or two tiles an iteration, on the v4-v9 winners
            _c(64, 64, 4, 4, swap=True, pf=True), _c(128, 64, 4, 4, swap=True, pf=True),
            _c(128, 128, 8, 4, swap=True, pf=True), _c(128, 128, 8, 3, swap=True, pf=True),
            _c(128, 128, 4, 3, 2, split=2, swap=True, pf=True), _c(64, 128, 4, 4, swap=True, pf=True),
            _c(128, 128, 4, 4, swap=True, split=2, pf=True), _c(128, 64, 4, 4, swap=True, split=2, pf=True)],
    "1024": [_c(128, 128, 4, 4, swap=True), _c(128, 128, 4, 4, swap=True, vec=True), _c(128, 128, 4, 4, swap=True, gm=16),
             _c(128, 128, 4, 4, swap=True, gm=16, vec=True), _c(128, 128, 4, 3, swap=True),
             _c(128, 128, 8, 4, swap=True), _c(128, 128, 8, 4, swap=True, vec=True), _c(128, 256, 8, 2, 4, swap=True),
             _c(256, 128, 8, 3, swap=True), _c(128, 128, 4, 4),
             _c(128, 128, 8, 2, 4, swap=True, pf=True), _c(128, 128, 4, 2, 4, swap=True, pf=True),
             _c(128, 128, 8, 4, swap=True, pf=True), _c(128, 128, 4, 4, swap=True, pf=True),
             _c(128, 128, 8, 4, swap=True, vec=True, pf=True), _c(128, 128, 4, 4, swap=True, gm=16, pf=True),
             _c(256, 128, 8, 3, swap=True, pf=True), _c(128, 128, 8, 3, swap=True, pf=True)],
}
CANDIDATES["4096"] = CANDIDATES["1024"]
CANDIDATES["big"] = CANDIDATES["1024"]


def gtime(calls, n_calls: int, reps: int) -> float:
    """Median ms per call of `n_calls` calls (rotating over `calls`) captured in one CUDA graph."""
    for f in calls:
        f()
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for f in calls:
            f()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, stream=side):  # the warmed-up stream: split-K counters are per stream
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


def measure_bandwidth() -> float:
    x = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    for _ in range(20):  # let the clocks come up before measuring (the first run read low)
        y.copy_(x)
    ms = gtime([lambda: y.copy_(x)], 10, 10)
    # do_bench's way too (one copy between events): the higher reading is the honest ceiling.
    ms2 = triton.testing.do_bench(lambda: y.copy_(x), warmup=25, rep=200, return_mode="median")
    return 2 * x.numel() / min(ms, ms2) / 1e9  # TB/s (read + write)


def _copies(nbytes: int) -> int:
    return max(1, min(32, math.ceil(ROTATE_BYTES / nbytes)))


def _weights(N: int, K: int, fmt: str, dev: str):
    from passes.quantize import quantize_per_channel, quantize_progressive

    w = torch.randn(N, K, device=dev, dtype=torch.bfloat16)
    qw = quantize_progressive(w, 128) if fmt == "g128" else quantize_per_channel(w)
    return [(qw.qweight.clone(), qw.wscale.clone(), None if qw.gscale is None else qw.gscale.clone(), qw.gzero.clone())
            for _ in range(_copies(qw.qweight.numel()))]


def _ours(x8, xs, xsum, copies, cfg):
    return [lambda c=c: wg.w4a8_gemm_triton(x8, xs, xsum, c[0], c[1], c[2], c[3], None, torch.bfloat16, config=cfg)
            for c in copies]


# ---- parallel precompile: every (shape, M, format, config) once, in worker processes ----------------

def _compile_job(job):
    N, K, M, fmt, cfgs, int8 = job
    import torch as _t
    dev = "cuda"
    fails = []
    x8 = _t.randint(-127, 128, (M, K), device=dev, dtype=_t.int8)
    xs = _t.rand(M, device=dev)
    xsum = x8.sum(-1, dtype=_t.int32)
    q = _t.randint(0, 256, (N, K // 2), device=dev, dtype=_t.uint8)
    ws = _t.rand(N, device=dev)
    if fmt == "g128":
        gs = _t.ones(N, K // 128, device=dev, dtype=_t.uint8)
        gz = _t.zeros(N, K // 128, device=dev, dtype=_t.uint8)
    else:
        gs, gz = None, _t.zeros(N, device=dev, dtype=_t.int32)
    if M <= 16 and wg.PDL_AVAILABLE:  # the sweep also times each small-M winner as a PDL launch
        cfgs = cfgs + [dict(c, PDL=True) for c in cfgs]
    for cfg in cfgs:
        try:
            wg.w4a8_gemm_triton(x8, xs, xsum, q, ws, gs, gz, None, _t.bfloat16, config=cfg)
        except Exception as e:  # out of shared memory etc.: the sweep skips it
            fails.append((cfg, repr(e)[:200]))
    if int8:
        w8 = _t.randint(-127, 128, (N, K), device=dev, dtype=_t.int8)
        for c in INT8_CONFIGS:
            try:
                triton_int8_gemm(x8, w8, c)
            except Exception as e:
                fails.append((c, repr(e)[:200]))
    _t.cuda.synchronize()
    return fails


def precompile(shapes, ms_list, formats, workers: int):
    jobs = []
    for N, K in shapes:
        for M in ms_list:
            for i, fmt in enumerate(formats):
                cfgs = CANDIDATES[wg.m_bucket(M)]
                for j in range(0, len(cfgs), 4):  # small jobs spread well over the workers
                    jobs.append((N, K, M, fmt, cfgs[j:j + 4], M >= 64 and i == 0 and j == 0))
    t0 = time.time()
    import multiprocessing as mp
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as ex:
        fails = [f for r in ex.map(_compile_job, jobs) for f in r]
    print(f"precompiled {len(jobs)} jobs in {time.time() - t0:.0f} s, {len(fails)} configs failed", flush=True)
    for f in fails[:10]:
        print("  failed:", f)


# ---- the run --------------------------------------------------------------------------------------

def gemlite_layers(N: int, K: int, dev: str) -> dict:
    """gemlite's A8W4 (int8 activations, quantized per token inside the layer, as its helper builds it
    with fp8=torch.int8) and A16W4 (bf16 activations) layers over g128 asymmetric 4-bit weights, one
    layer per weight copy; {} where gemlite is not installed."""
    try:
        from gemlite.helper import A8W4_HQQ_INT_dynamic, A16W4_HQQ_INT
    except ImportError:
        return {}
    wq = torch.randint(0, 16, (N, K), device=dev, dtype=torch.uint8)
    scales = torch.rand(N, K // 128, device=dev, dtype=torch.bfloat16) * 0.01 + 0.001
    zeros = torch.full((N, K // 128), 8.0, device=dev, dtype=torch.bfloat16)
    makers = {"gemlite_a8w4": lambda: A8W4_HQQ_INT_dynamic(device=dev, dtype=torch.bfloat16, fp8=torch.int8),
              "gemlite_a16w4": lambda: A16W4_HQQ_INT(device=dev, dtype=torch.bfloat16)}
    layers = {}
    for name, make in makers.items():
        try:
            layers[name] = [make().from_weights(wq.clone(), scales.clone(), zeros.clone())
                            for _ in range(_copies(N * K // 2))]
        except Exception as e:  # noqa: BLE001 - an API or kernel gemlite cannot build here: say so, go on
            print(f"{name} unavailable at {N}x{K}: {e!r}"[:200], flush=True)
    return layers


def run(args) -> list[dict]:
    dev = "cuda"
    torch.manual_seed(0)
    bw = measure_bandwidth()
    n_calls, reps = args.calls, args.reps
    rows, sweep = [], []
    tuned: dict = {"progressive": {}, "per_channel": {}}
    meta = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
            "triton": triton.__version__, "copy_bandwidth_TBps": bw, "timing": f"CUDA graph of {n_calls} calls, "
            f"median of {reps} replays, weights rotated over >= {ROTATE_BYTES >> 20} MB",
            "commit": _git_commit()}

    def dump():  # after every shape, so a run cut short still leaves its rows
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"meta": meta, "rows": rows, "sweep": sweep}, f, indent=1)
        if args.sweep and args.configs_out:
            write_configs(args.configs_out, tuned, sweep, meta)
    for N, K in args.shapes:
        qws = {fmt: _weights(N, K, fmt, dev) for fmt in args.formats}
        w = torch.randn(N, K, device=dev, dtype=torch.bfloat16)
        wb = [w] + [w.clone() for _ in range(_copies(w.numel() * 2) - 1)]
        w8 = torch.randint(-127, 128, (N, K), device=dev, dtype=torch.int8)
        w8s = [w8] + [w8.clone() for _ in range(_copies(w8.numel()) - 1)]
        wf8 = [t.to(torch.float8_e4m3fn) for t in w8s]
        scale_w = torch.ones(1, N, device=dev)
        tiny = []
        try:
            wq = torch.randint(0, 16, (N, K // 2), device=dev, dtype=torch.uint8)
            packed = torch.ops.aten._convert_weight_to_int4pack(wq, 8)
            sz = torch.randn(K // 128, N, 2, device=dev, dtype=torch.bfloat16)
            tiny = [(packed.clone(), sz.clone()) for _ in range(_copies(packed.numel() * packed.element_size()))]
        except Exception as e:  # tinygemm's packing API moved between releases
            print("tinygemm unavailable:", e)
        gemlite = gemlite_layers(N, K, dev)
        for M in args.m:
            x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
            x8 = torch.randint(-127, 128, (M, K), device=dev, dtype=torch.int8)
            xs = torch.rand(M, device=dev)
            xsum = x8.sum(-1, dtype=torch.int32)
            row = {"M": M, "N": N, "K": K}
            row["bf16_cublas"] = gtime([lambda t=t: x @ t.t() for t in wb], n_calls, reps)
            # torch._int_mm takes M >= 17 only: below that it runs on the rows padded to 32, as a W8A8
            # caller would have to.
            x8i = x8 if M >= 17 else torch.cat([x8, x8.new_zeros(32 - M, K)])
            row["int_mm"] = gtime([lambda t=t: torch._int_mm(x8i, t.t()) for t in w8s], n_calls, reps)
            if M < 17:
                row["int_mm_rows"] = 32
            xf8 = x.to(torch.float8_e4m3fn)
            sa = torch.ones(M, 1, device=dev)
            row["fp8_scaled_mm"] = gtime([lambda t=t: torch._scaled_mm(
                xf8, t.t(), scale_a=sa, scale_b=scale_w, out_dtype=torch.bfloat16) for t in wf8], n_calls, reps)
            if tiny:
                row["tinygemm_int4"] = gtime([lambda t=t: torch.ops.aten._weight_int4pack_mm(x, t[0], 128, t[1])
                                              for t in tiny], n_calls, reps)
            for name, layers in gemlite.items():
                try:  # gemlite autotunes on a new M: the warm-up calls of gtime run it before the capture
                    row[name] = gtime([lambda lay=lay: lay(x) for lay in layers], n_calls, reps)
                except Exception as e:  # noqa: BLE001
                    print(f"{name} failed at M={M} {N}x{K}: {e!r}"[:200], flush=True)
            if M <= 16:
                qs = [c[0] for c in qws[args.formats[0]]]
                sink = torch.empty(N, dtype=torch.int32, device=dev)
                row["stream_read"] = min(gtime([lambda q=q, c=c: stream_read(q, sink, c) for q in qs], n_calls, reps)
                                         for c in STREAM_CONFIGS)
            if M >= 64:
                row["triton_int8"] = min(gtime([lambda c=c, t=t: triton_int8_gemm(x8, t, c) for t in w8s], n_calls, reps)
                                         for c in INT8_CONFIGS)
            bucket = wg.m_bucket(M)
            for fmt in args.formats:
                copies = qws[fmt]
                key = "progressive" if fmt == "g128" else "per_channel"
                if args.sweep:
                    best = None
                    c0 = copies[0]
                    # Checked in bf16 output (the timed specialization, already compiled), so within rounding.
                    ref = wg.w4a8_gemm_reference(x8, xs, xsum, c0[0], c0[1], c0[2], c0[3], None, torch.bfloat16).float()
                    for cfg in CANDIDATES[bucket]:
                        if (cfg["VEC"] or cfg.get("PREFETCH_SCALES") or cfg.get("S2_AFTER")) and fmt != "g128":
                            continue  # only the group scales have word-load / prefetch variants
                        try:
                            got = wg.w4a8_gemm_triton(x8, xs, xsum, c0[0], c0[1], c0[2], c0[3], None,
                                                      torch.bfloat16, config=cfg).float()
                            if not torch.allclose(got, ref, rtol=1e-2, atol=1e-2 * float(ref.abs().max())):
                                print("  WRONG", cfg, float((got - ref).abs().max()), flush=True)
                                continue
                            ms = gtime(_ours(x8, xs, xsum, copies, cfg), n_calls, reps)
                        except Exception as e:  # noqa: BLE001 - a config that does not fit is skipped
                            print("  skip", cfg, repr(e)[:120])
                            continue
                        sweep.append({"M": M, "N": N, "K": K, "fmt": fmt, "cfg": cfg, "ms": ms})
                        if best is None or ms < best[0]:
                            best = (ms, cfg)
                    if M <= 16 and wg.PDL_AVAILABLE:
                        # The ranking above is of plain launches. Then the winner as a programmatic
                        # dependent: kept when clearly faster back to back (after a plain kernel, as
                        # in a decode step, it measured the same: NOTES.md, v6). A tie stays plain:
                        # PDL tensor-core kernels were much slower on other shapes (v7), their
                        # early, waiting programs holding shared memory.
                        twin = dict(best[1], PDL=True)
                        try:
                            ms = gtime(_ours(x8, xs, xsum, copies, twin), n_calls, reps)
                            sweep.append({"M": M, "N": N, "K": K, "fmt": fmt, "cfg": twin, "ms": ms})
                            if ms < 0.97 * best[0]:
                                best = (ms, twin)
                        except Exception as e:  # noqa: BLE001 - a Triton without launch_pdl
                            print("  no PDL:", repr(e)[:120])
                    tuned[key].setdefault(f"{N},{K}", {})[bucket] = best[1]
                    cfg = best[1]
                else:
                    cfg = dict(zip(wg.CONFIG_KEYS, wg.choose_config(bucket, N, K, fmt == "g128", 0, min(M, 4096))))
                row[f"qoq_{fmt}"] = gtime(_ours(x8, xs, xsum, copies, cfg), n_calls, reps)
                row[f"qoq_{fmt}_cfg"] = cfg
                if cfg.get("GEMV") and fmt == "g128":
                    # The GEMV's two progressive unpacks (v7: q·s2 − z·s2 per byte; v8: q − z, times
                    # s2 after the dot) on the chosen tiles, in the same run, for the comparison.
                    for flag in (False, True):
                        row[f"qoq_g128_s2_after_{flag}"] = gtime(
                            _ours(x8, xs, xsum, copies, dict(cfg, S2_AFTER=flag)), n_calls, reps)
                row[f"qoq_{fmt}_with_act_quant"] = gtime([lambda c=c: wg.w4a8_gemm_triton(
                    *quantize_act_int8(x, "triton"), c[0], c[1], c[2], c[3], None, torch.bfloat16, config=cfg)
                    for c in copies], n_calls, reps)
                if cfg.get("PDL"):
                    # Back to back, a PDL kernel overlaps its own previous call; after the activation
                    # quantization (a plain kernel, as in a decode step) only its launch overlaps.
                    # Both, and the same config without PDL, so the gain is visible apart.
                    plain = dict(cfg, PDL=False)
                    row[f"qoq_{fmt}_nopdl"] = gtime(_ours(x8, xs, xsum, copies, plain), n_calls, reps)
                    row[f"qoq_{fmt}_with_act_quant_nopdl"] = gtime([lambda c=c: wg.w4a8_gemm_triton(
                        *quantize_act_int8(x, "triton"), c[0], c[1], c[2], c[3], None, torch.bfloat16, config=plain)
                        for c in copies], n_calls, reps)
            wbytes = N * K / 2 + N * K / 64 + M * K + M * N * 2  # packed weights, g128 scales, x8, y
            row["roofline_mem_ms"] = wbytes / (bw * 1e12) * 1e3
            row["roofline_int8_ms"] = 2 * M * N * K / 1030e12 * 1e3  # the plain Triton int8 GEMM peak (anchor)
            rows.append(row)
            print(_fmt(row), flush=True)
        dump()
    dump()
    print(meta)
    return rows


def run_act_quant(args) -> list[dict]:
    """The cost of per-token activation quantization after an RMSNorm (issue 6: no extra pass over X).

    Three ways, each in the same CUDA-graph timing: the norm alone (Inductor), the norm with the
    quantization fused into it (Inductor, through the op's decomposition), and the norm followed by
    our separate quantization kernel (what eager / `inductor=False` runs).
    """
    from lowering.activation_quant import quantize_act_int8_triton

    def norm(x, res, w):
        h = (x + res).float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return w * h.to(x.dtype)

    norm_c = torch.compile(norm)
    fused_c = torch.compile(lambda x, res, w: torch.ops.qoq.quantize_act_int8(norm(x, res, w), "auto"))
    rows = []
    for K in (4096, 14336):
        w = torch.rand(K, device="cuda", dtype=torch.bfloat16) + 0.5
        for M in (1, 16, 256, 4096):
            torch._dynamo.reset()
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            res = torch.randn_like(x)
            row = {"M": M, "K": K}
            row["norm_ms"] = gtime([lambda: norm_c(x, res, w)], args.calls, args.reps)
            row["norm_fused_quant_ms"] = gtime([lambda: fused_c(x, res, w)], args.calls, args.reps)
            row["norm_then_quant_kernel_ms"] = gtime([lambda: quantize_act_int8_triton(norm_c(x, res, w))],
                                                     args.calls, args.reps)
            got = fused_c(x, res, w)
            want = quantize_act_int8_triton(norm_c(x, res, w))
            row["codes_equal_to_separate_kernel_fraction"] = float((got[0] == want[0]).float().mean())
            rows.append(row)
            print(f"act-quant M={M:5d} K={K:5d} norm {1e3 * row['norm_ms']:.1f} us, norm+quant fused "
                  f"{1e3 * row['norm_fused_quant_ms']:.1f} us, norm then quant kernel "
                  f"{1e3 * row['norm_then_quant_kernel_ms']:.1f} us, same codes "
                  f"{100 * row['codes_equal_to_separate_kernel_fraction']:.3f}%", flush=True)
    return rows


def write_configs(path: str, tuned: dict, sweep: list, meta: dict) -> None:
    """Best config per (format, shape, bucket), plus per bucket the best geometric mean over shapes.

    Merged into the file at `path` when it exists: a sweep over some buckets (say the small-M ones)
    replaces those entries and keeps the rest.
    """
    old = {}
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        if old.get("layout", wg.PACK_LAYOUT) != wg.PACK_LAYOUT:
            old = {}  # configs tuned for another packed layout say nothing about this one
    default: dict = {"progressive": {}, "per_channel": {}}
    for key, fmt in (("progressive", "g128"), ("per_channel", "chn")):
        by_bucket: dict = {}
        for r in sweep:
            if r["fmt"] != fmt:
                continue
            b = wg.m_bucket(r["M"])
            by_bucket.setdefault(b, {}).setdefault(json.dumps(r["cfg"], sort_keys=True), []).append(r["ms"])
        for b, d in by_bucket.items():
            n = max(len(v) for v in d.values())
            score = {c: math.exp(sum(math.log(t) for t in v) / len(v)) for c, v in d.items() if len(v) == n}
            default[key][b] = json.loads(min(score, key=score.get))
    configs = old.get("configs", {})
    defaults = old.get("default", {})
    for key in ("progressive", "per_channel"):
        for shape, per_bucket in tuned.get(key, {}).items():
            configs.setdefault(key, {}).setdefault(shape, {}).update(per_bucket)
        defaults.setdefault(key, {}).update(default[key])
    sources = old.get("sources", [old["source"]] if "source" in old else [])
    line = (f"bench_gemm.py --sweep, {meta['date']}, buckets "
            + ",".join(sorted({wg.m_bucket(r['M']) for r in sweep}, key=lambda b: (len(b), b))))
    if not sources or sources[-1] != line:  # dump() rewrites the file after every shape
        sources.append(line)
    with open(path, "w") as f:
        json.dump({"device": meta["device"], "date": meta["date"], "triton": meta["triton"],
                   "layout": wg.PACK_LAYOUT, "configs": configs, "default": defaults, "sources": sources}, f, indent=1)


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except Exception:  # noqa: BLE001
        return ""


def _fmt(r: dict) -> str:
    base = r["bf16_cublas"]
    parts = [f"M={r['M']:5d} N={r['N']:5d} K={r['K']:5d} bf16={base:.4f}ms"]
    for k in ("qoq_g128", "qoq_chn", "qoq_g128_with_act_quant", "gemlite_a8w4", "gemlite_a16w4", "int_mm",
              "triton_int8", "tinygemm_int4", "fp8_scaled_mm"):
        if k in r:
            parts.append(f"{k}={r[k]:.4f} ({base / r[k]:.2f}x)")
    roof = max(r["roofline_mem_ms"], r["roofline_int8_ms"])
    parts.append(f"roof={roof:.4f}")
    if "qoq_g128" in r:
        parts.append(f"g128%roof={100 * roof / r['qoq_g128']:.0f}")
    return " ".join(parts)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="write the rows (and the sweep) as JSON here")
    p.add_argument("--m", type=int, nargs="*", default=MS)
    p.add_argument("--quick", action="store_true", help="first two shapes only")
    p.add_argument("--shapes", default=None, help="NxK,... weight shapes instead of Llama-3-8B's four "
                   "(e.g. the fused q/k/v 6144x4096 and gate/up 28672x4096)")
    p.add_argument("--formats", nargs="*", default=["g128", "chn"])
    p.add_argument("--sweep", action="store_true", help="time every candidate config, keep the best")
    p.add_argument("--configs-out", default=None, help="with --sweep: write the tuned configs JSON here")
    p.add_argument("--precompile", type=int, default=0, metavar="WORKERS",
                   help="compile every candidate in this many processes first (fills Triton's disk cache)")
    p.add_argument("--precompile-only", action="store_true")
    p.add_argument("--calls", type=int, default=20)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--act-quant", action="store_true",
                   help="only time RMSNorm + activation quantization (fused by Inductor vs our separate kernel)")
    a = p.parse_args()
    if a.act_quant:
        rows = run_act_quant(a)
        if a.out:
            with open(a.out, "w") as f:
                json.dump({"meta": {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"),
                                    "torch": torch.__version__, "triton": triton.__version__, "commit": _git_commit()},
                           "act_quant": rows}, f, indent=1)
        return
    if a.shapes:
        a.shapes = [tuple(int(v) for v in spec.lower().split("x")) for spec in a.shapes.split(",")]
    else:
        a.shapes = SHAPES[:2] if a.quick else SHAPES
    if a.precompile:
        # N and K are runtime arguments (specialized only on divisibility, the same for every shape
        # here), so one shape compiles every variant the others will use.
        precompile(a.shapes[:1], a.m, a.formats, a.precompile)
        if a.precompile_only:
            return
    run(a)


if __name__ == "__main__":
    main()
