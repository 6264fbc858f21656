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

An optional rotation H [D, D] (passes/rotate_kv's orthogonal head_dim rotation) is applied to the new rows
inside the kernel before they are quantized, so the rotation costs no launch of its own.
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


# Precision of the dots that apply the KV rotation in the kernels (tl.dot input_precision). "ieee":
# fp32 FMAs, the float32 reference's rows within rounding. On an H200 "tf32x3" (three tf32 MMAs) made
# the rotated decode attention 1.3-2x faster but still slower than two torch matmuls around the
# unrotated kernel, which is what passes/kv_cache does by default (ABSORB_ROTATION). Read at call time
# (benchmarks/bench_kv_rotation.py compares the values).
ROTATION_DOT = "ieee"


def rotate_head_dim(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """x [..., D] @ rotation [D, D] in float32, back in x's dtype: the same product as
    passes/rotate_kv.rotate_rows, which the kernels reproduce (the spec of a rotated append/attention)."""
    return (x.float() @ rotation).to(x.dtype)


def check_rotation(op: str, rotation: torch.Tensor | None, head_dim: int, device: torch.device) -> None:
    """A KV rotation must be a float32 [D, D] on the data's device (the kernels read it as fp32 rows)."""
    if rotation is None:
        return
    if rotation.dtype != torch.float32 or tuple(rotation.shape) != (head_dim, head_dim):
        raise ValueError(f"{op}: rotation must be a float32 [{head_dim}, {head_dim}] (head_dim x head_dim) matrix, "
                         f"got {rotation.dtype} {tuple(rotation.shape)}; pass passes.rotate_kv.kv_rotation(head_dim)")
    if rotation.device != device:
        raise ValueError(f"{op}: rotation is on {rotation.device} and the data on {device}; move it with .to()")


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
    rotation: torch.Tensor | None = None,
) -> None:
    pos = cache_position.to(device=k_cache.device, dtype=torch.long)
    for x, data, meta in ((k, k_cache, k_meta), (v, v_cache, v_meta)):
        qd, qm = kv4_quantize(x if rotation is None else rotate_head_dim(x, rotation))
        data.index_copy_(2, pos, qd)
        meta.index_copy_(2, pos, qm)


@triton.jit
def round_to_dtype(x, DTYPE: tl.constexpr):
    """fp32 x rounded to DTYPE (to nearest, ties to even) and returned as fp32, as torch's `.to(dtype)`
    rounds. bf16 by integer arithmetic on the bits: the interpreter's fp32 -> bf16 cast truncates, and
    the codes of a rotated row must be the reference's on the CPU as on the GPU."""
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    elif DTYPE == tl.float32:
        return x
    else:
        return x.to(DTYPE).to(tl.float32)


@triton.jit
def _rotated_halves(xp, sxd, ROT, t_ok, d, D2, BLOCK_T: tl.constexpr, BLOCK_D2: tl.constexpr,
                    BLOCK_R: tl.constexpr, ROT_DOT: tl.constexpr):
    """Rows x [BLOCK_T, D] (at xp + dim·sxd) times the rotation [D, D] (contiguous fp32), as the two
    halves the bytes pack: columns d and D2 + d. From 16 rows a tl.dot of precision ROT_DOT
    (ROTATION_DOT above), fewer rows an explicit fp32 sum."""
    lo = tl.zeros([BLOCK_T, BLOCK_D2], tl.float32)
    hi = tl.zeros([BLOCK_T, BLOCK_D2], tl.float32)
    d_ok = d < D2
    for r0 in range(0, 2 * D2, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        r_ok = r < 2 * D2
        x = tl.load(xp + r[None, :] * sxd, mask=t_ok[:, None] & r_ok[None, :], other=0.0).to(tl.float32)
        hp = ROT + r[:, None] * (2 * D2) + d[None, :]
        h_ok = r_ok[:, None] & d_ok[None, :]
        h_lo = tl.load(hp, mask=h_ok, other=0.0)
        h_hi = tl.load(hp + D2, mask=h_ok, other=0.0)
        if BLOCK_T >= 16:  # tl.dot needs 16 rows; decode's few rows take the explicit sum
            lo = tl.dot(x, h_lo, lo, input_precision=ROT_DOT)
            hi = tl.dot(x, h_hi, hi, input_precision=ROT_DOT)
        else:
            lo += tl.sum(x[:, :, None] * h_lo[None, :, :], 1)
            hi += tl.sum(x[:, :, None] * h_hi[None, :, :], 1)
    return lo, hi


@triton.jit
def _kv4_quantize_store_kernel(
    X, DATA, META, POS, ROT,
    sxb, sxh, sxt, sxd,          # new K or V [B, Hkv, T, D]
    sdb, sdh, sdl, sdd,          # data [B, Hkv, L, D/2]
    smb, smh, sml, smc,          # meta [B, Hkv, L, 2]
    Hkv, T, L, D2,
    BLOCK_T: tl.constexpr, BLOCK_D2: tl.constexpr,
    ROTATE: tl.constexpr, BLOCK_R: tl.constexpr,  # ROT: the [D, D] fp32 rotation applied first (or unused)
    ROT_DOT: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    b = pid_bh // Hkv
    h = pid_bh % Hkv
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.arange(0, BLOCK_D2)
    t_ok = t < T
    ok = t_ok[:, None] & (d < D2)[None, :]

    xp = X + b * sxb + h * sxh + t[:, None] * sxt
    if ROTATE:
        lo, hi = _rotated_halves(xp, sxd, ROT, t_ok, d, D2, BLOCK_T, BLOCK_D2, BLOCK_R, ROT_DOT)
        # back to x's dtype before quantizing, as the reference's rotated rows are
        lo = round_to_dtype(lo, X.dtype.element_ty)
        hi = round_to_dtype(hi, X.dtype.element_ty)
    else:
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

    pos = tl.load(POS + t, mask=t_ok, other=0)
    w_ok = t_ok & (pos >= 0) & (pos < L)
    dp = DATA + b * sdb + h * sdh + pos[:, None] * sdl + d[None, :] * sdd
    tl.store(dp, byte, mask=w_ok[:, None] & (d < D2)[None, :])
    mp = META + b * smb + h * smh + pos * sml
    tl.store(mp, scale16, mask=w_ok)
    tl.store(mp + smc, zero16, mask=w_ok)


def _quantize_store_triton(x: torch.Tensor, data: torch.Tensor, meta: torch.Tensor, pos: torch.Tensor,
                           rotation: torch.Tensor | None = None) -> None:
    b, h, t, d = x.shape
    d2 = d // 2
    if rotation is None:
        block_d2 = triton.next_power_of_2(d2)
        block_t = max(1, min(triton.next_power_of_2(t), 4096 // block_d2, 64))
    else:
        # the rotation's dot wants >= 16 columns; rows: up to 16 a program (the product's tiles stay in
        # registers), below 16 (decode) the kernel sums explicitly instead of calling tl.dot
        block_d2 = max(16, triton.next_power_of_2(d2))
        block_t = min(triton.next_power_of_2(t), 16)
        rotation = rotation.contiguous()
    grid = (b * h, cdiv(t, block_t))
    _kv4_quantize_store_kernel[grid](
        x, data, meta, pos, x if rotation is None else rotation,
        *x.stride(), *data.stride(), *meta.stride(),
        h, t, data.shape[2], d2,
        BLOCK_T=block_t, BLOCK_D2=block_d2, ROTATE=rotation is not None, BLOCK_R=16, ROT_DOT=ROTATION_DOT,
    )


@torch.library.custom_op("qoq::kv4_append", mutates_args=("k_cache", "k_meta", "v_cache", "v_meta"))
def kv4_append(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, k_meta: torch.Tensor,
    v_cache: torch.Tensor, v_meta: torch.Tensor, cache_position: torch.Tensor, kernels: str = "auto",
    rotation: torch.Tensor | None = None,
) -> None:
    """Quantize k, v [B, Hkv, T, D] (K after RoPE) and write them at cache_position [T] of the KV4 cache.
    With `rotation` H (float32 [D, D]), k·H and v·H are what is quantized (see rotate_head_dim).

    Positions must lie in [0, L); the reference raises on others, the kernel skips them.
    """
    _check_cache("k", k, k_cache, k_meta)
    _check_cache("v", v, v_cache, v_meta)
    check_rotation("kv4_append", rotation, k.shape[-1], k.device)
    if cache_position.dim() != 1 or cache_position.shape[0] != k.shape[2] or v.shape[:3] != k.shape[:3]:
        raise ValueError(f"kv4_append: k {tuple(k.shape)}, v {tuple(v.shape)} and cache_position "
                         f"{tuple(cache_position.shape)} disagree (expected [B, Hkv, T, D] and [T])")
    if k.shape[2] == 0:
        return
    if use_triton(k, kernels):
        pos = cache_position.to(device=k.device, dtype=torch.int64).contiguous()
        _quantize_store_triton(k, k_cache, k_meta, pos, rotation)
        _quantize_store_triton(v, v_cache, v_meta, pos, rotation)
    else:
        kv4_append_reference(k, v, k_cache, k_meta, v_cache, v_meta, cache_position, rotation)


@kv4_append.register_fake
def _kv4_append_fake(k, v, k_cache, k_meta, v_cache, v_meta, cache_position, kernels="auto", rotation=None) -> None:
    return None
