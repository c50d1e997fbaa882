"""Turn a mean over all spatial axes into GlobalAveragePool, which onnxruntime runs on integers.

Matches:   ReduceMean of a floating-point tensor of known rank r >= 3 over exactly the axes
           2 .. r-1 (attribute, or constant input at opset >= 18), e.g. ``x.mean((2, 3),
           keepdim=True)`` in squeeze-excite blocks and pooled heads.
Rewrites:  keepdims=1 -> GlobalAveragePool(x); keepdims=0 -> Flatten(GlobalAveragePool(x), axis=1).
           Quantized, these become QLinearGlobalAveragePool (and an integer Flatten), where a
           ReduceMean runs in float between a DequantizeLinear and a QuantizeLinear.
Preserves: the float function. Run it in quantizing recipes: in float both forms cost the same.
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir

from qpass.graph_utils import is_op, reduce_axes, replace_subgraph, unique_name, used_names
from qpass.pass_base import Pass, PassReport

__all__ = ["SpatialMeanToPoolPass"]


@dataclasses.dataclass
class SpatialMeanToPoolPass(Pass):
    name = "spatial-mean-to-pool"
    preserves_float = True

    def call(self, model: ir.Model) -> PassReport:
        report = PassReport(model, False)
        graph = model.graph
        taken = used_names(graph)
        for node in [n for n in graph if is_op(n, "ReduceMean")]:
            x, out = node.inputs[0], node.outputs[0]
            if x is None or x.shape is None or x.dtype is None or not x.dtype.is_floating_point():
                continue
            rank, axes = x.shape.rank(), reduce_axes(node)
            if rank < 3 or axes is None or sorted(a % rank for a in axes) != list(range(2, rank)):
                continue
            base = node.name or out.name
            pool = ir.node("GlobalAveragePool", [x], name=f"{base}_pool")
            pool.outputs[0].dtype = x.dtype
            pool.outputs[0].shape = ir.Shape([*x.shape.dims[:2], *[1] * (rank - 2)])
            nodes = [pool]
            if not node.attributes.get_int("keepdims", 1):
                nodes.append(ir.node("Flatten", [pool.outputs[0]], {"axis": 1}, name=f"{base}_flatten"))
                nodes[-1].outputs[0].dtype, nodes[-1].outputs[0].shape = x.dtype, out.shape
            pool.outputs[0].name = unique_name(graph, f"{base}_pooled", taken)
            if len(nodes) > 1:
                nodes[-1].outputs[0].name = unique_name(graph, f"{base}_flat", taken)
            replace_subgraph(graph, [node], nodes, out, nodes[-1].outputs[0])
            report.rewritten += 1
        report.modified = report.rewritten > 0
        return report
