"""Shared test helpers (importable: tests/ is on pytest's pythonpath)."""

import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper


def small_model(opset: int = 17, weight_scale: float = 1.0) -> onnx.ModelProto:
    """x[N,4] -> MatMul(W) -> Add(b) -> Relu -> y[N,3]."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array((rng.standard_normal((4, 3)) * weight_scale).astype(np.float32), "W")
    b = numpy_helper.from_array(rng.standard_normal(3).astype(np.float32), "b")
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["m"], name="mm"),
        helper.make_node("Add", ["m", "b"], ["a"], name="add"),
        helper.make_node("Relu", ["a"], ["y"], name="relu"),
    ]
    graph = helper.make_graph(
        nodes, "small",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        [w, b],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


real_models = pytest.mark.skipif(
    os.environ.get("QPASS_REAL_MODELS") != "1", reason="real pretrained models: set QPASS_REAL_MODELS=1"
)
