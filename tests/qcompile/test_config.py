"""Options -> QoQConfig: recipes, overrides, and errors that name the key and the allowed values."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from qcompile.config import QoQConfigError, make_config


def test_recipes_and_overrides():
    assert make_config(None).weight_format == "w4a8_progressive"
    cfg = make_config({"recipe": "w4a8"})
    assert cfg.weight_group_size == -1 and cfg.weight_format == "w4a8_per_channel"
    cfg = make_config({"recipe": "w4a8", "weight_group_size": 64, "kernels": "reference", "inductor": False})
    assert (cfg.weight_group_size, cfg.kernels, cfg.inductor) == (64, "reference", False)
    assert make_config({}, mode="max-autotune").mode == "max-autotune"


def test_unknown_key_lists_the_valid_ones():
    with pytest.raises(QoQConfigError, match="unknown qoq option.*'group'.*valid keys are: recipe"):
        make_config({"group": 128})


@pytest.mark.parametrize("key,value", [
    ("weight_group_size", 100), ("weight_group_size", True), ("kernels", "cuda"), ("inductor", "yes"),
    ("mode", "fast"), ("kv_bits", 8), ("skip_layers", "lm_head"), ("protective_range", 127),
])
def test_bad_value_names_the_key(key, value):
    with pytest.raises(QoQConfigError, match=key):
        make_config({key: value})


def test_inductor_config_is_checked_against_inductors_keys():
    cfg = make_config({"inductor_config": {"split_reductions": False, "triton.cudagraphs": True}})
    assert cfg.inductor_config == (("split_reductions", False), ("triton.cudagraphs", True))
    with pytest.raises(QoQConfigError, match=r"inductor_config: \['split_reduction'\] are not"):
        make_config({"inductor_config": {"split_reduction": False}})
    with pytest.raises(QoQConfigError, match="expected a dict"):
        make_config({"inductor_config": ["split_reductions"]})


def test_unknown_and_planned_recipes_are_clear_errors():
    with pytest.raises(QoQConfigError, match="unknown; available recipes"):
        make_config({"recipe": "int3"})


def test_options_reach_the_backend_through_torch_compile():
    torch._dynamo.reset()
    model = nn.Sequential(nn.Linear(8, 8))
    with pytest.raises(Exception, match="unknown qoq option"):
        torch.compile(model, backend="qoq", options={"bogus": 1})(torch.randn(2, 8))


def test_persistent_reduction_numel_is_checked():
    assert make_config({"persistent_reduction_numel": 16384}).persistent_reduction_numel == 16384
    assert make_config({}).persistent_reduction_numel == 16384
    assert make_config({"persistent_reduction_numel": None}).persistent_reduction_numel is None
    for bad in (0, 1.5, "4096", 1 << 20):
        with pytest.raises(QoQConfigError, match="persistent_reduction_numel"):
            make_config({"persistent_reduction_numel": bad})
