"""Artifacts of the SVDQuant recipes (svdquant, w4a8-svd) on a small diffusers Flux transformer:
save + `options={"artifact": path}` is bit-identical with no calibration, SVD or quantization;
`release_fp_weights` frees the FP weights and a recompile replays the recorded rewrite; a
mismatched or corrupted artifact is a clear error."""
from __future__ import annotations

import json

import pytest
import torch

import qcompile
from runtime.artifact import JSON_NAME, TENSORS_NAME
from runtime.weights import is_released

diffusers = pytest.importorskip("diffusers")

# Reference kernels and no Inductor: what is tested is the artifact (the kernels have their own tests).
_FAST = {"kernels": "reference", "inductor": False}


@pytest.fixture(autouse=True)
def _one_point_search(monkeypatch):
    """One (α, β) candidate and one refit: the search's cost, not its result, is what this removes
    (α 0.5 still gives non-trivial smoothing, so smooth_inv is saved and replayed)."""
    from passes.lowrank import SVDQuantOptions

    full = SVDQuantOptions.from_config.__func__

    def fast(cls, config):
        opts = full(cls, config)
        opts.alphas, opts.betas, opts.max_iters, opts.rank = (0.5,), (0.0,), 1, 8
        return opts

    monkeypatch.setattr(SVDQuantOptions, "from_config", classmethod(fast))


def _flux(hidden_heads: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    return diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=32,
        num_attention_heads=hidden_heads, joint_attention_dim=32, pooled_projection_dim=32,
        guidance_embeds=False, axes_dims_rope=(8, 12, 12)).eval()


def _inputs(image_tokens: int = 64, text_tokens: int = 16, seed: int = 1, dtype=torch.float32) -> dict:
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    return dict(hidden_states=rnd(1, image_tokens, 16), encoder_hidden_states=rnd(1, text_tokens, 32),
                pooled_projections=rnd(1, 32), timestep=torch.tensor([0.5], dtype=dtype),
                img_ids=rnd(image_tokens, 3), txt_ids=torch.zeros(text_tokens, 3, dtype=dtype), return_dict=False)


def _forbid_quantization(monkeypatch):
    """Calibration, the SVDQuant search and every weight quantizer fail loudly from here on."""
    import passes.lowrank as lr
    import passes.manager as pm
    import passes.quantize as pq
    import qcompile.backend as qb

    def boom(*a, **k):
        raise AssertionError("a compile from recorded weights calibrated, searched or quantized")

    for mod, name in [(qb, "calibrate_graph"), (pm, "run_passes"), (lr, "svdquant_linear"), (lr, "svdquant_pass"),
                      (lr, "quantize_weight"), (pq, "quantize_weight"), (pq, "quantize_progressive")]:
        monkeypatch.setattr(mod, name, boom)


def _run(model, options, inputs):
    compiled = torch.compile(model, backend="qoq", options=dict(_FAST, **options))
    with torch.no_grad():
        return compiled, compiled(**inputs)[0]


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["svdquant", "w4a8-svd"])
def test_svdquant_artifact_round_trip_is_bit_identical(tmp_path, monkeypatch, recipe):
    torch._dynamo.reset()
    compiled, want = _run(_flux(), {"recipe": recipe, "strict": True}, _inputs())
    qcompile.save(compiled, str(tmp_path / "a"))
    header = json.loads((tmp_path / "a" / JSON_NAME).read_text())
    ops = {name.split("_modules.")[-1]: entry["op"] for name, entry in header["layers"].items()}
    lowrank = "w4a4_lowrank" if recipe == "svdquant" else "w4a8_lowrank"
    assert ops["transformer_blocks.0.attn.to_q"] == lowrank
    assert ops["transformer_blocks.0.norm1.linear"] == "w4a8"  # AdaLN: 4-bit weights on the W4A8 GEMM
    assert any(k.endswith("x_embedder") for k in header["skipped"])
    # q/k/v share one activation quantization (and its smoothing and down-projection).
    shared = [v for v in header["inputs"].values() if len(v["layers"]) == 3]
    assert shared and {"smooth_inv", "l_down"} <= set(shared[0]["tensors"])
    if recipe == "svdquant":  # GELU outputs are quantized unsigned: the shift and shifted bias travel
        assert any("shift" in v["tensors"] for v in header["inputs"].values())

    _forbid_quantization(monkeypatch)
    torch._dynamo.reset()
    again, got = _run(_flux(), {"artifact": str(tmp_path / "a")}, _inputs())
    assert torch.equal(got, want)
    layers = {r.name.split("_modules.")[-1]: r for r in qcompile.report(again).layers}
    assert layers["transformer_blocks.0.attn.to_q"].format.endswith("+lowrank")
    assert "artifact" in layers["transformer_blocks.0.attn.to_q"].details["source"]


@pytest.mark.slow
def test_release_fp_weights_under_svdquant_frees_them_and_a_recompile_replays(tmp_path, monkeypatch):
    torch._dynamo.reset()
    model = _flux()
    before = sum(p.untyped_storage().nbytes() for p in model.parameters())
    compiled, _ = _run(model, {"recipe": "svdquant", "release_fp_weights": True, "strict": True}, _inputs())
    layers = {r.name.split("_modules.")[-1]: r for r in qcompile.report(compiled).layers}
    for name in ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.ff.net.2",
                 "single_transformer_blocks.0.proj_mlp", "transformer_blocks.0.norm1.linear"):
        assert layers[name].details["fp_weight"] == "released", layers[name].details
        assert is_released(model.get_submodule(name).weight)
    assert not is_released(model.x_embedder.weight)  # kept in 16 bits, still read
    after = sum(p.untyped_storage().nbytes() for p in model.parameters())
    assert after < 0.3 * before, (after, before)
    qcompile.save(compiled, str(tmp_path / "a"))

    # New token counts: Dynamo compiles again; the FP weights are gone, so it must replay.
    _forbid_quantization(monkeypatch)
    with torch.no_grad():
        got = compiled(**_inputs(36, 8, seed=2))[0]
    torch._dynamo.reset()
    _, want = _run(_flux(), {"artifact": str(tmp_path / "a")}, _inputs(36, 8, seed=2))
    assert torch.equal(got, want)


