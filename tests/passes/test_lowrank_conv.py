"""1x1 convolutions as linears over channels: matching (passes/match.py) and SVDQuant on them
(passes/lowrank.py), down to a small diffusers UNet2DConditionModel compiled with backend="qoq"."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from passes.lowrank import SVDQuantOptions, module_name
from passes.match import find_linears
from qcompile.capture import capture


def _capture(model, *inputs):
    seen = {}

    def backend(gm, example_inputs):
        seen["qg"] = capture(gm, example_inputs)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(model, backend=backend, fullgraph=True)(*inputs)
    return seen["qg"]


class _Convs(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.one = torch.nn.Conv2d(8, 16, 1)
        self.strided = torch.nn.Conv2d(16, 16, 1, stride=2)
        self.padded = torch.nn.Conv2d(16, 16, 1, padding=1)
        self.three = torch.nn.Conv2d(16, 16, 3, padding=1)
        self.grouped = torch.nn.Conv2d(16, 16, 1, groups=4)
        self.seq = torch.nn.Conv1d(8, 4, 1, bias=False)

    def forward(self, x, s):
        y = self.one(x)
        return self.strided(y), self.padded(y), self.three(y), self.grouped(y), self.seq(s)


def test_only_true_1x1_convs_match_and_only_on_request():
    qg = _capture(_Convs(), torch.randn(2, 8, 4, 4), torch.randn(2, 8, 5))
    assert find_linears(qg) == []   # the W4A8 passes never see convs
    found = {module_name(m.fqn): m for m in find_linears(qg, conv1x1=True)}
    assert set(found) == {"one", "seq"}
    one = found["one"]
    assert one.is_conv1x1 and one.weight_shape == (16, 8) and one.in_features == 8
    # The match reads the channels-last view of the input, inserted once per input.
    again = {module_name(m.fqn): m for m in find_linears(qg, conv1x1=True)}
    assert again["one"].x is one.x
    assert one.x.meta["example_value"].shape == (2, 4, 4, 8)
    w = qg.weight(one.weight)
    assert torch.equal(one.weight_like_placeholder(one.weight_nk(w)), w)
    qg.gm.graph.lint()


@settings(max_examples=8, deadline=None)
@given(kernel=st.sampled_from([1, 3]), stride=st.sampled_from([1, 2]),
       padding=st.sampled_from([0, 1]), groups=st.sampled_from([1, 2]), bias=st.booleans(),
       rank=st.sampled_from([0, 4]), seed=st.integers(0, 2**31 - 1))
def test_conv_matches_iff_it_is_a_linear_and_the_rewrite_keeps_shapes(
        kernel, stride, padding, groups, bias, rank, seed):
    """Any conv: matched exactly when it is 1x1, stride 1, unpadded, ungrouped; then the pass
    rewrites it to the W4A4 ops and the output keeps the conv's shape, strides and (within the
    4-bit error) its values."""
    from passes.lowrank import svdquant_backend

    torch.manual_seed(seed)
    conv = torch.nn.Conv2d(8, 8, kernel, stride=stride, padding=padding, groups=groups, bias=bias)
    x = torch.randn(2, 8, 5, 5)
    qg = _capture(conv, x)
    matched = find_linears(qg, conv1x1=True)
    linear_like = kernel == 1 and stride == 1 and padding == 0 and groups == 1
    assert len(matched) == int(linear_like)
    kinds_seen = [n.op for n in qg.gm.graph.nodes]
    assert "placeholder" not in kinds_seen[kinds_seen.index("call_function"):]
    backend = svdquant_backend(SVDQuantOptions(rank=rank, alphas=(0.0, 0.5), betas=(0.0,),
                                               max_iters=1, kernels="reference", skip=()))
    torch._dynamo.reset()
    with torch.no_grad():
        ref = conv(x)
        out = torch.compile(conv, backend=backend, fullgraph=True)(x)
    assert out.shape == ref.shape and out.stride() == ref.stride()
    kinds = [d.kind for d in backend.decisions]
    assert kinds == (["lowrank"] if linear_like else [])
    if linear_like:
        assert float((out - ref).norm() / ref.norm()) < 0.25
    else:
        assert torch.equal(out, ref)


def test_conv_linear_equivalence_of_the_channels_last_view():
    """What the rewrite relies on: conv1x1(x) == movedim(x·Wᵀ + b, -1, 1) on the view."""
    conv = torch.nn.Conv2d(8, 16, 1)
    x = torch.randn(2, 8, 3, 5)
    y = torch.nn.functional.linear(torch.movedim(x, 1, -1), conv.weight.view(16, 8), conv.bias)
    torch.testing.assert_close(torch.movedim(y, -1, 1), conv(x))


def _tiny_unet():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    # use_linear_projection=False: the transformer's proj_in/proj_out are 1x1 convs; the second
    # down block's ResNet changes width, so it has a 1x1 conv shortcut.
    model = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), norm_num_groups=8, cross_attention_dim=32,
        attention_head_dim=8, use_linear_projection=False,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D")).eval()
    g = torch.Generator().manual_seed(1)
    inputs = (torch.randn(1, 4, 8, 8, generator=g), torch.tensor([10.0]),
              torch.randn(1, 6, 32, generator=g))
    return model, inputs


@pytest.mark.slow
def test_svdquant_on_a_unet_with_conv_projections():
    """backend="qoq", recipe svdquant: proj_in/proj_out convs stay 16-bit (SVDQuant's selection),
    the other 1x1 convs (ResNet shortcuts) become W4A4 + low-rank, and the output stays close."""
    import qcompile

    model, inputs = _tiny_unet()
    with torch.no_grad():
        ref = model(*inputs, return_dict=False)[0]
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="qoq", options={
        "recipe": "svdquant", "kernels": "reference", "inductor": False, "strict": True})
    with torch.no_grad():
        out = compiled(*inputs, return_dict=False)[0]
    assert out.shape == ref.shape
    err = float((out - ref).norm() / ref.norm())
    assert err < 0.3, err
    layers = {module_name(r.name): r for r in qcompile.report(compiled).layers
              if r.kind == "linear"}
    shortcuts = [n for n in layers if n.endswith("conv_shortcut")]
    assert shortcuts and all(layers[n].quantized and "w4a4" in layers[n].format for n in shortcuts)
    projections = [n for n in layers if n.endswith(("proj_in", "proj_out"))
                   and ".attentions." in n]
    assert projections
    for n in projections:
        assert not layers[n].quantized and "SVDQuant" in layers[n].reason, (n, layers[n].reason)


def test_svdquant_pass_on_unet_conv_shortcut_matches_reference_math():
    """The pass alone (its helper backend), rank 8: a conv shortcut is rewritten to the W4A4 ops
    and the graph runs; dropping proj_in/proj_out from the skip list quantizes them too."""
    from passes.lowrank import SKIP_16BIT, svdquant_backend

    model, inputs = _tiny_unet()
    opts = SVDQuantOptions(rank=8, alphas=(0.0, 0.5), betas=(0.0,), max_iters=1,
                           kernels="reference", adaln="fp",
                           skip=tuple(p for p in SKIP_16BIT if "proj_" not in p))
    backend = svdquant_backend(opts)
    torch._dynamo.reset()
    with torch.no_grad():
        ref = model(*inputs, return_dict=False)[0]
        out = torch.compile(model, backend=backend, fullgraph=True)(*inputs, return_dict=False)[0]
    done = {module_name(f) for d in backend.decisions if d.kind == "lowrank" for f in d.fqns}
    assert any(n.endswith("proj_in") for n in done) and any(n.endswith("proj_out") for n in done)
    assert any(n.endswith("conv_shortcut") for n in done)
    targets = [n.target for n in backend.graphs[-1].nodes if n.op == "call_function"]
    assert torch.conv2d not in targets or targets.count(torch.conv2d) < _count_convs(model)
    assert float((out - ref).norm() / ref.norm()) < 0.3


def _count_convs(model) -> int:
    return sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
