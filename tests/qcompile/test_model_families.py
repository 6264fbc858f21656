"""The default recipe through torch.compile on small configs of other transformers families than the
Llama / Qwen2 / GPT-2 the pass tests use: partial rotary (Phi, GPT-NeoX), fused q/k/v and gate/up
(Phi-3, with head_dim 24, which has no Hadamard), q/k norms (Qwen3), half precision. Each compiles,
runs prefill and a decode step over a static cache with KV4 in both graphs, and every layer left in FP
says why."""
from __future__ import annotations

import pytest
import torch
import transformers as tf
from transformers import StaticCache

import qcompile


def _model(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    common = dict(vocab_size=96, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    if kind == "phi":
        return tf.PhiForCausalLM(tf.PhiConfig(hidden_size=64, partial_rotary_factor=0.5, **common))
    if kind == "gpt-neox":
        return tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(hidden_size=64, rotary_pct=0.25, **common))
    if kind == "phi3-bf16":
        return tf.Phi3ForCausalLM(tf.Phi3Config(hidden_size=96, num_key_value_heads=2, pad_token_id=0,
                                                **common)).to(torch.bfloat16)
    if kind == "qwen3-bf16":
        return tf.Qwen3ForCausalLM(tf.Qwen3Config(hidden_size=64, num_key_value_heads=2, head_dim=16,
                                                  **common)).to(torch.bfloat16)
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["phi", "gpt-neox", "phi3-bf16", "qwen3-bf16"])
def test_default_recipe_on_other_families(kind):
    model = _model(kind).eval()
    cfg = model.config
    dtype = next(model.parameters()).dtype
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    cache = StaticCache(cfg, max_cache_len=24)
    cache.early_initialization(batch_size=1, num_heads=kv_heads, head_dim=head_dim, dtype=dtype, device="cpu")
    ids = torch.randint(0, 96, (1, 8), generator=torch.Generator().manual_seed(1))
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="qoq", options={"kernels": "reference", "inductor": False})
    with torch.no_grad():
        want = model(ids).logits.float()
        got = compiled(ids, past_key_values=cache).logits.float()
        step = compiled(got[:, -1:].argmax(-1), past_key_values=cache).logits.float()
    assert torch.isfinite(got).all() and torch.isfinite(step).all()
    assert float((got - want).norm() / want.norm()) < 0.5  # W4A8KV4 on random weights, not a wrong graph
    report = qcompile.report(model)
    assert len(report.graphs) == 2
    for graph in report.graphs:  # prefill and decode: both attentions over the 4-bit cache
        assert dict(graph.qoq_ops).get("qoq.kv4_cache_attention") == 2, dict(graph.qoq_ops)
    assert all(layer.reason for layer in report.layers if not layer.quantized)
    assert sum(layer.quantized and layer.kind != "attention" for layer in report.layers) >= 8
