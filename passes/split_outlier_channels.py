"""Outlier channel splitting (OCS): duplicate outlier input channels of Linears and Convs.

Matches:   MatMul with a constant [K, N] weight, Gemm with a constant weight (transA = 0), and
           ungrouped Conv with a constant weight and more than 3 input channels (``op_types``).
           Left alone and counted: grouped/depthwise Convs, Gemm with transA, weights shared with
           another node (splitting would change the other user or duplicate the tensor).
Rewrites:  ``target="weight"`` (ALGORITHMS.md §4.2-4.3): ceil(expand_ratio * K) times, j* = the
           input channel with the largest |w| (over the current, already split weight); its
           weights are split in two halves stored in channel j* and a new channel K + i; the
           activation is widened with ``Concat(x, Gather(x, [j*...]), axis=channel)``. ``qa_split``
           (default) splits w into w/2 - Δ/4 and w/2 + Δ/4 with Δ the step of the post-split
           int8 grid of its output channel, so the two rounded halves always sum to the rounded
           whole; otherwise w/2 and w/2.
           ``target="activation"`` (§4.4): the same greedy choice on the calibrated max|x| per
           input channel; channel c* is halved and duplicated, the weight's input row c* is
           duplicated whole (w·x/2 + w·x/2 = w·x). When x is made by a Linear/Conv producer
           (MatMul[+bias Add], Gemm, ungrouped Conv; constant, unshared weights) through only
           positively homogeneous ops (Relu, LeakyRelu, MaxPool) and read by nothing else, the
           producer's output channel (weights and bias) is halved and duplicated: no new op.
           Otherwise ``x' = Concat(x, Gather(x, [c*...])) * multipliers``, shared by every
           consumer of x.
           ``target="both"``: activation splits first, then weight splits on the result.
Preserves: the float function (verified). The split tensor's range shrinks, so its
           quantization step does too.
Needs:     ``ChannelAbsMax`` (calibration data) for ``target="activation"``/``"both"``.
Options:   target ("weight"), expand_ratio (0.02), qa_split (True), bits (8: the weight grid
           used for Δ), op_types.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter

import numpy as np
import onnx_ir as ir

from qpass.analyses.channel_absmax import ChannelAbsMax
from qpass.graph_utils import add_initializer, const_array, is_op, readers, through_identity, unique_name, used_names
from qpass.pass_base import Pass, PassReport

__all__ = ["SplitOutlierChannelsPass", "split_channels", "split_activation_channels"]

TARGETS = ("weight", "activation", "both")
_HOMOGENEOUS = ("Relu", "LeakyRelu", "MaxPool")


def split_channels(w: np.ndarray, n_split: int, qa_split: bool, bits: int) -> tuple[np.ndarray, list[int]]:
    """Split rows of ``w`` ([K, N, ...], row = input channel). Returns (w', original index of each new row)."""
    w = w.astype(np.float64)
    rows = w.reshape(w.shape[0], -1)
    origin: list[int] = []
    split_at: list[int] = []
    current = rows.copy()
    for _ in range(n_split):  # naive pass: find which rows to split and the post-split range
        j = int(np.argmax(np.abs(current).max(axis=1)))
        split_at.append(j)
        current[j] /= 2
        current = np.vstack([current, current[j]])
        origin.append(j if j < rows.shape[0] else origin[j - rows.shape[0]])
    if not qa_split:
        return current.reshape((-1,) + w.shape[1:]), origin
    qmax = 2 ** (bits - 1) - 1
    delta = np.maximum(np.abs(current).max(axis=0), 1e-12) / qmax  # per output channel (column)
    redo = rows.copy()
    for j in split_at:  # same splits, quantization-aware halves
        whole = redo[j].copy()
        redo[j] = whole / 2 - delta / 4
        redo = np.vstack([redo, whole / 2 + delta / 4])
    return redo.reshape((-1,) + w.shape[1:]), origin


def split_activation_channels(absmax: np.ndarray, n_split: int) -> tuple[np.ndarray, np.ndarray]:
    """Greedy activation splits: (source channel, multiplier) of every channel of the widened x.

    Each step halves the channel with the largest current max|x| and appends its copy, so
    the multipliers of the copies of one channel sum to 1.
    """
    source = list(range(absmax.size))
    mult = [1.0] * absmax.size
    current = list(absmax.astype(np.float64))
    for _ in range(n_split):
        j = int(np.argmax(current))
        mult[j] /= 2
        current[j] /= 2
        source.append(source[j])
        mult.append(mult[j])
        current.append(current[j])
    return np.array(source, np.int64), np.array(mult, np.float64)


@dataclasses.dataclass
class _View:
    """A consumer seen as rows = input channels: ``rows`` [K, ...] and how to store them back."""

    node: ir.Node
    x: ir.Value
    w: ir.Value
    rows: np.ndarray
    axis: int  # channel axis of x

    def store(self, rows: np.ndarray) -> np.ndarray:
        if self.node.op_type == "Conv":
            return np.moveaxis(rows, 0, 1)
        if self.node.op_type == "Gemm" and self.node.attributes.get_int("transB", 0):
            return rows.T
        return rows


def _view(node: ir.Node, op_types: tuple[str, ...]) -> _View | str | None:
    """The consumer view of ``node``, a reason to skip it, or None when it is not a candidate."""
    if not is_op(node, *op_types) or len(node.inputs) < 2:
        return None
    x, w = node.inputs[0], through_identity(node.inputs[1])
    if w is None or w.const_value is None or x is None or x.const_value is not None:
        return None
    weight = w.const_value.numpy()
    if node.op_type == "Gemm":
        if node.attributes.get_int("transA", 0):
            return "Gemm with transA"
        rows, axis = (weight.T if node.attributes.get_int("transB", 0) else weight), -1
    elif node.op_type == "Conv":
        if node.attributes.get_int("group", 1) != 1:
            return "grouped Conv"
        if weight.shape[1] <= 3:
            return "Conv on the network input (<= 3 channels)"
        rows, axis = np.moveaxis(weight, 1, 0), 1
    else:
        if weight.ndim != 2:
            return None
        rows, axis = weight, -1
    if readers(w) > 1:
        return "weight shared with another node"
    return _View(node, x, w, rows, axis)


def _producer_chain(x: ir.Value, axis: int, k: int):
    """(producer, its weight, output-channel axis of that weight, bias site or None, values to widen)
    when x (k channels) is a Linear/Conv output through positively homogeneous ops, read only by
    its one consumer, and the producer's weight is not shared."""
    chain, v = [], x
    while True:
        if v.is_graph_output() or len(v.uses()) != 1 or v.producer() is None:
            return None
        chain.append(v)
        node = v.producer()
        if is_op(node, *_HOMOGENEOUS) and len(node.outputs) == 1 and (node.op_type != "MaxPool" or axis == 1):
            v = node.inputs[0]
            continue
        break
    bias_site = None
    if is_op(node, "Add") and axis == -1:
        for i in (0, 1):
            b = const_array(node.inputs[1 - i])
            linear = is_op(node.inputs[i].producer(), "MatMul", "Gemm")
            if linear and b is not None and b.ndim >= 1 and b.shape[-1] == k and b.size == k:
                bias_site, v = (node, 1 - i), node.inputs[i]
                break
        if bias_site is None or v.is_graph_output() or len(v.uses()) != 1:
            return None
        chain.append(v)
        node = v.producer()
    w = through_identity(node.inputs[1]) if len(node.inputs) > 1 else None
    if w is None or w.const_value is None or readers(w) != 1:
        return None
    has_c = len(node.inputs) > 2 and node.inputs[2] is not None
    if is_op(node, "MatMul") and axis == -1:
        out_axis = 1
    elif is_op(node, "Gemm") and axis == -1 and not node.attributes.get_int("transA", 0):
        out_axis = 0 if node.attributes.get_int("transB", 0) else 1
    elif is_op(node, "Conv") and axis == 1 and node.attributes.get_int("group", 1) == 1:
        out_axis = 0
    else:
        return None
    if w.const_value.shape.rank() < 2 or w.const_value.shape[out_axis] != k:
        return None
    if has_c:  # Gemm C / Conv B: a constant [k] vector, and then no separate bias Add
        c = const_array(node.inputs[2])
        if c is None or c.shape != (k,) or bias_site is not None:
            return None
        bias_site = (node, 2)
    return node, w, out_axis, bias_site, chain


@dataclasses.dataclass
class SplitOutlierChannelsPass(Pass):
    name = "split-outlier-channels"
    preserves_float = True

    expand_ratio: float = 0.02
    qa_split: bool = True
    bits: int = 8
    op_types: tuple[str, ...] = ("MatMul", "Gemm", "Conv")
    target: str = "weight"

    def __post_init__(self):
        if not 0.0 < self.expand_ratio <= 1.0:
            raise ValueError(f"expand_ratio must be in (0, 1], got {self.expand_ratio}")
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {', '.join(TARGETS)}, got '{self.target}'")
        self.op_types = tuple(self.op_types)

    def call(self, model: ir.Model) -> PassReport:
        graph = model.graph
        report = PassReport(model, False)
        self._taken = used_names(graph)
        self._node_names = {n.name for n in graph}
        views = []
        for node in list(graph):
            view = _view(node, self.op_types)
            if isinstance(view, str):
                report.skipped[view] += 1
            elif view is not None:
                views.append(view)
        counts: Counter = Counter()
        self._rewritten: set[int] = set()
        if self.target in ("activation", "both") and views:
            self._split_activations(model, views, counts)
        if self.target in ("weight", "both"):
            for view in views:
                current = _view(view.node, self.op_types)  # the weight may have been widened above
                self._split_weights(graph, current, counts)
        report.rewritten = len(self._rewritten)
        report.details = {"target": self.target, "channels_added": counts["weight"] + counts["activation"],
                          "weight_channels_added": counts["weight"], "activation_channels_added": counts["activation"],
                          "producers_widened": counts["producers"], "gathers": counts["gathers"], "qa_split": self.qa_split}
        report.modified = report.rewritten > 0
        return report

    def _initializer(self, graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
        return add_initializer(graph, name, array, taken=self._taken)

    def _widen(self, graph: ir.Graph, view: _View, extra: list[int] | np.ndarray, mult: np.ndarray | None) -> ir.Value:
        """Concat(x, Gather(x, extra), channel axis) [* mult along that axis], right after x's
        producer (a Gather of the few extra channels: a full-index Gather is ~2x slower in onnxruntime)."""
        x, axis, base = view.x, view.axis, view.node.name or view.x.name
        idx = self._initializer(graph, f"{x.name}_split_index", np.asarray(extra, np.int64))
        gather = ir.node("Gather", [x, idx], {"axis": axis}, name=unique_name(graph, f"{base}_split_gather", self._node_names))
        nodes = [gather, ir.node("Concat", [x, gather.outputs[0]], {"axis": axis}, name=unique_name(graph, f"{base}_split_concat", self._node_names))]
        if mult is not None:
            dtype = x.dtype.numpy() if x.dtype is not None else np.float32
            shape = (-1,) if axis == -1 else (-1,) + (1,) * (view.rows.ndim - 2)  # Conv: x rank = weight rank
            m = self._initializer(graph, f"{x.name}_split_scale", mult.reshape(shape).astype(dtype))
            nodes.append(ir.node("Mul", [nodes[-1].outputs[0], m], name=unique_name(graph, f"{base}_split_halve", self._node_names)))
        for node in nodes:
            node.outputs[0].name = unique_name(graph, f"{x.name}_split", self._taken)
            node.outputs[0].dtype = x.dtype
        if x.producer() is not None:  # right after x: every consumer of x comes later
            graph.insert_after(x.producer(), nodes)
        else:
            graph.insert_before(next(iter(graph)), nodes)
        return nodes[-1].outputs[0]

    def _split_weights(self, graph: ir.Graph, view: _View, counts: Counter) -> None:
        k = view.rows.shape[0]
        n_split = math.ceil(self.expand_ratio * k)
        new_rows, origin = split_channels(view.rows, n_split, self.qa_split, self.bits)
        dtype = view.w.const_value.numpy().dtype
        new_w = self._initializer(graph, f"{view.w.name}_split", view.store(new_rows).astype(dtype))
        view.node.replace_input_with(0, self._widen(graph, view, origin, None))
        view.node.replace_input_with(1, new_w)
        counts["weight"] += n_split
        counts["gathers"] += 1
        self._rewritten.add(id(view.node))

    def _split_activations(self, model: ir.Model, views: list[_View], counts: Counter) -> None:
        graph = model.graph
        groups: dict[tuple[int, int], list[_View]] = {}
        for view in views:
            groups.setdefault((id(view.x), view.axis), []).append(view)
        names = tuple(g[0].x.name for g in groups.values())
        stats = self.analysis(ChannelAbsMax(names, tuple(g[0].axis for g in groups.values())), model)
        for group in groups.values():
            x, axis = group[0].x, group[0].axis
            absmax = stats[x.name]
            k = absmax.size
            if not absmax.max() > 0 or any(v.rows.shape[0] != k for v in group):
                continue
            n_split = math.ceil(self.expand_ratio * k)
            source, mult = split_activation_channels(absmax, n_split)
            chain = _producer_chain(x, axis, k) if len(group) == 1 else None
            if chain is not None:
                self._widen_producer(graph, chain, source, mult, axis)
                counts["producers"] += 1
            else:
                widened = self._widen(graph, group[0], source[k:], mult)
                for view in group:
                    view.node.replace_input_with(0, widened)
                counts["gathers"] += 1
            for view in group:  # input rows duplicated whole (re-read: a producer widened above may be this node)
                view = _view(view.node, self.op_types)
                self._rewritten.add(id(view.node))
                dtype = view.w.const_value.numpy().dtype
                rows = self._initializer(graph, f"{view.w.name}_split", view.store(view.rows[source]).astype(dtype))
                view.node.replace_input_with(1, rows)
            counts["activation"] += n_split

    def _widen_producer(self, graph: ir.Graph, chain, source: np.ndarray, mult: np.ndarray, axis: int) -> None:
        """The producer's output channel c becomes copies scaled by their multipliers."""
        node, w, out_axis, bias_site, values = chain
        weight = w.const_value.numpy()
        shape = [1] * weight.ndim
        shape[out_axis] = -1
        new_w = np.take(weight.astype(np.float64), source, axis=out_axis) * mult.reshape(shape)
        node.replace_input_with(1, self._initializer(graph, f"{w.name}_split", new_w.astype(weight.dtype)))
        if bias_site is not None:
            b_node, b_index = bias_site
            bias = const_array(b_node.inputs[b_index])
            flat = bias.reshape(-1).astype(np.float64)
            new_b = (flat[source] * mult).reshape(bias.shape[:-1] + (-1,))
            name = f"{b_node.inputs[b_index].name}_split"
            b_node.replace_input_with(b_index, self._initializer(graph, name, new_b.astype(bias.dtype)))
        for value in values:
            if value.shape is not None and value.shape.rank():
                dims = list(value.shape)
                dims[axis] = source.size
                value.shape = ir.Shape(dims)
