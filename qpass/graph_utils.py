"""Small helpers for matching and rewriting ``onnx_ir`` graphs in passes."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_ir as ir
import onnx_ir.convenience
from onnx_ir.passes.common import NameFixPass

__all__ = [
    "add_initializer",
    "const_array",
    "const_scalar",
    "only_consumer",
    "other_input",
    "is_op",
    "readers",
    "reduce_axes",
    "replace_subgraph",
    "rewire_after",
    "unique_name",
    "used_names",
]


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """The value as a numpy array when it is a constant (initializer or folded), else None."""
    if value is None:
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    producer = value.producer()
    if producer is not None and producer.op_type == "Constant" and producer.domain in ("", "ai.onnx"):
        attr = producer.attributes.get("value")
        if attr is not None:
            return attr.as_tensor().numpy()
    return None


def const_scalar(value: ir.Value | None) -> float | None:
    """A constant with exactly one element, as a float."""
    array = const_array(value)
    if array is None or array.size != 1:
        return None
    return float(array.reshape(()))


def only_consumer(value: ir.Value) -> ir.Node | None:
    """The single node consuming ``value`` (None if it has 0 or several uses or is a graph output)."""
    uses = value.uses()
    if len(uses) != 1 or value.is_graph_output():
        return None
    return uses[0].node


def other_input(node: ir.Node, value: ir.Value) -> ir.Value | None:
    """For a binary node, the input that is not ``value``."""
    a, b = node.inputs[0], node.inputs[1]
    return b if a is value else a if b is value else None


def is_op(node: ir.Node | None, *op_types: str) -> bool:
    return node is not None and node.domain in ("", "ai.onnx") and node.op_type in op_types


def readers(value: ir.Value) -> int:
    """How many inputs read ``value``, counting through Identity chains (> 1: shared)."""
    return sum(readers(u.node.outputs[0]) if is_op(u.node, "Identity") else 1 for u in value.uses())


def reduce_axes(node: ir.Node) -> tuple[int, ...] | None:
    """Axes of a Reduce* node, from its attribute (opset < 18) or its constant input (>= 18)."""
    attr = node.attributes.get("axes")
    if attr is not None:
        return tuple(attr.as_ints())
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        axes = const_array(node.inputs[1])
        return None if axes is None else tuple(int(a) for a in axes.reshape(-1))
    return None


def replace_subgraph(
    graph: ir.Graph, old_nodes: Sequence[ir.Node], new_nodes: Sequence[ir.Node], old_output: ir.Value, new_output: ir.Value
) -> None:
    """Put ``new_nodes`` where the last of ``old_nodes`` was, reroute ``old_output``, drop ``old_nodes``."""
    order = {id(n): i for i, n in enumerate(graph)}
    last = max(old_nodes, key=lambda n: order[id(n)])
    onnx_ir.convenience.replace_nodes_and_values(graph, last, old_nodes, new_nodes, [old_output], [new_output])


def rewire_after(graph: ir.Graph, value: ir.Value, node: ir.Node) -> None:
    """Insert ``node`` (reading ``value``) after the producer of ``value``; every other reader reads its output."""
    users = [(u.node, u.idx) for u in value.uses() if u.node is not node]
    graph.insert_after(value.producer(), node)
    for user, idx in users:
        user.replace_input_with(idx, node.outputs[0])


def used_names(graph: ir.Graph) -> set[str]:
    """Names of the graph's inputs, initializers and node outputs."""
    used = set(graph.initializers)
    used.update(v.name for v in graph.inputs)
    for node in graph:
        used.update(o.name for o in node.outputs)
    return used


def indexed_table_rows(value: ir.Value) -> int | None:
    """Rows of the constant table(s) a Gather reads with ``value`` as its indices (an embedding's
    vocabulary size for token ids; the smallest, if several); None when no such Gather reads it."""
    rows = [int(node.inputs[0].const_value.shape[node.attributes.get_int("axis", 0)]) for node in value.consumers()
            if node.op_type == "Gather" and len(node.inputs) > 1 and node.inputs[1] is value
            and node.inputs[0] is not None and node.inputs[0].const_value is not None]
    return min(rows) if rows else None


def make_node_names_unique(model: ir.Model) -> bool:
    """Rename repeated node names (onnxruntime refuses a graph with two nodes of one name) with
    onnx_ir's NameFixPass; a model whose node names are already unique is left untouched.
    Returns whether anything was renamed."""
    for graph in (model.graph, *model.graph.subgraphs()):
        names = [node.name for node in graph if node.name]
        if len(names) != len(set(names)):
            return NameFixPass()(model).modified
    return False


def unique_name(graph: ir.Graph, base: str, taken: set[str] | None = None) -> str:
    """``base`` or ``base_1``, ``base_2``, ... not yet used by a value or initializer in ``graph``.

    A pass that names many values passes ``taken`` (from :func:`used_names`, kept up to date
    by these calls) instead of having the graph scanned on every call.
    """
    used = used_names(graph) if taken is None else taken
    name, i = base, 0
    while name in used:
        i += 1
        name = f"{base}_{i}"
    if taken is not None:
        taken.add(name)
    return name


def add_initializer(
    graph: ir.Graph, name: str, array: np.ndarray, dtype: ir.DataType | None = None, taken: set[str] | None = None
) -> ir.Value:
    """Register ``array`` as a new initializer named ``name`` (made unique) and return its value."""
    array = np.asarray(array, order="C")  # keeps 0-d scalars 0-d
    tensor = ir.tensor(array, dtype=dtype) if dtype is not None else ir.tensor(array)
    value = ir.Value(name=unique_name(graph, name, taken), const_value=tensor)
    value.shape, value.dtype = tensor.shape, tensor.dtype
    graph.register_initializer(value)
    return value


def through_identity(value: ir.Value | None) -> ir.Value | None:
    """The value an ``Identity`` chain forwards (``value`` itself when no Identity produces it)."""
    while value is not None and is_op(value.producer(), "Identity"):
        value = value.producer().inputs[0]
    return value
