"""`qoq::w4a4_gemm`: SVDQuant's W4A4 GEMM, int4 weights and activations in groups of 64 along K,
with the 16-bit low-rank branch `(X̂·L_down)·L_up` and the bias added in the same epilogue.

Also the offline weight layout (`quantize_weight`): the same symmetric int4 g64 format as the
activations of `lowering.w4a4_activation_quant`, packed [N, Kp/2] uint8, scales [N, Kp/64].
"""
from __future__ import annotations

import functools
import json
import os

import torch
import triton
import triton.language as tl

from lowering.dispatch import cdiv, interpreter_enabled, use_triton
from lowering.w4a8_gemm import tuned_config_file
from lowering.w4a4_activation_quant import (
    GROUP, pack_int4, quantize_groups_int4, unpack_int4, unpack_uint4,
)


# --------------------------------------------------------------------------------------------
# Offline weight layout.
# --------------------------------------------------------------------------------------------

def quantize_weight(w: torch.Tensor, scale_dtype: torch.dtype = torch.float16
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """W [N, K] -> (packed uint8 [N, Kp/2], scales [N, Kp/64] in scale_dtype).

    Codes are rounded against the scale as stored (in scale_dtype), so dequantization with the
    stored scale is what the rounding minimized.
    """
    _, scale = quantize_groups_int4(w)
    scale = scale.to(scale_dtype)
    s = scale.float()
    kp = s.shape[1] * GROUP
    wf = torch.nn.functional.pad(w.float(), (0, kp - w.shape[1])).view(w.shape[0], -1, GROUP)
    safe = torch.where(s > 0, s, torch.ones_like(s))
    q = torch.floor(wf / safe[..., None] + 0.5).clamp_(-8, 7).to(torch.int8)
    return pack_int4(q.view(w.shape[0], kp)), scale


def dequantize(packed: torch.Tensor, scale: torch.Tensor, k: int | None = None) -> torch.Tensor:
    """Packed codes [R, Kp/2] + scales [R, Kp/64] -> fp32 [R, k] (k defaults to Kp)."""
    q = unpack_int4(packed).float().view(packed.shape[0], -1, GROUP)
    out = (q * scale.float()[..., None]).view(packed.shape[0], -1)
    return out if k is None else out[:, :k]


# --------------------------------------------------------------------------------------------
# Reference: the specification of the numbers.
# --------------------------------------------------------------------------------------------

def reference(a: torch.Tensor, a_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
              lr_act: torch.Tensor | None, l_up: torch.Tensor | None, bias: torch.Tensor | None,
              out_dtype: torch.dtype, a_unsigned: bool = False) -> torch.Tensor:
    """y[m,n] = Σ_g sa[m,g]·sw[n,g]·Σ_{k∈g} qa[m,k]·qw[n,k]  + (X̂·L_down)[m]·L_up[:,n] + bias[n]."""
    m, n, g = a.shape[0], w.shape[0], a_scale.shape[1]
    qa = (unpack_uint4(a) if a_unsigned else unpack_int4(a)).view(m, g, GROUP).to(torch.float64)
    qw = unpack_int4(w).view(n, g, GROUP).to(torch.float64)
    sa, sw = a_scale.float(), w_scale.float()
    y = torch.zeros((m, n), dtype=torch.float32, device=a.device)
    for j in range(g):   # one group at a time keeps memory at [M, N]; float64 sums of ints are exact
        part = (qa[:, j] @ qw[:, j].T).float()
        y += part * sa[:, j, None] * sw[None, :, j]
    if lr_act is not None and l_up is not None:
        y += lr_act.float() @ l_up.to(lr_act.dtype).float()
    if bias is not None:
        y += bias.float()
    return y.to(out_dtype)


# --------------------------------------------------------------------------------------------
# Triton kernel.
#
# Both operands arrive as bytes of two nibbles. Unpacking puts each nibble into the *high* half
# of an int8 lane, i.e. the int8 value is 16·q: the high nibble needs one AND (b & 0xF0), the low
# one a shift and an AND, with no sign-extension step. The int32 dot then holds 256·Σ qa·qw,
# exact (|256·64·64| < 2^24, so the fp32 conversion is exact too), and the 1/256 is one multiply
# in the epilogue. On the GPU the same three instructions run on four bytes at a time in inline
# PTX (UNPACK_ASM); the pure-Triton path gives the same bits and is what the interpreter runs.
# Unsigned activations (0..15, after GELU) cannot be 16·q in an int8 lane: they are unpacked
# plainly, and the epilogue factor is 1/16 (only the weights carry the 16).
#
# K_PERM: a dot's sum does not depend on the order of k, only on both operands using the same
# one. Restoring the natural order (even k from low nibbles, odd k from high) costs byte shuffles
# (PRMT) and 2-byte shared-memory reads of the packed A tile; with K_PERM each 16-byte chunk of a
# row becomes [its 16 low nibbles, its 16 high nibbles], so the nibbles of one packed word land
# in one int8x4 register of the MMA's operand layout and no shuffle is left (sm_90 SASS of the
# 64x128 tile: 52 PRMT and 25 LDS a group -> 0 PRMT and 17 LDS). Integer sums are unchanged.
# --------------------------------------------------------------------------------------------

@triton.jit
def _mma_order(lo, hi, ROWS: tl.constexpr, K_PERM: tl.constexpr):
    """Low- and high-nibble lanes [ROWS, 32] -> [ROWS, 64] in the k-order the dot sees."""
    if K_PERM:
        x = tl.join(tl.reshape(lo, (ROWS, 2, 16)), tl.reshape(hi, (ROWS, 2, 16)))
        return tl.reshape(tl.permute(x, (0, 1, 3, 2)), (ROWS, 64))
    return tl.reshape(tl.join(lo, hi), (ROWS, 64))


@triton.jit
def _unpack_plain(b, ROWS: tl.constexpr, UNPACK_ASM: tl.constexpr, K_PERM: tl.constexpr):
    """uint8 [ROWS, 32] -> int8 [ROWS, 64] holding unsigned nibbles q in [0, 15]."""
    if UNPACK_ASM:
        lo, hi = tl.inline_asm_elementwise(
            asm="""{
            and.b32 $0, $2, 0x0F0F0F0F;
            shr.b32 $1, $2, 4;
            and.b32 $1, $1, 0x0F0F0F0F;
            }""",
            constraints="=r,=r,r", args=[b], dtype=(tl.int8, tl.int8), is_pure=True, pack=4)
    else:
        lo = (b & 0x0F).to(tl.uint8).to(tl.int8, bitcast=True)
        hi = (b >> 4).to(tl.uint8).to(tl.int8, bitcast=True)
    return _mma_order(lo, hi, ROWS, K_PERM)


@triton.jit
def _unpack_x16(b, ROWS: tl.constexpr, UNPACK_ASM: tl.constexpr, K_PERM: tl.constexpr):
    """uint8 [ROWS, 32] -> int8 [ROWS, 64] holding 16·q, in `_mma_order`'s k-order."""
    if UNPACK_ASM:
        lo, hi = tl.inline_asm_elementwise(
            asm="""{
            shl.b32 $0, $2, 4;
            and.b32 $0, $0, 0xF0F0F0F0;
            and.b32 $1, $2, 0xF0F0F0F0;
            }""",
            constraints="=r,=r,r", args=[b], dtype=(tl.int8, tl.int8), is_pure=True, pack=4)
    else:
        lo = (b << 4).to(tl.uint8).to(tl.int8, bitcast=True)
        hi = (b & 0xF0).to(tl.uint8).to(tl.int8, bitcast=True)
    return _mma_order(lo, hi, ROWS, K_PERM)


@triton.jit
def _group_dot(a_ptr, w_ptr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               UNPACK_ASM: tl.constexpr, A_UNSIGNED: tl.constexpr, K_PERM: tl.constexpr):
    """int32 [BLOCK_M, BLOCK_N]: one 64-group's Σ qa·qw (times 256, or 16 for unsigned a)."""
    if A_UNSIGNED:
        a8 = _unpack_plain(tl.load(a_ptr), BLOCK_M, UNPACK_ASM, K_PERM)
    else:
        a8 = _unpack_x16(tl.load(a_ptr), BLOCK_M, UNPACK_ASM, K_PERM)
    w8 = _unpack_x16(tl.load(w_ptr), BLOCK_N, UNPACK_ASM, K_PERM)
    return tl.dot(a8, tl.trans(w8), out_dtype=tl.int32)


@triton.jit
def _scale_add(acc, part, sa, sw, MAGIC_I2F: tl.constexpr, SW_ASM: tl.constexpr):
    """acc + float(part)·sa[m]·sw[n] for one group (sa fp32 [BLOCK_M], sw as stored [BLOCK_N])."""
    if SW_ASM and sw.dtype == tl.float16:
        # The same conversion, opaque to Triton's layout pass: with `.to(tl.float32)` Triton 3.6
        # moves the fp16 -> fp32 conversion after the scales' layout change (fewer bytes through
        # shared memory), so every thread converts each of its 32 columns (32 HADD2 a group at
        # 64x128); here each scale is converted once, before (sm_90 SASS: 354 -> 326 a group;
        # H100 time unchanged, as the loop is latency- not issue-bound, and it moves twice the
        # bytes through shared memory: a wash kept for the shorter loop).
        sw = tl.inline_asm_elementwise("cvt.f32.f16 $0, $1;", "=r,h", [sw], dtype=tl.float32,
                                       is_pure=True, pack=1)
    else:
        sw = sw.to(tl.float32)
    if MAGIC_I2F:
        # int32 -> fp32 by integer arithmetic: |part| < 2^22, so part + bits(1.5·2^23) is the
        # float 1.5·2^23 + part, exact, and one subtraction leaves float(part); same bits as the
        # conversion. Off by default: on sm_90 the conversion is one I2FP instruction, while this
        # costs two (ptxas folds the add into the MMA's accumulator start, a MOV per element, plus
        # the FADD), and the H100 run timed the conversion 3-4% faster.
        f = (part + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0
    else:
        f = part.to(tl.float32)
    return acc + f * (sa[:, None] * sw[None, :])


@triton.jit
def _w4a4_gemm_kernel(
    # packed operands and their per-group scales
    A, SA, W, SW,
    # epilogue: low-rank branch (LR = X̂·L_down [M, R], LUP = L_up [R, N]) and bias [N]
    LR, LUP, BIAS,
    OUT,
    # sizes
    M, N, G, R,
    # strides (elements)
    stride_am, stride_sam, stride_wn, stride_swn, stride_lrm, stride_lur, stride_om,
    HAS_LR: tl.constexpr, HAS_BIAS: tl.constexpr, LR_IEEE: tl.constexpr,
    UNPACK_ASM: tl.constexpr, A_UNSIGNED: tl.constexpr, MAGIC_I2F: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
    GROUPS: tl.constexpr, LR_MODE: tl.constexpr, K_PERM: tl.constexpr, PREFETCH: tl.constexpr,
):
    # Grouped launch order: GROUP_M row-tiles share each weight column-tile while it is in L2.
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    # Out-of-range rows/columns read row 0 instead of being masked: loads stay unconditional
    # (vectorized) and the garbage never reaches memory because the store is masked.
    safe_m = tl.where(mask_m, offs_m, 0)
    safe_n = tl.where(mask_n, offs_n, 0)
    offs_b = tl.arange(0, 32)
    a_ptr = A + safe_m[:, None] * stride_am + offs_b[None, :]
    w_ptr = W + safe_n[:, None] * stride_wn + offs_b[None, :]
    sa_ptr = SA + safe_m * stride_sam
    sw_ptr = SW + safe_n * stride_swn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if HAS_LR:
        offs_r = tl.arange(0, BLOCK_R)
        mask_r = offs_r < R
        lr_ptrs = LR + safe_m[:, None] * stride_lrm + offs_r[None, :]
        # offs_n, not safe_n, with a mask: the clamped indices hide the contiguity along N from
        # the compiler, which then loads L_up one 2-byte element at a time (32 loads a thread at
        # BLOCK_N = 128; the sweep's per-tile branch cost grew with BLOCK_N).
        lu_ptrs = LUP + offs_r[:, None] * stride_lur + offs_n[None, :]
        lu_mask = mask_r[:, None] & mask_n[None, :]
        if LR_MODE == 2:
            # The branch first, as the starting value of the accumulator (in the main loop's
            # units: the loop sums 256·Σqa·qw, or 16· for unsigned activations).
            unit = 16.0 if A_UNSIGNED else 256.0
            lr = tl.load(lr_ptrs, mask=mask_r[None, :], other=0.0)
            lu = tl.load(lu_ptrs, mask=lu_mask, other=0.0)
            if LR_IEEE:
                acc = tl.dot(lr.to(tl.float32), lu.to(tl.float32), input_precision="ieee")
            else:
                acc = tl.dot(lr, lu)
            acc = acc * unit
    # PREFETCH: the group scales are read one step ahead (loop-carried) instead of where they
    # are used: Triton's pipeliner stages only the dot operands, and the SASS showed the scale
    # loads between each MMA's wait and its scaling. On the H100 not the gain predicted (v4/v5
    # runs: within ±5% either way, shape by shape): the 3 programs an SM already hide that
    # latency, and the carried values cost registers under the cap. So a tuning knob in the
    # config table. Reads past the last group are clamped to it (in bounds) and never used.
    if PREFETCH:
        sa0 = tl.load(sa_ptr)
        sw0 = tl.load(sw_ptr)
        if GROUPS == 2:
            sa1 = tl.load(sa_ptr + tl.minimum(1, G - 1))
            sw1 = tl.load(sw_ptr + tl.minimum(1, G - 1))
    for g in range(0, G, GROUPS):
        # Triton waits for each wgmma right after it here (its A operand is unpacked in registers
        # inside the loop, and the int32 result feeds CUDA-core math), so issuing two groups'
        # MMAs before either's scaling overlaps nothing and only keeps two int32 tiles live
        # (ptxas spills at 64x128 and up). GROUPS == 2 is an unroll by two groups instead: half
        # the loop's index and pipeline bookkeeping; the MMA/CUDA-core overlap comes from the
        # programs that share each SM. With an odd group count the last step's second group
        # re-reads group G−1 (in bounds, no masks) and is weighted by 0.
        g1 = tl.minimum(g + 1, G - 1)
        if PREFETCH:
            gn = tl.minimum(g + GROUPS, G - 1)
            sa_next = tl.load(sa_ptr + gn)
            sw_next = tl.load(sw_ptr + gn)
            if GROUPS == 2:
                gn1 = tl.minimum(g + GROUPS + 1, G - 1)
                sa1_next = tl.load(sa_ptr + gn1)
                sw1_next = tl.load(sw_ptr + gn1)
        else:
            sa0 = tl.load(sa_ptr + g)
            sw0 = tl.load(sw_ptr + g)
            if GROUPS == 2:
                sa1 = tl.load(sa_ptr + g1)
                sw1 = tl.load(sw_ptr + g1)
        p0 = _group_dot(a_ptr + g * 32, w_ptr + g * 32, BLOCK_M, BLOCK_N, UNPACK_ASM, A_UNSIGNED,
                        K_PERM)
        acc = _scale_add(acc, p0, sa0, sw0, MAGIC_I2F, UNPACK_ASM)
        if GROUPS == 2:
            p1 = _group_dot(a_ptr + g1 * 32, w_ptr + g1 * 32, BLOCK_M, BLOCK_N, UNPACK_ASM,
                            A_UNSIGNED, K_PERM)
            keep = (g + 1 < G).to(tl.float32)
            acc = _scale_add(acc, p1, sa1 * keep, sw1, MAGIC_I2F, UNPACK_ASM)
        if PREFETCH:
            sa0 = sa_next
            sw0 = sw_next
            if GROUPS == 2:
                sa1 = sa1_next
                sw1 = sw1_next
    if A_UNSIGNED:
        acc = acc * (1.0 / 16.0)
    else:
        acc = acc * (1.0 / 256.0)

    if HAS_LR and LR_MODE != 2:
        # The rank-r up-projection: r/(K/2) of the main loop's MACs, in 16-bit MMA.
        lr = tl.load(lr_ptrs, mask=mask_r[None, :], other=0.0)
        lu = tl.load(lu_ptrs, mask=lu_mask, other=0.0)
        if LR_MODE == 0:   # into the accumulator itself
            if LR_IEEE:
                acc = tl.dot(lr.to(tl.float32), lu.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(lr, lu, acc)
        else:              # LR_MODE 1: its own accumulator, added after
            if LR_IEEE:
                acc += tl.dot(lr.to(tl.float32), lu.to(tl.float32), input_precision="ieee")
            else:
                acc += tl.dot(lr, lu)
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(OUT + offs_m[:, None] * stride_om + offs_n[None, :], acc.to(OUT.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


# Where the low-rank MMA goes (see triton_gemm's lr_mode).
LR_MODE_DEFAULT = 2   # H100 sweep (BENCHMARKS.md): 1-3% faster than 0 and 1 at the autotuned tile

# Tile configurations tried on the GPU (kept as data; the interpreter uses the small one). All
# compile without spills for sm_90 (ptxas via Triton 3.9 on the CPU, with the branch, K_PERM, I2F):
# 64x128 w4 and 64x256 w8 run 313-318 instructions a warp per group, 64 of them each I2FP, FMUL and
# FFMA (the scaling's floor); tiles whose weight scales Triton loads per column (128x64, 64x64,
# 256x64) add ~50. 128x128 (4 or 8 warps) and GROUPS = 2 at 64x128 and up spill, so they are out;
# 256x64 w8 and 64x64 GROUPS = 2 lost to the rest on every Flux shape (H100 sweep, v3).
# Each program waits for its own MMA before scaling (see the main loop), so the tensor cores work
# while *other* programs of the SM scale: 64x128 w4 takes 212 registers (2 programs an SM); capped
# at 168 (maxnreg) it fits 3 with 8 bytes of stack outside the loop and +7 instructions in it.
GPU_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "GROUP_M": 8, "GROUPS": gr, "PREFETCH": pf},
                  num_warps=w, num_stages=s, maxnreg=r)
    for bm, bn, w, s, gr, r, pf in [
        (64, 128, 4, 3, 1, None, 0), (64, 128, 4, 4, 1, None, 0), (64, 128, 4, 2, 1, 168, 0),
        (64, 128, 4, 3, 1, 168, 0), (64, 128, 4, 4, 1, 168, 0), (64, 128, 4, 3, 1, 168, 1),
        (64, 128, 4, 4, 1, 168, 1), (64, 256, 8, 3, 1, None, 0), (128, 64, 4, 3, 1, None, 0),
        (64, 64, 4, 3, 1, None, 0), (32, 64, 4, 4, 1, None, 0), (16, 64, 4, 4, 1, None, 0),
    ]
]
# Two groups a step, so odd group counts test the masked tail under the interpreter.
_INTERP_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 32, "GROUP_M": 2, "GROUPS": 2, "PREFETCH": 0}

_w4a4_gemm_tuned = triton.autotune(
    configs=GPU_CONFIGS,
    key=["M", "N", "G", "HAS_LR", "HAS_BIAS", "UNPACK_ASM", "A_UNSIGNED", "MAGIC_I2F", "LR_MODE",
         "K_PERM"],
)(_w4a4_gemm_kernel)


# Tuned tiles as data, one JSON per GPU (written from bench_w4a4.py --sweep results): {"configs":
# {"N,K": {M bucket: config}}, "default": {M bucket: config}}, K the padded 64·groups. A shape the
# table lacks is autotuned over GPU_CONFIGS (a first call then compiles every candidate).
M_BUCKETS = (16, 64, 256, 1024, 4096)   # a bucket holds the M up to its bound; past the last: "big"
CONFIG_FIELDS = ("BLOCK_M", "BLOCK_N", "GROUP_M", "GROUPS", "num_warps", "num_stages")
# maxnreg: register cap (ptxas), more programs resident on each SM; PREFETCH: scales read a step
# ahead (default 0)
OPTIONAL_FIELDS = ("maxnreg", "PREFETCH")


def m_bucket(m: int) -> str:
    return next((str(b) for b in M_BUCKETS if m <= b), "big")


def config_path(device_name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> lowering/configs/w4a4-nvidia-h100-80gb-hbm3.json (H200: the H100's)."""
    return tuned_config_file("w4a4-", device_name)


def load_config_table(path: str) -> dict:
    """Read and check a tuned-config JSON (see the comment above); {} when the file is absent."""
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        table = json.load(f)
    for where in [table.get("default", {})] + list(table.get("configs", {}).values()):
        for bucket, cfg in where.items():
            missing = [k for k in CONFIG_FIELDS if k not in cfg]
            if missing:
                raise ValueError(f"{path}: config for M bucket {bucket!r} lacks {missing}; "
                                 "re-run benchmarks/bench_w4a4.py --sweep --configs-out to "
                                 "rewrite it")
    return table


def lookup_config(table: dict, m: int, n: int, g: int) -> dict | None:
    """The table's config for weight [n, 64·g] and M's bucket, else its default, else None."""
    bucket = m_bucket(m)
    cfg = table.get("configs", {}).get(f"{n},{64 * g}", {}).get(bucket)
    if cfg is None:
        cfg = table.get("default", {}).get(bucket)
    return None if cfg is None else {k: cfg[k] for k in CONFIG_FIELDS + OPTIONAL_FIELDS if k in cfg}


@functools.lru_cache(maxsize=None)
def _tuned_table(device_name: str) -> dict:
    return load_config_table(config_path(device_name))


def tuned_config(device: torch.device, m: int, n: int, g: int) -> dict | None:
    """The stored tile config for this GPU, weight shape and M bucket; None: autotune."""
    if device.type != "cuda":
        return None
    return lookup_config(_tuned_table(torch.cuda.get_device_name(device)), m, n, g)


def triton_gemm(a: torch.Tensor, a_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
                lr_act: torch.Tensor | None, l_up: torch.Tensor | None,
                bias: torch.Tensor | None, out_dtype: torch.dtype,
                unpack_asm: bool | None = None, config: dict | None = None,
                a_unsigned: bool = False, magic_i2f: bool = False,
                lr_mode: int | None = None, k_perm: bool = True) -> torch.Tensor:
    """Launch the kernel on 2-D operands; the same result as `reference` within fp32 rounding.

    unpack_asm: None = inline PTX on CUDA, pure Triton elsewhere. magic_i2f: convert the group
    sums to float with integer arithmetic instead of I2F (same bits). lr_mode: where the branch's
    MMA goes (0: into the accumulator after the loop, 1: its own accumulator added after the
    loop, 2: before the loop as the accumulator's start; None: LR_MODE_DEFAULT). k_perm: feed the
    MMA the nibbles in the shuffle-free k-order (same sums; False restores the natural order, kept
    to measure against). config: a fixed tile configuration ({"BLOCK_M", "BLOCK_N", "GROUP_M",
    "GROUPS"} + num_warps/num_stages, optionally maxnreg and PREFETCH); None: the tuned table for
    this GPU and shape
    (`lowering/configs/w4a4-<gpu>.json`), else autotuning over GPU_CONFIGS.
    """
    m, n, g = a.shape[0], w.shape[0], a_scale.shape[1]
    out = torch.empty((m, n), dtype=out_dtype, device=a.device)
    if m == 0 or n == 0:
        return out
    a, w = a.contiguous(), w.contiguous()
    a_scale, w_scale = a_scale.contiguous(), w_scale.contiguous()
    has_lr = lr_act is not None and l_up is not None and lr_act.shape[-1] > 0
    r = lr_act.shape[1] if has_lr else 0
    if has_lr:
        lr_act = lr_act.contiguous()
        l_up = l_up.to(lr_act.dtype).contiguous()
    if bias is not None:
        bias = bias.contiguous()
    if unpack_asm is None:
        unpack_asm = a.is_cuda and not interpreter_enabled()
    args = (
        a, a_scale, w, w_scale,
        lr_act if has_lr else a_scale, l_up if has_lr else a_scale,
        bias if bias is not None else a_scale, out,
        m, n, g, r,
        a.stride(0), a_scale.stride(0), w.stride(0), w_scale.stride(0),
        lr_act.stride(0) if has_lr else 0, l_up.stride(0) if has_lr else 0, out.stride(0),
    )
    flags = dict(HAS_LR=has_lr, HAS_BIAS=bias is not None,
                 # fp32 must not become tf32; the interpreter's 16-bit tl.dot is wrong (triton 3.9)
                 LR_IEEE=has_lr and (lr_act.dtype == torch.float32 or interpreter_enabled()),
                 UNPACK_ASM=unpack_asm, A_UNSIGNED=a_unsigned, MAGIC_I2F=magic_i2f,
                 LR_MODE=LR_MODE_DEFAULT if lr_mode is None else lr_mode, K_PERM=k_perm,
                 BLOCK_R=max(16, triton.next_power_of_2(max(r, 1))))
    if config is None and interpreter_enabled():
        config = dict(_INTERP_CONFIG)
    if config is None:
        config = tuned_config(a.device, m, n, g)
    if config is not None:
        cfg = dict(config)
        cfg.setdefault("GROUPS", 1)
        cfg.setdefault("PREFETCH", 0)
        if cfg.get("maxnreg") is None:
            cfg.pop("maxnreg", None)
        bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
        grid = (cdiv(m, bm) * cdiv(n, bn),)
        _w4a4_gemm_kernel[grid](*args, **flags, **cfg)
    else:
        grid = lambda meta: (cdiv(m, meta["BLOCK_M"]) * cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
        _w4a4_gemm_tuned[grid](*args, **flags)
    return out


# --------------------------------------------------------------------------------------------
# The op.
# --------------------------------------------------------------------------------------------

def _check(a, a_scale, w, w_scale, lr_act, l_up, bias) -> None:
    kb = a.shape[-1]
    g = a_scale.shape[-1]
    if a.dtype != torch.uint8 or w.dtype != torch.uint8:
        raise TypeError(f"w4a4_gemm: packed operands must be uint8, got a={a.dtype}, w={w.dtype}")
    if w.dim() != 2 or w.shape[1] != kb or kb != g * GROUP // 2:
        raise ValueError(f"w4a4_gemm: packed widths disagree: a [..., {kb}], w "
                         f"{tuple(w.shape)}, a_scale [..., {g}] (expected Kp/2 = 32·groups)")
    if a_scale.shape[:-1] != a.shape[:-1] or w_scale.shape != (w.shape[0], g):
        raise ValueError(f"w4a4_gemm: scale shapes a_scale {tuple(a_scale.shape)}, w_scale "
                         f"{tuple(w_scale.shape)} do not match a {tuple(a.shape)}, w {tuple(w.shape)}")
    if (lr_act is None) != (l_up is None) and not (lr_act is not None and lr_act.shape[-1] == 0):
        raise ValueError("w4a4_gemm: lr_act and l_up go together (both or neither)")
    if lr_act is not None and l_up is not None:
        if lr_act.shape[:-1] != a.shape[:-1] or l_up.shape != (lr_act.shape[-1], w.shape[0]):
            raise ValueError(f"w4a4_gemm: low-rank shapes lr_act {tuple(lr_act.shape)}, l_up "
                             f"{tuple(l_up.shape)} do not fit a {tuple(a.shape)}, "
                             f"w {tuple(w.shape)} (expected [..., r] and [r, N])")
    if bias is not None and bias.shape != (w.shape[0],):
        raise ValueError(f"w4a4_gemm: bias has shape {tuple(bias.shape)}, expected ({w.shape[0]},)")


@torch.library.custom_op("qoq::w4a4_gemm", mutates_args=())
def w4a4_gemm(a: torch.Tensor, a_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
              lr_act: torch.Tensor | None, l_up: torch.Tensor | None, bias: torch.Tensor | None,
              out_dtype: torch.dtype, a_unsigned: bool = False, kernels: str = "auto"
              ) -> torch.Tensor:
    """y = dequant(a)·dequant(w)ᵀ + lr_act·l_up + bias, [..., N] in out_dtype.

    a [..., Kp/2] uint8 and a_scale [..., Kp/64] fp32 come from `qoq::w4a4_quantize_act`;
    w [N, Kp/2] uint8 and w_scale [N, Kp/64] from `quantize_weight`; lr_act [..., r] = X̂·L_down
    (the third output of the quantize op) and l_up [r, N] are the low-rank branch, bias [N].
    a_unsigned: a holds unsigned codes (quantize op given a shift); bias must then already
    include −shift·dequant(w)ᵀ.
    """
    _check(a, a_scale, w, w_scale, lr_act, l_up, bias)
    lead = a.shape[:-1]
    a2 = a.reshape(-1, a.shape[-1])
    sa2 = a_scale.reshape(-1, a_scale.shape[-1])
    if lr_act is None or lr_act.shape[-1] == 0:   # rank 0: no branch
        lr2, l_up = None, None
    else:
        lr2 = lr_act.reshape(-1, lr_act.shape[-1])
    if use_triton(a, kernels):
        y = triton_gemm(a2, sa2, w, w_scale, lr2, l_up, bias, out_dtype, a_unsigned=a_unsigned)
    else:
        y = reference(a2, sa2, w, w_scale, lr2, l_up, bias, out_dtype, a_unsigned)
    return y.view(*lead, w.shape[0])


@w4a4_gemm.register_fake
def _(a, a_scale, w, w_scale, lr_act, l_up, bias, out_dtype, a_unsigned=False, kernels="auto"):
    _check(a, a_scale, w, w_scale, lr_act, l_up, bias)
    return a.new_empty((*a.shape[:-1], w.shape[0]), dtype=out_dtype)


def w4a4_linear(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
                l_down: torch.Tensor | None = None, l_up: torch.Tensor | None = None,
                bias: torch.Tensor | None = None, smooth_inv: torch.Tensor | None = None,
                shift: torch.Tensor | None = None, kernels: str = "auto") -> torch.Tensor:
    """The two ops as the lowering pass emits them: x [..., K] -> [..., N] in x's dtype.

    With `shift` (unsigned activations), `bias` must be `shifted_bias(...)`'s.
    """
    a, sa, lr = torch.ops.qoq.w4a4_quantize_act(x, smooth_inv, l_down, shift, kernels)
    return torch.ops.qoq.w4a4_gemm(a, sa, w, w_scale, lr if l_down is not None else None,
                                   l_up if l_down is not None else None, bias, x.dtype,
                                   shift is not None, kernels)


def shifted_bias(bias: torch.Tensor | None, shift: torch.Tensor, w: torch.Tensor,
                 w_scale: torch.Tensor) -> torch.Tensor:
    """The bias for unsigned activations: the GEMM sees x + shift, so take shift·Ŵ back out
    (Ŵ the dequantized weight: exactly what the GEMM multiplies the shift by), fp32 [N]."""
    wq = dequantize(w, w_scale, shift.shape[0])
    out = -(wq.double() @ shift.double()).float()
    return out if bias is None else out + bias.float()
