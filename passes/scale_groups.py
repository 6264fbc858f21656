"""The scale-group graph: which op produces each linear's input channels, so a per-channel factor
can move between a consumer's columns and its producer (norm -> q/k/v, norm -> gate/up, v -> o,
up -> down) or between q and k through RoPE into attention.

Built over the Dynamo FX graph as Dynamo spells transformers models (RMSNorm as `weight * x`,
LayerNorm as `F.layer_norm`, SDPA, HF `rotate_half` RoPE, GPT-2's fused `c_attn` split in three).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Optional

import networkx as nx
import torch
import torch.fx as fx

from passes.match import LinearMatch, other_uses
from qcompile.capture import QGraph

# Ops that move data around without mixing channels of the last dim (checked with shapes too).
_VIEW_METHODS = {"view", "reshape", "contiguous", "to", "float", "half", "bfloat16", "flatten", "type_as"}
_VIEW_FUNCS = {torch.reshape, torch.flatten}
_STRUCT_METHODS = _VIEW_METHODS | {"transpose", "permute", "expand", "unsqueeze", "repeat_interleave", "clone"}
_STRUCT_FUNCS = _VIEW_FUNCS | {torch.transpose, torch.permute, torch.unsqueeze}
_MUL = {operator.mul, torch.mul}
_ADD = {operator.add, torch.add}
_LAYER_NORM = {torch.nn.functional.layer_norm, torch.layer_norm}
_SDPA = {torch._C._nn.scaled_dot_product_attention, torch.nn.functional.scaled_dot_product_attention}
_DROPOUT = {torch.nn.functional.dropout}


def _val(node) -> Optional[torch.Tensor]:
    v = node.meta.get("example_value") if isinstance(node, fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


def _last_dim(node) -> Optional[int]:
    v = _val(node)
    return None if v is None or v.dim() == 0 else int(v.shape[-1])


def _is_call(node, methods=(), funcs=()) -> bool:
    return isinstance(node, fx.Node) and (
        node.op == "call_method" and node.target in methods or node.op == "call_function" and node.target in funcs)


def _keeps_channels(node: fx.Node) -> bool:
    """True when `node` returns its first argument's last-dim channels unchanged and unmixed."""
    if not node.args or not isinstance(node.args[0], fx.Node):
        return False
    src = node.args[0]
    if _last_dim(node) is None or _last_dim(node) != _last_dim(src):
        return False
    if _is_call(node, _VIEW_METHODS, _VIEW_FUNCS):
        return True
    if node.op == "call_function" and node.target in _DROPOUT:
        training = node.args[2] if len(node.args) > 2 else node.kwargs.get("training", True)
        return training is False
    if node.op == "call_function" and node.target is operator.getitem:
        idx = node.args[1]
        idx = idx if isinstance(idx, tuple) else (idx,)
        if not all(i is None or i is Ellipsis or isinstance(i, (int, slice)) for i in idx):
            return False
        if Ellipsis in idx:
            after = idx[idx.index(Ellipsis) + 1:]
            return all(i is None for i in after)
        # Leading-dim indexing (`x[:, 0:]`) leaves the last dim whole.
        sval = _val(src)
        used = sum(1 for i in idx if i is not None)
        return sval is not None and (used < sval.dim() or idx[-1] == slice(None, None, None))
    return False


def channel_source(node: fx.Node) -> fx.Node:
    """Walk back through channel-preserving views to the op that made these channels."""
    while isinstance(node, fx.Node) and node.op != "placeholder" and _keeps_channels(node):
        node = node.args[0]
    return node


def channel_users(node: fx.Node) -> set[fx.Node]:
    """Forward counterpart of `channel_source`: the ops reading these channels, past any views."""
    out: set[fx.Node] = set()
    for user in node.users:
        if user.args and user.args[0] is node and _keeps_channels(user):
            out |= channel_users(user)
        else:
            out.add(user)
    return out


# -- producers -------------------------------------------------------------------------------

@dataclass
class NormMatch:
    """A norm whose affine weight (and bias) can absorb a per-channel factor."""
    node: fx.Node  # the node whose output the consumers read
    kind: str  # "rmsnorm" (`weight * x`, optionally `+ bias`) or "layernorm"
    weight: fx.Node  # weight placeholder [C]
    bias: Optional[fx.Node]  # bias placeholder [C]
    fqn: str


