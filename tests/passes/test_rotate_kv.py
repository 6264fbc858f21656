"""passes/rotate_kv: q, K and V rotated around a static KV cache keep the FP output (prefill and decode,
Llama and Qwen2 with GQA), H is orthogonal, the kv_cache pass still matches the rotated graph, and the
rotation does shrink KV4's error on keys with outlier channels."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import StaticCache

from lowering.kv4_append import kv4_dequantize, kv4_quantize
from passes.kv_cache import kv_cache
from passes.rotate_kv import kv_rotation, rotate_kv
from qcompile.capture import capture
from tests.passes.models import make_model

L = 24


class _Backend:
    """Runs rotate_kv (then, if asked, the kv_cache pass) on every graph and keeps the results."""

    def __init__(self, then_kv4: bool = False, values: bool = True, low_precision: bool = True):
        self.then_kv4, self.values, self.results, self.kv, self.graphs = then_kv4, values, [], [], []
        self.low_precision = low_precision

    def __call__(self, gm, example_inputs):
        qg = capture(gm, example_inputs)
        self.results.append(rotate_kv(qg, values=self.values, low_precision=self.low_precision))
        self.graphs.append(qg.gm)
        if self.then_kv4:
            self.kv.append(kv_cache(qg, kernels="reference"))
        return qg.gm.forward


def _run(model, backend, prompt: int = 6, steps: int = 2, seed: int = 0, dtype: torch.dtype = torch.float32):
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    caches = []
    for _ in range(2):
        c = StaticCache(cfg, max_cache_len=L)
        c.early_initialization(batch_size=1, num_heads=cfg.num_key_value_heads, head_dim=head_dim,
                               dtype=dtype, device="cpu")
        caches.append(c)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    ids = torch.randint(0, 96, (1, prompt), generator=torch.Generator().manual_seed(seed))
    errs = []
    with torch.no_grad():
        nxt = ids
        for _ in range(steps + 1):
            a = compiled(nxt, past_key_values=caches[0]).logits
            b = model(nxt, past_key_values=caches[1]).logits
            errs.append(float((a - b).norm() / b.norm()))
            nxt = b[:, -1:].argmax(-1)
    return errs


@settings(max_examples=6, deadline=None)
@given(kind=st.sampled_from(["llama", "qwen2"]), seed=st.integers(0, 2**16), kv_heads=st.sampled_from([1, 2, 4]),
       values=st.booleans())
def test_rotate_kv_keeps_the_fp_output_prefill_and_decode(kind, seed, kv_heads, values):
    """values=False rotates q and K only: two matmuls an attention instead of four."""
    from passes.rotate_kv import rotate_rows, rotate_rows_pair, unrotate_rows

    model = make_model(kind, seed=seed, kv_heads=kv_heads)
    backend = _Backend(values=values)
    errs = _run(model, backend, seed=seed)
    assert max(errs) < 1e-5, errs
    assert backend.results and all(len(r.rotated) == 2 and not r.skipped for r in backend.results), backend.results
    for gm in backend.graphs:  # 2 attentions: q and K in one matmul (and V and the output back)
        fns = [n.target for n in gm.graph.nodes if n.op == "call_function"]
        assert fns.count(rotate_rows_pair) == 2
        assert fns.count(rotate_rows) == (2 if values else 0) and fns.count(unrotate_rows) == (2 if values else 0)


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**16), values=st.booleans(), dtype=st.sampled_from([torch.bfloat16, torch.float16]),
       d=st.sampled_from([16, 20]))
def test_half_precision_models_rotate_with_the_exact_unscaled_hadamard(seed, values, dtype, d):
    """bf16 / fp16 with a head_dim that has a Hadamard (16: Sylvester; 20: Paley): the graph's H is
    the ±1 Hadamard in the model's dtype (H·Hᵀ = D·I), SDPA's scale is divided by D, and the output is
    as close to the unrotated model's as with the float32 orthonormal H: both round each rotated
    vector once."""
    from passes.rotate_kv import rotate_rows_pair

    model = make_model("llama", hidden=4 * d, seed=seed, kv_heads=2).to(dtype)  # 4 heads of d
    exact, fp32 = _Backend(values=values), _Backend(values=values, low_precision=False)
    errs = _run(model, exact, seed=seed, dtype=dtype)
    errs_fp32 = _run(model, fp32, seed=seed, dtype=dtype)
    assert max(errs) < 2 * max(errs_fp32) + 2e-3, (errs, errs_fp32)
    for gm in exact.graphs:
        calls = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is rotate_rows_pair]
        h = getattr(gm, calls[0].args[2].target)
        assert h.dtype == dtype and torch.equal(h.float().abs(), torch.ones(d, d))
        assert torch.equal((h.float() @ h.float().t()), d * torch.eye(d))
        sdpas = [n for n in gm.graph.nodes if n.op == "call_function" and "scaled_dot_product" in str(n.target)]
        assert sdpas and all(n.kwargs.get("scale") == pytest.approx(d ** -0.5 / d) for n in sdpas)
    for gm in fp32.graphs:
        h = next(getattr(gm, n.target) for n in gm.graph.nodes if n.op == "get_attr" and "rotate_kv" in n.target)
        assert h.dtype == torch.float32


@pytest.mark.parametrize("values", [True, False])
def test_kv_cache_pass_still_rewrites_the_rotated_graph(values):
    model = make_model("llama", seed=3, kv_heads=2)
    backend = _Backend(then_kv4=True, values=values)
    errs = _run(model, backend)
    assert all(r.rewritten == 2 for r in backend.kv), [r.records for r in backend.kv]
    # rotate_kv's matmuls stay around the KV4 ops: q and K in one per layer, V's (values) apart
    from passes.rotate_kv import rotate_rows, rotate_rows_pair

    for gm in backend.graphs:
        targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
        assert targets.count(rotate_rows_pair) == 2 and targets.count(rotate_rows) == (2 if values else 0)
    assert max(errs) < 0.1, errs  # now with K/V read back from the 4-bit cache


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_matmul_for_q_and_k_rotates_as_two_did(dtype):
    """rotate_rows_pair gives q and K the rotations that two rotate_rows calls give."""
    from passes.rotate_kv import kv_rotation_operand, rotate_rows, rotate_rows_pair

    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 8, 5, 64, generator=g).to(dtype)
    k = torch.randn(3, 2, 5, 64, generator=g).to(dtype).transpose(1, 2).contiguous().transpose(1, 2)
    h, _ = kv_rotation_operand(64, dtype)
    q2, k2 = rotate_rows_pair(q, k, h)
    torch.testing.assert_close(q2, rotate_rows(q, h), rtol=0, atol=0)
    torch.testing.assert_close(k2, rotate_rows(k, h), rtol=0, atol=0)


def test_attention_without_cache_is_left_alone():
    from tests.passes.models import capture_model

    qg = capture_model(make_model("llama", seed=0), torch.randint(0, 96, (1, 8)))
    before = qg.gm.code
    r = rotate_kv(qg)
    assert not r.rotated and len(r.skipped) == 2 and "not read from a KV cache" in next(iter(r.skipped.values()))
    assert qg.gm.code == before


@pytest.mark.parametrize("d", [16, 64, 80, 96, 112, 128])
def test_rotation_is_orthogonal_and_fixed(d):
    h = kv_rotation(d)
    assert torch.allclose(h @ h.t(), torch.eye(d), atol=1e-5)
    assert torch.equal(h, kv_rotation(d))  # every graph and process must agree
    # a Hadamard (flat ±1/√D entries) wherever one is built: 112 has none here (random orthogonal)
    flat = torch.allclose(h.abs() * d ** 0.5, torch.ones(d, d), atol=1e-5)
    assert flat == (d != 112)


@pytest.mark.parametrize("n", [1, 2, 4, 12, 20, 24, 40, 48, 80, 96, 160, 192, 256, 576])
def test_hadamard_matrices(n):
    from passes.rotate import hadamard_matrix

    h = hadamard_matrix(n)
    assert h is not None and torch.equal(h.abs(), torch.ones(n, n)) and torch.equal(h @ h.t(), n * torch.eye(n))


def test_no_hadamard_is_made_up():
    from passes.rotate import hadamard_matrix

    assert hadamard_matrix(112) is None and hadamard_matrix(36) is None and hadamard_matrix(0) is None


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**16), outliers=st.integers(1, 4))
def test_rotation_shrinks_kv4_error_of_outlier_channels(seed, outliers):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(256, 64, generator=g)
    k[:, :outliers] *= 30  # a few large channels, as in real keys
    h = kv_rotation(64)

    def err(x):
        return float((kv4_dequantize(*kv4_quantize(x)) - x).pow(2).sum())

    # the error of k itself, measured after undoing the rotation (H is orthogonal: same norm)
    assert err(k @ h) < 0.5 * err(k)


def test_default_recipe_decode_graph_replays_the_rotation():
    """backend="qoq" (rotate_kv in the default recipe): the decode graph replays the prefill graph's
    rewrite, and must rotate the same cache too; without that the decode's queries meet rotated keys
    (relative logit error > 0.9 measured, against ~0.1-0.15 of KV4 noise on this random model)."""
    model = make_model("llama", seed=5, kv_heads=2, layers=2, hidden=128, heads=4)
    caches = []
    for _ in range(2):
        c = StaticCache(model.config, max_cache_len=48)
        c.early_initialization(batch_size=1, num_heads=2, head_dim=32, dtype=torch.float32, device="cpu")
        caches.append(c)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="qoq", options={"kernels": "reference", "inductor": False,
                                                            "skip_layers": ["*"], "strict": True, "quiet": True})
    nxt = torch.randint(0, 96, (1, 24), generator=torch.Generator().manual_seed(0))
    errs = []
    with torch.no_grad():
        for _ in range(4):
            a = compiled(nxt, past_key_values=caches[0]).logits
            b = model(nxt, past_key_values=caches[1]).logits
            errs.append(float((a - b).norm() / b.norm()))
            nxt = b[:, -1:].argmax(-1)
    assert max(errs) < 0.4, errs
