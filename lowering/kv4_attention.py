"""`qoq::kv4_attention`: attention of queries over a KV4 cache (format in lowering/kv4_append.py).

One kernel serves decode and (chunked) prefill: flash-decoding, i.e. the sequence is split across
programs (as many as fill one wave of the GPU), each program streams KV tiles (cp.async-pipelined)
once for all query heads of its GQA group and all its query tokens, runs the dots on the raw codes
(scales and zeros applied per token outside the MMA) and keeps an online softmax; a second kernel
merges the splits. Tuned configs per GPU: lowering/configs/kv4-attention-<gpu>.json; performance
notes: benchmarks/NOTES.md ("KV4 attention").
"""
from __future__ import annotations

import functools
import json
import math
import os
import warnings

import torch
import triton
import triton.language as tl

from lowering.dispatch import cdiv, use_triton
from lowering.kv4_append import kv4_dequantize
from lowering.w4a8_gemm import tuned_config_file

_LOG2E = 1.4426950408889634


def _check(q, k_cache, k_meta, v_cache, v_meta, cache_position) -> None:
    if q.dim() != 4:
        raise ValueError(f"kv4_attention: q must be [B, Hq, Tq, D], got {tuple(q.shape)}")
    b, hq, tq, d = q.shape
    for name, data, meta in (("k", k_cache, k_meta), ("v", v_cache, v_meta)):
        if data.dtype != torch.uint8 or meta.dtype != torch.float16:
            raise TypeError(f"kv4_attention: {name} cache must be uint8 data + float16 meta, "
                            f"got {data.dtype} and {meta.dtype}")
        if data.dim() != 4 or data.shape[0] != b or data.shape[3] * 2 != d or tuple(meta.shape) != (*data.shape[:3], 2):
            raise ValueError(f"kv4_attention: {name} cache {tuple(data.shape)} / {tuple(meta.shape)} does not "
                             f"match q {tuple(q.shape)} (expected [{b}, Hkv, L, {d // 2}] and [{b}, Hkv, L, 2])")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"kv4_attention: k cache {tuple(k_cache.shape)} and v cache {tuple(v_cache.shape)} differ")
    if hq % k_cache.shape[1]:
        raise ValueError(f"kv4_attention: {hq} query heads are not a multiple of {k_cache.shape[1]} KV heads")
    if cache_position.dim() != 1 or cache_position.shape[0] != tq:
        raise ValueError(f"kv4_attention: cache_position {tuple(cache_position.shape)} must be [Tq={tq}]")


