"""passes/kv_cache: static-cache writes + SDPA -> qoq.kv4_cache_append / qoq.kv4_cache_attention, on Dynamo graphs of
a small transformers Llama with StaticCache and of small functions in each write/GQA spelling."""
from __future__ import annotations

import gc
import weakref
from unittest.mock import patch

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM, StaticCache

from lowering.kv4_append import kv4_alloc, kv4_append
from lowering.kv4_attention import kv4_attention
from passes.kv_cache import kv_cache
from qcompile.capture import capture
import lowering.kv4_cache as kv4_cache_ops
from runtime.kv_cache import KV4Cache, kv4_buffers_for, kv4_buffers_of

L = 32
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: Triton runs under the interpreter (conftest)


def _llama(layers: int = 2) -> LlamaForCausalLM:
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


class _Backend:
    """A torch.compile backend that runs the KV-cache pass and keeps what it did."""

    def __init__(self, kernels: str = "reference", inductor: bool = False, **options):
        self.kernels, self.inductor, self.options = kernels, inductor, options
        self.results, self.graphs = [], []

    def __call__(self, gm, example_inputs):
        qgraph = capture(gm, example_inputs)
        self.results.append(kv_cache(qgraph, kernels=self.kernels, **self.options))
        self.graphs.append(qgraph.gm)
        if self.inductor:
            from qcompile.fallback import inductor_compile

            return inductor_compile(qgraph.gm, example_inputs)
        return qgraph.gm.forward


def _run_llama(backend: _Backend, steps: int = 3, batch: int = 2, prompt: int = 7, sequences: int = 1,
               device: str = "cpu"):
    """Prefill + greedy decode through the compiled model (StaticCache) and the eager model (KV4Cache);
    with sequences > 1, the StaticCache is reset between them, as between two `generate` calls."""
    model = _llama().to(device)
    cache = StaticCache(model.config, max_cache_len=L)
    # the cache tensors must be graph inputs from the first (prefill) graph on, as for any compiled prefill
    cache.early_initialization(batch_size=batch, num_heads=2, head_dim=16, dtype=torch.float32, device=device)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    diffs = []
    for seq in range(sequences):
        if seq:
            cache.reset()
        eager_cache = KV4Cache(model.config, L, kernels="reference")
        ids = torch.randint(0, 256, (batch, prompt - seq), generator=torch.Generator().manual_seed(1 + seq)).to(device)
        with torch.no_grad():
            nxt = ids
            for _ in range(steps + 1):
                a = compiled(nxt, past_key_values=cache).logits
                b = model(nxt, past_key_values=eager_cache).logits
                diffs.append((a - b).abs().max().item())
                nxt = a[:, -1:].argmax(-1)
    return cache, diffs


def test_llama_static_cache_is_rewritten_and_matches_eager_kv4():
    backend = _Backend(kernels="reference")
    cache, diffs = _run_llama(backend, sequences=2)
    # prefill, decode, and a prefill of the second (shorter) prompt; the KV4 buffers are not reset
    # with the StaticCache: a query at position p sees slots <= p, all written by its own sequence
    assert len(backend.results) <= 3
    for r, gm in zip(backend.results, backend.graphs):
        assert r.rewritten == 2 and all(rec.quantized for rec in r.records)
        ops = [n.target for n in gm.graph.nodes if n.op == "call_function"]
        assert ops.count(torch.ops.qoq.kv4_cache_append.default) == 2
        assert ops.count(torch.ops.qoq.kv4_cache_attention.default) == 2
        assert F.scaled_dot_product_attention not in ops and torch._C._nn.scaled_dot_product_attention not in ops
        assert not any(n.op == "call_method" and n.target == "index_copy_" for n in gm.graph.nodes)
        for name in r.dead_cache_inputs:  # the FP cache only leads the KV4 ops to their buffers
            users = next(n for n in gm.graph.nodes if n.name == name).users
            assert users and all(u.target in (torch.ops.qoq.kv4_cache_append.default,
                                              torch.ops.qoq.kv4_cache_attention.default) for u in users)
    # the compiled graph computes what the eager KV4 cache computes (both: attention over dequantized KV4)
    assert max(diffs) < 1e-5, diffs
    # and the FP cache was neither written nor read: prefill and decode met in the shared KV4 buffers
    for layer in cache.layers:
        assert not layer.keys.any() and not layer.values.any()
        assert kv4_buffers_for(layer.keys, layer.values).k_data.any()


