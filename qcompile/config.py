"""Options -> QoQConfig: a named recipe plus per-key overrides, each checked with a clear error."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Optional

from lowering.dispatch import KERNEL_CHOICES


class QoQConfigError(ValueError):
    """A bad `options=` key or value; the message names the key and what is allowed."""


@dataclass(frozen=True)
class QoQConfig:
    recipe: str = "w4a8-g128"
    weight_bits: int = 4
    act_bits: int = 8
    weight_group_size: int = 128  # -1: per-channel (QoQ's second W4 format)
    protective_range: int = 119  # QoQ's level-1 int8 range, leaves room for level-2 rounding
    kv_bits: int = 16
    kernels: str = "auto"
    inductor: bool = True
    mode: str = "default"
    # Inductor config patches for the compile of the rewritten graph, on top of `mode`'s, as
    # ((key, value), ...): torch.compile refuses its own `options` beside backend="qoq".
    inductor_config: tuple[tuple[str, Any], ...] = ()
    # Row reductions (norms, activation quantization) over at most this many elements compile into
    # one unsplit kernel that holds the row in registers (Inductor's persistent reduction); None:
    # Inductor's own rule (persistent up to 1024 elements, split at few rows). 16384 covers the MLP
    # widths of 7-8B models (14336) at 64 fp32 values a thread; qcompile.fallback says what it saves.
    persistent_reduction_numel: Optional[int] = 16384
    # fnmatch patterns over module FQNs of layers left in FP (the report says why).
    skip_layers: tuple[str, ...] = ("lm_head", "*.lm_head")
    calibration: Any = None  # statistics from qcompile.calibrate(...)
    # QoQ's accuracy passes (issue 3); each runs only in a recipe whose pipeline lists it.
    smooth: bool = False  # SmoothQuant-style factors, (α, β) searched per scale group
    smooth_alphas: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
    smooth_attention: bool = False  # λ = max|K|^α folded into q_proj / k_proj
    smooth_attention_alpha: float = 0.5
    reorder: bool = False  # activation-aware input-channel reordering (group quantization only)
    rotate: bool = False  # Hadamard rotation of the block inputs
    rotate_kv: bool = False  # online Hadamard rotation of q and K (V too: below) around the KV4 cache (kv_bits=4 only)
    # With rotate_kv, V too (and the attention output back): two of its four [D, D] matmuls a layer.
    # Off: the W4A8KV4 perplexity of SmolLM2 did not get worse without it (+33.8% vs +35.6% with
    # 8 calibration windows, +32.4% vs +32.1% with 16; K carries the KV4 loss, ACCURACY.md).
    rotate_kv_values: bool = False
    gptq: bool = False  # GPTQ weight rounding (Hessian from calibration rows)
    clip_search: bool = False  # per-output-channel clipping ratio search
    artifact: Optional[str] = None  # folder written by qcompile.save: compile from it, no calibration
    # Free the FP storage of quantized weights (the FP model stops working); off unless asked for.
    release_fp_weights: bool = False
    # Free the FP static cache a KV4 rewrite left unread (its memory is the point of KV4); off unless
    # asked for, because transformers' StaticCache.reset() zeroes those tensors and would then fail.
    release_fp_cache: bool = False
    # One W4A8 GEMM for the layers that read one quantized input (q/k/v, gate/up): fewer, wider launches.
    fuse_gemms: bool = True
    # The user's side (issue 8): graph dumps per pass, progress bars, and re-raising instead of FP fallback.
    debug_dir: Optional[str] = None  # default: the QOQ_DEBUG_DIR environment variable
    quiet: Optional[bool] = None  # None: bars only on a terminal and without QOQ_QUIET=1
    strict: bool = False  # True (or QOQ_STRICT=1): a pass failure raises instead of leaving the graph in FP

    def replace(self, **kw) -> "QoQConfig":
        return dataclasses.replace(self, **kw)

    @property
    def weight_format(self) -> str:
        return "w4a8_per_channel" if self.weight_group_size == -1 else "w4a8_progressive"


# Named presets. A recipe whose passes have not landed yet says which issue brings it.
RECIPES: dict[str, dict[str, Any]] = {
    "w4a8": dict(weight_group_size=-1),
    "w4a8-g128": dict(weight_group_size=128),
    # Measured on SmolLM2-135M (ACCURACY.md, W4A8KV4 through the static cache): reorder + GPTQ over the
    # searched grid + rotate_kv take qoq from +61.4% to +35.6% perplexity. SmoothAttention is off: with
    # rotate_kv it raises KV4's loss (+7.6% -> +9.5% at α=0.5, FP weights) and it did not help at KV16.
    # KV4 applies where the graph has a static cache written and read by SDPA (passes/kv_cache.py).
    "qoq": dict(weight_group_size=128, smooth=True, clip_search=True, reorder=True, gptq=True, rotate_kv=True,
                kv_bits=4),
    # Per-channel weights: reorder has no groups to fill; GPTQ was not measured with this format yet.
    "qoq-chn": dict(weight_group_size=-1, smooth=True, clip_search=True, rotate_kv=True, kv_bits=4),
    # SVDQuant (passes/lowrank.py): W4A4 g64 + rank-32 branch, and W4A8 + the same branch with
    # per-channel weights: on the small Flux model 49.4 dB against 48.9 for g128, and 1.36-1.66x
    # cuBLAS bf16 per GEMM at M = 4096 on the H100 against 1.09-1.19x (ACCURACY.md, BENCHMARKS.md).
    "svdquant": dict(act_bits=4, weight_group_size=64),
    "w4a8-svd": dict(weight_group_size=-1),
}
PLANNED_RECIPES: dict[str, str] = {}
# What `torch.compile(model, backend="qoq")` does with no recipe. (A bare QoQConfig() is plain
# w4a8-g128 round-to-nearest: the dataclass defaults are the fields no recipe sets.)
DEFAULT_RECIPE = "qoq"

_ALLOWED: dict[str, tuple] = {
    "weight_group_size": (-1, 32, 64, 128, 256),
    "kv_bits": (4, 16),
    "kernels": KERNEL_CHOICES,
    "mode": ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
    "inductor": (True, False),
    "release_fp_weights": (True, False),
    "release_fp_cache": (True, False),
    "fuse_gemms": (True, False),
    "rotate_kv_values": (True, False),
}
_OPTION_KEYS = ("recipe", "calibration", "kv_bits", "weight_group_size", "kernels", "inductor", "mode",
                "artifact", "skip_layers", "protective_range", "release_fp_weights", "release_fp_cache",
                "fuse_gemms")
_PASS_FLAGS = ("smooth", "smooth_attention", "reorder", "rotate", "rotate_kv", "gptq", "clip_search")
_OPTION_KEYS = _OPTION_KEYS + _PASS_FLAGS + ("smooth_alphas", "smooth_attention_alpha", "rotate_kv_values")
_OPTION_KEYS = _OPTION_KEYS + ("debug_dir", "quiet", "strict", "inductor_config", "persistent_reduction_numel")


def make_config(options: Optional[dict] = None, mode: Optional[str] = None) -> QoQConfig:
    """Build the config for one compile from torch.compile's `options=` (and `mode=`)."""
    options = dict(options or {})
    unknown = sorted(k for k in options if k not in _OPTION_KEYS)
    if unknown:
        raise QoQConfigError(
            f"unknown qoq option(s) {unknown}; valid keys are: {', '.join(_OPTION_KEYS)}"
        )
    given = dict(options)
    recipe = options.pop("recipe", DEFAULT_RECIPE)
    if not isinstance(recipe, str):
        raise QoQConfigError(f"option recipe={recipe!r}: expected a recipe name (str), one of {', '.join(RECIPES)}")
    if recipe in PLANNED_RECIPES:
        raise QoQConfigError(
            f"recipe={recipe!r} is not available yet: it needs {PLANNED_RECIPES[recipe]}. "
            f"Available recipes: {', '.join(RECIPES)}"
        )
    if recipe not in RECIPES:
        raise QoQConfigError(f"recipe={recipe!r} is unknown; available recipes: {', '.join(RECIPES)}")
    fields = dict(RECIPES[recipe], recipe=recipe)
    if mode is not None and mode != "default":
        if "mode" in options and options["mode"] != mode:
            raise QoQConfigError(f"mode={mode!r} and options['mode']={options['mode']!r} disagree; give one")
        options["mode"] = mode
    for key, value in options.items():
        if key in _ALLOWED and value not in _ALLOWED[key] or (key in _ALLOWED and type(value) is not type(_ALLOWED[key][0])):
            raise QoQConfigError(f"option {key}={value!r} is not allowed; use one of {_ALLOWED[key]}")
        if key == "skip_layers":
            if not isinstance(value, (list, tuple)) or not all(isinstance(p, str) for p in value):
                raise QoQConfigError(f"option skip_layers={value!r}: expected a list of fnmatch patterns over module names")
            value = tuple(value)
        if key == "protective_range" and (type(value) is not int or not 1 <= value <= 119):
            raise QoQConfigError(f"option protective_range={value!r}: expected an int in [1, 119] (119 keeps level-2 rounding inside int8)")
        if key in _PASS_FLAGS and not isinstance(value, bool):
            raise QoQConfigError(f"option {key}={value!r}: expected True or False")
        if key == "smooth_alphas":
            if isinstance(value, (str, bytes)) or not value or not all(type(a) in (int, float) and 0 <= a <= 1 for a in value):
                raise QoQConfigError(f"option smooth_alphas={value!r}: expected a non-empty list of numbers in [0, 1]")
            value = tuple(float(a) for a in value)
        if key == "smooth_attention_alpha" and (type(value) not in (int, float) or not 0 <= value <= 1):
            raise QoQConfigError(f"option smooth_attention_alpha={value!r}: expected a number in [0, 1]")
        if key == "debug_dir" and value is not None and not isinstance(value, (str, os.PathLike)):
            raise QoQConfigError(f"option debug_dir={value!r}: expected a folder path (str) or None")
        if key == "debug_dir" and value is not None:
            value = os.fspath(value)
        if key == "quiet" and value is not None and not isinstance(value, bool):
            raise QoQConfigError(f"option quiet={value!r}: expected True, False or None (None: bars only on a terminal)")
        if key == "strict" and not isinstance(value, bool):
            raise QoQConfigError(f"option strict={value!r}: expected True or False")
        if key == "inductor_config":
            value = _inductor_patches(value)
        if key == "persistent_reduction_numel" and value is not None and (type(value) is not int or not 1 <= value <= 65536):
            raise QoQConfigError(f"option persistent_reduction_numel={value!r}: expected an int in [1, 65536] (elements "
                                 "of a row reduction kept in registers) or None for Inductor's own limit")
        if key == "artifact" and value is not None and not isinstance(value, str):
            raise QoQConfigError(f"option artifact={value!r}: expected a path (str) or None")
        fields[key] = value
    if fields.get("artifact") is not None:
        fields = _from_artifact(fields, given)
    return QoQConfig(**fields)


