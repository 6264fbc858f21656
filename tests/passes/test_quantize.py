"""W4 weight formats: progressive never overflows int8, errors within half a step, caching."""
from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
import numpy as np

from lowering.w4a8_gemm import dequantize_int8_weight, unpack_nibbles
from passes.quantize import quantize_per_channel, quantize_progressive

_finite = st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False, width=32)
weights = hnp.arrays(np.float32, hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=300), elements=_finite)


@given(w=weights, group=st.sampled_from([32, 64, 128, 256]))
def test_progressive_never_overflows_int8(w, group):
    qw = quantize_progressive(torch.from_numpy(w), group)
    s2 = qw.gscale.int()
    zs = qw.gzero.int()
    q = unpack_nibbles(qw.qweight, qw.qweight.shape[1] * 2).int()
    # The kernel multiplies and subtracts inside one byte per lane: every term must fit.
    assert int(s2.min()) >= 1 and int(s2.max()) <= 16
    assert int(q.max()) <= 15 and int(zs.max()) <= 255
    assert int((q.max() * s2.max())) <= 255
    w8 = dequantize_int8_weight(qw.qweight, qw.gscale, qw.gzero, w.shape[1])
    assert int(w8.min()) >= -128 and int(w8.max()) <= 127


@given(w=weights, group=st.sampled_from([64, 128]))
def test_progressive_error_within_half_a_step(w, group):
    wt = torch.from_numpy(w)
    qw = quantize_progressive(wt, group)
    N, K = wt.shape
    s1 = qw.wscale[:, None]
    Kp = qw.qweight.shape[1] * 2
    s2 = qw.gscale.float().repeat_interleave(group, dim=1)[:, :K]
    # Level 1 rounds to within s1/2, level 2 to within s1·s2/2 (plus float slack).
    bound = s1 * (0.5 + s2 / 2) * (1 + 1e-5) + 1e-6 * wt.abs().amax(1, keepdim=True)
    assert bool(((qw.dequantize() - wt).abs() <= bound).all())
    assert Kp % group == 0 and Kp >= K


@given(w=weights)
def test_per_channel_error_within_half_a_step(w):
    wt = torch.from_numpy(w)
    qw = quantize_per_channel(wt)
    bound = qw.wscale[:, None] * 0.5 * (1 + 1e-4) + 1e-6 * wt.abs().amax(1, keepdim=True)
    assert bool(((qw.dequantize() - wt).abs() <= bound).all())
    assert qw.gzero.dtype == torch.int32 and int(qw.gzero.min()) >= 0 and int(qw.gzero.max()) <= 15


def test_zero_rows_stay_zero_and_extreme_rows_stay_finite():
    w = torch.zeros(3, 130)
    w[1] = 2.5
    w[2, ::2] = -3e38
    for qw in (quantize_progressive(w, 128), quantize_per_channel(w)):
        deq = qw.dequantize()
        assert torch.equal(deq[0], torch.zeros(130))
        assert torch.isfinite(deq).all()
        torch.testing.assert_close(deq[1], w[1], rtol=0.01, atol=0)
