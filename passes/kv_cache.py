"""The KV-cache pass: a static-cache write plus the SDPA that reads that cache -> qoq.kv4_cache_append and
qoq.kv4_cache_attention over packed KV4 buffers. The FP cache tensors (graph inputs) are then neither
written nor read: the ops take them only to find the KV4 buffers standing for them at run time, so
every graph (prefill, decode, a batch-dynamic recompile) and every cache its guards accept meets its
own cache's buffers without a compile per cache.

Spellings matched (transformers' StaticCache, 4.x and 5.x): the write is `cache.index_copy_(2, pos, x)`,
`cache[:, :, pos] = x` (operator.setitem, pos a tensor or a slice) or `aten.index_put_(cache, [None, None, pos], x)`;
the read is SDPA with the cache as key/value, directly (`enable_gqa` or no GQA), through repeat_kv
(`cache[:, :, None].expand(B, Hkv, G, L, D).reshape(B, Hq, L, D)`) or `repeat_interleave(G, dim=1)`.

After passes/rotate_kv, the written K (and V) and the query pass through rotate_rows (q and K
through one rotate_rows_pair): the rewrite leaves those matmuls in the graph and quantizes the
rotated rows. (Until the sixth session the KV4 kernels could apply H themselves instead; on an H200
that was slower than the matmuls even in float32, and the half-precision ±1 matmuls of rotate_kv
cost 2-3 us each: benchmarks/NOTES.md, v5.)
"""
from __future__ import annotations

import operator
import re
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.fx as fx

import lowering.kv4_cache  # noqa: F401  (registers torch.ops.qoq.kv4_cache_append / kv4_cache_attention)
from qcompile.capture import QGraph
from runtime.kv_cache import kv4_buffers_for
from runtime.registry import LayerRecord

_SDPA = {torch._C._nn.scaled_dot_product_attention, torch.nn.functional.scaled_dot_product_attention}
_RESHAPES = {"reshape", "view", torch.reshape}
_PASSTHROUGH_METHODS = {"contiguous"}
# index_put_ with None for the leading dims only exists at the aten level (the Python method refuses None)
_INDEX_PUT = {torch.ops.aten.index_put_.default, torch.ops.aten.index_put_}


@dataclass
class CacheWrite:
    node: fx.Node  # the write
    cache: fx.Node  # the cache placeholder
    pos: Any  # fx.Node of positions [T], or a slice with int/node bounds
    src: fx.Node  # what is written, [B, Hkv, T, D]


@dataclass
class KVCacheResult:
    records: list[LayerRecord] = field(default_factory=list)  # one per rewritten or skipped attention
    rewritten: int = 0
    to_release: list[str] = field(default_factory=list)  # FP cache placeholders whose storage the first run frees
    dead_cache_inputs: list[str] = field(default_factory=list)  # placeholders only used to find KV4 buffers


def _val(node: Any) -> Optional[torch.Tensor]:
    if isinstance(node, fx.Node):
        v = node.meta.get("example_value", node.meta.get("val"))
        return v if isinstance(v, torch.Tensor) else None
    return None


def _is_full_slice(x: Any) -> bool:
    return isinstance(x, slice) and x.start is None and x.stop is None and x.step is None


def _arg(node: fx.Node, i: int, name: str, default: Any = None) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _as_write(node: fx.Node, caches: set[fx.Node]) -> Optional[CacheWrite]:
    """A write along the sequence dim (2 of [B, H, L, D]) into one of `caches`, or None."""
    if node.op == "call_method" and node.target == "index_copy_":
        cache, dim, pos, src = node.args[0], node.args[1], node.args[2], node.args[3]
        if cache in caches and dim in (2, -2):
            return CacheWrite(node, cache, pos, src)
    if node.op == "call_function" and node.target is operator.setitem:
        cache, index, src = node.args
        if (cache in caches and isinstance(index, tuple) and len(index) == 3
                and _is_full_slice(index[0]) and _is_full_slice(index[1])
                and (isinstance(index[2], fx.Node) or isinstance(index[2], slice) and index[2].step in (None, 1))):
            return CacheWrite(node, cache, index[2], src)
    if (node.op == "call_method" and node.target == "index_put_"
            or node.op == "call_function" and node.target in _INDEX_PUT):
        cache, indices, src = node.args[0], node.args[1], node.args[2]
        accumulate = _arg(node, 3, "accumulate", False)
        if (cache in caches and not accumulate and isinstance(indices, (tuple, list)) and len(indices) == 3
                and indices[0] is None and indices[1] is None and isinstance(indices[2], fx.Node)):
            return CacheWrite(node, cache, indices[2], src)
    return None


