"""qoq::w4a4_quantize_act: int4 g64 format round trips, error bounds, Triton == reference."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lowering.w4a4_activation_quant import (
    GELU_SHIFT, GROUP, pack_int4, pack_uint4, quantize_groups_int4, quantize_groups_uint4,
    reference, triton_quantize_act, unpack_int4, unpack_uint4, w4a4_quantize_act,
)


@given(rows=st.integers(1, 9), half=st.integers(1, 70), seed=st.integers(0, 2**31 - 1))
def test_pack_unpack_round_trip(rows, half, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-8, 8, (rows, 2 * half), generator=g, dtype=torch.int8)
    p = pack_int4(q)
    assert p.shape == (rows, half) and p.dtype == torch.uint8
    assert torch.equal(unpack_int4(p), q)
    # Low nibble holds the even k: the layout the kernels rely on.
    assert torch.equal((p & 0xF).to(torch.int16), (q[:, 0::2].to(torch.int16) & 0xF))
    u = torch.randint(0, 16, (rows, 2 * half), generator=g, dtype=torch.uint8)
    assert torch.equal(unpack_uint4(pack_uint4(u)), u)


@given(rows=st.integers(1, 6), k=st.integers(1, 300), seed=st.integers(0, 2**31 - 1))
def test_unsigned_quantization_error_within_half_a_step(rows, k, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.gelu(torch.randn(rows, k, generator=g) * 3) + GELU_SHIFT
    assert bool((x >= 0).all())
    q, s = quantize_groups_uint4(x)
    assert int(q.max()) <= 15 and q.dtype == torch.uint8
    deq = (q.float().view(rows, -1, GROUP) * s[..., None]).view(rows, -1)[:, :k]
    step = s.repeat_interleave(GROUP, dim=1)[:, :k]
    assert bool(((deq - x).abs() <= 0.5 * step * (1 + 1e-5) + 1e-30).all())


@given(rows=st.integers(1, 6), k=st.integers(1, 300), scale=st.floats(1e-3, 1e3),
       seed=st.integers(0, 2**31 - 1))
def test_quantization_error_within_half_a_step(rows, k, scale, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g) * scale
    q, s = quantize_groups_int4(x)
    kp = s.shape[1] * GROUP
    assert q.shape == (rows, kp) and kp >= k and kp - k < GROUP
    assert int(q.min()) >= -8 and int(q.max()) <= 7
    deq = (q.float().view(rows, -1, GROUP) * s[..., None]).view(rows, kp)
    step = s.repeat_interleave(GROUP, dim=1)
    err = (deq[:, :k] - x).abs()
    assert bool((err <= 0.5 * step[:, :k] * (1 + 1e-5) + 1e-30).all())
    # The padding quantizes to exact zeros, so it adds nothing to the GEMM.
    assert bool((q[:, k:] == 0).all())
    # absmax of each group maps to ±7: the full symmetric range is used.
    assert int(q.abs().view(rows, -1, GROUP).amax(-1).min()) == 7


def test_zero_group_has_zero_codes_and_scale():
    x = torch.zeros(2, 130)
    x[1, 70] = 3.0
    q, s = quantize_groups_int4(x)
    assert torch.equal(s[0], torch.zeros(3)) and bool((q[0] == 0).all())
    assert s[1, 1] == pytest.approx(3.0 / 7) and int(q[1, 70]) == 7


@given(m=st.integers(1, 40), k=st.integers(1, 200), r=st.sampled_from([0, 5, 16, 32]),
       smooth=st.booleans(), shifted=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       seed=st.integers(0, 2**31 - 1))
def test_triton_matches_reference(m, k, r, smooth, shifted, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(m, k, generator=g) * 3).to(dtype)
    if shifted:
        x = torch.nn.functional.gelu(x)
    sm = (torch.rand(k, generator=g) + 0.25) if smooth else None
    ld = (torch.randn(k, r, generator=g) * 0.1).to(dtype) if r else None
    shift = (GELU_SHIFT * (sm if sm is not None else torch.ones(k))) if shifted else None
    qt, st_, lt = triton_quantize_act(x, sm, ld, shift)
    qr, sr, lr = reference(x, sm, ld, shift)
    assert torch.equal(qt, qr)          # integer codes: bit-exact
    assert torch.equal(st_, sr)         # scales: the same IEEE ops
    assert lt.shape == (m, r) and lt.dtype == dtype
    if r:
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(lt.float(), lr.float(), rtol=tol, atol=tol)


def test_low_rank_output_is_the_smoothed_projection():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 96, generator=g)
    sm = torch.rand(96, generator=g) + 0.5
    ld = torch.randn(96, 16, generator=g)
    _, _, lr = w4a4_quantize_act(x, sm, ld)
    torch.testing.assert_close(lr, (x * sm) @ ld, rtol=1e-5, atol=1e-4)


def test_op_keeps_leading_dims_and_fake_agrees():
    x = torch.randn(2, 3, 100)
    ld = torch.randn(100, 16)
    q, s, lr = torch.ops.qoq.w4a4_quantize_act(x, None, ld, kernels="triton")
    assert q.shape == (2, 3, 64) and s.shape == (2, 3, 2) and lr.shape == (2, 3, 16)
    q2, s2, lr2 = torch.ops.qoq.w4a4_quantize_act(x, None, ld, kernels="reference")
    assert torch.equal(q, q2) and torch.equal(s, s2)
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode:
        fq, fs, flr = torch.ops.qoq.w4a4_quantize_act(mode.from_tensor(x), None,
                                                      mode.from_tensor(ld), kernels="auto")
    assert (fq.shape, fq.dtype, fs.shape, fs.dtype, flr.shape, flr.dtype) == (
        q.shape, q.dtype, s.shape, s.dtype, lr.shape, lr.dtype)


def test_opcheck():
    x = torch.randn(5, 70)
    torch.library.opcheck(torch.ops.qoq.w4a4_quantize_act.default,
                          (x, torch.rand(70) + 0.5, torch.randn(70, 16), torch.full((70,), 0.2),
                           "reference"),
                          test_utils=("test_schema", "test_faketensor"))


def test_bad_shapes_name_the_argument():
    with pytest.raises(ValueError, match="l_down"):
        w4a4_quantize_act(torch.randn(4, 64), None, torch.randn(32, 16))
    with pytest.raises(ValueError, match="smooth_inv"):
        w4a4_quantize_act(torch.randn(4, 64), torch.ones(63), None)