@pytest.mark.slow
def test_llama_triton_kernels_and_released_fp_cache():
    backend = _Backend(kernels="triton", release_fp_cache=True)
    cache, diffs = _run_llama(backend, steps=2, batch=1, prompt=5, device=DEVICE)
    assert max(diffs) < (1e-2 if DEVICE == "cuda" else 1e-4), diffs  # tf32 dots on a GPU
    assert len(backend.results) == 2  # releasing the FP storage did not trigger recompiles
    released = [name for r in backend.results for name in r.to_release]
    assert len(released) == 8
    assert all(layer.keys.untyped_storage().nbytes() == 0 for layer in cache.layers)


@pytest.mark.slow
def test_llama_through_inductor():
    backend = _Backend(kernels="reference", inductor=True)
    cache, diffs = _run_llama(backend, steps=2)
    assert max(diffs) < 1e-4, diffs
    assert all(r.rewritten == 2 for r in backend.results)


# -- spellings, on small functions -------------------------------------------------------------

B, HKV, G, D, T = 2, 2, 2, 16, 3


def _repeat_kv(x, g):
    b, h, length, d = x.shape
    return x[:, :, None, :, :].expand(b, h, g, length, d).reshape(b, h * g, length, d)


def _write_index_copy(kc, vc, pos, k, v):
    kc.index_copy_(2, pos, k)
    vc.index_copy_(2, pos, v)


def _write_setitem(kc, vc, pos, k, v):
    kc[:, :, pos] = k
    vc[:, :, pos] = v


def _write_setitem_slice(kc, vc, pos, k, v):
    kc[:, :, 4:4 + T] = k
    vc[:, :, 4:4 + T] = v


def _write_index_put(kc, vc, pos, k, v):
    torch.ops.aten.index_put_(kc, [None, None, pos], k)
    torch.ops.aten.index_put_(vc, [None, None, pos], v)


def _read_repeat_kv(q, kc, vc, mask):
    return F.scaled_dot_product_attention(q, _repeat_kv(kc, G), _repeat_kv(vc, G), attn_mask=mask, scale=0.3)


def _read_enable_gqa(q, kc, vc, mask):
    return F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask, enable_gqa=True, scale=0.3)


def _read_repeat_interleave(q, kc, vc, mask):
    return F.scaled_dot_product_attention(q, kc.repeat_interleave(G, dim=1), vc.repeat_interleave(G, dim=1),
                                          attn_mask=mask, scale=0.3)


@pytest.mark.parametrize("write", [_write_index_copy, _write_setitem, _write_setitem_slice, _write_index_put])
@pytest.mark.parametrize("read", [_read_repeat_kv, _read_enable_gqa, _read_repeat_interleave])
def test_spellings(write, read):
    def step(q, k, v, kc, vc, pos, mask):
        write(kc, vc, pos, k, v)
        return read(q, kc, vc, mask) * 2

    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, HKV * G, T, D, generator=g)
    k, v = torch.randn(B, HKV, T, D, generator=g), torch.randn(B, HKV, T, D, generator=g)
    pos = torch.arange(4, 4 + T)
    mask = torch.rand(B, 1, T, L, generator=g) > 0.2
    kc, vc = torch.zeros(B, HKV, L, D), torch.zeros(B, HKV, L, D)
    backend = _Backend(kernels="reference")
    torch._dynamo.reset()
    out = torch.compile(step, backend=backend, fullgraph=True)(q, k, v, kc, vc, pos, mask)
    assert backend.results[0].rewritten == 1, backend.results[0].records

    caches = [*kv4_alloc(B, HKV, L, D), *kv4_alloc(B, HKV, L, D)]
    kv4_append(k, v, *caches, pos, kernels="reference")
    expect = kv4_attention(q, *caches, pos, mask, 0.3, kernels="reference") * 2
    torch.testing.assert_close(out, expect)
    assert not kc.any() and not vc.any()


def _compile_and_pass(fn, *args):
    backend = _Backend(kernels="reference")
    torch._dynamo.reset()
    torch.compile(fn, backend=backend, fullgraph=True)(*args)
    return backend.results[0]


def _args():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(B, HKV * G, T, D, generator=g), torch.randn(B, HKV, T, D, generator=g),
            torch.randn(B, HKV, T, D, generator=g), torch.zeros(B, HKV, L, D), torch.zeros(B, HKV, L, D),
            torch.arange(T))


def test_cache_used_elsewhere_is_left_alone_and_reported():
    def step(q, k, v, kc, vc, pos):
        _write_index_copy(kc, vc, pos, k, v)
        return _read_repeat_kv(q, kc, vc, None), kc.sum()

    r = _compile_and_pass(step, *_args())
    assert r.rewritten == 0
    assert len(r.records) == 1 and not r.records[0].quantized and "also used" in r.records[0].reason


