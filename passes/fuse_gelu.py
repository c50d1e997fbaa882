"""Fuse the decomposed GELU (erf and tanh forms) into one standard ``Gelu`` node (opset >= 20).

Matches:   erf form   0.5 * x * (1 + Erf(x / sqrt(2)))   (Div by 1.4142 or Mul by 0.7071);
           tanh form  0.5 * x * (1 + Tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))  (Pow(x, 3) or x*x*x);
           the products x * 0.5 * (1 + ...) in any order and association.
Rewrites:  Gelu(x) (``approximate="tanh"`` for the tanh form). Never com.microsoft ops. Below
           opset 20 an erf form is respelled Mul(Mul(x, 0.5), Add(Erf(Div(x, sqrt2)), 1)), the
           one spelling onnxruntime fuses into its Gelu kernel (7 of the 10 spellings above stay
           five float ops there, about 1.6x slower); the tanh form is kept and counted.
Preserves: the float function.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import onnx_ir as ir

from qpass.graph_utils import add_initializer, is_op, replace_subgraph, unique_name, used_names
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
        taken = used_names(graph)
        for core in cores:
            matched = match_gelu(core)
            if matched is None:
                continue
            x, nodes, out, approximate = matched
            if opset_of(model) < 20:
                if approximate == "tanh":
                    report.skipped["tanh form below opset 20 (Gelu needs 20)"] += 1
                elif not _is_runtime_spelling(nodes, out):
                    _respell_erf_gelu(graph, x, nodes, out, taken)
                    report.rewritten += 1
                continue
            attrs = {"approximate": "tanh"} if approximate == "tanh" else {}
            gelu = ir.node("Gelu", [x], attrs, name=f"{core.name or out.name}_gelu")
            gelu.outputs[0].dtype, gelu.outputs[0].shape = out.dtype or x.dtype, out.shape
            replace_subgraph(graph, nodes, [gelu], out, gelu.outputs[0])
            report.rewritten += 1
        report.modified = report.rewritten > 0
        return report


def _is_runtime_spelling(nodes: list[ir.Node], out: ir.Value) -> bool:
    """Whether an erf GELU already reads Mul(Mul(x, 0.5), Add(Erf(Div(x, sqrt2)), 1))."""
    front, add, last = nodes[0], nodes[2], out.producer()
    return is_op(front, "Div") and [n.op_type for n in nodes] == ["Div", "Erf", "Add", "Mul", "Mul"] and (
        add.outputs[0] in last.inputs and last in nodes
    )


def _respell_erf_gelu(graph: ir.Graph, x: ir.Value, nodes: list[ir.Node], out: ir.Value, taken: set[str]) -> None:
    """Replace ``nodes`` by the erf GELU spelling onnxruntime fuses (see the module docstring)."""
    dtype = x.dtype or out.dtype
    base = nodes[1].name or out.name

    def const(name: str, value: float) -> ir.Value:
        return add_initializer(graph, f"{base}_{name}", np.array(value, dtype=dtype.numpy()), taken=taken)

    div = ir.node("Div", [x, const("sqrt2", math.sqrt(2))], name=f"{base}_div")
    erf = ir.node("Erf", [div.outputs[0]], name=f"{base}_erf")
    add = ir.node("Add", [erf.outputs[0], const("one", 1.0)], name=f"{base}_add")
    half = ir.node("Mul", [x, const("half", 0.5)], name=f"{base}_half")
    mul = ir.node("Mul", [half.outputs[0], add.outputs[0]], name=f"{base}_mul")
    new = [div, erf, add, half, mul]
    for node in new:
        node.outputs[0].dtype, node.outputs[0].shape = dtype, x.shape
        node.outputs[0].name = unique_name(graph, f"{node.name}_out", taken)
    replace_subgraph(graph, nodes, new, out, mul.outputs[0])
