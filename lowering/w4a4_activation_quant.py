"""`qoq::w4a4_quantize_act`: per-token int4 activation quantization (groups of 64 along K) for
SVDQuant's W4A4 GEMM, with the low-rank down-projection X̂·L_down fused so X is read once.

Format (the same as the weights' in `lowering.w4a4_gemm`): per (token, group of 64) symmetric
scale `s = absmax / 7`, codes `q = clamp(floor(x / s + 0.5), -8, 7)`, two's-complement nibbles
packed two a byte along K (low nibble = even k), K padded with zeros to a multiple of 64.
Unsigned option (inputs known to be ≥ −shift, e.g. after GELU): x + shift is quantized to uint4,
`s = max / 15`, `q = clamp(floor(v / s + 0.5), 0, 15)`; the GEMM folds shift·W into the bias.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowering.dispatch import cdiv, interpreter_enabled, use_triton

GROUP = 64          # values per quantization group along K
QMAX = 7            # symmetric int4: scale = absmax / 7, codes in [-7, 7] (clamped to [-8, 7])
UMAX = 15           # unsigned int4 (shifted activations): scale = max / 15, codes in [0, 15]
# SVDQuant's shift for activations after GELU: min GELU(x) ≈ −0.16997 (tanh form −0.17004), and
# 11/64 is exact in every float format.
GELU_SHIFT = 0.171875


# --------------------------------------------------------------------------------------------
# Reference: the specification of the numbers.
# --------------------------------------------------------------------------------------------

def quantize_groups_int4(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[R, K] float -> (int8 codes [R, Kp] in [-8, 7], fp32 scales [R, Kp/64]); Kp = K padded to 64.

    Shared by activations (rows = tokens) and weights (rows = output channels) so both sides of
    the GEMM round the same way.
    """
    rows, k = x.shape
    kp = cdiv(k, GROUP) * GROUP
    xf = torch.nn.functional.pad(x.float(), (0, kp - k)).view(rows, kp // GROUP, GROUP)
    scale = xf.abs().amax(dim=-1) / QMAX
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.floor(xf / safe[..., None] + 0.5).clamp_(-8, 7)
    return q.to(torch.int8).view(rows, kp), scale


def quantize_groups_uint4(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[R, K] float, ≥ 0 -> (uint8 codes [R, Kp] in [0, 15], fp32 scales [R, Kp/64]).

    Negative inputs (outside the promised range) are clamped to 0.
    """
    rows, k = x.shape
    kp = cdiv(k, GROUP) * GROUP
    xf = torch.nn.functional.pad(x.float(), (0, kp - k)).clamp_min(0).view(rows, kp // GROUP, GROUP)
    scale = xf.amax(dim=-1) / UMAX
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.floor(xf / safe[..., None] + 0.5).clamp_(0, UMAX)
    return q.to(torch.uint8).view(rows, kp), scale


def pack_uint4(q: torch.Tensor) -> torch.Tensor:
    """uint8 codes [R, Kp] in [0, 15] -> uint8 [R, Kp/2], low nibble = even k."""
    return (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8)


def unpack_uint4(p: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_uint4`."""
    return torch.stack((p & 0xF, p >> 4), dim=-1).reshape(p.shape[0], -1)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 codes [R, Kp] in [-8, 7] (Kp even) -> uint8 [R, Kp/2], low nibble = even k."""
    q = q.to(torch.int16)
    lo = q[:, 0::2] & 0xF
    hi = q[:, 1::2] & 0xF
    return (lo | (hi << 4)).to(torch.uint8)


def unpack_int4(p: torch.Tensor) -> torch.Tensor:
    """uint8 [R, Kp/2] -> int8 codes [R, Kp] in [-8, 7] (inverse of `pack_int4`)."""
    b = p.to(torch.int16)
    lo = ((b & 0xF) ^ 8) - 8   # sign-extend a two's-complement nibble
    hi = ((b >> 4) ^ 8) - 8
    return torch.stack((lo, hi), dim=-1).reshape(p.shape[0], -1).to(torch.int8)


def reference(x: torch.Tensor, smooth_inv: torch.Tensor | None, l_down: torch.Tensor | None,
              shift: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain-torch `w4a4_quantize_act` on [R, K]; see the op for the meaning of the arguments."""
    xs = x.float() * smooth_inv.float() if smooth_inv is not None else x.float()
    if shift is not None:
        q, scale = quantize_groups_uint4(xs + shift.float())
        packed = pack_uint4(q)
    else:
        q, scale = quantize_groups_int4(xs)
        packed = pack_int4(q)
    if l_down is not None and l_down.shape[1] > 0:
        # The branch sees the smoothed activation in the model's 16-bit dtype, as the kernel does.
        lr = (xs.to(x.dtype).float() @ l_down.to(x.dtype).float()).to(x.dtype)
    else:
        lr = x.new_empty((x.shape[0], 0 if l_down is None else l_down.shape[1]))
    return packed, scale, lr


# --------------------------------------------------------------------------------------------
# Triton kernel: one program owns BLOCK_M tokens and walks K, GROUPS groups of 64 at a time (more
# bytes in flight per step), so every byte of X is read once for the scales, the codes and the
# low-rank product.
# --------------------------------------------------------------------------------------------

@triton.jit
def _quantize_act_kernel(
    # inputs
    X, SMOOTH, LDOWN, SHIFT,
    # outputs
    QOUT, SCALE, LR,
    # sizes
    M, K, R, G,
    # strides (elements)
    stride_xm, stride_qm, stride_sm, stride_ldk, stride_lrm,
    HAS_SMOOTH: tl.constexpr, HAS_LR: tl.constexpr, LR_IEEE: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, GROUPS: tl.constexpr,
):
    BLOCK_K: tl.constexpr = GROUPS * 64
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    offs_kk = tl.arange(0, BLOCK_K)
    offs_bb = tl.arange(0, BLOCK_K // 2)
    offs_gg = tl.arange(0, GROUPS)
    offs_r = tl.arange(0, BLOCK_R)
    lr_acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, G * 64, BLOCK_K):
        offs_k = k0 + offs_kk
        mask_k = offs_k < K
        x_raw = tl.load(X + offs_m[:, None] * stride_xm + offs_k[None, :],
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        x = x_raw.to(tl.float32)
        if HAS_SMOOTH:
            sm = tl.load(SMOOTH + offs_k, mask=mask_k, other=0.0).to(tl.float32)
            x = x * sm[None, :]
        # IEEE division in both places so codes match the reference bit for bit
        # (Triton's plain `/` on fp32 is an approximate division on the GPU).
        if HAS_SHIFT:
            c = tl.load(SHIFT + offs_k, mask=mask_k, other=0.0).to(tl.float32)
            xg = tl.reshape(tl.maximum(x + c[None, :], 0.0), (BLOCK_M, GROUPS, 64))
            scale = tl.math.div_rn(tl.max(xg, axis=2), 15.0)
            safe = tl.where(scale > 0, scale, 1.0)
            q = tl.floor(tl.math.div_rn(xg, safe[:, :, None]) + 0.5)
            q = tl.minimum(q, 15.0).to(tl.int32)
        else:
            xg = tl.reshape(x, (BLOCK_M, GROUPS, 64))
            scale = tl.math.div_rn(tl.max(tl.abs(xg), axis=2), 7.0)
            safe = tl.where(scale > 0, scale, 1.0)
            q = tl.floor(tl.math.div_rn(xg, safe[:, :, None]) + 0.5)
            q = tl.minimum(tl.maximum(q, -8.0), 7.0).to(tl.int32)
        lo, hi = tl.split(tl.reshape(q, (BLOCK_M, BLOCK_K // 2, 2)))
        packed = ((lo & 0xF) | ((hi & 0xF) << 4)).to(tl.uint8)
        offs_b = k0 // 2 + offs_bb
        tl.store(QOUT + offs_m[:, None] * stride_qm + offs_b[None, :], packed,
                 mask=mask_m[:, None] & (offs_b[None, :] < G * 32))
        offs_s = k0 // 64 + offs_gg
        tl.store(SCALE + offs_m[:, None] * stride_sm + offs_s[None, :], scale,
                 mask=mask_m[:, None] & (offs_s[None, :] < G))
        if HAS_LR:
            ld = tl.load(LDOWN + offs_k[:, None] * stride_ldk + offs_r[None, :],
                         mask=mask_k[:, None] & (offs_r[None, :] < R), other=0.0)
            xs = x.to(x_raw.dtype)
            if LR_IEEE:
                lr_acc = tl.dot(xs.to(tl.float32), ld.to(tl.float32), lr_acc,
                                input_precision="ieee")
            else:
                lr_acc = tl.dot(xs, ld, lr_acc)
    if HAS_LR:
        tl.store(LR + offs_m[:, None] * stride_lrm + offs_r[None, :],
                 lr_acc.to(LR.dtype.element_ty),
                 mask=mask_m[:, None] & (offs_r[None, :] < R))


def _launch_config(m: int) -> dict:
    if interpreter_enabled():
        # Two groups a step, so shapes whose group count is odd test the masked tail.
        return {"BLOCK_M": 16, "GROUPS": 2, "num_warps": 4}
    return {"BLOCK_M": 16, "GROUPS": 4, "num_warps": 4}


def triton_quantize_act(x: torch.Tensor, smooth_inv: torch.Tensor | None,
                        l_down: torch.Tensor | None, shift: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the kernel on [R, K]; the same results as `reference` (codes bit-exact)."""
    x = x.contiguous()
    m, k = x.shape
    g = cdiv(k, GROUP)
    q = torch.empty((m, g * GROUP // 2), dtype=torch.uint8, device=x.device)
    scale = torch.empty((m, g), dtype=torch.float32, device=x.device)
    r = l_down.shape[1] if l_down is not None else 0
    lr = torch.empty((m, r), dtype=x.dtype, device=x.device)
    if m == 0:
        return q, scale, lr
    if smooth_inv is not None:
        smooth_inv = smooth_inv.to(torch.float32).contiguous()
    if shift is not None:
        shift = shift.to(torch.float32).contiguous()
    if l_down is not None and r == 0:
        l_down = None
    if l_down is not None:
        l_down = l_down.to(x.dtype).contiguous()
    cfg = _launch_config(m)
    _quantize_act_kernel[(cdiv(m, cfg["BLOCK_M"]),)](
        x, smooth_inv if smooth_inv is not None else x, l_down if l_down is not None else x,
        shift if shift is not None else x,
        q, scale, lr,
        m, k, r, g,
        x.stride(0), q.stride(0), scale.stride(0), l_down.stride(0) if l_down is not None else 0,
        lr.stride(0) if r else 0,
        HAS_SMOOTH=smooth_inv is not None, HAS_LR=l_down is not None,
        HAS_SHIFT=shift is not None,
        # fp32 inputs must not go through tf32; and the interpreter's bf16 tl.dot is wrong (triton
        # 3.9), so there the 16-bit operands are widened first (products of 16-bit values are
        # exact in fp32, so nothing changes but speed).
        LR_IEEE=x.dtype == torch.float32 or interpreter_enabled(),
        BLOCK_R=max(16, triton.next_power_of_2(max(r, 1))), **cfg,
    )
    return q, scale, lr


# --------------------------------------------------------------------------------------------
# The op.
# --------------------------------------------------------------------------------------------

def _check(x: torch.Tensor, smooth_inv: torch.Tensor | None, l_down: torch.Tensor | None,
           shift: torch.Tensor | None = None) -> None:
    k = x.shape[-1]
    if shift is not None and shift.shape != (k,):
        raise ValueError(f"w4a4_quantize_act: shift has shape {tuple(shift.shape)}, expected "
                         f"({k},) to match x's last dimension")
    if not x.is_floating_point():
        raise TypeError(f"w4a4_quantize_act: x must be a float tensor, got {x.dtype}")
    if smooth_inv is not None and smooth_inv.shape != (k,):
        raise ValueError(f"w4a4_quantize_act: smooth_inv has shape {tuple(smooth_inv.shape)}, "
                         f"expected ({k},) to match x's last dimension")
    if l_down is not None and (l_down.dim() != 2 or l_down.shape[0] != k):
        raise ValueError(f"w4a4_quantize_act: l_down has shape {tuple(l_down.shape)}, expected "
                         f"({k}, rank) to match x's last dimension")


@torch.library.custom_op("qoq::w4a4_quantize_act", mutates_args=())
def w4a4_quantize_act(x: torch.Tensor, smooth_inv: torch.Tensor | None = None,
                      l_down: torch.Tensor | None = None, shift: torch.Tensor | None = None,
                      kernels: str = "auto"
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize activations x [..., K] to W4A4's int4 format and run the low-rank down-projection.

    smooth_inv: optional [K] factor x is multiplied by first (SVDQuant smoothing that no producer
    could absorb). l_down: optional [K, r] down-projection of the low-rank branch, applied to the
    smoothed x. shift: optional [K] offset ≥ 0 for inputs known to be ≥ −shift (after GELU): the
    codes are then unsigned, of x·smooth_inv + shift, and `qoq::w4a4_gemm` must be told
    (a_unsigned=True) and given a bias with shift·W taken out.
    Returns (codes uint8 [..., Kp/2], scales fp32 [..., Kp/64], X̂·L_down [..., r] in x's dtype;
    [..., 0] when l_down is None), Kp = K rounded up to a multiple of 64.
    """
    _check(x, smooth_inv, l_down, shift)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    fn = triton_quantize_act if use_triton(x, kernels) else reference
    q, scale, lr = fn(x2, smooth_inv, l_down, shift)
    return (q.view(*lead, q.shape[-1]), scale.view(*lead, scale.shape[-1]),
            lr.view(*lead, lr.shape[-1]))


@w4a4_quantize_act.register_fake
def _(x, smooth_inv=None, l_down=None, shift=None, kernels="auto"):
    _check(x, smooth_inv, l_down, shift)
    lead = x.shape[:-1]
    g = cdiv(x.shape[-1], GROUP)
    r = l_down.shape[1] if l_down is not None else 0
    return (x.new_empty((*lead, g * GROUP // 2), dtype=torch.uint8),
            x.new_empty((*lead, g), dtype=torch.float32),
            x.new_empty((*lead, r)))
