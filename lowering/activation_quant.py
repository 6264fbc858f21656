"""Per-token symmetric int8 activation quantization (the A8 of W4A8).

`x ≈ sx[m] · x8[m, k]` with `sx = absmax / 127`. The op also returns the per-token sum of the
int8 codes, which per-channel W4 GEMMs need to take the weight zero point out of the main loop.
Under Inductor the op is decomposed into plain torch ops (`quantize_act_int8_fusible`), so it fuses
into the kernel of its producer (the RMSNorm before a linear) instead of re-reading X.
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


def quantize_act_int8_fusible(x: torch.Tensor, kernels: str = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The op as plain torch ops Inductor can fuse into the producer of `x`; bit-identical to the reference.

    Our Triton kernel reads X twice more (absmax, then codes) after the norm has written it: at
    decode that is a separate ~2.4 µs launch per quantized input. Written as a row reduction, a
    pointwise map and another row reduction over the same rows, Inductor generates them inside the
    norm's own reduction kernel (as it does softmax's max / exp / sum), so X is quantized while in
    registers. The one division is done in float64 and rounded to float32: double rounding is
    innocuous for a quotient when 53 >= 2·24 + 2 bits, so it equals IEEE float32 division on every
    backend (Inductor lowers a float32 `/` to an approximate division on some versions).
    """
    del kernels  # every mode computes the same codes; the graph keeps the argument for the eager op
    x32 = x.float()
    amax = x32.abs().amax(dim=-1).clamp_min(ABSMAX_FLOOR)
    inv = (127.0 / amax.double()).float()
    x8 = torch.round(x32 * inv[..., None]).clamp(-127, 127).to(torch.int8)
    return x8, amax / 127.0, x8.sum(dim=-1, dtype=torch.int32)


def _register_inductor_decomposition() -> None:
    """Make Inductor trace `qoq::quantize_act_int8` as `quantize_act_int8_fusible` (nothing else sees it).

    The FX graph keeps the op (artifacts, reports and `inductor=False` runs find it by name; eager
    runs our kernel); only Inductor's AOT trace, which consults this table, decomposes it.
    """
    try:
        from torch._inductor import decomposition as inductor_decomp
    except ImportError:  # pragma: no cover - torch without Inductor: the op runs as our kernel
        return
    op = torch.ops.qoq.quantize_act_int8.default
    if op in inductor_decomp.decompositions:
        return
    inductor_decomp.decompositions[op] = quantize_act_int8_fusible
    # The table Inductor uses is a cached merge of this dict: a compile before our import cached
    # it without the entry.
    cached = getattr(inductor_decomp, "fast_random_decomps", None)
    if cached is not None and hasattr(cached, "cache_clear"):
        cached.cache_clear()


_register_inductor_decomposition()
