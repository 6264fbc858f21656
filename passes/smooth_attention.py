"""SmoothAttention (QoQ): divide K's outlier channels by λ = max|K|^α and multiply q by the same λ,
folded into the q_proj and k_proj rows (biases included), so q·k is unchanged and K quantizes to
4 bits with less error. RoPE pairs (i, i + D/2) share λ, and so do the query heads of a GQA group.
"""
from __future__ import annotations

import torch

from passes.match import LinearMatch
from passes.scale_groups import AttentionMatch, find_attention, linear_bias, linear_weight, set_linear_weight
from qcompile.calibrate_api import MIN_CALIBRATION_ROWS, enough_rows
from qcompile.calibration import CalibrationStats
from qcompile.capture import QGraph
from qcompile.config import QoQConfig

_FLOOR = 1e-5


def key_magnitude(k: torch.Tensor, head_dim: int, rope: str) -> torch.Tensor:
    """Per-channel max |K| over tokens, k [T, KVH·D] before RoPE.

    RoPE rotates each pair (i, i + D/2) by a position-dependent angle, so what a pair can reach
    after RoPE is its length: both channels of a pair get max sqrt(k_i² + k_{i+D/2}²).
    """
    if rope == "none":
        return k.abs().amax(dim=0)
    t = k.shape[0]
    kh = k.view(t, -1, 2, head_dim // 2)
    pair = kh.pow(2).sum(dim=2).sqrt().amax(dim=0)  # [KVH, D/2]
    return pair.unsqueeze(1).expand(-1, 2, -1).reshape(-1)


def _scale_rows(qgraph: QGraph, m: LinearMatch, offset: int, factor: torch.Tensor) -> None:
    rows = slice(offset, offset + factor.shape[0])
    w = linear_weight(qgraph, m).clone()
    w[rows] = (w[rows].float() * factor[:, None]).to(w.dtype)
    set_linear_weight(qgraph, m, w)
    b = linear_bias(qgraph, m)
    if b is not None:
        b = b.clone()
        b[rows] = (b[rows].float() * factor).to(b.dtype)
        qgraph.set_weight(m.bias, b)


def smooth_attention_one(qgraph: QGraph, a: AttentionMatch, x: torch.Tensor, alpha: float) -> torch.Tensor:
    """Apply SmoothAttention to one attention call; `x` are k_proj input rows. Returns λ [KVH·D]."""
    D, H, KVH = a.head_dim, a.heads, a.kv_heads
    wk = linear_weight(qgraph, a.k).float()[a.k_offset:a.k_offset + KVH * D]
    bk = linear_bias(qgraph, a.k)
    k = x.float() @ wk.detach().t()
    if bk is not None:
        k = k + bk.float()[a.k_offset:a.k_offset + KVH * D]
    lam = key_magnitude(k, D, a.rope).clamp_min(_FLOOR).pow(alpha)
    rep = H // KVH
    lam_q = lam.view(KVH, 1, D).expand(KVH, rep, D).reshape(-1)  # query head h reads kv head h // rep
    _scale_rows(qgraph, a.q, a.q_offset, lam_q)
    _scale_rows(qgraph, a.k, a.k_offset, 1.0 / lam)
    return lam


def smooth_attention(qgraph: QGraph, linears: list[LinearMatch], config: QoQConfig, stats: CalibrationStats,
                     details: dict[str, dict]) -> None:
    alpha = float(getattr(config, "smooth_attention_alpha", 0.5))
    for a in find_attention(qgraph, linears):
        names = [m.fqn for m in (a.q, a.k) if m is not None]
        reason = a.reason
        if not reason and (a.heads % max(a.kv_heads, 1) or a.kv_heads <= 0 or a.head_dim % 2):
            reason = f"heads {a.heads} / kv heads {a.kv_heads} / head dim {a.head_dim} do not fit"
        layer_stats = stats.get(a.k.fqn) if a.k is not None else None
        if not reason and not enough_rows(layer_stats):
            reason = f"fewer than {MIN_CALIBRATION_ROWS} calibration rows for k"
        if reason:
            for n in names:
                details.setdefault(n, {})["smooth_attention"] = f"skipped: {reason}"
            continue
        lam = smooth_attention_one(qgraph, a, layer_stats.samples, alpha)
        info = {"smooth_attention": f"alpha={alpha}, rope={a.rope}", "smooth_attention_lambda_max": round(float(lam.max().detach()), 3)}
        for n in names:
            details.setdefault(n, {}).update(info)
