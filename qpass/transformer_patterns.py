"""LayerNorm -> Linear groups: the transformer pattern that SmoothQuant and RepQ-ViT rescale.

A *Linear* is a MatMul with a constant 2-D weight, or a Gemm with transA = 0, reading the
activation as its first input (its weight possibly behind Identity nodes). A *group* is a
LayerNorm over the last axis (fused or decomposed, see
:func:`qpass.op_patterns.match_layernorm`) with the Linears reading its output,
directly or through Identity chains. Both passes scale each Linear's input rows and put
the inverse into the LayerNorm's gamma and beta (:func:`set_layernorm_affine`).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from qpass.graph_utils import (
    add_initializer,
    is_op,
    readers,
    rewire_after,
    through_identity,
    unique_name,
)
from qpass.op_patterns import LayerNormMatch, match_layernorm
from qpass.pass_base import PassReport

__all__ = ["LinearUses", "linear_weight", "linear_uses", "layernorm_groups", "set_layernorm_affine"]


@dataclasses.dataclass
class LinearUses:
    """Who reads a value, looking through Identity chains: ``linears`` as (node, weight,
    transposed), how many ``others``, whether it is a graph output, whether a weight is shared."""

    linears: list[tuple[ir.Node, ir.Value, bool]]
    others: int = 0
    graph_output: bool = False
    shared_weight: bool = False

    @property
    def only_linears(self) -> bool:
        return bool(self.linears) and not self.others and not self.graph_output


def linear_weight(node: ir.Node, value: ir.Value) -> tuple[ir.Value, bool] | None:
    """(constant weight, stored transposed) when ``node`` is a Linear reading ``value`` as its
    activation: MatMul with a 2-D weight, or Gemm with transA = 0; the weight may sit behind Identity."""
    if not is_op(node, "MatMul", "Gemm") or len(node.inputs) < 2 or node.inputs[0] is not value:
        return None
    w = through_identity(node.inputs[1])
    if w is None or w.const_value is None or w.const_value.shape.rank() != 2:
        return None
    if node.op_type == "Gemm":
        return None if node.attributes.get_int("transA", 0) else (w, bool(node.attributes.get_int("transB", 0)))
    return w, False


def linear_uses(value: ir.Value) -> LinearUses:
    """The Linears and other readers of ``value`` (Identity chains followed)."""
    result = LinearUses([])
    stack = [value]
    while stack:
        v = stack.pop()
        result.graph_output |= v.is_graph_output()
        for use in v.uses():
            if is_op(use.node, "Identity"):
                stack.append(use.node.outputs[0])
            elif use.idx == 0 and (lw := linear_weight(use.node, v)) is not None:
                result.linears.append((use.node, *lw))
                result.shared_weight |= readers(lw[0]) > 1
            else:
                result.others += 1
    return result


def layernorm_groups(graph: ir.Graph, report: PassReport) -> list[tuple[LayerNormMatch, LinearUses]]:
    """Every LayerNorm (fused or decomposed) feeding Linears with unshared weights; the rest counted."""
    groups = []
    for node in graph:
        match = match_layernorm(node)
        if match is None:
            continue
        uses = linear_uses(match.output)
        if not uses.linears:
            report.skipped["LayerNorm feeds no Linear"] += 1
        elif uses.shared_weight:
            report.skipped["a Linear weight is shared with another node"] += 1
        else:
            groups.append((match, uses))
    return groups


def _replace_channel_vector(graph: ir.Graph, site: tuple[ir.Node, int], array: np.ndarray, channels: int, dtype) -> None:
    """Make the input at ``site`` (node, input index) a new initializer holding ``array``, shaped like the old one."""
    node, index = site
    old = node.inputs[index]
    shape = tuple(old.shape)[:-1] + (channels,) if old.shape is not None and old.shape.rank() else (channels,)
    node.replace_input_with(index, add_initializer(graph, f"{old.name}_scaled", array.reshape(shape).astype(dtype)))


def set_layernorm_affine(graph: ir.Graph, match: LayerNormMatch, gamma: np.ndarray, beta: np.ndarray | None) -> None:
    """Give the LayerNorm new gamma (and beta) initializers; an absent beta becomes an ``Add``.

    ``match.gamma_site`` must exist; the LayerNorm output must not be a graph output when beta is
    created for a decomposed LayerNorm.
    """
    dtype = match.gamma.dtype
    _replace_channel_vector(graph, match.gamma_site, gamma, match.channels, dtype)
    if beta is None:
        return
    if match.beta_site is not None:
        _replace_channel_vector(graph, match.beta_site, beta, match.channels, dtype)
        return
    g_node = match.gamma_site[0]
    value = add_initializer(graph, f"{g_node.name or match.output.name}_bias", beta.astype(dtype))
    if match.fused:
        g_node.resize_inputs(3)
        g_node.replace_input_with(2, value)
        return
    out = match.output
    add = ir.node("Add", [out, value], name=f"{out.producer().name or out.name}_bias")
    add.outputs[0].name = unique_name(graph, f"{out.name}_biased")
    add.outputs[0].dtype, add.outputs[0].shape = out.dtype, out.shape
    rewire_after(graph, out, add)
