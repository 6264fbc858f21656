"""Logging under `qoq`, the per-pass graph dump (option debug_dir / QOQ_DEBUG_DIR), warn-once, and
when progress bars stay quiet."""
from __future__ import annotations

import logging
import warnings

import pytest
import torch
import torch.nn as nn

from qcompile.debug import configure_logging
from qcompile.fallback import QoQFallbackWarning, reset_warnings, warn_once
from qcompile.progress import is_quiet, progress

_OPTS = {"recipe": "w4a8-g128", "inductor": False, "kernels": "reference"}  # the pass list below is this recipe's


def _compile_once(options: dict) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 8)).eval()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="qoq", options=options)
    compiled(torch.randn(3, 24))
    return compiled


def _graph_dir(root):
    dirs = sorted(root.glob("graph_*"))
    assert len(dirs) == 1, dirs
    return dirs[0]


def test_debug_dir_option_dumps_each_pass_before_and_after(tmp_path):
    _compile_once({**_OPTS, "debug_dir": str(tmp_path)})
    g = _graph_dir(tmp_path)
    names = sorted(p.name for p in g.iterdir())
    assert names == ["01_quantize.after.py", "01_quantize.before.py", "02_lower.after.py", "02_lower.before.py", "final.py"]
    before, after = (g / "02_lower.before.py").read_text(), (g / "02_lower.after.py").read_text()
    assert "w4a8_gemm" not in before and "linear" in before
    assert after.count("torch.ops.qoq.w4a8_gemm.default(") == 2 and "torch._C._nn.linear" not in after
    compile((g / "final.py").read_text(), "final.py", "exec")  # the dump is Python source


def test_debug_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("QOQ_DEBUG_DIR", str(tmp_path / "env"))
    _compile_once(dict(_OPTS))
    assert (_graph_dir(tmp_path / "env") / "final.py").is_file()


def test_no_dump_without_a_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("QOQ_DEBUG_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    _compile_once(dict(_OPTS))
    assert list(tmp_path.iterdir()) == []


def test_qoq_logger_says_which_layer_stays_fp_and_pass_times(caplog):
    with caplog.at_level(logging.DEBUG, logger="qoq"):
        _compile_once({**_OPTS, "skip_layers": ["2"]})
    messages = [r.getMessage() for r in caplog.records if r.name == "qoq"]
    assert any("2 left in FP: skipped by skip_layers pattern '2'" in m for m in messages), messages
    assert any("pass lower took" in m for m in messages)


def test_configure_logging_levels_and_bad_name(monkeypatch):
    logger = logging.getLogger("qoq")
    old = logger.level
    try:
        configure_logging("info")
        assert logger.level == logging.INFO
        configure_logging(logging.DEBUG)
        assert logger.level == logging.DEBUG
        assert sum(isinstance(h, logging.StreamHandler) for h in logger.handlers) == 1  # no duplicate handlers
        with pytest.raises(ValueError, match="QOQ_LOG='loud'"):
            configure_logging("loud")
    finally:
        logger.setLevel(old)


def test_warn_once_per_reason():
    reset_warnings()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert warn_once("reason-a", "first a")
        assert not warn_once("reason-a", "second a")
        assert warn_once("reason-b", "first b")
    got = [str(w.message) for w in caught if issubclass(w.category, QoQFallbackWarning)]
    assert got == ["first a", "first b"]


def test_progress_quiet_rules(monkeypatch):
    monkeypatch.delenv("QOQ_QUIET", raising=False)
    monkeypatch.delenv("QOQ_PROGRESS", raising=False)
    assert is_quiet() is True  # pytest captures stderr: not a terminal
    monkeypatch.setenv("QOQ_PROGRESS", "1")
    assert is_quiet() is False
    monkeypatch.setenv("QOQ_QUIET", "1")
    assert is_quiet() is True  # QOQ_QUIET wins over QOQ_PROGRESS
    assert is_quiet(False) is False and is_quiet(True) is True  # an explicit choice wins over both
    bar = progress(range(3), desc="test", quiet=False)
    assert not bar.disable and bar.desc.startswith("qoq test") and list(bar) == [0, 1, 2]
    assert progress(range(3), desc="test").disable
