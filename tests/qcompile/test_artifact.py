"""Artifacts: `qcompile.save` then `options={"artifact": path}` gives bit-identical outputs with no
calibration or quantization; a different model, a corrupted file or another version is a clear error."""
from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn as nn

import qcompile
from runtime.artifact import JSON_NAME, TENSORS_NAME, VERSION


def _tiny_llama(hidden: int = 128, layers: int = 1, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=256, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


# The torch reference kernels: what is tested here is the artifact, not the kernels (and the
# Triton interpreter would make these tests minutes long).
_FAST = {"kernels": "reference"}


def _ids(batch: int = 2, seq: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _compile_and_save(model, path, options):
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="qoq", options=dict(_FAST, **options))
    with torch.no_grad():
        out = compiled(_ids()).logits
    qcompile.save(compiled, str(path))
    return out


def _forbid_quantization(monkeypatch):
    """Make calibration and weight quantization fail loudly: an artifact compile must not reach them."""
    import passes.manager as pm
    import passes.quantize as pq
    import qcompile.backend as qb

    def boom(*a, **k):
        raise AssertionError("an artifact compile calibrated or quantized")

    monkeypatch.setattr(pq, "quantize_weight", boom)
    monkeypatch.setattr(qb, "calibrate_graph", boom)
    monkeypatch.setattr(pm, "run_passes", boom)


@pytest.mark.parametrize("recipe,inductor", [("w4a8-g128", False), ("w4a8", False), ("qoq", False), ("w4a8-g128", True)])
def test_artifact_round_trip_is_bit_identical_without_calibration(tmp_path, monkeypatch, recipe, inductor):
    model = _tiny_llama()
    want = _compile_and_save(model, tmp_path / "a.qoq", {"recipe": recipe, "inductor": inductor, **_FAST})
    header = json.loads((tmp_path / "a.qoq" / JSON_NAME).read_text())
    assert header["version"] == VERSION and header["config"]["recipe"] == recipe
    assert len(header["layers"]) == 7 and "lm_head" in header["skipped"]
    if recipe == "qoq":  # the folded norm weights travel too, or the numbers would differ
        assert any("layernorm" in k for k in header["overrides"])

    _forbid_quantization(monkeypatch)
    torch._dynamo.reset()
    fresh = _tiny_llama()  # same weights: the FP parts (embeddings, lm_head) come from the model
    compiled = torch.compile(fresh, backend="qoq", options={"artifact": str(tmp_path / "a.qoq"), "inductor": inductor, **_FAST})
    with torch.no_grad():
        got = compiled(_ids()).logits
    assert torch.equal(got, want)
    rep = qcompile.report(compiled)
    assert sum(layer.quantized for layer in rep.layers) == 7
    assert all(layer.sqnr_db is not None for layer in rep.layers if layer.quantized)  # carried over from the save


def test_artifact_compiled_model_can_be_saved_again_and_recompiles_for_new_shapes(tmp_path, monkeypatch):
    model = _tiny_llama()
    _compile_and_save(model, tmp_path / "a", {"inductor": False, **_FAST})
    _forbid_quantization(monkeypatch)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="qoq", options={"artifact": str(tmp_path / "a"), "inductor": False, **_FAST})
    with torch.no_grad():
        for batch, seq in [(2, 16), (3, 9), (1, 5)]:  # recompiles replay the same artifact
            assert compiled(_ids(batch, seq)).logits.shape == (batch, seq, 256)
    qcompile.save(compiled, str(tmp_path / "b"))
    a = json.loads((tmp_path / "a" / JSON_NAME).read_text())
    b = json.loads((tmp_path / "b" / JSON_NAME).read_text())
    assert a["layers"] == b["layers"] and a["config"] == b["config"]
    from safetensors.torch import load_file

    ta, tb = load_file(str(tmp_path / "a" / TENSORS_NAME)), load_file(str(tmp_path / "b" / TENSORS_NAME))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_mismatched_model_is_a_clear_error(tmp_path):
    _compile_and_save(_tiny_llama(hidden=128), tmp_path / "a", {"inductor": False, **_FAST})
    torch._dynamo.reset()
    other = torch.compile(_tiny_llama(hidden=64), backend="qoq", options={"artifact": str(tmp_path / "a"), "inductor": False, **_FAST})
    with pytest.raises(Exception, match=r"has weight shape .* saved from a different model"):
        other(_ids())
    torch._dynamo.reset()
    seq = torch.compile(nn.Sequential(nn.Linear(128, 64)), backend="qoq",
                        options={"artifact": str(tmp_path / "a"), "inductor": False, **_FAST})
    with pytest.raises(Exception, match=r"layer 0 of this model is not in it"):
        seq(torch.randn(2, 128))


def test_corrupted_or_wrong_version_artifact_is_a_clear_error(tmp_path):
    path = tmp_path / "a"
    _compile_and_save(_tiny_llama(), path, {"inductor": False, **_FAST})
    model = _tiny_llama()

    def compile_it():
        torch._dynamo.reset()
        return torch.compile(model, backend="qoq", options={"artifact": str(path), "inductor": False, **_FAST})(_ids())

    blob = bytearray((path / TENSORS_NAME).read_bytes())
    blob[-100] ^= 0x40  # one flipped bit in the packed data
    (path / TENSORS_NAME).write_bytes(bytes(blob))
    with pytest.raises(Exception, match=r"does not match the checksum"):
        compile_it()
    blob[-100] ^= 0x40
    (path / TENSORS_NAME).write_bytes(bytes(blob))
    compile_it()  # restored: loads again

    header = json.loads((path / JSON_NAME).read_text())
    (path / JSON_NAME).write_text(json.dumps(dict(header, version=99)))
    with pytest.raises(Exception, match=r"has version 99; this qoq reads versions 1, 2, 3"):
        compile_it()
    # Version 1 (before SVDQuant layers) had no shared inputs; it still reads.
    (path / JSON_NAME).write_text(json.dumps({k: v for k, v in dict(header, version=1).items() if k != "inputs"}))
    compile_it()
    # Version 2 (before weight copies) had none; it still reads.
    (path / JSON_NAME).write_text(json.dumps({k: v for k, v in dict(header, version=2).items() if k != "weight_copies"}))
    compile_it()
    (path / JSON_NAME).write_text(json.dumps(header)[:-40])
    with pytest.raises(Exception, match=r"qoq.json is corrupted"):
        compile_it()
    os.remove(path / JSON_NAME)
    with pytest.raises(Exception, match=r"no qoq.json there"):
        compile_it()


