"""benchmarks/bench_attention.py: its correctness path runs at toy sizes and writes its JSON."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_attention.py"


@pytest.mark.slow
def test_bench_attention_tiny(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_attention", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "attn.json"
    assert bench.main([str(out), "--tiny"]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 2
    for r in rows:
        assert r["max_abs_err_vs_spec"] < 1e-4
        assert r["cosine_vs_fp"] > 0.9
