"""`match` finds linears however Dynamo spells them, with the right weight orientation and bias."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from passes.match import find_linears
from qcompile.capture import capture


def _capture(model, *args):
    seen = {}

    def backend(gm, example_inputs, **kw):
        seen["qgraph"] = capture(gm, example_inputs)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(model, backend=backend, fullgraph=True)(*args)
    return seen["qgraph"]


class Spellings(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(16, 24)
        self.b = nn.Parameter(torch.randn(32, 24))  # [out, in], used as x @ b.t()
        self.c = nn.Parameter(torch.randn(32, 20))  # [out, in], used as x @ c.T
        self.d = nn.Parameter(torch.randn(20, 12))  # GPT-2 Conv1D style: [in, out]
        self.d_bias = nn.Parameter(torch.randn(12))
        self.e = nn.Parameter(torch.randn(12, 8))  # [in, out], x @ e

    def forward(self, x):
        x = F.relu(self.a(x))
        x = torch.matmul(x, self.b.t())[..., :20]
        x = x @ self.c.T
        x = torch.addmm(self.d_bias, x[..., :20].reshape(-1, 20), self.d)
        return x @ self.e


def test_every_spelling_is_found_with_its_orientation():
    qg = _capture(Spellings(), torch.randn(5, 16))
    found = {m.fqn: m for m in find_linears(qg)}
    assert set(found) == {"a", "b", "c", "d", "e"}
    assert [found[k].weight_transposed for k in "abcde"] == [False, False, False, True, True]
    assert found["a"].bias is not None and found["d"].bias is not None and found["b"].bias is None
    assert found["d"].weight_shape == (12, 20) and found["e"].in_features == 12


def test_runtime_inputs_are_not_weights():
    def f(x, w):
        return F.linear(x, w)

    qg = _capture(f, torch.randn(3, 8), torch.randn(4, 8))
    assert find_linears(qg) == []


def test_fqn_is_parsed_from_sources():
    from qcompile.capture import fqn_from_source

    assert fqn_from_source("L['self']._modules['model']._modules['layers']._modules['0']._parameters['weight']") == "model.layers.0.weight"
    assert fqn_from_source("L['fn']._modules['2']._buffers['scale']") == "2.scale"
    assert fqn_from_source("L['args'][0]") is None
    # transformers >= 5.25 wraps forward in a decorator taking *args: the module is L['args'][0]
    assert fqn_from_source("L['args'][0]._modules['model']._modules['layers']._modules['0']._parameters['weight']") == (
        "model.layers.0.weight")
    # an index is stripped only off the *args tuple: a module list's child keeps its index
    assert fqn_from_source("L['self']._modules['layers'][1]._parameters['weight']") == "layers.1.weight"
