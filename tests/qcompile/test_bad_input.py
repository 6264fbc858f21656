"""Bad and odd input: fuzzed options and calibration batches, and odd models (dimensions not divisible
by the group, 1-wide layers, shared and tied weights, fp32/fp16/bf16, bias or not). Each compiles to
the quantized function it should (checked against the reference formats, and against FP within a
measured bound) or fails with an error that names the cause."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import qcompile
from lowering.activation_quant import quantize_act_int8_reference
from passes.quantize import quantize_per_channel, quantize_progressive
from qcompile.calibration import CalibrationStats
from qcompile.config import _OPTION_KEYS, QoQConfig, QoQConfigError, make_config
from qcompile.fallback import QoQCalibrationError
from runtime.registry import graphs_for

_OPTS = {"inductor": False, "kernels": "reference", "strict": True}  # strict: a fallback would hide a bug here
# Relative error of the model output against FP: 4-bit weights on random layers measured 0.01-0.10.
FP_BOUND = 0.3
_TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 2e-2}  # reference vs compiled, relative


# -- options ------------------------------------------------------------------------------------------
_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-300, 300), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.sampled_from(["qoq", "w4a8", "w4a8-g128", "svdquant", "auto", "triton", "reference", "default"]),
    st.lists(st.one_of(st.text(max_size=6), st.floats(0, 1), st.integers(-2, 2)), max_size=3),
    st.tuples(st.text(max_size=6)), st.just(torch.tensor(4)), st.just(b"lm_head"), st.just(object()),
)
_KEYS = st.one_of(st.sampled_from(_OPTION_KEYS), st.text(min_size=1, max_size=10))


@given(st.dictionaries(_KEYS, _VALUES, max_size=4))
def test_fuzzed_options_build_a_config_or_name_the_bad_key(options):
    try:
        config = make_config(options)
    except QoQConfigError as e:
        named = [k for k in options if k in str(e)] + [w for w in ("recipe", "artifact", "kv_bits") if w in str(e)]
        assert named, f"error names no option: {e}"
        return
    assert isinstance(config, QoQConfig)
    for key, value in options.items():
        if key not in ("recipe", "calibration", "artifact") and not isinstance(value, (list, tuple)):
            assert getattr(config, key) == value  # an accepted value is the value used


def test_bad_option_through_torch_compile_names_it():
    torch._dynamo.reset()
    compiled = torch.compile(nn.Linear(8, 4), backend="qoq", options={"weight_group_size": 100})
    with pytest.raises(Exception, match=r"weight_group_size=100 is not allowed; use one of \(-1, 32, 64, 128, 256\)"):
        compiled(torch.randn(2, 8))


def test_calibration_option_of_the_wrong_type():
    torch._dynamo.reset()
    compiled = torch.compile(nn.Linear(8, 4), backend="qoq", options={"calibration": {"0": torch.ones(8)}})
    with pytest.raises(Exception, match="option calibration: expected the statistics returned by qcompile.calibrate"):
        compiled(torch.randn(2, 8))


# -- calibration batches ------------------------------------------------------------------------------
def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 4)).eval()


_BATCH = st.one_of(
    st.builds(lambda shape, dtype: torch.randn(shape).to(dtype),
              st.lists(st.integers(0, 9), min_size=1, max_size=3).map(tuple),
              st.sampled_from([torch.float32, torch.float16, torch.int64, torch.bool])),
    st.builds(lambda n: torch.randn(n, 8), st.integers(1, 5)),  # well-formed
    st.builds(lambda n: {"input": torch.randn(n, 8)}, st.integers(1, 3)),
    st.builds(lambda n: {"x": torch.randn(n, 8)}, st.integers(1, 3)),  # wrong keyword
    st.builds(lambda n: (torch.randn(n, 8),), st.integers(1, 3)),
    st.none(), st.integers(), st.text(max_size=4),
)


@given(st.one_of(st.lists(_BATCH, max_size=4), st.integers(), st.none(), st.text(max_size=3)))
@settings(max_examples=30)
def test_fuzzed_calibration_batches_give_statistics_or_a_clear_error(batches):
    model = _mlp()
    try:
        stats = qcompile.calibrate(model, batches, progress=False)
    except (TypeError, ValueError) as e:
        assert str(e).startswith("calibrate:"), e
        if isinstance(e, QoQCalibrationError):
            assert "batch" in str(e) and "Sequential" in str(e)
        return
    assert isinstance(stats, CalibrationStats) and set(stats.layers) <= {"0", "2"}
    for name, ls in stats.layers.items():
        assert ls.absmax.shape == (model.get_submodule(name).in_features,)
        assert torch.isfinite(ls.absmax).all()


def test_statistics_of_another_model_are_refused():
    wide = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4)).eval()
    stats = qcompile.calibrate(wide, [torch.randn(3, 16)], progress=False)
    torch._dynamo.reset()
    compiled = torch.compile(_mlp(), backend="qoq", options={**_OPTS, "calibration": stats})
    with pytest.raises(Exception, match="statistics for layer '0' have 16 input channels, the model's layer has 8"):
        compiled(torch.randn(2, 8))


def test_statistics_of_a_parent_module_are_refused():
    outer = nn.Sequential(_mlp())  # calibrated as "0.0", "0.2"; compiled as "0", "2"
    stats = qcompile.calibrate(outer, [torch.randn(3, 8)], progress=False)
    torch._dynamo.reset()
    compiled = torch.compile(outer[0], backend="qoq", options={**_OPTS, "calibration": stats})
    with pytest.raises(Exception, match="statistics name none of this graph's layers.*calibrate the same module you compile"):
        compiled(torch.randn(2, 8))


def test_matching_statistics_are_used():
    model = _mlp()
    stats = qcompile.calibrate(model, [torch.randn(3, 8)], progress=False)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="qoq", options={**_OPTS, "calibration": stats})
    compiled(torch.randn(2, 8))
    assert all(layer.quantized for layer in graphs_for(compiled)[-1].layers)


# -- odd models ---------------------------------------------------------------------------------------
def _fake_quant(layer: nn.Linear, x: torch.Tensor, group: int, protective_range: int = 119) -> torch.Tensor:
    """What one quantized linear computes, from the reference formats (int8 tokens, W4 weights)."""
    qw = quantize_per_channel(layer.weight) if group == -1 else quantize_progressive(layer.weight, group, protective_range)
    x8, sx, _ = quantize_act_int8_reference(x)
    y = (x8.float() * sx[..., None]) @ qw.dequantize().t()
    if layer.bias is not None:
        y = y + layer.bias.float()
    return y.to(x.dtype)


def _compile_and_check(model: nn.Module, x: torch.Tensor, want: torch.Tensor, group: int = 128, **options) -> torch.Tensor:
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="qoq", options={**_OPTS, "weight_group_size": group, **options})
    with torch.no_grad():
        got = compiled(x)
        fp = model(x)
    assert got.dtype == fp.dtype and got.shape == fp.shape
    scale = float(want.float().norm()) / math.sqrt(max(want.numel(), 1)) + 1e-6
    err = float((got.float() - want.float()).abs().max()) / scale
    assert err < _TOL[fp.dtype] * 10, f"compiled vs reference formats: {err:.2e} (relative to rms)"
    if fp.numel() >= 16:  # over fewer numbers one cancelling dot product can dominate the norm
        rel = float((got.float() - fp.float()).norm() / fp.float().norm().clamp_min(1e-12))
        assert rel < FP_BOUND, f"compiled vs FP: {rel:.3f}"
    return compiled


@given(dims=st.lists(st.integers(1, 80), min_size=2, max_size=4), bias=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
       group=st.sampled_from([-1, 32, 64, 128]), act=st.booleans(), rows=st.integers(1, 6),
       protective_range=st.sampled_from([119, 100, 64]))
@settings(max_examples=8)
def test_random_mlps_compute_the_quantized_function(dims, bias, dtype, group, act, rows, protective_range):
    torch.manual_seed(len(dims) * 100 + dims[0])
    layers = []
    for k, n in zip(dims, dims[1:]):
        layers += [nn.Linear(k, n, bias=bias)] + ([nn.GELU()] if act else [])  # act=False: back-to-back linears
    model = nn.Sequential(*layers).to(dtype).eval()
    x = torch.randn(rows, dims[0]).to(dtype)
    with torch.no_grad():
        want = x
        for layer in model:
            want = _fake_quant(layer, want, group, protective_range) if isinstance(layer, nn.Linear) else layer(want)
    _compile_and_check(model, x, want, group, protective_range=protective_range)


class _Shared(nn.Module):
    """One weight read by two linears (and one of them twice)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(32, 32)
        self.b = nn.Linear(32, 32, bias=False)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(torch.relu(self.a(x))) + self.a(x)


