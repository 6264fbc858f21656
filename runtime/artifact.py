"""What one compile quantized, as data (ArtifactData), and its on-disk form: a folder holding
`qoq.json` (version, config, layers, SHA-256 of the tensors) and `weights.safetensors`.

Records are kept per parameter (weakly), so `qcompile.save(model)` finds them from the model and a
recompile after the FP weights were released can replay them instead of quantizing again.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch.utils.weak import WeakIdKeyDictionary

FORMAT_NAME = "qoq-artifact"
VERSION = 3
# Version 1 (W4A8 layers only) reads as version 3 with no shared inputs, version 2 with no weight
# copies. An older qoq must refuse version 3: replaying it without the weight copies would run a tied
# lm_head on the rotated embedding, silently wrong.
READABLE_VERSIONS = (1, 2, 3)
JSON_NAME = "qoq.json"
TENSORS_NAME = "weights.safetensors"


class ArtifactError(ValueError):
    """An artifact that cannot be saved or does not fit the model; the message says why and what to do."""


@dataclass
class ArtifactData:
    """Everything a graph's passes produced from the weights, keyed by module / weight FQN.

    - `layers[fqn]`: a quantized linear: format, group size, the weight's FQN, shape and layout,
      the tensors its GEMM reads (`tensors` role -> key), and the ops applied to its input before
      quantization (`input_ops`: [kind, key] in order, kind "mul" or "index_select"). `op` says
      which rewrite: "w4a8" (absent in version 1: per-layer `qoq.quantize_act_int8` +
      `qoq.w4a8_gemm`), "w4a4_lowrank" / "w4a8_lowrank" (SVDQuant: the GEMM reads the shared
      input `input`, a key of `inputs`), "weight_override" (a new FP weight value, in `overrides`).
    - `inputs[stem]`: one activation quantization shared by SVDQuant linears that read the same
      input: `op` ("w4a4_quantize_act" or "quantize_act_int8"), its constants (`tensors`:
      smooth_inv, l_down, shift) and its `layers` in graph order.
    - `skipped[fqn]`: a linear left in FP and why.
    - `overrides[weight_fqn]`: key of a new FP value a pass gave a weight (a folded norm weight).
    - `weight_copies[fqn]`: key of the weight an FP linear reads instead of its parameter, which a
      pass gave it because the parameter is shared (a tied lm_head, rotated apart from the embedding).
    """

    config: dict[str, Any]
    layers: dict[str, dict] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    overrides: dict[str, str] = field(default_factory=dict)
    inputs: dict[str, dict] = field(default_factory=dict)
    weight_copies: dict[str, str] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    unsaveable: str = ""  # why this graph's rewrite cannot be replayed ('' when it can)
    _on_device: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)

    def merge(self, other: "ArtifactData") -> None:
        """Take `other`'s entries (a later graph wins: its layers and the norms folded into them agree)."""
        if other.unsaveable or self.unsaveable:
            self.unsaveable = self.unsaveable or other.unsaveable
            return
        if other.config != self.config:
            raise ArtifactError(
                f"the model was compiled with two different qoq configs ({self.config} and {other.config}); "
                "save needs one: compile the model with one set of options"
            )
        self.layers.update(other.layers)
        self.inputs.update(other.inputs)
        self.skipped.update(other.skipped)
        self.overrides.update(other.overrides)
        self.weight_copies.update(other.weight_copies)
        self.tensors.update(other.tensors)

    def tensor(self, key: str, device: torch.device) -> torch.Tensor:
        """The tensor `key` on `device`, moved once per device (recompiles share it, no second copy)."""
        t = self.tensors[key]
        if t.device == torch.device(device):
            return t
        cache = self._on_device.setdefault(str(device), {})
        if key not in cache:
            cache[key] = t.to(device)
        return cache[key]

    def header(self) -> dict:
        return {"format": FORMAT_NAME, "version": VERSION, "config": self.config, "layers": self.layers,
                "skipped": self.skipped, "overrides": self.overrides, "inputs": self.inputs,
                "weight_copies": self.weight_copies}


# -- records kept while the model lives ------------------------------------------------------------
_ORDER = itertools.count()
# parameter -> [(order, ArtifactData, the parameter's version counter when it was recorded)]
_BY_PARAM: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _version_of(t: torch.Tensor) -> int:
    """The tensor's in-place update counter; -1 for inference tensors, which keep none."""
    try:
        return t._version
    except RuntimeError:
        return -1


def remember(data: ArtifactData, params: list[torch.Tensor]) -> None:
    order = next(_ORDER)
    for p in params:
        _BY_PARAM.setdefault(p, []).append((order, data, _version_of(p)))


