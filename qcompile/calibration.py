"""Activation statistics per layer (keyed by module FQN): per-input-channel absmax and sample rows.

Default path: run the captured graph on the compile's example inputs (torch.fx.Interpreter) and
record what each linear reads. The statistics feed the passes and the report's error figures.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.fx as fx

MAX_SAMPLE_ROWS = 256


# eq=False: torch.compile compares the options of cached compiles (which hold these) with `==`;
# field-wise equality would compare tensors and raise.
@dataclass(eq=False)
class LayerStats:
    absmax: torch.Tensor  # [K] fp32: max |x| per input channel
    samples: torch.Tensor  # [S, K] fp32: input rows kept to measure output error
    tokens: int = 0

    def update(self, x: torch.Tensor) -> None:
        x2 = x.detach().reshape(-1, x.shape[-1]).float()
        self.absmax = torch.maximum(self.absmax, x2.abs().amax(dim=0).to(self.absmax.device))
        room = MAX_SAMPLE_ROWS - self.samples.shape[0]
        if room > 0:
            take = x2[torch.linspace(0, x2.shape[0] - 1, min(room, x2.shape[0]), device=x2.device).long()]
            self.samples = torch.cat([self.samples, take.to(self.samples.device)])
        self.tokens += x2.shape[0]

    @classmethod
    def empty(cls, k: int, device) -> "LayerStats":
        return cls(torch.zeros(k, device=device), torch.zeros((0, k), device=device))


@dataclass(eq=False)
class CalibrationStats:
    layers: dict[str, LayerStats] = field(default_factory=dict)
    source: str = "example inputs"

    def record(self, key: str, x: torch.Tensor) -> None:
        if x.shape[-1] == 0 or x.numel() == 0:
            return
        if key not in self.layers:
            self.layers[key] = LayerStats.empty(x.shape[-1], x.device)
        elif self.layers[key].absmax.shape[0] != x.shape[-1]:
            raise ValueError(
                f"calibration for {key!r}: inputs have {x.shape[-1]} channels, earlier batches had "
                f"{self.layers[key].absmax.shape[0]}; calibrate with batches shaped like the model's inputs"
            )
        self.layers[key].update(x)

    def get(self, key: str) -> Optional[LayerStats]:
        return self.layers.get(key)


class _RecordingInterpreter(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, watch: dict[fx.Node, tuple[str, fx.Node]], stats: CalibrationStats):
        super().__init__(gm)
        self.watch = watch
        self.stats = stats

    def run_node(self, n: fx.Node):
        watched = self.watch.get(n)
        if watched is not None:
            key, x_node = watched
            x = self.env.get(x_node)
            if isinstance(x, torch.Tensor):
                self.stats.record(key, x)
        return super().run_node(n)


def calibrate_graph(gm: fx.GraphModule, example_inputs: list, watch: dict[fx.Node, tuple[str, fx.Node]],
                    weight_indices: set[int]) -> CalibrationStats:
    """Run the graph once on its example inputs; `watch` maps a node to (stats key, its input node)."""
    stats = CalibrationStats()
    # Runtime inputs may be mutated in place by the graph (a KV cache write): work on copies.
    args = [a.clone() if isinstance(a, torch.Tensor) and i not in weight_indices else _concrete(a)
            for i, a in enumerate(example_inputs)]
    with torch.no_grad():
        _RecordingInterpreter(gm, watch, stats).run(*args)
    return stats


def _concrete(value):
    """A dynamic size reaches the backend as a SymInt; run with the value it has in this call."""
    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        hint = value.node.hint
        if hint is None:
            raise RuntimeError(
                "qoq: a dynamic size has no concrete value to calibrate with; pass statistics from "
                "qcompile.calibrate(...) as options={'calibration': ...}"
            )
        return hint
    return value
