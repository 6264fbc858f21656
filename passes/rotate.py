"""Block-input rotation (QuaRot/QServe style): the residual stream of an RMSNorm model is rotated by
an orthogonal Q (a randomized Hadamard matrix, or a random orthogonal one where the width is not a
power of two), folded into the weights: embedding E·Q, writers (o_proj, down_proj) Qᵀ·W, readers
(q/k/v, gate/up, lm_head) diag(γ)-folded then ·Q, norm weights set to 1. RMSNorm commutes with Q, so
the FP function is kept; outlier channels of the block inputs are spread over all channels.
"""
from __future__ import annotations

import math
import operator

import torch
import torch.fx as fx

from passes.match import LinearMatch
from passes.scale_groups import _keeps_channels, as_norm, channel_source, channel_users, linear_bias, linear_weight, set_linear_weight
from qcompile.artifact import WEIGHT_COPY_META
from qcompile.calibrate_api import transform_inputs
from qcompile.calibration import CalibrationStats
from qcompile.capture import QGraph
from qcompile.config import QoQConfig

_EMBEDDING = {torch.nn.functional.embedding}
_ADD = {operator.add, torch.add}
_MUL = {operator.mul, torch.mul}
_INVARIANT_OPS = {operator.add, torch.add, operator.mul, torch.mul, operator.truediv, torch.rsqrt, torch.sqrt,
                  "add", "mul", "rsqrt", "sqrt", "to", "float", "reciprocal"}


def _is_prime(p: int) -> bool:
    return p > 1 and all(p % f for f in range(2, math.isqrt(p) + 1))


def _paley(q: int) -> torch.Tensor:
    """Paley's construction I: a ±1 Hadamard matrix of order q + 1 for a prime q ≡ 3 (mod 4)."""
    squares = {(i * i) % q for i in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if i in squares else -1.0 for i in range(1, q)])
    idx = torch.arange(q)
    jacobsthal = chi[(idx[None, :] - idx[:, None]) % q]  # antisymmetric since -1 is a non-square mod q
    s = torch.zeros(q + 1, q + 1)
    s[0, 1:] = 1.0
    s[1:, 0] = -1.0
    s[1:, 1:] = jacobsthal
    return s + torch.eye(q + 1)


def hadamard_matrix(n: int) -> torch.Tensor | None:
    """A ±1 [n, n] with H·Hᵀ = n·I where one is built here, else None: Sylvester's doubling for powers
    of two (the same matrix rotation_matrix always used), times a Paley block of order p + 1 (p a
    prime ≡ 3 mod 4) otherwise, e.g. 80 = 20·4 and 96 = 12·8 (head_dims of Phi models)."""
    if n < 1:
        return None
    k = (n & -n).bit_length() - 1  # the power of two in n
    for j in range(k, -1, -1):
        m = n >> j
        if m == 1:
            base = torch.ones(1, 1)
        elif _is_prime(m - 1) and (m - 1) % 4 == 3:
            base = _paley(m - 1)
        else:
            continue
        h = base
        while h.shape[0] < n:
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
        return h
    return None


def randomized_hadamard(n: int, seed: int = 0) -> torch.Tensor | None:
    """hadamard_matrix(n) with seeded random column signs, scaled to be orthogonal; None where there is none."""
    h = hadamard_matrix(n)
    if h is None:
        return None
    g = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (n,), generator=g).float() * 2 - 1
    return (h * signs[None, :]) / math.sqrt(n)


def rotation_matrix(n: int, seed: int = 0) -> torch.Tensor:
    """Orthogonal [n, n]: Hadamard with random signs for powers of two, else a seeded random orthogonal."""
    if n & (n - 1) == 0:
        return randomized_hadamard(n, seed)
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))[None, :]).float()


class _Plan:
    def __init__(self):
        self.embedding: fx.Node | None = None  # the embedding weight placeholder
        self.readers: list[LinearMatch] = []
        self.writers: list[LinearMatch] = []
        self.norms = []


def _target_name(n: fx.Node) -> str:
    return getattr(n.target, "__name__", str(n.target))


