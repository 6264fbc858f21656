"""qoq::w4a4_gemm: weight layout, Triton == reference, the fused low-rank + bias epilogue."""
from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lowering.w4a4_activation_quant import (
    GELU_SHIFT, GROUP, pack_int4, pack_uint4, reference as quant_reference, unpack_int4,
    unpack_uint4,
)
from lowering.w4a4_gemm import (
    dequantize, load_config_table, lookup_config, m_bucket, quantize_weight, reference,
    shifted_bias, triton_gemm, w4a4_gemm, w4a4_linear,
)


@given(n=st.integers(1, 20), k=st.integers(1, 200), seed=st.integers(0, 2**31 - 1),
       scale_dtype=st.sampled_from([torch.float16, torch.float32]))
def test_weight_quantization_error_within_half_a_step(n, k, seed, scale_dtype):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    p, s = quantize_weight(w, scale_dtype)
    kp = s.shape[1] * GROUP
    assert p.shape == (n, kp // 2) and p.dtype == torch.uint8 and s.dtype == scale_dtype
    deq = dequantize(p, s, k)
    # Rounded against the stored scale; fp16 scale rounding may push absmax past 7 steps, where
    # the clamp at 7 can add at most the scale's relative rounding (2^-11) of absmax.
    step = s.float().repeat_interleave(GROUP, dim=1)[:, :k]
    slack = 0 if scale_dtype == torch.float32 else 8 * step * 2**-10
    assert bool(((deq - w).abs() <= 0.5 * step * (1 + 1e-5) + slack + 1e-30).all())


@given(m=st.integers(1, 40), n=st.integers(1, 70), k=st.integers(1, 200),
       r=st.sampled_from([0, 7, 16, 32]), bias=st.booleans(), unsigned=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       lr_mode=st.sampled_from([0, 1, 2]), seed=st.integers(0, 2**31 - 1))
def test_triton_matches_reference(m, n, k, r, bias, unsigned, dtype, lr_mode, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(m, k, generator=g) * 2).to(dtype)
    shift = torch.full((k,), GELU_SHIFT) if unsigned else None
    if unsigned:
        x = torch.nn.functional.gelu(x)
    w = torch.randn(n, k, generator=g)
    ld = (torch.randn(k, r, generator=g) * 0.2).to(dtype) if r else None
    lu = (torch.randn(r, n, generator=g) * 0.2).to(dtype) if r else None
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    a, sa, lr = quant_reference(x, None, ld, shift)
    wp, ws = quantize_weight(w)
    lr = lr if r else None
    yt = triton_gemm(a, sa, wp, ws, lr, lu, b, dtype, a_unsigned=unsigned, lr_mode=lr_mode)
    yr = reference(a, sa, wp, ws, lr, lu, b, dtype, a_unsigned=unsigned)
    assert yt.shape == (m, n) and yt.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(yt.float(), yr.float(), rtol=tol, atol=tol * float(yr.abs().max()))


@given(m=st.integers(1, 33), n=st.integers(1, 40), groups=st.integers(1, 4),
       seed=st.integers(0, 2**31 - 1))
def test_integer_sums_are_bit_exact(m, n, groups, seed):
    """Unit scales make every float step exact: the kernel's int8 MMA on 16·q must give Σ qa·qw."""
    g = torch.Generator().manual_seed(seed)
    qa = torch.randint(-8, 8, (m, groups * GROUP), generator=g, dtype=torch.int8)
    qw = torch.randint(-8, 8, (n, groups * GROUP), generator=g, dtype=torch.int8)
    sa = torch.ones(m, groups)
    sw = torch.ones(n, groups, dtype=torch.float16)
    yt = triton_gemm(pack_int4(qa), sa, pack_int4(qw), sw, None, None, None, torch.float32)
    exact = qa.long() @ qw.long().T
    assert torch.equal(yt, exact.float())
    plain = triton_gemm(pack_int4(qa), sa, pack_int4(qw), sw, None, None, None, torch.float32,
                        magic_i2f=False)
    assert torch.equal(plain, yt)
    assert torch.equal(reference(pack_int4(qa), sa, pack_int4(qw), sw, None, None, None,
                                 torch.float32), exact.float())
    ua = torch.randint(0, 16, (m, groups * GROUP), generator=g, dtype=torch.uint8)
    yu = triton_gemm(pack_uint4(ua), sa, pack_int4(qw), sw, None, None, None, torch.float32,
                     a_unsigned=True)
    assert torch.equal(yu, (ua.long() @ qw.long().T).float())


@given(m=st.integers(1, 20), n=st.integers(1, 40), k=st.integers(1, 200),
       seed=st.integers(0, 2**31 - 1))
def test_magic_conversion_gives_the_same_bits_as_i2f(m, n, k, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * 5
    wp, ws = quantize_weight(torch.randn(n, k, generator=g))
    a, sa, _ = quant_reference(x, None, None)
    y1 = triton_gemm(a, sa, wp, ws, None, None, None, torch.float32, magic_i2f=True)
    y2 = triton_gemm(a, sa, wp, ws, None, None, None, torch.float32, magic_i2f=False)
    assert torch.equal(y1, y2)


def test_unsigned_activations_after_gelu_are_more_accurate_and_unbiased():
    g = torch.Generator().manual_seed(7)
    x = torch.nn.functional.gelu(torch.randn(32, 256, generator=g) * 2)
    w = torch.randn(40, 256, generator=g)
    b = torch.randn(40, generator=g)
    wp, ws = quantize_weight(w, torch.float32)
    exact_w = x @ dequantize(wp, ws, 256).T + b     # isolates the activation error
    signed = w4a4_linear(x, wp, ws, bias=b, kernels="triton")
    shift = torch.full((256,), GELU_SHIFT)
    unsigned = w4a4_linear(x, wp, ws, bias=shifted_bias(b, shift, wp, ws), shift=shift,
                           kernels="triton")
    e_s = float((signed - exact_w).norm())
    e_u = float((unsigned - exact_w).norm())
    assert e_u < 0.75 * e_s, (e_u, e_s)
    # The shift is taken back out exactly: no systematic offset is left.
    assert abs(float((unsigned - exact_w).mean())) < 0.1 * float((unsigned - exact_w).std())


def test_gemm_approximates_the_float_linear_and_the_branch_is_exact_in_float():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 256, generator=g)
    w = torch.randn(48, 256, generator=g)
    ld = torch.randn(256, 16, generator=g) * 0.1
    lu = torch.randn(16, 48, generator=g) * 0.1
    b = torch.randn(48, generator=g)
    wp, ws = quantize_weight(w, torch.float32)
    y0 = w4a4_linear(x, wp, ws, kernels="triton")
    y1 = w4a4_linear(x, wp, ws, ld, lu, b, kernels="triton")
    torch.testing.assert_close(y1 - y0, x @ ld @ lu + b, rtol=1e-4, atol=1e-4)
    rel = (y0 - x @ w.T).norm() / (x @ w.T).norm()
    assert 0.02 < float(rel) < 0.25     # int4 x int4 on Gaussian data: about 0.15


def test_op_leading_dims_fake_and_opcheck():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 5, 80, generator=g, dtype=torch.float32).bfloat16()
    ld = (torch.randn(80, 16, generator=g) * 0.1).bfloat16()
    lu = (torch.randn(16, 24, generator=g) * 0.1).bfloat16()
    wp, ws = quantize_weight(torch.randn(24, 80, generator=g))
    a, sa, lr = torch.ops.qoq.w4a4_quantize_act(x, None, ld, kernels="reference")
    args = (a, sa, wp, ws, lr, lu, None, torch.bfloat16, False)
    y = torch.ops.qoq.w4a4_gemm(*args, kernels="triton")
    assert y.shape == (2, 5, 24) and y.dtype == torch.bfloat16
    torch.testing.assert_close(y, torch.ops.qoq.w4a4_gemm(*args, kernels="reference"),
                               rtol=1e-2, atol=1e-2)
    torch.library.opcheck(torch.ops.qoq.w4a4_gemm.default, (*args, "reference"),
                          test_utils=("test_schema", "test_faketensor"))


