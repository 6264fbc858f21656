"""Finds the graph's linear layers, however Dynamo spells them, and the weights they read.

Spellings: `F.linear(x, W, b)`; `x @ W.t()` / `matmul(x, W.T)` / `mm`; `addmm(b, x, W.t())`; and
the [K, N] weights of GPT-2's Conv1D (`addmm(b, x, W)`, `x @ W`). Each becomes a `LinearMatch`
with the weight as [out, in] seen through `weight_transposed`.

On request (`find_linears(..., conv1x1=True)`), also 1x1 convolutions (`torch.conv1d/2d/3d` with
every kernel size 1, stride 1, no padding, groups 1: diffusers' UNet `proj_in`/`proj_out` and
ResNet shortcuts): a linear over the channel dim (dim 1). Their match's `x` is a channels-last
view of the conv input (`movedim(1, -1)`, inserted once), so calibration and the passes see
[..., K] rows as for any linear; `channel_dim` = 1 tells a rewrite to move the output back.
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
_CONV = {torch.conv1d: 1, torch.conv2d: 2, torch.conv3d: 3,
         torch.nn.functional.conv1d: 1, torch.nn.functional.conv2d: 2, torch.nn.functional.conv3d: 3}
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
    # -1: a linear. 1: a 1x1 convolution; `node` computes [B, N, *spatial] and `x` is the
    # channels-last view [B, *spatial, K] of its input.
    channel_dim: int = -1

    @property
    def is_conv1x1(self) -> bool:
        return self.channel_dim == 1

    @property
    def out_features(self) -> int:
        return self.weight_shape[0]

    @property
    def in_features(self) -> int:
        return self.weight_shape[1]

    @property
    def weight_shape(self) -> tuple[int, int]:
        shape = tuple(self.weight.meta["example_value"].shape) if "example_value" in self.weight.meta else None
        if shape is not None and self.is_conv1x1:
            return shape[:2]  # [N, K, 1, ...]
        return shape[::-1] if self.weight_transposed else shape

    def weight_nk(self, w: torch.Tensor) -> torch.Tensor:
        """The weight tensor `w` this match reads, as [out, in]."""
        if self.is_conv1x1:
            return w.reshape(w.shape[0], w.shape[1])
        return w.t() if self.weight_transposed else w

    def weight_like_placeholder(self, w_nk: torch.Tensor) -> torch.Tensor:
        """[out, in] back to the placeholder's own layout (transposed, or with the conv's 1x1 dims)."""
        if self.is_conv1x1:
            return w_nk.reshape(self.weight.meta["example_value"].shape)
        return w_nk.t() if self.weight_transposed else w_nk


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


def _ints(value, n: int) -> Optional[tuple[int, ...]]:
    if isinstance(value, int):
        return (value,) * n
    if isinstance(value, (tuple, list)) and all(isinstance(v, int) for v in value):
        return tuple(value) if len(value) == n else (tuple(value) * n if len(value) == 1 else None)
    return None


def conv1x1_reason(node: fx.Node) -> Optional[str]:
    """None when the conv node is a 1x1 convolution that is a linear over channels; else why not."""
    n = _CONV[node.target]
    args = list(node.args) + [None] * (7 - len(node.args))
    stride = _ints(node.kwargs.get("stride", args[3] if args[3] is not None else 1), n)
    padding = node.kwargs.get("padding", args[4] if args[4] is not None else 0)
    groups = node.kwargs.get("groups", args[6] if args[6] is not None else 1)
    w = node.args[1].meta.get("example_value") if isinstance(node.args[1], fx.Node) else None
    if w is None or w.dim() != n + 2 or any(s != 1 for s in w.shape[2:]):
        return "kernel is not 1x1"
    if stride is None or any(s != 1 for s in stride):
        return f"stride {stride} is not 1"
    if not (padding == "valid" or _ints(padding, n) == (0,) * n):
        return f"padding {padding!r} is not 0"
    if groups != 1:
        return f"groups={groups} (grouped/depthwise: not one matrix product)"
    return None   # dilation does not matter for a 1-wide kernel


def _channels_last_input(graph: fx.Graph, conv: fx.Node) -> fx.Node:
    """The conv input as [B, *spatial, C]: one movedim node per input, shared by its 1x1 convs."""
    x = conv.args[0]
    for user in x.users:
        if user.meta.get("qoq_channels_last_of") is x:
            return user
    if x.op == "placeholder":   # graph inputs stay first: Inductor and AOTAutograd expect them so
        first = next(n for n in graph.nodes if n.op != "placeholder")
        where = graph.inserting_before(first)
    else:
        where = graph.inserting_after(x)
    with where:
        view = graph.call_function(torch.movedim, (x, 1, -1))
    view.meta["qoq_channels_last_of"] = x
    if "example_value" in x.meta:
        view.meta["example_value"] = torch.movedim(x.meta["example_value"], 1, -1)
    return view


def _as_conv1x1(qgraph: QGraph, node: fx.Node) -> Optional[LinearMatch]:
    if node.op != "call_function" or node.target not in _CONV or len(node.args) < 2:
        return None
    x, w = node.args[0], node.args[1]
    b = _arg(node, 2, "bias")
    ref = qgraph.weight_ref(w)
    if ref is None or not isinstance(x, fx.Node) or (b is not None and not isinstance(b, fx.Node)):
        return None
    if "example_value" not in w.meta:
        w.meta["example_value"] = ref.tensor
    xval = x.meta.get("example_value")
    if xval is not None and xval.dim() != _CONV[node.target] + 2:
        return None   # unbatched conv input: no channel dim 1 to move
    if conv1x1_reason(node) is not None:
        return None
    fqn = ref.fqn[: -len(".weight")] if ref.fqn.endswith(".weight") else ref.fqn
    return LinearMatch(node=node, x=_channels_last_input(qgraph.gm.graph, node), weight=w, bias=b,
                       weight_transposed=False, fqn=fqn, weight_fqn=ref.fqn, channel_dim=1)


def find_linears(qgraph: QGraph, conv1x1: bool = False) -> list[LinearMatch]:
    """Every linear layer of the graph, in graph order; with conv1x1, 1x1 convolutions too.

    Matching a 1x1 conv inserts (once) the channels-last view of its input that its match reads;
    the conv itself is left as it is until a pass rewrites it."""
    out = []
    for node in list(qgraph.gm.graph.nodes):
        m = _as_linear(qgraph, node)
        if m is None and conv1x1:
            m = _as_conv1x1(qgraph, node)
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
