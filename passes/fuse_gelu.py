"""Fuse the decomposed GELU (erf and tanh forms) into one standard ``Gelu`` node (opset >= 20).

Matches:   erf form   0.5 * x * (1 + Erf(x / sqrt(2)))   (Div by 1.4142 or Mul by 0.7071);
           tanh form  0.5 * x * (1 + Tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))  (Pow(x, 3) or x*x*x);
           the products x * 0.5 * (1 + ...) in any order and association.
Rewrites:  Gelu(x) (``approximate="tanh"`` for the tanh form). Never com.microsoft ops.
Preserves: the float function. Kept and counted: models below opset 20.
"""

from __future__ import annotations

import dataclasses
import math

import onnx_ir as ir

from qpass.graph_utils import const_scalar, is_op, only_consumer, other_input, replace_subgraph
from qpass.model_io import opset_of
from qpass.pass_base import Pass, PassReport

__all__ = ["FuseGeluPass", "match_gelu"]

_TOL = 1e-3


def _close(value: float | None, target: float) -> bool:
    return value is not None and abs(value - target) <= _TOL * abs(target)


def _erf_input(erf: ir.Node):
    """x and the scaling node for Erf(x / sqrt2) or Erf(x * 1/sqrt2)."""
    scaled = erf.inputs[0].producer()
    if is_op(scaled, "Div") and _close(const_scalar(scaled.inputs[1]), math.sqrt(2)):
        return scaled.inputs[0], [scaled]
    if is_op(scaled, "Mul"):
        for i in (0, 1):
            if _close(const_scalar(scaled.inputs[1 - i]), 1 / math.sqrt(2)):
                return scaled.inputs[i], [scaled]
    return None, []


def _cube_of(value: ir.Value):
    """x and the nodes for Pow(x, 3) or Mul(x, Mul(x, x)) (either order)."""
    node = value.producer()
    if is_op(node, "Pow") and _close(const_scalar(node.inputs[1]), 3.0):
        return node.inputs[0], [node]
    if is_op(node, "Mul"):
        for a, b in ((node.inputs[0], node.inputs[1]), (node.inputs[1], node.inputs[0])):
            sq = b.producer()
            if is_op(sq, "Mul") and sq.inputs[0] is a and sq.inputs[1] is a:
                return a, [node, sq]
    return None, []


def _tanh_input(tanh: ir.Node):
    """x and the nodes for Tanh(c * (x + 0.044715 * x^3))."""
    outer = tanh.inputs[0].producer()
    if not is_op(outer, "Mul"):
        return None, []
    for i in (0, 1):
        inner = outer.inputs[i].producer()
        if not (_close(const_scalar(outer.inputs[1 - i]), math.sqrt(2 / math.pi)) and is_op(inner, "Add")):
            continue
        for j in (0, 1):
            x, cubic = inner.inputs[j], inner.inputs[1 - j].producer()
            if not is_op(cubic, "Mul"):
                continue
            for k in (0, 1):
                if _close(const_scalar(cubic.inputs[1 - k]), 0.044715):
                    base, cube_nodes = _cube_of(cubic.inputs[k])
                    if base is x:
                        return x, [outer, inner, cubic, *cube_nodes]
    return None, []


def _tail(core: ir.Node, x: ir.Value):
    """Match (1 + core) * x * 0.5 in any order; return (nodes, output) or None."""
    add = only_consumer(core.outputs[0])
    if not is_op(add, "Add") or not _close(const_scalar(other_input(add, core.outputs[0])), 1.0):
        return None
    value, nodes, need_x, need_half = add.outputs[0], [add], True, True
    while need_x or need_half:
        mul = only_consumer(value)
        if not is_op(mul, "Mul"):
            return None
        other = other_input(mul, value)
        half_x = other.producer()
        if need_x and other is x:
            need_x = False
        elif need_half and _close(const_scalar(other), 0.5):
            need_half = False
        elif need_x and need_half and is_op(half_x, "Mul") and x in half_x.inputs and _close(const_scalar(other_input(half_x, x)), 0.5):
            if len(other.uses()) != 1 or other.is_graph_output():
                return None
            nodes.append(half_x)
            need_x = need_half = False
        else:
            return None
        nodes.append(mul)
        value = mul.outputs[0]
    return nodes, value


def match_gelu(core: ir.Node) -> tuple[ir.Value, list[ir.Node], ir.Value, str] | None:
    """For an Erf or Tanh node: (x, the decomposed GELU's nodes, its output, "none" | "tanh")."""
    if not is_op(core, "Erf", "Tanh") or core.graph is None:
        return None
    x, front = _erf_input(core) if core.op_type == "Erf" else _tanh_input(core)
    if x is None or any(len(n.outputs[0].uses()) != 1 or n.outputs[0].is_graph_output() for n in front):
        return None
    matched = _tail(core, x)
    if matched is None:
        return None
    tail, out = matched
    return x, [*front, core, *tail], out, "tanh" if core.op_type == "Tanh" else "none"


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
