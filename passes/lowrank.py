"""SVDQuant: smooth each chosen linear, split it into a 16-bit low-rank branch plus a residual
(`W = L_down·L_up + R`, R is what gets quantized to 4 bits), and rewrite the graph to the W4A4
ops (`qoq::w4a4_quantize_act` + `qoq::w4a4_gemm`, branch fused) or to W4A8 + low-rank.

Tensor math first (`fit_lowrank`, `search_smoothing`, `svdquant_linear`, `svdquant_shared`), then
the FX pass (`svdquant_pass`). Orientation: a linear is y = x·Wᵀ with W [N, K]; the branch is
(x̂·L_down)·L_up with L_down [K, r], L_up [r, N], so its weight is (L_down·L_up)ᵀ.
"""
from __future__ import annotations

import fnmatch
import logging
import math
import operator
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
import torch.fx as fx

from lowering.w4a4_activation_quant import GELU_SHIFT, quantize_groups_int4, quantize_groups_uint4
from lowering.w4a4_gemm import dequantize, quantize_weight, shifted_bias
from passes.lower import out_dtype_of

log = logging.getLogger("qoq")

FakeQuant = Callable[[torch.Tensor], torch.Tensor]

DEFAULT_RANK = 32
DEFAULT_ALPHAS = (0.0, 0.2, 0.4, 0.5, 0.6, 0.8)
DEFAULT_BETAS = (0.0, 0.2, 0.4, 0.6)
# Above this many weight entries a full SVD costs seconds per layer on a CPU; the randomized one
# (a few power iterations on r + 16 vectors) finds the same top-32 subspace to ~1e-3.
RANDOMIZED_SVD_ABOVE = 1 << 22


# --------------------------------------------------------------------------------------------
# The formats' fake quantization: what the kernels will compute, in float, for error scoring.
# --------------------------------------------------------------------------------------------

def _lowrank_format(w4a4: bool, w4a8_group_size: int) -> str:
    """The report's format name of a linear with the low-rank branch ("w4a8_per_channel+lowrank")."""
    if w4a4:
        return "w4a4_g64+lowrank"
    return ("w4a8_per_channel" if w4a8_group_size == -1 else f"w4a8_g{w4a8_group_size}") + "+lowrank"


def fake_quant_w4a4_weight(w: torch.Tensor) -> torch.Tensor:
    """W [N, K] -> the W4A4 weight (int4 g64, fp16 scales) the GEMM multiplies by, fp32 [N, K]."""
    packed, scale = quantize_weight(w)
    return dequantize(packed, scale, w.shape[1])


def fake_quant_w4a4_act(x: torch.Tensor) -> torch.Tensor:
    """X [T, K] -> per-token int4 g64 activations as `qoq::w4a4_quantize_act` makes them."""
    q, s = quantize_groups_int4(x)
    g = s.shape[1]
    return (q.float().view(x.shape[0], g, -1) * s[..., None]).view(x.shape[0], -1)[:, : x.shape[1]]


