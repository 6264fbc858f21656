"""Activation quantization under Inductor: decomposed into torch ops that fuse into the RMSNorm before it.

The fusible form must give the reference's codes bit for bit, and Inductor must generate the norm and
the quantization as one kernel (the op's own kernel would be a second pass over X).
"""
from __future__ import annotations

import re

import pytest

import torch
from hypothesis import given
from hypothesis import strategies as st

import lowering  # noqa: F401  (registers torch.ops.qoq.* and the Inductor decomposition)
from lowering.activation_quant import ABSMAX_FLOOR, quantize_act_int8_fusible, quantize_act_int8_reference


@given(
    shape=st.lists(st.integers(1, 5), min_size=1, max_size=3), k=st.integers(1, 300),
    scale=st.floats(1e-30, 1e30), dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_fusible_form_matches_reference_bit_exactly(shape, k, scale, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn((*shape, k), generator=g, dtype=torch.float64) * scale).to(dtype)
    got, want = quantize_act_int8_fusible(x), quantize_act_int8_reference(x)
    assert torch.equal(got[0], want[0]) and torch.equal(got[2], want[2])
    torch.testing.assert_close(got[1], want[1], rtol=1e-6, atol=0)


@given(a=st.floats(ABSMAX_FLOOR, 3e38, allow_nan=False, allow_infinity=False))
def test_division_through_float64_is_the_float32_quotient(a):
    # The reason the fusible form divides in float64: rounding the double quotient to float gives
    # the correctly rounded float quotient (53 >= 2·24 + 2), which the reference computes directly.
    t = torch.tensor([a], dtype=torch.float32)
    assert torch.equal((127.0 / t.double()).float(), torch.full_like(t, 127.0) / t)


def _norm_then_quant(K: int) -> torch.nn.Module:
    class NormQuant(torch.nn.Module):
        """An RMSNorm as Llama writes it, feeding the quantization of a W4A8 linear."""

        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.rand(K) + 0.5, requires_grad=False)

        def forward(self, x, residual):
            h = (x + residual).float()
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
            h = self.weight * h.to(x.dtype)
            return torch.ops.qoq.quantize_act_int8(h, "auto")

    return NormQuant().eval()


def test_inductor_fuses_quantization_into_the_norm_kernel():
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    K = 384
    mod = _norm_then_quant(K)
    x, res = torch.randn(5, K), torch.randn(5, K)
    # A cached compile would not show what this Inductor does with the op (the decomposition table is
    # not part of the cache key).
    with torch.no_grad(), torch._inductor.config.patch(fx_graph_cache=False):
        (x8, sx, xsum), codes = run_and_get_code(torch.compile(mod, backend="inductor"), x, res)
        h = x + res
        want = quantize_act_int8_reference(mod.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)))
    code = "\n".join(codes)
    kernels = re.findall(r"^(\w+) = async_compile\.\w+\(", code, flags=re.M)
    # One generated kernel does the residual add, the norm and the quantization; no call to our op's kernel.
    assert len(kernels) == 1, kernels
    assert "rsqrt" in kernels[0], kernels
    assert "torch.ops.qoq.quantize_act_int8" not in code  # not called as an extern kernel
    assert "int8" in code[code.find(kernels[0]):code.find("\n", code.find(kernels[0]))]  # the codes are its output
    assert torch.equal(x8, want[0]) and torch.equal(xsum, want[2])
    torch.testing.assert_close(sx, want[1], rtol=1e-6, atol=0)


@pytest.mark.cuda
def test_gpu_inductor_codes_match_the_reference():
    # On the GPU Inductor generates Triton (libdevice rounding, its own division lowering): still the
    # reference's codes, for bf16 activations with outliers as after a norm.
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(64, 4096, generator=g) * torch.rand(4096, generator=g).pow(8) * 40).to(torch.bfloat16)
    fused = torch.compile(lambda t: torch.ops.qoq.quantize_act_int8(t, "auto"), backend="inductor")
    with torch._inductor.config.patch(fx_graph_cache=False):
        got = [t.cpu() for t in fused(x.cuda())]
    want = quantize_act_int8_reference(x)
    assert torch.equal(got[0], want[0]) and torch.equal(got[2], want[2])
    torch.testing.assert_close(got[1], want[1], rtol=1e-6, atol=0)


@pytest.mark.cuda
def test_gpu_decode_step_runs_no_separate_quantization_kernel():
    """The profiler's kernel list of a qoq decode step: the W4A8 GEMMs, and no activation-quantization kernel."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch._dynamo.reset()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    lm = LlamaForCausalLM(cfg).eval().to("cuda", torch.bfloat16)
    fwd = torch.compile(lm, backend="qoq", options={"recipe": "qoq", "kv_bits": 16})
    ids = torch.randint(0, 256, (1, 8), device="cuda")
    with torch.no_grad(), torch._inductor.config.patch(fx_graph_cache=False):
        fwd(input_ids=ids)
        fwd(input_ids=ids)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            fwd(input_ids=ids)
            torch.cuda.synchronize()
    names = [e.key for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    print("\n".join(["CUDA kernels of one forward:"] + names))
    assert any("w4a8_gemm" in n or "gemv" in n for n in names), names
    assert not any("quantize_act_int8_kernel" in n for n in names), names
