"""A Flux denoiser in 4 bits: runs a short flow-matching sampling loop with the FP transformer and
with quantized copies (RTN W4A4, SVDQuant W4A4 + low-rank, W4A8 + low-rank), and prints the error
of the final latent against FP (PSNR, cosine; also of final − initial latent) and time per step.

    python examples/flux_transformer.py                      # small random model from a config
    python examples/flux_transformer.py --checkpoint PATH    # a local FluxTransformer2DModel
"""
from __future__ import annotations

import argparse
import math
import time

import torch

# Variant -> SVDQuant options (rank 0 and a one-point grid at (0, 0) is plain round-to-nearest).
VARIANTS = {
    "rtn-w4a4": dict(rank=0, alphas=(0.0,), betas=(0.0,), max_iters=0),
    "svdquant": dict(rank=32),
    # progressive g128 W4 (with the full search: the recipe with weight_group_size 128)
    "w4a8-svd": dict(rank=32, residual="w4a8"),
    # = recipe "w4a8-svd" as it is by default: per-channel W4 (the faster W4A8 GEMM at large M on
    # Hopper), AdaLN per channel too
    "w4a8-svd-chn": dict(rank=32, residual="w4a8", w4a8_group_size=-1, adaln_group_size=-1),
}
# Variant -> the backend options that give it (the recipe w4a8-svd is per-channel by default).
RECIPE_OF = {"svdquant": {"recipe": "svdquant"},
             "w4a8-svd": {"recipe": "w4a8-svd", "weight_group_size": 128}}
# A smaller smoothing grid and fewer refits: minutes instead of tens of minutes on a CPU.
SMALL_SEARCH = dict(alphas=(0.0, 0.5), betas=(0.0, 0.25), max_iters=3)


def small_flux(seed: int = 0):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=2, num_single_layers=4, attention_head_dim=64,
        num_attention_heads=4, joint_attention_dim=256, pooled_projection_dim=128,
        guidance_embeds=False, axes_dims_rope=(16, 24, 24))


def make_inputs(model, height: int, width: int, text_tokens: int, device, dtype, seed: int = 0):
    """Packed latents (2x2 patches as tokens, as Flux pipelines do), ids, and random text states."""
    cfg = model.config
    g = torch.Generator(device="cpu").manual_seed(seed)
    h, w = height // 2, width // 2
    latents = torch.randn(1, h * w, cfg.in_channels, generator=g)
    img_ids = torch.zeros(h, w, 3)
    img_ids[..., 1] = torch.arange(h)[:, None]
    img_ids[..., 2] = torch.arange(w)[None, :]
    text = torch.randn(1, text_tokens, cfg.joint_attention_dim, generator=g)
    pooled = torch.randn(1, cfg.pooled_projection_dim, generator=g)
    to = dict(device=device, dtype=dtype)
    return dict(latents=latents.to(**to), img_ids=img_ids.view(-1, 3).to(**to),
                txt_ids=torch.zeros(text_tokens, 3, **to), encoder_hidden_states=text.to(**to),
                pooled_projections=pooled.to(**to))


