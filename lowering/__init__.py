"""Quantized ops: each `torch.ops.qoq.*` op with its reference, Triton kernel and fake.

Importing this package registers every op in the `qoq` torch.library namespace.
"""
from __future__ import annotations

from lowering import activation_quant, w4a8_gemm  # noqa: F401  (registers the ops)
