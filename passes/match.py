"""Finds the graph's linear layers, however Dynamo spells them, and the weights they read.

Spellings: `F.linear(x, W, b)`; `x @ W.t()` / `matmul(x, W.T)` / `mm`; `addmm(b, x, W.t())`; and
the [K, N] weights of GPT-2's Conv1D (`addmm(b, x, W)`, `x @ W`). Each becomes a `LinearMatch`
with the weight as [out, in] seen through `weight_transposed`.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Optional

import torch
import torch.fx as fx

from qcompile.capture import QGraph

_LINEAR = {torch._C._nn.linear, torch.nn.functional.linear}
_MATMUL = {torch.matmul, operator.matmul, torch.mm}
_ADDMM = {torch.addmm}
_TRANSPOSE_METHODS = {"t", "transpose", "permute"}
_TRANSPOSE_FUNCS = {torch.t, torch.transpose, torch.permute}


@dataclass
class LinearMatch:
    node: fx.Node  # the node computing y
    x: fx.Node
    weight: fx.Node  # the weight placeholder
    bias: Optional[fx.Node]
    weight_transposed: bool  # True: the placeholder holds W as [in, out]
    fqn: str  # the module's FQN (weight FQN without ".weight")
    weight_fqn: str

    @property
    def out_features(self) -> int:
        return self.weight_shape[0]

    @property
    def in_features(self) -> int:
        return self.weight_shape[1]

    @property
    def weight_shape(self) -> tuple[int, int]:
        shape = tuple(self.weight.meta["example_value"].shape) if "example_value" in self.weight.meta else None
        return shape[::-1] if self.weight_transposed else shape


def is_2d_transpose(node: fx.Node) -> Optional[fx.Node]:
    """If `node` swaps the two dims of a 2-D tensor, return that tensor's node."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "call_method" and node.target in _TRANSPOSE_METHODS or node.op == "call_function" and node.target in _TRANSPOSE_FUNCS:
        src = node.args[0]
        rest = [a for a in node.args[1:]]
        if len(rest) == 1 and isinstance(rest[0], (tuple, list)):
            rest = list(rest[0])
        if node.target in ("t", torch.t) and not rest:
            return src
        if node.target in ("transpose", torch.transpose) and sorted(x % 2 for x in rest) == [0, 1]:
            return src
        if node.target in ("permute", torch.permute) and list(rest) == [1, 0]:
            return src
    if node.op == "call_function" and node.target is getattr and node.args[1] in ("T", "mT"):
        return node.args[0]
    return None


def _weight_operand(qgraph: QGraph, node: fx.Node) -> Optional[tuple[fx.Node, bool]]:
    """(placeholder, transposed) when `node` is a 2-D weight read as the B operand [K, N]."""
    inner = is_2d_transpose(node)
    if inner is not None and qgraph.weight_ref(inner) is not None:
        return inner, False
    if qgraph.weight_ref(node) is not None:
        return node, True
    return None


def _arg(node: fx.Node, i: int, name: str):
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name)


def _as_linear(qgraph: QGraph, node: fx.Node) -> Optional[LinearMatch]:
    if node.op != "call_function":
        return None
    if node.target in _LINEAR:
        x, w, b = _arg(node, 0, "input"), _arg(node, 1, "weight"), _arg(node, 2, "bias")
        if qgraph.weight_ref(w) is None:
            return None
        transposed = False
    elif node.target in _MATMUL:
        x, bnode = node.args[0], node.args[1]
        found = _weight_operand(qgraph, bnode)
        if found is None:
            return None
        w, transposed = found
        b = None
    elif node.target in _ADDMM:
        if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
            return None
        b, x, bnode = node.args[0], node.args[1], node.args[2]
        found = _weight_operand(qgraph, bnode)
        if found is None:
            return None
        w, transposed = found
        bval = b.meta.get("example_value") if isinstance(b, fx.Node) else None
        if bval is None or bval.dim() != 1:
            return None
    else:
        return None
    ref = qgraph.weight_ref(w)
    wval = w.meta.get("example_value", ref.tensor)
    if wval.dim() != 2:
        return None
    if b is not None and not isinstance(b, fx.Node):
        return None
    fqn = ref.fqn[: -len(".weight")] if ref.fqn.endswith(".weight") else ref.fqn
    if "example_value" not in w.meta:
        w.meta["example_value"] = ref.tensor
    return LinearMatch(node=node, x=x, weight=w, bias=b, weight_transposed=transposed, fqn=fqn, weight_fqn=ref.fqn)


def find_linears(qgraph: QGraph) -> list[LinearMatch]:
    """Every linear layer of the graph, in graph order."""
    out = []
    for node in qgraph.gm.graph.nodes:
        m = _as_linear(qgraph, node)
        if m is not None:
            out.append(m)
    return out


def other_uses(match: LinearMatch, linears: list[LinearMatch]) -> list[fx.Node]:
    """Users of the weight that are not linear layers (a tied embedding, say)."""
    linear_nodes = {m.node for m in linears}
    users = []
    for user in match.weight.users:
        if user in linear_nodes:
            continue
        # A transpose that only feeds linears counts as part of them.
        if all(u in linear_nodes for u in user.users) and is_2d_transpose(user) is match.weight:
            continue
        users.append(user)
    return users
