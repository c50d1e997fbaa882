"""Outlier channel splitting (OCS): duplicate the input channels holding the largest weights.

Matches:   MatMul with a constant [K, N] weight, Gemm with a constant weight (transA = 0), and
           ungrouped Conv with a constant weight and more than 3 input channels (``op_types``).
Rewrites:  ceil(expand_ratio * K) times: j* = the input channel with the largest |w| (over the
           current, already split weight); its weights are split in two halves and the halves
           stored in channel j* and a new channel K + i; the activation is widened with an explicit
           ``Gather(x, [0..K-1, j*...], axis=channel)`` (works with any producer, residuals and
           several consumers). ``qa_split`` (default) splits w into w/2 - Δ/4 and w/2 + Δ/4 with
           Δ the step of the post-split int8 grid of its output channel, so the two rounded halves
           always sum to the rounded whole (ALGORITHMS.md §4.3); otherwise w/2 and w/2.
Preserves: the float function (w1 + w2 = w; verified). The weight range shrinks, so its
           quantization step does too. Grouped/depthwise Convs are skipped and counted.
Options:   expand_ratio (0.02), qa_split (True), bits (8: the weight grid used for Δ).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import onnx_ir as ir

from qpass.graph_utils import add_initializer, unique_name
from qpass.pass_base import Pass, PassReport

__all__ = ["SplitOutlierChannelsPass", "split_channels"]


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


@dataclasses.dataclass
class SplitOutlierChannelsPass(Pass):
    name = "split-outlier-channels"
    preserves_float = True

    expand_ratio: float = 0.02
    qa_split: bool = True
    bits: int = 8
    op_types: tuple[str, ...] = ("MatMul", "Gemm", "Conv")

    def __post_init__(self):
        if not 0.0 < self.expand_ratio <= 1.0:
            raise ValueError(f"expand_ratio must be in (0, 1], got {self.expand_ratio}")
        self.op_types = tuple(self.op_types)

    def call(self, model: ir.Model) -> PassReport:
        graph = model.graph
        report = PassReport(model, False)
        added = 0
        for node in list(graph):
            if node.domain not in ("", "ai.onnx") or node.op_type not in self.op_types or len(node.inputs) < 2:
                continue
            x, w = node.inputs[0], node.inputs[1]
            if w is None or w.const_value is None or x is None or x.const_value is not None:
                continue
            weight = w.const_value.numpy()
            if node.op_type == "Gemm":
                if node.attributes.get_int("transA", 0):
                    report.skipped["Gemm with transA"] += 1
                    continue
                rows, x_axis = (weight.T if node.attributes.get_int("transB", 0) else weight), -1
            elif node.op_type == "Conv":
                if node.attributes.get_int("group", 1) != 1:
                    report.skipped["grouped Conv"] += 1
                    continue
                if weight.shape[1] <= 3:
                    report.skipped["Conv on the network input (<= 3 channels)"] += 1
                    continue
                rows, x_axis = np.moveaxis(weight, 1, 0), 1
            else:
                if weight.ndim != 2:
                    continue
                rows, x_axis = weight, -1
            k = rows.shape[0]
            n_split = math.ceil(self.expand_ratio * k)
            new_rows, origin = split_channels(rows, n_split, self.qa_split, self.bits)
            if node.op_type == "Conv":
                new_weight = np.moveaxis(new_rows, 0, 1)
            elif node.op_type == "Gemm" and node.attributes.get_int("transB", 0):
                new_weight = new_rows.T
            else:
                new_weight = new_rows
            new_w = add_initializer(graph, f"{w.name}_split", new_weight.astype(weight.dtype))
            index = add_initializer(graph, f"{node.name or w.name}_split_index", np.array(list(range(k)) + origin, np.int64))
            gather = ir.node("Gather", [x, index], {"axis": x_axis}, name=f"{node.name or w.name}_split_gather")
            gather.outputs[0].name = unique_name(graph, f"{x.name}_split")
            gather.outputs[0].dtype = x.dtype
            graph.insert_before(node, gather)
            node.replace_input_with(0, gather.outputs[0])
            node.replace_input_with(1, new_w)
            added += n_split
            report.rewritten += 1
        report.details = {"channels_added": added, "qa_split": self.qa_split}
        report.modified = report.rewritten > 0
        return report
