"""Horizontal fusion: W4A8 GEMMs that read one quantized activation become one GEMM over their
concatenated weights (q/k/v; gate/up), its output sliced back into the layers' outputs.

Why: at decode batch sizes every GEMM is a short, memory-bound launch, and a step of an 8B model is
launch-bound (about 400 kernels). One GEMM over N = N_q + N_k + N_v reads the same bytes in one
launch, with more programs to spread over the SMs.

Exact: the packed weights, scales and zeros are per output row, so the fused GEMM's columns are the
members' own outputs bit for bit (the kernels compute each output from its own row's data; a
different tile or split-K configuration for the wider N can change float rounding order only).
The members' biases are added after the slices (Inductor fuses the adds into their consumers).
SVDQuant's W4A8 groups (recipe w4a8-svd) share X̂·L_down too: the fused GEMM's epilogue takes their
L_up factors side by side, [r, N_q + N_k + N_v], so each column still gets its own layer's branch.

Runs after the artifact record is taken: the record (and a saved artifact) keeps the per-layer
tensors, and a replay fuses again. The record's tensors, and those of the quantization cache
(passes/quantize.py), are re-pointed at slices of the fused buffers, so no byte is held twice; a
replayed graph whose members are already adjacent slices of one buffer fuses them as a view of it,
without copying.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.fx as fx

import lowering  # noqa: F401  (registers torch.ops.qoq.*)
from passes.quantize import repoint_cached
from qcompile.artifact import GEMM_ROLES, INPUT_OPS
from qcompile.capture import QGraph

_GEMM = torch.ops.qoq.w4a8_gemm.default
_QUANT = torch.ops.qoq.quantize_act_int8.default


@dataclass
class FuseResult:
    layers: list[list[str]] = field(default_factory=list)  # per fused GEMM: its members (layer names when known)


def _const(gm: fx.GraphModule, node: Any) -> Optional[torch.Tensor]:
    if isinstance(node, fx.Node) and node.op == "get_attr":
        value = getattr(gm, node.target, None)
        return value if isinstance(value, torch.Tensor) else None
    return None


def _gemm_parts(gm: fx.GraphModule, node: fx.Node) -> Optional[dict]:
    """The parts of one `qoq.w4a8_gemm` fed by `quantize_act_int8` and graph constants, or None."""
    x8, sx, xsum = node.args[:3]
    consts = [node.args[i] for i in GEMM_ROLES]  # all [N, ...]
    items = [x8, sx, xsum]
    if not all(isinstance(a, fx.Node) and a.target is operator.getitem and a.args[1] == i for i, a in enumerate(items)):
        return None
    quant = x8.args[0]
    if not (isinstance(quant, fx.Node) and quant.target is _QUANT and all(a.args[0] is quant for a in items)):
        return None
    tensors = {}
    for role, c in zip(GEMM_ROLES.values(), consts):
        if c is None and role == "gscale":
            continue
        t = _const(gm, c)
        if t is None or t.dim() == 0:
            return None
        tensors[role] = t
    q = tensors["qweight"]
    if any(t.shape[0] != q.shape[0] or t.device != q.device for t in tensors.values()):
        return None
    # the low-rank epilogue (w4a8-svd): the shared X̂·L_down node and this layer's L_up [r, N]
    lr = node.args[10] if len(node.args) > 10 else None
    l_up = _const(gm, node.args[11]) if len(node.args) > 11 else None
    if (lr is None) != (l_up is None) or (l_up is not None and (l_up.dim() != 2 or l_up.shape[1] != q.shape[0])):
        return None
    return dict(node=node, quant=quant, items=items, tensors=tensors, getattrs=consts,
                bias=node.args[7] if len(node.args) > 7 else None, rest=tuple(node.args[8:10]), lr=lr, l_up=l_up)


def _input_chain(gm: fx.GraphModule, x: Any) -> tuple[Any, list[tuple[Any, Any]]]:
    """(root, [(op, constant or argument), ...]) of the per-channel ops between `x`'s root and the quantization."""
    chain = []
    while isinstance(x, fx.Node) and x.op == "call_function" and x.target in INPUT_OPS:
        operand = x.args[1] if x.target is torch.mul else x.args[2]
        if x.target is torch.index_select and x.args[1] != -1:
            break
        value = _const(gm, operand)
        chain.append((x.target, operand if value is None else value))
        x = x.args[0]
    return x, chain


def _same_input(gm: fx.GraphModule, a: dict, b: dict) -> bool:
    """Whether two quantizations see the same values: one node, or equal per-channel ops over one root."""
    if a["quant"] is b["quant"]:
        return True
    if tuple(a["quant"].args[1:]) != tuple(b["quant"].args[1:]):
        return False
    (ra, ca), (rb, cb) = _input_chain(gm, a["quant"].args[0]), _input_chain(gm, b["quant"].args[0])
    if ra is not rb or len(ca) != len(cb):
        return False
    for (oa, va), (ob, vb) in zip(ca, cb):
        if oa is not ob:
            return False
        if isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor):
            if not (va is vb or (va.shape == vb.shape and va.dtype == vb.dtype and torch.equal(va, vb))):
                return False
        elif va is not vb:
            return False
    return True


