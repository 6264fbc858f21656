"""Every named recipe compiles through backend="qoq" and emits its ops: SVDQuant (W4A4 + low-rank,
W4A8 + low-rank) and QoQ with the KV4 cache on a static-cache Llama."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from runtime.registry import graphs_for


@pytest.mark.parametrize("recipe,ops,bound", [
    ("svdquant", {"qoq.w4a4_quantize_act", "qoq.w4a4_gemm"}, 0.15),  # measured 0.098
    ("w4a8-svd", {"qoq.quantize_act_int8", "qoq.w4a8_gemm"}, 0.12),  # measured 0.071
])
def test_svdquant_recipes(recipe, ops, bound):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 256), nn.GELU(), nn.Linear(256, 128)).eval()
    x = torch.randn(2, 8, 128)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="qoq", options={"recipe": recipe, "inductor": False, "kernels": "reference"})
    with torch.no_grad():
        y, ref = compiled(x), model(x)
    assert float((y - ref).norm() / ref.norm()) < bound
    rec = graphs_for(compiled)[-1]
    assert set(rec.qoq_ops) == ops


def test_qoq_recipe_rewrites_the_static_cache_to_kv4():
    from transformers import LlamaConfig, LlamaForCausalLM, StaticCache

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
    cache = StaticCache(cfg, max_cache_len=32)
    cache.early_initialization(batch_size=1, num_heads=2, head_dim=16, dtype=torch.float32, device="cpu")
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="qoq", fullgraph=True,
                             options={"recipe": "qoq", "inductor": False, "kernels": "reference"})
    with torch.no_grad():
        out = compiled(ids, past_key_values=cache, cache_position=torch.arange(12)).logits
    rec = graphs_for(compiled)[-1]
    assert rec.qoq_ops.get("qoq.kv4_cache_append") == 2 and rec.qoq_ops.get("qoq.kv4_cache_attention") == 2
    cos = torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0)
    assert float(cos) > 0.9
