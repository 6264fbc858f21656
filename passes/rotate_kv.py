"""KV rotation (QuaRot-style) for the 4-bit KV cache: an orthogonal H over head_dim (a Hadamard with
random signs where one is built: kv_rotation) applied online to what attention reads from a static cache.

- K and q after RoPE: attention only sees q·kᵀ, and (q H)(k H)ᵀ = q kᵀ, so the key written into the
  cache becomes k H and the query q H. RoPE's pair rotations do not commute with H, which is why this
  cannot be folded into q_proj / k_proj rows and is applied online instead.
- V (values=True): the value written into the cache becomes v H, and attention's output is multiplied by Hᵀ
  (softmax · (v H) · Hᵀ = softmax · v).

Why: the KV4 format quantizes each (token, head) vector over head_dim with one asymmetric uint4 grid,
so a few large channels (K's outlier channels, measured on SmolLM2: most of the KV4 loss is K's)
stretch the step for all the others. H spreads each vector's energy evenly over head_dim. The FP
function is kept (up to float rounding); only the 4-bit cache benefits, so the manager runs this pass
only when kv_bits == 4, just before the kv_cache pass, which then finds the same write / SDPA pattern
with the rotated tensors as the written source and the query.

Run-time cost: two [D, D] matmuls per attention (rotate_rows of the written K and of q, one launch
where they can be side by side: rotate_rows_pair), four with values=True (rotate_rows of the written
V, unrotate_rows of the output). V carries little of the KV4 loss, so the config's rotate_kv_values
is off by default (ACCURACY.md). (Applying H inside the KV4 kernels instead was built, measured
slower on an H200 and removed: benchmarks/NOTES.md, v5.)

In which precision: where H is a Hadamard (head_dim a power of two, or 2^k·(p + 1) with p a prime
≡ 3 mod 4, such as 80 and 96) and the model is bf16 / fp16, the matmuls take it unscaled (entries ±1,
exact in bf16) in the model's dtype: x·H' sums exact products in fp32 and rounds once, as the float32
product does, but runs as a half-precision GEMM. H'H'ᵀ = D·I, so SDPA's scale is divided by D and
unrotate_rows multiplies by 1/D (both exact for powers of two; otherwise the scale takes one more
float rounding, and V's un-rotated output one more rounding in the model's dtype). The float32 product
of the orthonormal H was the first form: on an H200 cuBLAS ran the query's [32, 128] x [128, 128]
float32 product at batch 1 in a split-K kernel of 54 us, a third of a decode layer (BENCHMARKS.md).
Other head_dims (a random orthogonal H, e.g. 112) and float32 models keep the float32 form.

Only attentions that read a cache written in the same graph (the static-cache pattern the kv_cache
pass rewrites) are rotated: every graph over that cache (prefill, decode, a replay) must rotate both
the writes and the reads, and the rule "rotate each written cache and its readers" gives the same
answer in every one of them. H depends on head_dim only (fixed seed), so all graphs agree.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.fx as fx

from passes.rotate import randomized_hadamard, rotation_matrix
from qcompile.capture import QGraph

_SDPA = {torch._C._nn.scaled_dot_product_attention, torch.nn.functional.scaled_dot_product_attention}
# Ops between a cache and SDPA's key/value operand that only move whole head_dim vectors around (GQA
# expansion, slicing of slots, views); in-place writes return the cache itself.
_CHAIN_METHODS = {"expand", "reshape", "view", "contiguous", "repeat_interleave", "index_copy_", "index_put_"}
_CHAIN_FUNCS = {operator.getitem, torch.reshape, torch.repeat_interleave, torch.ops.aten.index_put_.default,
                torch.ops.aten.index_put_}
_WRITE_METHODS = {"index_copy_": 3, "index_put_": 2}  # method -> position of the written source
_WRITE_FUNCS = {operator.setitem: 2, torch.ops.aten.index_put_.default: 2, torch.ops.aten.index_put_: 2}
ROTATION_SEED = 0x4B56  # "KV": one H per head_dim for every graph and every process


@dataclass
class RotateKVResult:
    rotated: list[str] = field(default_factory=list)  # SDPA node names whose q, K and V were rotated
    skipped: dict[str, str] = field(default_factory=dict)  # SDPA node name -> why it was left alone


def kv_rotation(head_dim: int) -> torch.Tensor:
    """The orthogonal [D, D] used for K, q and V of every attention with this head_dim: a Hadamard
    with random column signs where passes.rotate.hadamard_matrix builds one (powers of two, and e.g.
    80 and 96), else a seeded random orthogonal matrix."""
    h = randomized_hadamard(head_dim, seed=ROTATION_SEED)
    return rotation_matrix(head_dim, seed=ROTATION_SEED) if h is None else h


def kv_rotation_operand(head_dim: int, dtype: torch.dtype, low_precision: bool = True) -> tuple[torch.Tensor, int]:
    """(H as the graph's matmuls take it, gain) with H Hᵀ = gain·I: the unscaled ±1 Hadamard in `dtype`
    (gain head_dim) where that is exact and allowed, else kv_rotation in float32 (gain 1)."""
    h = kv_rotation(head_dim)
    scaled = h * math.sqrt(head_dim)
    signs = scaled.round()
    if (low_precision and dtype in (torch.bfloat16, torch.float16)
            and torch.allclose(scaled, signs, atol=1e-5)):  # a Hadamard: ±1 after scaling
        return signs.to(dtype), head_dim
    return h, 1


def rotate_rows(x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """x [..., D] @ h: in x's dtype when h is (the ±1 Hadamard, exact there), else in float32 and back in
    x's dtype (a rounded orthonormal H would not be orthogonal enough)."""
    if h.dtype == x.dtype:
        return x @ h
    return (x.float() @ h.float()).to(x.dtype)


def rotate_rows_pair(q: torch.Tensor, k: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """rotate_rows of q [B, Hq, T, D] and k [B, Hkv, T, D] (an attention's query and the key it writes)
    as one matmul over their heads side by side: a decode step's two [D, D] products are each a few
    rows and cost about a launch each (2.3 and 2.1 us on an H200), so one launch should save about one
    of them (not yet timed; the concatenation can fuse into RoPE's kernel)."""
    both = rotate_rows(torch.cat([q, k], dim=1), h)
    return both[:, :q.shape[1]], both[:, q.shape[1]:]


def unrotate_rows(x: torch.Tensor, h: torch.Tensor, gain: int = 1) -> torch.Tensor:
    """x [..., D] @ hᵀ / gain: undoes `rotate_rows` (h hᵀ = gain·I; the division exact when gain is a
    power of two)."""
    if h.dtype == x.dtype:
        return (x @ h.t()) * (1.0 / gain)
    return (x.float() @ h.float().t()).to(x.dtype)


def _val(node) -> Optional[torch.Tensor]:
    if isinstance(node, fx.Node):
        v = node.meta.get("example_value", node.meta.get("val"))
        return v if isinstance(v, torch.Tensor) else None
    return None


def _arg(node: fx.Node, i: int, name: str):
    return node.args[i] if len(node.args) > i else node.kwargs.get(name)


def _cache_behind(node, weights: set[str]) -> Optional[fx.Node]:
    """The 4-D non-weight graph input that SDPA's key/value operand reads through view-like ops."""
    cur = node
    for _ in range(16):
        if not isinstance(cur, fx.Node):
            return None
        if cur.op == "placeholder":
            v = _val(cur)
            return cur if cur.name not in weights and v is not None and v.dim() == 4 else None
        if cur.op == "call_method" and cur.target in _CHAIN_METHODS or cur.op == "call_function" and cur.target in _CHAIN_FUNCS:
            cur = cur.args[0]
            continue
        return None
    return None


def _writes(cache: fx.Node) -> list[tuple[fx.Node, int]]:
    """(write node, index of the written source in its args) for each in-place write into `cache`."""
    out = []
    for u in cache.users:
        if not u.args or u.args[0] is not cache:
            continue
        if u.op == "call_method" and u.target in _WRITE_METHODS:
            out.append((u, _WRITE_METHODS[u.target]))
        elif u.op == "call_function" and u.target in _WRITE_FUNCS:
            out.append((u, _WRITE_FUNCS[u.target]))
    return out


def _plan(node: fx.Node, weights: set[str]) -> tuple[Optional[tuple], str]:
    """(kc, vc, writes of kc, writes of vc, D) for one SDPA, or None and why it is not rotated."""
    q, k, v = (_arg(node, i, name) for i, name in enumerate(("query", "key", "value")))
    qv = _val(q)
    kc, vc = _cache_behind(k, weights), _cache_behind(v, weights)
    if kc is None or vc is None or kc is vc:
        return None, "key/value are not read from a KV cache (nothing is quantized to 4 bits there)"
    kw, vw = _writes(kc), _writes(vc)
    if not kw or not vw:
        return None, "the K/V caches are not written in this graph"
    d = qv.shape[-1] if qv is not None and qv.dim() == 4 else None
    if d is None or any(_val(w.args[i]) is None or _val(w.args[i]).shape[-1] != d for w, i in kw + vw):
        return None, "the written K/V or the query are not [.., head_dim] tensors of one head_dim"
    return (kc, vc, kw, vw, int(d)), ""


def _divide_sdpa_scale(node: fx.Node, head_dim: int, gain: int) -> None:
    """SDPA's scale (1/√head_dim when not given) divided by gain; a scale computed in the graph gets a
    division node of its own."""
    scale = _arg(node, 6, "scale")
    if isinstance(scale, fx.Node):
        with node.graph.inserting_before(node):
            new = node.graph.call_function(operator.truediv, (scale, gain))
    else:
        new = (1.0 / math.sqrt(head_dim) if scale is None else float(scale)) / gain
    if len(node.args) > 6:
        node.update_arg(6, new)
    else:
        node.update_kwarg("scale", new)


def _merge_rotations(graph: fx.Graph, qrot: fx.Node, krot: fx.Node, order: dict) -> None:
    """Replace an attention's q rotation and its written K's rotation by one rotate_rows_pair, where the
    two have the same batch, length, head_dim and dtype and q exists before K is written (as in every
    decoder layer: RoPE makes both, then the cache is written, then read). `order`: node -> position,
    taken before any merge (merges insert nodes but never reorder the existing ones)."""
    q, k, hn = qrot.args[0], krot.args[0], qrot.args[1]
    qv, kv = _val(q), _val(k)
    if qv is None or kv is None or qv.dim() != 4 or kv.dim() != 4 or qv.dtype != kv.dtype:
        return
    if (qv.shape[0], qv.shape[2], qv.shape[3]) != (kv.shape[0], kv.shape[2], kv.shape[3]):
        return
    if order[q] > order[krot]:
        return
    with graph.inserting_before(krot):
        pair = graph.call_function(rotate_rows_pair, (q, k, hn))
        q2 = graph.call_function(operator.getitem, (pair, 0))
        k2 = graph.call_function(operator.getitem, (pair, 1))
    pair.meta["example_value"] = (qv, kv)
    q2.meta["example_value"], k2.meta["example_value"] = qv, kv
    qrot.replace_all_uses_with(q2)
    krot.replace_all_uses_with(k2)
    graph.erase_node(qrot)
    graph.erase_node(krot)


def rotate_kv(qgraph: QGraph, values: bool = True, low_precision: bool = True) -> RotateKVResult:
    """Rotate q, K and V of each SDPA that reads K and V from caches written in this graph; with
    values=False q and K only (V's cache and the attention output stay as they are). low_precision:
    the ±1 Hadamard in the model's dtype where exact (module docstring); False: the float32 form
    everywhere (the reference the tests compare the ±1 form with)."""
    graph = qgraph.gm.graph
    weights = set(qgraph.weights)
    result = RotateKVResult()
    sdpas = [n for n in graph.nodes if n.op == "call_function" and n.target in _SDPA]
    plans = {}
    for node in sdpas:
        plan, why = _plan(node, weights)
        if plan is None:
            result.skipped[node.name] = why
        else:
            plans[node] = plan
    caches = {c for p in plans.values() for c in p[:2]}
    for node in sdpas:
        if node not in plans and any(_cache_behind(_arg(node, i, n), weights) in caches for i, n in ((1, "key"), (2, "value"))):
            # Rotating a cache one of its readers cannot follow would change that reader's result.
            result.skipped = {n.name: f"{node.name} reads a rotated cache but cannot be rotated: {result.skipped[node.name]}"
                              for n in sdpas}
            return result
    first = next(n for n in graph.nodes if n.op != "placeholder")
    consts: dict[tuple, tuple[fx.Node, int]] = {}  # (head_dim, dtype) -> (H constant, gain)
    done: set[fx.Node] = set()  # caches whose writes are rotated already (read by several SDPAs)
    form_of: dict[fx.Node, tuple] = {}  # K cache -> (head_dim, dtype) of the H its writes got
    readers = {}  # K cache -> how many SDPAs read it
    for kc, *_ in plans.values():
        readers[kc] = readers.get(kc, 0) + 1
    pairs = []  # (q rotation, K rotation) of an SDPA whose cache has one write and one reader
    for node, (kc, vc, kw, vw, d) in plans.items():
        q = _arg(node, 0, "query")
        # The ±1 form needs one half-precision dtype for q and the written K / V.
        dtype = _val(q).dtype
        if any(_val(w.args[i]).dtype != dtype for w, i in kw + vw):
            dtype = torch.float32
        # a cache read by several SDPAs keeps the form its writes were rotated with
        key = form_of.setdefault(kc, (d, dtype))
        if key not in consts:
            h, gain = kv_rotation_operand(d, dtype, low_precision)
            # "kv4." stems are runtime state to an artifact: its replay re-runs this pass and makes H again.
            stem = f"kv4.rotate_kv.h{d}" + ("" if gain == 1 else f"_{str(dtype).removeprefix('torch.')}")
            consts[key] = (qgraph.add_constant(stem, h.to(_val(q).device), before=first), gain)
        hn, gain = consts[key]
        if gain != 1:  # (q H')(k H')ᵀ = gain · q kᵀ
            _divide_sdpa_scale(node, d, gain)
        k_rots = []
        for cache, writes in ((kc, kw), (vc, vw)) if values else ((kc, kw),):
            if cache in done:
                continue
            done.add(cache)
            for w, i in writes:
                src = w.args[i]
                with graph.inserting_before(w):
                    rot = graph.call_function(rotate_rows, (src, hn))
                rot.meta["example_value"] = _val(src)
                w.update_arg(i, rot)
                if cache is kc:
                    k_rots.append(rot)
        with graph.inserting_before(node):
            qrot = graph.call_function(rotate_rows, (q, hn))
        qrot.meta["example_value"] = _val(q)
        node.replace_input_with(q, qrot)
        if len(k_rots) == 1 and readers[kc] == 1:
            pairs.append((qrot, k_rots[0]))
        if values:
            with graph.inserting_after(node):
                back = graph.call_function(unrotate_rows, (node, hn, gain))
            back.meta.update({key: val for key, val in node.meta.items() if key in ("example_value", "val")})
            # The attention output's readers take the un-rotated value; `back` itself keeps reading node.
            node.replace_all_uses_with(back, delete_user_cb=lambda u: u is not back)
        result.rotated.append(node.name)
    order = {n: i for i, n in enumerate(graph.nodes)}
    for qrot, krot in pairs:
        _merge_rotations(graph, qrot, krot, order)
    if result.rotated:
        graph.lint()
        qgraph.gm.recompile()
    return result