def _weight_param(qgraph: QGraph, node, channels: Optional[int], owners: set) -> bool:
    """`node` is a 1-D weight placeholder of `channels` entries read only by `owners`."""
    ref = qgraph.weight_ref(node)
    return (ref is not None and ref.tensor.dim() == 1 and (channels is None or ref.tensor.shape[0] == channels)
            and set(node.users) <= owners)


def _arg(node: fx.Node, i: int, name: str):
    return node.args[i] if len(node.args) > i else node.kwargs.get(name)


def as_norm(qgraph: QGraph, node: fx.Node) -> Optional[NormMatch]:
    """The norm producing `node`, if its weight can be rescaled without touching anything else."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return None
    c = _last_dim(node)
    if node.target in _LAYER_NORM:
        w, b = _arg(node, 2, "weight"), _arg(node, 3, "bias")
        if not _weight_param(qgraph, w, c, {node}):
            return None
        if b is not None and not _weight_param(qgraph, b, c, {node}):
            return None
        fqn = qgraph.weight_ref(w).fqn.rsplit(".", 1)[0]
        return NormMatch(node, "layernorm", w, b, fqn)
    bias = None
    mul = node
    if node.target in _ADD and len(node.args) == 2:
        for a, other in (node.args, node.args[::-1]):
            if _is_call(other, funcs=_MUL) and _weight_param(qgraph, a, c, {node}):
                bias, mul = a, other
                break
        else:
            return None
        if len(mul.users) != 1:
            return None
    if mul.target not in _MUL or len(mul.args) != 2:
        return None
    for w in mul.args:
        if _weight_param(qgraph, w, c, {mul}):
            fqn = qgraph.weight_ref(w).fqn.rsplit(".", 1)[0]
            return NormMatch(node, "rmsnorm", w, bias, fqn)
    return None


def linear_weight(qgraph: QGraph, m: LinearMatch) -> torch.Tensor:
    """The current weight as [out, in]."""
    w = qgraph.weight(m.weight).detach()
    return w.t() if m.weight_transposed else w


def set_linear_weight(qgraph: QGraph, m: LinearMatch, w: torch.Tensor) -> None:
    """Give the layer a new [out, in] weight (stored the way the graph reads it)."""
    qgraph.set_weight(m.weight, (w.t() if m.weight_transposed else w).contiguous())


def linear_bias(qgraph: QGraph, m: LinearMatch) -> Optional[torch.Tensor]:
    return qgraph.weight(m.bias).detach() if m.bias is not None and qgraph.weight_ref(m.bias) is not None else None


@dataclass
class ScaleGroup:
    """Linears reading the same channels, and where a factor on those channels can be folded.

    Consumer channel c comes from producer channel `index[c]` (identity for a norm or up -> down;
    for v -> o, every query head of a GQA group reads the same v channels).
    """
    x: fx.Node  # the channels the consumers read (their common channel source)
    consumers: list[LinearMatch]
    kind: str  # "norm", "linear" (up -> down, or a direct chain), "attention-v", "none" (explicit
    # scale), "fixed" (a consumer's weight is shared, so its columns must not change)
    norm: Optional[NormMatch] = None
    producer: Optional[LinearMatch] = None
    row_offset: int = 0  # first producer row (GPT-2's fused c_attn: v is rows [2C, 3C))
    index: Optional[torch.Tensor] = None  # [K] consumer channel -> producer channel; None: identity
    gates: list[LinearMatch] = field(default_factory=list)  # linears multiplied in elementwise (gate)
    reason: str = ""  # why no producer can absorb the factor (kind == "none")

    @property
    def name(self) -> str:
        return ",".join(m.fqn for m in self.consumers)

    @property
    def channels(self) -> int:
        return self.consumers[0].in_features


@dataclass
class AttentionMatch:
    """q and k projections feeding one SDPA call, and how RoPE pairs their channels."""
    node: fx.Node
    q: Optional[LinearMatch]
    k: Optional[LinearMatch]
    v: Optional[LinearMatch]
    q_offset: int
    k_offset: int
    v_offset: int
    heads: int
    kv_heads: int
    head_dim: int
    rope: str  # "rotate_half" (pairs i, i + D/2), "none", or "unknown"
    reason: str = ""


def _linear_at(node, by_node: dict) -> tuple[Optional[LinearMatch], int]:
    """(linear, row offset) when `node` is a linear's output or one `split` piece of it."""
    m, off, _ = _linear_piece(node, by_node)
    return m, off


