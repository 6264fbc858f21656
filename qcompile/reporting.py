"""`qcompile.report(model)`: what each compile did to each layer, as a table and as a dict."""
from __future__ import annotations

from runtime.registry import GraphRecord, as_dict, graphs_for


class Report:
    def __init__(self, graphs: list[GraphRecord]):
        self.graphs = graphs

    def to_dict(self) -> dict:
        return as_dict(self.graphs)

    @property
    def layers(self):
        return [layer for g in self.graphs for layer in g.layers]

    def __str__(self) -> str:
        if not self.graphs:
            return "qoq report: no graph compiled with backend='qoq' reads this model's weights yet (run it once)."
        lines = []
        for g in self.graphs:
            q = sum(layer.quantized for layer in g.layers)
            lines.append(f"graph {g.graph_id} (recipe {g.recipe}): {q} of {len(g.layers)} layers quantized")
            lines.append(f"  {'layer':<48} {'shape':>14} {'format':<18} {'group':>5} {'SQNR dB':>8}  kernel / reason")
            for layer in g.layers:
                shape = "x".join(str(s) for s in layer.shape)
                sqnr = f"{layer.sqnr_db:8.2f}" if layer.sqnr_db is not None else f"{'-':>8}"
                group = "" if layer.group_size is None else str(layer.group_size)
                tail = layer.kernel if layer.quantized else f"FP: {layer.reason}"
                lines.append(f"  {layer.name:<48} {shape:>14} {layer.format:<18} {group:>5} {sqnr}  {tail}")
        return "\n".join(lines)

    __repr__ = __str__


def report(model) -> Report:
    """The layers of `model` (compiled module, original module, or compiled forward) and what qoq did."""
    return Report(graphs_for(model))
