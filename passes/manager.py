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
from qcompile.debug import pass_stage
from qcompile.fallback import lower_layer_or_fp
from runtime.registry import GraphRecord, LayerRecord

log = logging.getLogger("qoq")

# Recipe -> passes in order. Function-preserving passes come before `quantize`.
PIPELINES: dict[str, tuple[str, ...]] = {
    "w4a8": ("match", "quantize", "lower"),
    "w4a8-g128": ("match", "quantize", "lower"),
    "qoq": ("match", "rotate", "smooth_attention", "smooth", "reorder", "quantize", "gptq", "lower"),
    "qoq-chn": ("match", "rotate", "smooth_attention", "smooth", "reorder", "quantize", "gptq", "lower"),
    "svdquant": ("match", "lowrank", "lower"),  # lowrank does its own smoothing search and quantization
    "w4a8-svd": ("match", "lowrank", "lower"),
}
# QoQ's function-preserving passes; each also needs its config flag (a recipe default or an option).
_REWRITES = ("rotate", "smooth_attention", "smooth", "reorder")


def _rewrite(name: str):
    import importlib

    return getattr(importlib.import_module(f"passes.{name}"), name)  # passes/<name>.py defines <name>()


def run_qoq_passes(qgraph: QGraph, config: QoQConfig, stats: CalibrationStats, details: dict[str, dict]):
    """Run the recipe's function-preserving passes; returns statistics that follow the new inputs."""
    from qcompile.calibrate_api import working_copy

    pipeline = PIPELINES.get(config.recipe, ())
    stats = working_copy(stats)
    for name in pipeline:
        if name in _REWRITES and getattr(config, name):
            with pass_stage(name, qgraph.gm):  # QOQ_DEBUG_DIR dumps; a failure names the pass
                _rewrite(name)(qgraph, find_linears(qgraph), config, stats, details)
    return stats


def run_passes(qgraph: QGraph, config: QoQConfig, stats: CalibrationStats, record: GraphRecord) -> None:
    if config.recipe in ("svdquant", "w4a8-svd"):
        _run_svdquant(qgraph, config, stats, record)
    else:
        _run_w4a8(qgraph, config, stats, record)
    if config.kv_bits == 4:
        from passes.kv_cache import kv_cache

        if config.rotate_kv:  # before kv_cache: it then quantizes the rotated K and V
            from passes.rotate_kv import rotate_kv

            with pass_stage("rotate_kv", qgraph.gm):
                rotate_kv(qgraph, values=config.rotate_kv_values)

        with pass_stage("kv_cache", qgraph.gm):
            record.layers.extend(kv_cache(qgraph, kernels=config.kernels, release_fp_cache=config.release_fp_cache).records)
    finish_graph(qgraph, record)


def finish_graph(qgraph: QGraph, record: GraphRecord) -> None:
    """Check and regenerate the rewritten graph; count its qoq ops for the report."""
    qgraph.gm.graph.lint()
    qgraph.gm.recompile()
    count_qoq_ops(qgraph, record)


def count_qoq_ops(qgraph: QGraph, record: GraphRecord) -> None:
    """record.qoq_ops: how many calls of each qoq op the graph makes (the report's kernel counts)."""
    record.qoq_ops.clear()
    for node in qgraph.gm.graph.nodes:
        if node.op == "call_function" and str(node.target).startswith("qoq."):
            name = str(node.target).rsplit(".default", 1)[0]
            record.qoq_ops[name] = record.qoq_ops.get(name, 0) + 1


def _run_svdquant(qgraph: QGraph, config: QoQConfig, stats: CalibrationStats, record: GraphRecord) -> None:
    from passes.lowrank import SVDQuantOptions, layer_records, svdquant_pass

    opts = SVDQuantOptions.from_config(config)
    linears = find_linears(qgraph, conv1x1=True)  # SVDQuant also takes 1x1 convs (UNets)
    with pass_stage("lowrank", qgraph.gm):
        decisions = svdquant_pass(qgraph, linears, stats, opts)
        qgraph.materialize_overrides()
    record.layers += layer_records(decisions, {m.fqn: tuple(m.weight_shape) for m in linears}, opts)


def _run_w4a8(qgraph: QGraph, config: QoQConfig, stats: CalibrationStats, record: GraphRecord) -> None:
    details: dict[str, dict] = {}  # module FQN -> what the QoQ passes did to it
    pipeline = PIPELINES.get(config.recipe, ())
    if any(p in _REWRITES or p == "gptq" for p in pipeline):
        stats = run_qoq_passes(qgraph, config, stats, details)
    linears = find_linears(qgraph)
    log.debug("graph %d: %d linear layers matched", record.graph_id, len(linears))
    with pass_stage("quantize", qgraph.gm):
        decisions = quantize_linears(qgraph, linears, config)
    if "gptq" in pipeline and (config.gptq or config.clip_search):
        from passes.gptq import search_weights

        with pass_stage("gptq", qgraph.gm):
            decisions = search_weights(qgraph, decisions, config, stats, details)
    with pass_stage("lower", qgraph.gm):
        lowered: dict = {}  # FP linear node -> the node that replaced it
        for d in decisions:
            record.layers.append(_layer_record(qgraph, d, config, stats))
            record.layers[-1].details.update(details.get(d.match.fqn, {}))
            if d.qweight is not None:
                # Back-to-back linears: this one's input may be a linear lowered (and erased) just before.
                d.match.x = lowered.get(d.match.x, d.match.x)
                y = lower_layer_or_fp(qgraph, d, config, record.layers[-1], lower_w4a8_linear)  # one bad layer stays FP
                if y is not None:
                    lowered[d.match.node] = y
        record.layers += _weight_copy_records(qgraph, {d.match.fqn for d in decisions})
        qgraph.materialize_overrides()


def _weight_copy_records(qgraph: QGraph, seen: set[str]) -> list[LayerRecord]:
    """FP linears that read a pass's own copy of a shared weight (rotate's tied lm_head): find_linears
    matches parameters only, so without these the report would not list them at all."""
    from qcompile.artifact import WEIGHT_COPY_META, WEIGHT_COPY_REASON

    out = []
    for node in qgraph.gm.graph.nodes:
        fqn = node.meta.get(WEIGHT_COPY_META) if node.op == "get_attr" else None
        if fqn and fqn not in seen:
            seen.add(fqn)
            out.append(LayerRecord(name=fqn, kind="linear", shape=tuple(getattr(qgraph.gm, node.target).shape),
                                   quantized=False, reason=WEIGHT_COPY_REASON))
    return out


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
