"""The `qoq` torch.compile backend: capture -> calibrate -> passes -> Inductor (or the FX graph).

Registered as the `torch_dynamo_backends` entry point `qoq`, so `torch.compile(model, backend="qoq")`
works without importing us. The backend is for inference: the graphs it returns run under no_grad.
"""
from __future__ import annotations

import functools
import logging
from typing import Any, Callable, Optional

import torch
import torch.fx as fx

from passes.manager import run_passes
from passes.match import find_linears
from qcompile.calibration import CalibrationStats, calibrate_graph
from qcompile.capture import capture
from qcompile.config import QoQConfig, make_config
from qcompile.fallback import FallbackGuard
from runtime.registry import link_params, new_graph_record

log = logging.getLogger("qoq")


def qoq_backend(gm: fx.GraphModule, example_inputs: list, options: Optional[dict] = None,
                mode: Optional[str] = None, **unused: Any) -> Callable:
    config = make_config(options, mode)
    return compile_graph(gm, example_inputs, config)


def compile_graph(gm: fx.GraphModule, example_inputs: list, config: QoQConfig) -> Callable:
    with torch.no_grad():
        qgraph = capture(gm, example_inputs)
        record = new_graph_record(config.recipe)
        guard = FallbackGuard(qgraph, config, record)  # a pass or Inductor failure leaves this graph in FP
        link_params(record, [w.tensor for w in qgraph.weights.values()])
        stats = config.calibration
        if stats is None:
            linears = find_linears(qgraph)
            watch = {m.node: (m.fqn, m.x) for m in linears}
            stats = calibrate_graph(gm, example_inputs, watch, {w.index for w in qgraph.weights.values()})
        elif not isinstance(stats, CalibrationStats):
            raise TypeError(
                f"option calibration: expected the statistics returned by qcompile.calibrate(...), got {type(stats).__name__}"
            )
        guard.run_passes(stats)
        log.debug("qoq graph %d after passes:\n%s", record.graph_id, qgraph.gm.code)
        compiled = guard.compile(example_inputs)
    return _inference(compiled)


def _inference(fn: Callable) -> Callable:
    """Run `fn` (called by Dynamo with unpacked arguments) under no_grad."""

    @functools.wraps(fn)
    def run(*args):
        with torch.no_grad():
            return fn(*args)

    return run
