"""SmoothQuant-style input smoothing: per-channel factors `s = max|X|^α / max|W|^β` that move
activation outliers into the weights, with (α, β) picked per scale group by the layer output error
with W4 weights and A8 tokens in the loop. Folded into the producer (norm weight and bias, or the
previous linear's rows); an explicit `x * (1/s)` where no producer can absorb it.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from lowering.activation_quant import quantize_act_int8_reference
from passes.match import LinearMatch
from passes.gptq import fake_quantize, search_grid
from passes.quantize import skip_reason
from passes.scale_groups import (ScaleGroup, find_scale_groups, linear_bias, linear_weight,
                                 set_linear_weight)
from qcompile.calibrate_api import MIN_CALIBRATION_ROWS, enough_rows, transform_inputs
from qcompile.calibration import CalibrationStats
from qcompile.capture import QGraph
from qcompile.config import QoQConfig

_FLOOR = 1e-5
DEFAULT_ALPHAS = tuple(i / 10 for i in range(11))
SEARCH_ROWS = 256


def fake_quant_output_error(x: torch.Tensor, weights: list[torch.Tensor], config: QoQConfig,
                            divide: torch.Tensor | None = None, refs: list[torch.Tensor] | None = None) -> float:
    """Σ ||Q8(x/s) Q4(W·s)^T − x W^T||² over the consumers: the error smoothing by `s` leaves.

    Q4 is round-to-nearest, or the per-group grid search when the config has clip_search on a group
    format (what the weights will get)."""
    refs = refs if refs is not None else [x @ w.t() for w in weights]
    if divide is not None:
        x = x / divide
    x8, sx, _ = quantize_act_int8_reference(x)
    xq = x8.float() * sx[:, None]
    # Score with the weights as the quantize/gptq passes will make them: with clip_search on a group
    # format that is the (s2, z) grid search weighted by E[x²] of the (smoothed) input channels.
    grid = getattr(config, "clip_search", False) and config.weight_group_size != -1
    importance = x.pow(2).mean(dim=0) if grid else None
    err = 0.0
    for w, ref in zip(weights, refs):
        ws = w * divide if divide is not None else w
        wq = search_grid(ws, config, importance)[1] if grid else fake_quantize(ws, config)
        err += float((xq @ wq.t() - ref).pow(2).sum())
    return err


def _per_producer_max(v: torch.Tensor, index: torch.Tensor | None, size: int) -> torch.Tensor:
    """Max of a per-consumer-channel quantity over the consumer channels sharing a producer channel."""
    if index is None:
        return v
    out = torch.zeros(size, dtype=v.dtype, device=v.device)  # the GQA index map is made on the CPU
    return out.scatter_reduce(0, index.to(v.device), v, reduce="amax", include_self=True)


def search_factors(x: torch.Tensor, absmax: torch.Tensor, weights: list[torch.Tensor], config: QoQConfig,
                   index: torch.Tensor | None = None, producer_channels: int = 0,
                   alphas=DEFAULT_ALPHAS) -> tuple[torch.Tensor, float, float, float, float]:
    """(s per consumer channel, α, β, error with s, error without) minimizing the quantized output error.

    With `index`, consumer channels that share a producer channel share one factor.
    """
    wmax = torch.stack([w.abs().amax(dim=0) for w in weights]).amax(dim=0).clamp_min(_FLOOR)
    if x.shape[0] > SEARCH_ROWS:  # the search compares ~20 candidates: a subsample ranks them as well
        x = x[torch.linspace(0, x.shape[0] - 1, SEARCH_ROWS).long()]
    refs = [x @ w.t() for w in weights]
    amax = absmax.float().clamp_min(_FLOOR)
    size = producer_channels if index is not None else amax.shape[0]
    amax_p, wmax_p = _per_producer_max(amax, index, size), _per_producer_max(wmax, index, size)
    base = fake_quant_output_error(x, weights, config, refs=refs)
    best = (torch.ones_like(amax), 0.0, 0.0, base)
    tried = set()
    for a in alphas:
        for b in sorted({round(1.0 - a, 6), 0.0}):
            if (a, b) in tried or (a == 0 and b == 0):
                continue
            tried.add((a, b))
            s_p = (amax_p.clamp_min(_FLOOR).pow(a) / wmax_p.clamp_min(_FLOOR).pow(b)).clamp(1e-4, 1e4)
            s = s_p[index] if index is not None else s_p
            err = fake_quant_output_error(x, weights, config, divide=s, refs=refs)
            if err < best[3]:
                best = (s, a, b, err)
    s, a, b, err = best
    return s, a, b, err, base


def _consumer_stats(group: ScaleGroup, stats: CalibrationStats):
    found = [stats.get(m.fqn) for m in group.consumers]
    if not all(enough_rows(f) for f in found):
        return None
    return found


def _fold(qgraph: QGraph, group: ScaleGroup, s: torch.Tensor) -> str:
    """Consumers' columns × s; the producer ÷ s. Returns where 1/s went."""
    for m in group.consumers:
        w = linear_weight(qgraph, m)
        set_linear_weight(qgraph, m, (w.float() * s[None, :]).to(w.dtype))
    if group.kind == "norm":
        norm = group.norm
        w = qgraph.weight(norm.weight)
        qgraph.set_weight(norm.weight, (w.float() / s).to(w.dtype))
        if norm.bias is not None:
            b = qgraph.weight(norm.bias)
            qgraph.set_weight(norm.bias, (b.float() / s).to(b.dtype))
        return norm.fqn
    if group.kind in ("linear", "attention-v"):
        p = group.producer
        if group.index is not None:
            size = int(group.index.max()) + 1
            s_p = torch.ones(size, device=s.device).scatter_reduce(0, group.index.to(s.device), s, reduce="amax",
                                                                    include_self=False)
        else:
            s_p = s
        rows = slice(group.row_offset, group.row_offset + s_p.shape[0])
        w = linear_weight(qgraph, p).clone()
        w[rows] = (w[rows].float() / s_p[:, None]).to(w.dtype)
        set_linear_weight(qgraph, p, w)
        b = linear_bias(qgraph, p)
        if b is not None:
            b = b.clone()
            b[rows] = (b[rows].float() / s_p).to(b.dtype)
            qgraph.set_weight(p.bias, b)
        return p.fqn
    # No producer: each consumer reads x * (1/s), which Inductor fuses into the ops before it.
    for m in group.consumers:
        insert_channel_scale(qgraph, m, 1.0 / s)
    return "explicit scale"


