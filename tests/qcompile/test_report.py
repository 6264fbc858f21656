"""`qcompile.report`: per-layer rows (format, group, rank, smoothing, KV bits, kernel, SQNR), FP layers
with their reason, the dict form, and graphs left in FP by a failing pass or Inductor."""
from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn as nn

import qcompile
from lowering.activation_quant import quantize_act_int8_reference
from passes.quantize import quantize_per_channel
from qcompile.fallback import QoQFallbackWarning, reset_warnings
from qcompile.reporting import Report, smoothing
from runtime.registry import LayerRecord

_OPTS = {"inductor": False, "kernels": "reference"}


class _TiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(40, 32)
        self.up = nn.Linear(32, 48)
        self.down = nn.Linear(48, 32, bias=False)
        self.gate = nn.Linear(32, 32)
        self.head = nn.Linear(32, 40, bias=False)
        self.head.weight = self.emb.weight  # tied: the head reads the embedding table

    def forward(self, ids):
        h = self.emb(ids)
        h = h + self.down(torch.relu(self.up(h)))
        return self.head(self.gate(h))


def _compiled(options: dict):
    torch.manual_seed(0)
    model = _TiedLM().eval()
    ids = torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(1))
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="qoq", options=options)
    with torch.no_grad():
        out = compiled(ids)
    return model, compiled, ids, out


def test_rows_formats_reasons_and_measured_sqnr():
    model, compiled, ids, _ = _compiled({**_OPTS, "recipe": "w4a8", "skip_layers": ["gate"]})
    rep = qcompile.report(compiled)
    by = {layer.name: layer for layer in rep.layers}
    assert set(by) == {"up", "down", "gate", "emb"}  # the tied head is reported under the table's own FQN
    assert by["up"].quantized and by["up"].format == "w4a8_per_channel" and by["up"].group_size == -1
    assert "skip_layers pattern 'gate'" in by["gate"].reason and not by["gate"].quantized
    assert "embedding" in by["emb"].reason and not by["emb"].quantized
    # SQNR of `up` recomputed here from its input rows (the embeddings) and the reference formats.
    x = model.emb(ids).reshape(-1, 32).float()
    ref = x @ model.up.weight.t()
    x8, sx, _ = quantize_act_int8_reference(x)
    out = (x8.float() * sx[:, None]) @ quantize_per_channel(model.up.weight).dequantize().t()
    want = 10 * torch.log10(ref.pow(2).sum() / (out - ref).pow(2).sum())
    assert by["up"].sqnr_db == pytest.approx(float(want), abs=0.05)
    text = str(rep)
    assert "per-ch" in text and "FP: skipped by skip_layers pattern 'gate'" in text
    assert "qoq.w4a8_gemm x2" in text  # up and down


def test_dict_is_json_and_round_trips():
    _, compiled, _, _ = _compiled(dict(_OPTS))
    rep = qcompile.report(compiled)
    data = json.loads(rep.to_json())
    assert data == json.loads(json.dumps(rep.to_dict(), default=str))
    layer = next(g for g in data["graphs"])["layers"][0]
    assert {"name", "format", "group_size", "kernel", "reason", "sqnr_db", "details"} <= set(layer)
    again = Report.from_dict(data)
    assert str(again) == str(rep)


def test_columns_from_pass_details():
    layer = LayerRecord(name="blocks.0.attn.qkv", kind="linear", shape=(96, 32), quantized=True, format="w4a4_g64+lowrank",
                        group_size=64, kernel="qoq.w4a4_gemm (triton)", sqnr_db=21.5,
                        details={"rank": 32, "alpha": 0.5, "smooth": "into norm1.weight", "smooth_attention": "alpha=0.5",
                                 "reorder": "skipped: no calibration statistics", "gptq": True, "kv_bits": 4})
    assert smoothing(layer) == "svd-smooth a=0.50,smooth,sattn,gptq"
    row = str(Report([qcompile_graph(layer)])).splitlines()[-1]
    cells = row.split()
    assert cells[:7] == ["blocks.0.attn.qkv", "linear", "96x32", "w4a4_g64+lowrank", "64", "32", "svd-smooth"]
    assert "21.50" in row and " 4 " in row and "reorder" not in row
    plain = LayerRecord(name="x", kind="linear", shape=(4, 4), quantized=True, details={"smooth": "none (no factor lowered the error)"})
    assert smoothing(plain) == "-"


def qcompile_graph(layer):
    from runtime.registry import GraphRecord

    return GraphRecord(graph_id=7, recipe="svdquant", layers=[layer])


def test_report_of_a_model_never_compiled():
    assert "no graph compiled" in str(qcompile.report(nn.Linear(4, 4)))


def _failing_quantize(*args, **kwargs):
    raise RuntimeError("synthetic pattern the pass cannot handle")


def test_failing_pass_leaves_graph_fp_warns_once_and_reports(monkeypatch):
    import passes.manager

    monkeypatch.setattr(passes.manager, "quantize_linears", _failing_quantize)
    monkeypatch.delenv("QOQ_STRICT", raising=False)
    reset_warnings()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, compiled, ids, out = _compiled(dict(_OPTS))
        _compiled(dict(_OPTS))  # a second compile with the same failure: no second warning
    fallbacks = [w for w in caught if issubclass(w.category, QoQFallbackWarning)]
    assert len(fallbacks) == 1 and "pass 'quantize' failed" in str(fallbacks[0].message)
    torch.testing.assert_close(out, model(ids), rtol=0, atol=0)  # the FP graph, unchanged
    rep = qcompile.report(compiled)
    g = rep.graphs[-1]
    assert "synthetic pattern" in g.fallback and g.qoq_ops == {}
    assert len(g.layers) == 4 and all(not layer.quantized and "graph left in FP" in layer.reason for layer in g.layers)
    assert "whole graph left in FP: pass 'quantize' failed: RuntimeError: synthetic" in str(rep)


