"""Releasing the FP storage of weights qoq has quantized (option `release_fp_weights`).

The parameter object, its shape, stride, dtype and device stay, so Dynamo's guards still hold and
no recompile follows; only its storage is resized to zero bytes. The FP model can no longer run.
"""
from __future__ import annotations

import torch


def is_released(t: torch.Tensor) -> bool:
    """True when `t` has elements but its storage holds none of them (released by `release`)."""
    return t.numel() > 0 and t.untyped_storage().nbytes() == 0


def owns_storage(t: torch.Tensor) -> bool:
    """True when `t` is the whole of its storage: resizing it cannot hurt another tensor."""
    s = t.untyped_storage()
    return t.storage_offset() == 0 and s.nbytes() == t.numel() * t.element_size() and t.is_contiguous()


def release(t: torch.Tensor) -> str:
    """Free the storage of `t`; returns '' when freed, else why it was kept."""
    if is_released(t):
        return ""
    if not owns_storage(t):
        return "its storage is shared with other tensors (a view or a slice of a fused weight)"
    try:
        t.untyped_storage().resize_(0)
    except RuntimeError as e:  # memory-mapped or otherwise non-resizable storage
        return f"its storage cannot be resized ({e})"
    return ""


def storage_bytes(tensors) -> int:
    """Bytes held by the distinct storages of `tensors`."""
    seen: dict[int, int] = {}
    for t in tensors:
        s = t.untyped_storage()
        seen[s.data_ptr() or id(s)] = s.nbytes()
    return sum(seen.values())
