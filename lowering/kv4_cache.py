"""`qoq::kv4_cache_append` / `qoq::kv4_cache_attention`: KV4 append and attention addressed by the FP cache.

The KV-cache pass hands these ops the FP static-cache tensors (graph inputs) instead of baking one
cache's KV4 buffers into the graph as constants. Each call finds the KV4 buffers that stand for
those FP tensors (runtime/kv_cache.kv4_buffers_for, made on first sight), so one compiled graph
serves every cache its guards accept: a new batch size under a batch-dynamic graph, a new cache
after `generate` made another one. Under CUDA graphs the lookup runs during warm-up and capture;
the replay reuses the buffers it captured, which is right as long as the FP cache tensors are the
same, and cudagraph trees re-record when a static input's address changes.

The append returns an empty "written" token that the attention takes: the buffers are state the
compiler cannot see, so this data edge is what orders a layer's write before its read.
"""
from __future__ import annotations

import torch

from lowering.kv4_append import kv4_append
from lowering.kv4_attention import kv4_attention
# runtime.kv_cache imports lowering (the format helpers); binding the module, not its names, keeps
# either import order working.
import runtime.kv_cache as runtime_kv


def _buffers(fp_keys: torch.Tensor, fp_values: torch.Tensor, release_fp_cache: bool) -> "runtime_kv.KV4LayerBuffers":
    # qoq's runner has made them before the graph ran; a graph run outside it may meet a new cache here
    if runtime_kv.kv4_buffers_of(fp_keys) is None and fp_keys.is_cuda and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            "qoq KV4: a KV cache was first seen while a CUDA graph was being captured, so its 4-bit buffers "
            "would live in the graph's private memory pool. Run one step without capture first (torch.compile's "
            "cudagraph trees warm up before capturing; a hand-made torch.cuda.graph needs a warm-up call)."
        )
    return runtime_kv.kv4_buffers_for(fp_keys, fp_values, release_fp_cache)


@torch.library.custom_op("qoq::kv4_cache_append", mutates_args=())
def kv4_cache_append(
    k: torch.Tensor, v: torch.Tensor, fp_keys: torch.Tensor, fp_values: torch.Tensor,
    cache_position: torch.Tensor, kernels: str = "auto", release_fp_cache: bool = False,
) -> torch.Tensor:
    """Write k, v [B, Hkv, T, D] at cache_position [T] into the KV4 buffers standing for the FP cache
    (fp_keys, fp_values) [B, Hkv, L, D]; returns an empty token for kv4_cache_attention.

    `release_fp_cache` frees the FP tensors' storage (they are never read or written)."""
    bufs = _buffers(fp_keys, fp_values, release_fp_cache)
    kv4_append(k, v, *bufs.tensors(), cache_position, kernels=kernels)
    return k.new_empty(0)


@kv4_cache_append.register_fake
def _kv4_cache_append_fake(k, v, fp_keys, fp_values, cache_position, kernels="auto", release_fp_cache=False):
    return k.new_empty(0)


@torch.library.custom_op("qoq::kv4_cache_attention", mutates_args=())
def kv4_cache_attention(
    q: torch.Tensor, fp_keys: torch.Tensor, fp_values: torch.Tensor, written: torch.Tensor,
    cache_position: torch.Tensor, attn_mask: torch.Tensor | None = None, scale: float | None = None,
    kernels: str = "auto", release_fp_cache: bool = False,
) -> torch.Tensor:
    """qoq.kv4_attention of q [B, Hq, Tq, D] over the KV4 buffers standing for (fp_keys, fp_values).

    `written` is kv4_cache_append's token for this step (an ordering edge, no data)."""
    bufs = _buffers(fp_keys, fp_values, release_fp_cache)
    return kv4_attention(q, *bufs.tensors(), cache_position, attn_mask, scale, kernels)


@kv4_cache_attention.register_fake
def _kv4_cache_attention_fake(q, fp_keys, fp_values, written, cache_position, attn_mask=None, scale=None,
                              kernels="auto", release_fp_cache=False):
    return q.new_empty(q.shape)  # contiguous whatever q's strides, as qoq.kv4_attention