def test_is_causal_sdpa_is_left_alone_and_reported():
    def step(q, k, v, kc, vc, pos):
        _write_index_copy(kc, vc, pos, k, v)
        return F.scaled_dot_product_attention(q, _repeat_kv(kc, G), _repeat_kv(vc, G), is_causal=True)

    r = _compile_and_pass(step, *_args())
    assert r.rewritten == 0 and "is_causal=True" in r.records[0].reason


def test_cache_read_by_eager_attention_is_reported():
    """Attention spelled as matmul + softmax (transformers' eager attention) over a written cache: no
    SDPA to rewrite, and each cache is reported as left 16-bit, with the way out."""
    def step(q, k, v, kc, vc, pos):
        _write_index_copy(kc, vc, pos, k, v)
        s = q @ _repeat_kv(kc, G).transpose(-1, -2) / D ** 0.5
        return torch.softmax(s, -1) @ _repeat_kv(vc, G)

    r = _compile_and_pass(step, *_args())
    assert r.rewritten == 0 and len(r.records) == 2
    assert all(not rec.quantized and "not read by a scaled_dot_product_attention" in rec.reason
               and "attn_implementation='sdpa'" in rec.reason for rec in r.records)


def test_attention_without_cache_is_not_touched():
    def step(q, k, v, kc, vc, pos):
        return F.scaled_dot_product_attention(q, _repeat_kv(k, G), _repeat_kv(v, G))

    r = _compile_and_pass(step, *_args())
    assert r.rewritten == 0 and not r.records


def test_head_order_other_than_repeat_kv_is_not_matched():
    """x[:, None].expand(B, G, Hkv, ...) gives query head g·Hkv + h, not what the kernel computes."""
    def step(q, k, v, kc, vc, pos):
        _write_index_copy(kc, vc, pos, k, v)
        kk = kc[:, None].expand(B, G, HKV, L, D).reshape(B, G * HKV, L, D)
        vv = vc[:, None].expand(B, G, HKV, L, D).reshape(B, G * HKV, L, D)
        return F.scaled_dot_product_attention(q, kk, vv)

    r = _compile_and_pass(step, *_args())
    assert r.rewritten == 0 and len(r.records) == 2  # both caches reported as left 16-bit
    assert all("not read by a scaled_dot_product_attention the KV4 rewrite recognizes" in rec.reason
               for rec in r.records)


def test_cache_created_inside_the_graph_is_reported():
    """A compiled prefill that allocates the StaticCache lazily has no cache input to rewrite."""
    model = _llama(layers=1)
    backend = _Backend()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    with torch.no_grad():
        compiled(torch.randint(0, 256, (1, 5)), past_key_values=StaticCache(model.config, max_cache_len=L))
    r = backend.results[0]
    assert r.rewritten == 0
    assert len(r.records) == 1 and "early_initialization" in r.records[0].reason


def test_a_new_cache_reuses_the_graph_and_gets_its_own_buffers():
    """Dynamo reuses a graph for another cache its guards accept; the KV4 ops find that cache's buffers
    at run time, so no compile per cache and no writes into the first cache's buffers."""
    def step(q, k, v, kc, vc, pos):
        _write_index_copy(kc, vc, pos, k, v)
        return _read_repeat_kv(q, kc, vc, None)

    q, k, v, kc, vc, pos = _args()
    backend = _Backend(kernels="reference")
    torch._dynamo.reset()
    compiled = torch.compile(step, backend=backend, fullgraph=True)
    compiled(q, k, v, kc, vc, pos)
    first = kv4_buffers_for(kc, vc).k_data.clone()
    kc2, vc2 = torch.zeros_like(kc), torch.zeros_like(vc)
    out = compiled(q, 2 * k, v, kc2, vc2, pos)
    assert len(backend.results) == 1
    assert torch.equal(kv4_buffers_for(kc, vc).k_data, first)  # the first cache is untouched
    caches = [*kv4_alloc(B, HKV, L, D), *kv4_alloc(B, HKV, L, D)]
    kv4_append(2 * k, v, *caches, pos, kernels="reference")
    torch.testing.assert_close(out, kv4_attention(q, *caches, pos, None, 0.3, kernels="reference"))


