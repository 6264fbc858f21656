"""Saved artifacts: `qcompile.save(model, path)` and compiling from one (`options={"artifact": path}`).

A compile records what its passes made from the weights (ArtifactData); compiling from an artifact
(or recompiling after the FP weights were released) replays it on the new graph: the same constants
and the same ops, so the outputs are bit-identical, with no calibration and no quantization.
"""
from __future__ import annotations

import dataclasses
import itertools
import operator
from typing import Any, Optional

import torch
import torch.fx as fx

from qcompile.capture import QGraph
from qcompile.config import QoQConfig
from runtime.artifact import ArtifactData, ArtifactError, records_for, remember, write
from runtime.registry import GraphRecord, LayerRecord

# Config fields that describe the runtime, not the numbers: an artifact does not fix them.
RUNTIME_FIELDS = ("kernels", "inductor", "mode", "calibration", "artifact", "release_fp_weights",
                  "release_fp_cache", "debug_dir", "quiet", "strict")
_GEMM_ROLES = {3: "qweight", 4: "wscale", 5: "gscale", 6: "gzero"}  # qoq.w4a8_gemm argument -> role
_INPUT_OPS = {torch.mul: "mul", torch.index_select: "index_select"}


def artifact_config(config: QoQConfig) -> dict:
    """The fields of `config` that decide the numbers, as JSON values."""
    out = {}
    for f in dataclasses.fields(config):
        if f.name in RUNTIME_FIELDS:
            continue
        v = getattr(config, f.name)
        out[f.name] = list(v) if isinstance(v, tuple) else v
    return out


def record_constants(qgraph: QGraph) -> dict[str, tuple[str, torch.Tensor]]:
    """Watch `qgraph.add_constant`: returns the live map get_attr name -> (stem, value) the passes add.

    Wrapping the instance (not QGraph) keeps the recording to this compile.
    """
    seen: dict[str, tuple[str, torch.Tensor]] = {}
    add = qgraph.add_constant

    def recording_add_constant(stem: str, value: torch.Tensor, before: fx.Node) -> fx.Node:
        node = add(stem, value, before)
        seen[node.target] = (stem, value)
        return node

    qgraph.add_constant = recording_add_constant  # type: ignore[method-assign]
    return seen


def _const(node: Any, consts: dict) -> Optional[tuple[str, torch.Tensor]]:
    if isinstance(node, fx.Node) and node.op == "get_attr":
        return consts.get(node.target)
    return None


def build_record(qgraph: QGraph, consts: dict, record: GraphRecord, config: QoQConfig) -> ArtifactData:
    """ArtifactData for one compiled graph; ArtifactError if its graph holds a constant we cannot replay."""
    data = ArtifactData(config=artifact_config(config))
    used: set[str] = set()
    by_name = {layer.name: layer for layer in record.layers}
    for node in qgraph.gm.graph.nodes:
        if node.op != "call_function" or node.target is not torch.ops.qoq.w4a8_gemm.default:
            continue
        roles = {}
        for i, role in _GEMM_ROLES.items():
            c = _const(node.args[i], consts)
            if c is not None:
                roles[role] = c
                used.add(node.args[i].target)
        if "qweight" not in roles or not roles["qweight"][0].endswith(".qweight"):
            raise ArtifactError(f"qoq.w4a8_gemm node {node.name} reads a weight qoq did not pack; it cannot be saved")
        fqn = roles["qweight"][0][: -len(".qweight")]
        # The input chain: getitem <- quantize_act_int8(x) <- (mul / index_select by constants)*.
        quant = node.args[0].args[0] if node.args[0].target is operator.getitem else None
        if quant is None or quant.target is not torch.ops.qoq.quantize_act_int8.default:
            raise ArtifactError(f"layer {fqn}: its GEMM input does not come from qoq.quantize_act_int8; it cannot be saved")
        ops = []
        x = quant.args[0]
        while isinstance(x, fx.Node) and x.op == "call_function" and x.target in _INPUT_OPS:
            operand = x.args[1] if x.target is torch.mul else x.args[2]
            c = _const(operand, consts)
            if c is None:
                break
            if x.target is torch.index_select and x.args[1] != -1:
                raise ArtifactError(f"layer {fqn}: index_select over dim {x.args[1]} before its GEMM; only the last dim replays")
            ops.append([_INPUT_OPS[x.target], f"{fqn}.{_INPUT_OPS[x.target]}"])
            data.tensors[ops[-1][1]] = c[1]
            used.add(operand.target)
            x = x.args[0]
        layer = by_name.get(fqn)
        if layer is None:
            raise ArtifactError(f"layer {fqn} has a GEMM but no report record; it cannot be saved")
        match_shape = list(layer.shape)
        data.layers[fqn] = {
            "format": layer.format, "group_size": layer.group_size, "shape": match_shape,
            "tensors": {role: f"{fqn}.{role}" for role in roles}, "input_ops": ops[::-1],
            "sqnr_db": layer.sqnr_db, "details": layer.details, "kernel": layer.kernel,
        }
        for role, (_, t) in roles.items():
            data.tensors[f"{fqn}.{role}"] = t
    for layer in record.layers:
        if not layer.quantized:
            data.skipped[layer.name] = layer.reason
    # Overrides that became constants (materialize_overrides adds the very tensor it was given).
    for pname, value in qgraph.overrides.items():
        for name, (stem, t) in consts.items():
            if t is value and name not in used:
                fqn = qgraph.weights[pname].fqn
                data.overrides[fqn] = f"override:{fqn}"
                data.tensors[f"override:{fqn}"] = t
                used.add(name)
    # Cache buffers of the KV4 pass are state, not weights: the replay makes new ones.
    left = sorted(stem for name, (stem, _) in consts.items() if name not in used and not stem.startswith("kv4."))
    if left:
        raise ArtifactError(
            f"recipe {config.recipe!r}: the graph holds constants an artifact cannot replay yet ({left[:4]}...); "
            "save works for recipes lowered to qoq.w4a8_gemm (w4a8, w4a8-g128, qoq, qoq-chn)"
        )
    return data