def test_shared_weights():
    torch.manual_seed(0)
    m = _Shared().eval()
    x = torch.randn(3, 32)
    with torch.no_grad():
        a = _fake_quant(m.a, x, 128)
        want = _fake_quant(m.b, torch.relu(a), 128) + a
    compiled = _compile_and_check(m, x, want)
    assert all(layer.quantized for layer in graphs_for(compiled)[-1].layers)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tied_embedding_head_stays_fp(dtype):
    torch.manual_seed(0)

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(50, 40)
            self.mid = nn.Linear(40, 40)
            self.head = nn.Linear(40, 50, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, ids):
            return self.head(self.mid(self.emb(ids)))

    m = Tied().to(dtype).eval()
    ids = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        want = m.head(_fake_quant(m.mid, m.emb(ids), 128))
    compiled = _compile_and_check(m, ids, want)
    layers = {layer.name: layer for layer in graphs_for(compiled)[-1].layers}
    assert layers["mid"].quantized and not layers["emb"].quantized
    assert "also read outside linear layers" in layers["emb"].reason


def test_zero_and_empty_inputs():
    m = _mlp()
    for x in (torch.zeros(2, 8), torch.zeros(0, 8)):
        torch._dynamo.reset()
        compiled = torch.compile(m, backend="qoq", options=dict(_OPTS))
        with torch.no_grad():
            got = compiled(x)
        assert got.shape == (x.shape[0], 4) and torch.isfinite(got).all()
        torch.testing.assert_close(got, m(x), rtol=0.05, atol=0.05)  # zeros in: only the biases come out


