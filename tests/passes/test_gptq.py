"""Weight search: round-to-nearest with clipping and GPTQ emit the same formats as passes.quantize,
and lower the output error on the calibration rows."""
from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from passes.gptq import fake_quantize, gptq, quantize_rtn, search_clip
from passes.quantize import quantize_weight
from qcompile.config import make_config

RECIPES = st.sampled_from(["w4a8", "w4a8-g128"])


def _same(a, b):
    assert a.format == b.format and a.group_size == b.group_size
    for k, v in a.tensors().items():
        assert torch.equal(v, b.tensors()[k]), k


@given(recipe=RECIPES, n=st.integers(1, 40), k=st.integers(1, 300), seed=st.integers(0, 2**16))
def test_rtn_without_clipping_is_passes_quantize(recipe, n, k, seed):
    cfg = make_config({"recipe": recipe})
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * torch.rand(n, 1) * 3
    qw, deq = quantize_rtn(w, cfg)
    ref = quantize_weight(w, cfg)
    _same(qw, ref)
    assert torch.equal(deq, ref.dequantize())
    assert torch.allclose(fake_quantize(w, cfg), deq, rtol=0, atol=1e-6)


@settings(max_examples=8)
@given(recipe=RECIPES, seed=st.integers(0, 2**16))
def test_gptq_with_a_diagonal_hessian_is_rtn(recipe, seed):
    # No correlation between inputs: no error is worth moving to the other columns.
    cfg = make_config({"recipe": recipe})
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(24, 200, generator=g)
    h = torch.diag(torch.rand(200, generator=g) + 0.5)
    qw, _ = gptq(w, h, cfg, damp=0.0)
    _same(qw, quantize_weight(w, cfg))


@settings(max_examples=8)
@given(recipe=RECIPES, seed=st.integers(0, 2**16))
def test_gptq_and_clipping_lower_the_output_error(recipe, seed):
    cfg = make_config({"recipe": recipe})
    g = torch.Generator().manual_seed(seed)
    # Correlated inputs with a few large channels, as LLM activations are.
    x = torch.randn(512, 32, generator=g) @ torch.randn(32, 256, generator=g) + 0.3 * torch.randn(512, 256, generator=g)
    x[:, :4] *= 8
    w = torch.randn(64, 256, generator=g)
    ref = x @ w.t()

    def err(deq):
        return float((x @ deq.t() - ref).pow(2).sum())

    rtn = err(quantize_rtn(w, cfg)[1])
    clip = search_clip(w, x, cfg)
    assert err(quantize_rtn(w, cfg, clip)[1]) <= rtn * (1 + 1e-6)
    qw, deq = gptq(w, x.t() @ x, cfg, clip)
    assert torch.allclose(qw.dequantize(), deq, atol=1e-5)  # the packed weight is what GPTQ chose
    assert err(deq) < 0.8 * rtn


# -- the progressive format's (s2, z) grid search ---------------------------------------------------

@given(n=st.integers(1, 24), k=st.integers(1, 300), group=st.sampled_from([32, 64, 128]),
       seed=st.integers(0, 2**16), spread=st.floats(0.01, 100.0))
def test_grid_search_emits_kernel_valid_weights(n, k, group, seed, spread):
    """Every level the grid search uses fits int8 ((q − z)·s2 ∈ [−128, 127], s2 ≤ 16, z·s2 ≤ 255),
    and the packed weight dequantizes to exactly the weight it reports."""
    from passes.gptq import search_grid
    from lowering.w4a8_gemm import dequantize_int8_weight

    cfg = make_config({"recipe": "w4a8-g128", "weight_group_size": group})
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * torch.rand(n, 1, generator=gen) * spread
    w[torch.rand(n, k, generator=gen) < 0.01] *= 30  # outliers
    imp = torch.rand(k, generator=gen) ** 4
    qw, deq = search_grid(w, cfg, imp)
    assert qw.format == "w4a8_progressive" and qw.group_size == group
    assert int(qw.gscale.max()) <= 16 and int(qw.gscale.min()) >= 1
    w8 = dequantize_int8_weight(qw.qweight, qw.gscale, qw.gzero, k)
    assert int(w8.min()) >= -128 and int(w8.max()) <= 127
    assert torch.allclose(qw.dequantize().float(), deq, rtol=1e-6, atol=1e-6 * float(w.abs().max()))


@settings(max_examples=10)
@given(seed=st.integers(0, 2**16))
def test_grid_search_beats_round_to_nearest_on_its_objective(seed):
    """The searched grid's importance-weighted error is below round-to-nearest's on Gaussian weights
    (a layer, not a corner case: 64 rows of 576, the last group ragged)."""
    from passes.gptq import search_grid

    cfg = make_config({"recipe": "w4a8-g128"})
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(64, 576, generator=gen) * torch.rand(64, 1, generator=gen)
    imp = torch.rand(576, generator=gen) * 4
    _, deq = search_grid(w, cfg, imp)
    _, rtn = quantize_rtn(w, cfg)
    err = lambda d: float(((w - d).pow(2) * imp).sum())  # noqa: E731
    assert err(deq) < 0.95 * err(rtn)


@settings(max_examples=6)
@given(seed=st.integers(0, 2**16))
def test_gptq_with_the_grid_lowers_the_output_error(seed):
    """GPTQ whose groups take the searched (s2, z) beats the grid search alone on correlated rows."""
    from passes.gptq import search_grid

    cfg = make_config({"recipe": "w4a8-g128"})
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(256, 256, generator=gen) / 16
    x = torch.randn(1024, 256, generator=gen) @ mix + torch.randn(1024, 256, generator=gen) * 0.1
    w = torch.randn(32, 256, generator=gen)
    h = x.t() @ x
    err = lambda d: float((x @ (w - d).t()).pow(2).sum())  # noqa: E731
    _, grid = search_grid(w, cfg, torch.diagonal(h) / x.shape[0])
    qw, deq = gptq(w, h, cfg, damp=0.1, grid=True)
    assert torch.allclose(qw.dequantize().float(), deq, atol=1e-5)
    assert err(deq) < err(grid)


def test_grid_search_refuses_per_channel_and_bad_importance():
    import pytest

    from passes.gptq import search_grid

    w = torch.randn(4, 64)
    with pytest.raises(ValueError, match="per-channel"):
        search_grid(w, make_config({"recipe": "w4a8"}))
    with pytest.raises(ValueError, match="expected \\(64,\\)"):
        search_grid(w, make_config({"recipe": "w4a8-g128"}), torch.ones(63))
