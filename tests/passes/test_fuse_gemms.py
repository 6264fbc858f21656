"""Horizontal W4A8 GEMM fusion: same numbers as the separate GEMMs, fewer launches, artifacts unchanged."""
from __future__ import annotations

import gc
import weakref

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import passes.fuse_gemms as fg
import qcompile
from passes.fuse_gemms import concat_rows
from tests.passes.models import make_model

# The torch reference kernels compute each output column from its own weight row, like the Triton
# kernels: what is tested here is the graph rewrite, not the kernels.
_FAST = {"kernels": "reference", "inductor": False}


def _ids(batch: int = 2, seq: int = 12, vocab: int = 96) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(3))


def _run(model, options):
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="qoq", options=dict(_FAST, **options))
    with torch.no_grad():
        return compiled, compiled(_ids(), use_cache=False).logits


@pytest.mark.parametrize("kind,recipe", [("llama", "w4a8-g128"), ("qwen2", "w4a8-g128"), ("llama", "qoq"),
                                         ("qwen2", "qoq-chn"), ("qwen2", "w4a8-svd")])
def test_fused_gemms_give_the_unfused_outputs_bit_for_bit(kind, recipe):
    """q/k/v and gate/up become one GEMM each (qwen2: biases added after the slices; qoq: the
    reorder gathers and smoothing scales before each quantization are equal, so they merge too;
    w4a8-svd: each layer's low-rank branch reads the FP input and is added to its own slice)."""
    _, want = _run(make_model(kind), {"recipe": recipe, "fuse_gemms": False})
    compiled, got = _run(make_model(kind), {"recipe": recipe})
    assert torch.equal(got, want)
    rep = qcompile.report(compiled)
    assert rep.graphs[0].qoq_ops["qoq.w4a8_gemm"] == 4 * 2  # 2 layers: qkv, o, gate/up, down
    fused = {layer.name: layer.details.get("fused_gemm") for layer in rep.layers if layer.quantized}
    assert fused["model.layers.0.self_attn.q_proj"] == (
        "model.layers.0.self_attn.q_proj+model.layers.0.self_attn.k_proj+model.layers.0.self_attn.v_proj")
    assert fused["model.layers.1.mlp.up_proj"] == fused["model.layers.1.mlp.gate_proj"]
    assert fused["model.layers.1.self_attn.o_proj"] is None and fused["model.layers.1.mlp.down_proj"] is None


def test_fuse_gemms_false_keeps_one_gemm_per_layer():
    compiled, _ = _run(make_model("llama"), {"recipe": "w4a8-g128", "fuse_gemms": False})
    assert qcompile.report(compiled).graphs[0].qoq_ops["qoq.w4a8_gemm"] == 7 * 2


def test_record_points_into_the_fused_buffers_and_the_artifact_replays_bit_identical(tmp_path, monkeypatch):
    seen = []
    real = fg.fuse_gemms

    def spy(qgraph, record_tensors=None):
        result = real(qgraph, record_tensors)
        seen.append((qgraph, record_tensors))
        return result

    monkeypatch.setattr(fg, "fuse_gemms", spy)
    compiled, want = _run(make_model("llama"), {"recipe": "w4a8-g128"})
    _, tensors = seen[0]
    q = tensors["model.layers.0.self_attn.q_proj.qweight"]
    k = tensors["model.layers.0.self_attn.k_proj.qweight"]
    # one buffer, k's rows right after q's: the record holds no second copy of the weights
    assert q.untyped_storage().data_ptr() == k.untyped_storage().data_ptr()
    assert k.storage_offset() == q.storage_offset() + q.numel()
    qcompile.save(compiled, str(tmp_path / "a"))

    for fuse in (True, False):  # the artifact keeps per-layer tensors: it replays fused or not
        seen.clear()
        compiled, got = _run(make_model("llama"), {"artifact": str(tmp_path / "a"), "fuse_gemms": fuse})
        assert torch.equal(got, want)
        assert qcompile.report(compiled).graphs[0].qoq_ops["qoq.w4a8_gemm"] == (8 if fuse else 14)


@pytest.mark.parametrize("recipe", ["w4a8-g128", "w4a8-svd"])
def test_the_per_layer_tensors_a_fusion_replaces_are_freed(monkeypatch, recipe):
    """Once a group is fused, the graph holds the fused buffers and nothing keeps the per-layer
    packed weights, scales or L_up it concatenated alive (neither the record nor the pass): the
    weights take their packed size once, not twice."""
    from qcompile.capture import QGraph

    refs, modules = [], []
    add_constant, fuse = QGraph.add_constant, fg.fuse_gemms

    def recording_add_constant(qgraph, stem, value, before):
        refs.append(weakref.ref(value))
        return add_constant(qgraph, stem, value, before)

    def spy(qgraph, record_tensors=None):
        modules.append(qgraph.gm)  # not the QGraph: it lives as long as the compile, not the graph
        return fuse(qgraph, record_tensors)

    monkeypatch.setattr(QGraph, "add_constant", recording_add_constant)
    monkeypatch.setattr(fg, "fuse_gemms", spy)
    compiled, _ = _run(make_model("qwen2"), {"recipe": recipe})
    gc.collect()
    held = {id(t) for t in modules[0].buffers()}
    alive = [t for t in (r() for r in refs) if t is not None]
    assert len(alive) < len(refs)  # the fusion dropped the groups' per-layer constants...
    assert all(id(t) in held for t in alive)  # ...and every constant still alive is one the graph reads


@settings(max_examples=30, deadline=None)
@given(rows=st.lists(st.integers(1, 5), min_size=1, max_size=4), cols=st.integers(1, 4), adjacent=st.booleans())
def test_concat_rows_is_torch_cat_and_a_view_when_the_parts_lie_back_to_back(rows, cols, adjacent):
    total = sum(rows)
    base = torch.arange(total * cols * 2, dtype=torch.int32).reshape(2 * total, cols)
    if adjacent:
        parts = list(base[:total].split(rows))
    else:  # every part from a different place: a copy is the only way
        parts = [torch.full((r, cols), i, dtype=torch.int32) for i, r in enumerate(rows)]
    got = concat_rows(parts)
    assert torch.equal(got, torch.cat(parts))
    shares = got.untyped_storage().data_ptr() == parts[0].untyped_storage().data_ptr()
    assert shares == (adjacent or len(parts) == 1)  # one contiguous part is its own view
