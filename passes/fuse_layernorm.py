"""Fuse a decomposed layer normalization into one ``LayerNormalization`` node (opset >= 17).

Matches:   m = ReduceMean(x, last axis); d = Sub(x, m); v = ReduceMean(Pow(d, 2) | Mul(d, d));
           n = Div(d, Sqrt(Add(v, eps))) | Mul(d, Reciprocal(Sqrt(Add(v, eps))));
           optional Mul(n, gamma) and Add(., beta) with constants of the last axis' size.
           ReduceMean axes as an attribute (opset < 18) or as an input (opset >= 18).
Rewrites:  LayerNormalization(x, gamma, beta, axis=-1, epsilon=eps); gamma = 1, beta = 0 when absent.
Preserves: the float function. Kept and counted: models below opset 17, normalizations over
           more than the last axis, intermediate values used elsewhere.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from qpass.graph_utils import add_initializer, is_op, replace_subgraph
from qpass.model_io import opset_of
from qpass.op_patterns import match_decomposed_layernorm
from qpass.pass_base import Pass, PassReport

__all__ = ["FuseLayerNormPass"]


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
            found = match_decomposed_layernorm(node)
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
