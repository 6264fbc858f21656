"""Smoothing keeps the FP function of random small models (Llama, Qwen2, GPT-2) and never raises
the quantized output error of a scale group on its calibration rows."""
from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from passes.match import find_linears
from passes.smooth import fake_quant_output_error, search_factors, smooth
from qcompile.config import make_config
from tests.passes.models import capture_model, graph_stats, make_model, run_graph

MODELS = st.sampled_from(["llama", "qwen2", "gpt2"])


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@settings(max_examples=6)
@given(kind=MODELS, seed=st.integers(0, 2**16), kv_heads=st.sampled_from([1, 2, 4]), tokens=st.integers(16, 32))
def test_smooth_keeps_the_fp_output(kind, seed, kv_heads, tokens):
    model = make_model(kind, seed=seed, kv_heads=kv_heads)
    qg = capture_model(model, torch.randint(0, 96, (1, tokens), generator=torch.Generator().manual_seed(seed)))
    ref = run_graph(qg)
    details = {}
    smooth(qg, find_linears(qg), make_config({"recipe": "qoq"}), graph_stats(qg), details)
    assert any(d.get("smooth", "").startswith("into") for d in details.values()), details
    assert _rel(run_graph(qg), ref) < 1e-4


@settings(max_examples=10)
@given(seed=st.integers(0, 2**16), outliers=st.integers(0, 4), per_channel=st.booleans())
def test_search_never_worsens_the_quantized_error(seed, outliers, per_channel):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 128, generator=g)
    x[:, :outliers] *= 30  # activation outlier channels, as in LLMs
    ws = [torch.randn(48, 128, generator=g), torch.randn(32, 128, generator=g)]
    cfg = make_config({"recipe": "w4a8" if per_channel else "w4a8-g128"})
    s, a, b, err, base = search_factors(x, x.abs().amax(0), ws, cfg)
    assert err <= base
    assert abs(err - fake_quant_output_error(x, ws, cfg, divide=s)) <= 1e-6 * max(err, 1.0)
    if outliers:
        assert err < 0.7 * base  # migrating the outliers into the weights is what smoothing is for


def test_smoothing_lowers_the_quantized_model_error():
    """End to end on a small Llama with outlier channels: W4A8 g128 with smoothing beats RTN."""
    from passes.quantize import quantize_weight
    from lowering.activation_quant import quantize_act_int8_reference

    model = make_model("llama", seed=3, layers=2)
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight[:3] *= 40
        model.model.layers[1].post_attention_layernorm.weight[:2] *= 40
    ids = torch.randint(0, 96, (1, 32), generator=torch.Generator().manual_seed(0))
    cfg = make_config({"recipe": "qoq"})

    def quantized_output(qg):
        # Fake-quantize every linear in place of the FP one (A8 per token, W4 g128).
        for m in find_linears(qg):
            if m.fqn == "lm_head":
                continue
            w = qg.weight(m.weight).detach()
            qg.set_weight(m.weight, quantize_weight(w.t() if m.weight_transposed else w, cfg).dequantize().to(w.dtype))
            graph = qg.gm.graph
            with graph.inserting_before(m.node):
                q = graph.call_function(_fake_a8, (m.x,))
            m.node.replace_input_with(m.x, q)
        return run_graph(qg)

    ref_graph = capture_model(model, ids)
    ref = run_graph(ref_graph)
    rtn = quantized_output(ref_graph)
    smoothed = capture_model(model, ids)
    smooth(smoothed, find_linears(smoothed), cfg, graph_stats(smoothed), {})
    assert _rel(quantized_output(smoothed), ref) < _rel(rtn, ref)


def _fake_a8(x: torch.Tensor) -> torch.Tensor:
    from lowering.activation_quant import quantize_act_int8_reference

    x8, sx, _ = quantize_act_int8_reference(x.reshape(-1, x.shape[-1]))
    return (x8.float() * sx[:, None]).reshape(x.shape).to(x.dtype)


def test_too_few_calibration_rows_leave_the_layers_alone():
    # A decode step calibrates on one token per graph: any search would fit that token.
    model = make_model("llama", layers=1)
    qg = capture_model(model, torch.randint(0, 96, (1, 4)))
    details = {}
    smooth(qg, find_linears(qg), make_config({"recipe": "qoq"}), graph_stats(qg), details)
    assert not qg.overrides
    assert details and all(d["smooth"].startswith("skipped: fewer than 16") for d in details.values())


@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 2**16))
def test_search_scores_with_the_weights_the_recipe_will_make(seed):
    """With clip_search on a group format the candidates are scored with the grid-searched weights
    (weighted by the smoothed inputs' E[x²]), not round-to-nearest ones."""
    from lowering.activation_quant import quantize_act_int8_reference
    from passes.gptq import fake_quantize, search_grid

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 256, generator=g)
    x[:, :3] *= 20
    ws = [torch.randn(32, 256, generator=g)]
    s = x.abs().amax(0).clamp_min(1e-5).sqrt()
    xs = x / s
    x8, sx, _ = quantize_act_int8_reference(xs)
    xq = x8.float() * sx[:, None]
    ref = x @ ws[0].t()

    def err(wq):
        return float((xq @ wq.t() - ref).pow(2).sum())

    grid_cfg = make_config({"recipe": "qoq"})
    rtn_cfg = make_config({"recipe": "qoq", "clip_search": False})
    want_grid = err(search_grid(ws[0] * s, grid_cfg, xs.pow(2).mean(0))[1])
    want_rtn = err(fake_quantize(ws[0] * s, rtn_cfg))
    assert abs(fake_quant_output_error(x, ws, grid_cfg, divide=s) - want_grid) <= 1e-5 * want_grid
    assert abs(fake_quant_output_error(x, ws, rtn_cfg, divide=s) - want_rtn) <= 1e-5 * want_rtn
    assert want_grid != want_rtn
