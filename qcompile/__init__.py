"""qoq: a torch.compile backend that runs models in 4 bits. `torch.compile(model, backend="qoq")`."""
from __future__ import annotations

import lowering  # noqa: F401  (registers torch.ops.qoq.*)
from qcompile.backend import qoq_backend
from qcompile.config import QoQConfig, QoQConfigError, make_config
from qcompile.report import Report, report

__all__ = ["QoQConfig", "QoQConfigError", "make_config", "qoq_backend", "report", "Report"]
