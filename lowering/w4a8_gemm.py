"""The W4A8 GEMM: int8 per-token activations times packed 4-bit weights, int8 MMA, int32 accumulation.

Two weight formats (DESIGN.md): QoQ progressive (per-channel int8 scale `s1`, then per-group uint4
with integer scale `s2` and zero, dequantized to int8 in registers as `q·s2 − z·s2` byte-wise) and
per-channel uint4 (`s·(q − z)`, the zero applied in the epilogue through the token's code sum).

Layout (PACK_LAYOUT = "k128-halves"): `qweight[n, :]` is K padded to a multiple of 128, cut into
chunks of 128; byte j (0..63) of a chunk holds k = j in its low nibble and k = 64 + j in its high
nibble. So one 64-byte run of a row splits into two int8 tiles, each contiguous along K, with one
mask (low) or one shift and mask (high) per 32-bit word: no byte shuffles, no interleaving join,
and the kernel feeds each half to its own `tl.dot` against the matching half of the activations.

Two kernels read that layout: the tensor-core kernel (any M) and, for a few tokens (decode), a GEMV
kernel on CUDA cores that streams the same bytes as int32 words and multiplies with `dp4a`. Which
one runs, and with which tiles, is data: the per-GPU JSON in `configs/`, keyed by M bucket.
"""
from __future__ import annotations

import functools
import json
import os
import re
from typing import Optional

import torch
import triton
import triton.language as tl

from lowering.dispatch import allocate_outside_graph_pools, cdiv, interpreter_enabled, use_triton

try:  # programmatic dependent launch (Hopper+); Triton builds without it never get PDL configs
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    PDL_AVAILABLE = True
except ImportError:  # pragma: no cover - depends on the Triton build
    gdc_launch_dependents = gdc_wait = None
    PDL_AVAILABLE = False

K_PAD = 128  # packed K is a multiple of this: the kernel's K tile, two 64-wide halves
HALF = 64
# Saved artifacts hold packed bytes: whoever stores them should record this and refuse a mismatch.
PACK_LAYOUT = "k128-halves"


