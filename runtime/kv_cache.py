"""KV4 cache storage at run time: packed per-layer buffers, and `KV4Cache`, a transformers cache.

`KV4Cache` is the eager path: `model.generate(..., past_key_values=KV4Cache(config, max_cache_len))`
stores K/V in 4 bits (4.25 bits an element at head_dim 128) and hands transformers' attention the
dequantized cache. The fast path is the compile pass (passes/kv_cache.py), which rewrites a static
cache's writes and SDPA into qoq.kv4_append / qoq.kv4_attention over `KV4LayerBuffers`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch.utils.weak import WeakIdKeyDictionary
from transformers.cache_utils import Cache, CacheLayerMixin

from lowering.kv4_append import kv4_alloc, kv4_append, kv4_bits_per_element, kv4_dequantize


@dataclass
class KV4LayerBuffers:
    """One attention layer's packed cache: data uint8 [B, Hkv, L, D/2] and meta fp16 [B, Hkv, L, 2], K and V."""

    k_data: torch.Tensor
    k_meta: torch.Tensor
    v_data: torch.Tensor
    v_meta: torch.Tensor

    @classmethod
    def allocate(cls, batch: int, kv_heads: int, max_len: int, head_dim: int,
                 device: torch.device | str = "cpu") -> KV4LayerBuffers:
        return cls(*kv4_alloc(batch, kv_heads, max_len, head_dim, device),
                   *kv4_alloc(batch, kv_heads, max_len, head_dim, device))

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """In the argument order of qoq.kv4_append / qoq.kv4_attention."""
        return self.k_data, self.k_meta, self.v_data, self.v_meta

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    @property
    def head_dim(self) -> int:
        return self.k_data.shape[-1] * 2

    def bits_per_element(self) -> float:
        """Measured: bytes held / K and V elements they stand for."""
        b, h, length, _ = self.k_data.shape
        return 8 * self.nbytes / (2 * b * h * length * self.head_dim)

    def zero_(self) -> None:
        for t in self.tensors():
            t.zero_()

    def append(self, k: torch.Tensor, v: torch.Tensor, cache_position: torch.Tensor, kernels: str = "auto") -> None:
        kv4_append(k, v, *self.tensors(), cache_position, kernels=kernels)

    def dequantize(self, dtype: torch.dtype = torch.float32, length: int | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V [B, Hkv, length, D] (all slots by default) in `dtype`."""
        end = self.k_data.shape[2] if length is None else length
        return (kv4_dequantize(self.k_data[:, :, :end], self.k_meta[:, :, :end]).to(dtype),
                kv4_dequantize(self.v_data[:, :, :end], self.v_meta[:, :, :end]).to(dtype))

    def select_batch(self, index: torch.Tensor) -> None:
        """Reorder/select along batch (beam search); in place so the buffers keep their identity."""
        for t in self.tensors():
            t.copy_(t.index_select(0, index.to(t.device)))


_BUFFERS_BY_FP_CACHE: WeakIdKeyDictionary = WeakIdKeyDictionary()


def kv4_buffers_for(fp_keys: torch.Tensor, fp_values: torch.Tensor, release_fp_cache: bool = False) -> KV4LayerBuffers:
    """The KV4 buffers that stand for one layer's FP static cache (K and V tensors of [B, Hkv, L, D]),
    made on first sight.

    Every graph Dynamo compiles against the same cache tensors (prefill, decode, recompiles) must
    write and read the same KV4 buffers, so they are kept per FP key tensor, for as long as it lives.
    `release_fp_cache` also frees the FP tensors' storage (a rewritten graph never touches it).
    Under CUDA graphs, call this before the graph runs: its own run (warm-up included) allocates
    from the graph's private pool, where buffers that outlive the run are not allowed.
    """
    found = _BUFFERS_BY_FP_CACHE.get(fp_keys)
    if found is not None:
        if release_fp_cache:
            release_storage(fp_keys)
            release_storage(fp_values)
        return found
    if fp_keys.shape != fp_values.shape or fp_keys.dim() != 4:
        raise ValueError(f"KV4 needs K and V caches of the same [B, Hkv, L, D] shape, got "
                         f"{tuple(fp_keys.shape)} and {tuple(fp_values.shape)}")
    b, h, length, d = fp_keys.shape
    buffers = KV4LayerBuffers.allocate(b, h, length, d, fp_keys.device)
    _BUFFERS_BY_FP_CACHE[fp_keys] = buffers
    if release_fp_cache:
        release_storage(fp_keys)
        release_storage(fp_values)
    return buffers


def kv4_buffers_of(fp_keys: torch.Tensor) -> Optional[KV4LayerBuffers]:
    """The KV4 buffers a compiled graph made for this FP key cache, if any (none are made here)."""
    return _BUFFERS_BY_FP_CACHE.get(fp_keys)


def release_storage(t: torch.Tensor) -> None:
    """Free a tensor's memory but keep its metadata (shape, stride, dtype), which is what Dynamo's
    guards check: for FP cache tensors that a rewritten graph no longer reads or writes."""
    if t.untyped_storage().nbytes():
        t.untyped_storage().resize_(0)


class KV4Layer(CacheLayerMixin):
    """A transformers cache layer with KV4 storage preallocated to max_cache_len.

    `update` appends the new K/V (K arrives after RoPE, as transformers calls update after applying it)
    and returns the dequantized filled prefix [B, Hkv, seen, D], so towards the mask it behaves like a
    `DynamicLayer` (transformers may drop the decode mask, which is only right if no empty slot is
    returned) while its memory is static and packed.
    """

    # Not compileable on purpose: `generate` would torch.compile the forward with Inductor on CUDA and
    # the python-side length below would recompile every step. The compiled path is the qoq backend.
    is_compileable = False
    is_sliding = False
    is_croppable = False

    def __init__(self, max_cache_len: int, kernels: str = "auto", **kwargs):
        super().__init__()
        self.max_cache_len = max_cache_len
        self.kernels = kernels
        self.buffers: KV4LayerBuffers | None = None
        self.cumulative_length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        if key_states.shape[-1] != value_states.shape[-1]:
            raise ValueError(f"KV4Cache needs equal K and V head dims, got {key_states.shape[-1]} and "
                             f"{value_states.shape[-1]}")
        self.dtype, self.device = key_states.dtype, key_states.device
        self.batch_size, self.num_heads = key_states.shape[:2]
        self.head_dim = key_states.shape[-1]
        self.buffers = KV4LayerBuffers.allocate(self.batch_size, self.num_heads, self.max_cache_len,
                                                self.head_dim, self.device)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        t = key_states.shape[-2]
        if self.cumulative_length + t > self.max_cache_len:
            raise ValueError(f"KV4Cache is full: {self.cumulative_length} cached + {t} new tokens > "
                             f"max_cache_len={self.max_cache_len}; create it with a larger max_cache_len")
        pos = torch.arange(self.cumulative_length, self.cumulative_length + t, device=self.device)
        self.buffers.append(key_states, value_states, pos, kernels=self.kernels)
        self.cumulative_length += t
        return self.buffers.dequantize(key_states.dtype, length=self.cumulative_length)

    def get_mask_sizes(self, query_length: int | torch.Tensor, *args, **kwargs) -> tuple[int, int]:
        """(kv_length, kv_offset) of what the next `update` returns; also accepts a cache_position tensor."""
        if isinstance(query_length, torch.Tensor):
            query_length = query_length.shape[0]
        return self.cumulative_length + query_length, 0

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_max_length(self) -> int:
        return self.max_cache_len

    def reset(self) -> None:
        if self.is_initialized:
            self.buffers.zero_()
        self.cumulative_length = 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized and self.cumulative_length > 0:
            self.buffers.select_batch(beam_idx)


class KV4Cache(Cache):
    """A static-length transformers cache holding K/V in KV4 (QoQ): for `generate(past_key_values=...)`.

    Call `reset()` before reusing it for an unrelated prompt (transformers reads the cached length to
    decide which prompt tokens are new, as for `StaticCache`).
    """

    def __init__(self, config, max_cache_len: int, kernels: str = "auto", **kwargs):
        text_config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        layer_types = getattr(text_config, "layer_types", None) or ["full_attention"] * text_config.num_hidden_layers
        unsupported = sorted({lt for lt in layer_types if lt != "full_attention"})
        if unsupported:
            raise ValueError(f"KV4Cache supports full-attention layers only; this config has {unsupported}")
        super().__init__(layers=[KV4Layer(max_cache_len, kernels=kernels) for _ in layer_types])

    @property
    def nbytes(self) -> int:
        return sum(layer.buffers.nbytes for layer in self.layers if layer.is_initialized)

    def bits_per_element(self) -> float:
        """Bits held per cached K or V element (over the whole preallocated length)."""
        layers = [layer for layer in self.layers if layer.is_initialized]
        if not layers:
            raise RuntimeError("KV4Cache.bits_per_element: the cache is empty (no forward pass yet)")
        elements = sum(2 * l.batch_size * l.num_heads * l.max_cache_len * l.head_dim for l in layers)
        return 8 * self.nbytes / elements


__all__ = ["KV4Cache", "KV4Layer", "KV4LayerBuffers", "kv4_bits_per_element", "kv4_buffers_for", "release_storage"]
