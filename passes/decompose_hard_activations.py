"""Spell HardSwish and HardSigmoid with Add, Clip and Mul, ops onnxruntime runs on integers.

Matches:   HardSigmoid(x; alpha > 0, beta) and HardSwish(x) (= x * HardSigmoid(x; 1/6, 1/2)) on a
           floating-point tensor, at opset >= 11 (Clip with bound inputs).
Rewrites:  HardSigmoid(x) -> Mul(Clip(Add(x, beta/alpha), 0, 1/alpha), alpha);
           HardSwish(x)   -> Mul(x, that). Quantized, the Add becomes a QLinearAdd whose uint8
           saturation is the Clip, the product by the positive constant alpha becomes a rescaled
           DequantizeLinear of the same codes (``insert-qdq``), and the last Mul a QLinearMul:
           onnxruntime has no integer HardSwish/HardSigmoid kernel, so without this the
           activation runs in float between a DequantizeLinear and a QuantizeLinear.
Preserves: the float function (to float32 rounding: alpha*clip(x + beta/alpha, 0, 1/alpha)).
           Run it in quantizing recipes only: in float, three or four ops replace one.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from qpass.graph_utils import add_initializer, is_op, replace_subgraph, unique_name, used_names
from qpass.model_io import opset_of
from qpass.pass_base import Pass, PassReport

__all__ = ["DecomposeHardActivationsPass"]

_HARDSWISH = (1.0 / 6.0, 0.5)  # HardSwish(x) = x * HardSigmoid(x; alpha=1/6, beta=1/2)


@dataclasses.dataclass
class DecomposeHardActivationsPass(Pass):
    name = "decompose-hard-activations"
    preserves_float = True

    def call(self, model: ir.Model) -> PassReport:
        report = PassReport(model, False)
        graph = model.graph
        taken = used_names(graph)
        for node in [n for n in graph if is_op(n, "HardSwish", "HardSigmoid")]:
            x, out = node.inputs[0], node.outputs[0]
            if x is None or x.dtype is None or not x.dtype.is_floating_point():
                report.skipped[f"{node.op_type} input type unknown"] += 1
                continue
            if opset_of(model) < 11:
                report.skipped["opset < 11 (Clip bound inputs)"] += 1
                continue
            if node.op_type == "HardSwish":
                alpha, beta = _HARDSWISH
            else:
                alpha, beta = node.attributes.get_float("alpha", 0.2), node.attributes.get_float("beta", 0.5)
            if not alpha > 0:
                report.skipped["HardSigmoid with alpha <= 0"] += 1
                continue
            dtype = x.dtype.numpy()
            base = node.name or out.name

            def constant(suffix: str, v: float) -> ir.Value:
                return add_initializer(graph, f"{base}_{suffix}", np.array(v, dtype), taken=taken)

            def op(op_type: str, inputs: list[ir.Value], suffix: str) -> ir.Node:
                new = ir.node(op_type, inputs, name=f"{base}_{suffix}")
                new.outputs[0].name = unique_name(graph, f"{base}_{suffix}", taken)
                new.outputs[0].dtype, new.outputs[0].shape = out.dtype or x.dtype, x.shape
                return new

            shifted = op("Add", [x, constant("offset", beta / alpha)], "shifted")
            clipped = op("Clip", [shifted.outputs[0], constant("min", 0.0), constant("max", 1.0 / alpha)], "clipped")
            gate = op("Mul", [clipped.outputs[0], constant("alpha", alpha)], "gate")
            nodes = [shifted, clipped, gate]
            if node.op_type == "HardSwish":
                nodes.append(op("Mul", [x, gate.outputs[0]], "hardswish"))
            replace_subgraph(graph, [node], nodes, out, nodes[-1].outputs[0])
            report.rewritten += 1
        report.modified = report.rewritten > 0
        return report