def test_compiles_fullgraph_as_an_opaque_op():
    g = torch.Generator().manual_seed(3)
    wp, ws = quantize_weight(torch.randn(32, 64, generator=g))
    ld = torch.randn(64, 16, generator=g)
    lu = torch.randn(16, 32, generator=g)

    def f(x):
        return torch.relu(w4a4_linear(x, wp, ws, ld, lu, None, kernels="reference"))

    x = torch.randn(4, 64, generator=g)
    out = torch.compile(f, fullgraph=True, backend="eager")(x)
    torch.testing.assert_close(out, f(x))


def test_mismatched_shapes_are_reported():
    wp, ws = quantize_weight(torch.randn(8, 64))
    a, sa, lr = quant_reference(torch.randn(4, 128), None, None)
    with pytest.raises(ValueError, match="packed widths"):
        w4a4_gemm(a, sa, wp, ws, None, None, None, torch.float32)


@given(m=st.integers(1, 33), n=st.integers(1, 40), groups=st.integers(1, 3),
       unsigned=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_mma_k_order_gives_the_same_bits(m, n, groups, unsigned, seed):
    """The shuffle-free k-order (K_PERM) reorders the dot's terms identically on both operands:
    integer sums, hence every output bit, must not change, for signed and unsigned activations."""
    g = torch.Generator().manual_seed(seed)
    if unsigned:
        a = pack_uint4(torch.randint(0, 16, (m, groups * GROUP), generator=g, dtype=torch.uint8))
    else:
        a = pack_int4(torch.randint(-8, 8, (m, groups * GROUP), generator=g, dtype=torch.int8))
    w = pack_int4(torch.randint(-8, 8, (n, groups * GROUP), generator=g, dtype=torch.int8))
    sa = torch.rand(m, groups, generator=g) + 0.1
    sw = (torch.rand(n, groups, generator=g) + 0.1).half()
    args = (a, sa, w, sw, None, None, None, torch.float32)
    y_perm = triton_gemm(*args, a_unsigned=unsigned, k_perm=True)
    y_nat = triton_gemm(*args, a_unsigned=unsigned, k_perm=False)
    assert torch.equal(y_perm, y_nat)
    ones = triton_gemm(a, torch.ones(m, groups), w, torch.ones(n, groups).half(), None, None,
                       None, torch.float32, a_unsigned=unsigned, k_perm=True)
    qa = (unpack_uint4(a) if unsigned else unpack_int4(a)).long()
    assert torch.equal(ones, (qa @ unpack_int4(w).long().T).float())


def test_tuned_config_table(tmp_path):
    cfg = {"BLOCK_M": 64, "BLOCK_N": 128, "GROUP_M": 8, "GROUPS": 1, "num_warps": 4,
           "num_stages": 3}
    other = dict(cfg, BLOCK_N=256, num_warps=8)
    path = tmp_path / "w4a4-some-gpu.json"
    path.write_text(json.dumps({"configs": {"3072,3072": {"big": other}},
                                "default": {"big": cfg, "4096": cfg}}))
    table = load_config_table(str(path))
    assert lookup_config(table, 4608, 3072, 48) == other      # exact shape, bucket "big"
    assert lookup_config(table, 4096, 3072, 48) == cfg        # shape lacks bucket: default
    assert lookup_config(table, 4608, 1024, 16) == cfg        # unknown shape: default
    assert lookup_config(table, 100, 3072, 48) is None        # no default either: autotune
    assert m_bucket(4096) == "4096" and m_bucket(4097) == "big" and m_bucket(1) == "16"
    assert load_config_table(str(tmp_path / "absent.json")) == {}
    del cfg["GROUPS"]
    path.write_text(json.dumps({"default": {"big": cfg}}))
    with pytest.raises(ValueError, match="lacks \\['GROUPS'\\]"):
        load_config_table(str(path))


@given(m=st.integers(1, 24), n=st.integers(1, 40), groups=st.integers(1, 5),
       groups_a_step=st.sampled_from([1, 2]), seed=st.integers(0, 2**31 - 1))
def test_scale_prefetch_gives_the_same_bits(m, n, groups, groups_a_step, seed):
    """PREFETCH only moves the scale loads a step earlier: same values, same float operations."""
    g = torch.Generator().manual_seed(seed)
    a = pack_int4(torch.randint(-8, 8, (m, groups * GROUP), generator=g, dtype=torch.int8))
    w = pack_int4(torch.randint(-8, 8, (n, groups * GROUP), generator=g, dtype=torch.int8))
    sa = torch.rand(m, groups, generator=g) + 0.1
    sw = (torch.rand(n, groups, generator=g) + 0.1).half()
    cfg = {"BLOCK_M": 16, "BLOCK_N": 32, "GROUP_M": 2, "GROUPS": groups_a_step}
    ys = [triton_gemm(a, sa, w, sw, None, None, None, torch.float32, config=dict(cfg, PREFETCH=p))
          for p in (0, 1)]
    assert torch.equal(ys[0], ys[1])
    yr = reference(a, sa, w, sw, None, None, None, torch.float32)
    torch.testing.assert_close(ys[0], yr, rtol=1e-5, atol=1e-5 * float(yr.abs().max()))