def remember_graph(qgraph: QGraph, consts: dict, record: GraphRecord, config: QoQConfig) -> Optional[ArtifactData]:
    """Record this graph for save / replay; a graph that cannot be saved is remembered as such (None)."""
    try:
        data = build_record(qgraph, consts, record, config)
    except ArtifactError as e:
        data = ArtifactData(config=artifact_config(config), unsaveable=str(e))
    remember(data, [w.tensor for w in qgraph.weights.values()])
    return data


def _params_of(model) -> list[torch.Tensor]:
    module = getattr(model, "_orig_mod", model)
    if hasattr(module, "__self__") and isinstance(module.__self__, torch.nn.Module):
        module = module.__self__
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"qcompile.save: expected a model (nn.Module) or its compiled form, got {type(model).__name__}")
    return list(itertools.chain(module.parameters(), module.buffers()))


def save(model, path: str) -> None:
    """Write what qoq made of `model` (compiled module, original module or one with a compiled forward)
    to the folder `path`: packed weights, scales, folded FP values and the config, safetensors + JSON."""
    data = records_for(_params_of(model))
    if data is None:
        raise ArtifactError(
            "qcompile.save: no graph compiled with backend='qoq' reads this model's weights yet; "
            "run the compiled model once (each input shape you use), then save"
        )
    if data.unsaveable:
        raise ArtifactError(f"qcompile.save: {data.unsaveable}")
    write(data, path)


# -- replay -----------------------------------------------------------------------------------------
def replay(qgraph: QGraph, data: ArtifactData, config: QoQConfig, record: GraphRecord, source: str) -> None:
    """Rewrite `qgraph` as the compile that produced `data` did, from its tensors alone."""
    from passes.lower import lower_w4a8_linear
    from passes.match import find_linears
    from passes.quantize import LayerDecision
    from passes.reorder import insert_gather
    from passes.smooth import insert_channel_scale
    from runtime.quantized_weight import QuantizedWeight

    linears = find_linears(qgraph)
    for m in linears:
        entry = data.layers.get(m.fqn)
        live = qgraph.weights[m.weight.name].tensor
        if entry is None:
            if m.fqn in data.skipped:
                record.layers.append(LayerRecord(name=m.fqn, kind="linear", shape=tuple(m.weight_shape),
                                                 quantized=False, reason=data.skipped[m.fqn]))
                continue
            raise ArtifactError(
                f"{source}: layer {m.fqn} of this model is not in it; the artifact was saved from a different "
                "model (or from a run that never reached this layer): save it again from this model"
            )
        if list(m.weight_shape) != list(entry["shape"]):
            raise ArtifactError(
                f"{source}: layer {m.fqn} has weight shape {tuple(m.weight_shape)} here and "
                f"{tuple(entry['shape'])} in the artifact; it was saved from a different model"
            )
        dev = live.device
        for kind, key in entry["input_ops"]:
            value = data.tensor(key, dev)
            if kind == "mul":
                insert_channel_scale(qgraph, m, value)
            else:
                insert_gather(qgraph, m, value)
        t = {role: data.tensor(key, dev) for role, key in entry["tensors"].items()}
        N, K = (m.weight_shape[1], m.weight_shape[0]) if m.weight_transposed else tuple(m.weight_shape)
        qw = QuantizedWeight(format=entry["format"], out_features=N, in_features=K, group_size=entry["group_size"],
                             qweight=t["qweight"], wscale=t["wscale"], gscale=t.get("gscale"), gzero=t["gzero"])
        lower_w4a8_linear(qgraph, LayerDecision(m, qw), config)
        record.layers.append(LayerRecord(
            name=m.fqn, kind="linear", shape=tuple(m.weight_shape), quantized=True, format=entry["format"],
            group_size=entry["group_size"], kernel=f"qoq.w4a8_gemm ({config.kernels})", sqnr_db=entry["sqnr_db"],
            details=dict(entry["details"], source=source),
        ))
    for pname, ref in qgraph.weights.items():
        key = data.overrides.get(ref.fqn)
        if key is None:
            continue
        value = data.tensor(key, ref.tensor.device)
        if value.shape != ref.tensor.shape or value.dtype != ref.tensor.dtype:
            raise ArtifactError(
                f"{source}: {ref.fqn} is {tuple(ref.tensor.shape)} {ref.tensor.dtype} here and "
                f"{tuple(value.shape)} {value.dtype} in the artifact; it was saved from a different model"
            )
        qgraph.overrides[pname] = value
    if config.kv_bits == 4:
        # KV4 buffers are runtime state, not weights: the pass makes them again (shared per FP cache).
        from passes.kv_cache import kv_cache

        record.layers.extend(kv_cache(qgraph, config.kernels, config.release_fp_cache).records)
    qgraph.materialize_overrides()
    from passes.manager import finish_graph

    finish_graph(qgraph, record)
