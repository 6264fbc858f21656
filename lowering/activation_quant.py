"""Per-token symmetric int8 activation quantization (the A8 of W4A8).

`x ≈ sx[m] · x8[m, k]` with `sx = absmax / 127`. The op also returns the per-token sum of the
int8 codes, which per-channel W4 GEMMs need to take the weight zero point out of the main loop.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from lowering.dispatch import interpreter_enabled, use_triton

# Rows whose absmax is below this get codes of zero instead of a division by zero.
ABSMAX_FLOOR = 1e-12


def quantize_act_int8_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The spec: `inv = 127 / absmax` (one IEEE division), codes = round-half-even(x · inv).

    The kernels compute the same two roundings, so codes agree bit for bit. (`127.0 / t` in torch
    is a reciprocal and a product, two roundings: hence the tensor numerator.)
    """
    x32 = x.float()
    amax = x32.abs().amax(dim=-1).clamp_min(ABSMAX_FLOOR)
    inv = torch.full_like(amax, 127.0) / amax
    x8 = torch.round(x32 * inv[..., None]).clamp_(-127, 127).to(torch.int8)
    sx = amax / 127.0
    xsum = x8.sum(dim=-1, dtype=torch.int32)
    return x8, sx, xsum


@triton.jit
def _quantize_act_int8_kernel(
    x_ptr, x8_ptr, sx_ptr, xsum_ptr,  # in: [M, K] float; out: int8 [M, K], fp32 [M], int32 [M]
    K, stride_xm, stride_qm,
    ABSMAX_FLOOR: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ON_GPU: tl.constexpr,  # libdevice on the GPU; the interpreter has no libdevice
):
    # One program per token: a first sweep finds the absmax, a second writes codes (the row
    # is re-read from L2, which is cheaper than holding a 14336-wide row in registers).
    row = tl.program_id(0)
    x_row = x_ptr + row * stride_xm
    amax = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        v = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(v))
    a = tl.maximum(tl.max(amax, axis=0), ABSMAX_FLOOR)
    if ON_GPU:
        inv = libdevice.div_rn(127.0, a)  # IEEE division, as torch's
    else:
        inv = 127.0 / a
    total = tl.zeros([BLOCK_K], dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        mask = offs < K
        v = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
        p = v * inv
        if ON_GPU:
            q = libdevice.rint(p)
        else:
            # Adding 1.5·2^23 rounds |p| < 2^22 to the nearest integer, ties to even, in fp32.
            q = (p + 12582912.0) - 12582912.0
        q = tl.minimum(tl.maximum(q, -127.0), 127.0).to(tl.int32)
        total += tl.where(mask, q, 0)
        tl.store(x8_ptr + row * stride_qm + offs, q.to(tl.int8), mask=mask)
    tl.store(sx_ptr + row, a / 127.0)
    tl.store(xsum_ptr + row, tl.sum(total, axis=0))


def quantize_act_int8_triton(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    K = x.shape[-1]
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    lead = x.shape[:-1]
    x8 = torch.empty((*lead, K), dtype=torch.int8, device=x.device)
    sx = torch.empty(lead, dtype=torch.float32, device=x.device)
    xsum = torch.empty(lead, dtype=torch.int32, device=x.device)
    if M == 0 or K == 0:
        return x8, sx, xsum
    block_k = min(triton.next_power_of_2(K), 2048)
    _quantize_act_int8_kernel[(M,)](
        x2, x8, sx, xsum, K, x2.stride(0), K,
        ABSMAX_FLOOR=ABSMAX_FLOOR, BLOCK_K=block_k, ON_GPU=x.is_cuda and not interpreter_enabled(), num_warps=4 if block_k <= 1024 else 8,
    )
    return x8, sx, xsum


@torch.library.custom_op("qoq::quantize_act_int8", mutates_args=())
def quantize_act_int8(x: torch.Tensor, kernels: str = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [..., K] float -> (x8 [..., K] int8, sx [...] fp32, xsum [...] int32)."""
    if use_triton(x, kernels):
        return quantize_act_int8_triton(x)
    return quantize_act_int8_reference(x)


@quantize_act_int8.register_fake
def _(x: torch.Tensor, kernels: str = "auto"):
    lead = x.shape[:-1]
    return (
        x.new_empty(x.shape, dtype=torch.int8),
        x.new_empty(lead, dtype=torch.float32),
        x.new_empty(lead, dtype=torch.int32),
    )
