"""Quantized ops: each `torch.ops.qoq.*` op with its reference, Triton kernel and fake.

Importing this package registers every op in the `qoq` torch.library namespace.
"""
from __future__ import annotations

from lowering import (  # noqa: F401  (each module registers its ops)
    activation_quant,
    kv4_append,
    kv4_attention,
    kv4_cache,
    w4a4_activation_quant,
    w4a4_gemm,
    w4a8_gemm,
)
