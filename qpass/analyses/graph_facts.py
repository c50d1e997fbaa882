"""Value shapes and dtypes (after ONNX shape inference) and the op census of a model."""

from __future__ import annotations

import dataclasses
from collections import Counter
from types import MappingProxyType
from typing import Mapping

import onnx
import onnx_ir as ir

from qpass.pass_base import Analysis, AnalysisManager

__all__ = ["GraphFacts", "GraphFactsResult"]


@dataclasses.dataclass(frozen=True)
class GraphFactsResult:
    """``types[name] = (dtype, shape)`` for every value shape inference could type;
    ``census[op_type] = count`` over the main graph."""

    types: Mapping[str, tuple[ir.DataType | None, tuple[int | str | None, ...] | None]]
    census: Mapping[str, int]

    def shape(self, name: str) -> tuple[int | str | None, ...] | None:
        return self.types.get(name, (None, None))[1]


@dataclasses.dataclass(frozen=True)
class GraphFacts(Analysis):
    """Shapes/dtypes of every value and the op census (computed without editing the graph)."""

    def compute(self, model: ir.Model, manager: AnalysisManager) -> GraphFactsResult:
        from qpass.backends.onnxruntime import session_bytes

        types: dict = {}
        for value in _graph_values(model.graph):
            if value.type is not None:
                types[value.name] = (value.dtype, _dims(value.shape))
        graph_bytes, _, _ = session_bytes(model)
        inferred = onnx.shape_inference.infer_shapes(onnx.load_from_string(graph_bytes), data_prop=True)
        for info in list(inferred.graph.value_info) + list(inferred.graph.output):
            tt = info.type.tensor_type
            if not tt.elem_type:
                continue
            shape = (
                tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim)
                if tt.HasField("shape")
                else None
            )
            prev = types.get(info.name)
            if prev is None or prev[1] is None:
                types[info.name] = (ir.DataType(tt.elem_type), shape)
        census = Counter(node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}" for node in model.graph)
        return GraphFactsResult(MappingProxyType(types), MappingProxyType(dict(census)))


def _graph_values(graph: ir.Graph):
    yield from graph.inputs
    yield from graph.initializers.values()
    for node in graph:
        yield from node.outputs


def _dims(shape: ir.Shape | None):
    if shape is None:
        return None
    return tuple(d if isinstance(d, int) else (d.value if d.value is not None else None) for d in shape.dims)