def insert_channel_scale(qgraph: QGraph, m: LinearMatch, factor: torch.Tensor) -> fx.Node:
    """Make `m` read `x * factor` (factor per input channel)."""
    x = m.x
    xval = x.meta.get("example_value") if isinstance(x, fx.Node) else None
    dtype = xval.dtype if isinstance(xval, torch.Tensor) else torch.float32
    const = qgraph.add_constant(f"{m.fqn}.smooth_scale", factor.to(dtype), before=m.node)
    with qgraph.gm.graph.inserting_before(m.node):
        scaled = qgraph.gm.graph.call_function(torch.mul, (x, const))
    if xval is not None:
        scaled.meta["example_value"] = xval
    m.node.replace_input_with(x, scaled)
    m.x = scaled
    return scaled


def smooth(qgraph: QGraph, linears: list[LinearMatch], config: QoQConfig, stats: CalibrationStats,
           details: dict[str, dict]) -> None:
    """Smooth every scale group with a quantized consumer; statistics follow the new inputs."""
    alphas = tuple(getattr(config, "smooth_alphas", DEFAULT_ALPHAS))
    for group in find_scale_groups(qgraph, linears):
        if not any(not skip_reason(m, linears, config, qgraph) for m in group.consumers):
            continue  # only FP layers read these channels: nothing to gain
        if group.kind == "fixed":
            for m in group.consumers:
                details.setdefault(m.fqn, {})["smooth"] = f"skipped: {group.reason}"
            continue
        layer_stats = _consumer_stats(group, stats)
        if layer_stats is None:
            for m in group.consumers:
                details.setdefault(m.fqn, {})["smooth"] = f"skipped: fewer than {MIN_CALIBRATION_ROWS} calibration rows"
            continue
        weights = [linear_weight(qgraph, m).float() for m in group.consumers]
        producer_channels = 0
        if group.index is not None:
            producer_channels = int(group.index.max()) + 1
        s, a, b, err, base = search_factors(layer_stats[0].samples, layer_stats[0].absmax, weights, config,
                                            group.index, producer_channels, alphas)
        info = {"smooth_alpha": a, "smooth_beta": b, "smooth_error_ratio": round(err / base, 4) if base else 1.0}
        if a == 0 and b == 0:
            info["smooth"] = "none (no factor lowered the error)"
        else:
            info["smooth"] = f"into {_fold(qgraph, group, s)}"
            if group.kind == "none":
                info["smooth_reason"] = group.reason
            for ls in layer_stats:
                transform_inputs(ls, divide=s)
        for m in group.consumers:
            details.setdefault(m.fqn, {}).update(info)