def test_options_that_disagree_with_the_artifact_are_refused(tmp_path):
    from qcompile.config import QoQConfigError, make_config

    _compile_and_save(_tiny_llama(), tmp_path / "a", {"recipe": "w4a8-g128", "inductor": False, **_FAST})
    cfg = make_config({"artifact": str(tmp_path / "a"), "kernels": "reference", "mode": "max-autotune"})
    assert cfg.recipe == "w4a8-g128" and cfg.kernels == "reference" and cfg.mode == "max-autotune"
    with pytest.raises(QoQConfigError, match=r"option weight_group_size=-1 disagrees with the artifact"):
        make_config({"artifact": str(tmp_path / "a"), "weight_group_size": -1})
    with pytest.raises(QoQConfigError, match=r"option recipe='w4a8' disagrees"):
        make_config({"artifact": str(tmp_path / "a"), "recipe": "w4a8"})
    with pytest.raises(QoQConfigError, match=r"needs no calibration"):
        make_config({"artifact": str(tmp_path / "a"), "calibration": object()})


def test_an_artifact_from_before_rotate_kv_values_replays_as_its_qoq_did(tmp_path):
    """Artifacts written before the option existed rotated V too: read without it, they still do."""
    from qcompile.config import make_config

    _compile_and_save(_tiny_llama(), tmp_path / "a", {"recipe": "qoq", "rotate_kv_values": False, "inductor": False})
    assert make_config({"artifact": str(tmp_path / "a")}).rotate_kv_values is False
    header = json.loads((tmp_path / "a" / JSON_NAME).read_text())
    del header["config"]["rotate_kv_values"]
    (tmp_path / "a" / JSON_NAME).write_text(json.dumps(header))
    assert make_config({"artifact": str(tmp_path / "a")}).rotate_kv_values is True


def test_save_before_any_compile_is_a_clear_error(tmp_path):
    with pytest.raises(qcompile.ArtifactError, match=r"run the compiled model once"):
        qcompile.save(nn.Linear(4, 4), str(tmp_path / "x"))


class _Breaks(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(32, 48)
        self.b = nn.Linear(48, 16)

    def forward(self, x):
        x = self.a(x)
        torch._dynamo.graph_break()
        return self.b(torch.relu(x))


def test_graph_breaks_save_every_graph_and_load_bit_identical(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = _Breaks().eval()
    x = torch.randn(3, 32)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="qoq", options={"inductor": False, **_FAST})
    with torch.no_grad():
        want = compiled(x)
    qcompile.save(compiled, str(tmp_path / "a"))
    header = json.loads((tmp_path / "a" / JSON_NAME).read_text())
    assert sorted(header["layers"]) == ["a", "b"]  # one layer from each of the two graphs
    _forbid_quantization(monkeypatch)
    torch._dynamo.reset()
    again = torch.compile(model, backend="qoq", options={"artifact": str(tmp_path / "a"), "inductor": False, **_FAST})
    with torch.no_grad():
        assert torch.equal(again(x), want)


@pytest.mark.parametrize("tie", [True, False])
def test_rotated_model_round_trips_tied_or_not(tmp_path, monkeypatch, tie):
    """Block rotation gives a tied lm_head its own rotated copy of the embedding: the artifact carries
    it (weight_copies), so the replay is bit-identical; an untied lm_head's rotated weight is an override."""
    from transformers import LlamaConfig, LlamaForCausalLM

    def model():
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=1,
                          num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)
        return LlamaForCausalLM(cfg).eval()

    want = _compile_and_save(model(), tmp_path / "a", {"recipe": "qoq", "rotate": True, "inductor": False})
    header = json.loads((tmp_path / "a" / JSON_NAME).read_text())
    assert header["config"]["rotate"] is True and len(header["layers"]) == 7
    lm_head = "model.embed_tokens" if tie else "lm_head"  # a tied lm_head is matched by its weight's name
    assert (lm_head in header["weight_copies"]) == tie and lm_head in header["skipped"]
    assert "model.embed_tokens.weight" in header["overrides"] and ("lm_head.weight" in header["overrides"]) != tie

    _forbid_quantization(monkeypatch)
    torch._dynamo.reset()
    compiled = torch.compile(model(), backend="qoq", options={"artifact": str(tmp_path / "a"), "inductor": False, **_FAST})
    with torch.no_grad():
        assert torch.equal(compiled(_ids()).logits, want)
        assert compiled(_ids(1, 1)).logits.shape == (1, 1, 256)  # a decode-shaped graph replays it too
    # the report names the FP lm_head in every graph, tied (reading the pass's copy) or not
    rep = qcompile.report(compiled)
    fp = [layer for layer in rep.layers if layer.name == lm_head and not layer.quantized]
    assert len(fp) == len(rep.graphs) == 2
    assert all(("own FP copy" in layer.reason) == tie for layer in fp), [layer.reason for layer in fp]
