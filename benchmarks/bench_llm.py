"""Decode speed of a Llama-3-8B-shaped transformers model: qoq vs torch.compile bf16 vs fp8 per-row
`torch._scaled_mm`, static cache, tokens/s per batch size, compile time, weight memory and the largest
batch that fits a 40 GB budget (weights + cache). Random weights made on the GPU; prints a table, writes JSON.

    python benchmarks/bench_llm.py --out $OUT/bench_llm.json               # 32 layers, batches 1 16 64 256
    python benchmarks/bench_llm.py --layers 2 --batches 1 16 --steps 8     # a short trial
    python benchmarks/bench_llm.py --smoke                                  # tiny model on the CPU: checks the script

At 32 layers each method spends about 40 + 60-90 s compiling (batch 1, then the dynamic-batch
recompile) on an H100: run one method per call (`--methods qoq`) to stay inside a 9-minute run.

Each batch gets a StaticCache of prompt + gen tokens whose first `prompt` positions hold random K/V (the
prompt's content does not change the cost: the static cache's attention reads all max_cache_len slots
under a mask), then `--steps` greedy decode steps from position `prompt` are timed with CUDA events
after `--warmup` steps. Every method runs its forward under torch.compile(fullgraph=True) with CUDA
graphs (mode="reduce-overhead") and dynamic batch; the compile time is the first call's wall time.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

import torch
import torch.nn as nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                 num_key_value_heads=8, num_hidden_layers=32, max_position_embeddings=8192, rope_theta=500000.0)
TINY = dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_attention_heads=4,
            num_key_value_heads=2, num_hidden_layers=1, max_position_embeddings=512)
GiB = 1 << 30


def build_model(dims: dict, layers: int, device: str, dtype: torch.dtype):
    """A Llama with random weights made directly on `device` (no CPU copy of 16 GB)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**dict(dims, num_hidden_layers=layers), tie_word_embeddings=False)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model = model.to_empty(device=device).to(dtype)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:  # std 0.02 as Llama's init: logits stay finite in bf16
                p.normal_(0.0, 0.02, generator=g)
    # to_empty left the rotary table undefined: build it again on the device from the config.
    rot = model.model.rotary_emb
    with torch.device(device):
        model.model.rotary_emb = type(rot)(config=cfg)
    return model.eval()


class Fp8Linear(nn.Module):
    """The fp8 baseline: per-row e4m3 weights, per-token dynamic e4m3 activations, torch._scaled_mm."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 448.0
        self.register_buffer("w8", (w / scale).to(torch.float8_e4m3fn))  # [N, K]
        self.register_buffer("w_scale", scale.t().contiguous())  # [1, N]
        self.bias = linear.bias

    def forward(self, x):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        sx = x2.abs().amax(dim=1, keepdim=True).float().clamp_min(1e-12) / 448.0
        x8 = (x2.float() / sx).to(torch.float8_e4m3fn)
        y = torch._scaled_mm(x8, self.w8.t(), scale_a=sx, scale_b=self.w_scale, out_dtype=x.dtype, use_fast_accum=True)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], y.shape[-1])


def to_fp8(model) -> list[tuple[nn.Module, str, nn.Linear]]:
    """Swap the decoder's linears for Fp8Linear; returns what to swap back."""
    swapped = []
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, Fp8Linear(child))
                    swapped.append((parent, name, child))
    return swapped


def make_cache(model, batch: int, max_len: int, prompt: int, device: str):
    from transformers import StaticCache

    cfg = model.config
    cache = StaticCache(config=cfg, max_cache_len=max_len)
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    dtype = next(model.parameters()).dtype
    if hasattr(cache, "early_initialization"):
        cache.early_initialization(batch, cfg.num_key_value_heads, head_dim, dtype, torch.device(device))
    else:
        kv = torch.zeros(batch, cfg.num_key_value_heads, 1, head_dim, dtype=dtype, device=device)
        for layer in cache.layers:
            layer.lazy_initialization(kv, kv)
    g = torch.Generator(device=device).manual_seed(batch)
    for layer in cache.layers:  # the prompt's K/V: random, never zeros
        for t in (layer.keys, layer.values):
            t[:, :, :prompt].normal_(0, 1, generator=g)
    return cache


def cache_bytes(cache) -> int:
    """GPU bytes the cache holds: the FP tensors' storage (0 once released) + KV4 buffers made for them."""
    from runtime.kv_cache import kv4_buffers_of
    from runtime.weights import storage_bytes

    fp = [t for layer in cache.layers for t in (layer.keys, layer.values)]
    kv4 = [t for layer in cache.layers for b in [kv4_buffers_of(layer.keys)] if b is not None for t in b.tensors()]
    return storage_bytes(fp) + storage_bytes(kv4)


