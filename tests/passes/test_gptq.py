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
