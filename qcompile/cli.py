"""The command line: `quantize` a local transformers or diffusers checkpoint into an artifact,
`report` an artifact, `bench` a checkpoint against its FP (bf16 on a GPU) self.

Every failure the user can fix exits with status 2 and one line naming the cause and the fix.
"""
from __future__ import annotations

import argparse
import ast
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

log = logging.getLogger("qoq")
REPORT_NAME = "report.json"  # written beside the artifact's own files by `quantize`


class CLIError(Exception):
    """A problem with the command line's inputs; main() prints it and exits with status 2."""


# -- arguments --------------------------------------------------------------------------------------
def _parse_option(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--option {text!r}: expected KEY=VALUE, e.g. --option weight_group_size=64")
    key, raw = text.split("=", 1)
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw  # a bare word is a string: --option kernels=reference
    return key.strip(), value


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-v", "--verbose", action="count", default=0, help="log what qoq does (-v info, -vv debug)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars (also: QOQ_QUIET=1)")
    p.add_argument("--debug-dir", help="dump each pass's graph before/after into this folder (also: QOQ_DEBUG_DIR)")


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="local folder: a transformers model (config.json) or a diffusers pipeline (model_index.json)")
    p.add_argument("--recipe", default=None, help="qoq recipe (default: the backend's default); see the README's table")
    p.add_argument("--option", dest="options", action="append", type=_parse_option, default=[], metavar="KEY=VALUE",
                   help="any other backend option, repeatable, e.g. --option weight_group_size=64 --option inductor=False")
    p.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when available)")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None,
                   help="weights and activations (default: bf16 on a GPU, fp32 on the CPU)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder when the checkpoint has none (transformers)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m qcompile",
        description="qoq: run models in 4 bits through torch.compile. Quantize a checkpoint, read an artifact's report, "
                    "or benchmark against FP.")
    sub = parser.add_subparsers(dest="command", metavar="{quantize,report,bench}")
    sub.required = True

    q = sub.add_parser("quantize", help="calibrate and quantize a local checkpoint into an artifact folder",
                       description="Load a local checkpoint, calibrate on text (LLMs) or prompts (diffusers pipelines) "
                                   "from a file, compile with backend='qoq', and save the artifact with qcompile.save.")
    _add_model(q)
    _add_common(q)
    q.add_argument("--calib", required=True, help="UTF-8 text file: one calibration text (or prompt) per non-empty line")
    q.add_argument("-o", "--output", required=True, help="artifact folder to write")
    q.add_argument("--samples", type=int, default=32, help="number of calibration lines used (default 32)")
    q.add_argument("--seq-len", type=int, default=512, help="tokens per calibration text, LLMs (default 512)")
    q.add_argument("--steps", type=int, default=4, help="denoising steps per prompt, diffusers (default 4)")

    r = sub.add_parser("report", help="print what an artifact holds: per layer format, group, SQNR; FP layers with the reason",
                       description="Print the report saved with an artifact (or a report JSON file).")
    r.add_argument("artifact", help="artifact folder written by `quantize` / qcompile.save, or a report JSON file")
    r.add_argument("--json", action="store_true", help="print JSON instead of the table")
    _add_common(r)

    b = sub.add_parser("bench", help="time a checkpoint's forward pass: FP vs backend='qoq', with the output error",
                       description="Time the model's forward on random tokens (LLMs) or captured denoiser inputs "
                                   "(diffusers): FP eager, and torch.compile(backend='qoq'); print ms, speed-up and cosine.")
    _add_model(b)
    _add_common(b)
    b.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    b.add_argument("--seq-len", type=int, default=128, help="tokens per sequence, LLMs (default 128)")
    b.add_argument("--iters", type=int, default=10, help="timed iterations (median reported, default 10)")
    b.add_argument("--warmup", type=int, default=2, help="untimed iterations after compiling (default 2)")
    b.add_argument("--artifact", default=None, help="compile from this artifact instead of calibrating")
    b.add_argument("--json", dest="json_out", default=None, help="also write the results to this JSON file")
    return parser