def plan_rotation(qgraph: QGraph, linears: list[LinearMatch]) -> tuple[_Plan | None, str]:
    """Follow the residual stream from the embedding; every op on it must commute with a rotation."""
    by_node = {m.node: m for m in linears}
    plan = _Plan()
    state: dict[fx.Node, str] = {}  # "rot": rotated channels; "sq": squares; "inv": per-token scalars
    for n in qgraph.gm.graph.nodes:
        if n.op == "call_function" and n.target in _EMBEDDING:
            w = n.args[1] if len(n.args) > 1 else n.kwargs.get("weight")
            if qgraph.weight_ref(w) is None:
                return None, "the embedding weight is not a model parameter"
            if plan.embedding is not None:
                return None, "more than one embedding feeds the graph"
            plan.embedding = w
            state[n] = "rot"
            continue
        ins = {state.get(a) for a in n.all_input_nodes} - {None}
        if not ins:
            continue
        if n.op == "output":
            if "rot" in ins:
                return None, "the residual stream is a graph output (hidden states returned?)"
            continue
        if n in by_node and state.get(by_node[n].x) == "rot":
            m = by_node[n]
            if state.get(m.weight) or (m.bias is not None and state.get(m.bias)):
                return None, f"{m.fqn} reads the residual stream as a weight"
            plan.readers.append(m)
            continue
        if "rot" in ins and _keeps_channels(n) and state.get(n.args[0]) == "rot":
            state[n] = "rot"
            continue
        if n.op == "call_function" and n.target in _ADD and ins == {"rot"} and len(n.args) == 2:
            a, b = n.args
            if state.get(a) == "rot" and state.get(b) == "rot":
                state[n] = "rot"
                continue
            other = b if state.get(a) == "rot" else a
            src = channel_source(other) if isinstance(other, fx.Node) else None
            if src in by_node and channel_users(src) <= {n}:
                plan.writers.append(by_node[src])
                state[n] = "rot"
                continue
            return None, f"{n.name} adds something that is not a linear layer's output to the residual stream"
        if (n.op == "call_method" and n.target == "pow" or n.op == "call_function" and n.target in (torch.pow, operator.pow)) \
                and ins == {"rot"} and n.args[1] == 2:
            state[n] = "sq"
            continue
        if n.op == "call_method" and n.target == "mean" and ins == {"sq"}:
            dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
            if dim in (-1, (-1,), [-1]) and (n.kwargs.get("keepdim") or (len(n.args) > 2 and n.args[2])):
                state[n] = "inv"
                continue
            return None, f"{n.name} reduces the residual stream over another dim"
        if ins == {"inv"} and (n.target in _INVARIANT_OPS):
            state[n] = "inv"
            continue
        if n.op == "call_function" and n.target in _MUL | {operator.truediv} and ins == {"rot", "inv"}:
            state[n] = "rot"
            continue
        if n.op == "call_function" and n.target in _MUL and ins == {"rot"}:
            norm = as_norm(qgraph, n)
            if norm is not None and norm.bias is None:
                plan.norms.append(norm)
                state[n] = "rot"
                continue
        return None, f"the residual stream is read by {n.name} ({_target_name(n)}), which does not commute with a rotation"
    if plan.embedding is None:
        return None, "no embedding starts a residual stream"
    if not plan.readers or not plan.writers:
        return None, "no linear reads from and writes into the residual stream"
    return plan, ""


def rotate(qgraph: QGraph, linears: list[LinearMatch], config: QoQConfig, stats: CalibrationStats,
           details: dict[str, dict]) -> None:
    plan, reason = plan_rotation(qgraph, linears)
    if plan is None:
        for m in linears:
            details.setdefault(m.fqn, {})["rotate"] = f"skipped: {reason}"
        return
    E = qgraph.weight(plan.embedding).detach()
    Q = rotation_matrix(E.shape[1]).to(E.device)
    gamma = {}
    for norm in plan.norms:
        g = qgraph.weight(norm.weight).detach().float()
        for user in channel_users(norm.node):
            gamma[user] = g
    for m in plan.readers:
        g = gamma.get(m.node)
        w = linear_weight(qgraph, m).float()
        if g is not None:
            w = w * g[None, :]
        new = (w @ Q).to(linear_weight(qgraph, m).dtype)
        if m.weight is plan.embedding:
            # Tied output projection: it needs its own copy, the embedding takes E·Q. The meta tag lets
            # the artifact record the copy, so later graphs of the model (decode) replay this rewrite.
            if m.weight_transposed or m.node.target not in (torch._C._nn.linear, torch.nn.functional.linear):
                raise RuntimeError(f"qoq rotate: tied weight of {m.fqn} is read in an unexpected form")
            const = qgraph.add_constant(f"{m.fqn}.rotated", new.contiguous(), before=m.node)
            const.meta[WEIGHT_COPY_META] = m.fqn
            m.node.replace_input_with(m.weight, const)
        else:
            set_linear_weight(qgraph, m, new)
        ls = stats.get(m.fqn) if stats is not None else None
        if ls is not None:
            transform_inputs(ls, divide=g, rotation=Q)
        details.setdefault(m.fqn, {})["rotate"] = "input rotated" + (" (norm weight folded)" if g is not None else "")
    for m in plan.writers:
        w = linear_weight(qgraph, m)
        set_linear_weight(qgraph, m, (Q.t() @ w.float()).to(w.dtype))
        b = linear_bias(qgraph, m)
        if b is not None:
            qgraph.set_weight(m.bias, (b.float() @ Q).to(b.dtype))
        details.setdefault(m.fqn, {})["rotate"] = "output rotated"
    for norm in plan.norms:
        w = qgraph.weight(norm.weight)
        qgraph.set_weight(norm.weight, torch.ones_like(w))
    qgraph.set_weight(plan.embedding, (E.float() @ Q).to(E.dtype))