def _trace_cache_read(node: Any, aliases: dict[fx.Node, fx.Node]
                      ) -> Optional[tuple[fx.Node, list[fx.Node], bool]]:
    """Follow SDPA's key/value operand back to a written cache through a GQA expansion that keeps
    transformers' head order (query head h·G + g reads KV head h), and through a slice of the first
    slots (`cache[:, :, :n]`). Returns (cache node, chain nodes, whether it was sliced)."""
    chain: list[fx.Node] = []
    cur = node
    sliced = False
    while isinstance(cur, fx.Node):
        if cur in aliases:
            return aliases[cur], chain, sliced
        if cur.op == "call_function" and cur.target is operator.getitem and isinstance(cur.args[1], tuple):
            index = cur.args[1]
            if (len(index) >= 3 and _is_full_slice(index[0]) and _is_full_slice(index[1])
                    and isinstance(index[2], slice) and index[2].start in (None, 0) and index[2].step in (None, 1)
                    and all(_is_full_slice(i) for i in index[3:])):
                chain.append(cur)
                sliced = True
                cur = cur.args[0]
                continue
        if cur.op == "call_method" and cur.target in _PASSTHROUGH_METHODS:
            chain.append(cur)
            cur = cur.args[0]
            continue
        if cur.op in ("call_method", "call_function") and cur.target in _RESHAPES:
            inner = cur.args[0]
            if not (isinstance(inner, fx.Node) and inner.op == "call_method" and inner.target == "expand"):
                return None
            expand = inner
            sel = expand.args[0]
            if not (isinstance(sel, fx.Node) and sel.op == "call_function" and sel.target is operator.getitem):
                return None
            index = sel.args[1]
            if not (isinstance(index, tuple) and len(index) >= 3 and _is_full_slice(index[0])
                    and _is_full_slice(index[1]) and index[2] is None
                    and all(_is_full_slice(i) or i is Ellipsis for i in index[3:])):
                return None  # the None must sit right after the KV-head dim: head order h·G + g
            chain += [cur, expand, sel]
            cur = sel.args[0]
            continue
        if cur.op in ("call_method", "call_function") and cur.target in ("repeat_interleave", torch.repeat_interleave):
            dim = _arg(cur, 2, "dim")
            if dim != 1 or not isinstance(_arg(cur, 1, "repeats"), int):
                return None
            chain.append(cur)
            cur = cur.args[0]
            continue
        return None
    return None


def _sdpa_parts(node: fx.Node) -> Optional[dict]:
    if node.op != "call_function" or node.target not in _SDPA:
        return None
    return dict(q=_arg(node, 0, "query"), k=_arg(node, 1, "key"), v=_arg(node, 2, "value"),
                mask=_arg(node, 3, "attn_mask"), dropout=_arg(node, 4, "dropout_p", 0.0),
                causal=_arg(node, 5, "is_causal", False), scale=_arg(node, 6, "scale"),
                enable_gqa=node.kwargs.get("enable_gqa", False))


def _positions(graph: fx.Graph, pos: Any, device: torch.device, before: fx.Node) -> fx.Node:
    if isinstance(pos, fx.Node):
        return pos
    start = 0 if pos.start is None else pos.start
    with graph.inserting_before(before):
        return graph.call_function(torch.arange, (start, pos.stop), {"device": device, "dtype": torch.long})


