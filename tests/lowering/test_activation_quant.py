"""Per-token int8 activation quantization: Triton == reference, error within half a step."""
from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from lowering.activation_quant import quantize_act_int8, quantize_act_int8_reference, quantize_act_int8_triton


@given(
    m=st.integers(1, 9), k=st.integers(1, 300), scale=st.floats(1e-3, 1e3),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), seed=st.integers(0, 2**16),
)
def test_triton_matches_reference_bit_exactly(m, k, scale, dtype, seed, device):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn((m, k), generator=g) * scale).to(dtype).to(device)
    x8, sx, xsum = quantize_act_int8_triton(x)
    r8, rsx, rsum = quantize_act_int8_reference(x)
    assert torch.equal(x8, r8)
    assert torch.equal(xsum, rsum)
    torch.testing.assert_close(sx, rsx, rtol=1e-6, atol=0)


@given(shape=st.lists(st.integers(1, 6), min_size=1, max_size=3), k=st.integers(1, 64), seed=st.integers(0, 2**16))
def test_error_within_half_a_step_any_leading_shape(shape, k, seed):
    x = torch.randn((*shape, k), generator=torch.Generator().manual_seed(seed)) * 3
    x8, sx, xsum = quantize_act_int8(x, "reference")
    assert x8.shape == x.shape and sx.shape == x.shape[:-1]
    err = (x8.float() * sx[..., None] - x).abs()
    assert bool((err <= sx[..., None] * 0.5 * (1 + 1e-5) + 1e-12).all())
    assert int(x8.abs().max()) <= 127
    assert torch.equal(xsum, x8.sum(-1, dtype=torch.int32))


def test_zero_rows_give_zero_codes(device):
    x = torch.zeros(3, 17, device=device)
    x[1] = torch.linspace(-1, 1, 17, device=device)
    x8, sx, _ = quantize_act_int8(x, "triton")
    assert torch.equal(x8[0], torch.zeros(17, dtype=torch.int8, device=device)) and torch.equal(x8[2], x8[0])
    assert int(x8[1].abs().max()) == 127 and torch.isfinite(sx).all()


def test_fake_matches_real_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(2, 3, 40, dtype=torch.bfloat16)
        x8, sx, xsum = torch.ops.qoq.quantize_act_int8(x, "auto")
    assert x8.shape == (2, 3, 40) and x8.dtype == torch.int8
    assert sx.shape == (2, 3) and sx.dtype == torch.float32 and xsum.dtype == torch.int32
