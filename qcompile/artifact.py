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
                  "release_fp_cache", "fuse_gemms", "debug_dir", "quiet", "strict", "inductor_config",
                  "persistent_reduction_numel")
_FP_LINEAR = (torch._C._nn.linear, torch.nn.functional.linear)
GEMM_ROLES = {3: "qweight", 4: "wscale", 5: "gscale", 6: "gzero"}  # qoq.w4a8_gemm argument -> role
# per-channel ops the passes put between a layer's input and its quantization
INPUT_OPS = {torch.mul: "mul", torch.index_select: "index_select"}
# Meta key of a get_attr node holding a pass's own copy of a shared weight, read by the FP linear
# named by the value (passes/rotate.py: a tied lm_head): the record saves it, a replay reads it again.
WEIGHT_COPY_META = "qoq_weight_copy_of"
WEIGHT_COPY_REASON = ("weight tied to another use (an embedding): reads its own FP copy, which a pass rewrote "
                      "(block rotation); only parameters are quantized")


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


def _layer_entry(layer: LayerRecord, op: str, roles: dict, **extra) -> dict:
    return {"op": op, "format": layer.format, "group_size": layer.group_size, "shape": list(layer.shape),
            "tensors": {role: f"{layer.name}.{role}" for role in roles}, "input_ops": [],
            "sqnr_db": layer.sqnr_db, "details": layer.details, "kernel": layer.kernel, **extra}


class _Recorder:
    """Collects one graph's rewrite: which constants each quantized op reads, by role."""

    def __init__(self, consts: dict, record: GraphRecord):
        self.consts = consts
        self.by_name = {layer.name: layer for layer in record.layers}
        self.used: set[str] = set()
        self.shared: dict[fx.Node, str] = {}   # shared activation-quant node -> its inputs stem

    def roles(self, node: fx.Node, positions: dict[int, str]) -> dict[str, tuple[str, torch.Tensor]]:
        out = {}
        for i, role in positions.items():
            c = _const(node.args[i], self.consts) if i < len(node.args) else None
            if c is not None:
                out[role] = c
                self.used.add(node.args[i].target)
        return out

    def layer_of(self, node: fx.Node, roles: dict) -> tuple[str, LayerRecord]:
        if "qweight" not in roles or not roles["qweight"][0].endswith(".qweight"):
            raise ArtifactError(f"{node.target} node {node.name} reads a weight qoq did not pack; it cannot be saved")
        fqn = roles["qweight"][0][: -len(".qweight")]
        layer = self.by_name.get(fqn)
        if layer is None:
            raise ArtifactError(f"layer {fqn} has a GEMM but no report record; it cannot be saved")
        return fqn, layer


def _source_of(node: Any, op) -> Optional[fx.Node]:
    """The op node whose output `node` is an item of (getitem(op(...), i)), or None."""
    if isinstance(node, fx.Node) and node.target is operator.getitem:
        src = node.args[0]
        if isinstance(src, fx.Node) and src.target is op:
            return src
    return None


def _lowrank_branch(y: fx.Node) -> Optional[tuple[fx.Node, fx.Node]]:
    """For a w4a8-svd GEMM: (X̂·L_down matmul, L_up constant node), the low-rank epilogue arguments
    `passes.lowrank.emit_w4a8_group` gives it, else None (a plain W4A8 GEMM)."""
    lr = y.args[10] if len(y.args) > 10 else y.kwargs.get("lr_act")
    l_up = y.args[11] if len(y.args) > 11 else y.kwargs.get("l_up")
    if not (isinstance(lr, fx.Node) and lr.target is torch.matmul and isinstance(l_up, fx.Node)):
        return None
    return lr, l_up


def _record_w4a4(rec: _Recorder, node: fx.Node, data: ArtifactData) -> None:
    """qoq.w4a4_gemm(a, sa, w, sw, lr, l_up, bias, dtype, unsigned, kernels) and its shared
    qoq.w4a4_quantize_act(x, smooth_inv, l_down, shift, kernels)."""
    roles = rec.roles(node, {2: "qweight", 3: "wscale", 5: "l_up", 6: "bias_shifted"})
    fqn, layer = rec.layer_of(node, roles)
    quant = _source_of(node.args[0], torch.ops.qoq.w4a4_quantize_act.default)
    if quant is None or _source_of(node.args[1], torch.ops.qoq.w4a4_quantize_act.default) is not quant:
        raise ArtifactError(f"layer {fqn}: its W4A4 GEMM input does not come from qoq.w4a4_quantize_act; it cannot be saved")
    unsigned = bool(node.args[8]) if len(node.args) > 8 else False
    if unsigned != ("bias_shifted" in roles):
        raise ArtifactError(f"layer {fqn}: unsigned activations without a shifted bias constant; it cannot be saved")
    _record_shared(rec, quant, fqn, "w4a4_quantize_act", {1: "smooth_inv", 2: "l_down", 3: "shift"}, data)
    data.layers[fqn] = _layer_entry(layer, "w4a4_lowrank", roles, input=rec.shared[quant], unsigned=unsigned)
    for role, (_, t) in roles.items():
        data.tensors[f"{fqn}.{role}"] = t