def kv4_attention_reference(
    q: torch.Tensor, k_cache: torch.Tensor, k_meta: torch.Tensor, v_cache: torch.Tensor, v_meta: torch.Tensor,
    cache_position: torch.Tensor, attn_mask: torch.Tensor | None = None, scale: float | None = None,
) -> torch.Tensor:
    """softmax(q·Kᵀ·scale + mask) · V over the dequantized cache, in float32.

    Query i (at cache position p_i) sees cache slots j ≤ p_i: the causal rule of a decoder cache, which
    also hides slots not written yet. A row that sees nothing gives 0 (SDPA would give NaN).
    """
    b, hq, tq, d = q.shape
    hkv, length = k_cache.shape[1], k_cache.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    k = kv4_dequantize(k_cache, k_meta).repeat_interleave(hq // hkv, dim=1)
    v = kv4_dequantize(v_cache, v_meta).repeat_interleave(hq // hkv, dim=1)
    s = (q.float() @ k.transpose(-1, -2)) * scale
    slots = torch.arange(length, device=q.device)
    visible = slots[None, :] <= cache_position.to(q.device)[:, None]
    s = s.masked_fill(~visible, float("-inf"))
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else s + attn_mask.float()
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isneginf(m), 0.0, m)
    p = torch.exp(s - m)
    den = p.sum(-1, keepdim=True)
    out = (p @ v) / torch.where(den > 0, den, 1.0)
    return out.to(q.dtype).contiguous()


# ---- the kernels ----------------------------------------------------------------------------------
# Codes reach the tensor cores as 16-bit floats made without a conversion instruction: OR-ing a code
# c in [0, 15] into the mantissa of BIAS, where one step of the field is worth 1, gives the float
# BIAS + c exactly: bf16 (7 mantissa bits) takes c in bits 0-3 of 128 = 0x4300; fp16 (10 bits) takes
# c in bits 4-7 of 64 = 0x5400 (64·(1 + 16c/1024) = 64 + c), where a byte's high nibble already lies,
# and a small BIAS keeps the fp32 accumulators' precision (the first fp16 version used 1024 + c in
# bits 0-3: its P·V sums lost 10 bits and missed the fp16 tolerance). The dots run on BIAS + c and
# each tile subtracts BIAS·Σq (K) and BIAS·Σp (V) in fp32, which is exact algebra. Converting each
# code with int -> float instructions (I2F runs at a quarter of the integer rate on Hopper) was what
# held the first kernel to 12-30% of the bandwidth floor.
CODE_F32, CODE_BF16, CODE_F16 = 0, 1, 2
_CODE_BIAS = {CODE_F32: 0.0, CODE_BF16: 128.0, CODE_F16: 64.0}

# K and V are read as 16-bit pairs of bytes: pair i of a token holds dims 2i, 2i+1 (low nibbles) and
# D/2+2i, D/2+2i+1 (high). The P·V dot sums over tokens, so its operand wants consecutive tokens in a
# register: 16-bit elements get there by a transposing ldmatrix, where single bytes took one
# shared-memory load each plus PRMTs to gather them. K's dot sums over dims, so its 16-bit pairs load
# as they lie. One asm call takes two pairs (two tokens of V, or pairs i, i+1 of K) in $4, and each
# code already sits at the same bit of both 16-bit lanes: a shift brings a nibble to its place and
# one LOP3 masks it and ORs in the exponent, for both lanes at once. 7 instructions for 8 codes (the
# first version spread bytes with PRMT first: 8), no conversions.
# $0 = dim 2i of both pairs, $1 = dim 2i+1, $2 = D/2+2i, $3 = D/2+2i+1.
_UNPACK_PAIRS_ASM_BF16 = tl.constexpr("""
{
.reg .b32 s4, s8, s12;
shr.u32 s8, $4, 8;
shr.u32 s4, $4, 4;
shr.u32 s12, $4, 12;
lop3.b32 $0, $4, 0x000F000F, 0x43004300, 0xEA;
lop3.b32 $1, s8, 0x000F000F, 0x43004300, 0xEA;
lop3.b32 $2, s4, 0x000F000F, 0x43004300, 0xEA;
lop3.b32 $3, s12, 0x000F000F, 0x43004300, 0xEA;
}
""")
# fp16: codes go to bits 4-7 of each lane, where the high nibbles already are.
_UNPACK_PAIRS_ASM_F16 = tl.constexpr("""
{
.reg .b32 s4, l4, s8;
shl.b32 l4, $4, 4;
shr.u32 s4, $4, 4;
shr.u32 s8, $4, 8;
lop3.b32 $0, l4, 0x00F000F0, 0x54005400, 0xEA;
lop3.b32 $1, s4, 0x00F000F0, 0x54005400, 0xEA;
lop3.b32 $2, $4, 0x00F000F0, 0x54005400, 0xEA;
lop3.b32 $3, s8, 0x00F000F0, 0x54005400, 0xEA;
}
""")


@triton.jit
def _code_bits(c, CODE: tl.constexpr):
    """int codes in [0, 15] -> BIAS + code as the 16-bit float of CODE (or the fp32 code for CODE 0)."""
    if CODE == 0:
        return c.to(tl.float32)
    elif CODE == 1:
        return (c.to(tl.int32) | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True)
    else:
        return ((c.to(tl.int32) << 4) | 0x5400).to(tl.int16).to(tl.float16, bitcast=True)


@triton.jit
def _unpack_pairs(w, CODE: tl.constexpr, USE_ASM: tl.constexpr):
    """int16 byte pairs -> the codes of dims 2i, 2i+1 (low nibbles) and D/2+2i, D/2+2i+1 (high)."""
    if USE_ASM and CODE == 1:
        c0, c1, c2, c3 = tl.inline_asm_elementwise(
            _UNPACK_PAIRS_ASM_BF16, "=r,=r,=r,=r,r", [w], dtype=(tl.bfloat16,) * 4, is_pure=True, pack=2)
    elif USE_ASM and CODE == 2:
        c0, c1, c2, c3 = tl.inline_asm_elementwise(
            _UNPACK_PAIRS_ASM_F16, "=r,=r,=r,=r,r", [w], dtype=(tl.float16,) * 4, is_pure=True, pack=2)
    else:  # the same bits one code at a time (little-endian: byte 2i is the low byte of pair i)
        c0 = _code_bits(w & 0x0F, CODE)
        c1 = _code_bits((w >> 8) & 0x0F, CODE)
        c2 = _code_bits((w >> 4) & 0x0F, CODE)
        c3 = _code_bits((w >> 12) & 0x0F, CODE)
    return c0, c1, c2, c3


@triton.jit
def _exp2(x, FTZ_EXP: tl.constexpr):
    """2^x; on the GPU the flush-to-zero MUFU.EX2 alone (tl.exp2's IEEE path adds a range test and two
    multiplies per element, a quarter of the softmax's instructions). Results below 2^-126 become 0,
    which no softmax weight misses."""
    if FTZ_EXP:
        return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return tl.exp2(x)


@triton.jit
def _split_meta(w):
    """int32 words holding the fp16 pair (scale, zero) of each token -> two fp32 vectors."""
    scale = (w & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    zero = (w >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return scale, zero


@triton.jit
def _attend_tile(
    n0, end, m_i, l_i, c_i, acc0, acc1, acc2, acc3, q0, q1, q2, q3, q_sum, lim, row_ok, e, e_ok,
    kbase, vbase, kmbase, vmbase, skl, svl, skml, svml, mrow, sml, mask_live, qk_scale,
    OUT_DTYPE: tl.constexpr, BLOCK_N: tl.constexpr, BIAS: tl.constexpr, CODE: tl.constexpr,
    DOT_F32: tl.constexpr, USE_ASM: tl.constexpr, EVEN_D: tl.constexpr, MASKED: tl.constexpr,
    HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, MASK_ROW: tl.constexpr, LAZY: tl.constexpr,
    FTZ_EXP: tl.constexpr,
):
    """One KV tile [n0, n0 + BLOCK_N) for the program's query rows: scores, online softmax, P·V.

    MASKED tiles may cross the causal bound of a row or the end of the split; the others are visible
    to every row, so they skip every bounds check (the bulk of a decode).
    """
    n = n0 + tl.arange(0, BLOCK_N)
    n_ok = n < end
    # K read transposed, [D/4, BLOCK_N] byte pairs: the dot's B operand as loaded, pairs contiguous
    # along D. V read as [BLOCK_N, D/4] byte pairs.
    kp = kbase + n[None, :] * skl + e[:, None]
    vp = vbase + n[:, None] * svl + e[None, :]
    if MASKED:
        if EVEN_D:
            kw = tl.load(kp, mask=n_ok[None, :], other=0)
            vw = tl.load(vp, mask=n_ok[:, None], other=0)
        else:
            kw = tl.load(kp, mask=n_ok[None, :] & e_ok[:, None], other=0)
            vw = tl.load(vp, mask=n_ok[:, None] & e_ok[None, :], other=0)
        km = tl.load(kmbase + n * skml, mask=n_ok, other=0)
        vm = tl.load(vmbase + n * svml, mask=n_ok, other=0)
    else:
        if EVEN_D:
            kw = tl.load(kp)
            vw = tl.load(vp)
        else:
            kw = tl.load(kp, mask=e_ok[:, None], other=0)
            vw = tl.load(vp, mask=e_ok[None, :], other=0)
        km = tl.load(kmbase + n * skml)
        vm = tl.load(vmbase + n * svml)

    k0, k1, k2, k3 = _unpack_pairs(kw, CODE, USE_ASM)
    if DOT_F32:
        # The interpreter's bf16 dot is wrong (bf16 is held as uint16); the same values in fp32 are not.
        k0 = k0.to(tl.float32)
        k1 = k1.to(tl.float32)
        k2 = k2.to(tl.float32)
        k3 = k3.to(tl.float32)
    s = tl.dot(q3, k3, tl.dot(q2, k2, tl.dot(q1, k1, tl.dot(q0, k0))))
    # q·k = scale·q·(BIAS + c) + (zero - BIAS·scale)·Σq, with the softmax scale (base 2) folded in
    k_scale, k_zero = _split_meta(km)
    ks = k_scale * qk_scale
    kz = (k_zero - BIAS * k_scale) * qk_scale
    s = s * ks[None, :] + q_sum[:, None] * kz[None, :]
    if HAS_MASK and MASK_ROW:  # one mask row for all the program's rows (mrow: its start), read once
        if mask_live:  # the split's part of the row hides or shifts something (scanned before the loop)
            if MASK_BOOL:  # read as bytes: True = attend
                keep = tl.load(mrow + n * sml, mask=n_ok, other=1)
                s = tl.where(keep[None, :] != 0, s, float("-inf"))
            else:
                s += (tl.load(mrow + n * sml, mask=n_ok, other=0.0).to(tl.float32) * 1.4426950408889634)[None, :]
    elif HAS_MASK:
        mp = mrow[:, None] + n[None, :] * sml
        if MASK_BOOL:
            keep = tl.load(mp, mask=row_ok[:, None] & n_ok[None, :], other=1)
            s = tl.where(keep != 0, s, float("-inf"))
        else:
            s += tl.load(mp, mask=row_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32) * 1.4426950408889634
    if MASKED:
        s = tl.where(n[None, :] <= lim[:, None], s, float("-inf"))

    # Online softmax in base 2. LAZY: the reference m_i moves only when a score passes it by more than
    # 2^8 (p ≤ 256 is harmless in fp32 and bf16), so after the first tiles the accumulators are rarely
    # rescaled and the rescale is skipped for the whole program. A row that has seen only -inf keeps
    # m = -inf and uses 0 as its reference so no inf - inf appears.
    m_tile = tl.max(s, 1)
    if LAZY:
        m_new = tl.where(m_tile > m_i + 8.0, m_tile, m_i)
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        if tl.max((m_new != m_i).to(tl.int32), 0) > 0:
            alpha = _exp2(m_i - m_ref, FTZ_EXP)
            l_i = l_i * alpha
            c_i = c_i * alpha
            acc0 = acc0 * alpha[:, None]
            acc1 = acc1 * alpha[:, None]
            acc2 = acc2 * alpha[:, None]
            acc3 = acc3 * alpha[:, None]
    else:
        m_new = tl.maximum(m_i, m_tile)
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = _exp2(m_i - m_ref, FTZ_EXP)
        l_i = l_i * alpha
        c_i = c_i * alpha
        acc0 = acc0 * alpha[:, None]
        acc1 = acc1 * alpha[:, None]
        acc2 = acc2 * alpha[:, None]
        acc3 = acc3 * alpha[:, None]
    p = _exp2(s - m_ref[:, None], FTZ_EXP)
    l_i = l_i + tl.sum(p, 1)

    v0, v1, v2, v3 = _unpack_pairs(vw, CODE, USE_ASM)
    v_scale, v_zero = _split_meta(vm)
    # Σ_j p_j (scale_j·c_j + zero_j) = (p·scale) @ (BIAS + c) + Σ_j (p_j·zero_j - BIAS·(p·scale)_j),
    # the last sum over the p·scale values as rounded for the dot; it is the same for every column,
    # so it is kept per row (c_i) and added once at the end.
    pv = (p * v_scale[None, :]).to(OUT_DTYPE)
    pv32 = pv.to(tl.float32)
    c_i = c_i + tl.sum(p * v_zero[None, :] - BIAS * pv32, 1)
    if DOT_F32:
        pv = pv32
        v0 = v0.to(tl.float32)
        v1 = v1.to(tl.float32)
        v2 = v2.to(tl.float32)
        v3 = v3.to(tl.float32)
    acc0 = tl.dot(pv, v0, acc0)
    acc1 = tl.dot(pv, v1, acc1)
    acc2 = tl.dot(pv, v2, acc2)
    acc3 = tl.dot(pv, v3, acc3)
    return m_new, l_i, c_i, acc0, acc1, acc2, acc3


# Sizes and counts are not specialized (each new length or split count would compile again); the
# strides are, so 16-byte alignment of the cache rows is known and loads vectorize.
@triton.jit(do_not_specialize=["Hkv", "Hq", "Tq", "L", "D2", "split_len", "num_splits"])
def _kv4_attention_kernel(
    Q, KC, KM, VC, VM, POS, MASK, O, PACC, PML,
    sqb, sqh, sqt, sqd,                  # q [B, Hq, Tq, D]
    skb, skh, skl,                       # k data seen as int16 [B, Hkv, L, D/4], pairs contiguous
    skmb, skmh, skml,                    # k meta seen as int32 [B, Hkv, L]: one (scale, zero) fp16 pair a word
    svb, svh, svl,                       # v data seen as int16 [B, Hkv, L, D/4], pairs contiguous
    svmb, svmh, svml,                    # v meta (int32 view)
    smb, smh, smt, sml,                  # additive mask, broadcast to [B, Hq, Tq, L] (0-strides)
    sob, soh, sot, sod,                  # out [B, Hq, Tq, D] (written when not PARTIAL)
    Hkv, Hq, Tq, L, D2, split_len, num_splits, qk_scale,
    G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D2: tl.constexpr,
    PARTIAL: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, MASK_ROW: tl.constexpr,
    CODE: tl.constexpr,
    BIAS: tl.constexpr, DOT_F32: tl.constexpr, USE_ASM: tl.constexpr, EVEN_D: tl.constexpr,
    LAZY: tl.constexpr, FTZ_EXP: tl.constexpr, MASK_SCAN: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_m = tl.program_id(2)
    b = (pid_bh // Hkv).to(tl.int64)  # batch offsets can pass 2^31 bytes; offsets inside a head cannot
    h = pid_bh % Hkv
    BLOCK_D4: tl.constexpr = BLOCK_D2 // 2

    # Rows are (token, head-in-group), token-major: a row block covers consecutive tokens, so the
    # causal bound of the block is tight, and all G heads sharing the KV head are in the same block.
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < G * Tq
    t = rows // G
    qh = h * G + rows % G
    pos = tl.load(POS + t, mask=row_ok, other=-1).to(tl.int32)
    e = tl.arange(0, BLOCK_D4)  # byte pairs: dims 2e, 2e+1 (low nibbles), D2+2e, D2+2e+1 (high)
    e_ok = e < D2 // 2

    # q split the way the pairs unpack: q0 = dims 2e, q1 = 2e+1, q2 = D2+2e, q3 = D2+2e+1
    o_ok = row_ok[:, None] & e_ok[None, :]
    qp = Q + b * sqb + qh[:, None] * sqh + t[:, None] * sqt + (2 * e[None, :]) * sqd
    q0 = tl.load(qp, mask=o_ok, other=0.0)
    q1 = tl.load(qp + sqd, mask=o_ok, other=0.0)
    q2 = tl.load(qp + D2 * sqd, mask=o_ok, other=0.0)
    q3 = tl.load(qp + (D2 + 1) * sqd, mask=o_ok, other=0.0)
    q_sum = (tl.sum(q0.to(tl.float32), 1) + tl.sum(q1.to(tl.float32), 1) + tl.sum(q2.to(tl.float32), 1)
             + tl.sum(q3.to(tl.float32), 1))
    if DOT_F32:
        q0 = q0.to(tl.float32)
        q1 = q1.to(tl.float32)
        q2 = q2.to(tl.float32)
        q3 = q3.to(tl.float32)

    kv_end = tl.minimum(tl.max(pos, 0) + 1, L)
    start = pid_s * split_len
    end = tl.minimum(start + split_len, kv_end)
    # lim: the last slot a row sees in this split. Tiles that end at or before the smallest lim of the
    # block's real rows are visible to all of them and take the unmasked path.
    lim = tl.minimum(pos, end - 1)
    min_lim = tl.min(tl.where(row_ok, lim, L), 0)
    full_end = start + tl.maximum(min_lim + 1 - start, 0) // BLOCK_N * BLOCK_N

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    c_i = tl.zeros([BLOCK_M], tl.float32)  # Σ_j p_j·zero_j - BIAS·Σ_j (p·scale)_j: V's per-row offset
    acc0 = tl.zeros([BLOCK_M, BLOCK_D4], tl.float32)
    acc1 = tl.zeros([BLOCK_M, BLOCK_D4], tl.float32)
    acc2 = tl.zeros([BLOCK_M, BLOCK_D4], tl.float32)
    acc3 = tl.zeros([BLOCK_M, BLOCK_D4], tl.float32)
    kbase = KC + b * skb + h * skh
    vbase = VC + b * svb + h * svh
    kmbase = KM + b * skmb + h * skmh
    vmbase = VM + b * svmb + h * svmh
    if MASK_ROW:  # the mask is broadcast over heads and the block's tokens: one row, loaded [BLOCK_N] a tile
        mrow = MASK + b * smb
    else:
        mrow = MASK + b * smb + qh * smh + t * smt
    mask_live = HAS_MASK  # MASK_SCAN 0: every tile reads its part of the row
    if HAS_MASK and MASK_ROW and MASK_SCAN > 0:
        # Scan the split's part of the row once: where it keeps every slot (bool) or adds 0 (float),
        # as transformers' decode mask does without padding (its causal part is `lim` here), the
        # tiles skip it. Reading it per tile, after the scores, cost 23% at 256 x 1280 on an H200.
        hidden = 0
        for c0 in range(start, end, MASK_SCAN):
            c = c0 + tl.arange(0, MASK_SCAN)
            if MASK_BOOL:
                mv = tl.load(mrow + c * sml, mask=c < end, other=1)
                hidden += tl.sum((mv == 0).to(tl.int32), 0)
            else:
                mv = tl.load(mrow + c * sml, mask=c < end, other=0.0)
                hidden += tl.sum((mv != 0).to(tl.int32), 0)
        mask_live = hidden > 0
    for n0 in range(start, full_end, BLOCK_N):
        m_i, l_i, c_i, acc0, acc1, acc2, acc3 = _attend_tile(
            n0, end, m_i, l_i, c_i, acc0, acc1, acc2, acc3, q0, q1, q2, q3, q_sum, lim, row_ok, e, e_ok,
            kbase, vbase, kmbase, vmbase, skl, svl, skml, svml, mrow, sml, mask_live, qk_scale,
            O.dtype.element_ty, BLOCK_N, BIAS, CODE, DOT_F32, USE_ASM, EVEN_D, False, HAS_MASK, MASK_BOOL, MASK_ROW, LAZY,
            FTZ_EXP)
    for n0 in range(full_end, end, BLOCK_N):
        m_i, l_i, c_i, acc0, acc1, acc2, acc3 = _attend_tile(
            n0, end, m_i, l_i, c_i, acc0, acc1, acc2, acc3, q0, q1, q2, q3, q_sum, lim, row_ok, e, e_ok,
            kbase, vbase, kmbase, vmbase, skl, svl, skml, svml, mrow, sml, mask_live, qk_scale,
            O.dtype.element_ty, BLOCK_N, BIAS, CODE, DOT_F32, USE_ASM, EVEN_D, True, HAS_MASK, MASK_BOOL, MASK_ROW, LAZY,
            FTZ_EXP)

    if PARTIAL:
        # Partials are contiguous [B, Hq, Tq, num_splits, 2·D2] (acc, in output dim order) and
        # [..., num_splits, 2] (m, l).
        part = ((b * Hq + qh) * Tq + t) * num_splits + pid_s
        ap = PACC + part[:, None] * (2 * D2) + 2 * e[None, :]
        tl.store(ap, acc0 + c_i[:, None], mask=o_ok)
        tl.store(ap + 1, acc1 + c_i[:, None], mask=o_ok)
        tl.store(ap + D2, acc2 + c_i[:, None], mask=o_ok)
        tl.store(ap + D2 + 1, acc3 + c_i[:, None], mask=o_ok)
        tl.store(PML + part * 2, m_i, mask=row_ok)
        tl.store(PML + part * 2 + 1, l_i, mask=row_ok)
    else:
        inv = tl.where(l_i > 0, 1.0 / tl.where(l_i > 0, l_i, 1.0), 0.0)[:, None]
        op = O + b * sob + qh[:, None] * soh + t[:, None] * sot + (2 * e[None, :]) * sod
        tl.store(op, ((acc0 + c_i[:, None]) * inv).to(O.dtype.element_ty), mask=o_ok)
        tl.store(op + sod, ((acc1 + c_i[:, None]) * inv).to(O.dtype.element_ty), mask=o_ok)
        tl.store(op + D2 * sod, ((acc2 + c_i[:, None]) * inv).to(O.dtype.element_ty), mask=o_ok)
        tl.store(op + (D2 + 1) * sod, ((acc3 + c_i[:, None]) * inv).to(O.dtype.element_ty), mask=o_ok)


@triton.jit
def _kv4_attention_merge_kernel(
    PACC, PML, O,
    sob, soh, sot, sod,
    Hq, Tq, D, num_splits,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0)  # (b, qh, t) flattened
    b = row // (Hq * Tq)
    qh = (row // Tq) % Hq
    t = row % Tq
    sp = tl.arange(0, BLOCK_S)
    s_ok = sp < num_splits
    d = tl.arange(0, BLOCK_D)
    base = row.to(tl.int64) * num_splits
    m = tl.load(PML + (base + sp) * 2, mask=s_ok, other=float("-inf"))
    l = tl.load(PML + (base + sp) * 2 + 1, mask=s_ok, other=0.0)
    acc = tl.load(PACC + (base + sp)[:, None] * D + d[None, :], mask=s_ok[:, None] & (d < D)[None, :], other=0.0)
    m_max = tl.max(m, 0)
    m_ref = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.exp2(m - m_ref)
    den = tl.sum(w * l, 0)
    out = tl.sum(w[:, None] * acc, 0)
    out = tl.where(den > 0, out / tl.where(den > 0, den, 1.0), 0.0)
    orow = O + b * sob + qh * soh + t * sot
    tl.store(orow + d * sod, out.to(O.dtype.element_ty), mask=d < D)


# ---- configs --------------------------------------------------------------------------------------
# A config: BLOCK_N (tokens per tile), num_warps, num_stages, maxnreg (a register cap, None for the
# compiler's choice), LAZY (the softmax maximum moves only in steps of 2^8, so the accumulators are
# rarely rescaled), and the split rule's MIN_SPLIT_LEN, the shortest split in tokens worth its
# partial results (SHORT_SPLIT_LEN where that would leave the GPU mostly idle, see split_count).
# Decode splits the sequence until the (batch, KV head) programs fill ONE wave of resident
# programs and no more; how many programs an SM holds at once is read off the compiled
# kernel (registers, shared memory, threads: resident_programs), or CTAS_PER_SM where given. On the
# H100 a split count that spilled a few programs into a second wave (16×8192 at 9 splits: 1152
# one-warp programs for 1056 slots) ran 8-30% slower than one that filled exactly one wave (8).
# Tuned values per GPU live in lowering/configs/kv4-attention-<gpu>.json (benchmarks/bench_attention.py
# --sweep --write-config); DEFAULT_CONFIGS hold the H100 winners for GPUs without a table.
# "decode": one query row block (G·Tq ≤ 16 rows), memory-bound; "prefill": more rows.
# Mask-row slots scanned a step before a split's loop (bytes for a bool mask). A split shorter than
# one step does not scan: with 1-3 tiles the scan's load would sit before the first tile's loads
# and spare at most three mask loads that overlap the tiles' own (batch-1 decode: 64-token splits).
MASK_SCAN = 256
DEFAULT_CONFIGS = {
    "decode": {"BLOCK_N": 64, "num_warps": 1, "num_stages": 2, "maxnreg": None, "LAZY": True, "CTAS_PER_SM": None,
               "MIN_SPLIT_LEN": 512, "SHORT_SPLIT_LEN": 64},
    "prefill": {"BLOCK_N": 64, "num_warps": 4, "num_stages": 2, "maxnreg": None, "LAZY": True, "CTAS_PER_SM": None,
                "MIN_SPLIT_LEN": 256, "SHORT_SPLIT_LEN": 128},
}


def config_path(device_name: str) -> str:
    """lowering/configs/kv4-attention-{GPU}.json (an H200 reads the H100's)."""
    return tuned_config_file("kv4-attention-", device_name)


@functools.lru_cache(maxsize=None)
def _tuned_table(device_name: str) -> dict:
    path = config_path(device_name)
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f).get("configs", {})


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2  # the interpreter: a couple of splits, so the merge path is exercised


def _block_m(rows: int) -> int:
    return 16 if rows <= 16 else (32 if rows <= 32 else 64)  # tl.dot needs M >= 16


def choose_config(device: torch.device, rows: int, length: int, **overrides) -> dict:
    """The tile config for a call (any batch, length, heads, GQA ratio): BLOCK_N, num_warps,
    num_stages, maxnreg, LAZY, and the split rule's CTAS_PER_SM / MIN_SPLIT_LEN / num_splits.

    `overrides` (any of those keys) replace the table's values; None leaves a value as it is.
    """
    kind = "decode" if rows <= 16 else "prefill"
    cfg = dict(DEFAULT_CONFIGS[kind])
    if device.type == "cuda":
        cfg.update(_tuned_table(torch.cuda.get_device_name(device)).get(kind, {}))
    else:  # interpreter: small tiles keep numpy cheap, short splits exercise the merge
        cfg.update(BLOCK_N=32, num_warps=4, num_stages=1, maxnreg=None, CTAS_PER_SM=4, MIN_SPLIT_LEN=32,
                   SHORT_SPLIT_LEN=32)
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    cfg["BLOCK_N"] = max(16, min(cfg["BLOCK_N"], triton.next_power_of_2(length)))
    cfg["LAZY"] = bool(cfg["LAZY"])
    cfg.setdefault("num_splits", None)
    return cfg


def split_count(cfg: dict, programs: int, length: int, resident_per_sm: int, sms: int) -> int:
    """Splits of the sequence: enough to fill one wave of resident programs (floor: a partial second
    wave is a tail), at most 256 (the merge's width), and no split shorter than MIN_SPLIT_LEN tokens,
    unless that leaves under a quarter of a wave: then splits go down to SHORT_SPLIT_LEN. (H100: at
    32×1024, 2 splits of 512 tokens ran 9% faster than 5 of ~200, with 512 programs in flight; at
    4×2048, 4 splits left 128 programs and ran 0.020 ms where 16 splits of 128 tokens ran 0.012.
    H200, 1×1280 with a decode step's boolean mask: 20 splits of 64 tokens 9.5 us, 10 of 128 11.4 us,
    hence SHORT_SPLIT_LEN 64 for decode.)"""
    if cfg.get("num_splits") is not None:
        return cfg["num_splits"]
    tiles = cdiv(length, cfg["BLOCK_N"])
    wave = resident_per_sm * sms
    fill = wave // programs
    splits = min(fill, tiles // max(1, cdiv(cfg["MIN_SPLIT_LEN"], cfg["BLOCK_N"])))
    if programs * max(splits, 1) < wave // 4:
        splits = min(fill, tiles // max(1, cdiv(cfg.get("SHORT_SPLIT_LEN", 128), cfg["BLOCK_N"])))
    return max(1, min(splits, 256))


def resident_programs(regs: int, shared: int, warps: int, reg_file: int = 65536, smem: int = 228 * 1024,
                      max_threads: int = 2048, partitions: int = 4) -> int:
    """Programs of a kernel (regs a thread, shared bytes and warps a program) that one SM holds at once.

    Registers are granted 256 a warp, and each of an SM's 4 schedulers owns a quarter of the
    register file, its warps living there: a 216-register warp (6912 registers) fits twice in a
    16384-register quarter, so an SM holds 8 one-warp programs, not the 9 that 65536 / 6912 suggests.
    The H100 runs of v4 showed it: 9 splits at 16×8192 (1152 one-warp programs) left a tail and ran
    0.079 ms where 8 ran 0.061 ms, and a 192-register cap changed nothing.
    """
    warp_regs = cdiv(max(int(regs), 1) * 32, 256) * 256
    warps_by_regs = partitions * ((reg_file // partitions) // warp_regs)
    by_smem = smem // (shared + 1024) if shared else 32  # the driver reserves 1 KB a block
    return max(1, min(32, warps_by_regs // warps, max_threads // (32 * warps), by_smem))


_RESIDENT: dict = {}


def _resident_per_sm(device: torch.device, key: tuple, compile_kernel) -> int | None:
    """resident_programs() of one compiled kernel variant, cached; None where the compiled kernel
    cannot tell (the caller then uses a default)."""
    if key not in _RESIDENT:
        try:
            k = compile_kernel()
            if hasattr(k, "_init_handles"):
                k._init_handles()
            props = torch.cuda.get_device_properties(device)
            _RESIDENT[key] = resident_programs(
                k.n_regs, k.metadata.shared, k.metadata.num_warps,
                reg_file=getattr(props, "regs_per_multiprocessor", 65536),
                smem=getattr(props, "shared_memory_per_multiprocessor", 0) or 228 * 1024,
                max_threads=getattr(props, "max_threads_per_multi_processor", 2048))
        except Exception:  # an older Triton without these fields: fall back to the table
            _RESIDENT[key] = None
    return _RESIDENT[key]


def _wide_view(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The last axis of x read as `dtype` words (fp16 meta pairs -> int32, V byte pairs -> int16);
    a layout that cannot be viewed that way (odd strides or offset) is copied first."""
    k = dtype.itemsize // x.element_size()
    if x.stride(-1) != 1 or x.storage_offset() % k or any(st % k for st in x.stride()[:-1]):
        x = x.contiguous()
    return x.view(dtype)


def triton_supports(head_dim: int) -> bool:
    """The kernel reads K and V as byte pairs: head_dim must be a multiple of 4 (every LLM's is)."""
    return head_dim % 4 == 0


def kv4_attention_triton(
    q: torch.Tensor, k_cache: torch.Tensor, k_meta: torch.Tensor, v_cache: torch.Tensor, v_meta: torch.Tensor,
    cache_position: torch.Tensor, attn_mask: torch.Tensor | None = None, scale: float | None = None,
    num_splits: int | None = None, block_n: int | None = None,
    num_warps: int | None = None, num_stages: int | None = None, use_asm: bool | None = None,
    tuning: dict | None = None, plan_only: bool = False,
) -> torch.Tensor | dict:
    """Launch the Triton kernels. The keyword knobs override the chosen config (tests, the sweep);
    `tuning` may hold LAZY, maxnreg and the split rule's CTAS_PER_SM / MIN_SPLIT_LEN. plan_only:
    return the launch plan (config, splits, programs an SM holds) instead of running (benchmarks)."""
    b, hq, tq, d = q.shape
    hkv, length, d2 = k_cache.shape[1], k_cache.shape[2], k_cache.shape[3]
    g = hq // hkv
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"kv4_attention: q dtype {q.dtype} is not supported (float16, bfloat16, float32)")
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # contiguous, as the fake says
    if length == 0 or tq == 0:
        return out.zero_()
    if not triton_supports(d):
        raise ValueError(f"kv4_attention: the Triton kernel needs head_dim % 4 == 0, got {d}; "
                         "use kernels='reference' for this model")
    pos = cache_position.to(device=q.device, dtype=torch.int64).contiguous()
    k_pairs = _wide_view(k_cache, torch.int16)
    v_pairs = _wide_view(v_cache, torch.int16)
    k_words = _wide_view(k_meta, torch.int32).squeeze(-1)
    v_words = _wide_view(v_meta, torch.int32).squeeze(-1)

    rows = g * tq
    cfg = choose_config(q.device, rows, length, BLOCK_N=block_n, num_splits=num_splits, num_warps=num_warps,
                        num_stages=num_stages, **(tuning or {}))
    block_n = cfg["BLOCK_N"]
    block_m = _block_m(rows)
    block_d2 = max(32, triton.next_power_of_2(d2))  # the pair axis (half of it) is a dot dimension: >= 16
    row_blocks = cdiv(rows, block_m)
    tiles = cdiv(length, block_n)

    code = {torch.bfloat16: CODE_BF16, torch.float16: CODE_F16, torch.float32: CODE_F32}[q.dtype]
    if use_asm is None:
        use_asm = q.is_cuda
    use_asm = use_asm and code != CODE_F32
    if use_asm and not q.is_cuda:
        raise RuntimeError("kv4_attention: use_asm=True needs a CUDA GPU (the interpreter runs the pure-Triton unpack)")

    mask_bool = attn_mask is not None and attn_mask.dtype == torch.bool
    if attn_mask is not None:
        # bool masks are read in place as bytes (no float mask materialized per layer and step)
        if mask_bool:
            attn_mask = attn_mask.view(torch.uint8)
        while attn_mask.dim() < 4:
            attn_mask = attn_mask.unsqueeze(0)
        attn_mask = attn_mask.expand(b, hq, tq, length)
        mask_strides = attn_mask.stride()
    else:
        mask_strides = (0, 0, 0, 0)

    args = [q, k_pairs, k_words, v_pairs, v_words, pos, attn_mask if attn_mask is not None else q, out, None, None,
            *q.stride(), *k_pairs.stride()[:3], *k_words.stride(), *v_pairs.stride()[:3], *v_words.stride(),
            *mask_strides, *out.stride(),
            hkv, hq, tq, length, d2, 0, 1, scale * _LOG2E]
    consts = dict(G=g, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D2=block_d2, HAS_MASK=attn_mask is not None,
                  MASK_BOOL=mask_bool, CODE=code, BIAS=_CODE_BIAS[code],
                  # a mask broadcast over heads and tokens ([B, 1, 1, L], the decode mask transformers
                  # passes): one [BLOCK_N] row a tile instead of a [BLOCK_M, BLOCK_N] gather. The gather
                  # took the H200's batch-1 decode attention from 11 to 24 us.
                  MASK_ROW=attn_mask is not None and (hq == 1 or mask_strides[1] == 0) and (tq == 1 or mask_strides[2] == 0),
                  DOT_F32=q.dtype == torch.bfloat16 and not q.is_cuda,
                  USE_ASM=use_asm, EVEN_D=d2 == block_d2, LAZY=cfg["LAZY"], FTZ_EXP=q.is_cuda,
                  MASK_SCAN=MASK_SCAN,
                  num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if cfg.get("maxnreg"):
        consts["maxnreg"] = cfg["maxnreg"]

    programs = b * hkv * row_blocks
    resident = cfg.get("CTAS_PER_SM")
    if resident is None and cfg.get("num_splits") is None and q.is_cuda:
        key = (q.device.index, q.dtype, tuple(sorted(consts.items())))
        scratch = torch.empty(2, dtype=torch.float32, device=q.device)  # partials' dtype: the same kernel variant
        resident = _resident_per_sm(q.device, key, lambda: _kv4_attention_kernel.warmup(
            *[scratch if a is None else a for a in args], grid=(1,), PARTIAL=True, **consts))
    splits = split_count(cfg, programs, length, resident or 8, _num_sms(q.device))
    splits = max(1, min(splits, tiles))
    split_len = cdiv(tiles, splits) * block_n
    splits = cdiv(length, split_len)
    args[-3], args[-2] = split_len, splits
    consts["MASK_SCAN"] = MASK_SCAN if split_len >= MASK_SCAN else 0
    if plan_only:
        return {**{k: cfg[k] for k in ("BLOCK_N", "num_warps", "num_stages", "maxnreg", "LAZY", "MIN_SPLIT_LEN")},
                "num_splits": splits, "resident_per_sm": resident, "programs": programs * splits,
                "mask_scan": consts["MASK_SCAN"] > 0 and consts["MASK_ROW"]}

    if splits > 1:
        pacc = torch.empty(b, hq, tq, splits, d, dtype=torch.float32, device=q.device)
        pml = torch.empty(b, hq, tq, splits, 2, dtype=torch.float32, device=q.device)
    else:
        pacc = pml = out  # unused
    args[8], args[9] = pacc, pml
    _kv4_attention_kernel[(b * hkv, splits, row_blocks)](*args, PARTIAL=splits > 1, **consts)
    if splits > 1:
        _kv4_attention_merge_kernel[(b * hq * tq,)](
            pacc, pml, out, *out.stride(), hq, tq, d, splits,
            BLOCK_S=triton.next_power_of_2(splits), BLOCK_D=triton.next_power_of_2(d),
        )
    return out


@torch.library.custom_op("qoq::kv4_attention", mutates_args=())
def kv4_attention(
    q: torch.Tensor, k_cache: torch.Tensor, k_meta: torch.Tensor, v_cache: torch.Tensor, v_meta: torch.Tensor,
    cache_position: torch.Tensor, attn_mask: torch.Tensor | None = None, scale: float | None = None,
    kernels: str = "auto",
) -> torch.Tensor:
    """Attention of q [B, Hq, Tq, D] at cache positions cache_position [Tq] over a KV4 cache [B, Hkv, L, ·].

    GQA with Hq = G·Hkv (query head h·G + g reads KV head h, as transformers' repeat_kv). Query i sees
    slots j ≤ cache_position[i] (causal; decode, prefill and chunked prefill alike), plus an optional
    attn_mask broadcastable to [B, Hq, Tq, L]: bool (True = attend) or additive float.
    """
    _check(q, k_cache, k_meta, v_cache, v_meta, cache_position)
    if use_triton(q, kernels):
        if kernels == "triton" or triton_supports(q.shape[-1]):
            return kv4_attention_triton(q, k_cache, k_meta, v_cache, v_meta, cache_position, attn_mask, scale)
        _warn_reference(q.shape[-1])
    return kv4_attention_reference(q, k_cache, k_meta, v_cache, v_meta, cache_position, attn_mask, scale)


@functools.lru_cache(maxsize=None)
def _warn_reference(head_dim: int) -> None:
    warnings.warn(f"kv4_attention: head_dim {head_dim} is not a multiple of 4, which the Triton kernel needs; "
                  "this attention runs the torch reference (correct, slower)", stacklevel=3)


@kv4_attention.register_fake
def _kv4_attention_fake(q, k_cache, k_meta, v_cache, v_meta, cache_position, attn_mask=None, scale=None,
                        kernels="auto"):
    return q.new_empty(q.shape)  # contiguous whatever q's strides (q often arrives transposed)