def _compatible(a: dict, b: dict) -> bool:
    ta, tb = a["tensors"], b["tensors"]
    if ta.keys() != tb.keys() or a["rest"] != b["rest"] or a["lr"] is not b["lr"]:
        return False
    if a["l_up"] is not None and (a["l_up"].dtype != b["l_up"].dtype or a["l_up"].shape[0] != b["l_up"].shape[0]):
        return False
    return all(ta[r].dtype == tb[r].dtype and ta[r].shape[1:] == tb[r].shape[1:] for r in ta)


def concat_rows(parts: list[torch.Tensor]) -> torch.Tensor:
    """The parts stacked along dim 0: a view when they already lie back to back in one buffer."""
    first = parts[0]
    adjacent = all(p.is_contiguous() for p in parts) and all(
        p.untyped_storage().data_ptr() == first.untyped_storage().data_ptr() for p in parts)
    offset = first.storage_offset()
    for p in parts:
        adjacent = adjacent and p.storage_offset() == offset
        offset += p.numel()
    if adjacent:
        rows = sum(p.shape[0] for p in parts)
        return first.as_strided((rows, *first.shape[1:]), first.stride(), first.storage_offset())
    return torch.cat(parts, dim=0)


def _groups(gm: fx.GraphModule) -> list[list[dict]]:
    """Fusable GEMMs, in graph order: same input values, same format and output dtype."""
    groups: list[list[dict]] = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not _GEMM:
            continue
        parts = _gemm_parts(gm, node)
        if parts is None:
            continue
        for g in groups:
            if _compatible(g[0], parts) and _same_input(gm, g[0], parts):
                g.append(parts)
                break
        else:
            groups.append([parts])
    return [g for g in groups if len(g) > 1]


def _erase_dead(gm: fx.GraphModule, nodes: list[fx.Node]) -> None:
    """Erase `nodes` and what only fed them (quantizations, their input ops, constants), users first."""
    graph = gm.graph
    todo, erased = list(nodes), set()
    while todo:
        n = todo.pop(0)
        if n in erased or n.users or n.op not in ("call_function", "get_attr"):
            continue
        if n.op == "call_function" and n.target not in (_GEMM, _QUANT, operator.getitem, *INPUT_OPS):
            continue
        inputs = list(n.all_input_nodes)
        graph.erase_node(n)
        erased.add(n)
        if n.op == "get_attr" and not any(u.op == "get_attr" and u.target == n.target for u in graph.nodes):
            if hasattr(gm, n.target):
                delattr(gm, n.target)
            getattr(gm, "_param_name_to_source", {}).pop(n.target, None)
        todo.extend(inputs)


def fuse_gemms(qgraph: QGraph, record_tensors: Optional[dict[str, torch.Tensor]] = None) -> FuseResult:
    """Fuse each group of W4A8 GEMMs reading one activation; `record_tensors` (an artifact record's
    name -> tensor map) is re-pointed at slices of the fused buffers."""
    gm, graph = qgraph.gm, qgraph.gm.graph
    result = FuseResult()
    for group in _groups(gm):
        first = group[0]
        fused = {r: concat_rows([m["tensors"][r] for m in group]) for r in first["tensors"]}
        before = first["node"]
        stem = "fused." + "+".join(m["node"].name for m in group)
        consts = {r: qgraph.add_constant(f"{stem}.{r}", t, before=before) for r, t in fused.items()}
        x8, sx, xsum = first["items"]
        lowrank = ()
        if first["lr"] is not None:
            fused_up = torch.cat([m["l_up"] for m in group], dim=1)
            lowrank = (first["lr"], qgraph.add_constant(f"{stem}.l_up", fused_up, before=before))
        with graph.inserting_before(before):
            y = graph.call_function(_GEMM, (x8, sx, xsum, consts["qweight"], consts["wscale"], consts.get("gscale"),
                                            consts["gzero"], None, *first["rest"], *lowrank))
        y.meta.update({k: v for k, v in before.meta.items() if k in ("stack_trace", "nn_module_stack")})
        start = 0
        cursor = y
        names = []
        for m in group:
            n_rows = m["tensors"]["qweight"].shape[0]
            with graph.inserting_after(cursor):
                out = graph.call_function(torch.ops.aten.slice.Tensor, (y, -1, start, start + n_rows))
            cursor = out
            if m["bias"] is not None:
                with graph.inserting_after(cursor):
                    out = graph.call_function(torch.add, (out, m["bias"]))
                cursor = out
            out.meta.update({k: v for k, v in m["node"].meta.items() if k in ("example_value", "val")})
            m["node"].replace_all_uses_with(out)
            # A slice of the last dim keeps the row stride: `view`s that merge rows would fail on it.
            for user in list(out.users):
                if user.op == "call_method" and user.target == "view":
                    user.target = "reshape"
            name = m["node"].name
            views = [(t, fused[role][start:start + n_rows]) for role, t in m["tensors"].items()]
            repoint_cached({id(t): view for t, view in views})
            if record_tensors is not None:
                if lowrank:
                    views.append((m["l_up"], fused_up[:, start:start + n_rows]))
                for t, view in views:
                    for key, value in record_tensors.items():
                        if value is t:
                            record_tensors[key] = view
                            if key.endswith(".qweight"):
                                name = key[: -len(".qweight")]
            names.append(name)
            start += n_rows
        _erase_dead(gm, [m["node"] for m in group])
        result.layers.append(names)
    if result.layers:
        graph.lint()
        gm.recompile()
    return result