def pack_nibbles(q: torch.Tensor, multiple: int = K_PAD) -> torch.Tensor:
    """q [N, K] with values in [0, 15] -> [N, Kp/2] uint8, Kp = K padded to `multiple` (a multiple of 128).

    In each 128-wide chunk of K, byte j holds k = j (low nibble) and k = j + 64 (high nibble).
    """
    assert multiple % K_PAD == 0, "the layout works in chunks of 128"
    N, K = q.shape
    Kp = cdiv(K, multiple) * multiple
    qp = torch.zeros((N, Kp), dtype=torch.uint8, device=q.device)
    qp[:, :K] = q.to(torch.uint8)
    qp = qp.view(N, Kp // K_PAD, 2, HALF)
    return (qp[:, :, 0] | (qp[:, :, 1] << 4)).reshape(N, Kp // 2)


def unpack_nibbles(packed: torch.Tensor, K: int) -> torch.Tensor:
    """Inverse of pack_nibbles: [N, Kp/2] uint8 -> [N, K] uint8 in [0, 15]."""
    N = packed.shape[0]
    p = packed.reshape(N, -1, HALF)
    return torch.stack((p & 0x0F, p >> 4), dim=2).reshape(N, -1)[:, :K]


def dequantize_int8_weight(qweight: torch.Tensor, gscale: Optional[torch.Tensor], gzero: torch.Tensor, K: int) -> torch.Tensor:
    """The int8 weight the GEMM multiplies by, as int32 [N, K].

    Progressive: `q·s2 − z·s2` per group (exact in int8, guaranteed by the protective range).
    Per-channel: `q` itself; the zero `z[n]` stays out of the product and is applied in the epilogue.
    """
    q = unpack_nibbles(qweight, qweight.shape[1] * 2).to(torch.int32)
    if gscale is not None:
        G = gscale.shape[1]
        group = q.shape[1] // G
        s2 = gscale.to(torch.int32).repeat_interleave(group, dim=1)
        zs = gzero.to(torch.int32).repeat_interleave(group, dim=1)
        q = q * s2 - zs
    return q[:, :K]


def w4a8_gemm_reference(
    x8: torch.Tensor, sx: torch.Tensor, xsum: torch.Tensor, qweight: torch.Tensor, wscale: torch.Tensor,
    gscale: Optional[torch.Tensor], gzero: torch.Tensor, bias: Optional[torch.Tensor], out_dtype: torch.dtype,
    lr_act: Optional[torch.Tensor] = None, l_up: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The spec: exact integer accumulation (float64 holds every int8·int8 sum of K < 2^38 terms exactly);
    the low-rank branch lr_act [..., r] · l_up [r, N] (SVDQuant's 16-bit path) added in fp32 before the
    output's rounding."""
    K = x8.shape[-1]
    w = dequantize_int8_weight(qweight, gscale, gzero, K)
    acc = x8.double() @ w.double().t()
    if gscale is None:
        acc = acc - xsum.double()[..., None] * gzero.double()
    y = acc.float() * sx[..., None] * wscale
    if lr_act is not None:
        y = y + lr_act.float() @ l_up.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


# Splits four packed bytes into their low nibbles (k = j..j+3) and high nibbles (k = j+64..j+67)
# and applies the group's integer scale and zero on whole 32-bit words: one instruction handles
# four weights. s2 and z·s2 arrive as bytes replicated over the word (they are constant along a
# row's half-tile); the product q·s2 <= 15·16 stays inside each byte, and the byte-wise subtraction
# (SWAR: set the top bits, subtract the low seven, fix the top bits with an xor) keeps borrows from
# crossing bytes. ptxas folds the and/not/xor chains into LOP3s and shares the per-row masks.
_UNPACK_PROGRESSIVE_ASM = tl.constexpr("""
{
.reg .b32 sl, sh, lo, hi, t0, t1;
and.b32 sl, $3, 0xFF;
and.b32 sh, $5, 0xFF;
and.b32 lo, $2, 0x0F0F0F0F;
shr.u32 hi, $2, 4;
and.b32 hi, hi, 0x0F0F0F0F;
mul.lo.u32 lo, lo, sl;
mul.lo.u32 hi, hi, sh;
and.b32 t1, $4, 0x7F7F7F7F;
or.b32 t0, lo, 0x80808080;
sub.u32 t0, t0, t1;
xor.b32 t1, lo, $4;
not.b32 t1, t1;
and.b32 t1, t1, 0x80808080;
xor.b32 $0, t0, t1;
and.b32 t1, $6, 0x7F7F7F7F;
or.b32 t0, hi, 0x80808080;
sub.u32 t0, t0, t1;
xor.b32 t1, hi, $6;
not.b32 t1, t1;
and.b32 t1, t1, 0x80808080;
xor.b32 $1, t0, t1;
}
""")

_UNPACK_PER_CHANNEL_ASM = tl.constexpr("""
{
.reg .b32 t;
and.b32 $0, $2, 0x0F0F0F0F;
shr.u32 t, $2, 4;
and.b32 $1, t, 0x0F0F0F0F;
}
""")


@triton.jit
def _unpack_halves(b, s_lo, z_lo, s_hi, z_hi, PROGRESSIVE: tl.constexpr, USE_ASM: tl.constexpr):
    """uint8 [BN, 64] packed bytes -> (lo, hi) int8 [BN, 64]: the weights of the two K halves."""
    if USE_ASM:
        if PROGRESSIVE:
            lo, hi = tl.inline_asm_elementwise(
                _UNPACK_PROGRESSIVE_ASM, "=r,=r,r,r,r,r,r", [b, s_lo, z_lo, s_hi, z_hi],
                dtype=(tl.int8, tl.int8), is_pure=True, pack=4,
            )
        else:
            lo, hi = tl.inline_asm_elementwise(
                _UNPACK_PER_CHANNEL_ASM, "=r,=r,r", [b],
                dtype=(tl.int8, tl.int8), is_pure=True, pack=4,
            )
    else:
        # The same bits, one byte at a time: uint8 arithmetic wraps mod 256 exactly as the
        # word-level code does per byte.
        lo = b & 0x0F
        hi = b >> 4
        if PROGRESSIVE:
            lo = lo * s_lo - z_lo
            hi = hi * s_hi - z_hi
        lo = lo.to(tl.int8, bitcast=True)
        hi = hi.to(tl.int8, bitcast=True)
    return lo, hi


@triton.jit
def _split4(v4, BLOCK_N: tl.constexpr):
    """[BLOCK_N, 4] -> its four columns (two splits of the last axis; free when a thread holds the row)."""
    va, vb = tl.split(tl.reshape(v4, (BLOCK_N, 2, 2)))
    v0, v2 = tl.split(va)
    v1, v3 = tl.split(vb)
    return v0, v1, v2, v3


@triton.jit
def _load_scales(gs_rows, gz_rows, t, GROUP_SIZE: tl.constexpr, PROGRESSIVE: tl.constexpr,
                 VEC_SCALES: tl.constexpr, BLOCK_N: tl.constexpr):
    """(s2, z·s2) of the low and high halves of K tile t, [BLOCK_N] uint8 each (groups of >= 64)."""
    if PROGRESSIVE and VEC_SCALES:
        # Group 128: load the aligned 4-byte word of each row that holds tile t's group. Four
        # bytes is wide enough for the async-copy pipeline, so the load leaves the loop's
        # critical path (single-byte loads stalled every iteration; worst at K = 14336).
        g0 = tl.multiple_of((t // 4) * 4, 4)
        s0, s1, s2, s3 = _split4(tl.load(gs_rows[:, None] + g0 + tl.arange(0, 4)[None, :]), BLOCK_N)
        z0, z1, z2, z3 = _split4(tl.load(gz_rows[:, None] + g0 + tl.arange(0, 4)[None, :]), BLOCK_N)
        r = t % 4
        s_lo = tl.where(r == 0, s0, tl.where(r == 1, s1, tl.where(r == 2, s2, s3)))
        z_lo = tl.where(r == 0, z0, tl.where(r == 1, z1, tl.where(r == 2, z2, z3)))
        s_hi = s_lo
        z_hi = z_lo
    elif PROGRESSIVE and GROUP_SIZE >= 64:
        g_lo = (t * 128) // GROUP_SIZE
        s_lo = tl.load(gs_rows + g_lo)
        z_lo = tl.load(gz_rows + g_lo)
        if GROUP_SIZE % 128 == 0:  # both halves in one group
            s_hi = s_lo
            z_hi = z_lo
        else:
            s_hi = tl.load(gs_rows + g_lo + 1)
            z_hi = tl.load(gz_rows + g_lo + 1)
    else:
        s_lo = tl.load(gs_rows)  # unused
        z_lo = s_lo
        s_hi = s_lo
        z_hi = s_lo
    return s_lo, z_lo, s_hi, z_hi


@triton.jit
def _tile(acc, x_rows, x_mask, w_rows, gs_rows, gz_rows, t, K, offs_h, sc,
          GROUP_SIZE: tl.constexpr, PROGRESSIVE: tl.constexpr, USE_ASM: tl.constexpr, EVEN_K: tl.constexpr,
          SWAP: tl.constexpr, BLOCK_N: tl.constexpr):
    """acc += x[:, tile t] · W[:, tile t]^T for one 128-wide K tile (two 64-wide halves)."""
    k_lo = t * 128 + offs_h
    k_hi = k_lo + 64
    if EVEN_K:
        a_lo = tl.load(x_rows + k_lo[None, :], mask=x_mask, other=0)
        a_hi = tl.load(x_rows + k_hi[None, :], mask=x_mask, other=0)
    else:
        a_lo = tl.load(x_rows + k_lo[None, :], mask=x_mask & (k_lo[None, :] < K), other=0)
        a_hi = tl.load(x_rows + k_hi[None, :], mask=x_mask & (k_hi[None, :] < K), other=0)
    b = tl.load(w_rows + (t * 64 + offs_h)[None, :])
    if PROGRESSIVE:
        if GROUP_SIZE >= 64:
            s_lo = tl.broadcast_to(sc[0][:, None], (BLOCK_N, 64))
            z_lo = tl.broadcast_to(sc[1][:, None], (BLOCK_N, 64))
            s_hi = tl.broadcast_to(sc[2][:, None], (BLOCK_N, 64))
            z_hi = tl.broadcast_to(sc[3][:, None], (BLOCK_N, 64))
        else:
            # Groups narrower than a half (32): per-element scale indices (correct, slower).
            s_lo = tl.load(gs_rows[:, None] + (k_lo // GROUP_SIZE)[None, :])
            z_lo = tl.load(gz_rows[:, None] + (k_lo // GROUP_SIZE)[None, :])
            s_hi = tl.load(gs_rows[:, None] + (k_hi // GROUP_SIZE)[None, :])
            z_hi = tl.load(gz_rows[:, None] + (k_hi // GROUP_SIZE)[None, :])
        lo, hi = _unpack_halves(b, s_lo, z_lo, s_hi, z_hi, PROGRESSIVE, USE_ASM)
    else:
        lo, hi = _unpack_halves(b, b, b, b, b, PROGRESSIVE, USE_ASM)
    if SWAP:
        acc = tl.dot(lo, tl.trans(a_lo), acc, out_dtype=tl.int32)
        acc = tl.dot(hi, tl.trans(a_hi), acc, out_dtype=tl.int32)
    else:
        acc = tl.dot(a_lo, tl.trans(lo), acc, out_dtype=tl.int32)
        acc = tl.dot(a_hi, tl.trans(hi), acc, out_dtype=tl.int32)
    return acc


@triton.jit
def _w4a8_gemm_kernel(
    # A8 activations: codes [M, K] int8, scale [M] fp32, code sum [M] int32
    x_ptr, sx_ptr, xsum_ptr,
    # W4 weights: packed [N, Kp/2] uint8, per-channel scale [N] fp32,
    # group scale s2 [N, G] uint8 and z·s2 [N, G] uint8 (progressive) or zero [N] int32 (per-channel)
    w_ptr, ws_ptr, gs_ptr, gz_ptr,
    b_ptr, y_ptr,  # bias [N] (optional), output [M, N]
    lr_ptr, lup_ptr,  # low-rank branch (optional): X̂·L_down [M, R] and L_up [R, N], 16-bit
    # split-K only: int32 partial tiles [tiles, SPLIT_K, BLOCK_M * BLOCK_N] and one arrival counter
    # per output tile (zero between launches: the last split of a tile puts it back to zero)
    part_ptr, count_ptr,
    M, N, K, R,
    stride_xm, stride_wn, stride_gn, stride_ym, stride_lrm, stride_lur,
    GROUP_SIZE: tl.constexpr, PROGRESSIVE: tl.constexpr, HAS_BIAS: tl.constexpr, USE_ASM: tl.constexpr,
    HAS_LR: tl.constexpr, BLOCK_R: tl.constexpr, LR_IEEE: tl.constexpr,
    EVEN_K: tl.constexpr,  # K % 128 == 0: no K mask on the activation loads
    WORD_SCALES_OK: tl.constexpr,  # group 128, G % 4 == 0: group scales can be read as aligned 4-byte words
    VEC_SCALES: tl.constexpr,  # ... and are, at UNROLL 1 and 2 (tuned: it wins at K = 14336, loses at 4096)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr,
    SWAP: tl.constexpr,  # weights as the MMA's A operand
    UNROLL: tl.constexpr,  # K tiles per loop iteration (1, 2 or 4)
    USE_PDL: tl.constexpr,  # launched as a programmatic dependent: only the launch overlaps here
    PREFETCH_SCALES: tl.constexpr,  # progressive: load the next iteration's group scales during this one
):
    if USE_PDL:
        gdc_launch_dependents()
        gdc_wait()
    # Grouped tile order so consecutive programs share weight tiles in L2.
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    # Out-of-range rows wrap onto real ones instead of being masked, so the main-loop loads carry
    # no row masks and stay 16-byte vectors; their results are never stored.
    rm = offs_m % M
    rn = offs_n % N
    offs_h = tl.arange(0, 64)

    x_rows = x_ptr + rm[:, None] * stride_xm
    # Rows past M are masked, not wrapped, on the activations: a masked async copy fetches
    # nothing, which matters at M = 1 (a 16-row tile would otherwise read its row 16 times).
    x_mask = mask_m[:, None]
    w_rows = w_ptr + rn[:, None] * stride_wn
    gs_rows = gs_ptr + rn * stride_gn
    gz_rows = gz_ptr + rn * stride_gn
    if SWAP:
        # Weights as the MMA's A operand (rows of N), tokens as B: small M fills the N side of
        # the instruction instead of wasting most of a 64-row A.
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.int32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    k_tiles = tl.cdiv(K, 128)
    tiles_per_split = tl.cdiv(tl.cdiv(k_tiles, SPLIT_K), UNROLL) * UNROLL
    t_begin = pid_k * tiles_per_split
    t_end = min(t_begin + tiles_per_split, k_tiles)
    # The group scales are one byte per row, too narrow for the async-copy pipeline (and a
    # loop-carried prefetch stops Triton's pipeliner), so UNROLL tiles per iteration issue their
    # scale loads together: one exposed load latency per UNROLL tiles. The launcher makes the
    # split's tile count a multiple of UNROLL.
    WORDS4: tl.constexpr = UNROLL == 4 and PROGRESSIVE and WORD_SCALES_OK
    if WORDS4 and PREFETCH_SCALES:
        # The scale words of the first iteration; each iteration then loads the next one's, so a
        # load's latency hides behind a whole iteration of MMAs instead of stalling it (plain
        # loads: Triton's pipeliner stages only what feeds a dot).
        w4 = tl.arange(0, 4)[None, :]
        first = (w4 * 0 + t_begin) < t_end  # (a tensor: the interpreter takes no scalar masks)
        gs_next = tl.load(gs_rows[:, None] + tl.multiple_of(t_begin, 4) + w4, mask=first, other=0)
        gz_next = tl.load(gz_rows[:, None] + tl.multiple_of(t_begin, 4) + w4, mask=first, other=0)
    # The same one-iteration-ahead prefetch for one or two tiles an iteration (byte or word loads):
    # the next iteration's tile indices are clamped to the last tile, so the loads stay in bounds
    # without masks (their values are unused after the last iteration).
    PF_TILES: tl.constexpr = (PREFETCH_SCALES and not WORDS4 and PROGRESSIVE and GROUP_SIZE >= 64
                              and UNROLL <= 2)
    if PF_TILES:
        n0a, n0b, n0c, n0d = _load_scales(gs_rows, gz_rows, tl.minimum(t_begin, k_tiles - 1), GROUP_SIZE,
                                          PROGRESSIVE, VEC_SCALES, BLOCK_N)
        if UNROLL >= 2:
            n1a, n1b, n1c, n1d = _load_scales(gs_rows, gz_rows, tl.minimum(t_begin + 1, k_tiles - 1), GROUP_SIZE,
                                              PROGRESSIVE, VEC_SCALES, BLOCK_N)
    for t in range(t_begin, t_end, UNROLL):
        if PF_TILES:
            sc0 = (n0a, n0b, n0c, n0d)
            n0a, n0b, n0c, n0d = _load_scales(gs_rows, gz_rows, tl.minimum(t + UNROLL, k_tiles - 1), GROUP_SIZE,
                                              PROGRESSIVE, VEC_SCALES, BLOCK_N)
            if UNROLL >= 2:
                sc1 = (n1a, n1b, n1c, n1d)
                n1a, n1b, n1c, n1d = _load_scales(gs_rows, gz_rows, tl.minimum(t + UNROLL + 1, k_tiles - 1),
                                                  GROUP_SIZE, PROGRESSIVE, VEC_SCALES, BLOCK_N)
        elif WORDS4:
            # The four tiles' groups are the four bytes of one aligned word per row.
            g0 = tl.multiple_of(t, 4)
            if PREFETCH_SCALES:
                gs_word = gs_next
                gz_word = gz_next
                more = (w4 * 0 + t + 4) < t_end
                gs_next = tl.load(gs_rows[:, None] + g0 + 4 + w4, mask=more, other=0)
                gz_next = tl.load(gz_rows[:, None] + g0 + 4 + w4, mask=more, other=0)
            else:
                gs_word = tl.load(gs_rows[:, None] + g0 + tl.arange(0, 4)[None, :])
                gz_word = tl.load(gz_rows[:, None] + g0 + tl.arange(0, 4)[None, :])
            s0, s1, s2, s3 = _split4(gs_word, BLOCK_N)
            z0, z1, z2, z3 = _split4(gz_word, BLOCK_N)
            sc0 = (s0, z0, s0, z0)
            sc1 = (s1, z1, s1, z1)
            sc2 = (s2, z2, s2, z2)
            sc3 = (s3, z3, s3, z3)
        else:
            sc0 = _load_scales(gs_rows, gz_rows, t, GROUP_SIZE, PROGRESSIVE, VEC_SCALES, BLOCK_N)
            if UNROLL >= 2:
                sc1 = _load_scales(gs_rows, gz_rows, t + 1, GROUP_SIZE, PROGRESSIVE, VEC_SCALES, BLOCK_N)
            if UNROLL >= 4:
                sc2 = _load_scales(gs_rows, gz_rows, t + 2, GROUP_SIZE, PROGRESSIVE, VEC_SCALES, BLOCK_N)
                sc3 = _load_scales(gs_rows, gz_rows, t + 3, GROUP_SIZE, PROGRESSIVE, VEC_SCALES, BLOCK_N)
        acc = _tile(acc, x_rows, x_mask, w_rows, gs_rows, gz_rows, t, K, offs_h, sc0,
                    GROUP_SIZE, PROGRESSIVE, USE_ASM, EVEN_K, SWAP, BLOCK_N)
        if UNROLL >= 2:
            acc = _tile(acc, x_rows, x_mask, w_rows, gs_rows, gz_rows, t + 1, K, offs_h, sc1,
                        GROUP_SIZE, PROGRESSIVE, USE_ASM, EVEN_K, SWAP, BLOCK_N)
        if UNROLL >= 4:
            acc = _tile(acc, x_rows, x_mask, w_rows, gs_rows, gz_rows, t + 2, K, offs_h, sc2,
                        GROUP_SIZE, PROGRESSIVE, USE_ASM, EVEN_K, SWAP, BLOCK_N)
            acc = _tile(acc, x_rows, x_mask, w_rows, gs_rows, gz_rows, t + 3, K, offs_h, sc3,
                        GROUP_SIZE, PROGRESSIVE, USE_ASM, EVEN_K, SWAP, BLOCK_N)
    if SWAP:
        acc = tl.trans(acc)

    if SPLIT_K == 1:
        _epilogue(acc, sx_ptr, xsum_ptr, ws_ptr, gz_ptr, b_ptr, y_ptr, lr_ptr, lup_ptr, R, rm, rn, offs_m, offs_n,
                  mask_m, mask_n, stride_ym, stride_lrm, stride_lur, PROGRESSIVE, HAS_BIAS, HAS_LR, BLOCK_R, LR_IEEE)
    else:
        # Serial split-K in one launch: every split stores its int32 partial tile, then counts itself
        # in; the split that arrives last adds the others' partials (integers: the sum is the
        # unsplit accumulator, bit for bit) and runs the epilogue. No fp32 output to zero first, no
        # conversion kernel after: at decode those two launches cost as much as the GEMM saves.
        cell = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
        tile_parts = part_ptr + pid.to(tl.int64) * (SPLIT_K * BLOCK_M * BLOCK_N)
        tl.store(tile_parts + pid_k * (BLOCK_M * BLOCK_N) + cell, acc)
        # Every thread's partial is written before one thread releases the count (the barrier
        # orders them before it, the release makes them visible GPU-wide); acquire on the way in.
        tl.debug_barrier()
        arrived = tl.atomic_add(count_ptr + pid, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT_K - 1:
            for s in tl.static_range(SPLIT_K):
                # .cg: read at L2, where the other SMs' stores are, never a stale L1 line.
                part = tl.load(tile_parts + s * (BLOCK_M * BLOCK_N) + cell, mask=(cell * 0 + pid_k) != s,
                               other=0, cache_modifier=".cg")
                acc += part
            _epilogue(acc, sx_ptr, xsum_ptr, ws_ptr, gz_ptr, b_ptr, y_ptr, lr_ptr, lup_ptr, R, rm, rn, offs_m,
                      offs_n, mask_m, mask_n, stride_ym, stride_lrm, stride_lur, PROGRESSIVE, HAS_BIAS, HAS_LR,
                      BLOCK_R, LR_IEEE)
            tl.atomic_xchg(count_ptr + pid, 0, sem="relaxed", scope="gpu")  # ready for the next launch


@triton.jit
def _epilogue(acc, sx_ptr, xsum_ptr, ws_ptr, gz_ptr, b_ptr, y_ptr, lr_ptr, lup_ptr, R, rm, rn, offs_m, offs_n,
              mask_m, mask_n, stride_ym, stride_lrm, stride_lur, PROGRESSIVE: tl.constexpr, HAS_BIAS: tl.constexpr,
              HAS_LR: tl.constexpr, BLOCK_R: tl.constexpr, LR_IEEE: tl.constexpr):
    """y = (acc − z·Σx8 for per-channel) · sx · ws (+ X̂L_down·L_up) (+ bias) for a [BLOCK_M, BLOCK_N]
    int32 tile."""
    if not PROGRESSIVE:
        # Σ x8·(q − z) = Σ x8·q − z·Σ x8
        xs = tl.load(xsum_ptr + rm)
        z = tl.load(gz_ptr + rn)
        acc -= xs[:, None] * z[None, :]
    sx = tl.load(sx_ptr + rm)
    ws = tl.load(ws_ptr + rn)
    y = acc.to(tl.float32) * sx[:, None] * ws[None, :]
    if HAS_LR:
        # The rank-R up-projection in 16-bit MMA (R/K of the main loop's MACs), read once a tile:
        # the branch's [M, N] product never goes through memory.
        offs_r = tl.arange(0, BLOCK_R)
        mask_r = offs_r < R
        lr = tl.load(lr_ptr + rm[:, None] * stride_lrm + offs_r[None, :], mask=mask_r[None, :], other=0.0)
        lu = tl.load(lup_ptr + offs_r[:, None] * stride_lur + offs_n[None, :],
                     mask=mask_r[:, None] & mask_n[None, :], other=0.0)
        if LR_IEEE:
            y += tl.dot(lr.to(tl.float32), lu.to(tl.float32), input_precision="ieee")
        else:
            y += tl.dot(lr, lu)
    if HAS_BIAS:
        y += tl.load(b_ptr + rn).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


# ---- the small-M path: a GEMV-style kernel on CUDA cores ----------------------------------------
# At M <= 16 the GEMM reads each weight byte once and does almost no math per byte: the time is how
# fast the packed weights stream from HBM. The tensor-core kernel above pays for a shared-memory
# pipeline (async copy, unpack, store back, MMA) built for reuse that small M does not have. This
# kernel instead reads the weights as 32-bit words straight into registers (four words = one
# 16-byte load per thread), unpacks each word into two words of four int8 weights, and multiplies
# them by the matching activation words with `dp4a` (four int8 products summed into int32 in one
# instruction). In the "k128-halves" layout the low nibbles of weight word j of a 128-wide chunk
# are k = 4j..4j+3 and the high nibbles k = 64+4j..64+4j+3: four consecutive activation bytes, i.e.
# activation words 32c + j and 32c + 16 + j. So the same packed bytes serve both kernels.

# One packed word -> the int8 weights of its low and high nibbles as two words. Progressive: the
# group's s2 (a byte) multiplies all four nibbles at once (q·s2 <= 240 stays inside its byte), then
# z·s2, replicated over the word, is subtracted byte-wise (SWAR: borrows must not cross bytes).
_WORD_UNPACK_PROGRESSIVE_ASM = tl.constexpr("""
{
.reg .b32 lo, hi, zl, zh, t0, t1;
and.b32 lo, $2, 0x0F0F0F0F;
shr.u32 hi, $2, 4;
and.b32 hi, hi, 0x0F0F0F0F;
mul.lo.u32 lo, lo, $3;
mul.lo.u32 hi, hi, $5;
mul.lo.u32 zl, $4, 0x01010101;
mul.lo.u32 zh, $6, 0x01010101;
and.b32 t1, zl, 0x7F7F7F7F;
or.b32 t0, lo, 0x80808080;
sub.u32 t0, t0, t1;
xor.b32 t1, lo, zl;
not.b32 t1, t1;
and.b32 t1, t1, 0x80808080;
xor.b32 $0, t0, t1;
and.b32 t1, zh, 0x7F7F7F7F;
or.b32 t0, hi, 0x80808080;
sub.u32 t0, t0, t1;
xor.b32 t1, hi, zh;
not.b32 t1, t1;
and.b32 t1, t1, 0x80808080;
xor.b32 $1, t0, t1;
}
""")

_WORD_UNPACK_PER_CHANNEL_ASM = tl.constexpr("""
{
.reg .b32 t;
and.b32 $0, $2, 0x0F0F0F0F;
shr.u32 t, $2, 4;
and.b32 $1, t, 0x0F0F0F0F;
}
""")


@triton.jit
def _unpack_words(w, s_lo, z_lo, s_hi, z_hi, PROGRESSIVE: tl.constexpr, USE_ASM: tl.constexpr,
                  S2_AFTER: tl.constexpr = False):
    """int32 packed words -> (lo, hi) int32 words, each four int8 weights (bytes in K order).

    S2_AFTER (progressive): the words hold q − z instead (z replicated over a word in z_lo / z_hi),
    and the caller multiplies the dot product by s2.
    """
    if PROGRESSIVE and S2_AFTER:
        # q − z in [−15, 15] per byte: 0x80 | q is at least 128 > z, so the byte-wise subtraction
        # never borrows across bytes; the xor turns 128 + (q − z) into its int8 bits. Plain
        # Triton: ptxas fuses the mask and the or into one LOP3 (no asm twin needed).
        u = w.to(tl.uint32, bitcast=True)
        lo = (((u & 0x0F0F0F0F) | 0x80808080) - z_lo.to(tl.uint32)) ^ 0x80808080
        hi = ((((u >> 4) & 0x0F0F0F0F) | 0x80808080) - z_hi.to(tl.uint32)) ^ 0x80808080
        return lo.to(tl.int32, bitcast=True), hi.to(tl.int32, bitcast=True)
    if USE_ASM:
        if PROGRESSIVE:
            lo, hi = tl.inline_asm_elementwise(
                _WORD_UNPACK_PROGRESSIVE_ASM, "=r,=r,r,r,r,r,r", [w, s_lo, z_lo, s_hi, z_hi],
                dtype=(tl.int32, tl.int32), is_pure=True, pack=1,
            )
        else:
            lo, hi = tl.inline_asm_elementwise(
                _WORD_UNPACK_PER_CHANNEL_ASM, "=r,=r,r", [w], dtype=(tl.int32, tl.int32), is_pure=True, pack=1,
            )
    else:
        # The same word arithmetic in plain Triton (uint32, so shifts are logical and the masks'
        # top bits are not signs): the interpreter's path, bit-identical to the asm.
        u = w.to(tl.uint32, bitcast=True)
        lo = u & 0x0F0F0F0F
        hi = (u >> 4) & 0x0F0F0F0F
        if PROGRESSIVE:
            lo = lo * s_lo.to(tl.uint32)
            hi = hi * s_hi.to(tl.uint32)
            zl = z_lo.to(tl.uint32) * 0x01010101
            zh = z_hi.to(tl.uint32) * 0x01010101
            lo = ((lo | 0x80808080) - (zl & 0x7F7F7F7F)) ^ ((lo ^ zl ^ 0xFFFFFFFF) & 0x80808080)
            hi = ((hi | 0x80808080) - (zh & 0x7F7F7F7F)) ^ ((hi ^ zh ^ 0xFFFFFFFF) & 0x80808080)
        lo = lo.to(tl.int32, bitcast=True)
        hi = hi.to(tl.int32, bitcast=True)
    return lo, hi


@triton.jit
def _dp4a(a, b, c, USE_ASM: tl.constexpr):
    """c + Σ_i int8(a.byte[i]) · int8(b.byte[i]) for int32 words a, b (elementwise, broadcasting)."""
    if USE_ASM:
        return tl.inline_asm_elementwise("dp4a.s32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c],
                                         dtype=tl.int32, is_pure=True, pack=1)
    else:
        # Byte i as a signed value: shift it to the top, then arithmetic-shift it back down.
        r = c + ((a << 24) >> 24) * ((b << 24) >> 24)
        r += ((a << 16) >> 24) * ((b << 16) >> 24)
        r += ((a << 8) >> 24) * ((b << 8) >> 24)
        r += (a >> 24) * (b >> 24)
        return r


PER_TOKEN_ACC = tl.constexpr(8)  # tokens that get their own accumulator tile in the GEMV kernel


@triton.jit
def _zero_word(s, zs):
    """z (= z·s2 / s2, exact: the format stores z·s2 with z in [0, 15]) replicated over a word's four bytes."""
    # In float on the [rows, chunks, 1] scale tile (once per 4 weight words a thread): the quotient
    # is an integer <= 15, so an approximate division rounds back to it exactly. s = 0 only in the
    # K padding past the last chunk (loaded as zeros), where z must be 0.
    z = (zs.to(tl.float32) / tl.maximum(s, 1).to(tl.float32) + 0.5).to(tl.int32)
    return z * 0x01010101


@triton.jit
def _gemv_mac(acc, lo, hi, xa, xb, s_lo, s_hi, GROUP_SIZE: tl.constexpr, PROGRESSIVE: tl.constexpr,
              S2_AFTER: tl.constexpr, USE_ASM: tl.constexpr):
    """acc += the dot of one token's activation words with the weight words (lo, hi)."""
    if PROGRESSIVE and S2_AFTER:
        # Σ x·(q·s2 − z·s2) = s2 · Σ x·(q − z): integers, so exactly the same sum.
        if GROUP_SIZE % 128 == 0:
            return acc + s_lo * _dp4a(lo, xa, _dp4a(hi, xb, 0, USE_ASM), USE_ASM)
        else:
            return acc + s_lo * _dp4a(lo, xa, 0, USE_ASM) + s_hi * _dp4a(hi, xb, 0, USE_ASM)
    else:
        return _dp4a(lo, xa, _dp4a(hi, xb, acc, USE_ASM), USE_ASM)


@triton.jit
def _gemv_weight_tile(w_tile, gs_rows, gz_rows, c0, ch, n_chunks, GROUP_SIZE: tl.constexpr, PROGRESSIVE: tl.constexpr,
                      S2_AFTER: tl.constexpr = False):
    """Packed words [rows, chunks, 16] of chunks c0.. and their group scales (zeros past the end).

    With S2_AFTER the zeros come back as z replicated over a word (see `_unpack_words`)."""
    c = c0 + ch
    c_ok = (c < n_chunks)[None, :, None]
    w = tl.load(w_tile + c0 * 16, mask=c_ok, other=0)
    if PROGRESSIVE:
        g_lo = ((c * 128) // GROUP_SIZE)[None, :, None]
        s_lo = tl.load(gs_rows + g_lo, mask=c_ok, other=0).to(tl.int32)
        z_lo = tl.load(gz_rows + g_lo, mask=c_ok, other=0).to(tl.int32)
        if GROUP_SIZE % 128 == 0:  # both halves of a chunk in one group
            s_hi = s_lo
            z_hi = z_lo
        else:
            g_hi = ((c * 128 + 64) // GROUP_SIZE)[None, :, None]
            s_hi = tl.load(gs_rows + g_hi, mask=c_ok, other=0).to(tl.int32)
            z_hi = tl.load(gz_rows + g_hi, mask=c_ok, other=0).to(tl.int32)
        if S2_AFTER:
            z_lo = _zero_word(s_lo, z_lo)
            if GROUP_SIZE % 128 == 0:
                z_hi = z_lo
            else:
                z_hi = _zero_word(s_hi, z_hi)
    else:
        s_lo = w  # unused
        z_lo = w
        s_hi = w
        z_hi = w
    return w, s_lo, z_lo, s_hi, z_hi


@triton.jit
def _w4a8_gemv_kernel(
    # A8 activations as int32 words [M, K/4] (four int8 codes each), scale [M] fp32, code sum [M] int32
    x_ptr, sx_ptr, xsum_ptr,
    # W4 weights as int32 words [N, Kp/8]; per-channel scale [N] fp32; group scale s2 / z·s2 [N, G]
    # uint8 (progressive) or zero [N] int32 (per-channel)
    w_ptr, ws_ptr, gs_ptr, gz_ptr,
    b_ptr, y_ptr,  # bias [N] (optional), output [M, N]
    lr_ptr, lup_ptr,  # low-rank branch (optional): X̂·L_down [M, R] and L_up [R, N], 16-bit
    M, N, K4, R,  # K4 = K / 4: activation words per row
    stride_xm, stride_wn, stride_gn, stride_ym, stride_lrm, stride_lur,  # stride_xm and stride_wn in words
    GROUP_SIZE: tl.constexpr, PROGRESSIVE: tl.constexpr, HAS_BIAS: tl.constexpr, USE_ASM: tl.constexpr,
    HAS_LR: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr,  # tokens per program: a static loop, so each weight word is unpacked once
    BLOCK_N: tl.constexpr,  # weight rows per program
    UNROLL: tl.constexpr,  # 128-wide K chunks per loop iteration (16 words of each row per chunk)
    ROWS: tl.constexpr,  # min(BLOCK_M, M): the static token loop skips rows that cannot exist
    EVEN_K: tl.constexpr,  # K % 128 == 0
    PREFETCH: tl.constexpr,  # load the next K tile before computing this one
    USE_PDL: tl.constexpr,  # launched as a programmatic dependent (see w4a8_gemm_triton)
    S2_AFTER: tl.constexpr,  # progressive: dot with q − z, times s2 after (fewer instructions a word)
):
    if USE_PDL:
        # The next kernel may launch once every program here has started: its own weight loads
        # then overlap this kernel's tail.
        gdc_launch_dependents()
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    # Token tiles vary fastest: the programs that read the same weight rows run side by side, so
    # all but the first find them in L2.
    pid_m = pid % num_pid_m
    pid_n = pid // num_pid_m
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Rows past N read row N-1 (their results are never stored): the weight loads stay unmasked
    # 16-byte vectors.
    rn = tl.minimum(offs_n, N - 1)
    ch = tl.arange(0, UNROLL)
    j = tl.arange(0, 16)
    # The tile is [rows, chunks, words of a chunk]: a chunk's group scale broadcasts along the last
    # axis, and a thread's four consecutive words (one 16-byte load) never straddle two chunks.
    w_tile = w_ptr + rn[:, None, None] * stride_wn + ch[None, :, None] * 16 + j[None, None, :]
    gs_rows = gs_ptr + rn[:, None, None] * stride_gn
    gz_rows = gz_ptr + rn[:, None, None] * stride_gn
    m_idx = tl.arange(0, BLOCK_M)
    # [rows, tokens]: the token loop's per-row sums land in it without a layout change.
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.int32)
    # Up to PER_TOKEN_ACC tokens: dp4a accumulates straight into one tile-shaped accumulator per
    # token and the cross-lane reduction happens once, after the loop, instead of every iteration
    # (the unused ones are dead code). More tokens reduce per iteration into `acc`.
    acc0 = tl.zeros([BLOCK_N, UNROLL, 16], dtype=tl.int32)
    acc1 = tl.zeros([BLOCK_N, UNROLL, 16], dtype=tl.int32)
    acc2 = tl.zeros([BLOCK_N, UNROLL, 16], dtype=tl.int32)
    acc3 = tl.zeros([BLOCK_N, UNROLL, 16], dtype=tl.int32)
    acc4 = tl.zeros([BLOCK_N, UNROLL, 16], dtype=tl.int32)
    acc5 = tl.zeros([BLOCK_N, UNROLL, 16], dtype=tl.int32)
    acc6 = tl.zeros([BLOCK_N, UNROLL, 16], dtype=tl.int32)
    acc7 = tl.zeros([BLOCK_N, UNROLL, 16], dtype=tl.int32)
    n_chunks = tl.cdiv(K4, 32)
    if PREFETCH:
        w_n, s_lo_n, z_lo_n, s_hi_n, z_hi_n = _gemv_weight_tile(w_tile, gs_rows, gz_rows, 0, ch, n_chunks,
                                                               GROUP_SIZE, PROGRESSIVE, S2_AFTER)
    if USE_PDL:
        # Everything before this reads weights only; the activations (and the output buffer,
        # which the previous kernel may still be reading) wait until that kernel has finished.
        gdc_wait()
    for c0 in range(0, n_chunks, UNROLL):
        c = c0 + ch  # [UNROLL] chunk indices
        c_ok = c < n_chunks
        if PREFETCH:
            # Register double buffer: the next tile's loads are in flight while this one computes
            # (Triton's pipeliner only stages loads that feed a dot).
            w, s_lo, z_lo, s_hi, z_hi = w_n, s_lo_n, z_lo_n, s_hi_n, z_hi_n
            w_n, s_lo_n, z_lo_n, s_hi_n, z_hi_n = _gemv_weight_tile(w_tile, gs_rows, gz_rows, c0 + UNROLL, ch,
                                                                   n_chunks, GROUP_SIZE, PROGRESSIVE, S2_AFTER)
        else:
            w, s_lo, z_lo, s_hi, z_hi = _gemv_weight_tile(w_tile, gs_rows, gz_rows, c0, ch, n_chunks,
                                                          GROUP_SIZE, PROGRESSIVE, S2_AFTER)
        lo, hi = _unpack_words(w, s_lo, z_lo, s_hi, z_hi, PROGRESSIVE, USE_ASM, S2_AFTER)
        # Activation words of the low and high halves; K padding (and rows past M) read as zero,
        # which also zeroes the padded weights' -z·s2.
        # Built with the weight tile's full shape (each row of it reading the same words), so the
        # loads get the weight tile's layout, 16 bytes a thread: a smaller x tile gets a layout of
        # its own from Triton, and then every weight word takes a shared-memory round trip into
        # it. The repeated reads hit L1.
        xk_lo = (rn * 0)[:, None, None] + c[None, :, None] * 32 + j[None, None, :]
        xk_hi = xk_lo + 16
        for m in tl.static_range(ROWS):
            # A row past M reads row M-1 (never stored). The masks must stay constant over four
            # words, or the loads lose their vector width and drag the whole tile into another
            # layout: by chunk when K is a multiple of 128, else by word against K4.
            x_row = x_ptr + tl.minimum(pid_m * BLOCK_M + m, M - 1) * stride_xm
            if EVEN_K:
                xa = tl.load(x_row + xk_lo, mask=c_ok[None, :, None] & (rn >= 0)[:, None, None], other=0)
                xb = tl.load(x_row + xk_hi, mask=c_ok[None, :, None] & (rn >= 0)[:, None, None], other=0)
            else:
                xa = tl.load(x_row + xk_lo, mask=xk_lo < K4, other=0)
                xb = tl.load(x_row + xk_hi, mask=xk_hi < K4, other=0)
            if ROWS <= PER_TOKEN_ACC:
                if m == 0:
                    acc0 = _gemv_mac(acc0, lo, hi, xa, xb, s_lo, s_hi, GROUP_SIZE, PROGRESSIVE, S2_AFTER, USE_ASM)
                elif m == 1:
                    acc1 = _gemv_mac(acc1, lo, hi, xa, xb, s_lo, s_hi, GROUP_SIZE, PROGRESSIVE, S2_AFTER, USE_ASM)
                elif m == 2:
                    acc2 = _gemv_mac(acc2, lo, hi, xa, xb, s_lo, s_hi, GROUP_SIZE, PROGRESSIVE, S2_AFTER, USE_ASM)
                elif m == 3:
                    acc3 = _gemv_mac(acc3, lo, hi, xa, xb, s_lo, s_hi, GROUP_SIZE, PROGRESSIVE, S2_AFTER, USE_ASM)
                elif m == 4:
                    acc4 = _gemv_mac(acc4, lo, hi, xa, xb, s_lo, s_hi, GROUP_SIZE, PROGRESSIVE, S2_AFTER, USE_ASM)
                elif m == 5:
                    acc5 = _gemv_mac(acc5, lo, hi, xa, xb, s_lo, s_hi, GROUP_SIZE, PROGRESSIVE, S2_AFTER, USE_ASM)
                elif m == 6:
                    acc6 = _gemv_mac(acc6, lo, hi, xa, xb, s_lo, s_hi, GROUP_SIZE, PROGRESSIVE, S2_AFTER, USE_ASM)
                elif m == 7:
                    acc7 = _gemv_mac(acc7, lo, hi, xa, xb, s_lo, s_hi, GROUP_SIZE, PROGRESSIVE, S2_AFTER, USE_ASM)
            else:
                d = _gemv_mac(0, lo, hi, xa, xb, s_lo, s_hi, GROUP_SIZE, PROGRESSIVE, S2_AFTER, USE_ASM)
                part = tl.sum(tl.sum(d, axis=2), axis=1)  # [BLOCK_N]
                acc += tl.where(m_idx[None, :] == m, part[:, None], 0)
    if ROWS <= PER_TOKEN_ACC:
        acc += tl.where(m_idx[None, :] == 0, tl.sum(tl.sum(acc0, axis=2), axis=1)[:, None], 0)
        if ROWS >= 2:
            acc += tl.where(m_idx[None, :] == 1, tl.sum(tl.sum(acc1, axis=2), axis=1)[:, None], 0)
        if ROWS >= 3:
            acc += tl.where(m_idx[None, :] == 2, tl.sum(tl.sum(acc2, axis=2), axis=1)[:, None], 0)
        if ROWS >= 4:
            acc += tl.where(m_idx[None, :] == 3, tl.sum(tl.sum(acc3, axis=2), axis=1)[:, None], 0)
        if ROWS >= 5:
            acc += tl.where(m_idx[None, :] == 4, tl.sum(tl.sum(acc4, axis=2), axis=1)[:, None], 0)
        if ROWS >= 6:
            acc += tl.where(m_idx[None, :] == 5, tl.sum(tl.sum(acc5, axis=2), axis=1)[:, None], 0)
        if ROWS >= 7:
            acc += tl.where(m_idx[None, :] == 6, tl.sum(tl.sum(acc6, axis=2), axis=1)[:, None], 0)
        if ROWS >= 8:
            acc += tl.where(m_idx[None, :] == 7, tl.sum(tl.sum(acc7, axis=2), axis=1)[:, None], 0)

    offs_m = pid_m * BLOCK_M + m_idx
    mask_m = offs_m < M
    rm = tl.minimum(offs_m, M - 1)
    if not PROGRESSIVE:
        xs = tl.load(xsum_ptr + rm)
        z = tl.load(gz_ptr + rn)
        acc -= z[:, None] * xs[None, :]
    sx = tl.load(sx_ptr + rm)
    ws = tl.load(ws_ptr + rn)
    y = acc.to(tl.float32) * ws[:, None] * sx[None, :]
    if HAS_LR:
        # [rows, tokens] += L_up^T · (X̂L_down)^T on CUDA cores: a few tokens leave no MMA shape.
        offs_r = tl.arange(0, BLOCK_R)
        mask_r = offs_r < R
        lu = tl.load(lup_ptr + offs_r[None, :] * stride_lur + rn[:, None], mask=mask_r[None, :], other=0.0)
        lr = tl.load(lr_ptr + rm[:, None] * stride_lrm + offs_r[None, :], mask=mask_r[None, :], other=0.0)
        y += tl.sum(lu.to(tl.float32)[:, None, :] * lr.to(tl.float32)[None, :, :], axis=2)
    if HAS_BIAS:
        y += tl.load(b_ptr + rn).to(tl.float32)[:, None]
    y_ptrs = y_ptr + offs_m[None, :] * stride_ym + offs_n[:, None]
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=(offs_n < N)[:, None] & mask_m[None, :])


# ---- configs -------------------------------------------------------------------------------------
# A config: BLOCK_M, BLOCK_N, GROUP_M, SPLIT_K, num_warps, num_stages, SWAP, UNROLL, VEC, GEMV (BLOCK_K
# is the 128 of the layout). GEMV = True picks the CUDA-core kernel (small M; BLOCK_M, BLOCK_N, UNROLL,
# num_warps, num_stages apply to it). Tuned ones live as JSON per GPU in lowering/configs/ (written by
# benchmarks/bench_gemm.py --sweep), keyed by format, "N,K" and M bucket, so a first call never autotunes.
M_BUCKETS = (1, 2, 4, 8, 16, 64, 256, 1024, 4096)  # a bucket holds the M up to its bound; past the last: "big"
CONFIG_KEYS = ("BLOCK_M", "BLOCK_N", "GROUP_M", "SPLIT_K", "num_warps", "num_stages", "SWAP", "UNROLL", "VEC", "GEMV",
               "PDL", "S2_AFTER", "PREFETCH_SCALES")
# S2_AFTER (GEMV, progressive): dot with q − z and scale by s2 after it (v8: faster on two shapes,
# slower on two, so tuned per shape); False = the v5-v7 unpack.
# PREFETCH_SCALES (tensor-core kernel, progressive): the next iteration's group scales loaded during
# this one (v9: UNROLL 4 word loads; v10: one or two tiles an iteration).
CONFIG_DEFAULTS = (None, None, 8, 1, 4, 3, False, 1, False, False, False, False, False)
_GEMV = CONFIG_KEYS.index("GEMV")
CONFIG_DIR = os.path.join(os.path.dirname(__file__), "configs")
GEMV_MAX_M = 4  # untuned GPUs: the GEMV kernel up to this M (its CUDA-core work grows with M; H100 sweep)


def m_bucket(M: int) -> str:
    for b in M_BUCKETS:
        if M <= b:
            return str(b)
    return "big"


def device_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3' (the config file's name)."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


# GPUs on a chip we hold tables for, read with that chip's tables where they have none of their own:
# the H200 is the H100's GH100 die with the same 132 SMs and more, faster HBM. Its own table (swept
# for the small-M buckets, where the faster HBM moves the best tiles) goes first; what it lacks
# comes from the H100's.
SAME_CHIP = {"nvidia-h200": "nvidia-h100-80gb-hbm3"}


def _twin(slug: str):
    return next((t for family, t in SAME_CHIP.items() if slug.startswith(family)), None)


def tuned_config_file(prefix: str, device_name: str) -> str:
    """lowering/configs/{prefix}{slug}.json for this GPU, or its same-chip twin's file when it has none."""
    slug = device_slug(device_name)
    path = os.path.join(CONFIG_DIR, f"{prefix}{slug}.json")
    if not os.path.exists(path) and _twin(slug) is not None:
        return os.path.join(CONFIG_DIR, f"{prefix}{_twin(slug)}.json")
    return path


@functools.lru_cache(maxsize=None)
def _tuned_tables(index: int) -> tuple:
    """The GEMM config tables for device `index`, most specific first: its own, then its twin's."""
    slug = device_slug(torch.cuda.get_device_name(index))
    tables = []
    for name in (slug, _twin(slug)):
        path = os.path.join(CONFIG_DIR, f"{name}.json") if name else None
        if path and os.path.exists(path):
            with open(path) as f:
                table = json.load(f)
            if table.get("layout", PACK_LAYOUT) == PACK_LAYOUT:
                tables.append(table)
    return tuple(tables)


def heuristic_config(M: int, N: int, K: int, sms: int = 132, gemv: bool = True) -> dict:
    """Tile shapes by M bucket when no tuned config exists for the GPU (the H100 sweep's usual winners).

    `gemv=False` asks for the tensor-core kernel (operands the GEMV kernel cannot read).
    """
    if M <= GEMV_MAX_M and gemv:
        return dict(BLOCK_M=triton.next_power_of_2(M), BLOCK_N=8, GROUP_M=1, SPLIT_K=1, num_warps=4, num_stages=2,
                    UNROLL=8, GEMV=True)
    if M <= 16:
        # Memory-bound: narrow N tiles give every SM a program; split K when N alone cannot.
        split = 1 if cdiv(N, 32) >= sms else 4
        return dict(BLOCK_M=16, BLOCK_N=32, GROUP_M=1, SPLIT_K=split, num_warps=4, num_stages=4, UNROLL=4)
    if M <= 64:
        return dict(BLOCK_M=32, BLOCK_N=64, GROUP_M=8, SPLIT_K=1, num_warps=4, num_stages=4, UNROLL=2)
    if M <= 256:
        return dict(BLOCK_M=64, BLOCK_N=128, GROUP_M=8, SPLIT_K=1, num_warps=4, num_stages=4, SWAP=True)
    # Weights as the MMA's A operand with 128x128 tiles and four warps won every large-M shape.
    return dict(BLOCK_M=128, BLOCK_N=128, GROUP_M=8, SPLIT_K=1, num_warps=4, num_stages=4, SWAP=True)


@functools.lru_cache(maxsize=4096)
def choose_config(bucket: str, N: int, K: int, progressive: bool, device_index: int, M_hint: int) -> tuple:
    """The config for an M bucket and weight shape on a CUDA device, as a tuple of CONFIG_KEYS."""
    tables = _tuned_tables(device_index)
    fmt = "progressive" if progressive else "per_channel"
    # this shape's tuned config (own table, then the twin's), then the bucket's best over shapes
    cfg = next((c for t in tables if (c := t.get("configs", {}).get(fmt, {}).get(f"{N},{K}", {}).get(bucket))), None)
    if cfg is None:
        cfg = next((c for t in tables if (c := t.get("default", {}).get(fmt, {}).get(bucket))), None)
    if cfg is None:
        cfg = heuristic_config(M_hint, N, K, _sm_count(device_index))
    return tuple(cfg.get(k, d) for k, d in zip(CONFIG_KEYS, CONFIG_DEFAULTS))


def _interpreter_config(M: int) -> tuple:
    # Interpreter: few large programs run fastest (numpy does the work per program). Small M takes
    # the GEMV kernel, as it does on the GPU, so the M dispatch runs under the interpreter too.
    # Tall GEMV tiles here: per-program interpreter overhead dominates, so 128 rows x 8 chunks ran
    # as fast as the tensor-core kernel's interpreter tiles (32 x 4 ran 2-6x slower).
    if M <= 4:
        return (triton.next_power_of_2(M), 128, 1, 1, 4, 1, False, 8, False, True, False, True, False)
    return (max(16, min(64, triton.next_power_of_2(M))), 64, 8, 1, 4, 1, False, 1, False, False, False, True, False)


def gemv_supported(x8: torch.Tensor, qweight: torch.Tensor, gscale: Optional[torch.Tensor]) -> bool:
    """Whether the GEMV kernel can take these operands (otherwise the tensor-core kernel runs).

    It reads activations and weights as int32 words (K a multiple of 4, the packed rows
    word-aligned) and applies one group scale per 64-wide half of a chunk (groups a multiple of 64).
    """
    K = x8.shape[-1]
    if (K % 4 or qweight.shape[1] % 4 or qweight.stride(-1) != 1 or qweight.stride(0) % 4
            or qweight.storage_offset() % 4):
        return False
    if gscale is not None:
        group = qweight.shape[1] * 2 // gscale.shape[1]
        return group % 64 == 0
    return True


def _launch_gemv(x8, sx, xsum, qweight, wscale, gscale, gzero, bias, y, bm, bn, unroll, nw, ns, use_asm, pdl=False,
                 s2_after=False, lr=None, l_up=None):
    M, K = x8.shape
    N = qweight.shape[0]
    if x8.stride(0) % 4 or x8.storage_offset() % 4:
        x8 = x8.contiguous()  # a word view needs word-aligned rows (cheap: M is small here)
    progressive = gscale is not None
    bm = min(bm, triton.next_power_of_2(M))
    grid = (cdiv(M, bm) * cdiv(N, bn),)
    _w4a8_gemv_kernel[grid](
        x8.view(torch.int32), sx.reshape(-1), xsum.reshape(-1), qweight.view(torch.int32), wscale,
        gscale if progressive else gzero, gzero,
        bias if bias is not None else wscale, y,
        *_lr_args(lr, l_up, wscale),
        M, N, K // 4, lr.shape[1] if lr is not None else 0,
        x8.stride(0) // 4, qweight.stride(0) // 4, gscale.stride(0) if progressive else 0, y.stride(0),
        *_lr_strides(lr, l_up),
        GROUP_SIZE=qweight.shape[1] * 2 // gscale.shape[1] if progressive else K_PAD, PROGRESSIVE=progressive,
        HAS_BIAS=bias is not None, USE_ASM=use_asm, HAS_LR=lr is not None, BLOCK_R=_block_r(lr),
        BLOCK_M=bm, BLOCK_N=bn, UNROLL=unroll, ROWS=min(bm, M),
        EVEN_K=K % K_PAD == 0, PREFETCH=ns >= 2, USE_PDL=pdl, S2_AFTER=bool(s2_after),
        num_warps=nw, num_stages=1, **({"launch_pdl": True} if pdl else {}),
    )
    return y


def _lr_args(lr, l_up, placeholder):
    """The branch's two pointers, or a placeholder tensor for both where there is no branch."""
    return (lr, l_up) if lr is not None else (placeholder, placeholder)


def _lr_strides(lr, l_up):
    return (lr.stride(0), l_up.stride(0)) if lr is not None else (0, 0)


def _block_r(lr) -> int:
    """The rank padded to a power of two of at least 16 (the smallest MMA K)."""
    return max(16, triton.next_power_of_2(lr.shape[1])) if lr is not None else 16


# Split-K arrival counters, per device and stream: zeros, and every launch leaves them zero (the
# last split of each tile resets its own). Kept alive for good once made: a CUDA graph that captured
# a launch holds their address. Per stream, so GEMMs running concurrently on two streams never share one.
_COUNTERS: dict = {}
_OLD_COUNTERS: list = []


def _split_counters(device: torch.device, n: int) -> torch.Tensor:
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (str(device), stream)
    have = _COUNTERS.get(key)
    if have is None or have.numel() < n:
        if have is not None:
            _OLD_COUNTERS.append(have)
        size = max(n, 1024, 2 * (have.numel() if have is not None else 0))
        if device.type == "cuda":
            # Kept for good, so made outside any CUDA-graph pool (a warm-up run of torch.compile's
            # CUDA graphs would otherwise allocate it in the graph's private pool).
            have = allocate_outside_graph_pools(lambda: torch.zeros(size, dtype=torch.int32, device=device))
        else:
            have = torch.zeros(size, dtype=torch.int32, device=device)
        _COUNTERS[key] = have
    return have


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def w4a8_gemm_triton(
    x8: torch.Tensor, sx: torch.Tensor, xsum: torch.Tensor, qweight: torch.Tensor, wscale: torch.Tensor,
    gscale: Optional[torch.Tensor], gzero: torch.Tensor, bias: Optional[torch.Tensor], out_dtype: torch.dtype,
    config: Optional[dict] = None, use_asm: Optional[bool] = None,
    lr_act: Optional[torch.Tensor] = None, l_up: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    K = x8.shape[-1]
    lead = x8.shape[:-1]
    x8 = x8.reshape(-1, K)
    lr = None
    if lr_act is not None and lr_act.shape[-1] > 0:   # rank 0: no branch
        lr = lr_act.reshape(-1, lr_act.shape[-1])
        if lr.stride(-1) != 1:
            lr = lr.contiguous()
        l_up = l_up.to(lr.dtype)
        if l_up.stride(-1) != 1:
            l_up = l_up.contiguous()
    if x8.stride(-1) != 1:
        x8 = x8.contiguous()
    M = x8.shape[0]
    N = qweight.shape[0]
    progressive = gscale is not None
    on_gpu = x8.is_cuda and not interpreter_enabled()
    if config is not None:
        cfg = tuple(config.get(k, d) for k, d in zip(CONFIG_KEYS, CONFIG_DEFAULTS))
    elif on_gpu:
        cfg = choose_config(m_bucket(M), N, K, progressive, x8.device.index or 0, min(M, 4096))
    else:
        cfg = _interpreter_config(M)
    if cfg[_GEMV] and not gemv_supported(x8, qweight, gscale):
        # A GEMV config for operands it cannot read (K not a multiple of 4, groups of 32, ...):
        # the tensor-core kernel with its untuned small-M tiles.
        cfg = tuple(heuristic_config(M, N, K, gemv=False).get(k, d) for k, d in zip(CONFIG_KEYS, CONFIG_DEFAULTS))
    bm, bn, gm, split, nw, ns, swap, unroll, vec, gemv, pdl, s2_after, prefetch_scales = cfg
    if use_asm is None:
        use_asm = on_gpu
    # PDL: launched as a programmatic dependent of the kernel before it, the kernel starts during
    # that kernel's tail, issues its first weight loads (weights are constants) and only then
    # waits for the activations. Interpreter and Triton builds without it: a plain launch.
    pdl = bool(pdl) and on_gpu and PDL_AVAILABLE
    if gemv and M > 0:
        y = torch.empty((M, N), dtype=out_dtype, device=x8.device)
        return _launch_gemv(x8, sx, xsum, qweight, wscale, gscale, gzero, bias, y, bm, bn, unroll, nw, ns,
                            use_asm, pdl, s2_after, lr, l_up).reshape(*lead, N)
    y = torch.empty((M, N), dtype=out_dtype, device=x8.device)
    if M == 0:
        return y.reshape(*lead, N)
    group_size = qweight.shape[1] * 2 // gscale.shape[1] if progressive else K_PAD
    if cdiv(K, K_PAD) % unroll:
        unroll = 1  # the kernel's splits hold whole UNROLL groups of tiles
    word_ok = (progressive and group_size == 128 and gscale.shape[1] % 4 == 0 and gscale.stride(0) % 4 == 0
               and gscale.stride(1) == 1 and gzero.stride(0) == gscale.stride(0) and gzero.stride(1) == 1)
    tiles = cdiv(M, bm) * cdiv(N, bn)
    grid = (tiles, split)
    if split > 1:
        parts = torch.empty(tiles * split * bm * bn, dtype=torch.int32, device=x8.device)
        counts = _split_counters(x8.device, tiles)
    else:
        parts = counts = y  # unused
    _w4a8_gemm_kernel[grid](
        x8, sx.reshape(-1), xsum.reshape(-1), qweight, wscale,
        gscale if progressive else gzero, gzero,
        bias if bias is not None else wscale, y, *_lr_args(lr, l_up, wscale), parts, counts,
        M, N, K, lr.shape[1] if lr is not None else 0,
        x8.stride(0), qweight.stride(0), gscale.stride(0) if progressive else 0, y.stride(0), *_lr_strides(lr, l_up),
        GROUP_SIZE=group_size, PROGRESSIVE=progressive, HAS_BIAS=bias is not None, USE_ASM=use_asm,
        HAS_LR=lr is not None, BLOCK_R=_block_r(lr),
        # fp32 branch operands (fp32 models) and the interpreter: exact fp32 products, no TF32
        LR_IEEE=lr is not None and (lr.dtype == torch.float32 or not on_gpu),
        EVEN_K=K % K_PAD == 0, WORD_SCALES_OK=word_ok, VEC_SCALES=bool(word_ok and vec), BLOCK_M=bm, BLOCK_N=bn, GROUP_M=gm, SPLIT_K=split, SWAP=swap, UNROLL=unroll,
        USE_PDL=pdl, PREFETCH_SCALES=bool(prefetch_scales), num_warps=nw, num_stages=ns,
        **({"launch_pdl": True} if pdl else {}),
    )
    return y.reshape(*lead, N)


@torch.library.custom_op("qoq::w4a8_gemm", mutates_args=())
def w4a8_gemm(
    x8: torch.Tensor, sx: torch.Tensor, xsum: torch.Tensor, qweight: torch.Tensor, wscale: torch.Tensor,
    gscale: Optional[torch.Tensor], gzero: torch.Tensor, bias: Optional[torch.Tensor],
    out_dtype: torch.dtype, kernels: str = "auto",
    lr_act: Optional[torch.Tensor] = None, l_up: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """y [..., N] = dequant(x8 [..., K]) @ dequant(W)^T + lr_act·l_up + bias; `gscale` given -> progressive,
    else per-channel. lr_act [..., r] = X̂·L_down and l_up [r, N]: SVDQuant's low-rank branch (recipe
    w4a8-svd), added in the epilogue."""
    _check_lowrank(x8, qweight, lr_act, l_up)
    if use_triton(x8, kernels):
        return w4a8_gemm_triton(x8, sx, xsum, qweight, wscale, gscale, gzero, bias, out_dtype,
                                lr_act=lr_act, l_up=l_up)
    return w4a8_gemm_reference(x8, sx, xsum, qweight, wscale, gscale, gzero, bias, out_dtype, lr_act, l_up)


def _check_lowrank(x8, qweight, lr_act, l_up) -> None:
    if (lr_act is None) != (l_up is None):
        raise ValueError("qoq.w4a8_gemm: lr_act and l_up go together (both or neither)")
    if lr_act is not None and (lr_act.shape[:-1] != x8.shape[:-1] or l_up.dim() != 2
                               or tuple(l_up.shape) != (lr_act.shape[-1], qweight.shape[0])):
        raise ValueError(f"qoq.w4a8_gemm: low-rank shapes lr_act {tuple(lr_act.shape)}, l_up {tuple(l_up.shape)} "
                         f"do not fit activations {tuple(x8.shape)} and {qweight.shape[0]} output channels; "
                         "expected lr_act [..., r] with the activations' leading dims and l_up [r, N]")


@w4a8_gemm.register_fake
def _(x8, sx, xsum, qweight, wscale, gscale, gzero, bias, out_dtype, kernels="auto", lr_act=None, l_up=None):
    _check_lowrank(x8, qweight, lr_act, l_up)
    return x8.new_empty((*x8.shape[:-1], qweight.shape[0]), dtype=out_dtype)
