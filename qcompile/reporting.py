"""`qcompile.report(model)`: what each compile did to each layer, as a table and as a dict.

One table per compiled graph: format, group size, low-rank rank, smoothing passes, KV bits, the
kernel, and output SQNR against FP on the calibration rows; FP layers show the reason instead.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Optional

from runtime.registry import GraphRecord, LayerRecord, as_dict, graphs_for


def _applied(value: Any) -> bool:
    """A pass's entry in `details` means it changed the layer (not 'skipped: ...' or 'none ...')."""
    if value is None or value is False:
        return False
    return not (isinstance(value, str) and (value.startswith("skipped") or value.startswith("none")))


def smoothing(layer: LayerRecord) -> str:
    """The function-preserving passes that changed this layer, short: smooth, sattn, reorder, gptq."""
    d = layer.details
    names = [("smooth", "smooth"), ("smooth_attention", "sattn"), ("reorder", "reorder"), ("rotate", "rotate"),
             ("gptq", "gptq")]
    done = [short for key, short in names if _applied(d.get(key))]
    if "rank" in d and "alpha" in d:  # SVDQuant's smoothing lives with its low-rank branch
        done.insert(0, f"svd-smooth a={d['alpha']:.2f}")
    return ",".join(done) or "-"


class Report:
    """The records of one model's compiles. `str(report)` is the table; `report.to_dict()` is for tools."""

    def __init__(self, graphs: list[GraphRecord]):
        self.graphs = graphs

    def to_dict(self) -> dict:
        return as_dict(self.graphs)

    def to_json(self, **kw) -> str:
        # details may hold numbers from torch (0-d tensors, dtypes): str() keeps the dump total.
        return json.dumps(self.to_dict(), default=str, **kw)

    @classmethod
    def from_dict(cls, data: dict) -> "Report":
        """The inverse of `to_dict` (for `python -m qcompile report`, reading a saved report)."""
        def known(kind, d: dict) -> dict:  # a report written by a newer qoq may carry more fields
            names = {f.name for f in dataclasses.fields(kind)}
            return {k: v for k, v in d.items() if k in names}

        graphs = []
        for g in data.get("graphs", []):
            layers = [LayerRecord(**{**known(LayerRecord, layer), "shape": tuple(layer.get("shape", ()))})
                      for layer in g.get("layers", [])]
            graphs.append(GraphRecord(**{**known(GraphRecord, g), "layers": layers}))
        return cls(graphs)

    @property
    def layers(self) -> list[LayerRecord]:
        return [layer for g in self.graphs for layer in g.layers]

    @property
    def fp_layers(self) -> list[LayerRecord]:
        return [layer for layer in self.layers if not layer.quantized]

    def __str__(self) -> str:
        if not self.graphs:
            return "qoq report: no graph compiled with backend='qoq' reads this model's weights yet (run it once)."
        lines = []
        for g in self.graphs:
            lines.extend(_graph_table(g))
        return "\n".join(lines)

    __repr__ = __str__


def _graph_table(g: GraphRecord) -> list[str]:
    layers = [layer for layer in g.layers if layer.kind != "other"]
    q = sum(layer.quantized for layer in layers)
    others = len(g.layers) - len(layers)
    ops = ", ".join(f"{k} x{v}" for k, v in sorted(g.qoq_ops.items())) or "none"
    extra = f" (+{others} other weights in FP)" if others else ""
    lines = [f"graph {g.graph_id} (recipe {g.recipe}): {q} of {len(layers)} layers quantized{extra}; qoq ops: {ops}"]
    if getattr(g, "fallback", ""):
        lines.append(f"  whole graph left in FP: {g.fallback}")
    if not g.layers:
        return lines
    width = max(24, *(len(layer.name) for layer in g.layers))
    lines.append(f"  {'layer':<{width}} {'kind':<9} {'shape':>12} {'format':<20} {'group':>5} {'rank':>4} "
                 f"{'smoothing':<22} {'KV':>2} {'SQNR dB':>8}  kernel / reason")
    for layer in g.layers:
        lines.append("  " + _row(layer, width))
    return lines


def _cell(value: Optional[Any]) -> str:
    return "-" if value is None or value == "" else str(value)


def _row(layer: LayerRecord, width: int) -> str:
    shape = "x".join(str(s) for s in layer.shape) or "-"
    d = layer.details
    sqnr = f"{layer.sqnr_db:8.2f}" if layer.sqnr_db is not None else f"{'-':>8}"
    group = "per-ch" if layer.group_size == -1 else _cell(layer.group_size)
    kv = _cell(d.get("kv_bits"))
    tail = layer.kernel if layer.quantized else f"FP: {layer.reason}"
    if layer.quantized and layer.reason:  # quantized, with a caveat (e.g. simulated weight-only)
        tail += f" ({layer.reason})"
    return (f"{layer.name:<{width}} {layer.kind:<9} {shape:>12} {layer.format:<20} {group:>5} {_cell(d.get('rank')):>4} "
            f"{smoothing(layer):<22} {kv:>2} {sqnr}  {tail}")


def report(model) -> Report:
    """The layers of `model` (compiled module, original module, or compiled forward) and what qoq did."""
    return Report(graphs_for(model))
