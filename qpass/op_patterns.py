"""Matchers for the multi-node forms exporters write for common ops, shared by the fusion
passes and the backends: layer normalization (fused, or decomposed at any opset, with where
its gamma and beta live) and GELU (erf and tanh forms)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import onnx_ir as ir

from qpass.graph_utils import (
    const_array,
    const_scalar,
    is_op,
    only_consumer,
    other_input,
    reduce_axes,
    through_identity,
)

__all__ = ["LayerNormMatch", "match_layernorm", "match_decomposed_layernorm", "match_gelu"]


@dataclasses.dataclass
class LayerNormMatch:
    """A layer normalization over the last axis: ``output = normalized * gamma + beta``.

    ``gamma_site``/``beta_site``: (node, input index) holding the constant, None when absent;
    ``normalized``: the value before the affine (decomposed form), ``nodes``: every node of it.
    """

    output: ir.Value
    gamma: np.ndarray | None
    beta: np.ndarray | None
    gamma_site: tuple[ir.Node, int] | None
    beta_site: tuple[ir.Node, int] | None
    channels: int
    nodes: list[ir.Node]
    normalized: ir.Value
    x: ir.Value
    eps: float

    @property
    def fused(self) -> bool:
        return len(self.nodes) == 1


def _is_last_axis(node: ir.Node, x: ir.Value) -> bool:
    axes = reduce_axes(node)
    if axes is None or len(axes) != 1 or node.attributes.get_int("keepdims", 1) != 1:
        return False
    rank = x.shape.rank() if x.shape is not None else None
    return axes[0] == -1 or (rank is not None and axes[0] == rank - 1)


def _channel_vector(value: ir.Value, channels: int | None) -> np.ndarray | None:
    """A constant broadcastable along the last axis only, as a 1-D array of ``channels``."""
    array = const_array(through_identity(value))
    if array is None or array.ndim == 0 or any(d != 1 for d in array.shape[:-1]):
        return None
    vector = array.reshape(-1)
    if channels is not None and vector.size not in (1, channels):
        return None
    return vector


def match_decomposed_layernorm(mean1: ir.Node) -> LayerNormMatch | str:
    """The decomposed layer norm starting at ``mean1``, or why there is none."""
    x = mean1.inputs[0]
    if not _is_last_axis(mean1, x):
        return "ReduceMean is not over the last axis"
    subs = [u.node for u in mean1.outputs[0].uses() if is_op(u.node, "Sub") and u.node.inputs[0] is x and u.idx == 1]
    if not subs:
        return "ReduceMean is not a LayerNorm mean"
    if len(subs) != 1 or len(mean1.outputs[0].uses()) != 1 or mean1.outputs[0].is_graph_output():
        return "mean is used elsewhere"
    sub = subs[0]
    d = sub.outputs[0]
    users = list({id(u.node): u.node for u in d.uses()}.values())
    square = next((n for n in users if (is_op(n, "Pow") and const_scalar(n.inputs[1]) == 2.0) or (is_op(n, "Mul") and n.inputs[0] is d and n.inputs[1] is d)), None)
    divide = next((n for n in users if n is not square and is_op(n, "Div", "Mul") and n.inputs[0] is d), None)
    if square is None or divide is None or len(users) != 2 or d.is_graph_output():
        return "deviation is not squared and divided"
    mean2 = only_consumer(square.outputs[0])
    if not is_op(mean2, "ReduceMean") or not _is_last_axis(mean2, d):
        return "variance is not a ReduceMean over the last axis"
    add_eps = only_consumer(mean2.outputs[0])
    eps = const_scalar(other_input(add_eps, mean2.outputs[0])) if is_op(add_eps, "Add") else None
    sqrt = only_consumer(add_eps.outputs[0]) if eps is not None else None
    if not is_op(sqrt, "Sqrt"):
        return "variance + eps is not followed by Sqrt"
    nodes = [mean1, sub, square, mean2, add_eps, sqrt]
    if divide.op_type == "Div":
        if divide.inputs[1] is not sqrt.outputs[0] or only_consumer(sqrt.outputs[0]) is not divide:
            return "deviation is not divided by the standard deviation"
    else:
        recip = only_consumer(sqrt.outputs[0])
        if not is_op(recip, "Reciprocal") or only_consumer(recip.outputs[0]) is not divide:
            return "deviation is not multiplied by 1/std"
        nodes.append(recip)
    nodes.append(divide)
    out = normalized = divide.outputs[0]
    channels = x.shape[-1] if x.shape is not None and x.shape.rank() and isinstance(x.shape[-1], int) else None
    gamma = beta = gamma_site = beta_site = None
    nxt = only_consumer(out)
    if is_op(nxt, "Mul") and (g := _channel_vector(other_input(nxt, out), channels)) is not None:
        gamma, gamma_site, out = g, (nxt, 1 if nxt.inputs[0] is out else 0), nxt.outputs[0]
        nodes.append(nxt)
        nxt = only_consumer(out)
    if is_op(nxt, "Add") and (b := _channel_vector(other_input(nxt, out), channels)) is not None:
        beta, beta_site, out = b, (nxt, 1 if nxt.inputs[0] is out else 0), nxt.outputs[0]
        nodes.append(nxt)
    if channels is None:
        sizes = [v.size for v in (gamma, beta) if v is not None and v.size > 1]
        if not sizes:
            return "the normalized axis has no static size"
        channels = sizes[0]
    return LayerNormMatch(out, gamma, beta, gamma_site, beta_site, channels, nodes, normalized, x, eps)


def match_layernorm(node: ir.Node) -> LayerNormMatch | None:
    """The layer norm that ``node`` is (a LayerNormalization over the last axis with constant
    Scale and B) or starts (the first ReduceMean of a decomposed one), else None."""
    if is_op(node, "ReduceMean"):
        found = match_decomposed_layernorm(node)
        return None if isinstance(found, str) else found
    if not is_op(node, "LayerNormalization") or len(node.inputs) < 2:
        return None
    x, out = node.inputs[0], node.outputs[0]
    rank = x.shape.rank() if x.shape is not None else None
    axis = node.attributes.get_int("axis", -1)
    if axis != -1 and (rank is None or axis != rank - 1):
        return None
    gamma = const_array(through_identity(node.inputs[1]))
    beta = const_array(through_identity(node.inputs[2])) if len(node.inputs) > 2 and node.inputs[2] is not None else None
    if gamma is None or (len(node.inputs) > 2 and node.inputs[2] is not None and beta is None):
        return None
    site = lambda i: (node, i)  # noqa: E731
    return LayerNormMatch(out, gamma.reshape(-1), None if beta is None else beta.reshape(-1), site(1),
                          site(2) if beta is not None else None, gamma.size, [node], out, x,
                          node.attributes.get_float("epsilon", 1e-5))


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
