"""Weight rounding that looks at the activations: a per-output-channel clipping-ratio search and
GPTQ (Hessian `X^T X` from calibration rows, damped, blocked, column by column with error feedback),
both for QoQ's two W4 formats. Emits `QuantizedWeight`s bit-compatible with `passes.quantize`.
"""
from __future__ import annotations

import math

import torch

from lowering.dispatch import cdiv
from lowering.w4a8_gemm import K_PAD, pack_nibbles
from passes.quantize import LayerDecision
from passes.scale_groups import linear_weight
from qcompile.calibrate_api import MIN_CALIBRATION_ROWS, enough_rows
from qcompile.calibration import CalibrationStats
from qcompile.capture import QGraph
from qcompile.config import QoQConfig
from runtime.quantized_weight import QuantizedWeight

_TINY = 1e-12
# Damping as a fraction of the mean Hessian diagonal. 0.01 (GPTQ's default) fitted SmolLM2-135M's
# 2-4k calibration tokens too closely (held-out perplexity +44% vs +35% with 0.1, ACCURACY.md).
GPTQ_DAMP = 0.1
CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)


def _round(v: torch.Tensor) -> torch.Tensor:
    return torch.floor(v + 0.5)  # the rounding passes.quantize uses


class _Quantizer:
    """One W4 format with per-row clip ratios; `params` fixes a group's scale/zero, `fake` rounds."""

    def __init__(self, w: torch.Tensor, config: QoQConfig, clip: torch.Tensor,
                 importance: torch.Tensor | None = None):
        self.N, self.K = w.shape
        # With `importance`, each group's (s2, z) is searched (search_grid) and codes round straight
        # from the float weight; without it, round-to-nearest parameters as passes.quantize.
        self.importance = importance
        self.group = config.weight_group_size
        self.pr = config.protective_range
        self.clip = clip.float().to(w.device)
        if self.group == -1:
            wmax = (w.amax(dim=1).clamp_min(0) * self.clip)
            wmin = (w.amin(dim=1).clamp_max(0) * self.clip)
            self.s = ((wmax - wmin) / 15).clamp_min(_TINY)
            self.z = _round(-wmin / self.s).clamp_(0, 15)
        else:
            self.s1 = w.abs().amax(dim=1).clamp_min(_TINY) / self.pr
            G = cdiv(self.K, self.group)
            self.s2 = torch.ones(self.N, G, device=w.device)
            self.z2 = torch.zeros(self.N, G, device=w.device)

    def start_group(self, g: int, wg: torch.Tensor) -> None:
        """Level-2 scale and zero of group `g` from its current (error-updated) columns."""
        if self.group == -1:
            return
        if self.importance is not None:
            ip = self.importance[g * self.group:g * self.group + wg.shape[1]]
            s2, z = _grid_params((wg / self.s1[:, None])[:, None, :], ip.view(1, 1, -1))
            self.s2[:, g], self.z2[:, g] = s2[:, 0], z[:, 0]
            return
        w8 = _round(wg / self.s1[:, None]).clamp_(-self.pr, self.pr)
        gmax = w8.amax(dim=1).clamp_min(0) * self.clip
        gmin = w8.amin(dim=1).clamp_max(0) * self.clip
        s2 = torch.ceil((gmax - gmin) / 15).clamp_min(1)
        self.s2[:, g] = s2
        self.z2[:, g] = _round(-gmin / s2).clamp_(0, 15)

    def codes(self, col: torch.Tensor, j: int) -> torch.Tensor:
        if self.group == -1:
            return (_round(col / self.s) + self.z).clamp_(0, 15)
        g = j // self.group
        if self.importance is not None:
            return _grid_codes(col / self.s1, self.s2[:, g], self.z2[:, g])
        w8 = _round(col / self.s1).clamp_(-self.pr, self.pr)
        return (_round(w8 / self.s2[:, g]) + self.z2[:, g]).clamp_(0, 15)

    def dequant(self, q: torch.Tensor, j: int) -> torch.Tensor:
        if self.group == -1:
            return self.s * (q - self.z)
        g = j // self.group
        return self.s1 * ((q - self.z2[:, g]) * self.s2[:, g])  # integer first, as the kernel

    def build(self, q: torch.Tensor) -> QuantizedWeight:
        """Pack codes [N, K] the way passes.quantize does (padding groups: scale 1, zero 0)."""
        N, K = self.N, self.K
        if self.group == -1:
            return QuantizedWeight(
                format="w4a8_per_channel", out_features=N, in_features=K, group_size=-1,
                qweight=pack_nibbles(q), wscale=self.s.contiguous(), gscale=None,
                gzero=self.z.to(torch.int32).contiguous())
        G = self.group
        multiple = math.lcm(K_PAD, G)
        Kp = cdiv(K, multiple) * multiple
        s2 = torch.ones(N, Kp // G, device=q.device)
        z2 = torch.zeros(N, Kp // G, device=q.device)
        s2[:, : self.s2.shape[1]] = self.s2
        z2[:, : self.z2.shape[1]] = self.z2
        qp = z2.repeat_interleave(G, dim=1)  # padded columns hold zeros: code = the group's zero
        qp[:, :K] = q
        return QuantizedWeight(
            format="w4a8_progressive", out_features=N, in_features=K, group_size=G,
            qweight=pack_nibbles(qp, multiple), wscale=self.s1.contiguous(),
            gscale=s2.to(torch.uint8).contiguous(), gzero=(z2 * s2).to(torch.uint8).contiguous())


def quantize_rtn(w: torch.Tensor, config: QoQConfig, clip: torch.Tensor | None = None) -> tuple[QuantizedWeight, torch.Tensor]:
    """Round to nearest with per-row clip ratios; returns the weight and its dequantized value."""
    w = w.detach().float()
    quant = _Quantizer(w, config, clip if clip is not None else torch.ones(w.shape[0], device=w.device))
    q = torch.empty_like(w)
    deq = torch.empty_like(w)
    step = quant.group if quant.group != -1 else w.shape[1]
    for g0 in range(0, w.shape[1], step):
        cols = slice(g0, min(g0 + step, w.shape[1]))
        quant.start_group(g0 // step, w[:, cols])
        if quant.group == -1:
            q[:, cols] = (_round(w[:, cols] / quant.s[:, None]) + quant.z[:, None]).clamp_(0, 15)
            deq[:, cols] = quant.s[:, None] * (q[:, cols] - quant.z[:, None])
        else:
            g = g0 // step
            w8 = _round(w[:, cols] / quant.s1[:, None]).clamp_(-quant.pr, quant.pr)
            q[:, cols] = (_round(w8 / quant.s2[:, g, None]) + quant.z2[:, g, None]).clamp_(0, 15)
            deq[:, cols] = quant.s1[:, None] * ((q[:, cols] - quant.z2[:, g, None]) * quant.s2[:, g, None])
    return quant.build(q), deq


def fake_quantize(w: torch.Tensor, config: QoQConfig, clip: torch.Tensor | None = None) -> torch.Tensor:
    """What `quantize_rtn(...)[1]` returns, vectorized over groups (for searches that call it often)."""
    w = w.detach().float()
    N, K = w.shape
    r = (clip.float().to(w.device) if clip is not None else torch.ones(N, device=w.device))[:, None]
    if config.weight_group_size == -1:
        wmax = w.amax(dim=1, keepdim=True).clamp_min(0) * r
        wmin = w.amin(dim=1, keepdim=True).clamp_max(0) * r
        s = ((wmax - wmin) / 15).clamp_min(_TINY)
        z = _round(-wmin / s).clamp_(0, 15)
        return s * ((_round(w / s) + z).clamp_(0, 15) - z)
    G, pr = config.weight_group_size, config.protective_range
    s1 = w.abs().amax(dim=1, keepdim=True).clamp_min(_TINY) / pr
    Kp = cdiv(K, G) * G
    w8 = torch.zeros(N, Kp, device=w.device)
    w8[:, :K] = _round(w / s1).clamp_(-pr, pr)
    g = w8.view(N, Kp // G, G)
    gmax = g.amax(dim=2, keepdim=True).clamp_min(0) * r[..., None]
    gmin = g.amin(dim=2, keepdim=True).clamp_max(0) * r[..., None]
    s2 = torch.ceil((gmax - gmin) / 15).clamp_min(1)
    z = _round(-gmin / s2).clamp_(0, 15)
    deq = ((_round(g / s2) + z).clamp_(0, 15) - z) * s2
    return deq.view(N, Kp)[:, :K] * s1


def search_clip(w: torch.Tensor, x: torch.Tensor, config: QoQConfig, ratios=CLIP_RATIOS) -> torch.Tensor:
    """Per output channel, the clip ratio whose round-to-nearest weight gives the least output error on `x`."""
    w = w.detach().float()
    best_err = torch.full((w.shape[0],), float("inf"), device=w.device)
    best = torch.ones(w.shape[0], device=w.device)
    for r in ratios:
        deq = fake_quantize(w, config, torch.full((w.shape[0],), float(r), device=w.device))
        err = (x @ (w - deq).t()).pow(2).sum(dim=0)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, torch.full_like(best, float(r)), best)
    return best


def gptq(w: torch.Tensor, hessian: torch.Tensor, config: QoQConfig, clip: torch.Tensor | None = None,
         damp: float = 0.01, block: int = 128, grid: bool = False) -> tuple[QuantizedWeight, torch.Tensor]:
    """GPTQ (Frantar et al.): quantize columns in order, pushing each column's rounding error onto the
    columns not yet quantized through the inverse Hessian. Group parameters are set when a group starts."""
    W = w.detach().float().clone()
    N, K = W.shape
    H = hessian.detach().float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += damp * torch.mean(torch.diag(H)) * torch.eye(K, device=H.device)
    L = torch.linalg.cholesky(H)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    importance = None
    if grid and config.weight_group_size != -1:
        importance = _normalized_importance(torch.diagonal(H), K)  # damped: GPTQ's own view of the channels
    quant = _Quantizer(W, config, clip if clip is not None else torch.ones(N, device=W.device), importance)
    if quant.group != -1:
        block = quant.group  # a block is one group, so its parameters come from error-updated columns
    Q = torch.zeros_like(W)
    deq = torch.zeros_like(W)
    for i1 in range(0, K, block):
        i2 = min(i1 + block, K)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        quant.start_group(i1 // block, W1)
        for i in range(i2 - i1):
            col = W1[:, i]
            q = quant.codes(col, i1 + i)
            dq = quant.dequant(q, i1 + i)
            Q[:, i1 + i] = q
            deq[:, i1 + i] = dq
            err = (col - dq) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return quant.build(Q), deq


def _hessian(ls) -> torch.Tensor | None:
    h = getattr(ls, "hessian", None)
    if h is not None:
        return h
    if ls.samples.shape[0] == 0:
        return None
    return ls.samples.t() @ ls.samples


def _importance(ls) -> torch.Tensor:
    """Mean square of each input channel over the calibration tokens (the Hessian's diagonal)."""
    h = getattr(ls, "hessian", None)
    if h is not None and ls.tokens:
        return torch.diagonal(h).float() / ls.tokens
    return ls.samples.float().pow(2).mean(dim=0)


def search_weights(qgraph: QGraph, decisions: list[LayerDecision], config: QoQConfig, stats: CalibrationStats,
                   details: dict[str, dict]) -> list[LayerDecision]:
    """Replace round-to-nearest weights by clip-searched and/or GPTQ ones where statistics allow."""
    from qcompile.progress import progress

    out = []
    for d in progress(decisions, desc="GPTQ / clip search", quiet=config.quiet, unit="layer"):
        m = d.match
        ls = stats.get(m.fqn) if stats is not None else None
        if d.qweight is None or not enough_rows(ls):
            if d.qweight is not None:
                details.setdefault(m.fqn, {})["weight_search"] = f"skipped: fewer than {MIN_CALIBRATION_ROWS} calibration rows"
            out.append(d)
            continue
        w = linear_weight(qgraph, m).float()
        x = ls.samples.float()
        info = {}
        grid = config.clip_search and config.weight_group_size != -1
        clip = search_clip(w, x, config) if config.clip_search and not grid else None
        if clip is not None:
            info["clip_ratio_mean"] = round(float(clip.mean()), 4)
        if config.gptq:
            qw, deq = gptq(w, _hessian(ls), config, clip, damp=GPTQ_DAMP, grid=grid)
            info["gptq"] = True
        elif grid:
            # Group format: each group's (s2, z) searched, weighted by the channels' mean square input.
            qw, deq = search_grid(w, config, _importance(ls))
        else:
            qw, deq = quantize_rtn(w, config, clip)
        if grid:
            info["grid_search"] = True
        ref = x @ w.t()
        rtn_err = float((x @ (w - d.qweight.dequantize()).t()).pow(2).sum())
        new_err = float((ref - x @ deq.t()).pow(2).sum())
        # The samples are the rows GPTQ fitted: keep round-to-nearest where it still wins on them.
        if new_err <= rtn_err:
            out.append(LayerDecision(m, qw, d.reason))
        else:
            out.append(d)
            info["weight_search"] = "kept round-to-nearest (lower error on the calibration rows)"
        info["weight_error_ratio"] = round(min(new_err, rtn_err) / rtn_err, 4) if rtn_err else 1.0
        details.setdefault(m.fqn, {}).update(info)
    return out


# Offsets tried around round-to-nearest's level-2 parameters: s2 below ceil(range/15) clips the
# group's extremes for a finer step; the zero moves by one either way to recentre the grid.
GRID_SCALE_STEPS = (-3, -2, -1, 0, 1)
GRID_ZERO_STEPS = (-1, 0, 1)


def _grid_params(u: torch.Tensor, ip: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Best (s2, z) per group of `u` [N, G, g] (weights in level-1 units), weights `ip` [1, G, g]."""
    gmax = u.amax(dim=2).clamp_min(0)
    gmin = u.amin(dim=2).clamp_max(0)
    c = torch.ceil((gmax - gmin) / 15).clamp(1, 16)
    best_err = torch.full(c.shape, float("inf"), device=c.device)
    best_s = c.clone()
    best_z = _round(-gmin / c).clamp(0, 15)
    for ds in GRID_SCALE_STEPS:
        s2 = (c + ds).clamp(1, 16)
        z0 = _round(-gmin / s2)
        for dz in GRID_ZERO_STEPS:
            z = (z0 + dz).clamp(0, 15)
            q = _grid_codes(u, s2[..., None], z[..., None])
            err = ((u - (q - z[..., None]) * s2[..., None]).pow(2) * ip).sum(dim=2)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_s = torch.where(better, s2, best_s)
            best_z = torch.where(better, z, best_z)
    return best_s, best_z


def _grid_codes(u: torch.Tensor, s2: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Codes rounded straight from level-1 units, limited to levels whose (q − z)·s2 fits int8."""
    lo = (z - torch.floor(128 / s2)).clamp_min(0)
    hi = (z + torch.floor(127 / s2)).clamp_max(15)
    return torch.minimum(torch.maximum(_round(u / s2) + z, lo), hi)


def _normalized_importance(importance: torch.Tensor | None, K: int, device=None) -> torch.Tensor:
    imp = torch.ones(K, device=device) if importance is None else importance.detach().float().clamp_min(0).to(device)
    if imp.shape != (K,):
        raise ValueError(f"importance has shape {tuple(imp.shape)}, expected ({K},): one weight per input channel")
    return imp / imp.mean().clamp_min(_TINY) + 1e-3  # no channel is free: keeps unseen channels sane


def search_grid(w: torch.Tensor, config: QoQConfig, importance: torch.Tensor | None = None
                ) -> tuple[QuantizedWeight, torch.Tensor]:
    """Progressive W4 with each group's integer scale s2 and zero z chosen among neighbours of the
    round-to-nearest ones, by the importance-weighted squared error of the group's dequantized weight.

    `importance[k]` (e.g. E[x_k²] over calibration tokens) weighs the error of input channel k, so
    the search minimizes the diagonal part of the layer's output error. Codes are rounded straight
    from the float weight (no intermediate int8), and every level used stays inside int8:
    (q − z)·s2 ∈ [−128, 127], s2 ∈ [1, 16], as the kernels need. Returns the packed weight and its
    dequantized value (what the kernels compute with).
    """
    if config.weight_group_size == -1:
        raise ValueError("search_grid is for the progressive (group) format; per-channel weights use search_clip")
    w = w.detach().float()
    N, K = w.shape
    G, pr = config.weight_group_size, config.protective_range
    imp = _normalized_importance(importance, K, w.device)
    s1 = w.abs().amax(dim=1).clamp_min(_TINY) / pr
    Kp = cdiv(K, G) * G
    u = torch.zeros(N, Kp, device=w.device)
    u[:, :K] = w / s1[:, None]
    ip = torch.zeros(Kp, device=w.device)
    ip[:K] = imp
    u = u.view(N, Kp // G, G)
    s2, z = _grid_params(u, ip.view(1, Kp // G, G))
    q = _grid_codes(u, s2[..., None], z[..., None])
    deq = ((q - z[..., None]) * s2[..., None]).view(N, Kp)[:, :K] * s1[:, None]
    quant = _Quantizer(w, config, torch.ones(N, device=w.device))
    quant.s1, quant.s2, quant.z2 = s1, s2, z
    return quant.build(q.view(N, Kp)[:, :K]), deq
