"""SmoothAttention keeps the FP output, shares λ across RoPE pairs and GQA groups, and flattens
K's outlier channels."""
from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from passes.match import find_linears
from passes.scale_groups import find_attention, linear_weight
from passes.smooth_attention import key_magnitude, smooth_attention
from qcompile.config import make_config
from tests.passes.models import capture_model, graph_stats, make_model, run_graph


@settings(max_examples=6)
@given(kind=st.sampled_from(["llama", "qwen2", "gpt2"]), seed=st.integers(0, 2**16),
       kv_heads=st.sampled_from([1, 2, 4]), alpha=st.sampled_from([0.3, 0.5, 1.0]))
def test_smooth_attention_keeps_the_fp_output(kind, seed, kv_heads, alpha):
    model = make_model(kind, seed=seed, kv_heads=kv_heads)
    with torch.no_grad():  # outlier K channels, so λ is far from 1
        for name, p in model.named_parameters():
            if name.endswith(("k_proj.weight", "c_attn.weight")):
                p[:4].mul_(20) if p.shape[0] != 64 else p[:, 64:68].mul_(20)
    qg = capture_model(model, torch.randint(0, 96, (1, 16), generator=torch.Generator().manual_seed(seed)))
    ref = run_graph(qg)
    details = {}
    smooth_attention(qg, find_linears(qg), make_config({"recipe": "qoq", "smooth_attention_alpha": alpha}),
                     graph_stats(qg), details)
    assert details and all("lambda_max" in str(d) for d in details.values()), details
    out = run_graph(qg)
    assert float((out - ref).norm() / ref.norm()) < 1e-4


def test_lambda_shared_by_rope_pairs_and_gqa_heads_and_flattens_k():
    model = make_model("llama", seed=1, layers=1, heads=4, kv_heads=2)
    with torch.no_grad():
        model.model.layers[0].self_attn.k_proj.weight[3] *= 30  # one outlier channel of kv head 0
    qg = capture_model(model, torch.randint(0, 96, (1, 32), generator=torch.Generator().manual_seed(0)))
    stats = graph_stats(qg)
    (a,) = find_attention(qg, find_linears(qg))
    x = stats.get(a.k.fqn).samples
    wq0, wk0 = linear_weight(qg, a.q).clone(), linear_weight(qg, a.k).clone()
    before = key_magnitude(x @ wk0.t(), 16, "rotate_half")
    smooth_attention(qg, find_linears(qg), make_config({"recipe": "qoq"}), stats, {})
    wq1, wk1 = linear_weight(qg, a.q), linear_weight(qg, a.k)
    lam = (wk0.norm(dim=1) / wk1.norm(dim=1))  # k rows were divided by λ
    lam_q = (wq1.norm(dim=1) / wq0.norm(dim=1))  # q rows multiplied by λ
    assert torch.allclose(lam.view(2, 2, 8)[:, 0], lam.view(2, 2, 8)[:, 1], rtol=1e-5)  # pairs (i, i + 8)
    assert torch.allclose(lam_q.view(4, 16), lam.view(2, 16).repeat_interleave(2, dim=0), rtol=1e-5)  # GQA
    assert torch.allclose(lam, before.sqrt(), rtol=1e-4)
    after = key_magnitude(x @ wk1.t(), 16, "rotate_half")
    assert after.max() / after.min() < (before.max() / before.min()) ** 0.5 * 1.01  # spread halves (α = 0.5)


@settings(max_examples=3, deadline=None)
@given(kind=st.sampled_from(["llama", "qwen2"]), seed=st.integers(0, 2**16), kv_heads=st.sampled_from([1, 2]))
def test_smooth_attention_through_a_static_cache_keeps_prefill_and_decode(kind, seed, kv_heads):
    """With a StaticCache, K reaches SDPA through the cache write: λ is still found and folded, and every
    graph (prefill, decode) given the same statistics folds the same λ, so cached keys stay consistent."""
    from transformers import StaticCache

    from qcompile.capture import capture

    model = make_model(kind, seed=seed, kv_heads=kv_heads)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("k_proj.weight"):
                p[:4].mul_(20)
    caches = []
    for _ in range(2):
        c = StaticCache(model.config, max_cache_len=24)
        c.early_initialization(batch_size=1, num_heads=kv_heads, head_dim=16, dtype=torch.float32, device="cpu")
        caches.append(c)
    seen, shared = [], {}

    def backend(gm, example_inputs):
        qg = capture(gm, example_inputs)
        stats = shared.setdefault("stats", graph_stats(qg))  # the prefill's, for every graph
        details = {}
        smooth_attention(qg, find_linears(qg), make_config({"recipe": "qoq"}), stats, details)
        seen.append(details)
        qg.materialize_overrides()
        qg.gm.recompile()
        return qg.gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    nxt = torch.randint(0, 96, (1, 16), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        for _ in range(3):
            a = compiled(nxt, past_key_values=caches[0]).logits
            b = model(nxt, past_key_values=caches[1]).logits
            assert float((a - b).norm() / b.norm()) < 1e-4
            nxt = b[:, -1:].argmax(-1)
    assert len(seen) >= 2 and all(any("lambda_max" in str(d) for d in s.values()) for s in seen), seen
