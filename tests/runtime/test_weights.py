"""Releasing FP weights after quantization: storage freed, no recompile from the guards, a later
recompile reuses the quantized weights (no calibration, same numbers), and the report still works."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import qcompile
from runtime.weights import is_released, release, storage_bytes

_OPTS = {"inductor": False, "kernels": "reference", "release_fp_weights": True}


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(64, 96)
        self.b = nn.Linear(96, 32)
        self.head = nn.Linear(32, 8)  # kept in FP by skip_layers below: its storage must stay

    def forward(self, x):
        return self.head(torch.relu(self.b(torch.relu(self.a(x)))))


def test_release_frees_storage_keeps_guards_and_recompiles_from_the_record(monkeypatch):
    import passes.quantize as pq
    import qcompile.backend as qb

    torch.manual_seed(0)
    net = _Net().eval()
    ref_net = _Net().eval()
    ref_net.load_state_dict(net.state_dict())
    torch._dynamo.reset()
    compiled = torch.compile(net, backend="qoq", options=dict(_OPTS, skip_layers=["head"]))
    reference = torch.compile(ref_net, backend="qoq", options=dict(_OPTS, release_fp_weights=False, skip_layers=["head"]))
    x = torch.randn(4, 64)
    with torch.no_grad():
        y = compiled(x)
        assert torch.equal(y, reference(x))
    assert is_released(net.a.weight) and is_released(net.b.weight)
    assert net.a.weight.shape == (96, 64)  # the object and its metadata stay: guards hold
    assert not is_released(net.head.weight) and not is_released(net.a.bias)
    assert storage_bytes([net.a.weight, net.b.weight]) == 0

    from torch._dynamo.utils import counters

    frames = counters["stats"]["unique_graphs"]
    with torch.no_grad():
        compiled(torch.randn(4, 64))  # same shape: no recompile, the released weights pass the guards
    assert counters["stats"]["unique_graphs"] == frames

    def boom(*a, **k):
        raise AssertionError("a recompile after release calibrated or quantized again")

    xs = [torch.randn(3, 5, 64), torch.randn(7, 64)]
    with torch.no_grad():
        wants = [reference(x) for x in xs]  # the unreleased twin compiles these shapes the usual way
    monkeypatch.setattr(pq, "quantize_weight", boom)
    monkeypatch.setattr(qb, "calibrate_graph", boom)
    for x, want in zip(xs, wants):  # new shapes: recompiles replay the recorded rewrite
        with torch.no_grad():
            assert torch.equal(compiled(x), want)
    rep = qcompile.report(compiled)
    assert len(rep.graphs) >= 2
    released = [layer for layer in rep.layers if layer.details.get("fp_weight") == "released"]
    assert {layer.name for layer in released} == {"a", "b"}
    assert all(layer.sqnr_db is not None for layer in rep.layers if layer.quantized)
    assert "head" in str(rep)


def test_release_is_off_by_default_and_the_fp_model_still_runs():
    torch.manual_seed(0)
    net = _Net().eval()
    torch._dynamo.reset()
    compiled = torch.compile(net, backend="qoq", options={"inductor": False, "kernels": "reference"})
    x = torch.randn(2, 64)
    with torch.no_grad():
        compiled(x)
        net(x)  # eager FP still works
    assert not is_released(net.a.weight)


def test_views_and_shared_storage_are_not_released():
    base = torch.randn(8, 4)
    view = base[:4]
    assert "shared" in release(view) and not is_released(base)
    t = torch.randn(4, 4)
    assert release(t) == "" and is_released(t) and release(t) == ""  # releasing twice is harmless


def test_released_weights_with_a_model_saved_later(tmp_path):
    torch.manual_seed(0)
    net = _Net().eval()
    torch._dynamo.reset()
    compiled = torch.compile(net, backend="qoq", options=dict(_OPTS, skip_layers=["head"]))
    x = torch.randn(4, 64)
    with torch.no_grad():
        y = compiled(x)
    qcompile.save(compiled, str(tmp_path / "a"))  # the packed weights are what is saved, not the FP ones
    fresh = _Net().eval()
    fresh.load_state_dict({k: v for k, v in net.state_dict().items() if not is_released(v)}, strict=False)
    torch._dynamo.reset()
    again = torch.compile(fresh, backend="qoq", options={"artifact": str(tmp_path / "a"), "inductor": False,
                                                       "kernels": "reference"})
    with torch.no_grad():
        assert torch.equal(again(x), y)


@pytest.mark.cuda
def test_quantized_layer_memory_is_within_10_percent_of_packed_size():
    torch.manual_seed(0)
    layers = nn.Sequential(*[nn.Linear(1024, 1024, bias=False) for _ in range(4)]).cuda().half().eval()
    torch.cuda.synchronize()
    torch._dynamo.reset()
    compiled = torch.compile(layers, backend="qoq", options={"release_fp_weights": True, "inductor": False})
    with torch.no_grad():
        compiled(torch.randn(8, 1024, device="cuda", dtype=torch.half))
    from passes.quantize import _CACHE

    packed = sum(qw.nbytes for p in layers.parameters() for qw in _CACHE.get(p, {}).values())
    assert packed > 0
    held = storage_bytes(p for p in layers.parameters()) + packed
    assert held <= 1.10 * packed