def records_for(params, unchanged: bool = False) -> Optional[ArtifactData]:
    """All records reading any of `params`, merged in compile order; None if there are none.

    `unchanged=True` keeps only records made while every one of `params` they read held the values
    it holds now (its version counter has not moved: no in-place update such as load_state_dict)."""
    seen: dict[int, ArtifactData] = {}
    stale: set[int] = set()
    for p in params:
        for order, data, version in _BY_PARAM.get(p, []):
            seen[order] = data
            if _version_of(p) != version:
                stale.add(order)
    if unchanged:
        seen = {order: data for order, data in seen.items() if order not in stale}
    if not seen:
        return None
    # The latest compile's config decides: records of an earlier compile with other options are stale.
    config = seen[max(seen)].config
    merged = ArtifactData(config=dict(config))
    for order in sorted(seen):
        if seen[order].config == config:
            merged.merge(seen[order])
    return merged


# -- disk -------------------------------------------------------------------------------------------
def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def write(data: ArtifactData, path: str) -> None:
    """Write `data` to the folder `path` (created; files in it replaced)."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    tensors_path = os.path.join(path, TENSORS_NAME)
    cpu, seen = {}, set()
    for k, v in data.tensors.items():
        v = v.detach().to("cpu").contiguous()
        # safetensors refuses shared storage (q/k/v read one reorder permutation): store copies.
        if v.untyped_storage().data_ptr() in seen:
            v = v.clone()
        seen.add(v.untyped_storage().data_ptr())
        cpu[k] = v
    save_file(cpu, tensors_path, metadata={"format": FORMAT_NAME, "version": str(VERSION)})
    header = data.header()
    header["tensors_sha256"] = _sha256(tensors_path)
    tmp = os.path.join(path, JSON_NAME + ".tmp")
    with open(tmp, "w") as f:
        json.dump(header, f, indent=1, sort_keys=True)
    os.replace(tmp, os.path.join(path, JSON_NAME))  # the JSON last: a half-written artifact has none


def read_header(path: str) -> dict:
    """The JSON part of the artifact at `path`, with its format and version checked."""
    json_path = os.path.join(path, JSON_NAME)
    if not os.path.isfile(json_path):
        raise ArtifactError(f"option artifact={path!r}: no {JSON_NAME} there; give the folder qcompile.save(model, path) wrote")
    try:
        with open(json_path) as f:
            header = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"artifact {path!r}: {JSON_NAME} is corrupted ({e}); save the artifact again") from e
    if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
        raise ArtifactError(f"artifact {path!r}: {JSON_NAME} is not a qoq artifact (format field missing or wrong)")
    if header.get("version") not in READABLE_VERSIONS:
        raise ArtifactError(
            f"artifact {path!r} has version {header.get('version')!r}; this qoq reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}. "
            "Save it again with this qoq (compile from the FP model, then qcompile.save)"
        )
    if header["version"] == 1:
        header.setdefault("inputs", {})
    if header["version"] in (1, 2):
        header.setdefault("weight_copies", {})
    for key in ("config", "layers", "skipped", "overrides", "inputs", "weight_copies", "tensors_sha256"):
        if key not in header:
            raise ArtifactError(f"artifact {path!r}: {JSON_NAME} lacks the field {key!r}; save the artifact again")
    return header


_LOADED: dict[str, tuple[tuple, ArtifactData]] = {}


def load(path: str) -> ArtifactData:
    """Read and verify the artifact at `path` (once per file version: recompiles reuse it)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = os.path.abspath(path)
    header = read_header(path)
    tensors_path = os.path.join(path, TENSORS_NAME)
    if not os.path.isfile(tensors_path):
        raise ArtifactError(f"artifact {path!r}: {TENSORS_NAME} is missing; save the artifact again")
    st = os.stat(tensors_path)
    # The header is part of the stamp: a rewritten qoq.json over the same tensors is another artifact.
    stamp = (st.st_size, st.st_mtime_ns, json.dumps(header, sort_keys=True))
    hit = _LOADED.get(path)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    if _sha256(tensors_path) != header["tensors_sha256"]:
        raise ArtifactError(
            f"artifact {path!r}: {TENSORS_NAME} does not match the checksum in {JSON_NAME} (corrupted or "
            "replaced); save the artifact again"
        )
    try:
        tensors = load_file(tensors_path)
    except (SafetensorError, OSError, RuntimeError) as e:
        raise ArtifactError(f"artifact {path!r}: {TENSORS_NAME} cannot be read ({e}); save the artifact again") from e
    data = ArtifactData(config=header["config"], layers=header["layers"], skipped=header["skipped"],
                        overrides=header["overrides"], inputs=header["inputs"],
                        weight_copies=header["weight_copies"], tensors=tensors)
    wanted = {k for layer in data.layers.values() for k in layer["tensors"].values()}
    wanted |= {k for layer in data.layers.values() for _, k in layer["input_ops"]}
    wanted |= {k for shared in data.inputs.values() for k in shared["tensors"].values()}
    wanted |= set(data.overrides.values()) | set(data.weight_copies.values())
    missing = sorted(wanted - set(tensors))
    if missing:
        raise ArtifactError(f"artifact {path!r}: tensors {missing[:5]} named in {JSON_NAME} are missing; save the artifact again")
    _LOADED[path] = (stamp, data)
    return data