def decode(fwd, model, batch: int, a, device: str) -> dict:
    """Warm-up then timed greedy decode steps from position `prompt`; returns ms per step and more."""
    cache = make_cache(model, batch, a.prompt + a.gen, a.prompt, device)
    tok = torch.randint(0, model.config.vocab_size, (batch, 1), device=device,
                        generator=torch.Generator(device=device).manual_seed(7))
    first_s = None

    def step(pos: int):
        out = fwd(input_ids=tok, past_key_values=cache, use_cache=True,
                  cache_position=torch.full((1,), pos, device=device, dtype=torch.long),
                  position_ids=torch.full((batch, 1), pos, device=device, dtype=torch.long))
        return out.logits[:, -1:].argmax(-1)

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    pos = a.prompt
    with torch.no_grad():
        for i in range(a.warmup):
            t0 = time.perf_counter()
            tok = step(pos)
            sync()
            if i == 0:
                first_s = time.perf_counter() - t0
            pos += 1
        t0 = time.perf_counter()
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        for _ in range(a.steps):
            tok = step(pos)
            pos += 1
        if device == "cuda":
            end.record()
            sync()
            ms = start.elapsed_time(end) / a.steps
        else:
            ms = (time.perf_counter() - t0) * 1e3 / a.steps
    row = {"batch": batch, "step_ms": round(ms, 3), "tokens_per_s": round(batch * 1e3 / ms, 1),
           "first_call_s": round(first_s, 2), "cache_GiB": round(cache_bytes(cache) / GiB, 2),
           "last_tokens": tok[:4, 0].tolist()}
    if device == "cuda":
        row["peak_GiB"] = round(torch.cuda.max_memory_allocated() / GiB, 2)
    del cache
    return row


def weight_bytes(model, extra: int = 0) -> int:
    from runtime.weights import storage_bytes

    return storage_bytes(list(model.parameters()) + list(model.buffers())) + extra