def _linear_piece(node, by_node: dict) -> tuple[Optional[LinearMatch], int, Optional[fx.Node]]:
    """(linear, row offset, the node holding those rows) for a linear's output or a `split` piece."""
    node = channel_source(node)
    if node in by_node:
        return by_node[node], 0, node
    if (isinstance(node, fx.Node) and node.op == "call_function" and node.target is operator.getitem
            and isinstance(node.args[1], int)):
        split = node.args[0]
        if _is_call(split, {"split"}, {torch.split}) and isinstance(split.args[1], int):
            dim = _arg(split, 2, "dim")
            src = split.args[0]
            sval = _val(src)
            if sval is not None and dim in (-1, sval.dim() - 1):
                m, off = _linear_at(src, by_node)
                if m is not None:
                    return m, off + node.args[1] * split.args[1], node
    return None, 0, None


def _rope_kind(start: fx.Node, proj: fx.Node, head_dim: int) -> str:
    """How the ops between a projection and SDPA pair channels: only views -> "none";
    HF rotate_half (`cat(-x[..., D/2:], x[..., :D/2])`, times sin, plus x·cos) -> "rotate_half"."""
    seen, stack, kinds = set(), [start], set()
    while stack:
        n = stack.pop()
        if n in seen or n is proj or not isinstance(n, fx.Node):
            continue
        seen.add(n)
        if n.op == "placeholder" or n.op == "get_attr":
            continue
        if not _depends_on(n, proj):
            continue  # cos/sin tables, masks
        if _is_call(n, _STRUCT_METHODS, _STRUCT_FUNCS) or _keeps_channels(n):
            pass
        elif n.op == "call_function" and n.target is operator.getitem:
            idx = n.args[1] if isinstance(n.args[1], tuple) else (n.args[1],)
            last = idx[-1]
            if isinstance(last, slice) and last != slice(None, None, None):
                if not (last.step in (None, 1) and (last.start, last.stop) in ((None, head_dim // 2), (head_dim // 2, None))):
                    return "unknown"
                kinds.add("half")
        elif n.op == "call_function" and n.target in (torch.cat,):
            kinds.add("cat")
        elif n.op == "call_function" and n.target in (operator.neg, torch.neg) or n.op == "call_function" and n.target in _MUL | _ADD:
            pass
        else:
            return "unknown"
        stack.extend(a for a in n.all_input_nodes)
    if not kinds:
        return "none"
    return "rotate_half" if kinds == {"half", "cat"} else "unknown"


def _depends_on(node: fx.Node, target: fx.Node) -> bool:
    stack = [node]
    seen = set()
    while stack:
        n = stack.pop()
        if n is target:
            return True
        if n in seen:
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return False


def _linears_behind(node: fx.Node, by_node: dict, limit: int = 256) -> list[tuple[LinearMatch, int, fx.Node]]:
    """Linears (with split offsets and pieces) reached walking back from `node` without crossing one."""
    found, seen, stack = [], set(), [node]
    while stack and len(seen) < limit:
        n = stack.pop()
        if not isinstance(n, fx.Node) or n in seen:
            continue
        seen.add(n)
        m, off, piece = _linear_piece(n, by_node)
        if m is not None:
            if all(f[0] is not m or f[1] != off for f in found):
                found.append((m, off, piece))
            continue
        stack.extend(n.all_input_nodes)
    return found


def _ancestors(node: fx.Node) -> set[fx.Node]:
    out, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n not in out:
            out.add(n)
            stack.extend(n.all_input_nodes)
    return out


def feeds_only(start: fx.Node, target: fx.Node, ancestors: Optional[set] = None) -> bool:
    """Every use of `start` leads to `target` (and nowhere else: no graph output, no other op)."""
    anc = ancestors if ancestors is not None else _ancestors(target)
    seen, stack = set(), list(start.users)
    while stack:
        n = stack.pop()
        if n is target or n in seen:
            continue
        seen.add(n)
        if n not in anc:
            return False
        stack.extend(n.users)
    return True


def find_attention(qgraph: QGraph, linears: list[LinearMatch]) -> list[AttentionMatch]:
    """Each SDPA call with the q/k/v projections feeding it (exactly one linear each, read nowhere else)."""
    by_node = {m.node: m for m in linears}
    out = []
    for node in qgraph.gm.graph.nodes:
        if not (node.op == "call_function" and node.target in _SDPA):
            continue
        args = [_arg(node, i, name) for i, name in enumerate(("query", "key", "value"))]
        vals = [_val(a) for a in args]
        if any(v is None or v.dim() != 4 for v in vals):
            continue
        heads, head_dim = int(vals[0].shape[1]), int(vals[0].shape[-1])
        # With a static KV cache, SDPA reads K from the cache; K's projection reaches it through the
        # one write into that cache, so q/k factors (SmoothAttention) are followed through the write.
        # V is left as read (its scale group would move factors into the 4-bit V cache unsearched).
        ends = {"q": node, "k": node, "v": node}
        kwrite = _cache_write(qgraph, args[1])
        if kwrite is not None:
            args[1], ends["k"] = kwrite
        picks, reason = [], ""
        for role, arg in zip("qkv", args):
            found = _linears_behind(arg, by_node)
            if role == "v" and kwrite is not None:
                picks.append((None, 0, None))  # read from the cache: no v -> o group (see above)
            elif len(found) != 1:
                picks.append((None, 0, None))
                reason = reason or f"{role} does not come from exactly one linear"
            elif not feeds_only(found[0][2], ends[role], _ancestors(ends[role])):
                picks.append((None, 0, None))
                reason = reason or f"{role} ({found[0][0].fqn}) is read outside this attention (a KV cache?)"
            else:
                picks.append(found[0])
        (q, qo, qpiece), (k, ko, kpiece), (v, vo, _) = picks
        kv_heads = heads
        if k is not None:
            width = _last_dim(kpiece) if kpiece is not k.node else k.out_features
            kv_heads = width // head_dim if width and width % head_dim == 0 else 0
        rope = "unknown"
        if q is not None and k is not None:
            rq, rk = _rope_kind(args[0], qpiece, head_dim), _rope_kind(args[1], kpiece, head_dim)
            rope = rq if rq == rk else "unknown"
            if rope == "unknown":
                reason = "the ops between q/k and attention are neither plain views nor HF rotate_half RoPE"
        out.append(AttentionMatch(node, q, k, v, qo, ko, vo, heads, kv_heads, head_dim, rope, reason))
    return out


def _cache_write(qgraph: QGraph, arg) -> Optional[tuple[fx.Node, fx.Node]]:
    """(written source, write node) when `arg` reads a cache graph input written once in this graph."""
    from passes.rotate_kv import _cache_behind, _writes  # (rotate_kv imports this module's users)

    cache = _cache_behind(arg, set(qgraph.weights))
    writes = _writes(cache) if cache is not None else []
    if len(writes) != 1:
        return None
    w, i = writes[0]
    return w.args[i], w


def _attention_v_group(x: fx.Node, consumers: list[LinearMatch], attn: list[AttentionMatch]) -> Optional[ScaleGroup]:
    """o_proj reading `attention(...).transpose(1, 2).reshape(B, T, H·D)`: v's rows absorb the factor."""
    n, saw_transpose = x, False
    while _is_call(n, _STRUCT_METHODS, _STRUCT_FUNCS):
        if n.target in ("transpose", torch.transpose) and len(n.args) >= 3:
            saw_transpose = saw_transpose or sorted(int(d) % 4 for d in n.args[1:3]) == [1, 2]
        n = n.args[0]
    match = next((a for a in attn if a.node is n), None)
    if match is None or not saw_transpose or match.v is None:
        return None
    H, D, KVH = match.heads, match.head_dim, match.kv_heads
    vval = _val(_arg(match.node, 2, "value"))
    if consumers[0].in_features != H * D or KVH <= 0 or H % KVH or vval is None or int(vval.shape[-1]) != D:
        return None
    rep = H // KVH
    index = (torch.arange(H).repeat_interleave(D) // rep) * D + torch.arange(D).repeat(H)
    if int(index.max()) + match.v_offset >= match.v.out_features:
        return None
    return ScaleGroup(x, consumers, "attention-v", producer=match.v, row_offset=match.v_offset, index=index)


def find_scale_groups(qgraph: QGraph, linears: list[LinearMatch]) -> list[ScaleGroup]:
    """Every group of linears sharing input channels, with the producer that can absorb a factor."""
    by_node = {m.node: m for m in linears}
    attn = find_attention(qgraph, linears)
    sources: dict[fx.Node, list[LinearMatch]] = {}
    for m in linears:
        if isinstance(m.x, fx.Node):
            sources.setdefault(channel_source(m.x), []).append(m)
    return [_classify(qgraph, x, consumers, linears, attn, by_node) for x, consumers in sources.items()]


def _classify(qgraph, x, consumers, linears, attn, by_node) -> ScaleGroup:
    consumer_nodes = {m.node for m in consumers}
    tied = [m.fqn for m in consumers if other_uses(m, linears)]
    if tied:
        return ScaleGroup(x, consumers, "fixed", reason=f"{tied[0]}'s weight is also read outside linear layers (tied embedding?)")
    readers = channel_users(x)
    if not readers <= consumer_nodes:
        others = sorted({str(getattr(u.target, "__name__", u.target)) for u in readers - consumer_nodes})
        return ScaleGroup(x, consumers, "none", reason=f"these channels are also read by {', '.join(others)}")
    norm = as_norm(qgraph, x)
    if norm is not None:
        return ScaleGroup(x, consumers, "norm", norm=norm)
    m, off = _linear_at(x, by_node)
    if m is not None and off == 0 and channel_users(m.node) == readers:
        return _linear_group(qgraph, x, consumers, m, linears)
    if _is_call(x, funcs=_MUL) and len(x.args) == 2 and all(isinstance(a, fx.Node) for a in x.args):
        for a, other in (x.args, x.args[::-1]):
            m, off = _linear_at(a, by_node)
            if m is not None and off == 0 and channel_users(m.node) == {x} and _last_dim(other) == _last_dim(x):
                # The other factor's linears (gate) only need to be known for a channel permutation.
                gates = [g for g, o, piece in _linears_behind(other, by_node)
                         if o == 0 and g.out_features == m.out_features and feeds_only(g.node, x)]
                return _linear_group(qgraph, x, consumers, m, linears, gates)
    group = _attention_v_group(x, consumers, attn)
    if group is not None:
        if other_uses(group.producer, linears):
            return ScaleGroup(x, consumers, "none", reason=f"{group.producer.fqn}'s weight is read elsewhere too")
        return group
    what = getattr(x.target, "__name__", str(x.target)) if isinstance(x, fx.Node) else str(x)
    return ScaleGroup(x, consumers, "none", reason=f"input comes from {what}, which cannot absorb a per-channel factor")


def _linear_group(qgraph, x, consumers, producer: LinearMatch, linears, gates=()) -> ScaleGroup:
    if other_uses(producer, linears):
        return ScaleGroup(x, consumers, "none", reason=f"{producer.fqn}'s weight is read elsewhere too")
    if producer.bias is not None and qgraph.weight_ref(producer.bias) is None:
        return ScaleGroup(x, consumers, "none", reason=f"{producer.fqn}'s bias is computed in the graph")
    return ScaleGroup(x, consumers, "linear", producer=producer, gates=list(gates))


def scale_graph(qgraph: QGraph, linears: list[LinearMatch]) -> nx.MultiDiGraph:
    """The scale groups as a networkx graph: nodes are linears (by FQN), norms and attention calls;
    edges say which channels a factor can travel along ("norm", "up->down", "v->o", "query", "key")."""
    g = nx.MultiDiGraph()  # GPT-2's fused c_attn reaches attention as query, key and value
    for m in linears:
        g.add_node(m.fqn, kind="linear", shape=m.weight_shape)
    for grp in find_scale_groups(qgraph, linears):
        if grp.kind == "norm":
            g.add_node(grp.norm.fqn, kind=grp.norm.kind)
            src, label = grp.norm.fqn, "norm"
        elif grp.kind == "linear":
            src, label = grp.producer.fqn, "up->down"
        elif grp.kind == "attention-v":
            src, label = grp.producer.fqn, "v->o"
        else:
            continue
        for c in grp.consumers:
            g.add_edge(src, c.fqn, kind=label)
    for a in find_attention(qgraph, linears):
        g.add_node(a.node.name, kind="attention", rope=a.rope, heads=a.heads, kv_heads=a.kv_heads, head_dim=a.head_dim)
        if a.q is not None:
            g.add_edge(a.q.fqn, a.node.name, kind="query", rope=a.rope)
        if a.k is not None:
            g.add_edge(a.k.fqn, a.node.name, kind="key", rope=a.rope)
        if a.v is not None:
            g.add_edge(a.v.fqn, a.node.name, kind="value")
    return g
