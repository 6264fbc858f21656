"""Progress bars (tqdm) for the slow steps: calibration, GPTQ, SVD refits, autotuning.

Quiet when stderr is not a terminal, when `QOQ_QUIET=1`, or when the caller says so; a
`QOQ_PROGRESS=1` forces bars on (for logs that want them anyway).
"""
from __future__ import annotations

import os
import sys
from typing import Iterable, Optional, TypeVar

T = TypeVar("T")


def _env_flag(name: str) -> Optional[bool]:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    return value.lower() not in ("0", "false", "no", "off")


def is_quiet(quiet: Optional[bool] = None) -> bool:
    """Whether bars are hidden: an explicit `quiet` wins, then QOQ_QUIET, QOQ_PROGRESS, then "is stderr a TTY"."""
    if quiet is not None:
        return bool(quiet)
    if _env_flag("QOQ_QUIET"):
        return True
    forced = _env_flag("QOQ_PROGRESS")
    if forced is not None:
        return not forced
    stream = sys.stderr
    return not (hasattr(stream, "isatty") and stream.isatty())


def progress(iterable: Optional[Iterable[T]] = None, *, desc: str, total: Optional[int] = None,
             quiet: Optional[bool] = None, unit: str = "it", leave: bool = False):
    """`tqdm(iterable)` named "qoq <desc>", disabled when `is_quiet(quiet)`; also usable as a manual bar
    (`with progress(desc=..., total=n) as bar: bar.update()`)."""
    from tqdm.auto import tqdm

    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)
    name = desc if desc.startswith("qoq") else f"qoq {desc}"
    return tqdm(iterable, desc=name, total=total, disable=is_quiet(quiet), unit=unit, leave=leave,
                dynamic_ncols=True)