def run_method(name: str, fwd, model, a, device: str, weights: int, recompile=None) -> dict:
    """`recompile()`, if given, gives a freshly compiled forward for each batch size after the first."""
    rows = []
    for i, batch in enumerate(a.batches):
        if recompile is not None and i:
            torch._dynamo.reset()
            fwd = recompile()
        try:
            rows.append(decode(fwd, model, batch, a, device))
        except torch.OutOfMemoryError as e:
            rows.append({"batch": batch, "error": f"out of memory: {str(e)[:120]}"})
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        print(f"  {name} batch {batch}: {rows[-1]}", flush=True)
    cfg = model.config
    kv_per_seq = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) \
        * (a.prompt + a.gen) * 2  # bf16 K and V for prompt + gen tokens
    budget = a.budget_gb * 1e9
    return {"method": name, "weights_GiB": round(weights / GiB, 3), "rows": rows,
            "max_batch_in_budget": max(0, int((budget - weights) // kv_per_seq))}


def qoq_memory(model, a) -> dict:
    """Weight memory after qoq (packed tensors + what FP storage is left), the quantized layers' GPU
    memory against their packed size, the cache bytes per sequence and the largest batch in budget."""
    import qcompile
    from runtime.artifact import records_for
    from runtime.weights import storage_bytes

    data = records_for(list(model.parameters()))
    packed_tensors = [t for layer in data.layers.values() for key in layer["tensors"].values()
                      for t in [data.tensors[key]]] if data is not None and not data.unsaveable else []
    packed = storage_bytes(packed_tensors)
    held = weight_bytes(model)
    rep = qcompile.report(model)
    q_names = {layer.name for layer in rep.layers if layer.quantized and layer.kind == "linear"}
    qp = [p_ for n_, p_ in model.named_parameters() if n_.rsplit(".", 1)[0] in q_names]
    c = model.config
    head_dim = c.hidden_size // c.num_attention_heads
    kv4 = [layer for layer in rep.layers if layer.quantized and layer.format == "kv4"]
    bits = kv4[0].details["bits_per_element"] if kv4 else 16.0
    kv_per_seq = 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * (a.prompt + a.gen) * bits / 8
    weights = held + packed
    return {
        "weights_GiB": round(weights / GiB, 3), "packed_GiB": round(packed / GiB, 3),
        "quantized_layers": len(q_names),
        "released": len({layer.name for layer in rep.layers if layer.details.get("fp_weight") == "released"}),
        "quantized_layers_GiB": round((storage_bytes(qp) + packed) / GiB, 3),
        "quantized_layers_over_packed": round((storage_bytes(qp) + packed) / max(packed, 1), 3),
        "kv_bits_per_element": bits, "kv_per_seq_MiB": round(kv_per_seq / (1 << 20), 1),
        "max_batch_in_budget": max(0, int((a.budget_gb * 1e9 - weights) // kv_per_seq)),
    }


def measured_roofs() -> dict:
    """This GPU's copy bandwidth (bytes/s, read + write) and int8 tensor-core rate (`torch._int_mm`
    at 8192^3, op/s), measured now: the floors below use them, not data-sheet figures."""
    from triton.testing import do_bench

    from benchmarks.bench_attention import copy_bandwidth

    a = torch.randint(-128, 127, (8192, 8192), dtype=torch.int8, device="cuda")
    b = torch.randint(-128, 127, (8192, 8192), dtype=torch.int8, device="cuda").t()
    ms = do_bench(lambda: torch._int_mm(a, b), warmup=25, rep=200, return_mode="median")
    return {"copy_Bps": copy_bandwidth(), "int8_ops": 2 * 8192 ** 3 / (ms * 1e-3)}


def qoq_floor_ms(model, batch: int, pos: int, packed_bytes: int, kv_bits: float, roofs: dict) -> float:
    """The decode step's floor for qoq: bytes a step must read (packed linears, the 16-bit lm_head,
    the KV cache up to `pos`) at the copy bandwidth, or the GEMMs' ops at the int8 rate, whichever
    is longer (a roofline: both cannot be beaten at once)."""
    c = model.config
    head_dim = c.hidden_size // c.num_attention_heads
    head = model.lm_head.weight
    lm_bytes = head.numel() * head.element_size()
    kv_bytes = 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * (pos + 1) * kv_bits / 8 * batch
    linear_params = sum(p.numel() for n, p in model.named_parameters() if n.startswith("model.layers.") and n.endswith("proj.weight"))
    ops = 2 * batch * (linear_params + head.numel())
    return 1e3 * max((packed_bytes + lm_bytes + kv_bytes) / roofs["copy_Bps"], ops / roofs["int8_ops"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64, 256])
    p.add_argument("--prompt", type=int, default=1024)
    p.add_argument("--gen", type=int, default=256, help="cache room for generated tokens")
    p.add_argument("--steps", type=int, default=32, help="timed decode steps per batch")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--methods", nargs="+", default=["bf16", "fp8", "qoq"])
    p.add_argument("--recipe", default="qoq", help="qoq recipe (default qoq: W4A8 g128 + KV4)")
    p.add_argument("--options", default="{}", help='more qoq options as JSON, e.g. \'{"fuse_gemms": false}\'')
    p.add_argument("--mode", default="reduce-overhead")
    p.add_argument("--budget-gb", type=float, default=40.0)
    p.add_argument("--recompile-per-batch", action="store_true", help="qoq: a fresh Dynamo compile per batch size")
    p.add_argument("--smoke", action="store_true", help="tiny model on the CPU, reference kernels, no Inductor")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    device = "cpu" if a.smoke else "cuda"
    dims = TINY if a.smoke else LLAMA3_8B
    if a.smoke:
        a.layers, a.prompt, a.gen, a.steps, a.warmup, a.batches = 1, 8, 8, 2, 1, [1, 2]
    dtype = torch.float32 if a.smoke else torch.bfloat16
    torch._dynamo.config.cache_size_limit = 64

    t0 = time.perf_counter()
    model = build_model(dims, a.layers, device, dtype)
    info = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d"), "layers": a.layers, "prompt": a.prompt, "gen": a.gen,
            "steps": a.steps, "mode": a.mode, "recipe": a.recipe, "options": json.loads(a.options), "build_s": round(time.perf_counter() - t0, 1)}
    roofs = {} if device == "cpu" else measured_roofs()
    info.update({k: float(f"{v:.4g}") for k, v in roofs.items()})
    print(info, flush=True)
    results = []

    def compile_fwd(backend: str, options=None):
        torch._dynamo.reset()
        kw = {}
        if a.smoke:
            backend = "aot_eager" if backend == "inductor" else backend
            options = dict(options or {}, inductor=False, kernels="reference") if backend == "qoq" else options
        elif backend == "inductor":
            kw["mode"] = a.mode
        else:
            options = dict(options or {}, mode=a.mode)
        return torch.compile(model.forward, backend=backend, fullgraph=True, dynamic=None, options=options, **kw)

    def run_one(method: str) -> None:
        if method == "bf16":
            fwd = compile_fwd("inductor")
            results.append(run_method("bf16", fwd, model, a, device, weight_bytes(model)))
        elif method == "fp8":
            if a.smoke:
                print("  fp8: skipped on the CPU")
                return
            swapped = to_fp8(model)
            fp8_w = sum(m.w8.numel() + m.w_scale.numel() * 4 for parent, name, _ in swapped
                        for m in [getattr(parent, name)])
            held = weight_bytes(model)  # after the swap: fp8 linears + the FP rest (the bf16 linears sit in `swapped`)
            try:
                fwd = compile_fwd("inductor")
                results.append(run_method("fp8", fwd, model, a, device, held))
            finally:  # the methods after this one need the bf16 linears back
                for parent, name, lin in swapped:
                    setattr(parent, name, lin)
            del swapped, fwd
            results[-1]["weights_note"] = f"fp8 linears {fp8_w / GiB:.2f} GiB + FP rest"
        elif method == "qoq":
            # release_fp_cache: the bench never resets its caches, so the FP StaticCache the KV4 pass
            # stopped reading can go (what KV4 saves); the weights' FP storage goes too.
            opts = {"recipe": a.recipe, "release_fp_weights": True, "release_fp_cache": True, **json.loads(a.options)}
            fwd = compile_fwd("qoq", opts)
            # --recompile-per-batch: Dynamo compiles each batch size afresh (qoq replays the first
            # quantization). Without it a batch-dynamic graph meets each new cache through qoq's
            # per-cache recompile, which runs outside Dynamo: CUDA graphs then copy inputs (BENCHMARKS.md).
            again = (lambda: compile_fwd("qoq", opts)) if a.recompile_per_batch else None
            res = run_method(f"qoq {a.recipe}", fwd, model, a, device, 0, again)
            results.append(res)
            res.update(qoq_memory(model, a))
            if roofs:
                for row in res["rows"]:
                    if "step_ms" in row:
                        row["floor_ms"] = round(qoq_floor_ms(model, row["batch"], a.prompt + a.warmup + a.steps // 2,
                                                             res["packed_GiB"] * GiB, res["kv_bits_per_element"], roofs), 3)
                        row["x_floor"] = round(row["step_ms"] / row["floor_ms"], 2)

    def write_json() -> None:
        if a.out:
            os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
            with open(a.out, "w") as f:
                json.dump({"info": info, "results": results}, f, indent=1)

    for method in a.methods:
        try:
            run_one(method)
        except Exception as e:  # one method failing still leaves the others' rows
            import traceback

            traceback.print_exc()
            results.append({"method": method, "rows": [], "error": f"{type(e).__name__}: {str(e)[:300]}"})
        torch._dynamo.reset()
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
        write_json()  # after each method: a run cut short still leaves its rows
    base = {r["batch"]: r for r in results[0]["rows"]} if results else {}
    print(f"\n{info['device']}, {a.layers} layers, prompt {a.prompt}, {a.steps} timed steps, mode {a.mode}, {info['date']}")
    print(f"{'method':<16} {'batch':>5} {'step ms':>9} {'tok/s':>9} {'x bf16':>7} {'1st call s':>10} {'weights GiB':>11} {'max B@40GB':>10} {'floor ms':>9} {'x floor':>6}")
    for r in results:
        for row in r["rows"]:
            if "error" in row:
                print(f"{r['method']:<16} {row['batch']:>5} {row['error'][:60]}")
                continue
            b = base.get(row["batch"], {})
            ratio = b["step_ms"] / row["step_ms"] if "step_ms" in b else float("nan")
            floor = f"{row['floor_ms']:>9.3f} {row['x_floor']:>6.2f}" if "floor_ms" in row else ""
            print(f"{r['method']:<16} {row['batch']:>5} {row['step_ms']:>9.3f} {row['tokens_per_s']:>9.1f} {ratio:>7.2f} "
                  f"{row['first_call_s']:>10.1f} {r['weights_GiB']:>11.2f} {r['max_batch_in_budget']:>10} {floor}")
    for r in results:
        if "packed_GiB" in r:
            print(f"{r['method']}: {r['quantized_layers']} layers quantized, FP storage released for {r['released']}; "
                  f"their GPU memory {r['quantized_layers_GiB']:.3f} GiB = {r['quantized_layers_over_packed']:.3f}x the "
                  f"packed size ({r['packed_GiB']:.3f} GiB); model weights held {r['weights_GiB']:.2f} GiB")


if __name__ == "__main__":
    main()