@pytest.mark.slow
def test_mismatched_or_corrupted_svdquant_artifact_is_a_clear_error(tmp_path):
    torch._dynamo.reset()
    compiled, _ = _run(_flux(), {"recipe": "svdquant"}, _inputs())
    path = tmp_path / "a"
    qcompile.save(compiled, str(path))

    def load_into(model, dtype=torch.float32):
        torch._dynamo.reset()
        _run(model.to(dtype), {"artifact": str(path)}, _inputs(dtype=dtype))

    with pytest.raises(Exception, match=r"has weight shape .* saved from a different model"):
        load_into(_flux(hidden_heads=3))
    with pytest.raises(Exception, match=r"low-rank factor l_down is torch.float32 in the artifact and the model "
                                        r"computes in torch.bfloat16"):
        load_into(_flux(), torch.bfloat16)

    header = json.loads((path / JSON_NAME).read_text())
    broken = json.loads(json.dumps(header))
    name, entry = next((k, v) for k, v in broken["layers"].items() if v["op"] == "w4a4_lowrank")
    entry["input"] = "nowhere"
    (path / JSON_NAME).write_text(json.dumps(broken))
    with pytest.raises(Exception, match=r"names a shared input 'nowhere' it lacks"):
        load_into(_flux())
    broken = json.loads(json.dumps(header))
    stem, shared = next((k, v) for k, v in broken["inputs"].items() if len(v["layers"]) == 3)
    shared["layers"] = shared["layers"][:2]
    (path / JSON_NAME).write_text(json.dumps(broken))
    with pytest.raises(Exception, match=r"shared one quantized input when saved"):
        load_into(_flux())
    (path / JSON_NAME).write_text(json.dumps(header))

    blob = bytearray((path / TENSORS_NAME).read_bytes())
    blob[-64] ^= 0x10  # one flipped bit in a packed weight or low-rank factor
    (path / TENSORS_NAME).write_bytes(bytes(blob))
    with pytest.raises(Exception, match=r"does not match the checksum"):
        load_into(_flux())


class _ConvNet(torch.nn.Module):
    """1x1 convolutions (SVDQuant's conv path, as UNets' proj_in/proj_out) around a GELU, then a linear."""

    def __init__(self):
        super().__init__()
        self.proj_a = torch.nn.Conv2d(64, 128, 1)
        self.proj_b = torch.nn.Conv2d(128, 64, 1)
        self.head = torch.nn.Linear(64, 32)

    def forward(self, x):
        y = self.proj_b(torch.nn.functional.gelu(self.proj_a(x)))
        return self.head(y.mean(dim=(2, 3)))


def test_conv1x1_layers_save_replay_and_release(tmp_path, monkeypatch):
    x = torch.randn(2, 64, 6, 6, generator=torch.Generator().manual_seed(1))
    torch._dynamo.reset()
    model = _seed0_net()
    compiled, want = _run(model, {"recipe": "svdquant", "strict": True, "release_fp_weights": True}, {"x": x})
    assert is_released(model.proj_a.weight) and is_released(model.proj_b.weight)
    qcompile.save(compiled, str(tmp_path / "a"))
    header = json.loads((tmp_path / "a" / JSON_NAME).read_text())
    assert {k.split("_modules.")[-1]: v["op"] for k, v in header["layers"].items()} == {
        "proj_a": "w4a4_lowrank", "proj_b": "w4a4_lowrank", "head": "w4a4_lowrank"}
    _forbid_quantization(monkeypatch)
    with torch.no_grad():  # a new spatial size: Dynamo recompiles, the released weights replay
        got_small = compiled(x[:, :, :4, :4])
    torch._dynamo.reset()
    again, got = _run(_seed0_net(), {"artifact": str(tmp_path / "a")}, {"x": x})
    assert torch.equal(got, want)
    with torch.no_grad():
        assert torch.equal(again(x[:, :, :4, :4]), got_small)


def _seed0_net() -> _ConvNet:
    torch.manual_seed(0)
    return _ConvNet().eval()


@pytest.mark.cuda
@pytest.mark.parametrize("recipe", ["svdquant", "w4a8-svd"])
def test_svdquant_artifact_on_the_gpu_with_triton_kernels(tmp_path, recipe):
    """The same round trip in bf16 on CUDA with the Triton kernels and Inductor: the replayed graph
    launches the same kernels on the same constants, so the outputs are bit-identical."""
    torch._dynamo.reset()
    model = _flux().to("cuda", torch.bfloat16)
    inputs = {k: (v.to("cuda") if isinstance(v, torch.Tensor) else v) for k, v in _inputs(dtype=torch.bfloat16).items()}
    compiled = torch.compile(model, backend="qoq", options={"recipe": recipe, "release_fp_weights": True, "strict": True})
    with torch.no_grad():
        want = compiled(**inputs)[0]
    assert is_released(model.transformer_blocks[0].attn.to_q.weight)
    assert is_released(model.transformer_blocks[0].norm1.linear.weight)
    qcompile.save(compiled, str(tmp_path / "a"))
    torch._dynamo.reset()
    again = torch.compile(_flux().to("cuda", torch.bfloat16), backend="qoq", options={"artifact": str(tmp_path / "a")})
    with torch.no_grad():
        got = again(**inputs)[0]
    assert torch.equal(got, want)
