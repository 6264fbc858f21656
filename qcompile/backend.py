"""The `qoq` torch.compile backend: capture -> calibrate -> passes -> Inductor (or the FX graph).

Registered as the `torch_dynamo_backends` entry point `qoq`, so `torch.compile(model, backend="qoq")`
works without importing us. The backend is for inference: the graphs it returns run under no_grad.
"""
from __future__ import annotations

import copy
import functools
import logging
import operator
import weakref
from typing import Any, Callable, Optional

import torch
import torch.fx as fx

from passes.manager import run_passes
from passes.match import find_linears
from qcompile.calibration import CalibrationStats, calibrate_graph
from qcompile.capture import capture
from qcompile.config import QoQConfig, make_config
from qcompile.fallback import FallbackGuard, copy_graph
from qcompile.artifact import artifact_config, record_constants, remember_graph, replay
from runtime.kv_cache import kv4_buffers_for
from runtime.artifact import ArtifactData, ArtifactError, load, records_for, remember
from runtime.registry import GraphRecord, link_params, new_graph_record
from runtime.weights import is_released, release

log = logging.getLogger("qoq")


def qoq_backend(gm: fx.GraphModule, example_inputs: list, options: Optional[dict] = None,
                mode: Optional[str] = None, **unused: Any) -> Callable:
    config = make_config(options, mode)
    return compile_graph(gm, example_inputs, config)


def compile_graph(gm: fx.GraphModule, example_inputs: list, config: QoQConfig) -> Callable:
    """Compile `gm` for the weights in `example_inputs`; the returned runner checks, on every call,
    that it gets those very tensors. Dynamo reuses a graph for another module instance of the same
    code (regional compilation of repeated blocks): the packed weights baked into this graph belong
    to the first one, so other weights get their own compile (replaying the same quantization), never
    the first one's numbers. KV caches need no compile of their own: the KV4 ops find each cache's
    buffers at run time (lowering/kv4_cache.py); the runner only makes a new cache's buffers first."""
    pristine = _copy_graph_module(gm)
    placeholders = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    fn, record = _compile_once(gm, example_inputs, config)
    indices = sorted({w.index for w in capture(pristine, example_inputs).weights.values()})
    caches = [(placeholders.index(k), placeholders.index(v)) for k, v in _kv4_cache_inputs(record)]
    if not indices and not caches:
        return fn
    variants: dict[tuple, tuple[list, Callable]] = {}
    # C-level loops: this runs on every call, a decode step of an 8B model checks ~290 tensors.
    pick = operator.itemgetter(*indices) if len(indices) > 1 else (lambda a: (a[indices[0]],) if indices else ())
    expected_t = tuple(example_inputs[i] for i in indices)
    # weakly held: the runner must not keep a dropped cache (and its KV4 buffers) alive. None at first,
    # so the first call also frees the example caches (release_fp_cache).
    last_cache: list = [lambda: None]

    @functools.wraps(fn)
    def run(*args):
        # A cache the graph has not met yet (Dynamo reuses the graph for any cache its guards accept)
        # gets its KV4 buffers here, outside the graph's run and so outside any CUDA-graph pool.
        if caches and args[caches[0][0]] is not last_cache[0]():
            for k, v in caches:
                kv4_buffers_for(args[k], args[v], config.release_fp_cache)
            last_cache[0] = weakref.ref(args[caches[0][0]])
        if all(map(operator.is_, pick(args), expected_t)):
            return fn(*args)
        key = tuple(map(id, pick(args)))
        hit = variants.get(key)
        # weak references: a variant must not keep dropped weights alive, nor serve a new tensor
        # that happens to get a dead one's id
        if hit is None or not all(ref() is a for ref, a in zip(hit[0], pick(args))):
            log.info("qoq: graph reused for other weights; compiling for them")
            # variants of dropped weights go: their graphs hold packed copies
            for dead in [k for k, (refs, _) in variants.items() if any(r() is None for r in refs)]:
                del variants[dead]
            hit = ([weakref.ref(a) for a in pick(args)], compile_graph(_copy_graph_module(pristine), list(args), config))
            variants[key] = hit
        return hit[1](*args)

    return run


def _kv4_cache_inputs(record: GraphRecord) -> list[tuple[str, str]]:
    """(K, V) placeholder names of the FP caches the KV4 pass rewrote (their buffers are found at run time)."""
    return [tuple(layer.details["cache_inputs"]) for layer in record.layers
            if layer.kind == "attention" and layer.quantized and "cache_inputs" in layer.details]


def _copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of Dynamo's graph module before any pass touched it (nodes and meta; weights are inputs)."""
    new = fx.GraphModule(gm, copy_graph(gm.graph))
    for attr in ("_param_name_to_source", "meta"):
        if hasattr(gm, attr):
            setattr(new, attr, copy.copy(getattr(gm, attr)))
    return new


