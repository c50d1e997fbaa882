"""Fuse a decomposed layer normalization into one ``LayerNormalization`` node (opset >= 17).

Matches:   m = ReduceMean(x, last axis); d = Sub(x, m); v = ReduceMean(Pow(d, 2) | Mul(d, d));
           n = Div(d, Sqrt(Add(v, eps))) | Mul(d, Reciprocal(Sqrt(Add(v, eps))));
           optional Mul(n, gamma) and Add(., beta) with constants of the last axis' size.
           ReduceMean axes as an attribute (opset < 18) or as an input (opset >= 18).
Rewrites:  LayerNormalization(x, gamma, beta, axis=-1, epsilon=eps); gamma = 1, beta = 0 when absent.
Preserves: the float function. Kept and counted: models below opset 17, normalizations over
           more than the last axis, intermediate values used elsewhere.
Also:      :func:`match_layernorm` finds either form (fused, or decomposed at any opset) with
           where its gamma and beta live, for the passes that rescale them.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from qpass.graph_utils import (
    const_array,
    const_scalar,
    is_op,
    only_consumer,
    other_input,
    reduce_axes,
    replace_subgraph,
    add_initializer,
)
from qpass.model_io import opset_of
from qpass.pass_base import Pass, PassReport

__all__ = ["FuseLayerNormPass", "LayerNormMatch", "match_layernorm", "through_identity"]


def through_identity(value: ir.Value | None) -> ir.Value | None:
    """The value an ``Identity`` chain forwards (``value`` itself when no Identity produces it)."""
    while value is not None and is_op(value.producer(), "Identity"):
        value = value.producer().inputs[0]
    return value


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


def _match(mean1: ir.Node) -> LayerNormMatch | str:
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
        found = _match(node)
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


@dataclasses.dataclass
class FuseLayerNormPass(Pass):
    name = "fuse-layernorm"
    preserves_float = True

    def call(self, model: ir.Model) -> PassReport:
        report = PassReport(model, False)
        graph = model.graph
        starts = [n for n in graph if is_op(n, "ReduceMean")]
        if starts and opset_of(model) < 17:
            report.skipped["opset < 17 (LayerNormalization needs 17)"] = len(starts) // 2 or 1
            return report
        for node in starts:
            if node.graph is None:  # already replaced
                continue
            found = _match(node)
            if isinstance(found, str):
                if "ReduceMean" not in found:  # second ReduceMeans of other patterns are not worth counting
                    report.skipped[found] += 1
                continue
            nodes, x, eps, gamma, beta, out, channels = (
                found.nodes, found.x, found.eps, found.gamma, found.beta, found.output, found.channels)
            dtype = x.dtype.numpy() if x.dtype is not None else np.float32
            scale = np.broadcast_to(gamma if gamma is not None else 1.0, (channels,)).astype(dtype)
            bias = np.broadcast_to(beta if beta is not None else 0.0, (channels,)).astype(dtype)
            base = nodes[0].name or out.name
            s = add_initializer(graph, f"{base}_scale", scale)
            b = add_initializer(graph, f"{base}_bias", bias)
            ln = ir.node("LayerNormalization", [x, s, b], {"axis": -1, "epsilon": float(eps)}, name=f"{base}_layernorm")
            ln.outputs[0].dtype, ln.outputs[0].shape = out.dtype or x.dtype, out.shape
            replace_subgraph(graph, nodes, [ln], out, ln.outputs[0])
            report.rewritten += 1
        report.modified = report.rewritten > 0
        return report