def test_two_models_compiled_with_their_own_statistics():
    # torch.compile compares the options of cached compiles with `==`: statistics must not compare tensors.
    outs = []
    torch._dynamo.reset()
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 4)).eval()
        stats = qcompile.calibrate(model, [torch.randn(3, 8)], progress=False)
        compiled = torch.compile(model, backend="qoq", options={**_OPTS, "calibration": stats})
        outs.append(compiled(torch.randn(2, 8)))
        assert all(layer.quantized for layer in graphs_for(compiled)[-1].layers)


def test_diffusers_unet_layer_names_match_calibration():
    # Dynamo reaches diffusers' submodules through `__dict__['_modules']`: the names must still be
    # the module FQNs that qcompile.calibrate uses, or the statistics would be refused.
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(32, 32),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       norm_num_groups=8).eval()
    batch = {"sample": torch.randn(1, 3, 8, 8), "timestep": 3}
    stats = qcompile.calibrate(unet, [batch], progress=False)
    torch._dynamo.reset()
    compiled = torch.compile(unet, backend="qoq", options={**_OPTS, "calibration": stats})
    with torch.no_grad():
        got, fp = compiled(**batch).sample, unet(**batch).sample
    layers = [layer for g in graphs_for(compiled) for layer in g.layers]
    assert "time_embedding.linear_1" in {layer.name for layer in layers}
    linears = {layer.name for layer in layers if layer.kind == "linear"}
    assert sum(layer.quantized for layer in layers) >= 10 and set(stats.layers) >= linears
    assert any(layer.kind == "other" and "conv2d" in layer.reason for layer in layers)  # convs: reported, in FP
    assert float((got - fp).norm() / fp.norm()) < FP_BOUND


def test_triton_kernels_where_triton_cannot_run(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # a CPU tensor and no interpreter: no Triton here
    torch._dynamo.reset()
    compiled = torch.compile(_mlp(), backend="qoq", options={"inductor": False, "kernels": "triton"})
    with pytest.raises(Exception, match="kernels='triton' was asked for, but a tensor is on cpu.*kernels='auto' / 'reference'") as info:
        compiled(torch.randn(2, 8))
    chain, e = [], info.value
    while e is not None:
        chain.append(type(e).__name__)
        e = e.__cause__ or getattr(e, "inner_exception", None)
    assert "QoQUserError" in chain  # raised while compiling, not at the first kernel launch


def test_non_finite_calibration_is_refused_and_non_finite_example_inputs_are_dropped(monkeypatch):
    model = _mlp()
    bad = torch.randn(3, 8)
    bad[1, 2] = float("inf")
    stats = qcompile.calibrate(model, [torch.randn(3, 8), bad], progress=False)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="qoq", options={**_OPTS, "recipe": "qoq", "calibration": stats})
    with pytest.raises(Exception, match="statistics of layer '0' hold NaN or inf"):
        compiled(torch.randn(2, 8))
    # Without statistics the compile's own call calibrates: that call's inf must not poison later calls.
    from qcompile.fallback import reset_warnings

    reset_warnings()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="qoq", options={**_OPTS, "recipe": "qoq"})
    with pytest.warns(UserWarning, match="layer '0' saw NaN or inf activations"):
        compiled(bad)
    x = torch.randn(2, 8)
    got, fp = compiled(x), model(x)
    assert torch.isfinite(got).all() and float((got - fp).norm() / fp.norm()) < FP_BOUND
    assert all(layer.quantized for layer in graphs_for(compiled)[-1].layers)