def _record_shared(rec: _Recorder, quant: fx.Node, fqn: str, op: str, positions: dict, data: ArtifactData,
                   extra: Optional[dict] = None) -> None:
    """The shared input of an SVDQuant group: the first member (graph order) names it."""
    stem = rec.shared.get(quant)
    if stem is None:
        stem = rec.shared[quant] = fqn
        roles = rec.roles(quant, positions)
        roles.update(extra or {})
        data.inputs[stem] = {"op": op, "tensors": {role: f"{stem}.{role}" for role in roles}, "layers": []}
        for role, (_, t) in roles.items():
            data.tensors[f"{stem}.{role}"] = t
    data.inputs[stem]["layers"].append(fqn)


def _record_w4a8_lowrank(rec: _Recorder, node: fx.Node, quant: fx.Node, branch, data: ArtifactData) -> bool:
    """A w4a8-svd member: x̂ = mul(x, smooth_inv) -> quantize_act_int8 -> w4a8_gemm, whose epilogue
    adds matmul(x̂, l_down)·l_up. False when `node` is not one (a plain W4A8 layer)."""
    down, up_node = branch
    xs = quant.args[0]
    if not (isinstance(xs, fx.Node) and xs.target is torch.mul and down.args[0] is xs):
        return False
    smooth, l_down, l_up = _const(xs.args[1], rec.consts), _const(down.args[1], rec.consts), _const(up_node, rec.consts)
    if smooth is None or l_down is None or l_up is None:
        return False
    roles = rec.roles(node, GEMM_ROLES)
    fqn, layer = rec.layer_of(node, roles)
    roles["l_up"] = l_up
    rec.used.update({xs.args[1].target, down.args[1].target, up_node.target})
    _record_shared(rec, quant, fqn, "quantize_act_int8", {}, data,
                   extra={"smooth_inv": smooth, "l_down": l_down})
    data.layers[fqn] = _layer_entry(layer, "w4a8_lowrank", roles, input=rec.shared[quant])
    for role, (_, t) in roles.items():
        data.tensors[f"{fqn}.{role}"] = t
    return True


def build_record(qgraph: QGraph, consts: dict, record: GraphRecord, config: QoQConfig) -> ArtifactData:
    """ArtifactData for one compiled graph; ArtifactError if its graph holds a constant we cannot replay."""
    data = ArtifactData(config=artifact_config(config))
    rec = _Recorder(consts, record)
    used = rec.used
    for node in qgraph.gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target is torch.ops.qoq.w4a4_gemm.default:
            _record_w4a4(rec, node, data)
            continue
        if node.target is not torch.ops.qoq.w4a8_gemm.default:
            continue
        quant = _source_of(node.args[0], torch.ops.qoq.quantize_act_int8.default)
        if quant is None:
            raise ArtifactError(f"qoq.w4a8_gemm node {node.name}: its GEMM input does not come from qoq.quantize_act_int8; it cannot be saved")
        branch = _lowrank_branch(node)
        if branch is not None and _record_w4a8_lowrank(rec, node, quant, branch, data):
            continue
        roles = rec.roles(node, GEMM_ROLES)
        fqn, layer = rec.layer_of(node, roles)
        # The input chain: getitem <- quantize_act_int8(x) <- (mul / index_select by constants)*.
        ops = []
        x = quant.args[0]
        while isinstance(x, fx.Node) and x.op == "call_function" and x.target in INPUT_OPS:
            operand = x.args[1] if x.target is torch.mul else x.args[2]
            c = _const(operand, consts)
            if c is None:
                break
            if x.target is torch.index_select and x.args[1] != -1:
                raise ArtifactError(f"layer {fqn}: index_select over dim {x.args[1]} before its GEMM; only the last dim replays")
            ops.append([INPUT_OPS[x.target], f"{fqn}.{INPUT_OPS[x.target]}"])
            data.tensors[ops[-1][1]] = c[1]
            used.add(operand.target)
            x = x.args[0]
        data.layers[fqn] = _layer_entry(layer, "w4a8", roles)
        data.layers[fqn]["input_ops"] = ops[::-1]
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
                # A layer whose quantization is a new FP weight (SVDQuant's simulated weight-only W4).
                layer = rec.by_name.get(fqn[: -len(".weight")] if fqn.endswith(".weight") else fqn)
                if layer is not None and layer.quantized and layer.name not in data.layers:
                    data.layers[layer.name] = _layer_entry(layer, "weight_override", {})
    _record_weight_copies(qgraph, consts, used, data)
    # Cache buffers of the KV4 pass are state, not weights: the replay makes new ones.
    left = sorted(stem for name, (stem, _) in consts.items() if name not in used and not stem.startswith("kv4."))
    if left:
        raise ArtifactError(
            f"recipe {config.recipe!r}: the graph holds constants an artifact cannot replay yet ({left[:4]}...); "
            "save works for the qoq.w4a8_gemm recipes (w4a8, w4a8-g128, qoq, qoq-chn) and the SVDQuant "
            "ones (svdquant, w4a8-svd)"
        )
    return data