def _inductor_patches(value: Any) -> tuple[tuple[str, Any], ...]:
    """options['inductor_config'] (a dict of torch._inductor.config keys) as sorted pairs, each key checked."""
    import torch._inductor.config as inductor_config

    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise QoQConfigError(f"option inductor_config={value!r}: expected a dict of torch._inductor.config "
                             "keys to values, e.g. {'split_reductions': False}")
    known = inductor_config.get_config_copy()
    unknown = sorted(k for k in value if k not in known)
    if unknown:
        raise QoQConfigError(f"option inductor_config: {unknown} are not torch._inductor.config keys "
                             "(dotted names for nested ones, e.g. 'triton.cudagraphs')")
    return tuple(sorted(value.items()))


# Fields added after artifact version 3, with the behaviour of the qoq that wrote an artifact without them.
_SINCE_ARTIFACT_V3 = {"rotate_kv_values": True}


def _from_artifact(fields: dict, options: dict) -> dict:
    """The artifact fixes every field that decides the numbers; options may set only the runtime ones."""
    from qcompile.artifact import RUNTIME_FIELDS
    from runtime.artifact import ArtifactError, read_header

    path = fields["artifact"]
    try:
        saved = read_header(path)["config"]
    except ArtifactError as e:
        raise QoQConfigError(str(e)) from e
    if options.get("calibration") is not None:
        raise QoQConfigError("options artifact and calibration: an artifact needs no calibration; drop calibration")
    out = {}
    for f in dataclasses.fields(QoQConfig):
        if f.name in RUNTIME_FIELDS:
            if f.name in fields:
                out[f.name] = fields[f.name]
            continue
        if f.name not in saved and f.name in _SINCE_ARTIFACT_V3:
            saved = {**saved, f.name: _SINCE_ARTIFACT_V3[f.name]}  # what the artifact's qoq did
        if f.name not in saved:
            raise QoQConfigError(f"artifact {path!r}: its config lacks {f.name!r}; save it again with this qoq")
        value = tuple(saved[f.name]) if isinstance(saved[f.name], list) else saved[f.name]
        if f.name in options and options[f.name] != value:
            raise QoQConfigError(
                f"option {f.name}={options[f.name]!r} disagrees with the artifact {path!r} ({value!r}); "
                f"drop the option (the artifact decides it) or save a new artifact"
            )
        out[f.name] = value
    return out
