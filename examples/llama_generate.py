"""Generate with a small Llama in FP and compiled with backend="qoq"; print agreement, cosine, time.

The model is built from a config (random weights, no downloads) unless --model names a local
transformers checkpoint. On a CPU without a GPU the qoq ops run their torch reference; on a GPU,
the Triton kernels.

    python examples/llama_generate.py [--recipe w4a8-g128] [--new-tokens 24] [--model PATH]
"""
from __future__ import annotations

import argparse
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import qcompile


def build_model(path: str | None, device: str, dtype: torch.dtype) -> LlamaForCausalLM:
    if path:
        return LlamaForCausalLM.from_pretrained(path, torch_dtype=dtype).to(device).eval()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=2048, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512)
    return LlamaForCausalLM(cfg).to(device=device, dtype=dtype).eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="local transformers Llama checkpoint (default: a small random one)")
    p.add_argument("--recipe", default="w4a8-g128")
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args()
    dtype = torch.bfloat16 if a.device == "cuda" else torch.float32
    model = build_model(a.model, a.device, dtype)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (a.batch, a.prompt_len), generator=torch.Generator().manual_seed(1)).to(a.device)
    gen = dict(max_new_tokens=a.new_tokens, do_sample=False, min_new_tokens=a.new_tokens)

    with torch.no_grad():
        logits_fp = model(ids).logits.float()
        t0 = time.perf_counter()
        out_fp = model.generate(ids, **gen)
        t_fp = time.perf_counter() - t0

        model.forward = torch.compile(model.forward, backend="qoq", options={"recipe": a.recipe})
        t0 = time.perf_counter()
        logits_q = model(ids).logits.float()
        t_compile = time.perf_counter() - t0
        model.generate(ids, **gen)  # compiles the decode graphs
        t0 = time.perf_counter()
        out_q = model.generate(ids, **gen)
        t_q = time.perf_counter() - t0

    new_fp, new_q = out_fp[:, a.prompt_len:], out_q[:, a.prompt_len:]
    agree = (new_fp == new_q).float().mean().item()
    first_diff = [(row_fp != row_q).nonzero()[:1].flatten().tolist() or [a.new_tokens] for row_fp, row_q in zip(new_fp, new_q)]
    cos = torch.nn.functional.cosine_similarity(logits_fp.flatten(1), logits_q.flatten(1), dim=1)
    print(qcompile.report(model))
    print()
    print(f"device {a.device}, recipe {a.recipe}, batch {a.batch}, prompt {a.prompt_len}, {a.new_tokens} new tokens")
    print(f"FP  tokens[0]: {new_fp[0].tolist()}")
    print(f"qoq tokens[0]: {new_q[0].tolist()}")
    print(f"greedy token agreement: {agree:.3f} (first divergence at {[d[0] for d in first_diff]})")
    print(f"prompt logits cosine (per sequence): {[round(c, 5) for c in cos.tolist()]}")
    print(f"time: FP generate {t_fp:.2f} s, qoq generate {t_q:.2f} s, first qoq call (compile) {t_compile:.1f} s")


if __name__ == "__main__":
    main()
