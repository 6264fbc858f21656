"""FP linears -> `torch.ops.qoq.*` calls, with the packed weights as graph constants."""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

import lowering  # noqa: F401  (registers torch.ops.qoq.*)
from passes.match import is_2d_transpose
from passes.quantize import LayerDecision
from qcompile.capture import QGraph
from qcompile.config import QoQConfig


def out_dtype_of(node: fx.Node, x: fx.Node) -> torch.dtype:
    for n in (node, x):
        val = n.meta.get("example_value") if isinstance(n, fx.Node) else None
        if isinstance(val, torch.Tensor):
            return val.dtype
    return torch.float32


def lower_w4a8_linear(qgraph: QGraph, decision: LayerDecision, config: QoQConfig) -> fx.Node:
    """Replace one linear by per-token int8 quantization of its input and the W4A8 GEMM."""
    m, qw = decision.match, decision.qweight
    graph = qgraph.gm.graph
    node = m.node
    consts = {k: qgraph.add_constant(f"{m.fqn}.{k}", v, before=node) for k, v in qw.tensors().items()}
    out_dtype = out_dtype_of(node, m.x)
    with graph.inserting_before(node):
        quant = graph.call_function(torch.ops.qoq.quantize_act_int8.default, (m.x, config.kernels))
        x8, sx, xsum = (graph.call_function(operator.getitem, (quant, i)) for i in range(3))
        y = graph.call_function(
            torch.ops.qoq.w4a8_gemm.default,
            (x8, sx, xsum, consts["qweight"], consts["wscale"], consts.get("gscale"), consts["gzero"],
             m.bias, out_dtype, config.kernels),
        )
    y.meta.update({k: v for k, v in node.meta.items() if k in ("stack_trace", "nn_module_stack", "source_fn_stack")})
    node.replace_all_uses_with(y)
    operand = node.args[2] if node.target is torch.addmm else (node.args[1] if len(node.args) > 1 else None)
    graph.erase_node(node)
    # A transpose that fed only this layer is dead now.
    if isinstance(operand, fx.Node) and not operand.users and is_2d_transpose(operand) is not None:
        graph.erase_node(operand)
    return y