def test_the_backend_makes_a_new_caches_buffers_before_the_graph_runs():
    """Under CUDA graphs the graph's own run allocates from the graph's pool, so the runner qoq returns
    makes a new cache's KV4 buffers (and releases its FP storage, if asked) before calling the graph."""
    def step(q, k, v, kc, vc, pos):
        _write_index_copy(kc, vc, pos, k, v)
        return _read_repeat_kv(q, kc, vc, None)

    q, k, v, kc, vc, pos = _args()
    torch._dynamo.reset()
    compiled = torch.compile(step, backend="qoq", fullgraph=True, options={  # KV4 alone (no K/V rotation)
        "recipe": "w4a8-g128", "kv_bits": 4, "inductor": False, "kernels": "reference", "release_fp_cache": True})
    compiled(q, k, v, kc, vc, pos)
    assert kc.untyped_storage().nbytes() == 0 and kv4_buffers_of(kc) is not None
    kc2, vc2 = torch.zeros_like(kc), torch.zeros_like(vc)
    made = []
    real = kv4_cache_ops._buffers
    with patch.object(kv4_cache_ops, "_buffers", lambda *a: made.append(kv4_buffers_of(a[0])) or real(*a)):
        out = compiled(q, k, v, kc2, vc2, pos)
    assert made and all(b is not None for b in made)  # the ops found the buffers already made
    assert kc2.untyped_storage().nbytes() == 0 and vc2.untyped_storage().nbytes() == 0
    caches = [*kv4_alloc(B, HKV, L, D), *kv4_alloc(B, HKV, L, D)]
    kv4_append(k, v, *caches, pos, kernels="reference")
    torch.testing.assert_close(out, kv4_attention(q, *caches, pos, None, 0.3, kernels="reference"))
    gone = weakref.ref(kc2)
    del kc2, vc2, made
    gc.collect()
    assert gone() is None  # the runner does not keep the last cache (nor its KV4 buffers) alive


def test_a_graph_left_in_fp_after_the_pass_keeps_its_fp_cache(monkeypatch):
    """release_fp_cache frees the FP cache when the rewritten graph first runs, not in the pass: when
    Inductor then fails on the rewritten graph and qoq falls back to the FP graph, that graph still
    reads and writes the FP cache."""
    import torch._inductor.compile_fx as cfx

    real = cfx.compile_fx
    calls = []

    def failing_once(gm, example_inputs, **kw):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("inductor failed (simulated)")
        return real(gm, example_inputs, **kw)

    monkeypatch.setattr(cfx, "compile_fx", failing_once)

    def step(q, k, v, kc, vc, pos):
        _write_index_copy(kc, vc, pos, k, v)
        return _read_repeat_kv(q, kc, vc, None)

    q, k, v, kc, vc, pos = _args()
    want = step(q, k, v, kc.clone(), vc.clone(), pos)
    torch._dynamo.reset()
    compiled = torch.compile(step, backend="qoq", fullgraph=True, options={
        "recipe": "w4a8-g128", "kv_bits": 4, "kernels": "reference", "release_fp_cache": True})
    with pytest.warns(UserWarning, match="left in FP"):
        out = compiled(q, k, v, kc, vc, pos)
    assert len(calls) == 2
    assert kc.untyped_storage().nbytes() > 0 and kc[:, :, pos].abs().sum() > 0  # the FP graph wrote it
    torch.testing.assert_close(out, want)


# -- rotate_kv's matmuls around the KV4 ops -------------------------------------------------------


def _rotation_nodes(gm) -> list:
    from passes.rotate_kv import rotate_rows, rotate_rows_pair, unrotate_rows

    fns = (rotate_rows, rotate_rows_pair, unrotate_rows)
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in fns]


def test_a_skipped_attention_keeps_rotate_kvs_matmuls():
    """The KV-cache pass skips an SDPA over a slice of the cache; rotate_kv's matmuls stay around it and
    the graph still computes the FP function."""
    from passes.rotate_kv import rotate_kv

    def step(q, k, v, kc, vc, pos):
        _write_index_copy(kc, vc, pos, k, v)
        return F.scaled_dot_product_attention(q, _repeat_kv(kc[:, :, :8], G), _repeat_kv(vc[:, :, :8], G))

    results, graphs = [], []

    def backend(gm, example_inputs):
        qgraph = capture(gm, example_inputs)
        rotate_kv(qgraph)
        results.append(kv_cache(qgraph, kernels="reference"))
        graphs.append(qgraph.gm)
        return qgraph.gm.forward

    q, k, v, kc, vc, pos = _args()
    want = step(q, k, v, kc.clone(), vc.clone(), pos)
    torch._dynamo.reset()
    got = torch.compile(step, backend=backend, fullgraph=True)(q, k, v, kc, vc, pos)
    assert results[0].rewritten == 0 and "slice" in results[0].records[0].reason
    assert len(_rotation_nodes(graphs[0])) == 3  # q and K in one rotate_rows_pair, V, the output back
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
