"""qoq: a torch.compile backend that runs models in 4 bits. `torch.compile(model, backend="qoq")`.

The public names load on first use, so that passes and ops can import `qcompile.capture` or
`qcompile.config` without pulling in the whole backend (and Dynamo's entry point stays cheap).
"""
from __future__ import annotations

import importlib

_PUBLIC = {
    "QoQConfig": "qcompile.config",
    "QoQConfigError": "qcompile.config",
    "make_config": "qcompile.config",
    "qoq_backend": "qcompile.backend",
    "calibrate": "qcompile.calibrate_api",
    "report": "qcompile.reporting",
    "Report": "qcompile.reporting",
    "save": "qcompile.artifact",
    "ArtifactError": "runtime.artifact",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'qcompile' has no attribute {name!r}")
