"""Fuse the decomposed GELU (erf and tanh forms) into one standard ``Gelu`` node (opset >= 20).

Matches:   erf form   0.5 * x * (1 + Erf(x / sqrt(2)))   (Div by 1.4142 or Mul by 0.7071);
           tanh form  0.5 * x * (1 + Tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))  (Pow(x, 3) or x*x*x);
           the products x * 0.5 * (1 + ...) in any order and association.
Rewrites:  Gelu(x) (``approximate="tanh"`` for the tanh form). Never com.microsoft ops.
Preserves: the float function. Kept and counted: models below opset 20.
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir

from qpass.graph_utils import is_op, replace_subgraph
from qpass.model_io import opset_of
from qpass.op_patterns import match_gelu
from qpass.pass_base import Pass, PassReport

__all__ = ["FuseGeluPass"]


@dataclasses.dataclass
class FuseGeluPass(Pass):
    name = "fuse-gelu"
    preserves_float = True

    def call(self, model: ir.Model) -> PassReport:
        report = PassReport(model, False)
        graph = model.graph
        cores = [n for n in graph if is_op(n, "Erf", "Tanh")]
        for core in cores:
            matched = match_gelu(core)
            if matched is None:
                continue
            if opset_of(model) < 20:
                report.skipped["opset < 20 (Gelu needs 20)"] += 1
                continue
            x, nodes, out, approximate = matched
            attrs = {"approximate": "tanh"} if approximate == "tanh" else {}
            gelu = ir.node("Gelu", [x], attrs, name=f"{core.name or out.name}_gelu")
            gelu.outputs[0].dtype, gelu.outputs[0].shape = out.dtype or x.dtype, out.shape
            replace_subgraph(graph, nodes, [gelu], out, gelu.outputs[0])
            report.rewritten += 1
        report.modified = report.rewritten > 0
        return report
