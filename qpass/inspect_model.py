"""What ``qpass inspect`` shows: opset, inputs/outputs, parameters, op histogram, external data,
and which nodes the quantization passes could quantize."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import onnx_ir as ir

from qpass.model_io import opset_of

__all__ = ["describe", "quantizable_nodes"]

_WEIGHT_OPS = {"Conv": 1, "ConvTranspose": 1, "MatMul": 1, "Gemm": 1}


def quantizable_nodes(model: ir.Model) -> dict[str, list[str]]:
    """Nodes integer kernels could run: ops with a constant weight, and activation x activation MatMuls."""
    found: dict[str, list[str]] = {"weight": [], "activation": []}
    for node in model.graph:
        if node.domain not in ("", "ai.onnx") or node.op_type not in _WEIGHT_OPS:
            continue
        weight = node.inputs[1] if len(node.inputs) > 1 else None
        is_const = weight is not None and weight.const_value is not None
        if is_const:
            found["weight"].append(node.name or node.outputs[0].name)
        elif node.op_type == "MatMul":
            found["activation"].append(node.name or node.outputs[0].name)
    return found


def _shape(value: ir.Value) -> list[Any] | None:
    if value.shape is None:
        return None
    return [d if isinstance(d, int) else str(d) for d in value.shape.dims]


def describe(model: ir.Model) -> dict[str, Any]:
    """A JSON-ready summary of ``model``."""
    inits = [v for v in model.graph.initializers.values() if v.const_value is not None]
    external = [v.name for v in inits if isinstance(v.const_value, ir.ExternalTensor)]
    params = sum(int(np.prod(v.const_value.shape.numpy(), dtype=np.int64)) for v in inits)
    census = Counter(
        n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}::{n.op_type}"
        for n in ir.traversal.RecursiveGraphIterator(model.graph)
    )
    quant = quantizable_nodes(model)
    return {
        "producer": f"{model.producer_name or '?'} {model.producer_version or ''}".strip(),
        "ir_version": model.ir_version,
        "opset": opset_of(model),
        "opset_imports": dict(model.opset_imports),
        "inputs": [{"name": v.name, "dtype": str(v.dtype), "shape": _shape(v)} for v in model.graph.inputs if not v.is_initializer()],
        "outputs": [{"name": v.name, "dtype": str(v.dtype), "shape": _shape(v)} for v in model.graph.outputs],
        "nodes": sum(census.values()),
        "parameters": params,
        "parameter_bytes": sum(v.const_value.nbytes for v in inits),
        "initializers": len(inits),
        "external_data_tensors": len(external),
        "functions": len(model.functions),
        "op_histogram": dict(census.most_common()),
        "quantizable": {k: len(v) for k, v in quant.items()},
        "quantizable_nodes": quant,
    }
