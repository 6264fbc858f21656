"""`python -m qcompile quantize|report|bench` on a tiny local Llama checkpoint (random weights, a
word-level tokenizer built here: no downloads), and the errors a user can make on the command line."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qcompile import cli

_FAST = ["--option", "inductor=False", "--option", "kernels=reference", "-q"]
_WORDS = "the a cat dog sat on mat quick brown fox jumps over lazy".split()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("tiny_llama")
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, **{w: i + 1 for i, w in enumerate(_WORDS)}}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(out)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2)
    LlamaForCausalLM(cfg).save_pretrained(out)
    return out


@pytest.fixture
def calib(tmp_path) -> Path:
    f = tmp_path / "calib.txt"
    f.write_text("the quick brown fox\n\njumps over the lazy dog\nthe cat sat on the mat\n", encoding="utf-8")
    return f


@pytest.fixture(autouse=True)
def _restore_env(monkeypatch):
    monkeypatch.delenv("QOQ_QUIET", raising=False)  # main() sets it for -q; undo after each test


def test_help_of_every_command():
    out = subprocess.run([sys.executable, "-m", "qcompile", "--help"], capture_output=True, text=True, check=True)
    assert "quantize" in out.stdout and "report" in out.stdout and "bench" in out.stdout
    for command, flag in (("quantize", "--calib"), ("report", "--json"), ("bench", "--iters")):
        with pytest.raises(SystemExit) as exit_:
            cli.main([command, "--help"])
        assert exit_.value.code == 0
    assert cli.build_parser().parse_args(["bench", "x", "--option", "weight_group_size=64"]).options == [("weight_group_size", 64)]


def test_quantize_writes_artifact_and_report(checkpoint, calib, tmp_path, monkeypatch, capsys):
    saved = []

    def fake_save(model, path):  # the artifact format is qcompile.artifact's; here: what quantize hands it
        saved.append((model, path))
        Path(path).mkdir(parents=True, exist_ok=True)

    monkeypatch.setattr(cli, "_save_function", lambda: fake_save)
    out = tmp_path / "art"
    rc = cli.main(["quantize", str(checkpoint), "--calib", str(calib), "-o", str(out), "--samples", "2", *_FAST])
    assert rc == 0
    (model, path), = saved
    assert path == str(out) and type(model._orig_mod).__name__ == "LlamaForCausalLM"
    data = json.loads((out / cli.REPORT_NAME).read_text())
    layers = data["graphs"][0]["layers"]
    assert sum(layer["quantized"] for layer in layers) == 7 and data["source"]["calibration"]["lines"] == 2
    assert all(layer["sqnr_db"] > 10 for layer in layers if layer["quantized"])
    printed = capsys.readouterr().out
    assert "model.layers.0.mlp.down_proj" in printed and "7 of 8 layers quantized" in printed

    # `report` reads it back: the same table, plus the FP layers by reason; --json for tools.
    assert cli.main(["report", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "artifact of LlamaForCausalLM" in shown and "1 x skipped by skip_layers pattern 'lm_head'" in shown
    assert cli.main(["report", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["graphs"][0]["layers"] == layers


def test_bench_prints_and_writes_json(checkpoint, tmp_path, capsys):
    result = tmp_path / "bench.json"
    rc = cli.main(["bench", str(checkpoint), "--seq-len", "8", "--iters", "1", "--warmup", "0", "--json", str(result), *_FAST])
    assert rc == 0
    row = json.loads(result.read_text())
    assert row["cosine"] > 0.95 and row["layers_quantized"] == 7 and row["fp_ms"] > 0 and row["qoq_ms"] > 0
    assert "speed-up" in capsys.readouterr().out


@pytest.mark.parametrize("case", ["not_a_folder", "no_config", "missing_calib", "empty_calib", "bad_option",
                                  "no_tokenizer", "bad_report", "missing_report"])
def test_user_errors_exit_2_with_the_cause(case, checkpoint, calib, tmp_path, capsys):
    out = str(tmp_path / "art")
    args = {
        "not_a_folder": ["quantize", str(tmp_path / "nope"), "--calib", str(calib), "-o", out],
        "no_config": ["quantize", str(tmp_path), "--calib", str(calib), "-o", out],
        "missing_calib": ["quantize", str(checkpoint), "--calib", str(tmp_path / "none.txt"), "-o", out],
        "empty_calib": ["quantize", str(checkpoint), "--calib", str(_write(tmp_path / "e.txt", "\n \n")), "-o", out],
        "bad_option": ["bench", str(checkpoint), "--option", "weight_group_size=100"],
        "no_tokenizer": ["quantize", str(_no_tokenizer(checkpoint, tmp_path)), "--calib", str(calib), "-o", out],
        "bad_report": ["report", str(_write(tmp_path / "r.json", "{not json"))],
        "missing_report": ["report", str(tmp_path / "missing")],
    }[case]
    want = {
        "not_a_folder": "is not a folder", "no_config": "neither config.json", "missing_calib": "no such file",
        "empty_calib": "no non-empty line", "bad_option": "weight_group_size=100 is not allowed",
        "no_tokenizer": "pass --tokenizer FOLDER", "bad_report": "is not a qoq report",
        "missing_report": "no such artifact folder or report file",
    }[case]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"python -m qcompile {args[0]}: error: ") and want in err, err
    assert not (tmp_path / "art").exists()


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _no_tokenizer(checkpoint: Path, tmp_path: Path) -> Path:
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).symlink_to(checkpoint / name)
    return bare


def test_real_artifact_round_trip(checkpoint, calib, tmp_path, capsys):
    """With qcompile.save present: quantize, bench from the artifact (no calibration), report its header."""
    pytest.importorskip("qcompile.artifact")
    out = tmp_path / "art"
    assert cli.main(["quantize", str(checkpoint), "--calib", str(calib), "-o", str(out), *_FAST]) == 0
    result = tmp_path / "bench.json"
    assert cli.main(["bench", str(checkpoint), "--artifact", str(out), "--seq-len", "8", "--iters", "1",
                     "--warmup", "0", "--json", str(result), *_FAST]) == 0
    assert json.loads(result.read_text())["layers_quantized"] == 7
    (out / cli.REPORT_NAME).unlink()  # an artifact saved from Python: the report comes from its qoq.json
    capsys.readouterr()
    assert cli.main(["report", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "model.layers.0.self_attn.q_proj" in shown and "(from artifact)" in shown and "lm_head" in shown


def test_quantize_and_bench_a_diffusers_pipeline(tmp_path, calib, monkeypatch, capsys):
    """A pipeline folder (model_index.json): its UNet is calibrated on the pipeline's own denoising steps."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(32, 32),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       norm_num_groups=8)
    ckpt = tmp_path / "ddpm"
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=20)).save_pretrained(ckpt)
    saved = []
    monkeypatch.setattr(cli, "_save_function", lambda: lambda model, path: saved.append(path) or Path(path).mkdir())
    out = tmp_path / "art"
    assert cli.main(["quantize", str(ckpt), "--calib", str(calib), "-o", str(out), "--steps", "2", "--samples", "1", *_FAST]) == 0
    report = json.loads((out / cli.REPORT_NAME).read_text())
    layers = report["graphs"][0]["layers"]
    assert report["source"]["kind"] == "diffusers" and report["source"]["model_class"] == "UNet2DModel"
    assert sum(layer["quantized"] for layer in layers) >= 20 and any(layer["name"] == "time_embedding.linear_1" for layer in layers)
    result = tmp_path / "bench.json"
    assert cli.main(["bench", str(ckpt), "--iters", "1", "--warmup", "0", "--json", str(result), *_FAST]) == 0
    assert json.loads(result.read_text())["cosine"] > 0.99