@pytest.mark.parametrize("how", ["option", "env"])
def test_strict_raises_instead(monkeypatch, how):
    import passes.manager

    monkeypatch.setattr(passes.manager, "quantize_linears", _failing_quantize)
    options = dict(_OPTS)
    if how == "option":
        options["strict"] = True
    else:
        monkeypatch.setenv("QOQ_STRICT", "1")
    with pytest.raises(Exception, match="synthetic pattern"):
        _compiled(options)


def test_inductor_failure_on_the_quantized_graph_falls_back_to_fp(monkeypatch):
    import torch._inductor.compile_fx as cfx

    real = cfx.compile_fx
    seen = []

    def picky(gm, inputs, **kw):
        has_qoq = any(str(n.target).startswith("qoq.") for n in gm.graph.nodes)
        seen.append(has_qoq)
        if has_qoq:
            raise NotImplementedError("synthetic: no lowering for qoq ops")
        return real(gm, inputs, **kw)

    monkeypatch.setattr(cfx, "compile_fx", picky)
    monkeypatch.delenv("QOQ_STRICT", raising=False)
    reset_warnings()
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        model, compiled, ids, out = _compiled({"kernels": "reference"})
    assert seen == [True, False]
    torch.testing.assert_close(out, model(ids))
    assert "pass 'inductor' failed: NotImplementedError" in qcompile.report(compiled).graphs[-1].fallback


def test_failing_default_calibration_quantizes_without_statistics(monkeypatch):
    import qcompile.backend

    def broken(*args, **kwargs):
        raise RuntimeError("synthetic: the graph cannot run on its example inputs")

    monkeypatch.setattr(qcompile.backend, "calibrate_graph", broken)
    monkeypatch.delenv("QOQ_STRICT", raising=False)
    reset_warnings()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, compiled, ids, out = _compiled({**_OPTS, "skip_layers": []})
    assert any("calibrate on example inputs" in str(w.message) for w in caught)
    layers = qcompile.report(compiled).graphs[-1].layers
    assert [layer.name for layer in layers if layer.quantized] == ["up", "down", "gate"]
    assert all(layer.sqnr_db is None for layer in layers)
    rel = float((out - model(ids)).norm() / model(ids).norm())
    assert rel < 0.2  # round-to-nearest W4A8 on this model: 0.064 measured


def test_weights_outside_linear_layers_are_reported_in_fp():
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(32, 4, batch_first=True)  # fused: in_proj inside one op
            self.scale = nn.Parameter(torch.randn(32, 32))  # a weight computed at run time
            self.emb = nn.Embedding(10, 32)  # looked up, not multiplied: not a layer
            self.out = nn.Linear(32, 16)

        def forward(self, ids):
            h = self.emb(ids)
            h = self.attn(h, h, h, need_weights=False)[0]
            return self.out(torch.nn.functional.linear(h, self.scale * 0.5))

    torch.manual_seed(0)
    model = Mixed().eval()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="qoq", options=dict(_OPTS))
    with torch.no_grad():
        compiled(torch.randint(0, 10, (2, 5)))
    rows = {layer.name: layer for layer in qcompile.report(compiled).layers}
    assert rows["out"].quantized
    assert rows["scale"].kind == "other" and "read by mul" in rows["scale"].reason
    attn = [r for name, r in rows.items() if name.startswith("attn.")]
    assert attn and all(not r.quantized and r.reason.startswith("read by ") for r in attn)
    assert "emb.weight" not in rows and "emb" not in rows


def test_one_layer_that_cannot_be_lowered_stays_fp_alone(monkeypatch):
    import passes.manager

    real = passes.manager.lower_w4a8_linear

    def picky(qgraph, decision, config):
        if decision.match.fqn == "down":
            with qgraph.gm.graph.inserting_before(decision.match.node):  # a half-done rewrite, then a failure
                qgraph.gm.graph.call_function(torch.relu, (decision.match.x,))
            raise ValueError("synthetic: a layout this lowering cannot express")
        return real(qgraph, decision, config)

    monkeypatch.setattr(passes.manager, "lower_w4a8_linear", picky)
    monkeypatch.delenv("QOQ_STRICT", raising=False)
    reset_warnings()
    with pytest.warns(QoQFallbackWarning, match="layer 'down' was left in FP because pass 'lower' failed"):
        # w4a8-g128: the expected output below is plain round-to-nearest
        model, compiled, ids, out = _compiled({**_OPTS, "recipe": "w4a8-g128", "skip_layers": []})
    rows = {layer.name: layer for layer in qcompile.report(compiled).layers}
    assert not rows["down"].quantized and "synthetic" in rows["down"].reason and rows["down"].sqnr_db is None
    assert rows["up"].quantized and rows["gate"].quantized
    g = qcompile.report(compiled).graphs[-1]
    assert g.fallback == "" and g.qoq_ops["qoq.w4a8_gemm"] == 2
    with torch.no_grad():  # what it computes: up and gate quantized, down in FP
        h = model.emb(ids)
        from passes.quantize import quantize_progressive

        def fq(layer, x):
            x8, sx, _ = quantize_act_int8_reference(x)
            y = (x8.float() * sx[..., None]) @ quantize_progressive(layer.weight, 128).dequantize().t()
            return y + layer.bias if layer.bias is not None else y
        h = h + model.down(torch.relu(fq(model.up, h)))
        want = model.head(fq(model.gate, h))
    torch.testing.assert_close(out, want, rtol=1e-3, atol=1e-3)
