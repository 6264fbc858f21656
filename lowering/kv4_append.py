"""KV4 cache format and `qoq::kv4_append`: quantize new keys/values and write them into the cache.

The format is QoQ's KV4: per token and KV head, asymmetric uint4 along head_dim with a 16-bit
scale and zero. Everything that reads the cache (kv4_attention, runtime/kv_cache) uses the helpers here.

Layout of one layer's cache (K and V alike), chosen for decode, where one program streams a run of
tokens of one (batch, KV head):

    data: uint8   [B, Hkv, L, D/2]   byte i of a token = dim i (low nibble) | dim i + D/2 (high nibble)
    meta: float16 [B, Hkv, L, 2]     (scale, zero);  x ≈ scale · q + zero,  q ∈ [0, 15]

Pairing dim i with dim i + D/2 (not i with i + 1) means unpacking gives two contiguous halves of the
head, so a kernel dots the low nibbles with q[:D/2] and the high nibbles with q[D/2:] and never
interleaves lanes. `zero` is stored as the value of code 0 (the row minimum rounded to fp16), not an
integer zero point: dequantization is one multiply-add and no zero-point rounding or clamping is lost.
Bits per element: 4 + 32/D (4.25 at D = 128). fp16 scale/zero assume |K|, |V| < 65504, as in fp16 models.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowering.dispatch import cdiv, use_triton

KV4_LEVELS = 15  # uint4 codes 0..15


def kv4_bits_per_element(head_dim: int) -> float:
    """Cache bits per stored K or V element: D/2 data bytes plus a 4-byte (scale, zero) per token-head."""
    return (head_dim // 2 + 4) * 8 / head_dim


def kv4_alloc(
    batch: int, kv_heads: int, max_len: int, head_dim: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zeroed (data, meta) buffers of one K or V cache; zero meta dequantizes to exactly 0."""
    if head_dim % 2:
        raise ValueError(f"KV4 packs two values a byte along head_dim: head_dim={head_dim} must be even")
    data = torch.zeros(batch, kv_heads, max_len, head_dim // 2, dtype=torch.uint8, device=device)
    meta = torch.zeros(batch, kv_heads, max_len, 2, dtype=torch.float16, device=device)
    return data, meta


def kv4_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference quantizer: x [..., D] -> (data uint8 [..., D/2], meta fp16 [..., 2]). The spec of the numbers.

    The codes are computed against the fp16-rounded scale and zero, so they are the best codes for the
    values actually stored; rounding is floor(y + 0.5) (the kernel does the same, bit for bit).
    """
    d = x.shape[-1]
    x32 = x.float()
    mn = x32.amin(-1, keepdim=True)
    mx = x32.amax(-1, keepdim=True)
    scale16 = ((mx - mn) / KV4_LEVELS).to(torch.float16)
    zero16 = mn.to(torch.float16)
    s32, z32 = scale16.float(), zero16.float()
    pos = s32 > 0
    codes = torch.where(pos, torch.floor((x32 - z32) / torch.where(pos, s32, 1.0) + 0.5), 0.0)
    codes = codes.clamp(0, KV4_LEVELS).to(torch.uint8)
    data = codes[..., : d // 2] | (codes[..., d // 2 :] << 4)
    meta = torch.cat([scale16, zero16], dim=-1)
    return data, meta


def kv4_dequantize(data: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """Reference dequantizer: (data [..., D/2], meta [..., 2]) -> float32 [..., D]."""
    codes = torch.cat([data & 0x0F, data >> 4], dim=-1).float()
    return codes * meta[..., 0:1].float() + meta[..., 1:2].float()


def _check_cache(name: str, x: torch.Tensor, data: torch.Tensor, meta: torch.Tensor) -> None:
    b, h, _, d = x.shape
    if data.dtype != torch.uint8 or meta.dtype != torch.float16:
        raise TypeError(f"kv4 {name} cache: expected uint8 data and float16 meta, got {data.dtype} and {meta.dtype}")
    if data.dim() != 4 or tuple(data.shape[:2]) != (b, h) or data.shape[3] * 2 != d:
        raise ValueError(f"kv4 {name} cache data {tuple(data.shape)} does not hold {name} {tuple(x.shape)} "
                         f"(expected [{b}, {h}, L, {d // 2}])")
    if tuple(meta.shape) != (*data.shape[:3], 2):
        raise ValueError(f"kv4 {name} cache meta {tuple(meta.shape)}: expected {(*data.shape[:3], 2)}")


def kv4_append_reference(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, k_meta: torch.Tensor,
    v_cache: torch.Tensor, v_meta: torch.Tensor, cache_position: torch.Tensor,
) -> None:
    pos = cache_position.to(device=k_cache.device, dtype=torch.long)
    for x, data, meta in ((k, k_cache, k_meta), (v, v_cache, v_meta)):
        qd, qm = kv4_quantize(x)
        data.index_copy_(2, pos, qd)
        meta.index_copy_(2, pos, qm)


@triton.jit
def _quantize_store(X, DATA, META, pos, w_ok, b, h, t, t_ok,
                    sxb, sxh, sxt, sxd, sdb, sdh, sdl, sdd, smb, smh, sml, smc, D2,
                    BLOCK_D2: tl.constexpr):
    """Quantize rows t of X[b, h] and store codes, scale and zero at `pos` of one cache (K or V)."""
    d = tl.arange(0, BLOCK_D2)
    ok = t_ok[:, None] & (d < D2)[None, :]
    xp = X + b * sxb + h * sxh + t[:, None] * sxt
    lo = tl.load(xp + d[None, :] * sxd, mask=ok, other=0.0).to(tl.float32)
    hi = tl.load(xp + (d + D2)[None, :] * sxd, mask=ok, other=0.0).to(tl.float32)
    mn = tl.minimum(tl.min(tl.where(ok, lo, float("inf")), 1), tl.min(tl.where(ok, hi, float("inf")), 1))
    mx = tl.maximum(tl.max(tl.where(ok, lo, float("-inf")), 1), tl.max(tl.where(ok, hi, float("-inf")), 1))
    # Round scale and zero to fp16 first and quantize against the stored values (as the reference);
    # div_rn keeps the division IEEE-exact on the GPU so codes match the reference bit for bit.
    scale16 = tl.math.div_rn(mx - mn, 15.0).to(tl.float16)
    zero16 = mn.to(tl.float16)
    s = scale16.to(tl.float32)
    z = zero16.to(tl.float32)
    pos_s = s > 0
    s_safe = tl.where(pos_s, s, 1.0)[:, None]
    q_lo = tl.floor(tl.math.div_rn(lo - z[:, None], s_safe) + 0.5)
    q_hi = tl.floor(tl.math.div_rn(hi - z[:, None], s_safe) + 0.5)
    q_lo = tl.where(pos_s[:, None], tl.minimum(tl.maximum(q_lo, 0.0), 15.0), 0.0).to(tl.int32)
    q_hi = tl.where(pos_s[:, None], tl.minimum(tl.maximum(q_hi, 0.0), 15.0), 0.0).to(tl.int32)
    byte = (q_lo | (q_hi << 4)).to(tl.uint8)

    dp = DATA + b * sdb + h * sdh + pos[:, None] * sdl + d[None, :] * sdd
    tl.store(dp, byte, mask=w_ok[:, None] & (d < D2)[None, :])
    mp = META + b * smb + h * smh + pos * sml
    tl.store(mp, scale16, mask=w_ok)
    tl.store(mp + smc, zero16, mask=w_ok)


@triton.jit
def _kv4_quantize_store_kernel(
    K, KDATA, KMETA, V, VDATA, VMETA, POS,
    skb, skh, skt, skd,          # new K [B, Hkv, T, D]
    svb, svh, svt, svd,          # new V [B, Hkv, T, D]
    sdb, sdh, sdl, sdd,          # K's data [B, Hkv, L, D/2]
    smb, smh, sml, smc,          # K's meta [B, Hkv, L, 2]
    sdb2, sdh2, sdl2, sdd2,      # V's data
    smb2, smh2, sml2, smc2,      # V's meta
    Hkv, T, L, D2,
    BLOCK_T: tl.constexpr, BLOCK_D2: tl.constexpr,
):
    # K and V of a (batch, head, token block) in one program: one launch a layer instead of two,
    # which at a decode step (one token) is most of what the append costs.
    pid_bh = tl.program_id(0)
    b = pid_bh // Hkv
    h = pid_bh % Hkv
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < T
    pos = tl.load(POS + t, mask=t_ok, other=0)
    w_ok = t_ok & (pos >= 0) & (pos < L)
    _quantize_store(K, KDATA, KMETA, pos, w_ok, b, h, t, t_ok, skb, skh, skt, skd,
                    sdb, sdh, sdl, sdd, smb, smh, sml, smc, D2, BLOCK_D2)
    _quantize_store(V, VDATA, VMETA, pos, w_ok, b, h, t, t_ok, svb, svh, svt, svd,
                    sdb2, sdh2, sdl2, sdd2, smb2, smh2, sml2, smc2, D2, BLOCK_D2)


def _quantize_store_triton(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, k_meta: torch.Tensor,
                           v_cache: torch.Tensor, v_meta: torch.Tensor, pos: torch.Tensor) -> None:
    b, h, t, d = k.shape
    d2 = d // 2
    block_d2 = triton.next_power_of_2(d2)
    block_t = max(1, min(triton.next_power_of_2(t), 4096 // block_d2, 64))
    grid = (b * h, cdiv(t, block_t))
    _kv4_quantize_store_kernel[grid](
        k, k_cache, k_meta, v, v_cache, v_meta, pos,
        *k.stride(), *v.stride(), *k_cache.stride(), *k_meta.stride(), *v_cache.stride(), *v_meta.stride(),
        h, t, k_cache.shape[2], d2,
        BLOCK_T=block_t, BLOCK_D2=block_d2,
    )


@torch.library.custom_op("qoq::kv4_append", mutates_args=("k_cache", "k_meta", "v_cache", "v_meta"))
def kv4_append(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, k_meta: torch.Tensor,
    v_cache: torch.Tensor, v_meta: torch.Tensor, cache_position: torch.Tensor, kernels: str = "auto",
) -> None:
    """Quantize k, v [B, Hkv, T, D] (K after RoPE) and write them at cache_position [T] of the KV4 cache.

    Positions must lie in [0, L); the reference raises on others, the kernel skips them.
    """
    _check_cache("k", k, k_cache, k_meta)
    _check_cache("v", v, v_cache, v_meta)
    if cache_position.dim() != 1 or cache_position.shape[0] != k.shape[2] or v.shape[:3] != k.shape[:3]:
        raise ValueError(f"kv4_append: k {tuple(k.shape)}, v {tuple(v.shape)} and cache_position "
                         f"{tuple(cache_position.shape)} disagree (expected [B, Hkv, T, D] and [T])")
    if k.shape[2] == 0:
        return
    if use_triton(k, kernels):
        pos = cache_position.to(device=k.device, dtype=torch.int64).contiguous()
        _quantize_store_triton(k, v, k_cache, k_meta, v_cache, v_meta, pos)
    else:
        kv4_append_reference(k, v, k_cache, k_meta, v_cache, v_meta, cache_position)


@kv4_append.register_fake
def _kv4_append_fake(k, v, k_cache, k_meta, v_cache, v_meta, cache_position, kernels="auto") -> None:
    return None
