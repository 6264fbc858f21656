"""KV4 format and qoq::kv4_append: Triton == reference bit for bit, error bounds, bits per element."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lowering.kv4_append import (
    kv4_alloc,
    kv4_append,
    kv4_bits_per_element,
    kv4_dequantize,
    kv4_quantize,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # hypothesis cannot take fixtures
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _caches(b, h, length, d, device):
    return [*kv4_alloc(b, h, length, d, device), *kv4_alloc(b, h, length, d, device)]


@given(
    b=st.integers(1, 2), h=st.integers(1, 3), t=st.integers(1, 40), extra=st.integers(0, 30),
    d=st.sampled_from([8, 16, 24, 32, 48, 64, 128]), dtype=st.sampled_from(DTYPES),
    spread=st.floats(0.01, 100.0), seed=st.integers(0, 2**16),
)
def test_append_triton_matches_reference(b, h, t, extra, d, dtype, spread, seed):
    device = DEVICE
    g = torch.Generator().manual_seed(seed)
    length = t + extra
    k = (torch.randn(b, h, t, d, generator=g) * spread + torch.randn(1, generator=g) * spread).to(dtype)
    v = (torch.randn(b, h, t, d, generator=g) * spread).to(dtype)
    # distinct slots in any order: writes are scatters, not appends at the end
    pos = torch.randperm(length, generator=g)[:t]
    ref = _caches(b, h, length, d, device)
    tri = _caches(b, h, length, d, device)
    kv4_append(k.to(device), v.to(device), *ref, pos.to(device), kernels="reference")
    kv4_append(k.to(device), v.to(device), *tri, pos.to(device), kernels="triton")
    for r, x in zip(ref, tri):
        assert torch.equal(r, x)
    # untouched slots stay zero
    untouched = torch.ones(length, dtype=torch.bool)
    untouched[pos] = False
    assert not ref[0][:, :, untouched.to(device)].any()


def test_append_non_contiguous_input(device):
    # k as it comes out of a transpose in attention: [B, T, H, D] viewed as [B, H, T, D]
    k = torch.randn(2, 7, 3, 32).transpose(1, 2).to(device)
    v = torch.randn(2, 3, 7, 32).to(device)
    pos = torch.arange(3, 10, device=device)
    ref = _caches(2, 3, 12, 32, device)
    tri = _caches(2, 3, 12, 32, device)
    kv4_append(k, v, *ref, pos, kernels="reference")
    kv4_append(k, v, *tri, pos, kernels="triton")
    for r, x in zip(ref, tri):
        assert torch.equal(r, x)


@given(
    rows=st.integers(1, 20), d=st.sampled_from([2, 16, 64, 128]),
    spread=st.floats(1e-3, 1e3), offset=st.floats(-1e3, 1e3), seed=st.integers(0, 2**16),
)
def test_quantize_error_bound(rows, d, spread, offset, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, d, generator=g) * spread + offset
    data, meta = kv4_quantize(x)
    assert data.dtype == torch.uint8 and data.shape == (rows, d // 2)
    err = (kv4_dequantize(data, meta) - x).abs()
    s16 = meta[:, 0:1].float()
    z_err = (meta[:, 1:2].float() - x.amin(-1, keepdim=True)).abs()  # fp16 rounding of the minimum
    # half a step, plus what fp16 rounding of scale (15 steps) and zero can add
    bound = 0.5 * s16 * (1 + 16 * 2**-10) + z_err + 1e-6 * x.abs().amax(-1, keepdim=True)
    assert (err <= bound).all()


def test_constant_rows_and_zero_rows_are_exact():
    x = torch.tensor([[3.0] * 8, [0.0] * 8, [-1.5] * 8])
    data, meta = kv4_quantize(x)
    assert torch.equal(kv4_dequantize(data, meta), x)
    assert (meta[:, 0] == 0).all()


def test_nibble_order_pairs_i_with_i_plus_half():
    x = torch.arange(16, dtype=torch.float32)[None]  # min 0, max 15: codes are the values
    data, meta = kv4_quantize(x)
    assert meta[0, 0].item() == 1.0 and meta[0, 1].item() == 0.0
    assert data[0].tolist() == [i | ((i + 8) << 4) for i in range(8)]


def test_bits_per_element():
    assert kv4_bits_per_element(128) == 4.25
    data, meta = kv4_alloc(2, 4, 64, 128)
    bits = 8 * (data.numel() * data.element_size() + meta.numel() * meta.element_size()) / (2 * 4 * 64 * 128)
    assert bits == kv4_bits_per_element(128) <= 4.25


def test_append_rejects_mismatched_cache():
    k = torch.randn(1, 2, 3, 16)
    with pytest.raises(ValueError, match="k cache"):
        kv4_append(k, k, *kv4_alloc(1, 2, 8, 32), *kv4_alloc(1, 2, 8, 16), torch.arange(3))
    with pytest.raises(ValueError, match="head_dim"):
        kv4_alloc(1, 1, 4, 15)


def test_append_opcheck():
    k, v = torch.randn(2, 2, 5, 16), torch.randn(2, 2, 5, 16)
    torch.library.opcheck(
        torch.ops.qoq.kv4_append.default,
        (k, v, *kv4_alloc(2, 2, 9, 16), *kv4_alloc(2, 2, 9, 16), torch.arange(2, 7), "reference"),
    )


# -- rotation (passes/rotate_kv's H applied inside the append) -------------------------------------