def _cache_name(cache: fx.Node) -> str:
    """`past_key_values.layers.3` for transformers' caches (from Dynamo's source), else the node name."""
    grapharg = cache.meta.get("grapharg")
    source = getattr(grapharg, "source", None)
    name = getattr(source, "name", None)
    name = name() if callable(name) else name
    found = re.search(r"past_key_values\W*\]?\.?(?:layers|_layers)\[['\"]?(\d+)", name or "")
    return f"past_key_values.layers.{found.group(1)}" if found else cache.name


def _example(qgraph: QGraph, placeholder: fx.Node) -> Optional[torch.Tensor]:
    placeholders = [n for n in qgraph.gm.graph.nodes if n.op == "placeholder"]
    i = placeholders.index(placeholder)
    v = qgraph.example_inputs[i] if i < len(qgraph.example_inputs) else None
    return v if isinstance(v, torch.Tensor) else None


def kv_cache(
    qgraph: QGraph, kernels: str = "auto", release_fp_cache: bool = False,
) -> KVCacheResult:
    """Rewrite every (static-cache write, SDPA over that cache) pair of the graph into KV4 ops.

    The packed buffers standing for one layer's FP cache are kept per FP tensor (runtime/kv_cache), so
    prefill and decode graphs meet in the same buffers; the example cache's are made here.
    `release_fp_cache` has the ops free the FP caches' storage (shape/stride kept for Dynamo's guards)
    when the graph first runs, not here: a graph that falls back to FP after this pass still reads
    them. Off by default because transformers' `StaticCache.reset()` zeroes those tensors.
    """
    gm, graph = qgraph.gm, qgraph.gm.graph
    result = KVCacheResult()
    order = {n: i for i, n in enumerate(graph.nodes)}
    # Writes into any 4-D tensor are collected, so that a cache created inside the graph (a compiled
    # prefill that lazily allocates StaticCache) is reported rather than silently left in FP.
    tensors4d = {n for n in graph.nodes if n.op != "output" and (n.op != "placeholder" or n.name not in qgraph.weights)
                 and _val(n) is not None and _val(n).dim() == 4}
    writes: dict[fx.Node, list[CacheWrite]] = {}
    for node in graph.nodes:
        w = _as_write(node, tensors4d)
        if w is not None:
            writes.setdefault(w.cache, []).append(w)
    if not writes:
        return result
    # index_copy_/index_put_ return the cache itself: their results alias it
    aliases = {c: c for c in writes}
    for ws in writes.values():
        for w in ws:
            if w.node.target is not operator.setitem:
                aliases[w.node] = w.cache

    def skip(name: str, reason: str) -> None:
        result.records.append(LayerRecord(name=name, kind="attention", shape=(), quantized=False, reason=reason))

    read_by_sdpa: set[fx.Node] = set()
    for node in list(graph.nodes):
        parts = _sdpa_parts(node)
        if parts is None:
            continue
        kr = _trace_cache_read(parts["k"], aliases)
        vr = _trace_cache_read(parts["v"], aliases)
        if kr is None or vr is None:
            continue  # attention that does not read a written cache (an encoder, a vision tower): not ours
        (kc, kchain, ksliced), (vc, vchain, vsliced) = kr, vr
        read_by_sdpa |= {kc, vc}
        name = f"attention over {_cache_name(kc)}"
        if kc.op != "placeholder" or vc.op != "placeholder":
            skip(name, "the KV cache is created inside the graph (a compiled prefill allocating StaticCache "
                       "lazily): call cache.early_initialization(...) before the first compiled call")
            continue
        if ksliced or vsliced:
            skip(name, f"SDPA reads a slice of the cache (is_causal={parts['causal']}), not the cache: "
                       "the KV4 kernel needs the whole cache and cache positions")
            continue
        kw, vw = writes.get(kc, []), writes.get(vc, [])
        if len(kw) != 1 or len(vw) != 1:
            skip(name, f"the K/V caches are written {len(kw)}/{len(vw)} times in the graph; expected once each")
            continue
        kw, vw = kw[0], vw[0]
        if kw.pos is not vw.pos and not (isinstance(kw.pos, slice) and kw.pos == vw.pos):
            skip(name, "K and V are written at different positions")
            continue
        if parts["dropout"] not in (0, 0.0) or parts["causal"] is not False:
            skip(name, f"SDPA with dropout_p={parts['dropout']} is_causal={parts['causal']}: the KV4 kernel "
                       "applies causality from cache positions and an explicit mask only")
            continue
        if not isinstance(parts["scale"], (float, int, type(None))):
            skip(name, "SDPA scale is not a constant")
            continue
        kv, q = _val(kc), _val(parts["q"])
        if kv is None or q is None or kv.shape != _val(vc).shape or kv.shape[-1] % 2 or q.dim() != 4:
            skip(name, "K/V caches of different or unknown shapes, or an odd head_dim")
            continue
        if q.shape[1] % kv.shape[1] or q.shape[-1] != kv.shape[-1]:
            skip(name, f"query {tuple(q.shape)} does not fit cache {tuple(kv.shape)}")
            continue
        chain_nodes = set(kchain) | set(vchain) | {node}
        other = [u for c in (kc, vc) for u in c.users
                 if u not in (kw.node, vw.node) and u not in chain_nodes]
        other += [u for w in (kw, vw) for u in w.node.users if u not in chain_nodes]
        if other:
            skip(name, f"the FP cache is also used by {sorted(u.name for u in other)}")
            continue
        if not (order[kw.node] < order[node] and order[vw.node] < order[node]):
            skip(name, "the cache is read before it is written")
            continue
        fp_k, fp_v = _example(qgraph, kc), _example(qgraph, vc)
        if fp_k is None or fp_v is None:
            skip(name, "no example tensor for the cache inputs")
            continue

        # -- rewrite ------------------------------------------------------------------------------
        bufs = kv4_buffers_for(fp_k, fp_v)  # made now, outside any CUDA-graph capture
        later = kw.node if order[kw.node] > order[vw.node] else vw.node
        pos = _positions(graph, kw.pos, fp_k.device, before=later)
        with graph.inserting_after(later):
            append = graph.call_function(
                torch.ops.qoq.kv4_cache_append.default,
                (kw.src, vw.src, kc, vc, pos, kernels, release_fp_cache))
        with graph.inserting_before(node):
            attn = graph.call_function(
                torch.ops.qoq.kv4_cache_attention.default,
                (parts["q"], kc, vc, append, pos, parts["mask"], parts["scale"], kernels, release_fp_cache))
        attn.meta.update({k: v for k, v in node.meta.items()
                          if k in ("example_value", "val", "stack_trace", "nn_module_stack", "source_fn_stack")})
        node.replace_all_uses_with(attn)
        graph.erase_node(node)
        for dead in sorted(chain_nodes - {node}, key=lambda n: -order[n]):
            if not dead.users:
                graph.erase_node(dead)
        for w in (kw, vw):
            graph.erase_node(w.node)
        result.rewritten += 1
        result.dead_cache_inputs += [kc.name, vc.name]
        result.records.append(LayerRecord(
            name=name, kind="attention", shape=tuple(kv.shape), quantized=True, format="kv4",
            kernel=f"qoq.kv4_cache_append + qoq.kv4_cache_attention ({kernels})",
            details={"kv_bits": 4, "bits_per_element": bufs.bits_per_element(), "cache_inputs": [kc.name, vc.name],
                     "append_after": append.name}))
        if release_fp_cache:
            result.to_release += [kc.name, vc.name]
    # A cache passed in and written here that no SDPA reads in a way matched above: attention spelled
    # without SDPA (eager attention; Gemma-2's logit soft-capping picks it) or K/V heads rearranged
    # otherwise. Either would leave the cache 16-bit with nothing said.
    for cache in writes:
        if cache.op == "placeholder" and cache not in read_by_sdpa:
            skip(f"KV cache {_cache_name(cache)}",
                 "written in the graph but not read by a scaled_dot_product_attention the KV4 rewrite "
                 "recognizes (eager attention, e.g. attn_implementation='eager' or Gemma-2's logit "
                 "soft-capping, or K/V heads arranged other than repeat_kv / enable_gqa): it stays 16-bit. "
                 "Load the model with attn_implementation='sdpa' where it supports it")
    if result.rewritten:
        graph.lint()
        gm.recompile()
    return result
