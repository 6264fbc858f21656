"""Small random transformers models (Llama, Qwen2 with q/k/v bias, GPT-2 with LayerNorm bias) and
their Dynamo graphs, shared by the pass tests."""
from __future__ import annotations

import torch

from qcompile.capture import QGraph, capture


def make_model(kind: str, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
               seed: int = 0, vocab: int = 96, tie: bool = False) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    if kind == "llama":
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                          num_attention_heads=heads, num_key_value_heads=kv_heads, tie_word_embeddings=tie)
        model = LlamaForCausalLM(cfg)
    elif kind == "qwen2":
        cfg = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                          num_attention_heads=heads, num_key_value_heads=kv_heads, tie_word_embeddings=tie)
        model = Qwen2ForCausalLM(cfg)
    elif kind == "gpt2":
        cfg = GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=64)
        model = GPT2LMHeadModel(cfg)
    else:
        raise ValueError(kind)
    model.eval()
    # Random init is too tame to exercise smoothing: give norms and activations outlier channels.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and ("norm" in name or "ln_" in name) and name.endswith("weight"):
                p.mul_(torch.exp(torch.randn_like(p)))
            elif p.dim() == 1 and name.endswith("bias"):
                p.normal_(0, 0.1)
    return model


def capture_model(model: torch.nn.Module, ids: torch.Tensor) -> QGraph:
    """The Dynamo graph of `model(ids)` as a QGraph (captured with a pass-through backend)."""
    graphs = []

    def grab(gm, example_inputs):
        # Dynamo drops node.meta["grapharg"] once the backend returns: capture inside the call.
        graphs.append(capture(gm, list(example_inputs)))
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=grab, fullgraph=True, dynamic=False)
    with torch.no_grad():
        compiled(ids, use_cache=False)
    return graphs[0]


def run_graph(qgraph: QGraph) -> torch.Tensor:
    """Run the (possibly rewritten) graph on its example inputs; overrides stand in for weights."""
    qgraph.gm.recompile()
    args = list(qgraph.example_inputs)
    for name, ref in qgraph.weights.items():
        if name in qgraph.overrides:
            args[ref.index] = qgraph.overrides[name]
    with torch.no_grad():
        out = qgraph.gm(*args)
    return out[0] if isinstance(out, (tuple, list)) else out


def graph_stats(qgraph: QGraph):
    """Calibration statistics from running the graph on its example inputs (the backend's default)."""
    from passes.match import find_linears
    from qcompile.calibrate_api import working_copy
    from qcompile.calibration import calibrate_graph

    watch = {m.node: (m.fqn, m.x) for m in find_linears(qgraph)}
    stats = calibrate_graph(qgraph.gm, qgraph.example_inputs, watch, {w.index for w in qgraph.weights.values()})
    return working_copy(stats)
