"""Residual-stream rotation keeps the FP output of RMSNorm models (tied embeddings too) and leaves
LayerNorm models alone, saying why."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from passes.match import find_linears
from passes.rotate import rotate, rotation_matrix
from qcompile.config import make_config
from tests.passes.models import capture_model, graph_stats, make_model, run_graph


@given(n=st.sampled_from([8, 12, 48, 64, 96, 576]), seed=st.integers(0, 100))
def test_rotation_is_orthogonal(n, seed):
    q = rotation_matrix(n, seed)
    assert torch.allclose(q @ q.t(), torch.eye(n), atol=1e-5)


@settings(max_examples=6)
@given(kind=st.sampled_from(["llama", "qwen2"]), tie=st.booleans(), hidden=st.sampled_from([48, 64]),
       seed=st.integers(0, 2**16))
def test_rotate_keeps_the_fp_output(kind, tie, hidden, seed):
    model = make_model(kind, hidden=hidden, tie=tie, seed=seed)
    qg = capture_model(model, torch.randint(0, 96, (1, 16), generator=torch.Generator().manual_seed(seed)))
    ref = run_graph(qg)
    emb = next(qg.weight(n) for n in qg.gm.graph.nodes if n.op == "placeholder" and qg.weight_ref(n) is not None
               and qg.weight_ref(n).fqn.endswith("embed_tokens.weight")).clone()
    details = {}
    rotate(qg, find_linears(qg), make_config({"recipe": "qoq", "rotate": True}), graph_stats(qg), details)
    assert details["model.layers.0.self_attn.o_proj"]["rotate"] == "output rotated"
    assert details["model.layers.1.mlp.up_proj"]["rotate"].startswith("input rotated")
    new_emb = next(v for k, v in qg.overrides.items() if qg.weights[k].fqn.endswith("embed_tokens.weight"))
    assert not torch.allclose(new_emb, emb)
    assert float((run_graph(qg) - ref).norm() / ref.norm()) < 1e-4


def test_rotation_spreads_outlier_channels():
    model = make_model("llama", hidden=64, seed=0, layers=1)
    with torch.no_grad():
        model.model.layers[0].post_attention_layernorm.weight[3] = 50.0
    qg = capture_model(model, torch.randint(0, 96, (1, 32)))
    stats = graph_stats(qg)
    before = stats.get("model.layers.0.mlp.up_proj").absmax.clone()
    rotate(qg, find_linears(qg), make_config({"recipe": "qoq"}), stats, {})
    after = stats.get("model.layers.0.mlp.up_proj").absmax
    assert after.max() / after.median() < 0.5 * before.max() / before.median()


def test_layernorm_models_are_left_alone_with_a_reason():
    model = make_model("gpt2")
    qg = capture_model(model, torch.randint(0, 96, (1, 16)))
    details = {}
    rotate(qg, find_linears(qg), make_config({"recipe": "qoq"}), graph_stats(qg), details)
    assert not qg.overrides
    assert all(d["rotate"].startswith("skipped: ") for d in details.values())


def _tiny_llama(tie: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("tie", [True, False])
def test_a_later_graph_of_the_model_replays_the_rotated_rewrite(tie, monkeypatch):
    """A decode step (one token) compiles a second graph: it must replay the first graph's rotated and
    quantized weights, the tied lm_head's rotated copy included, not calibrate on its own input."""
    import qcompile.backend as qb
    from runtime.registry import graphs_for

    calls = []
    real = qb.calibrate_graph
    monkeypatch.setattr(qb, "calibrate_graph", lambda *a: calls.append(1) or real(*a))
    lm = _tiny_llama(tie)
    torch._dynamo.reset()
    compiled = torch.compile(lm, backend="qoq", options={"rotate": True, "kernels": "reference", "inductor": False})
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        first = compiled(ids).logits
        one = compiled(ids[:1, :1]).logits
        ref = lm(ids).logits
    graphs = graphs_for(compiled)
    assert len(graphs) == 2 and len(calls) == 1
    later = graphs[-1].layers
    assert sum(layer.quantized for layer in later) == 14
    assert all("rotate" in layer.details and "earlier graph" in layer.details["source"] for layer in later if layer.quantized)
    lm_head = [layer for layer in later if not layer.quantized]
    assert len(lm_head) == 1 and ("tied" in lm_head[0].reason) == tie
    # the same quantized function in both graphs (rows and positions do not interact before attention)
    torch.testing.assert_close(one[0, 0], first[0, 0], rtol=1e-4, atol=1e-4)
    assert float((first - ref).norm() / ref.norm()) < 0.2  # and still the model
