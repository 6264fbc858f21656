"""The scale-group graph on Dynamo graphs of transformers models: Llama, Qwen2 (q/k/v bias),
GPT-2 (LayerNorm with bias, fused c_attn, Conv1D weights)."""
from __future__ import annotations

import pytest
import torch

from passes.match import find_linears
from passes.scale_groups import find_attention, find_scale_groups, scale_graph
from tests.passes.models import capture_model, make_model


def _graph(kind, **kw):
    model = make_model(kind, **kw)
    return capture_model(model, torch.randint(0, 96, (1, 12)))


def _edges(g, kind):
    return {(u, v) for u, v, d in g.edges(data=True) if d["kind"] == kind}


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_llama_style_groups(kind):
    qg = _graph(kind, layers=2, heads=4, kv_heads=2)
    linears = find_linears(qg)
    g = scale_graph(qg, linears)
    for i in range(2):
        p = f"model.layers.{i}"
        assert {(f"{p}.input_layernorm", f"{p}.self_attn.{n}_proj") for n in "qkv"} <= _edges(g, "norm")
        assert {(f"{p}.post_attention_layernorm", f"{p}.mlp.{n}_proj") for n in ("gate", "up")} <= _edges(g, "norm")
        assert (f"{p}.self_attn.v_proj", f"{p}.self_attn.o_proj") in _edges(g, "v->o")
        assert (f"{p}.mlp.up_proj", f"{p}.mlp.down_proj") in _edges(g, "up->down")
    attn = find_attention(qg, linears)
    assert len(attn) == 2
    assert all(a.rope == "rotate_half" and (a.heads, a.kv_heads, a.head_dim) == (4, 2, 16) for a in attn)
    down = next(grp for grp in find_scale_groups(qg, linears) if grp.consumers[0].fqn.endswith("0.mlp.down_proj"))
    assert [m.fqn for m in down.gates] == ["model.layers.0.mlp.gate_proj"]


def test_gqa_index_maps_query_heads_to_their_kv_head():
    qg = _graph("llama", layers=1, heads=4, kv_heads=2)
    grp = next(g for g in find_scale_groups(qg, find_linears(qg)) if g.kind == "attention-v")
    D = 16
    # o_proj channel (h, d) reads v channel (h // 2, d).
    for h in range(4):
        for d in (0, 5, 15):
            assert int(grp.index[h * D + d]) == (h // 2) * D + d


def test_gpt2_fused_qkv_and_layernorm():
    qg = _graph("gpt2", layers=1)
    linears = find_linears(qg)
    groups = {g.consumers[0].fqn: g for g in find_scale_groups(qg, linears)}
    assert groups["transformer.h.0.attn.c_attn"].kind == "norm"
    assert groups["transformer.h.0.attn.c_attn"].norm.bias is not None
    v = groups["transformer.h.0.attn.c_proj"]
    assert v.kind == "attention-v" and v.producer.fqn == "transformer.h.0.attn.c_attn" and v.row_offset == 128
    # GELU spelled out between c_fc and c_proj: no producer can absorb a factor.
    assert groups["transformer.h.0.mlp.c_proj"].kind == "none" and groups["transformer.h.0.mlp.c_proj"].reason
    (a,) = find_attention(qg, linears)
    assert (a.q_offset, a.k_offset, a.v_offset, a.rope) == (0, 64, 128, "none")


def test_tied_embedding_group_is_fixed():
    qg = _graph("llama", layers=1, tie=True)
    # The output projection reads the embedding's weight, so it is named after the embedding.
    grp = next(g for g in find_scale_groups(qg, find_linears(qg)) if g.consumers[0].fqn == "model.embed_tokens")
    assert grp.kind == "fixed" and "tied" in grp.reason