def _record_weight_copies(qgraph: QGraph, consts: dict, used: set, data: ArtifactData) -> None:
    """FP linears that read a pass's copy of a shared weight instead of the parameter (WEIGHT_COPY_META)."""
    for node in qgraph.gm.graph.nodes:
        fqn = node.meta.get(WEIGHT_COPY_META) if node.op == "get_attr" else None
        if fqn is None or node.target not in consts or node.target in used:
            continue
        readers = [u for u in node.users if not (u.op == "call_function" and u.target in _FP_LINEAR
                                                  and len(u.args) > 1 and u.args[1] is node)]
        if readers:
            raise ArtifactError(f"the copy of {fqn}'s weight is read by {readers[0].name}, not only as the weight of "
                                "an FP linear; it cannot be saved")
        if fqn in data.layers:
            raise ArtifactError(f"layer {fqn} is quantized and also reads a copy of its weight; it cannot be saved")
        key = f"{fqn}.weight_copy"
        data.weight_copies[fqn] = key
        data.tensors[key] = consts[node.target][1]
        data.skipped.setdefault(fqn, WEIGHT_COPY_REASON)
        used.add(node.target)


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
_LOWRANK_OPS = ("w4a4_lowrank", "w4a8_lowrank")
SVDQUANT_RECIPES = ("svdquant", "w4a8-svd")


def replay(qgraph: QGraph, data: ArtifactData, config: QoQConfig, record: GraphRecord, source: str) -> None:
    """Rewrite `qgraph` as the compile that produced `data` did, from its tensors alone."""
    from passes.lower import lower_w4a8_linear
    from passes.match import find_linears
    from passes.quantize import LayerDecision
    from passes.reorder import insert_gather
    from passes.smooth import insert_channel_scale
    from runtime.quantized_weight import QuantizedWeight

    # SVDQuant also rewrote 1x1 convs: match them the way its pass did.
    linears = find_linears(qgraph, conv1x1=config.recipe in SVDQUANT_RECIPES)
    lowered: dict = {}  # FP linear node -> the node that replaced it (back-to-back linears)
    groups: dict[str, list] = {}  # shared input stem -> the matches of its layers here
    for m in linears:
        entry = data.layers.get(m.fqn)
        live = qgraph.weights[m.weight.name].tensor
        if entry is None:
            if m.fqn in data.skipped:
                if m.fqn in data.weight_copies:
                    _read_weight_copy(qgraph, m, data.tensor(data.weight_copies[m.fqn], live.device), source)
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
        op = entry.get("op", "w4a8")
        record.layers.append(_replayed_record(m, entry, config, source))
        if op in _LOWRANK_OPS:
            if entry.get("input") not in data.inputs:
                raise ArtifactError(f"{source}: layer {m.fqn} names a shared input {entry.get('input')!r} it lacks; save the artifact again")
            groups.setdefault(entry["input"], []).append(m)
            continue
        if op == "weight_override":
            continue  # its new weight value is applied with the overrides below
        if op != "w4a8":
            raise ArtifactError(f"{source}: layer {m.fqn} has op {op!r}, which this qoq does not know; update qoq")
        dev = live.device
        m.x = lowered.get(m.x, m.x)
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
        lowered[m.node] = lower_w4a8_linear(qgraph, LayerDecision(m, qw), config)
    for stem, members in groups.items():
        _replay_group(qgraph, data, stem, members, lowered, config, source)
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

        if config.rotate_kv:  # an online graph rewrite, not a recorded tensor: made again as the first graph did
            from passes.rotate_kv import rotate_kv

            rotate_kv(qgraph, values=config.rotate_kv_values)
        record.layers.extend(kv_cache(qgraph, config.kernels, config.release_fp_cache).records)
    qgraph.materialize_overrides()
    from passes.manager import finish_graph

    finish_graph(qgraph, record)


