"""Weights -> QuantizedWeight in the W4 formats of the design, and the pass that picks the layers.

Progressive (QoQ, group g): level 1 symmetric int8 per output channel into [-119, 119]; level 2
asymmetric uint4 per group with an integer scale s2 and zero z, so that (q − z)·s2 stays in int8.
Per-channel: asymmetric uint4 per output channel, `W ≈ s·(q − z)`.
"""
from __future__ import annotations

import fnmatch
import math
from torch.utils.weak import WeakIdKeyDictionary
from dataclasses import dataclass
from typing import Optional

import torch

from lowering.dispatch import cdiv
from lowering.w4a8_gemm import K_PAD, pack_nibbles
from passes.match import LinearMatch, other_uses
from qcompile.capture import QGraph
from qcompile.config import QoQConfig
from runtime.quantized_weight import QuantizedWeight

_TINY = 1e-12


def _round(v: torch.Tensor) -> torch.Tensor:
    return torch.floor(v + 0.5)


def quantize_progressive(w: torch.Tensor, group_size: int = 128, protective_range: int = 119) -> QuantizedWeight:
    """QoQ's progressive W4 (level 1 int8 per channel, level 2 uint4 per group with int scale/zero)."""
    N, K = w.shape
    w = w.detach().float()
    s1 = w.abs().amax(dim=1).clamp_min(_TINY) / protective_range
    w8 = _round(w / s1[:, None]).clamp_(-protective_range, protective_range)
    multiple = math.lcm(K_PAD, group_size)
    Kp = cdiv(K, multiple) * multiple
    w8p = torch.zeros((N, Kp), dtype=torch.float32, device=w.device)
    w8p[:, :K] = w8
    g = w8p.view(N, Kp // group_size, group_size)
    # The range must hold 0 so an unsigned zero point in [0, 15] can express it.
    gmax = g.amax(dim=2).clamp_min(0)
    gmin = g.amin(dim=2).clamp_max(0)
    s2 = torch.ceil((gmax - gmin) / 15).clamp_min(1)  # <= ceil(2·119/15) = 16: q·s2 <= 240 fits a byte
    z = _round(-gmin / s2).clamp_(0, 15)
    q = (_round(g / s2[..., None]) + z[..., None]).clamp_(0, 15)
    return QuantizedWeight(
        format="w4a8_progressive", out_features=N, in_features=K, group_size=group_size,
        qweight=pack_nibbles(q.view(N, Kp), multiple), wscale=s1.contiguous(),
        gscale=s2.to(torch.uint8).contiguous(), gzero=(z * s2).to(torch.uint8).contiguous(),
    )


def quantize_per_channel(w: torch.Tensor) -> QuantizedWeight:
    """Asymmetric uint4 per output channel: `W ≈ s[n]·(q − z[n])`."""
    N, K = w.shape
    w = w.detach().float()
    wmax = w.amax(dim=1).clamp_min(0)
    wmin = w.amin(dim=1).clamp_max(0)
    s = ((wmax - wmin) / 15).clamp_min(_TINY)
    z = _round(-wmin / s).clamp_(0, 15)
    q = (_round(w / s[:, None]) + z[:, None]).clamp_(0, 15)
    return QuantizedWeight(
        format="w4a8_per_channel", out_features=N, in_features=K, group_size=-1,
        qweight=pack_nibbles(q), wscale=s.contiguous(), gscale=None, gzero=z.to(torch.int32).contiguous(),
    )


def quantize_weight(w: torch.Tensor, config: QoQConfig) -> QuantizedWeight:
    if config.weight_group_size == -1:
        return quantize_per_channel(w)
    return quantize_progressive(w, config.weight_group_size, config.protective_range)


@dataclass
class LayerDecision:
    match: LinearMatch
    qweight: Optional[QuantizedWeight]  # None: left in FP
    reason: str = ""  # why it was left in FP


# Each parameter is quantized once per format, however many graphs or recompiles read it.
_CACHE: WeakIdKeyDictionary = WeakIdKeyDictionary()


def repoint_cached(replacements: dict[int, torch.Tensor]) -> None:
    """Make the cached QuantizedWeights read new tensors: `replacements` maps id(old tensor) -> new.

    fuse_gemms concatenates a group's packed weights and scales into one buffer and hands the
    graph views of it; a cache entry still holding the per-layer tensors would keep a second copy
    of those weights alive for as long as the FP parameter object lives (after its storage is
    released, too)."""
    for per_param in list(_CACHE.values()):
        for qw in per_param.values():
            for name in ("qweight", "wscale", "gscale", "gzero"):
                new = replacements.get(id(getattr(qw, name)))
                if new is not None:
                    setattr(qw, name, new)


def _format_key(config: QoQConfig, transposed: bool) -> tuple:
    return (config.weight_format, config.weight_group_size, config.protective_range, transposed)


def skip_reason(match: LinearMatch, linears: list[LinearMatch], config: QoQConfig, qgraph: QGraph) -> str:
    """Why a linear stays in FP, or '' when it can be quantized."""
    for pattern in config.skip_layers:
        if fnmatch.fnmatchcase(match.fqn, pattern):
            return f"skipped by skip_layers pattern {pattern!r}"
    uses = other_uses(match, linears)
    if uses:
        kinds = sorted({str(getattr(u.target, "__name__", u.target)) for u in uses})
        return f"weight is also read outside linear layers ({', '.join(kinds)}), e.g. tied to an embedding"
    w = qgraph.weight(match.weight)
    if not w.is_floating_point():
        return f"weight dtype {w.dtype} is not floating point"
    if min(w.shape) < 1:
        return "empty weight"
    return ""


def quantize_linears(qgraph: QGraph, linears: list[LinearMatch], config: QoQConfig) -> list[LayerDecision]:
    decisions = []
    for m in linears:
        reason = skip_reason(m, linears, config, qgraph)
        if reason:
            decisions.append(LayerDecision(m, None, reason))
            continue
        param = qgraph.weights[m.weight.name].tensor
        overridden = m.weight.name in qgraph.overrides
        key = _format_key(config, m.weight_transposed)
        per_param = None if overridden else _CACHE.setdefault(param, {})
        qw = per_param.get((key, param._version)) if per_param is not None else None
        if qw is None:
            w = qgraph.weight(m.weight)
            qw = quantize_weight(w.t() if m.weight_transposed else w, config)
            if per_param is not None:
                per_param[(key, param._version)] = qw
        decisions.append(LayerDecision(m, qw))
    return decisions


def output_sqnr_db(x: torch.Tensor, w: torch.Tensor, qw: QuantizedWeight) -> float:
    """SQNR of the quantized layer's output (int8 tokens, W4 weights) against FP on rows `x`, in dB."""
    from lowering.activation_quant import quantize_act_int8_reference

    x = x.to(w.device).float()
    ref = x @ w.float().t()
    x8, sx, _ = quantize_act_int8_reference(x)
    out = (x8.float() * sx[:, None]) @ qw.to(w.device).dequantize().t()
    noise = (out - ref).pow(2).sum().clamp_min(1e-30)
    return float(10 * torch.log10(ref.pow(2).sum().clamp_min(1e-30) / noise))
