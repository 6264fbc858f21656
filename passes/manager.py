"""The pass manager: states the order of the passes for each recipe and runs them over a QGraph."""
from __future__ import annotations

import logging

import torch

from passes.lower import lower_w4a8_linear
from passes.match import find_linears
from passes.quantize import LayerDecision, output_sqnr_db, quantize_linears
from qcompile.calibration import CalibrationStats
from qcompile.capture import QGraph
from qcompile.config import QoQConfig
from runtime.registry import GraphRecord, LayerRecord

log = logging.getLogger("qoq")

# Recipe -> passes in order. Function-preserving passes come before `quantize`.
PIPELINES: dict[str, tuple[str, ...]] = {
    "w4a8": ("match", "quantize", "lower"),
    "w4a8-g128": ("match", "quantize", "lower"),
}


def run_passes(qgraph: QGraph, config: QoQConfig, stats: CalibrationStats, record: GraphRecord) -> None:
    linears = find_linears(qgraph)
    log.debug("graph %d: %d linear layers matched", record.graph_id, len(linears))
    decisions = quantize_linears(qgraph, linears, config)
    for d in decisions:
        record.layers.append(_layer_record(qgraph, d, config, stats))
        if d.qweight is not None:
            lower_w4a8_linear(qgraph, d, config)
    qgraph.materialize_overrides()
    qgraph.gm.graph.lint()
    qgraph.gm.recompile()
    for node in qgraph.gm.graph.nodes:
        if node.op == "call_function" and str(node.target).startswith("qoq."):
            name = str(node.target).rsplit(".default", 1)[0]
            record.qoq_ops[name] = record.qoq_ops.get(name, 0) + 1


def _layer_record(qgraph: QGraph, d: LayerDecision, config: QoQConfig, stats: CalibrationStats) -> LayerRecord:
    m = d.match
    shape = tuple(m.weight_shape)
    if d.qweight is None:
        log.info("qoq: %s left in FP: %s", m.fqn, d.reason)
        return LayerRecord(name=m.fqn, kind="linear", shape=shape, quantized=False, reason=d.reason)
    sqnr = None
    layer_stats = stats.get(m.fqn) if stats is not None else None
    if layer_stats is not None and layer_stats.samples.shape[0] > 0:
        w = qgraph.weight(m.weight)
        sqnr = output_sqnr_db(layer_stats.samples, w.t() if m.weight_transposed else w, d.qweight)
    return LayerRecord(
        name=m.fqn, kind="linear", shape=shape, quantized=True, format=d.qweight.format,
        group_size=d.qweight.group_size, kernel=f"qoq.w4a8_gemm ({config.kernels})", sqnr_db=sqnr,
    )
