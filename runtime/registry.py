"""Records of what each compile did to each layer, kept for `qcompile.report`.

Records are found from the model's parameters (weakly referenced), so a report works on the
compiled module, the original module, or a model whose `forward` alone was compiled.
"""
from __future__ import annotations

import itertools
from torch.utils.weak import WeakIdKeyDictionary
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch


@dataclass
class LayerRecord:
    name: str  # module FQN
    kind: str  # "linear", "attention"
    shape: tuple  # (out_features, in_features) for a linear
    quantized: bool
    format: str = "fp"
    group_size: Optional[int] = None
    kernel: str = ""
    reason: str = ""  # why it was left in FP
    sqnr_db: Optional[float] = None  # output SQNR vs FP on calibration rows
    details: dict = field(default_factory=dict)  # rank, smoothing, KV bits... as passes add them


@dataclass
class GraphRecord:
    graph_id: int
    recipe: str
    layers: list[LayerRecord] = field(default_factory=list)
    qoq_ops: dict[str, int] = field(default_factory=dict)  # torch.ops.qoq.* calls in the final graph
    fallback: str = ""  # why the whole graph was left in FP (a pass or Inductor failed), "" otherwise


_GRAPH_IDS = itertools.count()
GRAPHS: list[GraphRecord] = []
_BY_PARAM: WeakIdKeyDictionary = WeakIdKeyDictionary()


def new_graph_record(recipe: str) -> GraphRecord:
    rec = GraphRecord(graph_id=next(_GRAPH_IDS), recipe=recipe)
    GRAPHS.append(rec)
    return rec


def link_params(record: GraphRecord, params: list[torch.Tensor]) -> None:
    for p in params:
        lst = _BY_PARAM.setdefault(p, [])
        if record not in lst:
            lst.append(record)


def graphs_for(model) -> list[GraphRecord]:
    """The graph records whose weights belong to `model` (all records if it has no parameters)."""
    module = getattr(model, "_orig_mod", model)
    if hasattr(module, "__self__") and isinstance(module.__self__, torch.nn.Module):  # a compiled bound forward
        module = module.__self__
    if not isinstance(module, torch.nn.Module):
        return list(GRAPHS)
    seen: dict[int, GraphRecord] = {}
    for p in itertools.chain(module.parameters(), module.buffers()):
        for rec in _BY_PARAM.get(p, []):
            seen[rec.graph_id] = rec
    return [seen[k] for k in sorted(seen)]


def as_dict(records: list[GraphRecord]) -> dict:
    return {"graphs": [asdict(r) for r in records]}
