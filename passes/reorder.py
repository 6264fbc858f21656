"""Activation-aware input-channel reordering for group quantization (QoQ, g128): a layer's input
channels are sorted by activation magnitude so salient channels share level-2 groups (and scales).
The permutation goes into the consumers' columns and the producer's rows (up -> down: up and gate
rows), or into an explicit gather of the input where the producer is a norm or attention.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from passes.match import LinearMatch
from passes.quantize import skip_reason
from passes.scale_groups import ScaleGroup, find_scale_groups, linear_bias, linear_weight, set_linear_weight
from qcompile.calibrate_api import MIN_CALIBRATION_ROWS, enough_rows, transform_inputs
from qcompile.calibration import CalibrationStats
from qcompile.capture import QGraph
from qcompile.config import QoQConfig


def _permute_rows(qgraph: QGraph, m: LinearMatch, perm: torch.Tensor) -> None:
    set_linear_weight(qgraph, m, linear_weight(qgraph, m)[perm])
    b = linear_bias(qgraph, m)
    if b is not None:
        qgraph.set_weight(m.bias, b[perm].contiguous())


def insert_gather(qgraph: QGraph, m: LinearMatch, perm: torch.Tensor) -> fx.Node:
    """Make `m` read `x[..., perm]` (Inductor fuses the gather into the op that produced x)."""
    x = m.x
    const = qgraph.add_constant(f"{m.fqn}.reorder", perm.to(torch.int64), before=m.node)
    with qgraph.gm.graph.inserting_before(m.node):
        gathered = qgraph.gm.graph.call_function(torch.index_select, (x, -1, const))
    xval = x.meta.get("example_value") if isinstance(x, fx.Node) else None
    if xval is not None:
        gathered.meta["example_value"] = xval
    m.node.replace_input_with(x, gathered)
    m.x = gathered
    return gathered


def reorder_group(qgraph: QGraph, group: ScaleGroup, perm: torch.Tensor) -> str:
    """Consumers read channel perm[i] at position i. Returns where the permutation went."""
    for m in group.consumers:
        set_linear_weight(qgraph, m, linear_weight(qgraph, m)[:, perm])
    # Rows can carry the permutation only when every linear feeding these channels is known:
    # the producer itself (a chain), or up and the gate(s) of a gated product.
    if group.kind == "linear" and group.index is None and (group.x is group.producer.node or group.gates):
        for p in [group.producer, *group.gates]:
            _permute_rows(qgraph, p, perm)
        return "rows of " + ", ".join(p.fqn for p in [group.producer, *group.gates])
    for m in group.consumers:
        insert_gather(qgraph, m, perm)
    return "input gather"


def reorder(qgraph: QGraph, linears: list[LinearMatch], config: QoQConfig, stats: CalibrationStats,
            details: dict[str, dict]) -> None:
    if config.weight_group_size == -1:
        return  # per-channel weights have no groups to fill
    for group in find_scale_groups(qgraph, linears):
        if not any(not skip_reason(m, linears, config, qgraph) for m in group.consumers):
            continue
        if group.kind == "fixed":
            for m in group.consumers:
                details.setdefault(m.fqn, {})["reorder"] = f"skipped: {group.reason}"
            continue
        layer_stats = [stats.get(m.fqn) for m in group.consumers]
        if not all(enough_rows(ls) for ls in layer_stats):
            for m in group.consumers:
                details.setdefault(m.fqn, {})["reorder"] = f"skipped: fewer than {MIN_CALIBRATION_ROWS} calibration rows"
            continue
        perm = torch.argsort(layer_stats[0].absmax, descending=True, stable=True)
        where = reorder_group(qgraph, group, perm)
        for ls in layer_stats:
            transform_inputs(ls, perm=perm)
        for m in group.consumers:
            details.setdefault(m.fqn, {})["reorder"] = where