# -- models -----------------------------------------------------------------------------------------
def _torch_setup(args) -> tuple[Any, Any]:
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CLIError(f"--device {device}: no CUDA device is visible; use --device cpu")
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    dtype = dtypes[args.dtype] if args.dtype else (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    return torch.device(device), dtype


def checkpoint_kind(path: str) -> str:
    """'diffusers' (model_index.json) or 'transformers' (config.json); CLIError otherwise."""
    p = Path(path)
    if not p.is_dir():
        raise CLIError(f"checkpoint {path!r} is not a folder; give a local transformers or diffusers checkpoint folder "
                       "(this command does not download)")
    if (p / "model_index.json").is_file():
        return "diffusers"
    if (p / "config.json").is_file():
        return "transformers"
    raise CLIError(f"checkpoint {path!r} has neither config.json (transformers) nor model_index.json (diffusers)")


def load_transformers(args, device, dtype):
    """The causal LM (else the base model) and its tokenizer; CLIError when either cannot load."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    tokenizer, tok_error = None, None
    try:  # first: a missing tokenizer should fail before a large model loads
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.checkpoint)
    except (OSError, ValueError, TypeError) as e:
        tok_error = e
    if tokenizer is None and getattr(args, "command", "") == "quantize":
        raise CLIError(f"no tokenizer loads from {args.tokenizer or args.checkpoint!r} ({type(tok_error).__name__}); "
                       "pass --tokenizer FOLDER with the model's tokenizer files")
    try:
        model = AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=dtype)
    except ValueError:  # not a causal LM: its base model still has the linears to quantize
        model = AutoModel.from_pretrained(args.checkpoint, dtype=dtype)
    except OSError as e:
        raise CLIError(f"checkpoint {args.checkpoint!r} cannot be loaded by transformers: {e}") from e
    return model.to(device).eval(), tokenizer


def load_diffusers(args, device, dtype):
    """The pipeline and its denoiser (transformer or unet); CLIError when neither is there."""
    from diffusers import DiffusionPipeline

    try:
        pipe = DiffusionPipeline.from_pretrained(args.checkpoint, torch_dtype=dtype)
    except (OSError, ValueError) as e:
        raise CLIError(f"checkpoint {args.checkpoint!r} cannot be loaded by diffusers: {e}") from e
    pipe = pipe.to(device)
    name = "transformer" if getattr(pipe, "transformer", None) is not None else "unet"
    denoiser = getattr(pipe, name, None)
    if denoiser is None:
        raise CLIError(f"pipeline {type(pipe).__name__} has no transformer or unet to quantize")
    pipe.set_progress_bar_config(disable=True)
    return pipe, name, denoiser.eval()


def read_lines(path: str, limit: int) -> list[str]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise CLIError(f"--calib {path!r}: no such file; give a UTF-8 text file, one calibration text per line") from e
    except UnicodeDecodeError as e:
        raise CLIError(f"--calib {path!r} is not UTF-8 text ({e.reason} at byte {e.start})") from e
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise CLIError(f"--calib {path!r} has no non-empty line; put one calibration text (or prompt) per line")
    if limit < 1:
        raise CLIError(f"--samples {limit}: expected at least 1")
    return lines[:limit]


def text_batches(tokenizer, lines: list[str], seq_len: int, device) -> list[dict]:
    """One batch per line: the tokenized text, truncated to `seq_len` tokens."""
    if seq_len < 1:
        raise CLIError(f"--seq-len {seq_len}: expected at least 1")
    out = []
    for line in lines:
        enc = tokenizer(line, return_tensors="pt", truncation=True, max_length=seq_len)
        if enc["input_ids"].shape[1] == 0:
            continue
        out.append({"input_ids": enc["input_ids"].to(device)})
    if not out:
        raise CLIError("the tokenizer turned every calibration line into zero tokens")
    return out


def denoiser_batches(pipe, denoiser, prompts: list[str], steps: int) -> list[dict]:
    """The denoiser's inputs at every step of the pipeline run on each prompt (keyword form)."""
    import inspect

    import torch

    captured: list[dict] = []
    params = list(inspect.signature(denoiser.forward).parameters)

    def grab(module, args, kwargs):
        named = dict(zip(params, args))
        named.update(kwargs)
        captured.append({k: (v.detach().clone() if isinstance(v, torch.Tensor) else v) for k, v in named.items()})

    handle = denoiser.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        from qcompile.progress import progress

        takes_prompt = "prompt" in inspect.signature(pipe.__call__).parameters
        with torch.no_grad():
            for i, prompt in enumerate(progress(prompts, desc="run pipeline")):
                gen = torch.Generator().manual_seed(i)
                if takes_prompt:
                    pipe(prompt, num_inference_steps=steps, output_type="latent", generator=gen)
                else:  # an unconditional pipeline: one sample per line, the line itself unused
                    pipe(num_inference_steps=steps, output_type="np", generator=gen)
    finally:
        handle.remove()
    return captured


def _options(args, extra: Optional[dict] = None) -> dict:
    opts = dict(args.options)
    if args.recipe is not None:
        opts["recipe"] = args.recipe
    if args.debug_dir:
        opts["debug_dir"] = args.debug_dir
    if args.quiet:
        opts["quiet"] = True
    opts.update(extra or {})
    from qcompile.config import make_config

    make_config({k: v for k, v in opts.items() if k != "artifact"})  # a bad option fails before the slow load
    return opts


def _call(model, batch):
    return model(**batch) if isinstance(batch, dict) else model(batch)


# -- commands ---------------------------------------------------------------------------------------
def cmd_quantize(args) -> int:
    import torch

    import qcompile

    opts = _options(args)
    lines = read_lines(args.calib, args.samples)
    device, dtype = _torch_setup(args)
    kind = checkpoint_kind(args.checkpoint)
    if kind == "transformers":
        model, tokenizer = load_transformers(args, device, dtype)
        batches = text_batches(tokenizer, lines, args.seq_len, device)
        target = model
    else:
        pipe, name, target = load_diffusers(args, device, dtype)
        batches = denoiser_batches(pipe, target, lines, args.steps)
    log.info("qoq: calibrating %s on %d batches", type(target).__name__, len(batches))
    stats = qcompile.calibrate(target, batches, {k: v for k, v in opts.items() if k != "artifact"},
                               progress=not args.quiet)
    compiled = torch.compile(target, backend="qoq", options={**opts, "calibration": stats})
    with torch.no_grad():
        # Compile on a calibration batch: the artifact records what this compile quantized.
        _call(compiled, batches[0])
    rep = qcompile.report(compiled)
    save = _save_function()
    save(compiled, args.output)
    out = Path(args.output)
    meta = {"checkpoint": os.path.abspath(args.checkpoint), "kind": kind, "model_class": type(target).__name__,
            "options": {k: v for k, v in opts.items() if k not in ("calibration", "debug_dir", "quiet")},
            "calibration": {"file": os.path.abspath(args.calib), "lines": len(lines)}}
    (out / REPORT_NAME).write_text(json.dumps({**rep.to_dict(), "source": meta}, default=str, indent=1))
    print(rep)
    linears = [layer for layer in rep.layers if layer.kind != "other"]  # conv/fused weights are listed, not counted
    q = sum(layer.quantized for layer in linears)
    print(f"\nwrote {out} ({q} of {len(linears)} layers quantized); compile from it with "
          f"options={{'artifact': {str(out)!r}}}")
    return 0


def _save_function():
    """`qcompile.save` (qcompile/artifact.py), imported only when it is needed."""
    try:
        from qcompile.artifact import save
    except ImportError as e:
        raise CLIError(f"this qoq cannot save artifacts (qcompile.artifact is missing: {e}); update qoq") from e
    return save


def load_report(path: str) -> tuple["Any", dict]:
    """(Report, source metadata) from an artifact folder's report.json or a report JSON file."""
    from qcompile.reporting import Report

    p = Path(path)
    file = p / REPORT_NAME if p.is_dir() else p
    if not file.is_file():
        if p.is_dir():
            return _report_from_header(p), {}
        raise CLIError(f"{path!r}: no such artifact folder or report file")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CLIError(f"{str(file)!r} is not a qoq report (JSON error: {e}); run `python -m qcompile quantize` again") from e
    if not isinstance(data, dict) or "graphs" not in data:
        raise CLIError(f"{str(file)!r} is not a qoq report (no 'graphs' key)")
    return Report.from_dict(data), data.get("source", {})


def _report_from_header(folder: Path):
    """An artifact saved by qcompile.save without the CLI: the layers its qoq.json lists (no SQNR)."""
    from qcompile.reporting import Report
    from runtime.registry import GraphRecord, LayerRecord

    try:
        from runtime.artifact import ArtifactError, read_header
    except ImportError as e:
        raise CLIError(f"{str(folder)!r} has no {REPORT_NAME} and this qoq cannot read artifacts ({e})") from e
    try:
        header = read_header(str(folder))
    except ArtifactError as e:
        raise CLIError(str(e)) from e
    g = GraphRecord(graph_id=0, recipe=str(header["config"].get("recipe", "?")))
    for fqn, layer in sorted(header["layers"].items()):
        g.layers.append(LayerRecord(name=fqn, kind="linear", shape=tuple(layer.get("shape", ())), quantized=True,
                                    format=layer.get("format", "?"), group_size=layer.get("group_size"),
                                    kernel="(from artifact)"))
    for fqn, why in sorted(header["skipped"].items()):
        g.layers.append(LayerRecord(name=fqn, kind="linear", shape=(), quantized=False, reason=why))
    return Report([g])


def cmd_report(args) -> int:
    rep, source = load_report(args.artifact)
    if args.json:
        print(json.dumps({**rep.to_dict(), "source": source}, default=str, indent=1))
        return 0
    if source:
        print(f"artifact of {source.get('model_class', '?')} from {source.get('checkpoint', '?')} "
              f"(options {source.get('options', {})})")
    print(rep)
    fp = rep.fp_layers
    if fp:
        reasons: dict[str, int] = {}
        for layer in fp:
            reasons[layer.reason] = reasons.get(layer.reason, 0) + 1
        print("\nleft in FP:")
        for why, n in sorted(reasons.items(), key=lambda kv: -kv[1]):
            print(f"  {n:4d} x {why}")
    return 0


def _median_ms(fn, iters: int, warmup: int, device) -> float:
    import statistics

    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(iters, 1)):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _first_tensor(out):
    import torch

    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "sample", "last_hidden_state"):
        value = getattr(out, key, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise CLIError(f"bench: cannot find the output tensor in a {type(out).__name__}")


def cmd_bench(args) -> int:
    import torch

    import qcompile

    extra = {"artifact": args.artifact} if args.artifact else {}
    opts = _options(args, extra)
    device, dtype = _torch_setup(args)
    kind = checkpoint_kind(args.checkpoint)
    if kind == "transformers":
        model, _ = load_transformers(args, device, dtype)
        vocab = getattr(model.config, "vocab_size", None) or 32000
        gen = torch.Generator().manual_seed(0)
        batch = {"input_ids": torch.randint(0, vocab, (args.batch, args.seq_len), generator=gen).to(device)}
        if hasattr(model.config, "use_cache"):
            batch["use_cache"] = False
        target = model
    else:
        pipe, _, target = load_diffusers(args, device, dtype)
        batch = denoiser_batches(pipe, target, ["a photo of a cat"], 1)[0]
    with torch.no_grad():
        ref = _first_tensor(_call(target, batch)).float()
        fp_ms = _median_ms(lambda: _call(target, batch), args.iters, args.warmup, device)
        compiled = torch.compile(target, backend="qoq", options=opts)
        t0 = time.perf_counter()
        out = _first_tensor(_call(compiled, batch)).float()
        compile_s = time.perf_counter() - t0
        q_ms = _median_ms(lambda: _call(compiled, batch), args.iters, args.warmup, device)
    cos = float(torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0))
    rel = float((out - ref).norm() / ref.norm().clamp_min(1e-30))
    rep = qcompile.report(compiled)
    linears = [layer for layer in rep.layers if layer.kind != "other"]  # conv/fused weights are listed, not counted
    q = sum(layer.quantized for layer in linears)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    result = {"model": type(target).__name__, "checkpoint": os.path.abspath(args.checkpoint), "device": name,
              "dtype": str(dtype).replace("torch.", ""), "batch": args.batch,
              "seq_len": args.seq_len if kind == "transformers" else None,
              "fp_ms": fp_ms, "qoq_ms": q_ms, "speedup": fp_ms / q_ms if q_ms else None, "compile_s": compile_s,
              "cosine": cos, "rel_error": rel, "layers_quantized": q, "layers": len(linears),
              "options": {k: v for k, v in opts.items() if k not in ("debug_dir", "quiet")}}
    print(f"{'model':<24} {'device':<24} {'dtype':<8} {'FP ms':>9} {'qoq ms':>9} {'speed-up':>8} {'cosine':>8} "
          f"{'rel err':>8} {'quantized':>9}")
    print(f"{result['model']:<24} {name[:24]:<24} {result['dtype']:<8} {fp_ms:9.3f} {q_ms:9.3f} "
          f"{result['speedup']:7.2f}x {cos:8.4f} {rel:8.4f} {q:>4}/{len(linears):<4}")
    print(f"(median of {args.iters}; first qoq call incl. compile {compile_s:.1f} s)")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=1, default=str))
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from qcompile.debug import configure_logging

    if args.verbose:
        configure_logging(logging.DEBUG if args.verbose > 1 else logging.INFO)
    elif os.environ.get("QOQ_LOG"):
        configure_logging()
    if args.quiet:
        os.environ["QOQ_QUIET"] = "1"  # the helpers read it: bars inside other modules go quiet too
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        except ImportError:
            pass
    commands = {"quantize": cmd_quantize, "report": cmd_report, "bench": cmd_bench}
    from qcompile.config import QoQConfigError
    from qcompile.fallback import QoQUserError

    try:
        return commands[args.command](args)
    except (CLIError, QoQConfigError, QoQUserError) as e:
        print(f"python -m qcompile {args.command}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        # Dynamo wraps backend errors (BackendCompilerFailed): show the user's error underneath.
        inner = e
        while getattr(inner, "inner_exception", None) is not None or (inner.__cause__ is not None and inner is not inner.__cause__):
            inner = getattr(inner, "inner_exception", None) or inner.__cause__
            if isinstance(inner, (CLIError, QoQConfigError, QoQUserError)) or type(inner).__name__ == "ArtifactError":
                print(f"python -m qcompile {args.command}: error: {inner}", file=sys.stderr)
                return 2
        if type(e).__name__ == "ArtifactError":
            print(f"python -m qcompile {args.command}: error: {e}", file=sys.stderr)
            return 2
        raise
