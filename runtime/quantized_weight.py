"""A quantized linear weight as the kernels consume it: packed 4-bit codes, scales and zeros."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from lowering.w4a8_gemm import dequantize_int8_weight

FORMATS = ("w4a8_progressive", "w4a8_per_channel")


@dataclass
class QuantizedWeight:
    """W4 weight of a linear y = x W^T (W is [out_features, in_features]).

    - `w4a8_progressive`: `W ≈ wscale[n] · (q·s2 − z·s2)` with `gscale = s2` [N, G] uint8 and
      `gzero = z·s2` [N, G] uint8; `group_size` along K.
    - `w4a8_per_channel`: `W ≈ wscale[n] · (q − z[n])`, `gscale = None`, `gzero = z` [N] int32.
    `qweight` is [N, Kp/2] uint8 in the layout of `lowering.w4a8_gemm.pack_nibbles`.
    """

    format: str
    out_features: int
    in_features: int
    group_size: int
    qweight: torch.Tensor
    wscale: torch.Tensor
    gscale: Optional[torch.Tensor]
    gzero: torch.Tensor
    extras: dict = field(default_factory=dict)  # what later passes attach (low-rank factors, ...)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"qweight": self.qweight, "wscale": self.wscale, "gzero": self.gzero}
        if self.gscale is not None:
            out["gscale"] = self.gscale
        return out

    def dequantize(self) -> torch.Tensor:
        """The float weight [N, K] the kernels compute with (for error measurement and tests)."""
        w8 = dequantize_int8_weight(self.qweight, self.gscale, self.gzero, self.in_features).float()
        if self.gscale is None:
            w8 = w8 - self.gzero.float()[:, None]
        return w8 * self.wscale.float()[:, None]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def to(self, device: torch.device | str) -> "QuantizedWeight":
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        return QuantizedWeight(**moved)
