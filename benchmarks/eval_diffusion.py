"""Denoiser accuracy of the SVDQuant recipes on diffusers models built from small configs (issue 4,
part 7): a short sampling loop with the FP model and with RTN W4A4, SVDQuant (W4A4 + low-rank) and
W4A8 + low-rank; PSNR and cosine of the final latent against FP. One command:

    python benchmarks/eval_diffusion.py --json acc_diffusion.json

Random-init weights have none of the outliers that make 4-bit hard in trained diffusion models
(and that SVDQuant exists for), so by default the weights are made realistic first
(`inject_outliers`): a few activation channels are amplified where real models have them (the
affine weight of every norm, and the AdaLN scale chunks of Flux's modulation linears), and a few
weight entries get large values. `--no-outliers` measures the plain random model too.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))

from flux_transformer import compile_variant, make_inputs, psnr_cosine  # noqa: E402

VARIANTS = ("rtn-w4a4", "svdquant", "w4a8-svd", "w4a8-svd-chn")


@torch.no_grad()
def inject_outliers(model: torch.nn.Module, channel_frac: float = 0.02, channel_gain: float = 12.0,
                    weight_frac: float = 0.002, weight_gain: float = 10.0, seed: int = 0) -> dict:
    """Amplify a few channels and weights, as trained diffusion models have them (SVDQuant §3).

    Activation outliers: the same few channels of each norm's affine weight (LayerNorm, GroupNorm,
    RMSNorm) are multiplied by channel_gain; for AdaLN modulation linears (`*norm*.linear`, whose
    output is chunks of [shift, scale, gate, ...] per channel), the bias of every scale chunk gets
    channel_gain − 1 added on those channels, so (1 + scale) is about channel_gain. Weight
    outliers: weight_frac of the entries of every other linear / 1x1 conv weight times weight_gain.
    Returns counts of what was changed."""
    g = torch.Generator().manual_seed(seed)
    counts = {"norms": 0, "adaln": 0, "weights": 0}
    picks: dict[int, torch.Tensor] = {}

    def channels(n: int) -> torch.Tensor:
        if n not in picks:
            k = max(1, int(round(channel_frac * n)))
            picks[n] = torch.randperm(n, generator=g)[:k]
        return picks[n]

    for name, mod in model.named_modules():
        w = getattr(mod, "weight", None)
        if not isinstance(w, torch.Tensor) or w is None:
            continue
        is_norm = isinstance(mod, (torch.nn.LayerNorm, torch.nn.GroupNorm)) or type(
            mod).__name__ == "RMSNorm"
        if is_norm and w.dim() == 1:
            w[channels(w.shape[0])] *= channel_gain
            counts["norms"] += 1
        elif isinstance(mod, torch.nn.Linear) and ".norm" in f".{name}" and name.endswith(".linear"):
            hidden = _adaln_hidden(model, mod)
            if hidden and mod.bias is not None and mod.out_features % hidden == 0:
                chunks = mod.out_features // hidden
                # [shift, scale, gate] per sub-layer: the scale is chunk 1 of each triple
                # (AdaLayerNormZero: 6 chunks; the single-stream one: 3; AdaLayerNormContinuous: 2,
                # ordered [scale, shift]).
                scale_chunks = [0] if chunks == 2 else list(range(1, chunks, 3))
                for c in scale_chunks:
                    mod.bias[c * hidden + channels(hidden)] += channel_gain - 1
                counts["adaln"] += 1
        elif isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)) and w.dim() in (2, 4):
            if isinstance(mod, torch.nn.Conv2d) and any(s != 1 for s in w.shape[2:]):
                continue
            flat = w.view(-1)
            k = max(1, int(weight_frac * flat.numel()))
            flat[torch.randperm(flat.numel(), generator=g)[:k]] *= weight_gain
            counts["weights"] += 1
    return counts


def _adaln_hidden(model, mod) -> int:
    cfg = getattr(model, "config", None)
    heads, dim = getattr(cfg, "num_attention_heads", None), getattr(cfg, "attention_head_dim", None)
    if isinstance(heads, int) and isinstance(dim, int):
        return heads * dim
    return 0


# ---------------------------------------------------------------------------------------------
# Models from small configs, and their sampling loops.
# ---------------------------------------------------------------------------------------------

def flux_model(seed: int = 0):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=2, num_single_layers=4, attention_head_dim=64,
        num_attention_heads=4, joint_attention_dim=256, pooled_projection_dim=128,
        guidance_embeds=False, axes_dims_rope=(16, 24, 24)).eval()


def unet_model(seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    # SD-style: cross-attention transformers with 1x1 conv proj_in/proj_out, ResNet shortcuts.
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(64, 128), norm_num_groups=16, cross_attention_dim=128,
        attention_head_dim=16, use_linear_projection=False,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D")).eval()


@torch.no_grad()
def sample_flux(denoiser, inputs: dict, steps: int) -> torch.Tensor:
    """Euler steps of the rectified-flow ODE from t=1 (noise) to t=0."""
    z = inputs["latents"].clone()
    sigmas = torch.linspace(1.0, 0.0, steps + 1)
    for i in range(steps):
        v = denoiser(hidden_states=z, encoder_hidden_states=inputs["encoder_hidden_states"],
                     pooled_projections=inputs["pooled_projections"],
                     timestep=torch.full((1,), float(sigmas[i])), img_ids=inputs["img_ids"],
                     txt_ids=inputs["txt_ids"], return_dict=False)[0]
        z = z + float(sigmas[i + 1] - sigmas[i]) * v
    return z


@torch.no_grad()
def sample_unet(denoiser, inputs: dict, steps: int) -> torch.Tensor:
    """Deterministic DDIM steps (ε-prediction, a linear β schedule of 1000 steps)."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2
    abar = torch.cumprod(1 - betas, 0)
    ts = torch.linspace(999, 0, steps).round().long()
    z = inputs["latents"].clone()
    for i, t in enumerate(ts):
        eps = denoiser(z, torch.tensor([float(t)]), encoder_hidden_states=inputs["text"],
                       return_dict=False)[0]
        a_t = abar[t]
        a_next = abar[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0)
        x0 = (z - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        z = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps
    return z


def unet_inputs(model, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    s = model.config.sample_size
    return {"latents": torch.randn(1, model.config.in_channels, s, s, generator=g),
            "text": torch.randn(1, 16, model.config.cross_attention_dim, generator=g)}


MODELS = {
    "flux": (flux_model, lambda m: make_inputs(m, 32, 32, 32, "cpu", torch.float32), sample_flux),
    "unet": (unet_model, unet_inputs, sample_unet),
}


def evaluate(name: str, outliers: bool, steps: int, search: str, variants, adaln: str | None = None
             ) -> list[dict]:
    build, make, sample = MODELS[name]
    model = build()
    changed = inject_outliers(model) if outliers else {}
    inputs = make(model)
    ref = sample(model, inputs, steps)
    rows = []
    for v in variants:
        torch._dynamo.reset()
        t0 = time.perf_counter()
        z = sample(compile_variant(model, v, "reference", search == "small", inductor=False, adaln=adaln),
                   inputs, steps)
        psnr, cos = psnr_cosine(z, ref)
        # The final latent still holds part of the shared starting noise; what the denoiser
        # moved (final − initial) shows its error undiluted.
        z0 = inputs["latents"]
        psnr_d, cos_d = psnr_cosine(z - z0, ref - z0)
        rows.append({"model": name, "outliers": outliers, "variant": v, "steps": steps,
                     "psnr_db": round(psnr, 2), "cosine": round(cos, 5),
                     "psnr_delta_db": round(psnr_d, 2), "cosine_delta": round(cos_d, 5),
                     "seconds": round(time.perf_counter() - t0, 1), "injected": changed,
                     "search": search, "adaln": adaln or "default"})
        print(f"  {name:5} outliers={outliers!s:5} {v:9} adaln={adaln or 'default'} PSNR {psnr:6.2f} dB  cosine {cos:.5f}"
              f"  (final - initial: {psnr_d:6.2f} dB, {cos_d:.5f})", flush=True)
    return rows


@torch.no_grad()
def adaln_layer_sqnr(seed: int = 0) -> dict:
    """Output SQNR (dB) of the small Flux model's AdaLN modulation linears (outliers injected), on
    the rows they see in one forward, per candidate format: what each costs the layer alone,
    without the rest of the model's error mixed in (the end-to-end PSNR moves by a few tenths of
    a dB either way with how the other layers' errors happen to combine)."""
    from passes.lowrank import ADALN, _matches, fake_quant_a8, fake_quant_w4a4_weight
    from passes.quantize import quantize_progressive

    model = flux_model(seed)
    inject_outliers(model)
    inputs = MODELS["flux"][1](model)
    rows: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out, n=n: rows.__setitem__(n, inp[0].reshape(-1, inp[0].shape[-1])))
             for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and _matches(n, ADALN)]
    model(hidden_states=inputs["latents"], encoder_hidden_states=inputs["encoder_hidden_states"],
          pooled_projections=inputs["pooled_projections"], timestep=torch.full((1,), 0.5),
          img_ids=inputs["img_ids"], txt_ids=inputs["txt_ids"], return_dict=False)
    for h in hooks:
        h.remove()
    formats = {
        "w4_simulated (W4 g64 symmetric, fp16 scales; 16-bit input)": lambda x, w: x @ fake_quant_w4a4_weight(w).T,
        "w4a8 (QoQ progressive W4 g64, int8 per-token input)":
            lambda x, w: fake_quant_a8(x) @ quantize_progressive(w, 64).dequantize().float().T,
        "QoQ progressive W4 g64, 16-bit input": lambda x, w: x @ quantize_progressive(w, 64).dequantize().float().T,
        "QoQ progressive W4 g128, int8 input":
            lambda x, w: fake_quant_a8(x) @ quantize_progressive(w, 128).dequantize().float().T,
        "int8 input alone": lambda x, w: fake_quant_a8(x) @ w.T,
    }
    modules = dict(model.named_modules())
    out = {}
    for name, fn in formats.items():
        vals = []
        for layer, x in rows.items():
            w = modules[layer].weight.float()
            ref = x.float() @ w.T
            vals.append(float(10 * torch.log10(ref.pow(2).sum() / (fn(x.float(), w) - ref).pow(2).sum())))
        out[name] = {"mean_db": round(sum(vals) / len(vals), 2), "min_db": round(min(vals), 2), "layers": len(vals)}
        print(f"  {name:62} SQNR mean {out[name]['mean_db']:6.2f} dB, min {out[name]['min_db']:6.2f} dB "
              f"over {len(vals)} AdaLN linears", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", default="flux,unet")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--search", choices=["full", "small"], default="full",
                   help="full: the recipes' smoothing grid and refits; small: a 2x2 grid, 3 refits")
    p.add_argument("--no-outliers", action="store_true", help="also the plain random-init models")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"from {list(VARIANTS)}")
    p.add_argument("--adaln", default=None,
                   help="comma-separated AdaLN modulation modes to compare (passes.lowrank.ADALN_MODES: "
                        "w4a8 = 4-bit weights on qoq.w4a8_gemm, the default; w4_simulated = W4 g64 "
                        "dequantized to 16 bits; fp); default: the recipes' own")
    p.add_argument("--adaln-sqnr", action="store_true",
                   help="only the AdaLN linears' output SQNR per format (small Flux model; seconds)")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    if a.adaln_sqnr:
        res = adaln_layer_sqnr()
        if a.json:
            with open(a.json, "w") as f:
                json.dump({"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "adaln_sqnr": res}, f, indent=1)
        return
    variants = a.variants.split(",")
    rows = []
    for name in a.models.split(","):
        for outliers in ([True, False] if a.no_outliers else [True]):
            for adaln in (a.adaln.split(",") if a.adaln else [None]):
                rows += evaluate(name, outliers, a.steps, a.search, variants, adaln)
                if a.json:  # after every model/mode: a long run keeps what it measured
                    _write(a.json, rows)
    print(f"\n{'model':6} {'outliers':8} {'adaln':12} {'variant':10} {'PSNR dB':>8} {'cosine':>8} "
          f"{'vs RTN dB':>9} {'PSNR(Δ)':>8} {'cos(Δ)':>8}")
    for r in rows:
        rtn = next((x for x in rows if x["model"] == r["model"] and x["outliers"] == r["outliers"]
                    and x["adaln"] == r["adaln"] and x["variant"] == "rtn-w4a4"), None)
        vs = r["psnr_db"] - rtn["psnr_db"] if rtn else float("nan")
        print(f"{r['model']:6} {r['outliers']!s:8} {r['adaln']:12} {r['variant']:10} {r['psnr_db']:8.2f} "
              f"{r['cosine']:8.5f} {vs:+9.2f} "
              f"{r['psnr_delta_db']:8.2f} {r['cosine_delta']:8.5f}")
    if a.json:
        _write(a.json, rows)


def _write(path: str, rows: list[dict]) -> None:
    with open(path, "w") as f:
        json.dump({"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
