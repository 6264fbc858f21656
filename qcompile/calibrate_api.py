"""`qcompile.calibrate(model, batches, config)`: activation statistics from running the model eagerly
over the user's batches (forward hooks), and the bookkeeping that keeps statistics in step as
function-preserving passes rescale, permute or rotate a layer's inputs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from qcompile.calibration import MAX_SAMPLE_ROWS, CalibrationStats, LayerStats


# -- eager calibration: qcompile.calibrate(model, batches, config) -----------------------------

@dataclass(eq=False)  # identity, as LayerStats: compared inside torch.compile's options
class HessianLayerStats(LayerStats):
    """LayerStats that also keep `X^T X` over every token (GPTQ's Hessian) and sample rows uniformly
    over all batches (reservoir sampling), not just from the first one."""
    hessian: Optional[torch.Tensor] = None  # [K, K] fp32 sum of x x^T, or None when not asked for
    max_rows: int = MAX_SAMPLE_ROWS
    seen_rows: int = 0

    def update(self, x: torch.Tensor) -> None:
        x2 = x.detach().reshape(-1, x.shape[-1]).float().to(self.absmax.device)
        self.absmax = torch.maximum(self.absmax, x2.abs().amax(dim=0))
        if self.hessian is not None:
            self.hessian += x2.t() @ x2
        room = self.max_rows - self.samples.shape[0]
        if room > 0:
            self.samples = torch.cat([self.samples, x2[:room]])
        rest = x2[max(room, 0):]
        if rest.shape[0]:
            # Row i of the stream replaces a kept row with probability max_rows / (i + 1).
            gen = torch.Generator().manual_seed(self.seen_rows)
            pos = torch.arange(rest.shape[0]) + self.seen_rows + max(room, 0)
            slot = (torch.rand(rest.shape[0], generator=gen) * (pos + 1)).long()
            # In stream order, so a later row wins a slot drawn twice (an indexed assignment with
            # repeated indices may mix the rows element by element).
            for i in (slot < self.max_rows).nonzero().flatten().tolist():
                self.samples[int(slot[i])] = rest[i]
        self.seen_rows += x2.shape[0]
        self.tokens += x2.shape[0]


def _as_config(config):
    from qcompile.config import QoQConfig, make_config

    if config is None:
        return make_config({})
    if isinstance(config, QoQConfig):
        return config
    if isinstance(config, str):
        return make_config({"recipe": config})
    if isinstance(config, dict):
        return make_config(config)
    raise TypeError(f"calibrate(config=...): expected a QoQConfig, a recipe name or an options dict, got {type(config).__name__}")


def _is_linear(module: torch.nn.Module) -> bool:
    # transformers' Conv1D (GPT-2) is a linear with its weight stored [in, out].
    return isinstance(module, torch.nn.Linear) or (type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None
                                                  and module.weight.dim() == 2)


def calibrate(model: torch.nn.Module, batches, config=None, *, recipe: Optional[str] = None,
              progress: bool = True, max_rows: int = 512, hessian: Optional[bool] = None) -> CalibrationStats:
    """Run `model` eagerly over `batches` and record what every linear layer reads.

    `batches`: an iterable of tensors (`model(batch)`), dicts (`model(**batch)`) or tuples
    (`model(*batch)`). `config` (a QoQConfig, recipe name or options dict; or `recipe=`) decides
    whether GPTQ's Hessians are kept (they cost K^2 floats per layer). Returns statistics keyed by
    module FQN, for `torch.compile(model, backend="qoq", options={"calibration": stats})`.
    """
    from qcompile.progress import progress as progress_bar

    cfg = _as_config(recipe if recipe is not None and config is None else config)
    keep_hessian = bool(getattr(cfg, "gptq", False)) if hessian is None else hessian
    stats = CalibrationStats(source="qcompile.calibrate")
    hooks = []

    def hook_for(name: str, in_features: int):
        def record(module, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()), None)
            if not isinstance(x, torch.Tensor) or x.shape[-1] != in_features or x.numel() == 0:
                return
            if name not in stats.layers:
                dev = x.device
                stats.layers[name] = HessianLayerStats(
                    torch.zeros(in_features, device=dev), torch.zeros((0, in_features), device=dev),
                    hessian=torch.zeros((in_features, in_features), device=dev) if keep_hessian else None,
                    max_rows=max_rows)
            stats.layers[name].update(x)
        return record

    for name, module in model.named_modules():
        if _is_linear(module):
            k = module.in_features if isinstance(module, torch.nn.Linear) else module.weight.shape[0]
            hooks.append(module.register_forward_pre_hook(hook_for(name, k), with_kwargs=True))
    if isinstance(batches, (str, bytes)) or not hasattr(batches, "__iter__"):
        for h in hooks:
            h.remove()
        raise TypeError(f"calibrate: batches must be an iterable of model inputs (a list of tensors, dicts or tuples), "
                        f"got {type(batches).__name__}")
    try:
        total = len(batches) if hasattr(batches, "__len__") else None
        with torch.no_grad():
            # progress=True: bars on a terminal unless QOQ_QUIET=1 (qcompile.progress); False: never.
            for i, batch in enumerate(progress_bar(batches, desc="calibrate", total=total, quiet=None if progress else True)):
                if not isinstance(batch, (dict, tuple, list, torch.Tensor)):
                    raise TypeError(f"calibrate: a batch must be a tensor, a dict or a tuple of model inputs, got {type(batch).__name__}")
                try:
                    if isinstance(batch, dict):
                        model(**batch)
                    elif isinstance(batch, (tuple, list)):
                        model(*batch)
                    else:
                        model(batch)
                except (RuntimeError, ValueError, TypeError, IndexError) as e:
                    from qcompile.fallback import QoQCalibrationError

                    # The model's own message says what broke; this one says which batch and what to do.
                    raise QoQCalibrationError(
                        f"calibrate: batch {i} ({_describe(batch)}) failed in {type(model).__name__}: "
                        f"{type(e).__name__}: {e}. Calibration batches must be inputs this model accepts"
                    ) from e
    finally:
        for h in hooks:
            h.remove()
    if not stats.layers:
        raise ValueError("calibrate: no linear layer (nn.Linear or transformers Conv1D) ran on these batches")
    return stats


def _describe(batch) -> str:
    if isinstance(batch, torch.Tensor):
        return f"tensor {tuple(batch.shape)} {str(batch.dtype).replace('torch.', '')}"
    if isinstance(batch, dict):
        return "dict " + ", ".join(f"{k}={_describe(v) if isinstance(v, torch.Tensor) else type(v).__name__}" for k, v in batch.items())
    return f"{type(batch).__name__} of {len(batch)}"


# -- statistics as the passes change a layer's inputs -----------------------------------------

# Searches fitted to fewer token rows than this (a decode step's single token, say) overfit them:
# the passes leave such layers alone and say so.
MIN_CALIBRATION_ROWS = 16


def enough_rows(ls: Optional[LayerStats]) -> bool:
    return ls is not None and ls.samples.shape[0] >= MIN_CALIBRATION_ROWS


def working_copy(stats: Optional[CalibrationStats]) -> CalibrationStats:
    """A copy the passes may transform (the user's statistics serve many compiles)."""
    out = CalibrationStats(source=getattr(stats, "source", "none"))
    for key, ls in (stats.layers.items() if stats is not None else ()):
        hess = getattr(ls, "hessian", None)
        out.layers[key] = HessianLayerStats(ls.absmax.clone(), ls.samples.clone(), ls.tokens,
                                            hessian=None if hess is None else hess.clone(),
                                            max_rows=getattr(ls, "max_rows", MAX_SAMPLE_ROWS),
                                            seen_rows=getattr(ls, "seen_rows", ls.tokens))
    return out


def transform_inputs(ls: LayerStats, *, divide: Optional[torch.Tensor] = None, perm: Optional[torch.Tensor] = None,
                     rotation: Optional[torch.Tensor] = None) -> None:
    """The layer now reads `x / divide`, `x[..., perm]` or `x @ rotation`: keep its statistics in step."""
    has_hessian = getattr(ls, "hessian", None) is not None
    if divide is not None:
        d = divide.to(ls.absmax.device, torch.float32)
        ls.absmax = ls.absmax / d
        ls.samples = ls.samples / d
        if has_hessian:
            ls.hessian = ls.hessian / (d[:, None] * d[None, :])
    if perm is not None:
        p = perm.to(ls.absmax.device)
        ls.absmax = ls.absmax[p]
        ls.samples = ls.samples[:, p]
        if has_hessian:
            ls.hessian = ls.hessian[p][:, p]
    if rotation is not None:
        r = rotation.to(ls.absmax.device, torch.float32)
        ls.samples = ls.samples @ r
        # The channel maxima of rotated tokens are not known from the old ones: take the sampled rows'.
        ls.absmax = ls.samples.abs().amax(dim=0) if ls.samples.shape[0] else ls.absmax
        if has_hessian:
            ls.hessian = r.t() @ ls.hessian @ r
