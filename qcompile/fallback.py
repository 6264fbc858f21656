"""What qoq does with what it cannot handle: a layer or graph stays in FP with one warning per reason,
while errors that are the user's (bad options, mismatched calibration or artifact) are raised.

The backend calls `is_user_error` on every exception out of the passes: user errors go to the user,
anything else is our limitation, so the graph runs in FP and the report says why.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
import warnings
from typing import Optional

import torch
import torch.fx as fx

log = logging.getLogger("qoq")


def inductor_compile(gm: fx.GraphModule, example_inputs: list, mode: str = "default", patches: tuple = (),
                     persistent_numel: Optional[int] = None):
    """Inductor's compile_fx over a rewritten graph (config: `mode`'s, then `patches`, the option
    inductor_config), with the qoq ops' schemas in its cache key; `persistent_numel` (the option
    persistent_reduction_numel) raises the row length up to which a reduction is one-pass.

    Inductor's on-disk caches key a graph by its ops with trailing default arguments normalized away,
    not by the ops' schemas: after a qoq op lost an optional argument, a warm cache served code that
    still passed it ("expected at most 7 argument(s) but received 8"). With the schemas of the qoq ops
    the graph calls in the key (torch.compiler.config.cache_key_tag), a changed op compiles afresh.
    The reduction rule is not an Inductor config key either, so it goes into the tag too.
    """
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx
    from torch._inductor.virtualized import V
    from torch.compiler import config as compiler_config

    rule = f"qoq-persistent-{persistent_numel}-rows{PERSISTENT_MAX_ROWS}" if persistent_numel is not None else ""
    tag = ":".join(t for t in (compiler_config.cache_key_tag, qoq_schema_tag(gm), rule) if t)
    with contextlib.ExitStack() as stack:
        stack.enter_context(compiler_config.patch(cache_key_tag=tag))
        if persistent_numel is not None:
            stack.enter_context(V.set_choices_handler(persistent_reduction_choices(persistent_numel)))
        return compile_fx(gm, example_inputs, config_patches={**list_mode_options(mode), **dict(patches)})


# Row counts above which the long-row rule below defers to Inductor's own.
PERSISTENT_MAX_ROWS = 1024


def _is_number(n) -> bool:
    return isinstance(n, int) or getattr(n, "is_number", False)


def persistent_reduction_choices(limit: int):
    """Inductor's choices with one change: a row reduction (norm, absmax of a quantization) of at most
    `limit` elements is one persistent kernel, each program holding its row in registers, not split.

    Inductor's own limit is 1024 elements. Above it a row is read in a loop once per reduction
    (RMSNorm's sum of squares, the quantization's absmax, then the codes), and at a decode step's one
    to a few rows split_reductions spreads the sums over two or three kernels. Measured on an H200
    (Llama-3-8B shapes, BENCHMARKS.md, seventh session): add + RMSNorm + int8 quantization 4.1 -> 2.8
    us and SiLU·mul + quantization 7.2 -> 5.2 us a layer at batch 1, three kernels a layer fewer.

    Only for at most PERSISTENT_MAX_ROWS rows (or a symbolic row count: a decode graph compiled for
    any batch): with thousands of rows (a diffusion transformer's 4096 image tokens) there are
    programs enough without it, and a one-row program holding a 12288-15360-wide row ran 2.6-2.9x
    slower than its bytes (H100, BENCHMARKS.md, "`w4a8-svd` end to end").
    """
    from torch._inductor.choices import InductorChoices

    class RowReductionChoices(InductorChoices):
        def should_use_persistent_reduction(self, features, cooperative_reduction: bool) -> bool:
            from torch._inductor import config
            from torch._inductor.runtime.hints import ReductionHint

            numel = features.reduction_numel
            if (config.triton.persistent_reductions and not cooperative_reduction
                    and features.get_reduction_hint() == ReductionHint.INNER
                    and _is_number(numel) and int(numel) <= limit
                    and not (_is_number(features.numel) and int(features.numel) > PERSISTENT_MAX_ROWS)):
                return True
            return InductorChoices.should_use_persistent_reduction(features, cooperative_reduction)

        def reduction_split_factor(self, device, reduction_numel_hint: int, numel_hint: int,
                                   inner_reduction: bool) -> int:
            # Such a row is not split over several programs either (split_reductions would, at one
            # to a few rows): the split costs two more kernels, more than it saves on a row this short.
            if inner_reduction and reduction_numel_hint <= limit:
                return 1
            return InductorChoices.reduction_split_factor(device, reduction_numel_hint, numel_hint, inner_reduction)

    return RowReductionChoices()


def _qoq_schemas(target) -> list[str]:
    if isinstance(target, torch._ops.OpOverload) and target.namespace == "qoq":
        return [str(target._schema)]
    if isinstance(target, torch._ops.OpOverloadPacket) and target._qualified_op_name.startswith("qoq::"):
        return [str(getattr(target, name)._schema) for name in target.overloads()]
    return []


def qoq_schema_tag(gm: fx.GraphModule) -> str:
    """A short hash of the schemas of the torch.ops.qoq ops `gm` calls ("" for none)."""
    schemas = sorted({s for n in gm.graph.nodes if n.op == "call_function" for s in _qoq_schemas(n.target)})
    return "qoq-ops-" + hashlib.sha256("\n".join(schemas).encode()).hexdigest()[:16] if schemas else ""


class QoQFallbackWarning(UserWarning):
    """A layer or graph was left in FP because a pass could not handle it (see qcompile.report)."""


class QoQUserError(ValueError):
    """An error that is the user's to fix (inputs, statistics, artifact): always raised, never fallen back from."""


class QoQCalibrationError(QoQUserError):
    """Calibration statistics that do not belong to the compiled model (names or channel counts differ)."""


_WARNED: set[str] = set()
_LOCK = threading.Lock()


def warn_once(key: str, message: str, *, stacklevel: int = 2) -> bool:
    """Warn (QoQFallbackWarning) and log the first time `key` is seen in this process; True if it warned."""
    with _LOCK:
        if key in _WARNED:
            log.debug("qoq: %s", message)
            return False
        _WARNED.add(key)
    log.warning("qoq: %s", message)
    warnings.warn(message, QoQFallbackWarning, stacklevel=stacklevel + 1)
    return True


def reset_warnings() -> None:
    """Forget which reasons were warned about (tests; a long-lived process that wants to hear again)."""
    with _LOCK:
        _WARNED.clear()


def is_user_error(exc: BaseException) -> bool:
    """True for errors the user must see: our option/statistics errors and Python's own interruptions."""
    from qcompile.config import QoQConfigError

    if isinstance(exc, (QoQUserError, QoQConfigError, KeyboardInterrupt, MemoryError)):
        return True
    # torch.OutOfMemoryError is a RuntimeError: falling back would only hide where memory ran out.
    return type(exc).__name__ == "OutOfMemoryError"


def strict(config=None) -> bool:
    """Fallbacks re-raise instead (option strict=True or QOQ_STRICT=1): for tests and for debugging a pass."""
    if config is not None and getattr(config, "strict", False):
        return True
    return os.environ.get("QOQ_STRICT", "0") not in ("", "0")


def describe_failure(exc: BaseException, stage: str) -> str:
    """One line naming the stage (pass) and the exception, for the report and the warning."""
    where = getattr(exc, "qoq_pass", None) or stage
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if len(first) > 200:
        first = first[:197] + "..."
    return f"pass {where!r} failed: {type(exc).__name__}: {first}" if first else f"pass {where!r} failed: {type(exc).__name__}"


def _is_artifact_error(exc: BaseException) -> bool:
    try:
        from runtime.artifact import ArtifactError
    except ImportError:
        return False
    return isinstance(exc, ArtifactError)


def check_calibration(linears, stats) -> None:
    """Statistics from `qcompile.calibrate` must belong to the compiled model: same names, same widths.

    A mismatch is the user's (statistics of another model, or of a parent/child module of the one
    compiled), so it raises instead of quietly quantizing with wrong or missing statistics.
    """
    layers = getattr(stats, "layers", None)
    if not layers or not linears:
        return
    if getattr(stats, "source", "") == "example inputs":
        _drop_non_finite(layers, linears)
        return
    for m in linears:
        ls = layers.get(m.fqn)
        if ls is not None and not bool(torch.isfinite(ls.absmax).all()):
            raise QoQCalibrationError(
                f"option calibration: the statistics of layer {m.fqn!r} hold NaN or inf (a calibration batch made "
                f"non-finite activations there); calibrate on batches for which the FP model's activations are finite"
            )
    for m in linears:
        ls = layers.get(m.fqn)
        if ls is None:
            continue
        width = int(ls.absmax.shape[0])
        if width != m.in_features:
            raise QoQCalibrationError(
                f"option calibration: statistics for layer {m.fqn!r} have {width} input channels, the model's layer has "
                f"{m.in_features}; calibrate this model (qcompile.calibrate(model, batches)) and pass those statistics"
            )
    if not any(m.fqn in layers for m in linears):
        ours = ", ".join(repr(m.fqn) for m in linears[:3])
        theirs = ", ".join(repr(k) for k in list(layers)[:3])
        raise QoQCalibrationError(
            f"option calibration: the statistics name none of this graph's layers (graph: {ours}; statistics: {theirs}); "
            f"calibrate the same module you compile, e.g. qcompile.calibrate(model, ...) for torch.compile(model, ...)"
        )


def check_device(qgraph, config) -> None:
    """kernels='triton' where Triton cannot run is the user's to fix: say so at compile time, not at the first call."""
    if getattr(config, "kernels", "auto") != "triton" or not qgraph.weights:
        return
    from lowering.dispatch import use_triton

    weight = next(iter(qgraph.weights.values())).tensor
    try:
        use_triton(weight, "triton")
    except RuntimeError as e:
        raise QoQUserError(f"option {e}") from e


def _drop_non_finite(layers: dict, linears) -> None:
    """The compile's own inputs made NaN/inf activations: those layers get no statistics (round-to-nearest,
    no SQNR) rather than smoothing factors that would poison every later call."""
    for m in linears:
        ls = layers.get(m.fqn)
        if ls is not None and not bool(torch.isfinite(ls.absmax).all()):
            del layers[m.fqn]
            warn_once(f"nonfinite:{m.fqn}", f"layer {m.fqn!r} saw NaN or inf activations in the inputs of the call "
                      f"that compiled it; it gets no statistics (round-to-nearest, no SQNR). Calibrate with qcompile.calibrate "
                      f"on finite data for the full recipe")


def _released(qgraph) -> bool:
    try:
        from runtime.weights import is_released
    except ImportError:
        return False
    return any(is_released(w.tensor) for w in qgraph.weights.values())


def copy_graph(graph: fx.Graph) -> fx.Graph:
    """A copy of `graph`'s nodes and meta (weights are not copied), with the attributes Dynamo sets on
    nodes (placeholders' `_dynamo_source`, which AOTAutograd needs) that deepcopy drops."""
    import copy

    new_graph = copy.deepcopy(graph)
    for old, new in zip(graph.nodes, new_graph.nodes):
        for key, value in vars(old).items():
            if key not in vars(new):
                setattr(new, key, value)
    return new_graph


class FallbackGuard:
    """Keeps one graph's FP form while the passes and Inductor run, and restores it when either fails.

    `run_passes` and `compile` raise user errors (and everything under strict); any other failure
    leaves the whole graph in FP, records the reason on every layer, and warns once per reason.
    """

    def __init__(self, qgraph, config, record):
        from qcompile.debug import GraphDumper, debug_dir

        self.qgraph, self.config, self.record = qgraph, config, record
        self.fp_graph = copy_graph(qgraph.gm.graph)
        self.buffers = set(qgraph.gm._buffers)
        self.dumper = GraphDumper(debug_dir(config), record.graph_id)

    def _raise_anyway(self, exc: BaseException) -> bool:
        return is_user_error(exc) or _is_artifact_error(exc) or strict(self.config) or _released(self.qgraph)

    def calibrate(self, calibrate_graph, *args):
        """The default statistics (the graph run on its example inputs); if that run fails, none: the
        passes then quantize round-to-nearest and the report has no SQNR, with one warning."""
        try:
            return calibrate_graph(*args)
        except Exception as exc:
            if self._raise_anyway(exc):
                raise
            from qcompile.calibration import CalibrationStats

            reason = describe_failure(exc, "calibrate on example inputs")
            log.debug("qoq graph %d: calibration failed", self.record.graph_id, exc_info=exc)
            warn_once(f"calibrate:{reason}", f"{reason}; quantizing without statistics (round-to-nearest, no SQNR in "
                      f"the report). Pass statistics from qcompile.calibrate(model, batches) as options['calibration'].")
            return CalibrationStats(source="none: " + reason)

    def run_passes(self, stats) -> None:
        from passes.manager import run_passes
        from passes.match import find_linears
        from qcompile.debug import dumping

        try:
            linears = find_linears(self.qgraph)
        except Exception:  # the passes meet the same failure below, and fall back there
            linears = []
        check_calibration(linears, stats)
        check_device(self.qgraph, self.config)
        with dumping(self.dumper):
            try:
                run_passes(self.qgraph, self.config, stats, self.record)
            except Exception as exc:
                if self._raise_anyway(exc):
                    raise
                self.restore_fp(describe_failure(exc, "pass manager"), exc)
        try:
            report_other_weights(self.qgraph, self.record)
        except Exception as exc:  # the report is best effort; the compiled graph is already right
            log.debug("qoq graph %d: could not list the other weights", self.record.graph_id, exc_info=exc)
        self.dumper.write("final", self.qgraph.gm)

    def fuse_gemms(self, record_tensors) -> None:
        """Horizontal GEMM fusion (passes/fuse_gemms.py) over the rewritten graph; FP if it fails."""
        from passes.fuse_gemms import fuse_gemms

        try:
            fused = fuse_gemms(self.qgraph, record_tensors)
        except Exception as exc:
            if self._raise_anyway(exc):
                raise
            self.restore_fp(describe_failure(exc, "fuse_gemms"), exc)
            return
        from passes.manager import count_qoq_ops

        count_qoq_ops(self.qgraph, self.record)
        names = {layer.name: layer for layer in self.record.layers}
        for group in fused.layers:
            for name in group:
                if name in names:
                    names[name].details["fused_gemm"] = "+".join(group)

    def compile(self, example_inputs: list):
        """Inductor (or the FX graph's forward) over the rewritten graph; the FP graph if Inductor fails on it."""
        if not self.config.inductor:
            return self.qgraph.gm.forward
        try:
            return self._inductor(example_inputs)
        except Exception as exc:
            if self._raise_anyway(exc) or self.record.fallback:
                raise  # Inductor failed on the FP graph: torch.compile's own failure, not ours to hide
            self.restore_fp(describe_failure(exc, "inductor"), exc)
            return self._inductor(example_inputs)

    def _inductor(self, example_inputs: list):
        return inductor_compile(self.qgraph.gm, example_inputs, self.config.mode, self.config.inductor_config,
                                self.config.persistent_reduction_numel)

    def restore_fp(self, reason: str, exc: BaseException) -> None:
        """Put the FP graph back, drop the constants the passes added, and mark every layer FP with `reason`."""
        from passes.match import find_linears
        from runtime.registry import LayerRecord

        gm = self.qgraph.gm
        gm.graph = self.fp_graph
        for name in set(gm._buffers) - self.buffers:
            del gm._buffers[name]
            getattr(gm, "_param_name_to_source", {}).pop(name, None)
        self.qgraph.overrides.clear()
        gm.recompile()
        log.debug("qoq graph %d fell back to FP", self.record.graph_id, exc_info=exc)
        try:
            linears = find_linears(self.qgraph)
        except Exception:  # the report loses its layer list, the model still runs
            linears = []
        self.record.layers = [LayerRecord(name=m.fqn, kind="linear", shape=tuple(m.weight_shape or ()), quantized=False,
                                          reason=f"graph left in FP: {reason}") for m in linears]
        self.record.qoq_ops = {}
        self.record.fallback = reason
        self.dumper.write("fallback_fp", gm)
        warn_once(f"graph:{reason}", f"a graph was left in FP because {reason}. The model runs, unquantized; "
                  f"qcompile.report(model) lists the layers. Set QOQ_STRICT=1 (or option strict=True) to raise instead, "
                  f"and please report it with the QOQ_DEBUG_DIR dump.")


# Ops whose weights are not compute layers: nothing to report (embedding tables are looked up, not multiplied).
_NOT_LAYERS = {"embedding"}


def _op_name(node) -> str:
    target = node.target
    name = target if isinstance(target, str) else getattr(target, "__name__", str(target))
    return str(name).rsplit(".", 1)[-1]


def report_other_weights(qgraph, record) -> None:
    """Report the matrices (and conv kernels) the final graph still reads in FP outside any reported layer,
    e.g. fused attention in_proj, LSTM or conv weights, or a weight computed at run time: nothing unquantized goes unsaid."""
    from runtime.registry import LayerRecord

    reported = {layer.name for layer in record.layers}
    for node in qgraph.gm.graph.nodes:
        ref = qgraph.weights.get(node.name) if node.op == "placeholder" else None
        if ref is None or not node.users or ref.tensor.dim() < 2:
            continue
        module = ref.fqn.rsplit(".", 1)[0] if "." in ref.fqn else ref.fqn
        if module in reported or ref.fqn in reported:
            continue
        ops = sorted({_op_name(u) for u in node.users})
        if set(ops) <= _NOT_LAYERS:
            continue
        record.layers.append(LayerRecord(
            name=ref.fqn, kind="other", shape=tuple(ref.tensor.shape), quantized=False,
            reason=f"read by {', '.join(ops)}: not a linear layer qoq quantizes"))


def lower_layer_or_fp(qgraph, decision, config, layer, lower):
    """`lower(qgraph, decision, config)` for one layer; if it fails before touching the FP node, that layer
    stays in FP (its record says why, one warning per reason) and the rest of the graph is still lowered.

    Returns the new node, or None when the layer was left in FP.
    """
    graph = qgraph.gm.graph
    before, buffers = set(graph.nodes), set(qgraph.gm._buffers)
    node = decision.match.node
    users = set(node.users)
    try:
        return lower(qgraph, decision, config)
    except Exception as exc:
        if _raise_for_layer(exc, config) or node not in set(graph.nodes) or set(node.users) != users:
            raise  # user error, strict, or the FP node was already rewired: the graph-level fallback takes it
        for extra in reversed([n for n in graph.nodes if n not in before]):
            if extra.users:
                raise
            graph.erase_node(extra)
        for name in set(qgraph.gm._buffers) - buffers:
            del qgraph.gm._buffers[name]
            getattr(qgraph.gm, "_param_name_to_source", {}).pop(name, None)
        reason = describe_failure(exc, "lower")
        layer.quantized, layer.format, layer.group_size, layer.kernel, layer.sqnr_db = False, "fp", None, "", None
        layer.reason = f"left in FP: {reason}"
        warn_once(f"layer:{reason}", f"layer {decision.match.fqn!r} was left in FP because {reason}; the rest of the "
                  f"graph is quantized. Set QOQ_STRICT=1 (or option strict=True) to raise instead.")
        return None


def _raise_for_layer(exc: BaseException, config) -> bool:
    return is_user_error(exc) or _is_artifact_error(exc) or strict(config)