def _compile_once(gm: fx.GraphModule, example_inputs: list, config: QoQConfig) -> Callable:
    with torch.no_grad():
        qgraph = capture(gm, example_inputs)
        record = new_graph_record(config.recipe)
        guard = FallbackGuard(qgraph, config, record)  # a pass or Inductor failure leaves this graph in FP
        params = [w.tensor for w in qgraph.weights.values()]
        link_params(record, params)
        saved = _saved_rewrite(qgraph, config)
        if saved is not None and saved[1] == _EARLIER:
            # Replayed on a copy: a rewrite that does not fit this graph leaves Dynamo's graph untouched.
            trial = capture(_copy_graph_module(gm), example_inputs)
            trial_guard = FallbackGuard(trial, config, record)
            if _try_replay(trial, saved[0], config, record):
                qgraph, guard, data = trial, trial_guard, saved[0]
            else:
                record.layers.clear()
                saved = None
        elif saved is not None:
            # From an artifact, or a recompile after release: the recorded rewrite, no calibration.
            data, source = saved
            replay(qgraph, data, config, record, source)
            remember(data, params)
        if saved is None:
            consts = record_constants(qgraph)
            stats = config.calibration
            if stats is None:
                linears = find_linears(qgraph)
                watch = {m.node: (m.fqn, m.x) for m in linears}
                stats = guard.calibrate(calibrate_graph, gm, example_inputs, watch, {w.index for w in qgraph.weights.values()})
            elif not isinstance(stats, CalibrationStats):
                raise TypeError(
                    f"option calibration: expected the statistics returned by qcompile.calibrate(...), got {type(stats).__name__}"
                )
            guard.run_passes(stats)
            data = remember_graph(qgraph, consts, record, config)
        if config.fuse_gemms:  # after the record: artifacts keep per-layer tensors, a replay fuses again
            guard.fuse_gemms(data.tensors if data is not None else None)
        if config.release_fp_weights:
            release_quantized_weights(qgraph, record, data)
        log.debug("qoq graph %d after passes:\n%s", record.graph_id, qgraph.gm.code)
        compiled = guard.compile(example_inputs)
    return _inference(compiled), record


def _saved_rewrite(qgraph, config: QoQConfig) -> Optional[tuple[ArtifactData, str]]:
    """The recorded rewrite this graph must replay, if any: the artifact, or the records of weights
    whose FP storage was released (they cannot be calibrated or quantized again)."""
    if config.artifact is not None:
        return load(config.artifact), f"artifact {config.artifact!r}"
    released = [w for w in qgraph.weights.values() if is_released(w.tensor)]
    if not released:
        return _earlier_rewrite(qgraph, config)
    data = records_for([w.tensor for w in released])
    if data is None or data.unsaveable:
        why = data.unsaveable if data is not None else "no record of their quantization"
        raise ArtifactError(
            f"the FP weights of {released[0].fqn} (and {len(released) - 1} more) were released, and this new graph "
            f"cannot reuse their quantization: {why}. Compile without release_fp_weights"
        )
    return data, "weights released after quantization"


_EARLIER = "the rewrite of an earlier graph over the same weights"


def _earlier_rewrite(qgraph, config: QoQConfig) -> Optional[tuple[ArtifactData, str]]:
    """The rewrite an earlier graph of this process made of these very weights, when it covers every
    linear here, was made with the same options and the weights have not changed since.

    Dynamo compiles one model into several graphs (a prefill and a decode step, a recompile for a new
    batch size or a dynamic dim): calibrating each on its own example inputs would quantize the same
    layer differently per graph (a decode graph sees one token) and pay the passes again. Replaying
    the first graph's rewrite keeps every graph bit-identical to it. Statistics the user passes
    (`calibration=`) cover every graph already, so their compiles run the passes as asked."""
    if config.calibration is not None:
        return None
    data = records_for([w.tensor for w in qgraph.weights.values()], unchanged=True)
    if data is None or data.unsaveable or data.config != artifact_config(config):
        return None
    if any(m.fqn not in data.layers and m.fqn not in data.skipped for m in find_linears(qgraph)):
        return None
    return data, _EARLIER


def _try_replay(qgraph, data: ArtifactData, config: QoQConfig, record: GraphRecord) -> bool:
    """Replay `data` on `qgraph`; False when it does not fit this graph (it is then quantized afresh)."""
    try:
        replay(qgraph, data, config, record, _EARLIER)
    except Exception as e:  # noqa: BLE001 - any misfit means: quantize this graph afresh
        log.info("qoq: the earlier rewrite of these weights does not fit this graph (%s); quantizing it afresh", e)
        return False
    remember(data, [w.tensor for w in qgraph.weights.values()])
    return True


def release_quantized_weights(qgraph, record: GraphRecord, data: ArtifactData) -> None:
    """Free the FP storage of weights the final graph no longer reads (see runtime/weights.py)."""
    if data.unsaveable:
        for layer in record.layers:
            layer.details["fp_weight"] = f"kept: a recompile could not reuse this graph's rewrite ({data.unsaveable})"
        return
    live = {n.name for n in qgraph.gm.graph.nodes if n.op == "placeholder" and n.users}
    by_fqn = {w.fqn: (pname, w.tensor) for pname, w in qgraph.weights.items()}
    for layer in record.layers:
        if not layer.quantized:
            continue
        hit = by_fqn.get(layer.name + ".weight") or by_fqn.get(layer.name)
        if hit is None:
            continue
        pname, tensor = hit
        why = "the final graph still reads it" if pname in live else release(tensor)
        layer.details["fp_weight"] = f"kept: {why}" if why else "released"


def _inference(fn: Callable) -> Callable:
    """Run `fn` (called by Dynamo with unpacked arguments) under no_grad."""

    @functools.wraps(fn)
    def run(*args):
        with torch.no_grad():
            return fn(*args)

    return run