@torch.no_grad()
def sample(denoiser, inputs: dict, steps: int) -> tuple[torch.Tensor, float]:
    """Euler steps of the rectified-flow ODE from t=1 (noise) to t=0; returns the final latent and
    the median seconds per step (the first, compiling, step excluded)."""
    z = inputs["latents"].clone()
    sigmas = torch.linspace(1.0, 0.0, steps + 1)
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        v = denoiser(hidden_states=z, encoder_hidden_states=inputs["encoder_hidden_states"],
                     pooled_projections=inputs["pooled_projections"],
                     timestep=torch.full((1,), float(sigmas[i]), device=z.device, dtype=z.dtype),
                     img_ids=inputs["img_ids"], txt_ids=inputs["txt_ids"], return_dict=False)[0]
        z = z + (sigmas[i + 1] - sigmas[i]).item() * v
        if z.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    later = sorted(times[1:]) or times
    return z, later[len(later) // 2]


def psnr_cosine(z: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    z, ref = z.float().flatten(), ref.float().flatten()
    mse = float((z - ref).pow(2).mean())
    peak = float(ref.abs().max())
    psnr = 10 * math.log10(peak**2 / max(mse, 1e-30))
    cos = float(torch.nn.functional.cosine_similarity(z, ref, dim=0))
    return psnr, cos


def compile_variant(model, name: str, kernels: str, small_search: bool = False,
                    inductor: bool = True, adaln: str | None = None):
    """torch.compile with backend="qoq" where its config knows the recipe; otherwise a backend
    that runs the same capture -> calibrate -> SVDQuant pass directly (RTN W4A4 always does:
    it is the pass with rank 0 and no smoothing). adaln: how the AdaLN modulation linears are
    quantized (passes.lowrank.ADALN_MODES; None: the recipe's default)."""
    from passes.lowrank import SVDQuantOptions, svdquant_backend
    from qcompile.config import QoQConfigError, make_config

    recipe = RECIPE_OF.get(name)
    if recipe is not None and not small_search:
        try:
            options = {**recipe, "kernels": kernels, "inductor": inductor}
            make_config(options)
            if adaln is not None:
                _set_adaln(adaln)
            return torch.compile(model, backend="qoq", options=options)
        except QoQConfigError:
            pass
    kw = dict(VARIANTS[name])
    if adaln is not None:
        kw["adaln"] = adaln
    if small_search and kw.get("rank", 0):
        kw.update(SMALL_SEARCH)
    backend = svdquant_backend(SVDQuantOptions(kernels=kernels, **kw))
    return torch.compile(model, backend=backend)


def _set_adaln(mode: str) -> None:
    """Make the svdquant recipes quantize AdaLN linears as `mode` (QoQConfig has no option for it:
    this is for accuracy studies). Stays set for the process."""
    from passes.lowrank import ADALN_MODES, SVDQuantOptions

    if mode not in ADALN_MODES:
        raise ValueError(f"adaln={mode!r}: expected one of {ADALN_MODES}")
    full = getattr(SVDQuantOptions, "_recipe_from_config", None) or SVDQuantOptions.from_config.__func__
    SVDQuantOptions._recipe_from_config = full

    def from_config(cls, config):
        opts = full(cls, config)
        opts.adaln = mode
        return opts

    SVDQuantOptions.from_config = classmethod(from_config)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--checkpoint", help="a local FluxTransformer2DModel directory (from_pretrained)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--size", type=int, default=32, help="latent height = width (before 2x2 packing)")
    p.add_argument("--text-tokens", type=int, default=32)
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"from {list(VARIANTS)}")
    p.add_argument("--search", choices=["small", "full"], default=None,
                   help="smoothing grid and refits (default: full on CUDA, small on CPU)")
    p.add_argument("--kernels", default=None,
                   help="auto | triton | reference (default: auto on CUDA, reference on CPU)")
    args = p.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    kernels = args.kernels or ("auto" if device == "cuda" else "reference")
    small = (args.search or ("full" if device == "cuda" else "small")) == "small"
    if args.checkpoint:
        from diffusers import FluxTransformer2DModel

        model = FluxTransformer2DModel.from_pretrained(args.checkpoint, torch_dtype=dtype)
    else:
        model = small_flux()
    model = model.to(device=device, dtype=dtype).eval()
    inputs = make_inputs(model, args.size, args.size, args.text_tokens, device, dtype)

    ref, t_fp = sample(model, inputs, args.steps)
    print(f"{device} {dtype}  {args.steps} steps, {inputs['latents'].shape[1]} image + "
          f"{args.text_tokens} text tokens, kernels={kernels}")
    # The final latent starts as the noise, which all variants share; the part the denoiser
    # produced (final − initial) shows its error without that dilution.
    z0 = inputs["latents"]
    print(f"{'variant':10} {'PSNR dB':>8} {'cosine':>8} {'PSNR(Δ)':>8} {'cos(Δ)':>8} {'s/step':>8}")
    print(f"{'fp':10} {'-':>8} {'-':>8} {'-':>8} {'-':>8} {t_fp:8.4f}")
    for name in args.variants.split(","):
        torch._dynamo.reset()
        z, t = sample(compile_variant(model, name, kernels, small), inputs, args.steps)
        psnr, cos = psnr_cosine(z, ref)
        psnr_d, cos_d = psnr_cosine(z - z0, ref - z0)
        print(f"{name:10} {psnr:8.2f} {cos:8.5f} {psnr_d:8.2f} {cos_d:8.5f} {t:8.4f}")


if __name__ == "__main__":
    main()