def fake_quant_w4a4_act_unsigned(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """X [T, K] ≥ −shift -> unsigned int4 g64 of x + shift, shifted back (the GEMM's bias does)."""
    xs = x + shift.to(x.device)
    q, s = quantize_groups_uint4(xs)
    g = s.shape[1]
    deq = (q.float().view(x.shape[0], g, -1) * s[..., None]).view(x.shape[0], -1)[:, : x.shape[1]]
    return deq - shift.to(x.device)


def fake_quant_w4a8_weight(w: torch.Tensor, group_size: int = 128) -> torch.Tensor:
    """W [N, K] -> QoQ's progressive W4 weight (the residual format of `w4a8-svd`), fp32."""
    from passes.quantize import quantize_per_channel, quantize_progressive

    qw = quantize_per_channel(w) if group_size == -1 else quantize_progressive(w, group_size)
    return qw.dequantize().float()


def fake_quant_a8(x: torch.Tensor) -> torch.Tensor:
    """Per-token symmetric int8, as `qoq::quantize_act_int8` makes it."""
    from lowering.activation_quant import quantize_act_int8_reference

    x8, sx, _ = quantize_act_int8_reference(x)
    return x8.float() * sx.float()[:, None]


def fake_quants(fmt: str, group_size: int = 128) -> tuple[FakeQuant, FakeQuant]:
    """(weight, activation) fake quantizers of a residual format: "w4a4" or "w4a8"."""
    if fmt == "w4a4":
        return fake_quant_w4a4_weight, fake_quant_w4a4_act
    if fmt == "w4a8":
        return (lambda w: fake_quant_w4a8_weight(w, group_size)), fake_quant_a8
    raise ValueError(f"residual format {fmt!r}: expected 'w4a4' or 'w4a8'")


# --------------------------------------------------------------------------------------------
# Low-rank split with quantization in the loop.
# --------------------------------------------------------------------------------------------

def top_r(w: torch.Tensor, rank: int, svd: str = "auto", niter: int = 4
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-r approximation of W [N, K] as (L_down [K, r], L_up [r, N]), (L_down·L_up)ᵀ ≈ W.

    The singular values are split as √S on each side so both 16-bit factors have similar ranges.
    svd: "full" (torch.linalg.svd), "randomized" (torch.svd_lowrank), "auto" (by size).
    """
    n, k = w.shape
    rank = min(rank, n, k)
    if rank == 0:
        return w.new_zeros((k, 0)), w.new_zeros((0, n))
    if svd == "auto":
        svd = "randomized" if w.numel() > RANDOMIZED_SVD_ABOVE else "full"
    if svd == "full":
        u, s, vh = torch.linalg.svd(w.float(), full_matrices=False)
        u, s, v = u[:, :rank], s[:rank], vh[:rank].T
    elif svd == "randomized":
        u, s, v = torch.svd_lowrank(w.float(), q=min(rank + 16, n, k), niter=niter)
        u, s, v = u[:, :rank], s[:rank], v[:, :rank]
    else:
        raise ValueError(f"svd={svd!r}: expected 'auto', 'full' or 'randomized'")
    root = s.sqrt()
    return (v * root).contiguous(), (u * root).T.contiguous()


def output_error(x: torch.Tensor, w: torch.Tensor, l_down: torch.Tensor, l_up: torch.Tensor,
                 residual: torch.Tensor, weight_fq: FakeQuant, act_fq: FakeQuant | None,
                 y_ref: torch.Tensor | None = None) -> float:
    """Relative squared output error ‖ŷ − y‖² / ‖y‖² of the split layer on rows x [T, K].

    ŷ = Q_a(x)·Q_w(R)ᵀ + (x·L_down)·L_up: the branch reads the unquantized activation, as in the
    kernels.
    """
    y = x @ w.T if y_ref is None else y_ref
    xq = act_fq(x) if act_fq is not None else x
    y_hat = xq @ weight_fq(residual).T
    if l_down.shape[1]:
        y_hat = y_hat + (x @ l_down) @ l_up
    return float((y_hat - y).pow(2).sum() / y.pow(2).sum().clamp_min(1e-30))


@dataclass
class LowRankFit:
    l_down: torch.Tensor        # [K, r]
    l_up: torch.Tensor          # [r, N]
    residual: torch.Tensor      # [N, K] = W − (L_down·L_up)ᵀ, the part that is quantized
    errors: list[float]         # output error after each fit; [0] is the plain top-r SVD


def fit_lowrank(w: torch.Tensor, x: torch.Tensor | None, rank: int = DEFAULT_RANK, *,
                weight_fq: FakeQuant = fake_quant_w4a4_weight,
                act_fq: FakeQuant | None = fake_quant_w4a4_act, max_iters: int = 20,
                min_gain: float = 1e-3, svd: str = "auto") -> LowRankFit:
    """Split W [N, K] into a rank-r branch and a residual, refitting with quantization in the loop.

    Starting from the top-r SVD L of W, each step takes the top-r SVD of W − Q(W − L): the branch
    absorbs what quantizing the residual loses. Steps continue while the output error on the
    calibration rows x [T, K] improves by more than `min_gain` (relative); the best fit is kept.
    Without rows (x None) the error is measured on the weight itself (x = I).
    """
    w = w.float()
    if x is None:
        x = torch.eye(w.shape[1], device=w.device)
    x = x.float().to(w.device)
    y_ref = x @ w.T
    l_down, l_up = top_r(w, rank, svd)
    best = LowRankFit(l_down, l_up, w - (l_down @ l_up).T, [])
    err = output_error(x, w, l_down, l_up, best.residual, weight_fq, act_fq, y_ref)
    best.errors.append(err)
    if rank == 0:
        return best
    for _ in range(max_iters):
        target = w - weight_fq(best.residual)   # = L + what quantizing R throws away
        l_down, l_up = top_r(target, rank, svd)
        residual = w - (l_down @ l_up).T
        err = output_error(x, w, l_down, l_up, residual, weight_fq, act_fq, y_ref)
        best_err = min(best.errors)
        best.errors.append(err)
        if err < best_err:
            best.l_down, best.l_up, best.residual = l_down, l_up, residual
        if err >= best_err * (1 - min_gain):
            break
    return best


# --------------------------------------------------------------------------------------------
# SVDQuant smoothing: x̂ = x / λ, Ŵ = W·diag(λ), λ = max|x|^α / max|W|^β per input channel.
# --------------------------------------------------------------------------------------------

def smoothing_factors(x_absmax: torch.Tensor, w: torch.Tensor, alpha: float, beta: float
                      ) -> torch.Tensor:
    """λ [K] for activations with per-channel absmax x_absmax [K] and weight W [N, K]."""
    xa = x_absmax.float().to(w.device).clamp_min(1e-5)
    wa = w.float().abs().amax(dim=0).clamp_min(1e-5)
    lam = xa.pow(alpha) / wa.pow(beta)
    # Only the ratios between channels matter; centring keeps x̂ and Ŵ in a sane range.
    lam = lam / lam.log().mean().exp()
    return lam.clamp(1e-4, 1e4)


@dataclass
class SmoothingSearch:
    alpha: float
    beta: float
    smooth: torch.Tensor                        # λ [K]
    scores: dict[tuple[float, float], float]    # (α, β) -> output error


def search_smoothing(w: torch.Tensor, x: torch.Tensor, x_absmax: torch.Tensor | None = None,
                     rank: int = DEFAULT_RANK, *, alphas: Sequence[float] = DEFAULT_ALPHAS,
                     betas: Sequence[float] = DEFAULT_BETAS,
                     weight_fq: FakeQuant = fake_quant_w4a4_weight,
                     act_fq: FakeQuant | None = fake_quant_w4a4_act, svd: str = "auto",
                     act_shift: torch.Tensor | None = None) -> SmoothingSearch:
    """Grid over (α, β), each scored on the output error with the rank-r branch (one plain SVD,
    no refit: the ranking is what matters) and quantization applied. (0, 0) is no smoothing, so
    the winner never scores worse than leaving the layer unsmoothed. act_shift [K]: inputs are
    ≥ −act_shift (after GELU) and quantized unsigned; x/λ then needs act_shift/λ."""
    w = w.float()
    x = x.float().to(w.device)
    if x_absmax is None:
        x_absmax = x.abs().amax(dim=0)
    y_ref = x @ w.T     # smoothing preserves the function: x̂·Ŵᵀ = x·Wᵀ
    scores: dict[tuple[float, float], float] = {}
    best: tuple[float, float, torch.Tensor] | None = None
    grid = [(a, b) for a in alphas for b in betas]
    if (0.0, 0.0) not in grid:
        grid.insert(0, (0.0, 0.0))
    for a, b in grid:
        lam = smoothing_factors(x_absmax, w, a, b) if (a, b) != (0.0, 0.0) else torch.ones(
            w.shape[1], device=w.device)
        ws = w * lam
        l_down, l_up = top_r(ws, rank, svd)
        err = output_error(x / lam, ws, l_down, l_up, ws - (l_down @ l_up).T, weight_fq,
                           _shifted(act_fq, act_shift, lam), y_ref)
        scores[(a, b)] = err
        if best is None or err < scores[best[:2]]:
            best = (a, b, lam)
    return SmoothingSearch(best[0], best[1], best[2], scores)


def _shifted(act_fq: FakeQuant | None, act_shift: torch.Tensor | None, lam: torch.Tensor
             ) -> FakeQuant | None:
    """The activation fake quantizer for x/λ when the inputs are quantized unsigned."""
    if act_shift is None or act_fq is not fake_quant_w4a4_act:
        return act_fq
    shift = act_shift.float().to(lam.device) / lam
    return lambda x: fake_quant_w4a4_act_unsigned(x, shift)


@dataclass
class SVDQuantLinear:
    """One linear (or a group sharing an input, concatenated along N) after SVDQuant."""
    smooth: torch.Tensor        # λ [K]: the layer reads x / λ
    l_down: torch.Tensor        # [K, r], applied to x / λ
    l_up: torch.Tensor          # [r, N]
    residual: torch.Tensor      # [N, K] in the smoothed space: W·diag(λ) − (L_down·L_up)ᵀ
    alpha: float
    beta: float
    errors: list[float]         # refit history (relative output error)
    error_rtn: float            # the same layer quantized round-to-nearest, no smoothing/branch
    act_shift: Optional[torch.Tensor] = None    # [K] in the smoothed space: unsigned activations

    @property
    def error(self) -> float:
        return min(self.errors)


def svdquant_linear(w: torch.Tensor, x: torch.Tensor, x_absmax: torch.Tensor | None = None,
                    rank: int = DEFAULT_RANK, *, fmt: str = "w4a4", group_size: int = 128,
                    alphas: Sequence[float] = DEFAULT_ALPHAS,
                    betas: Sequence[float] = DEFAULT_BETAS, max_iters: int = 20,
                    svd: str = "auto", act_shift: torch.Tensor | None = None) -> SVDQuantLinear:
    """Smoothing search, then the low-rank fit with quantization in the loop, for W [N, K] on
    calibration rows x [T, K] (x_absmax [K]: the absmax over all calibration tokens, when the
    rows are a sample). fmt: the residual's format, "w4a4" or "w4a8" (group_size for w4a8).
    act_shift [K] (W4A4 only): the inputs are ≥ −act_shift and quantized unsigned (after GELU).
    RTN is always the signed format, unsmoothed, with no branch."""
    weight_fq, act_fq = fake_quants(fmt, group_size)
    if fmt != "w4a4":
        act_shift = None
    w = w.float()
    x = x.float().to(w.device)
    error_rtn = output_error(x, w, w.new_zeros((w.shape[1], 0)), w.new_zeros((0, w.shape[0])), w,
                             weight_fq, act_fq)
    found = search_smoothing(w, x, x_absmax, rank, alphas=alphas, betas=betas,
                             weight_fq=weight_fq, act_fq=act_fq, svd=svd, act_shift=act_shift)
    lam = found.smooth
    fit = fit_lowrank(w * lam, x / lam, rank, weight_fq=weight_fq,
                      act_fq=_shifted(act_fq, act_shift, lam), max_iters=max_iters, svd=svd)
    return SVDQuantLinear(lam, fit.l_down, fit.l_up, fit.residual, found.alpha, found.beta,
                          fit.errors, error_rtn,
                          None if act_shift is None else act_shift.float().to(lam.device) / lam)


def svdquant_shared(ws: Sequence[torch.Tensor], x: torch.Tensor,
                    x_absmax: torch.Tensor | None = None, rank: int = DEFAULT_RANK, **kw
                    ) -> tuple[SVDQuantLinear, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Linears reading the same input (q/k/v) share λ and one down-projection: fit the weights
    concatenated along N. Returns the joint result and, per linear, (L_up [r, N_i], residual
    [N_i, K])."""
    joint = svdquant_linear(torch.cat([w.float() for w in ws]), x, x_absmax, rank, **kw)
    parts, start = [], 0
    for w in ws:
        n = w.shape[0]
        parts.append((joint.l_up[:, start:start + n], joint.residual[start:start + n]))
        start += n
    return joint, parts


# --------------------------------------------------------------------------------------------
# The FX pass.
# --------------------------------------------------------------------------------------------

# SVDQuant's layer selection for diffusers models (fnmatch over module FQNs). Kept in 16 bits:
# embeddings, the model's input/output projections, time/text/guidance embedders.
SKIP_16BIT = (
    "proj_in", "proj_out", "*.attentions.*.proj_in", "*.attentions.*.proj_out",
    "x_embedder", "context_embedder", "pos_embed*", "patch_embed*", "caption_projection*",
    "time_text_embed.*", "time_embed*", "time_embedding.*", "*timestep_embedder*",
    "*text_embedder*", "*guidance_embedder*", "add_embedding.*", "class_embedding*",
    "conv_in", "conv_out", "lm_head", "*.lm_head",
)
# AdaLN modulation linears: 4-bit weights (their M is the batch size, so only bytes matter; the
# W4A8 GEMM takes M <= 4 on its GEMV kernel).
ADALN = ("*norm*.linear", "norm_out.*", "*.norm_out.*")
ADALN_MODES = ("w4a8", "w4_simulated", "fp")


@dataclass
class SVDQuantOptions:
    rank: int = DEFAULT_RANK
    residual: str = "w4a4"          # "w4a4" (recipe svdquant) or "w4a8" (recipe w4a8-svd)
    w4a8_group_size: int = 128      # the W4A8 residual's weight groups (-1: per channel)
    alphas: tuple[float, ...] = DEFAULT_ALPHAS
    betas: tuple[float, ...] = DEFAULT_BETAS
    max_iters: int = 20
    svd: str = "auto"
    adaln: str = "w4a8"             # "w4a8": W4 weights (QoQ's format, groups of adaln_group_size)
                                    # and per-token int8 input on qoq.w4a8_gemm; "w4_simulated": W4
                                    # g64 weight dequantized and kept in 16 bits (accuracy studies);
                                    # "fp": left alone
    adaln_group_size: int = 64      # the AdaLN weights' groups along K (-1: per output channel)
    skip: tuple[str, ...] = SKIP_16BIT
    adaln_patterns: tuple[str, ...] = ADALN
    unsigned_after_gelu: bool = True  # W4A4: inputs produced by GELU are quantized unsigned
    kernels: str = "auto"

    @classmethod
    def from_config(cls, config) -> "SVDQuantOptions":
        """Options from a QoQConfig: recipe `w4a8-svd` picks the W4A8 residual; `lowrank_*`
        fields override the defaults where the config has them."""
        kw = {"kernels": getattr(config, "kernels", "auto"),
              "adaln_group_size": getattr(config, "weight_group_size", 64)}
        if getattr(config, "recipe", "") == "w4a8-svd":
            kw["residual"] = "w4a8"
            kw["w4a8_group_size"] = getattr(config, "weight_group_size", 128)
        for name in ("rank", "alphas", "betas", "max_iters", "svd", "adaln"):
            value = getattr(config, f"lowrank_{name}", None)
            if value is not None:
                kw[name] = value
        extra = tuple(getattr(config, "skip_layers", ()))
        kw["skip"] = SKIP_16BIT + extra
        return cls(**kw)

    def __post_init__(self):
        if self.adaln not in ADALN_MODES:
            raise ValueError(f"SVDQuantOptions.adaln={self.adaln!r}: expected one of {ADALN_MODES}")


@dataclass
class SVDQuantDecision:
    fqns: list[str]                  # the linears of one group (one shared input)
    kind: str                        # "lowrank" | "w4a8" | "weight_only" | "skip"
    reason: str = ""
    result: Optional[SVDQuantLinear] = None
    qweight: Optional[object] = None  # kind "w4a8": the QuantizedWeight on qoq.w4a8_gemm
    details: dict = field(default_factory=dict)


def module_name(fqn: str) -> str:
    """The module path as the model names it: Dynamo sources can spell a module reached through
    `self.__dict__` as `__dict__._modules.x_embedder`."""
    parts = fqn.split(".")
    while parts and parts[0] in ("__dict__", "_modules"):
        parts = parts[1:]
    return ".".join(parts)


def _matches(fqn: str, patterns: Sequence[str]) -> Optional[str]:
    name = module_name(fqn)
    return next((p for p in patterns if fnmatch.fnmatchcase(name, p)), None)


_GELU = {torch._C._nn.gelu, torch.nn.functional.gelu}
_DROPOUT = {torch.nn.functional.dropout, torch.dropout}


def reads_gelu(x: fx.Node) -> bool:
    """True when x is GELU's output, seen through inference-mode dropout."""
    while isinstance(x, fx.Node) and x.op == "call_function" and x.target in _DROPOUT:
        training = x.args[2] if len(x.args) > 2 else x.kwargs.get("training", True)
        if training is not False:
            return False
        x = x.args[0]
    if not isinstance(x, fx.Node):
        return False
    return (x.op == "call_function" and x.target in _GELU) or (
        x.op == "call_method" and x.target == "gelu")


def _weight_nk(qgraph, m) -> torch.Tensor:
    return m.weight_nk(qgraph.weight(m.weight))


def _replace(qgraph, m, y: fx.Node) -> None:
    import passes.match as match

    is_2d_transpose = getattr(match, "is_2d_transpose", None) or match._is_2d_transpose
    graph = qgraph.gm.graph
    node = m.node
    if getattr(m, "is_conv1x1", False):
        # The ops computed [B, *spatial, N] from the channels-last view; the conv's users expect
        # [B, N, *spatial] with its contiguous strides (a later .view() needs them).
        with graph.inserting_before(node):
            y = graph.call_method("contiguous", (graph.call_function(torch.movedim, (y, -1, 1)),))
    y.meta.update({k: v for k, v in node.meta.items()
                   if k in ("stack_trace", "nn_module_stack", "source_fn_stack", "example_value")})
    node.replace_all_uses_with(y)
    operand = node.args[2] if node.target is torch.addmm else (
        node.args[1] if len(node.args) > 1 else None)
    graph.erase_node(node)
    if isinstance(operand, fx.Node) and not operand.users and is_2d_transpose(operand) is not None:
        graph.erase_node(operand)


def emit_w4a4_group(qgraph, group, smooth_inv: Optional[torch.Tensor], l_down: Optional[torch.Tensor],
                    shift: Optional[torch.Tensor], members: Sequence[dict], kernels: str) -> None:
    """Rewrite `group` (linears reading one input, in graph order) to one `qoq::w4a4_quantize_act`
    (smoothing and X̂·L_down fused) feeding one `qoq::w4a4_gemm` per linear, from finished tensors.

    smooth_inv fp32 [K] or None; l_down [K, r] in the activation dtype or None (rank 0); shift fp32
    [K] or None (signed activations). members[i]: "qweight", "wscale", and "l_up" [r, N_i] (with
    l_down), "bias_shifted" fp32 [N_i] (with shift). The pass and the artifact replay both call this,
    so a replayed graph is the same graph."""
    graph = qgraph.gm.graph
    first = group[0]
    stem = first.fqn
    c_smooth = qgraph.add_constant(f"{stem}.smooth_inv", smooth_inv, first.node) if smooth_inv is not None else None
    c_down = qgraph.add_constant(f"{stem}.l_down", l_down, first.node) if l_down is not None else None
    c_shift = qgraph.add_constant(f"{stem}.shift", shift, first.node) if shift is not None else None
    with graph.inserting_before(first.node):
        quant = graph.call_function(torch.ops.qoq.w4a4_quantize_act.default,
                                    (first.x, c_smooth, c_down, c_shift, kernels))
        a, sa, lr = (graph.call_function(operator.getitem, (quant, i)) for i in range(3))
    for m, t in zip(group, members):
        c_w = qgraph.add_constant(f"{m.fqn}.qweight", t["qweight"], m.node)
        c_s = qgraph.add_constant(f"{m.fqn}.wscale", t["wscale"], m.node)
        c_u = qgraph.add_constant(f"{m.fqn}.l_up", t["l_up"], m.node) if c_down is not None else None
        # the GEMM sees x̂ + shift: its bias has shift·Ŵ taken out
        bias = qgraph.add_constant(f"{m.fqn}.bias_shifted", t["bias_shifted"], m.node) if c_shift is not None else m.bias
        with graph.inserting_before(m.node):
            y = graph.call_function(torch.ops.qoq.w4a4_gemm.default,
                                    (a, sa, c_w, c_s, lr if c_down is not None else None, c_u, bias,
                                     out_dtype_of(m.node, m.x), c_shift is not None, kernels))
        _replace(qgraph, m, y)


def _lower_group_w4a4(qgraph, group, joint: SVDQuantLinear, parts, opts: SVDQuantOptions) -> None:
    """Pack the residuals and hand the group to `emit_w4a4_group`."""
    dtype = out_dtype_of(group[0].node, group[0].x)
    # (0, 0) won the search: no smoothing, so no multiply in the kernel either.
    smooth_inv = None if bool((joint.smooth == 1).all()) else (1.0 / joint.smooth).float()
    rank = joint.l_down.shape[1]
    unsigned = joint.act_shift is not None
    members = []
    for m, (l_up, residual) in zip(group, parts):
        packed, scale = quantize_weight(residual)
        t = {"qweight": packed, "wscale": scale}
        if rank:
            t["l_up"] = l_up.to(dtype).contiguous()
        if unsigned:
            b = qgraph.weight(m.bias) if m.bias is not None else None
            t["bias_shifted"] = shifted_bias(b, joint.act_shift, packed, scale)
        members.append(t)
    emit_w4a4_group(qgraph, group, smooth_inv, joint.l_down.to(dtype) if rank else None,
                    joint.act_shift.float() if unsigned else None, members, opts.kernels)


def emit_w4a8_group(qgraph, group, smooth_inv: torch.Tensor, l_down: torch.Tensor,
                    members: Sequence[tuple[dict, torch.Tensor]], kernels: str) -> None:
    """W4A8 residual + the low-rank branch, from finished tensors: x̂ = x·smooth_inv, one
    `qoq::quantize_act_int8` and one X̂·L_down shared by the group, then per linear the W4A8 GEMM
    with (X̂·L_down)·L_up added in its epilogue (the branch's [M, N] product never goes to memory).

    smooth_inv and l_down in the activation dtype; members[i] = (the QuantizedWeight's tensors
    {"qweight", "wscale", "gscale"?, "gzero"}, l_up [r, N_i]). Called by the pass and the replay."""
    graph = qgraph.gm.graph
    first = group[0]
    stem = first.fqn
    c_smooth = qgraph.add_constant(f"{stem}.smooth_inv", smooth_inv, first.node)
    c_down = qgraph.add_constant(f"{stem}.l_down", l_down, first.node)
    with graph.inserting_before(first.node):
        xs = graph.call_function(torch.mul, (first.x, c_smooth))
        quant = graph.call_function(torch.ops.qoq.quantize_act_int8.default, (xs, kernels))
        x8, sx, xsum = (graph.call_function(operator.getitem, (quant, i)) for i in range(3))
        lr = graph.call_function(torch.matmul, (xs, c_down))
    for m, (tensors, l_up) in zip(group, members):
        consts = {k: qgraph.add_constant(f"{m.fqn}.{k}", v, m.node) for k, v in tensors.items()}
        c_u = qgraph.add_constant(f"{m.fqn}.l_up", l_up, m.node)
        with graph.inserting_before(m.node):
            y = graph.call_function(
                torch.ops.qoq.w4a8_gemm.default,
                (x8, sx, xsum, consts["qweight"], consts["wscale"], consts.get("gscale"),
                 consts["gzero"], m.bias, out_dtype_of(m.node, m.x), kernels, lr, c_u))
        _replace(qgraph, m, y)


def _lower_group_w4a8(qgraph, group, joint: SVDQuantLinear, parts, opts: SVDQuantOptions) -> None:
    """Quantize the residuals to the W4A8 format and hand the group to `emit_w4a8_group`."""
    from passes.quantize import quantize_per_channel, quantize_progressive

    dtype = out_dtype_of(group[0].node, group[0].x)
    gs = opts.w4a8_group_size
    members = []
    for l_up, residual in parts:
        qw = quantize_per_channel(residual) if gs == -1 else quantize_progressive(residual, gs)
        members.append((qw.tensors(), l_up.to(dtype).contiguous()))
    emit_w4a8_group(qgraph, group, (1.0 / joint.smooth).to(dtype), joint.l_down.to(dtype), members,
                    opts.kernels)


class _MergedStats:
    """Statistics looked up in the caller's first, then in the ones measured here (never mixed
    into the caller's object, which may be the user's `calibration=`)."""

    def __init__(self, first, extra):
        self.first, self.extra = first, extra

    def get(self, key):
        found = self.first.get(key) if self.first is not None else None
        return found if found is not None else self.extra.get(key)


def with_conv_stats(qgraph, linears, stats):
    """Statistics for the 1x1 convs that have none, measured on the graph's example inputs.

    The compile's calibration watches linears only, and `qcompile.calibrate`'s forward hooks see
    a conv's input channels-first; a conv match reads a channels-last view, so one extra run of the
    graph (only when such convs exist) records [..., K] rows for them like for a linear."""
    missing = {m.node: (m.fqn, m.x) for m in linears if getattr(m, "is_conv1x1", False)
               and (stats is None or stats.get(m.fqn) is None)}
    if not missing:
        return stats
    from qcompile.calibration import calibrate_graph

    extra = calibrate_graph(qgraph.gm, qgraph.example_inputs, missing,
                            {w.index for w in qgraph.weights.values()})
    return _MergedStats(stats, extra)


def svdquant_pass(qgraph, linears, stats, opts: SVDQuantOptions) -> list[SVDQuantDecision]:
    """Apply SVDQuant to the graph's linears: choose layers, smooth + split each group of linears
    that share an input, rewrite them to the quantized ops. Returns one decision per group (what
    was done and why); the caller materializes overrides and recompiles."""
    import lowering.w4a4_gemm  # noqa: F401  (registers the qoq ops the rewrite emits)

    stats = with_conv_stats(qgraph, linears, stats)
    order = {n: i for i, n in enumerate(qgraph.gm.graph.nodes)}
    decisions: list[SVDQuantDecision] = []
    groups: dict[fx.Node, list] = {}
    lowered: dict[fx.Node, fx.Node] = {}   # AdaLN linear node -> its W4A8 GEMM (a later input may be it)
    from passes.match import other_uses

    for m in linears:
        pattern = _matches(m.fqn, opts.skip)
        if pattern:
            decisions.append(SVDQuantDecision([m.fqn], "skip",
                                              f"kept in 16 bits by SVDQuant's selection ({pattern!r})"))
            continue
        uses = other_uses(m, linears)
        if uses:
            decisions.append(SVDQuantDecision([m.fqn], "skip",
                                              "weight is also read outside linear layers"))
            continue
        if not _weight_nk(qgraph, m).is_floating_point():
            decisions.append(SVDQuantDecision([m.fqn], "skip", "weight is not floating point"))
            continue
        if _matches(m.fqn, opts.adaln_patterns):
            if opts.adaln == "fp":
                decisions.append(SVDQuantDecision([m.fqn], "skip", "AdaLN modulation, adaln='fp'"))
                continue
            if opts.adaln == "w4a8":
                decisions.append(_lower_adaln_w4a8(qgraph, m, stats, opts, lowered))
                continue
            w = qgraph.weight(m.weight)
            w_nk = _weight_nk(qgraph, m)
            wq = fake_quant_w4a4_weight(w_nk).to(w.dtype)
            qgraph.set_weight(m.weight, m.weight_like_placeholder(wq))
            err = float((wq.float() - w_nk.float()).pow(2).sum() / w_nk.float().pow(2).sum())
            decisions.append(SVDQuantDecision(
                [m.fqn], "weight_only",
                "AdaLN modulation: weight-only W4 g64, simulated (dequantized weight kept in 16 "
                "bits: no W4A16 kernel yet)", details={"weight_rel_error": err}))
            continue
        layer_stats = stats.get(m.fqn) if stats is not None else None
        if layer_stats is None or layer_stats.samples.shape[0] == 0:
            decisions.append(SVDQuantDecision([m.fqn], "skip",
                                              "no calibration activations reached this layer"))
            continue
        m.x = lowered.get(m.x, m.x)
        groups.setdefault(m.x, []).append(m)

    lower = _lower_group_w4a4 if opts.residual == "w4a4" else _lower_group_w4a8
    from qcompile.progress import progress

    for x_node, group in progress(list(groups.items()), desc="SVD refits", quiet=getattr(opts, "quiet", None), unit="group"):
        group.sort(key=lambda m: order[m.node])
        layer_stats = stats.get(group[0].fqn)
        ws = [_weight_nk(qgraph, m).float() for m in group]
        x = layer_stats.samples.float().to(ws[0].device)
        # Unsigned activations need the bias as a value to fold shift·W into.
        unsigned = (opts.unsigned_after_gelu and opts.residual == "w4a4" and reads_gelu(x_node)
                    and all(m.bias is None or qgraph.weight_ref(m.bias) is not None
                            for m in group))
        act_shift = torch.full((x.shape[1],), GELU_SHIFT, device=x.device) if unsigned else None
        joint, parts = svdquant_shared(
            ws, x, layer_stats.absmax, opts.rank, fmt=opts.residual,
            group_size=opts.w4a8_group_size, alphas=opts.alphas, betas=opts.betas,
            max_iters=opts.max_iters, svd=opts.svd, act_shift=act_shift)
        lower(qgraph, group, joint, parts, opts)
        fqns = [m.fqn for m in group]
        log.info("qoq svdquant: %s rank %d α=%.2f β=%.2f output error %.2e (RTN %.2e)",
                 "+".join(fqns), joint.l_down.shape[1], joint.alpha, joint.beta, joint.error,
                 joint.error_rtn)
        decisions.append(SVDQuantDecision(fqns, "lowrank", result=joint, details={
            "rank": joint.l_down.shape[1], "alpha": joint.alpha, "beta": joint.beta,
            "residual": opts.residual, "refits": len(joint.errors) - 1,
            "output_rel_sq_error": joint.error, "output_rel_sq_error_rtn": joint.error_rtn,
            "shared_down_projection": len(group) > 1, "unsigned_activations": unsigned}))
    return decisions


def _lower_adaln_w4a8(qgraph, m, stats, opts: SVDQuantOptions, lowered: dict) -> SVDQuantDecision:
    """An AdaLN modulation linear on the W4A8 path: its input is one row per sample (silu of the
    time/text embedding), so per-token int8 costs nothing in accuracy that matters, and its weight
    (the largest part of a Flux block) is stored in 4 bits and read once by the GEMV kernel."""
    from passes.lower import lower_w4a8_linear
    from passes.quantize import LayerDecision, output_sqnr_db, quantize_per_channel, quantize_progressive

    w_nk = _weight_nk(qgraph, m).float()
    gs = opts.adaln_group_size
    qw = quantize_per_channel(w_nk) if gs == -1 else quantize_progressive(w_nk, gs)
    m.x = lowered.get(m.x, m.x)
    lowered[m.node] = lower_w4a8_linear(qgraph, LayerDecision(m, qw), opts)
    details = {"weight_rel_error": float((qw.dequantize().float() - w_nk).pow(2).sum()
                                         / w_nk.pow(2).sum().clamp_min(1e-30))}
    layer_stats = stats.get(m.fqn) if stats is not None else None
    if layer_stats is not None and layer_stats.samples.shape[0] > 0:
        details["sqnr_db"] = output_sqnr_db(layer_stats.samples, w_nk, qw)
    details["role"] = "AdaLN modulation"
    return SVDQuantDecision([m.fqn], "w4a8", qweight=qw, details=details)


def layer_records(decisions: list[SVDQuantDecision], shapes: dict[str, tuple[int, int]],
                  opts: SVDQuantOptions) -> list:
    """`runtime.registry.LayerRecord`s for the report, one per linear."""
    from runtime.registry import LayerRecord

    def sqnr(err: float) -> float:
        return 10 * math.log10(1 / max(err, 1e-30))

    out = []
    for d in decisions:
        for fqn in d.fqns:
            shape = shapes.get(fqn, ())
            if d.kind == "skip":
                out.append(LayerRecord(name=fqn, kind="linear", shape=shape, quantized=False,
                                       reason=d.reason))
            elif d.kind == "w4a8":
                out.append(LayerRecord(name=fqn, kind="linear", shape=shape, quantized=True,
                                       format=d.qweight.format, group_size=d.qweight.group_size,
                                       kernel=f"qoq.quantize_act_int8 + qoq.w4a8_gemm ({opts.kernels})",
                                       sqnr_db=d.details.get("sqnr_db"), details=dict(d.details)))
            elif d.kind == "weight_only":
                out.append(LayerRecord(name=fqn, kind="linear", shape=shape, quantized=True,
                                       format="w4a16_g64_simulated", group_size=64,
                                       kernel="aten (dequantized weight)", reason=d.reason,
                                       details=dict(d.details)))
            else:
                w4a4 = opts.residual == "w4a4"
                out.append(LayerRecord(
                    name=fqn, kind="linear", shape=shape, quantized=True,
                    format=_lowrank_format(w4a4, opts.w4a8_group_size),
                    group_size=64 if w4a4 else opts.w4a8_group_size,
                    kernel=(f"qoq.w4a4_quantize_act + qoq.w4a4_gemm ({opts.kernels})" if w4a4 else
                            f"qoq.quantize_act_int8 + qoq.w4a8_gemm, low-rank epilogue ({opts.kernels})"),
                    sqnr_db=sqnr(d.result.error),
                    details={**d.details, "group": d.fqns,
                             "sqnr_rtn_db": sqnr(d.result.error_rtn)}))
    return out


def svdquant_backend(opts: SVDQuantOptions) -> Callable:
    """A Dynamo backend running capture -> calibration on the example inputs -> `svdquant_pass`,
    for tests and examples until the `svdquant` recipes are wired into `backend="qoq"`. The pass's
    decisions land in the returned callable's `decisions` list, its graphs in `graphs`."""
    from passes.match import find_linears
    from qcompile.capture import capture
    try:
        from qcompile.calibration import calibrate_graph
    except ImportError:  # the module's earlier name
        from qcompile.calibrate import calibrate_graph

    def backend(gm: fx.GraphModule, example_inputs: list):
        with torch.no_grad():
            qg = capture(gm, example_inputs)
            linears = find_linears(qg, conv1x1=True)
            watch = {m.node: (m.fqn, m.x) for m in linears}
            stats = calibrate_graph(gm, example_inputs, watch,
                                    {w.index for w in qg.weights.values()})
            backend.decisions.extend(svdquant_pass(qg, linears, stats, opts))
            qg.materialize_overrides()
            qg.gm.graph.lint()
            qg.gm.recompile()
            backend.graphs.append(qg.gm.graph)
        forward = qg.gm.forward

        def run(*args):
            with torch.no_grad():
                return forward(*args)
        return run

    backend.decisions = []
    backend.graphs = []
    return backend