def _read_weight_copy(qgraph: QGraph, m, value: torch.Tensor, source: str) -> None:
    """Make the FP linear `m` read its recorded weight copy (before the overrides replace the shared one)."""
    if m.node.target not in _FP_LINEAR or m.weight_transposed or list(value.shape) != list(m.weight_shape):
        raise ArtifactError(
            f"{source}: layer {m.fqn} read a {tuple(value.shape)} copy of its weight through F.linear when saved; "
            f"here it is {tuple(m.weight_shape)} read by {m.node.target}: the artifact was saved from a different model"
        )
    const = qgraph.add_constant(f"{m.fqn}.weight_copy", value, before=m.node)
    const.meta[WEIGHT_COPY_META] = m.fqn
    m.node.replace_input_with(m.weight, const)


def _replayed_record(m, entry: dict, config: QoQConfig, source: str) -> LayerRecord:
    # the kernels choice is this compile's (a runtime option), not the saving one's
    base = (entry.get("kernel") or "").rsplit(" (", 1)[0]
    kernel = f"{base or 'qoq.w4a8_gemm'} ({config.kernels})" if entry.get("op") != "weight_override" else base
    return LayerRecord(name=m.fqn, kind="linear", shape=tuple(m.weight_shape), quantized=True, format=entry["format"],
                       group_size=entry["group_size"], kernel=kernel, sqnr_db=entry["sqnr_db"],
                       details=dict(entry["details"], source=source))


def _replay_group(qgraph: QGraph, data: ArtifactData, stem: str, members: list, lowered: dict,
                  config: QoQConfig, source: str) -> None:
    """One SVDQuant group (linears sharing an input) through the pass's own emit functions."""
    from passes.lower import out_dtype_of
    from passes.lowrank import emit_w4a4_group, emit_w4a8_group

    shared = data.inputs[stem]
    here = {m.fqn: m for m in members}
    if sorted(here) != sorted(shared["layers"]):
        raise ArtifactError(
            f"{source}: layers {sorted(shared['layers'])} shared one quantized input when saved; this graph has "
            f"{sorted(here)} of them: the artifact was saved from a different model"
        )
    group = [here[f] for f in shared["layers"]]
    for m in group:
        m.x = lowered.get(m.x, m.x)
    if any(m.x is not group[0].x for m in group):
        raise ArtifactError(f"{source}: layers {shared['layers']} read one input when saved, different ones here; "
                            "the artifact was saved from a different model")
    first = group[0]
    dev = qgraph.weights[first.weight.name].tensor.device
    dtype = out_dtype_of(first.node, first.x)
    t_in = {role: data.tensor(key, dev) for role, key in shared["tensors"].items()}
    per_layer = [{role: data.tensor(key, dev) for role, key in data.layers[m.fqn]["tensors"].items()} for m in group]
    for name, t in [("l_down", t_in.get("l_down"))] + [("l_up", t.get("l_up")) for t in per_layer]:
        if t is not None and t.dtype != dtype:
            raise ArtifactError(
                f"{source}: layer {first.fqn}'s low-rank factor {name} is {t.dtype} in the artifact and the model "
                f"computes in {dtype}; compile the model in the dtype it was saved from ({t.dtype})"
            )
    if shared["op"] == "w4a4_quantize_act":
        emit_w4a4_group(qgraph, group, t_in.get("smooth_inv"), t_in.get("l_down"), t_in.get("shift"),
                        per_layer, config.kernels)
    elif shared["op"] == "quantize_act_int8":
        emit_w4a8_group(qgraph, group, t_in["smooth_inv"], t_in["l_down"],
                        [({k: v for k, v in t.items() if k != "l_up"}, t["l_up"]) for t in per_layer],
                        config.kernels)
    else:
        raise ArtifactError(f"{source}: shared input {stem!r} has op {shared['op']!r}, which this qoq does not know; update qoq")
