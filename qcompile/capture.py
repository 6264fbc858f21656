"""Dynamo graph + example inputs -> QGraph: the FX graph, its weights by module FQN, the runtime inputs.

Weights are told apart from runtime inputs by where Dynamo says a placeholder came from
(`node.meta["grapharg"].source`): a parameter or buffer reached through the module tree.
Passes never mutate the user's parameters: a new value for a weight is an override that
`lower` turns into a graph constant.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.fx as fx

_ROOT = re.compile(r"^[LG]\[['\"][^'\"]+['\"]\]")
_ARG_INDEX = re.compile(r"\[\d+\](?=\._(?:modules|parameters|buffers)\[|\.__dict__\[)")
_TOKEN = re.compile(
    r"\.__dict__\[['\"]_(?:modules|parameters|buffers)['\"]\]\[['\"]([^'\"]+)['\"]\]"  # L['self'].__dict__['_modules']['x'] (diffusers)
    r"|\._(?:modules|parameters|buffers)\[['\"]([^'\"]+)['\"]\]"  # L['self']._modules['layers']
    r"|\.([A-Za-z_][A-Za-z0-9_]*)"                                 # L['self'].layers (older Dynamo)
    r"|\[['\"]?([^'\"\]]+)['\"]?\]"                               # [0] / ['0']
)


def _source_name(source: Any) -> Optional[str]:
    if source is None:
        return None
    name = source.name
    return name() if callable(name) else name


def fqn_from_source(name: str) -> Optional[str]:
    """`L['self']._modules['mlp']._parameters['weight']` -> `mlp.weight`; None if not a module attribute."""
    if "_parameters[" not in name and "_buffers[" not in name:
        return None
    root = _ROOT.match(name)
    if not root:
        return None
    start = root.end()
    # `L['args'][0]._modules[...]`: the module came in through *args (transformers >= 5.25 wraps
    # forward in a decorator taking *args); the tuple index is not part of its name.
    index = _ARG_INDEX.match(name, start) if root.group(0)[3:-2] == "args" else None
    if index is not None:
        start = index.end()
    parts = [next(g for g in m.groups() if g is not None) for m in _TOKEN.finditer(name, start)]
    return ".".join(parts) if parts else None


@dataclass
class WeightRef:
    fqn: str
    tensor: torch.Tensor
    index: int  # position among the graph's inputs


@dataclass
class QGraph:
    gm: fx.GraphModule
    example_inputs: list
    weights: dict[str, WeightRef]  # placeholder name -> weight
    overrides: dict[str, torch.Tensor] = field(default_factory=dict)  # placeholder name -> new value
    _constant_count: int = 0

    # -- weights ---------------------------------------------------------------------------
    def weight_ref(self, node: Any) -> Optional[WeightRef]:
        if isinstance(node, fx.Node) and node.op == "placeholder":
            return self.weights.get(node.name)
        return None

    def weight(self, node: fx.Node) -> torch.Tensor:
        """Current value of a weight placeholder (a pass's override if there is one)."""
        if node.name in self.overrides:
            return self.overrides[node.name]
        return self.weights[node.name].tensor

    def set_weight(self, node: fx.Node, value: torch.Tensor) -> None:
        """Give a weight a new value for this graph (the user's parameter is left as it was)."""
        ref = self.weights[node.name]
        if value.shape != ref.tensor.shape:
            raise ValueError(f"new value for {ref.fqn} has shape {tuple(value.shape)}, expected {tuple(ref.tensor.shape)}")
        self.overrides[node.name] = value.detach()

    # -- constants -------------------------------------------------------------------------
    def add_constant(self, stem: str, value: torch.Tensor, before: fx.Node) -> fx.Node:
        """Attach `value` to the graph module and return a get_attr node for it, placed before `before`."""
        name = f"_qoq_{re.sub(r'[^0-9A-Za-z_]', '_', stem)}_{self._constant_count}"
        self._constant_count += 1
        self.gm.register_buffer(name, value, persistent=False)
        # AOTAutograd matches every parameter/buffer of a Dynamo graph module to a source.
        sources = getattr(self.gm, "_param_name_to_source", None)
        if sources is not None:
            from torch._dynamo.source import ConstantSource

            sources[name] = ConstantSource(name)
        with self.gm.graph.inserting_before(before):
            return self.gm.graph.get_attr(name)

    def materialize_overrides(self) -> None:
        """Uses of an overridden weight read a graph constant holding the new value."""
        first = next(iter(n for n in self.gm.graph.nodes if n.op != "placeholder"), None)
        for node in list(self.gm.graph.nodes):
            if node.op == "placeholder" and node.name in self.overrides and node.users:
                const = self.add_constant(self.weights[node.name].fqn, self.overrides[node.name], first)
                node.replace_all_uses_with(const)


def capture(gm: fx.GraphModule, example_inputs: list) -> QGraph:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    weights: dict[str, WeightRef] = {}
    for i, node in enumerate(placeholders):
        grapharg = node.meta.get("grapharg")
        value = example_inputs[i] if i < len(example_inputs) else None
        if grapharg is None or not isinstance(value, torch.Tensor):
            continue
        name = _source_name(getattr(grapharg, "source", None))
        fqn = fqn_from_source(name) if name else None
        if fqn is None and isinstance(value, torch.nn.Parameter) and name:
            fqn = name
        if fqn is not None:
            weights[node.name] = WeightRef(fqn=fqn, tensor=value, index=i)
    return QGraph(gm=gm, example_inputs=list(example_inputs), weights=weights)
