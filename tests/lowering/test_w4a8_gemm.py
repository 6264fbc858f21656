"""The W4A8 GEMM: layout round trip, Triton == reference (integer accumulation bit-exact)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lowering.activation_quant import quantize_act_int8_reference
from lowering.w4a8_gemm import (
    K_PAD, pack_nibbles, unpack_nibbles, w4a8_gemm, w4a8_gemm_reference, w4a8_gemm_triton,
)
from passes.quantize import quantize_per_channel, quantize_progressive


@given(n=st.integers(1, 20), k=st.integers(1, 300), seed=st.integers(0, 2**16))
def test_pack_unpack_round_trip(n, k, seed):
    q = torch.randint(0, 16, (n, k), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    packed = pack_nibbles(q)
    assert packed.dtype == torch.uint8 and packed.shape[1] * 2 % K_PAD == 0
    assert torch.equal(unpack_nibbles(packed, k), q)


def _random_case(m, n, k, fmt, group, seed, device):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn((n, k), generator=g) * torch.rand((n, 1), generator=g) * 2
    qw = quantize_progressive(w, group) if fmt == "progressive" else quantize_per_channel(w)
    qw = qw.to(device)
    x8 = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8).to(device)
    return qw, x8, g


@pytest.mark.parametrize("fmt,group", [("progressive", 128), ("progressive", 64), ("progressive", 32), ("progressive", 256), ("per_channel", -1)])
@given(m=st.integers(1, 40), n=st.integers(1, 80), k=st.integers(1, 400), seed=st.integers(0, 2**16))
def test_triton_integer_accumulation_is_bit_exact(fmt, group, m, n, k, seed, device):
    qw, x8, _ = _random_case(m, n, k, fmt, group, seed, device)
    ones_m = torch.ones(m, device=device)
    ones_n = torch.ones(n, device=device)
    xsum = x8.sum(-1, dtype=torch.int32)
    # Unit scales and fp32 output: y is the int32 accumulator itself (|acc| < 2^24 here).
    args = (x8, ones_m, xsum, qw.qweight, ones_n, qw.gscale, qw.gzero, None, torch.float32)
    got = w4a8_gemm_triton(*args)
    want = w4a8_gemm_reference(*args)
    assert torch.equal(got, want)
    assert torch.equal(got, got.round())


@pytest.mark.parametrize("fmt,group", [("progressive", 128), ("per_channel", -1)])
@given(
    lead=st.lists(st.integers(1, 5), min_size=1, max_size=2), n=st.integers(1, 70), k=st.integers(16, 300),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_triton_matches_reference_with_scales_and_bias(fmt, group, lead, n, k, dtype, bias, seed, device):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn((n, k), generator=g)
    qw = (quantize_progressive(w, group) if fmt == "progressive" else quantize_per_channel(w)).to(device)
    x = torch.randn((*lead, k), generator=g).to(dtype).to(device)
    b = torch.randn(n, generator=g).to(dtype).to(device) if bias else None
    x8, sx, xsum = quantize_act_int8_reference(x)
    args = (x8, sx, xsum, qw.qweight, qw.wscale, qw.gscale, qw.gzero, b, dtype)
    got = w4a8_gemm(*args, kernels="triton")
    want = w4a8_gemm(*args, kernels="reference")
    assert got.shape == (*lead, n) and got.dtype == dtype
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol * float(want.abs().max()) + 1e-6)
    # And the op computes the quantized linear layer it stands for.
    fp = (x8.float() * sx[..., None]) @ qw.dequantize().t() + (b.float() if bias else 0)
    torch.testing.assert_close(want.float(), fp, rtol=tol, atol=tol * float(fp.abs().max()) + 1e-5)


# Kernel variants the tuned configs pick from: split-K, weights as the MMA's A operand (SWAP),
# several K tiles per loop iteration (UNROLL). Each must give the reference's integers.
VARIANTS = [
    dict(BLOCK_M=16, BLOCK_N=32, SPLIT_K=1, UNROLL=1),
    dict(BLOCK_M=16, BLOCK_N=32, SPLIT_K=3, UNROLL=4),
    dict(BLOCK_M=16, BLOCK_N=32, SPLIT_K=3, UNROLL=4, PREFETCH_SCALES=True),  # group-scale words one iteration ahead
    dict(BLOCK_M=16, BLOCK_N=64, SPLIT_K=1, UNROLL=4, PREFETCH_SCALES=True, SWAP=True),
    dict(BLOCK_M=32, BLOCK_N=32, SPLIT_K=2, UNROLL=1, PREFETCH_SCALES=True, SWAP=True),
    dict(BLOCK_M=16, BLOCK_N=32, SPLIT_K=3, UNROLL=2, PREFETCH_SCALES=True, VEC=True),
    dict(BLOCK_M=16, BLOCK_N=64, SPLIT_K=1, UNROLL=2, SWAP=True),
    dict(BLOCK_M=32, BLOCK_N=32, SPLIT_K=2, UNROLL=2, SWAP=True),
    dict(BLOCK_M=16, BLOCK_N=32, SPLIT_K=1, UNROLL=1, VEC=True),
    dict(BLOCK_M=16, BLOCK_N=64, SPLIT_K=2, UNROLL=2, SWAP=True, VEC=True),
    # The small-M GEMV kernel: tokens per program, rows, chunks per iteration, register prefetch.
    dict(GEMV=True, BLOCK_M=1, BLOCK_N=8, UNROLL=4),
    dict(GEMV=True, BLOCK_M=4, BLOCK_N=16, UNROLL=2, num_stages=2),
    dict(GEMV=True, BLOCK_M=8, BLOCK_N=4, UNROLL=16, num_stages=2),
    dict(GEMV=True, BLOCK_M=4, BLOCK_N=8, UNROLL=2, num_stages=2, S2_AFTER=False),  # the v7 progressive unpack
    # Launched as programmatic dependents (GPU only; the interpreter launches them plainly).
    dict(GEMV=True, BLOCK_M=2, BLOCK_N=8, UNROLL=4, num_stages=2, PDL=True),
    dict(BLOCK_M=16, BLOCK_N=32, SPLIT_K=2, UNROLL=2, PDL=True),
]


@pytest.mark.parametrize("cfg", VARIANTS)
@pytest.mark.parametrize("fmt,group", [("progressive", 128), ("progressive", 64), ("per_channel", -1)])
def test_kernel_variants_are_bit_exact(cfg, fmt, group, device):
    qw, x8, g = _random_case(5, 48, 1000, fmt, group, 7, device)
    xsum = x8.sum(-1, dtype=torch.int32)
    args = (x8, torch.ones(5, device=device), xsum, qw.qweight, torch.ones(48, device=device), qw.gscale, qw.gzero,
            None, torch.float32)
    got = w4a8_gemm_triton(*args, config=dict(dict(GROUP_M=1, num_warps=4, num_stages=2), **cfg))
    assert torch.equal(got, w4a8_gemm_reference(*args))


# The low-rank epilogue (recipe w4a8-svd) on every kernel shape: tensor-core tiles, split-K (the
# last split adds the branch), SWAP, and the GEMV kernel's CUDA-core sum.
LOWRANK_VARIANTS = [VARIANTS[0], VARIANTS[1], VARIANTS[3], VARIANTS[4], VARIANTS[10], VARIANTS[11], VARIANTS[12]]


@pytest.mark.parametrize("cfg", LOWRANK_VARIANTS)
@given(m=st.integers(1, 9), n=st.integers(1, 40), rank=st.integers(1, 40), bias=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 2**16))
def test_lowrank_epilogue_matches_reference(cfg, m, n, rank, bias, dtype, seed, device):
    qw, x8, g = _random_case(m, n, 256, "progressive", 128, seed, device)
    xsum = x8.sum(-1, dtype=torch.int32)
    sx = (torch.rand(m, generator=g) / 64).to(device)
    lr = torch.randn((m, rank), generator=g).to(dtype).to(device)
    l_up = torch.randn((rank, n), generator=g).to(dtype).to(device)
    b = torch.randn(n, generator=g).to(device) if bias else None
    args = (x8, sx, xsum, qw.qweight, qw.wscale, qw.gscale, qw.gzero, b, torch.float32)
    got = w4a8_gemm_triton(*args, config=dict(dict(GROUP_M=1, num_warps=4, num_stages=2), **cfg),
                           lr_act=lr, l_up=l_up)
    want = w4a8_gemm_reference(*args, lr_act=lr, l_up=l_up)
    # fp32 sums of the same exact products in another order: rounding-level differences only
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()) + 1e-6)
    # and the branch is really in it: without it the output moves by lr·l_up
    plain = w4a8_gemm_triton(*args, config=dict(dict(GROUP_M=1, num_warps=4, num_stages=2), **cfg))
    branch = lr.float() @ l_up.float()
    torch.testing.assert_close(got - plain, branch, rtol=1e-4, atol=1e-4 * float(got.abs().max()) + 1e-5)


def test_lowrank_op_checks_shapes_and_rank_zero_is_no_branch(device):
    qw, x8, _ = _random_case(3, 8, 128, "per_channel", -1, 1, device)
    xsum = x8.sum(-1, dtype=torch.int32)
    args = (x8, torch.ones(3, device=device), xsum, qw.qweight, qw.wscale, qw.gscale, qw.gzero, None, torch.float32)
    with pytest.raises(ValueError, match="l_up \\(4, 7\\)"):
        w4a8_gemm(*args, "reference", torch.zeros(3, 4, device=device), torch.zeros(4, 7, device=device))
    with pytest.raises(ValueError, match="both or neither"):
        w4a8_gemm(*args, "reference", torch.zeros(3, 4, device=device), None)
    empty = (torch.zeros(3, 0, device=device), torch.zeros(0, 8, device=device))
    assert torch.equal(w4a8_gemm_triton(*args, lr_act=empty[0], l_up=empty[1]), w4a8_gemm_triton(*args))


@pytest.mark.parametrize("fmt,group", [("progressive", 128), ("progressive", 64), ("progressive", 256), ("per_channel", -1)])
@given(
    m=st.integers(1, 17), n=st.integers(1, 40), k_words=st.integers(1, 100), block_m=st.sampled_from([1, 2, 4, 8, 16]),
    block_n=st.sampled_from([2, 4, 8]), unroll=st.sampled_from([1, 2, 4]), prefetch=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_gemv_kernel_is_bit_exact(fmt, group, m, n, k_words, block_m, block_n, unroll, prefetch, seed, device):
    # Any M (more tokens than BLOCK_M: several token tiles), any N, any K that is whole words: the
    # GEMV kernel reads activations and weights as int32 words.
    k = 4 * k_words
    qw, x8, _ = _random_case(m, n, k, fmt, group, seed, device)
    xsum = x8.sum(-1, dtype=torch.int32)
    args = (x8, torch.ones(m, device=device), xsum, qw.qweight, torch.ones(n, device=device), qw.gscale, qw.gzero,
            None, torch.float32)
    cfg = dict(GEMV=True, BLOCK_M=block_m, BLOCK_N=block_n, UNROLL=unroll, num_warps=4, num_stages=2 if prefetch else 1)
    assert torch.equal(w4a8_gemm_triton(*args, config=cfg), w4a8_gemm_reference(*args))


@pytest.mark.parametrize("fmt,group,k", [("progressive", 32, 256), ("progressive", 128, 301), ("per_channel", -1, 130)])
def test_gemv_config_falls_back_where_it_cannot_read_the_operands(fmt, group, k, device):
    # Groups of 32 (narrower than a half chunk) and K not a multiple of 4: the tensor-core kernel
    # runs instead, with the same result.
    qw, x8, _ = _random_case(3, 24, k, fmt, group, 5, device)
    import lowering.w4a8_gemm as wg

    assert not wg.gemv_supported(x8, qw.qweight, qw.gscale)
    xsum = x8.sum(-1, dtype=torch.int32)
    args = (x8, torch.ones(3, device=device), xsum, qw.qweight, torch.ones(24, device=device), qw.gscale, qw.gzero,
            None, torch.float32)
    got = w4a8_gemm_triton(*args, config=dict(GEMV=True, BLOCK_M=4, BLOCK_N=8, UNROLL=2))
    assert torch.equal(got, w4a8_gemm_reference(*args))


def test_gemv_reads_strided_activation_rows(device):
    # Rows of x8 that are not word-aligned (a slice at an odd column offset) are copied, not misread.
    qw, x8, _ = _random_case(3, 16, 256, "progressive", 128, 9, device)
    wide = torch.zeros(3, 259, dtype=torch.int8, device=device)
    wide[:, 3:] = x8
    xv = wide[:, 3:]
    xsum = x8.sum(-1, dtype=torch.int32)
    args = (xv, torch.ones(3, device=device), xsum, qw.qweight, torch.ones(16, device=device), qw.gscale, qw.gzero,
            None, torch.float32)
    got = w4a8_gemm_triton(*args, config=dict(GEMV=True, BLOCK_M=4, BLOCK_N=8, UNROLL=2))
    assert torch.equal(got, w4a8_gemm_reference(*args))


@pytest.mark.cuda
@pytest.mark.parametrize("fmt", ["progressive", "per_channel"])
@pytest.mark.parametrize("cfg", [None, *VARIANTS, dict(BLOCK_M=256, BLOCK_N=128, num_warps=8, num_stages=3),
                                 dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3, SWAP=True, UNROLL=2)],
                         ids=lambda c: "default" if c is None else ("gemv-" if c.get("GEMV") else "mma-")
                         + ("pdl-" if c.get("PDL") else "")
                         + "-".join(f"{k}{v}" for k, v in c.items() if k != "GEMV"))
def test_inline_asm_unpack_gives_the_same_bits_as_pure_triton(fmt, cfg):
    qw, x8, _ = _random_case(77, 300, 1024, fmt, 128, 3, "cuda")
    ones_m = torch.ones(77, device="cuda")
    ones_n = torch.ones(300, device="cuda")
    xsum = x8.sum(-1, dtype=torch.int32)
    args = (x8, ones_m, xsum, qw.qweight, ones_n, qw.gscale, qw.gzero, None, torch.float32)
    for M in (1, 16, 77):
        a = (x8[:M], ones_m[:M], xsum[:M]) + args[3:]
        asm = w4a8_gemm_triton(*a, use_asm=True, config=cfg)
        pure = w4a8_gemm_triton(*a, use_asm=False, config=cfg)
        assert torch.equal(asm, pure)
        assert torch.equal(asm, w4a8_gemm_reference(*a))


def test_tuned_configs_are_read_per_gpu_and_fall_back(tmp_path, monkeypatch):
    import json

    import lowering.w4a8_gemm as wg

    table = {"configs": {"progressive": {"4096,4096": {"16": dict(BLOCK_M=16, BLOCK_N=64, SWAP=True)}}},
             "default": {"progressive": {"16": dict(BLOCK_M=16, BLOCK_N=16)}}}
    (tmp_path / "fake-gpu-80gb.json").write_text(json.dumps(table))
    monkeypatch.setattr(wg, "CONFIG_DIR", str(tmp_path))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "Fake GPU 80GB")
    monkeypatch.setattr(wg, "_sm_count", lambda index: 132)
    wg._tuned_tables.cache_clear()
    wg.choose_config.cache_clear()
    try:
        exact = dict(zip(wg.CONFIG_KEYS, wg.choose_config(wg.m_bucket(9), 4096, 4096, True, 0, 9)))
        assert exact["BLOCK_N"] == 64 and exact["SWAP"] is True and exact["num_warps"] == 4  # defaults filled
        other_shape = dict(zip(wg.CONFIG_KEYS, wg.choose_config("16", 6144, 4096, True, 0, 16)))
        assert other_shape["BLOCK_N"] == 16  # the bucket's default over shapes
        no_entry = dict(zip(wg.CONFIG_KEYS, wg.choose_config("big", 4096, 4096, False, 0, 4096)))
        assert no_entry == dict(zip(wg.CONFIG_KEYS, wg.choose_config.__wrapped__("big", 1, 1, False, 0, 4096)))
    finally:
        wg._tuned_tables.cache_clear()
        wg.choose_config.cache_clear()
    assert wg.m_bucket(1) == "1" and wg.m_bucket(17) == "64" and wg.m_bucket(5000) == "big"


def test_an_h200_reads_the_h100_tables_when_it_has_none_of_its_own(tmp_path, monkeypatch):
    import os

    import lowering.w4a8_gemm as wg

    monkeypatch.setattr(wg, "CONFIG_DIR", str(tmp_path))
    (tmp_path / "kv4-attention-nvidia-h100-80gb-hbm3.json").write_text("{}")
    assert os.path.basename(wg.tuned_config_file("kv4-attention-", "NVIDIA H200")) == (
        "kv4-attention-nvidia-h100-80gb-hbm3.json")
    (tmp_path / "kv4-attention-nvidia-h200.json").write_text("{}")  # its own table wins once it exists
    assert os.path.basename(wg.tuned_config_file("kv4-attention-", "NVIDIA H200")) == "kv4-attention-nvidia-h200.json"
    # another chip does not borrow: no table, the heuristics
    assert os.path.basename(wg.tuned_config_file("", "NVIDIA H100 PCIe")) == "nvidia-h100-pcie.json"


def test_gemm_configs_of_an_h200_come_first_from_its_own_table_then_the_h100s(tmp_path, monkeypatch):
    """The H200's table holds what was swept on it (small M); the H100's fills the rest."""
    import json

    import lowering.w4a8_gemm as wg

    own = {"layout": wg.PACK_LAYOUT, "configs": {"progressive": {"4096,4096": {"1": dict(BLOCK_N=8, GEMV=True)}}},
           "default": {"progressive": {"1": dict(BLOCK_N=2, GEMV=True)}}}
    twin = {"layout": wg.PACK_LAYOUT,
            "configs": {"progressive": {"4096,4096": {"1": dict(BLOCK_N=4, GEMV=True), "256": dict(BLOCK_M=128)},
                                        "6144,4096": {"1": dict(BLOCK_N=16, GEMV=True)}}},
            "default": {"progressive": {"1": dict(BLOCK_N=32, GEMV=True), "256": dict(BLOCK_M=64)}}}
    (tmp_path / "nvidia-h200.json").write_text(json.dumps(own))
    (tmp_path / "nvidia-h100-80gb-hbm3.json").write_text(json.dumps(twin))
    monkeypatch.setattr(wg, "CONFIG_DIR", str(tmp_path))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "NVIDIA H200")
    monkeypatch.setattr(wg, "_sm_count", lambda index: 132)
    wg._tuned_tables.cache_clear()
    wg.choose_config.cache_clear()
    try:
        pick = lambda bucket, n: dict(zip(wg.CONFIG_KEYS, wg.choose_config(bucket, n, 4096, True, 0, 1)))  # noqa: E731
        assert pick("1", 4096)["BLOCK_N"] == 8  # its own tuned shape
        assert pick("1", 6144)["BLOCK_N"] == 16  # the twin's tuned shape beats its own bucket default
        assert pick("1", 28672)["BLOCK_N"] == 2  # no tuned shape anywhere: its own bucket default
        assert pick("256", 4096)["BLOCK_M"] == 128  # a bucket it did not sweep: the twin's
    finally:
        wg._tuned_tables.cache_clear()
        wg.choose_config.cache_clear()


def test_shipped_configs_name_known_keys_and_fit_their_buckets():
    # The per-GPU JSON is data the dispatcher trusts: every entry must use the kernel's config keys,
    # and a GEMV entry must hold its bucket's tokens in per-token accumulators or token tiles.
    import json
    import os

    import lowering.w4a8_gemm as wg

    # the GEMM's tables are named by GPU alone; other ops' tables carry their op's prefix (kv4-attention-, w4a4-)
    files = [f for f in os.listdir(wg.CONFIG_DIR) if f.endswith(".json") and not f.startswith(("kv4-", "w4a4-"))]
    assert files
    for f in files:
        table = json.load(open(os.path.join(wg.CONFIG_DIR, f)))
        assert table.get("layout") == wg.PACK_LAYOUT, f
        entries = [(b, c) for fmt in table["configs"].values() for shape in fmt.values() for b, c in shape.items()]
        entries += [(b, c) for fmt in table.get("default", {}).values() for b, c in fmt.items()]
        for bucket, cfg in entries:
            assert set(cfg) <= set(wg.CONFIG_KEYS), (f, bucket, cfg)
            assert bucket in {str(b) for b in wg.M_BUCKETS} | {"big"}, (f, bucket)
            if cfg.get("GEMV"):
                assert bucket != "big" and int(bucket) <= 16 and cfg.get("SPLIT_K", 1) == 1, (f, bucket, cfg)


def test_heuristic_small_m_is_the_gemv_kernel_unless_asked_not_to():
    import lowering.w4a8_gemm as wg

    assert wg.heuristic_config(1, 4096, 4096)["GEMV"] is True
    assert wg.heuristic_config(wg.GEMV_MAX_M + 1, 4096, 4096).get("GEMV", False) is False
    assert wg.heuristic_config(1, 4096, 4096, gemv=False).get("GEMV", False) is False


def test_fake_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    qw = quantize_progressive(torch.randn(24, 200), 128)
    with FakeTensorMode(allow_non_fake_inputs=True):
        x8 = torch.empty(2, 5, 200, dtype=torch.int8)
        y = torch.ops.qoq.w4a8_gemm(x8, torch.empty(2, 5), torch.empty(2, 5, dtype=torch.int32), qw.qweight,
                                    qw.wscale, qw.gscale, qw.gzero, None, torch.bfloat16, "auto")
    assert y.shape == (2, 5, 24) and y.dtype == torch.bfloat16
