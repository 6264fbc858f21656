"""Time per denoising step and weight memory of a Flux-shaped diffusers transformer (real dimensions,
full depth, random weights made on the GPU) at 1024x1024 (4096 image tokens, 512 text tokens):
qoq (`--recipe`, svdquant by default) vs torch.compile bf16. Prints a table, writes JSON.

    python benchmarks/bench_diffusion.py --out $OUT/bench_diffusion.json
    python benchmarks/bench_diffusion.py --methods qoq --recipe w4a8-g128      # one method per call
    python benchmarks/bench_diffusion.py --smoke                               # tiny model on the CPU
    python benchmarks/bench_diffusion.py --memory --out mem.json               # weight memory, CPU

A step is one transformer forward (the sampler's update is negligible beside it); median of
`--steps` timed forwards after `--warmup`, with CUDA events around each. Weight memory, two ways:
measured (`weights_GiB`: torch.cuda.memory_allocated after building the model, and its change
across qoq's compile, FP release and the timed steps, allocator caches emptied) and counted
(`weights_counted_GiB`: the distinct storages of the parameters and buffers plus every constant
qoq's passes attached, after the release).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
import weakref

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                guidance_embeds=True, axes_dims_rope=(16, 56, 56))
TINY = dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=32,
            num_attention_heads=2, joint_attention_dim=128, pooled_projection_dim=64,
            guidance_embeds=True, axes_dims_rope=(8, 12, 12))
GiB = 1 << 30


def build_model(dims: dict, device: str, dtype: torch.dtype):
    """A FluxTransformer2DModel with random weights made directly on `device`."""
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        model = FluxTransformer2DModel(**dims)
    model = model.to_empty(device=device).to(dtype)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.01, generator=g)
            elif "norm" in name and p.dim() == 1:
                p.fill_(1.0)
            else:  # fan-in scaled: activations stay O(1) through 57 blocks in bf16
                p.normal_(0.0, 1.0 / max(p.shape[-1], 1) ** 0.5, generator=g)
        for b in model.buffers():
            if b.is_floating_point():
                b.normal_(0.0, 0.02, generator=g)
    return model.eval()


def make_inputs(model, image_tokens: int, text_tokens: int, device: str, dtype: torch.dtype) -> dict:
    cfg = model.config
    g = torch.Generator(device=device).manual_seed(1)
    side = int(image_tokens ** 0.5)
    img_ids = torch.zeros(side, side, 3, device=device)
    img_ids[..., 1] = torch.arange(side, device=device)[:, None]
    img_ids[..., 2] = torch.arange(side, device=device)[None, :]
    rnd = lambda *s: torch.randn(*s, device=device, generator=g).to(dtype)  # noqa: E731
    inputs = dict(hidden_states=rnd(1, image_tokens, cfg.in_channels),
                  encoder_hidden_states=rnd(1, text_tokens, cfg.joint_attention_dim),
                  pooled_projections=rnd(1, cfg.pooled_projection_dim),
                  timestep=torch.full((1,), 0.5, device=device, dtype=dtype),
                  img_ids=img_ids.view(-1, 3).to(dtype), txt_ids=torch.zeros(text_tokens, 3, device=device, dtype=dtype),
                  return_dict=False)
    if cfg.guidance_embeds:
        inputs["guidance"] = torch.full((1,), 3.5, device=device, dtype=dtype)
    return inputs


def time_steps(fn, inputs: dict, a, device: str) -> dict:
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    with torch.no_grad():
        t0 = time.perf_counter()
        out = fn(**inputs)[0]
        sync()
        first = time.perf_counter() - t0
        for _ in range(a.warmup - 1):
            fn(**inputs)
        times = []
        for _ in range(a.steps):
            if device == "cuda":
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                fn(**inputs)
                e.record()
                e.synchronize()
                times.append(s.elapsed_time(e))
            else:
                t = time.perf_counter()
                fn(**inputs)
                times.append((time.perf_counter() - t) * 1e3)
    row = {"step_ms": round(statistics.median(times), 3), "first_call_s": round(first, 2),
           "out_rms": float(out.float().pow(2).mean().sqrt())}
    if a.profile and device == "cuda":
        row["profile"] = profile_step(fn, inputs)
    return row


# Kernel name fragments -> kind, first match wins. Inductor names its kernels after what it fused.
KINDS = (("_w4a4_gemm", "w4a4 gemm"), ("_w4a8_gemm", "w4a8 gemm"), ("_w4a8_gemv", "w4a8 gemm"),
         ("_quantize_act_kernel", "w4a4 act quant (+L_down)"), ("_quantize_act_int8", "int8 act quant"),
         ("flash", "attention"), ("fmha", "attention"), ("attention", "attention"),
         ("nvjet", "cuBLAS matmul"), ("cutlass", "cuBLAS matmul"), ("gemm", "cuBLAS matmul"),
         ("gemv", "cuBLAS matmul"))


def kernel_kind(name: str) -> str:
    """The KINDS entry of a kernel name. Inductor's kernels come first: their names list the ops
    fused into them ("..._quantize_act_int8_w4a8_gemm_21", "..._scaled_dot_product_cudnn_attention_..."),
    which would otherwise read as our GEMM or as attention."""
    if name.startswith("triton_"):
        if "quantize_act_int8" in name:
            return "Inductor, int8 act quant fused in"
        return "Inductor (norms, RoPE, GELU, residuals)"
    return next((k for frag, k in KINDS if frag in name), "other")


def profile_step(fn, inputs: dict) -> dict:
    """Kernel time of one step by kind (ms) and the 15 costliest kernels: where a step goes."""
    from collections import defaultdict

    with torch.no_grad():
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            fn(**inputs)
            torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    by_kind: dict[str, float] = defaultdict(float)
    by_name: dict[str, float] = defaultdict(float)
    for e in kernels:
        kind = kernel_kind(e.name)
        by_kind[kind] += e.time_range.elapsed_us() / 1e3
        by_name[e.name[:90]] += e.time_range.elapsed_us() / 1e3
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:15]
    return {"kernel_ms_by_kind": {k: round(v, 3) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
            "kernel_ms_total": round(sum(by_kind.values()), 3), "kernels": len(kernels),
            "top_kernels_ms": {k: round(v, 3) for k, v in top}}


def weight_bytes(model, constants=()) -> int:
    """Distinct storages of the model's parameters and buffers (released ones hold 0 bytes) plus
    `constants` (what qoq's passes attached to its graphs, from _ConstantTally)."""
    from runtime.weights import storage_bytes

    return storage_bytes(list(model.parameters()) + list(model.buffers()) + [t for _, t in constants])


def allocated(device: str) -> int:
    """Bytes the CUDA caching allocator has handed out, after everything queued has run and
    garbage (a step's outputs, compile-time temporaries) is collected."""
    if device != "cuda":
        return 0
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    return torch.cuda.memory_allocated()


class _ConstantTally:
    """Records every constant the passes attach to a graph (packed weights, scales, low-rank
    factors, smoothing, shifted biases, dequantized overrides), with the stem naming its layer.

    Holds weak references: a later pass may drop a constant (fuse_gemms concatenates a group's
    tensors into one buffer and erases the parts), and a strong reference here would keep it
    alive and count it, in the byte count and in the GPU's allocated memory alike."""

    def __enter__(self):
        from qcompile.capture import QGraph

        self._refs: list[tuple[str, weakref.ref]] = []
        self._orig = QGraph.add_constant
        tally = self

        def add_constant(qgraph, stem, value, before):
            tally._refs.append((stem, weakref.ref(value)))
            return tally._orig(qgraph, stem, value, before)

        QGraph.add_constant = add_constant
        return self

    def __exit__(self, *exc):
        from qcompile.capture import QGraph

        QGraph.add_constant = self._orig

    @property
    def items(self) -> list[tuple[str, torch.Tensor]]:
        """The attached constants still alive (held by a compiled graph or a replay record)."""
        gc.collect()
        return [(stem, t) for stem, ref in self._refs if (t := ref()) is not None]


def _block_of(name: str) -> str:
    """'double', 'single' or 'base': which part of a Flux transformer a weight or constant is in."""
    from passes.lowrank import module_name

    name = module_name(name)
    if name.startswith("transformer_blocks."):
        return "double"
    if name.startswith("single_transformer_blocks."):
        return "single"
    return "base"


def weight_memory(a) -> dict:
    """Weight bytes of the full-depth model, bf16 and qoq, measured on a one-double + one-single
    block model of the same width on the CPU and scaled by the block counts (every block of a
    kind has the same shapes, so the bytes are exactly linear in them).

    qoq's bytes: the parameters the compiled graph still reads (every parameter, minus the
    weights of the layers the report lists as quantized) plus the constants the passes attached.
    Runs the recipe's pass on 80 tokens (the bytes do not depend on the token count) with the
    reference kernels and without Inductor."""
    import qcompile
    from passes.lowrank import module_name

    dims = dict(TINY if a.smoke else FLUX_DEV, num_layers=1, num_single_layers=1)
    model = build_model(dims, "cpu", torch.bfloat16)
    inputs = make_inputs(model, 64, 16, "cpu", torch.bfloat16)
    params = dict(model.named_parameters())
    fp = {"base": 0, "double": 0, "single": 0}
    for name, p in params.items():
        fp[_block_of(name)] += p.numel() * p.element_size()
    torch._dynamo.reset()
    with _ConstantTally() as tally, torch.no_grad():
        fn = torch.compile(model, backend="qoq", options={
            "recipe": a.recipe, "kernels": "reference", "inductor": False, **a.options})
        fn(**inputs)
    q = dict(fp)
    replaced = set()
    for layer in qcompile.report(fn).layers:
        name = module_name(layer.name)
        if layer.quantized and f"{name}.weight" in params and name not in replaced:
            replaced.add(name)
            w = params[f"{name}.weight"]
            q[_block_of(name)] -= w.numel() * w.element_size()
    seen = set()
    for stem, t in tally.items:
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        q[_block_of(stem)] += t.numel() * t.element_size()
    full = lambda d: d["base"] + FLUX_DEV["num_layers"] * d["double"] + FLUX_DEV["num_single_layers"] * d["single"]  # noqa: E731
    out = {"bf16_GiB": round(full(fp) / GiB, 3), "qoq_GiB": round(full(q) / GiB, 3),
           "per_block_MiB": {k: {"bf16": round(fp[k] / 2**20, 2), "qoq": round(q[k] / 2**20, 2)}
                             for k in fp},
           "quantized_layers_per_block_pair": len(replaced)}
    out["qoq_vs_bf16"] = round(out["qoq_GiB"] / out["bf16_GiB"], 3)
    return out


def fp_release(fn) -> dict:
    """How many quantized layers had their FP weight released, and why any were kept."""
    import qcompile

    kept: dict[str, int] = {}
    released = 0
    for layer in qcompile.report(fn).layers:
        state = layer.details.get("fp_weight") if layer.quantized else None
        if state == "released":
            released += 1
        elif state:
            kept[state] = kept.get(state, 0) + 1
    return {"fp_released_layers": released, "fp_kept": kept}


def use_fast_search() -> None:
    """Make the svdquant recipes search one (α, β) and refit once: this benchmark times the
    kernels, which the found values do not change."""
    from passes.lowrank import SVDQuantOptions

    full = SVDQuantOptions.from_config.__func__

    def fast(cls, config):
        opts = full(cls, config)
        opts.alphas, opts.betas, opts.max_iters = (0.5,), (0.0,), 1
        return opts

    SVDQuantOptions.from_config = classmethod(fast)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=["bf16", "qoq"])
    p.add_argument("--recipe", default="svdquant")
    p.add_argument("--options", type=json.loads, default="{}", help='more qoq options as JSON, e.g. \'{"weight_group_size": -1}\'')
    p.add_argument("--image-tokens", type=int, default=4096)
    p.add_argument("--text-tokens", type=int, default=512)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--mode", default="max-autotune-no-cudagraphs")
    p.add_argument("--smoke", action="store_true", help="tiny model on the CPU, reference kernels, no Inductor")
    p.add_argument("--search", choices=["fast", "full"], default="fast",
                   help="SVDQuant's compile-time search: 'fast' = one smoothing candidate (α 0.5) "
                        "and one refit, which changes the numbers found, not the kernels or "
                        "shapes that run (speed and memory are the same); 'full' = the recipe's "
                        "grid and refits (minutes over 57 blocks)")
    p.add_argument("--gemm-configs", choices=["all", "sweep"], default="sweep",
                   help="W4A4 GEMM autotune candidates: 'sweep' = the four fastest tiles of the "
                        "H100 sweep at Flux shapes (bench_w4a4.py --sweep), 'all' = GPU_CONFIGS "
                        "(each candidate is one more Triton compile per shape)")
    p.add_argument("--memory", action="store_true",
                   help="weight memory only, on the CPU: one block of each kind at full width, "
                        "scaled to full depth (see weight_memory)")
    p.add_argument("--profile", action="store_true",
                   help="after the timed steps, profile one step: kernel time by kind, the costliest kernels")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    if a.gemm_configs == "sweep":
        import lowering.w4a4_gemm as w4a4

        keep = {(64, 128, 4, 3), (64, 128, 4, 4), (128, 64, 4, 4), (64, 256, 8, 3)}
        w4a4._w4a4_gemm_tuned.configs = [
            c for c in w4a4.GPU_CONFIGS
            if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in keep
            and c.kwargs["GROUPS"] == 1]
    if a.search == "fast":
        use_fast_search()
    if a.memory:
        info = {"recipe": a.recipe, "options": a.options, "search": a.search, "torch": torch.__version__,
                "date": time.strftime("%Y-%m-%d"), "dims": FLUX_DEV}
        mem = weight_memory(a)
        print(json.dumps(mem, indent=1))
        print(f"\nFlux-dev-shaped, full depth: bf16 {mem['bf16_GiB']:.3f} GiB, qoq {a.recipe} "
              f"{mem['qoq_GiB']:.3f} GiB ({mem['qoq_vs_bf16']:.3f}x)")
        if a.out:
            with open(a.out, "w") as f:
                json.dump({"info": info, "weight_memory": mem}, f, indent=1)
        return
    device = "cpu" if a.smoke else "cuda"
    dims = TINY if a.smoke else FLUX_DEV
    dtype = torch.float32 if a.smoke else torch.bfloat16
    if a.smoke:
        a.image_tokens, a.text_tokens, a.steps, a.warmup = 64, 16, 2, 1
    empty = allocated(device)
    model = build_model(dims, device, dtype)
    model_bytes = allocated(device) - empty   # the bf16 weights as the GPU holds them
    inputs = make_inputs(model, a.image_tokens, a.text_tokens, device, dtype)
    info = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d"), "image_tokens": a.image_tokens, "text_tokens": a.text_tokens,
            "mode": a.mode, "recipe": a.recipe, "options": a.options, "search": a.search, "gemm_configs": a.gemm_configs, "params": sum(p.numel() for p in model.parameters())}
    print(info, flush=True)
    results = []
    bf16_bytes = weight_bytes(model)
    info["bf16_weights_counted_GiB"] = round(bf16_bytes / GiB, 3)
    if device == "cuda":
        info["bf16_weights_measured_GiB"] = round(model_bytes / GiB, 3)
    # bf16 first: qoq releases the FP weights of the layers it quantized, after which the bf16
    # model cannot run.
    for method in sorted(a.methods, key=lambda m: m != "bf16"):
        torch._dynamo.reset()
        try:
            if method == "bf16":
                kw = {"backend": "aot_eager"} if a.smoke else {"mode": a.mode}
                before = allocated(device)
                fn = torch.compile(model, **kw)
                row = time_steps(fn, inputs, a, device)
                row.update(method="bf16", weights_counted_GiB=round(weight_bytes(model) / GiB, 3))
                if device == "cuda":
                    row["weights_GiB"] = round((model_bytes + allocated(device) - before) / GiB, 3)
            elif method == "qoq":
                opts = {"recipe": a.recipe, "release_fp_weights": True, "mode": a.mode, **a.options}
                if a.smoke:
                    opts.update(inductor=False, kernels="reference", mode="default")
                before = allocated(device)
                with _ConstantTally() as tally:
                    fn = torch.compile(model, backend="qoq", options=opts)
                    row = time_steps(fn, inputs, a, device)
                w = weight_bytes(model, tally.items)
                row.update(method=f"qoq {a.recipe}", weights_counted_GiB=round(w / GiB, 3),
                           weights_counted_vs_bf16=round(w / bf16_bytes, 3), **fp_release(fn))
                if device == "cuda":
                    measured = model_bytes + allocated(device) - before
                    row.update(weights_GiB=round(measured / GiB, 3), weights_vs_bf16=round(measured / model_bytes, 3),
                               peak_GiB=round(torch.cuda.max_memory_allocated() / GiB, 2))
            else:
                raise ValueError(f"unknown method {method!r}; use bf16 or qoq")
        except Exception as e:  # one method failing still leaves the other's row
            row = {"method": method, "error": f"{type(e).__name__}: {str(e)[:300]}"}
        results.append(row)
        print(f"  {row}", flush=True)
        fn = None  # the next row's memory is measured without this one's compiled graphs
        torch._dynamo.reset()
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump({"info": info, "results": results}, f, indent=1)
    base = next((r for r in results if r.get("method") == "bf16" and "step_ms" in r), None)
    print(f"\n{info['device']}, {info['date']}, {a.image_tokens} image + {a.text_tokens} text tokens, mode {a.mode}")
    print(f"{'method':<20} {'step ms':>9} {'x bf16':>7} {'1st call s':>10} {'weights GiB':>11}")
    for r in results:
        if "error" in r:
            print(f"{r['method']:<20} {r['error'][:90]}")
            continue
        ratio = base["step_ms"] / r["step_ms"] if base else float("nan")
        w = r.get("weights_GiB", r["weights_counted_GiB"])
        print(f"{r['method']:<20} {r['step_ms']:>9.3f} {ratio:>7.2f} {r['first_call_s']:>10.1f} {w:>11.3f}")
    for r in results:
        if "profile" in r:
            kinds = ", ".join(f"{k} {v:.1f}" for k, v in r["profile"]["kernel_ms_by_kind"].items())
            print(f"{r['method']} kernel ms by kind: {kinds}")


if __name__ == "__main__":
    main()
