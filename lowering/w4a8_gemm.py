"""The W4A8 GEMM: int8 per-token activations times packed 4-bit weights, int8 MMA, int32 accumulation.

Two weight formats (DESIGN.md): QoQ progressive (per-channel int8 scale `s1`, then per-group uint4
with integer scale `s2` and zero, dequantized to int8 in registers as `q·s2 − z·s2` byte-wise) and
per-channel uint4 (`s·(q − z)`, the zero applied in the epilogue through the token's code sum).
Layout: `qweight[n, k // 2]` holds k even in the low nibble and k odd in the high one, K padded to
a multiple of 128, so a tile row is one contiguous run of bytes and unpacking needs no shuffles.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from lowering.dispatch import cdiv, interpreter_enabled, use_triton

K_PAD = 128  # packed K is a multiple of this: every K tile is whole and lies inside one group


def pack_nibbles(q: torch.Tensor, multiple: int = K_PAD) -> torch.Tensor:
    """q [N, K] with values in [0, 15] -> [N, Kp/2] uint8 (k even in the low nibble), Kp = K padded to `multiple`."""
    N, K = q.shape
    Kp = cdiv(K, multiple) * multiple
    qp = torch.zeros((N, Kp), dtype=torch.uint8, device=q.device)
    qp[:, :K] = q.to(torch.uint8)
    return qp[:, 0::2] | (qp[:, 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor, K: int) -> torch.Tensor:
    """Inverse of pack_nibbles: [N, Kp/2] uint8 -> [N, K] uint8 in [0, 15]."""
    lo = packed & 0x0F
    hi = packed >> 4
    return torch.stack((lo, hi), dim=-1).reshape(packed.shape[0], -1)[:, :K]


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
) -> torch.Tensor:
    """The spec: exact integer accumulation (float64 holds every int8·int8 sum of K < 2^38 terms exactly)."""
    K = x8.shape[-1]
    w = dequantize_int8_weight(qweight, gscale, gzero, K)
    acc = x8.double() @ w.double().t()
    if gscale is None:
        acc = acc - xsum.double()[..., None] * gzero.double()
    y = acc.float() * sx[..., None] * wscale
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


# Splits four packed bytes into their low and high nibbles and applies the group's integer scale
# and zero on whole 32-bit words: one instruction handles four weights. The four bytes a thread
# packs are consecutive along K in one row (16-byte vector loads), so s2 and z·s2 are the same in
# all four lanes; the byte-wise subtraction keeps borrows inside each byte (SWAR).
_UNPACK_PROGRESSIVE_ASM = tl.constexpr("""
{
.reg .b32 s, lo, hi, z, t0, t1;
and.b32 s, $3, 0xFF;
and.b32 lo, $2, 0x0F0F0F0F;
shr.u32 hi, $2, 4;
and.b32 hi, hi, 0x0F0F0F0F;
mul.lo.u32 lo, lo, s;
mul.lo.u32 hi, hi, s;
and.b32 z, $4, 0x7F7F7F7F;
or.b32 t0, lo, 0x80808080;
sub.u32 t0, t0, z;
xor.b32 t1, lo, $4;
not.b32 t1, t1;
and.b32 t1, t1, 0x80808080;
xor.b32 $0, t0, t1;
or.b32 t0, hi, 0x80808080;
sub.u32 t0, t0, z;
xor.b32 t1, hi, $4;
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
def _unpack_tile(b, s2, zs, PROGRESSIVE: tl.constexpr, USE_ASM: tl.constexpr):
    """uint8 [BN, BKH] packed bytes -> (lo, hi) int8 [BN, BKH] weight values for k = 2j and 2j + 1."""
    if USE_ASM:
        if PROGRESSIVE:
            s2b = tl.broadcast_to(s2[:, None], b.shape)
            zsb = tl.broadcast_to(zs[:, None], b.shape)
            lo, hi = tl.inline_asm_elementwise(
                _UNPACK_PROGRESSIVE_ASM, "=r,=r,r,r,r", [b, s2b, zsb],
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
            lo = lo * s2[:, None] - zs[:, None]
            hi = hi * s2[:, None] - zs[:, None]
        lo = lo.to(tl.int8, bitcast=True)
        hi = hi.to(tl.int8, bitcast=True)
    return lo, hi


@triton.jit
def _w4a8_gemm_kernel(
    # A8 activations: codes [M, K] int8, scale [M] fp32, code sum [M] int32
    x_ptr, sx_ptr, xsum_ptr,
    # W4 weights: packed [N, Kp/2] uint8, per-channel scale [N] fp32,
    # group scale s2 [N, G] uint8 and z·s2 [N, G] uint8 (progressive) or zero [N] int32 (per-channel)
    w_ptr, ws_ptr, gs_ptr, gz_ptr,
    b_ptr, y_ptr,  # bias [N] (optional), output [M, N]
    M, N, K, Kp,
    stride_xm, stride_wn, stride_gn, stride_ym,
    GROUP_SIZE: tl.constexpr, PROGRESSIVE: tl.constexpr, HAS_BIAS: tl.constexpr, USE_ASM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
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
    offs_kh = tl.arange(0, BLOCK_K // 2)
    offs_k = tl.arange(0, BLOCK_K)

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    k_tiles = Kp // BLOCK_K
    tiles_per_split = tl.cdiv(k_tiles, SPLIT_K)
    t_begin = pid_k * tiles_per_split
    t_end = min(t_begin + tiles_per_split, k_tiles)
    s2 = tl.zeros([BLOCK_N], dtype=tl.uint8)
    zs = tl.zeros([BLOCK_N], dtype=tl.uint8)
    for t in range(t_begin, t_end):
        k0 = t * BLOCK_K
        kk = k0 + offs_k
        a = tl.load(x_ptr + offs_m[:, None] * stride_xm + kk[None, :],
                    mask=mask_m[:, None] & (kk[None, :] < K), other=0)
        b = tl.load(w_ptr + offs_n[:, None] * stride_wn + (k0 // 2 + offs_kh)[None, :],
                    mask=mask_n[:, None], other=0)
        if PROGRESSIVE:
            g = k0 // GROUP_SIZE
            s2 = tl.load(gs_ptr + offs_n * stride_gn + g, mask=mask_n, other=0)
            zs = tl.load(gz_ptr + offs_n * stride_gn + g, mask=mask_n, other=0)
        lo, hi = _unpack_tile(b, s2, zs, PROGRESSIVE, USE_ASM)
        w = tl.join(lo, hi).reshape(BLOCK_N, BLOCK_K)  # join adds the minor axis: k = 2j + {0, 1}
        acc += tl.dot(a, tl.trans(w), out_dtype=tl.int32)

    if not PROGRESSIVE:
        # Σ x8·(q − z) = Σ x8·q − z·Σ x8; only the first K split subtracts it.
        if pid_k == 0:
            xs = tl.load(xsum_ptr + offs_m, mask=mask_m, other=0)
            z = tl.load(gz_ptr + offs_n, mask=mask_n, other=0)
            acc -= xs[:, None] * z[None, :]
    sx = tl.load(sx_ptr + offs_m, mask=mask_m, other=0.0)
    ws = tl.load(ws_ptr + offs_n, mask=mask_n, other=0.0)
    y = acc.to(tl.float32) * sx[:, None] * ws[None, :]
    if HAS_BIAS:
        if pid_k == 0:
            y += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K == 1:
        tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(y_ptrs, y, mask=mask, sem="relaxed")


def _pick_config(M: int, N: int, K: int, device: torch.device) -> dict:
    """Tile shapes by M bucket. Small M is memory-bound: split K so enough programs stream weights."""
    if device.type != "cuda":
        # Interpreter: few large programs run fastest (numpy does the work per program).
        return dict(BLOCK_M=max(16, min(64, triton.next_power_of_2(M))), BLOCK_N=64, BLOCK_K=128,
                    GROUP_M=8, SPLIT_K=1, num_warps=4, num_stages=1)
    sms = _sm_count(device.index or 0)
    if M <= 16:
        cfg = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=4)
    elif M <= 64:
        cfg = dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=128, GROUP_M=4, num_warps=4, num_stages=4)
    elif M <= 256:
        cfg = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=4)
    else:
        cfg = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3)
    tiles = cdiv(M, cfg["BLOCK_M"]) * cdiv(N, cfg["BLOCK_N"])
    k_tiles = cdiv(K, cfg["BLOCK_K"])
    split = 1
    while tiles * split < sms and split * 2 <= k_tiles and split < 16:
        split *= 2
    cfg["SPLIT_K"] = split
    return cfg


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def w4a8_gemm_triton(
    x8: torch.Tensor, sx: torch.Tensor, xsum: torch.Tensor, qweight: torch.Tensor, wscale: torch.Tensor,
    gscale: Optional[torch.Tensor], gzero: torch.Tensor, bias: Optional[torch.Tensor], out_dtype: torch.dtype,
    config: Optional[dict] = None, use_asm: Optional[bool] = None,
) -> torch.Tensor:
    lead = x8.shape[:-1]
    K = x8.shape[-1]
    x8 = x8.reshape(-1, K)
    sx = sx.reshape(-1)
    xsum = xsum.reshape(-1)
    M = x8.shape[0]
    N, Kh = qweight.shape
    Kp = Kh * 2
    progressive = gscale is not None
    group_size = Kp // gscale.shape[1] if progressive else K_PAD
    cfg = dict(config or _pick_config(M, N, K, x8.device))
    if progressive:
        cfg["BLOCK_K"] = min(cfg["BLOCK_K"], group_size)
    if use_asm is None:
        use_asm = x8.is_cuda and not interpreter_enabled()
    split = cfg.pop("SPLIT_K")
    if split > 1:
        y = torch.zeros((M, N), dtype=torch.float32, device=x8.device)
    else:
        y = torch.empty((M, N), dtype=out_dtype, device=x8.device)
    if M == 0:
        return y.to(out_dtype).reshape(*lead, N)
    x8 = x8.contiguous()
    grid = (cdiv(M, cfg["BLOCK_M"]) * cdiv(N, cfg["BLOCK_N"]), split)
    _w4a8_gemm_kernel[grid](
        x8, sx, xsum, qweight, wscale,
        gscale if progressive else gzero, gzero,
        bias if bias is not None else wscale, y,
        M, N, K, Kp,
        x8.stride(0), qweight.stride(0), gscale.stride(0) if progressive else 0, y.stride(0),
        GROUP_SIZE=group_size, PROGRESSIVE=progressive, HAS_BIAS=bias is not None, USE_ASM=use_asm,
        SPLIT_K=split, **cfg,
    )
    return (y.to(out_dtype) if split > 1 else y).reshape(*lead, N)


@torch.library.custom_op("qoq::w4a8_gemm", mutates_args=())
def w4a8_gemm(
    x8: torch.Tensor, sx: torch.Tensor, xsum: torch.Tensor, qweight: torch.Tensor, wscale: torch.Tensor,
    gscale: Optional[torch.Tensor], gzero: torch.Tensor, bias: Optional[torch.Tensor],
    out_dtype: torch.dtype, kernels: str = "auto",
) -> torch.Tensor:
    """y [..., N] = dequant(x8 [..., K]) @ dequant(W)^T + bias; `gscale` given -> progressive, else per-channel."""
    if use_triton(x8, kernels):
        return w4a8_gemm_triton(x8, sx, xsum, qweight, wscale, gscale, gzero, bias, out_dtype)
    return w4a8_gemm_reference(x8, sx, xsum, qweight, wscale, gscale, gzero, bias, out_dtype)


@w4a8_gemm.register_fake
def _(x8, sx, xsum, qweight, wscale, gscale, gzero, bias, out_dtype, kernels="auto"):
    return x8.new_empty((*x8.shape[:-1], qweight.shape[0]), dtype=out_dtype)
