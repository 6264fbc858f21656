"""`qoq::kv4_attention`: attention of queries over a KV4 cache (format in lowering/kv4_append.py).

One kernel serves decode and (chunked) prefill: flash-decoding, i.e. the sequence is split across
programs, each program loads a KV tile once for all query heads of its GQA group and all its query
tokens, dequantizes it in registers, and keeps an online softmax; a second kernel merges the splits.
"""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from lowering.dispatch import cdiv, use_triton
from lowering.kv4_append import kv4_dequantize

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


@triton.jit
def _kv4_attention_kernel(
    Q, KC, KM, VC, VM, POS, MASK, O, PACC, PML,
    sqb, sqh, sqt, sqd,                  # q [B, Hq, Tq, D]
    skb, skh, skl, skd,                  # k data [B, Hkv, L, D/2]
    skmb, skmh, skml, skmc,              # k meta [B, Hkv, L, 2]
    svb, svh, svl, svd,                  # v data
    svmb, svmh, svml, svmc,              # v meta
    smb, smh, smt, sml,                  # additive mask, broadcast to [B, Hq, Tq, L] (0-strides)
    sob, soh, sot, sod,                  # out [B, Hq, Tq, D] (written when NUM_SPLITS == 1)
    Hkv, Hq, Tq, L, D2, split_len, qk_scale,
    G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D2: tl.constexpr,
    NUM_SPLITS: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, DOT_F32: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_m = tl.program_id(2)
    b = pid_bh // Hkv
    h = pid_bh % Hkv

    # Rows are (token, head-in-group), token-major: a row block covers consecutive tokens, so the
    # causal bound of the block is tight, and all G heads sharing the KV head are in the same block.
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < G * Tq
    t = rows // G
    qh = h * G + rows % G
    pos = tl.load(POS + t, mask=row_ok, other=-1)
    d = tl.arange(0, BLOCK_D2)
    d_ok = d < D2

    qp = Q + b * sqb + qh[:, None] * sqh + t[:, None] * sqt
    q_ok = row_ok[:, None] & d_ok[None, :]
    q_lo = tl.load(qp + d[None, :] * sqd, mask=q_ok, other=0.0)
    q_hi = tl.load(qp + (d + D2)[None, :] * sqd, mask=q_ok, other=0.0)
    # k = scale·code + zero, so q·k = scale·(q·code) + zero·Σq: the zero leaves the inner product.
    q_sum = tl.sum(q_lo.to(tl.float32), 1) + tl.sum(q_hi.to(tl.float32), 1)
    if DOT_F32:
        # The interpreter's bf16 dot is wrong (bf16 is held as uint16); the same bf16 values in fp32 are not.
        q_lo = q_lo.to(tl.float32)
        q_hi = q_hi.to(tl.float32)

    kv_end = tl.minimum(tl.max(pos, 0) + 1, L)
    start = pid_s * split_len
    end = tl.minimum(start + split_len, kv_end)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc_lo = tl.zeros([BLOCK_M, BLOCK_D2], tl.float32)
    acc_hi = tl.zeros([BLOCK_M, BLOCK_D2], tl.float32)
    kbase = KC + b * skb + h * skh
    vbase = VC + b * svb + h * svh
    kmbase = KM + b * skmb + h * skmh
    vmbase = VM + b * svmb + h * svmh
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = n < end
        kv_ok = n_ok[:, None] & d_ok[None, :]
        kb = tl.load(kbase + n[:, None] * skl + d[None, :] * skd, mask=kv_ok, other=0)
        k_scale = tl.load(kmbase + n * skml, mask=n_ok, other=0.0).to(tl.float32)
        k_zero = tl.load(kmbase + n * skml + skmc, mask=n_ok, other=0.0).to(tl.float32)
        k_lo = (kb & 0x0F).to(tl.float32).to(q_lo.dtype)  # via fp32: the interpreter casts u8 -> bf16 wrongly
        k_hi = (kb >> 4).to(tl.float32).to(q_lo.dtype)
        s = tl.dot(q_lo, tl.trans(k_lo)) + tl.dot(q_hi, tl.trans(k_hi))
        s = (s * k_scale[None, :] + q_sum[:, None] * k_zero[None, :]) * qk_scale
        if HAS_MASK:
            mp = MASK + b * smb + qh[:, None] * smh + t[:, None] * smt + n[None, :] * sml
            if MASK_BOOL:  # read as bytes: True = attend
                keep = tl.load(mp, mask=row_ok[:, None] & n_ok[None, :], other=1)
                s = tl.where(keep != 0, s, float("-inf"))
            else:
                s += tl.load(mp, mask=row_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32) * 1.4426950408889634
        s = tl.where((n[None, :] <= pos[:, None]) & n_ok[None, :], s, float("-inf"))

        # Online softmax in base 2; a row that has seen only -inf keeps m = -inf and uses 0 as its
        # reference so no inf - inf appears.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_ref)
        p = tl.exp2(s - m_ref[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)

        vb = tl.load(vbase + n[:, None] * svl + d[None, :] * svd, mask=kv_ok, other=0)
        v_scale = tl.load(vmbase + n * svml, mask=n_ok, other=0.0).to(tl.float32)
        v_zero = tl.load(vmbase + n * svml + svmc, mask=n_ok, other=0.0).to(tl.float32)
        # Σ_j p_j (scale_j·code_j + zero_j) = (p·scale) @ codes + Σ_j p_j·zero_j
        pv = (p * v_scale[None, :]).to(Q.dtype.element_ty).to(q_lo.dtype)
        p_zero = tl.sum(p * v_zero[None, :], 1)[:, None]
        acc_lo = acc_lo * alpha[:, None] + tl.dot(pv, (vb & 0x0F).to(tl.float32).to(q_lo.dtype)) + p_zero
        acc_hi = acc_hi * alpha[:, None] + tl.dot(pv, (vb >> 4).to(tl.float32).to(q_lo.dtype)) + p_zero
        m_i = m_new

    if NUM_SPLITS == 1:
        inv = tl.where(l_i > 0, 1.0 / tl.where(l_i > 0, l_i, 1.0), 0.0)
        op = O + b * sob + qh[:, None] * soh + t[:, None] * sot
        tl.store(op + d[None, :] * sod, (acc_lo * inv[:, None]).to(O.dtype.element_ty), mask=q_ok)
        tl.store(op + (d + D2)[None, :] * sod, (acc_hi * inv[:, None]).to(O.dtype.element_ty), mask=q_ok)
    else:
        # Partials are contiguous [B, Hq, Tq, NUM_SPLITS, 2·D2] (acc) and [..., NUM_SPLITS, 2] (m, l).
        part = ((b * Hq + qh) * Tq + t) * NUM_SPLITS + pid_s
        ap = PACC + part[:, None] * (2 * D2)
        tl.store(ap + d[None, :], acc_lo, mask=q_ok)
        tl.store(ap + (d + D2)[None, :], acc_hi, mask=q_ok)
        tl.store(PML + part * 2, m_i, mask=row_ok)
        tl.store(PML + part * 2 + 1, l_i, mask=row_ok)


@triton.jit
def _kv4_attention_merge_kernel(
    PACC, PML, O,
    sob, soh, sot, sod,
    Hq, Tq, D,
    NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0)  # (b, qh, t) flattened
    b = row // (Hq * Tq)
    qh = (row // Tq) % Hq
    t = row % Tq
    sp = tl.arange(0, BLOCK_S)
    s_ok = sp < NUM_SPLITS
    d = tl.arange(0, BLOCK_D)
    m = tl.load(PML + (row * NUM_SPLITS + sp) * 2, mask=s_ok, other=float("-inf"))
    l = tl.load(PML + (row * NUM_SPLITS + sp) * 2 + 1, mask=s_ok, other=0.0)
    acc = tl.load(PACC + (row * NUM_SPLITS + sp)[:, None] * D + d[None, :],
                  mask=s_ok[:, None] & (d < D)[None, :], other=0.0)
    m_max = tl.max(m, 0)
    m_ref = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.exp2(m - m_ref)
    den = tl.sum(w * l, 0)
    out = tl.sum(w[:, None] * acc, 0)
    out = tl.where(den > 0, out / tl.where(den > 0, den, 1.0), 0.0)
    tl.store(O + b * sob + qh * soh + t * sot + d * sod, out.to(O.dtype.element_ty), mask=d < D)


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2  # the interpreter: a couple of splits, so the merge path is exercised


def kv4_attention_triton(
    q: torch.Tensor, k_cache: torch.Tensor, k_meta: torch.Tensor, v_cache: torch.Tensor, v_meta: torch.Tensor,
    cache_position: torch.Tensor, attn_mask: torch.Tensor | None = None, scale: float | None = None,
    num_splits: int | None = None, block_n: int = 64,
) -> torch.Tensor:
    """Launch the Triton kernels; `num_splits` (default: enough programs to fill the GPU) for tests."""
    b, hq, tq, d = q.shape
    hkv, length, d2 = k_cache.shape[1], k_cache.shape[2], k_cache.shape[3]
    g = hq // hkv
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"kv4_attention: q dtype {q.dtype} is not supported (float16, bfloat16, float32)")
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # contiguous, as the fake says
    if length == 0 or tq == 0:
        return out.zero_()
    pos = cache_position.to(device=q.device, dtype=torch.int64).contiguous()

    rows = g * tq
    block_m = 16 if rows <= 16 else (32 if rows <= 32 else 64)  # tl.dot needs M >= 16
    block_d2 = max(16, triton.next_power_of_2(d2))
    row_blocks = cdiv(rows, block_m)
    tiles = cdiv(length, block_n)
    if num_splits is None:
        # Flash-decoding: split the sequence until there are ~2 programs per SM; prefill has enough rows.
        num_splits = max(1, min(tiles, cdiv(2 * _num_sms(q.device), b * hkv * row_blocks), 128))
    num_splits = max(1, min(num_splits, tiles))
    split_len = cdiv(tiles, num_splits) * block_n
    num_splits = cdiv(length, split_len)

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

    if num_splits > 1:
        pacc = torch.empty(b, hq, tq, num_splits, d, dtype=torch.float32, device=q.device)
        pml = torch.empty(b, hq, tq, num_splits, 2, dtype=torch.float32, device=q.device)
    else:
        pacc = pml = out  # unused
    _kv4_attention_kernel[(b * hkv, num_splits, row_blocks)](
        q, k_cache, k_meta, v_cache, v_meta, pos, attn_mask if attn_mask is not None else q, out, pacc, pml,
        *q.stride(), *k_cache.stride(), *k_meta.stride(), *v_cache.stride(), *v_meta.stride(),
        *mask_strides, *out.stride(),
        hkv, hq, tq, length, d2, split_len, scale * _LOG2E,
        G=g, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D2=block_d2,
        NUM_SPLITS=num_splits, HAS_MASK=attn_mask is not None, MASK_BOOL=mask_bool,
        DOT_F32=q.dtype == torch.bfloat16 and not q.is_cuda,
        num_warps=4,
    )
    if num_splits > 1:
        _kv4_attention_merge_kernel[(b * hq * tq,)](
            pacc, pml, out, *out.stride(), hq, tq, d,
            NUM_SPLITS=num_splits, BLOCK_S=triton.next_power_of_2(num_splits),
            BLOCK_D=triton.next_power_of_2(d),
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
        return kv4_attention_triton(q, k_cache, k_meta, v_cache, v_meta, cache_position, attn_mask, scale)
    return kv4_attention_reference(q, k_cache, k_meta, v_cache, v_meta, cache_position, attn_mask, scale)


@kv4_attention.register_fake
def _kv4_attention_fake(q, k_cache, k_meta, v_cache, v_meta, cache_position, attn_mask=None, scale=None,
                        kernels="auto"):
    return q.new_empty(q.shape)  # contiguous whatever q's strides (q often arrives transposed)
