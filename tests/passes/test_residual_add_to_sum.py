"""residual-add-to-sum: a residual Add read only by a LayerNormalization becomes Sum."""

import numpy as np
import onnx
import pytest

import qpass
from qpass.backends.onnxruntime import make_session
from qpass.passes.residual_add_to_sum import ResidualAddToSumPass

LAYERNORM = "y = LayerNormalization <axis = -1, epsilon = 1e-5> (s, g, b)"


def block(kit, *lines, outputs="float[N,T,16] y"):
    body = "\n".join(f"    {line}" for line in lines)
    text = ('<ir_version: 8, opset_import: ["" : 17]>\n'
            f"block (float[N,T,16] x, float[N,T,16] r) => ({outputs}) {{\n{body}\n}}")
    return kit.model(text, g=kit.uniform(0.5, 1.5, 16).astype(np.float32), b=kit.randn(16).astype(np.float32),
                     c=kit.randn(16).astype(np.float32))


def optimized_ops(model, tmp_path):
    """The op types onnxruntime runs after all its graph optimizations."""
    path = str(tmp_path / "optimized.onnx")
    make_session(model, optimize=True, optimized_model_path=path)
    return [node.op_type for node in onnx.load(path).graph.node]


def test_residual_sum_becomes_sum_and_layernorm_is_not_fused(kit, tmp_path):
    proto = block(kit, "s = Add(x, r)", LAYERNORM)
    assert optimized_ops(qpass.load_model(proto), tmp_path) == ["SkipLayerNormalization"]
    model, report = kit.apply(ResidualAddToSumPass(), proto)
    assert kit.ops(model) == ["Sum", "LayerNormalization"] and report.rewritten == 1
    assert model.graph.node(0).outputs[0].name == "s"
    kit.check_equivalent(proto, model, rtol=0, atol=0)
    assert optimized_ops(model, tmp_path) == ["Sum", "LayerNormalization"]
    kit.check_deterministic(ResidualAddToSumPass(), proto)


def test_sum_after_a_bias_add_keeps_the_bias_add(kit):
    proto = block(kit, "h = Add(x, c)", "s = Add(h, r)", LAYERNORM)
    model, report = kit.apply(ResidualAddToSumPass(), proto)
    assert kit.ops(model) == ["Add", "Sum", "LayerNormalization"] and report.rewritten == 1
    kit.check_equivalent(proto, model, rtol=0, atol=0)


@pytest.mark.parametrize("lines,outputs", [
    (["s = Add(x, c)", LAYERNORM], "float[N,T,16] y"),  # a bias, not a residual
    (["s = Add(x, r)", LAYERNORM, "z = Relu(s)"], "float[N,T,16] y, float[N,T,16] z"),  # s read twice
    (["s = Add(x, r)", LAYERNORM], "float[N,T,16] y, float[N,T,16] s"),  # s is a graph output
    (["s = Add(x, r)", "y = Relu(s)"], "float[N,T,16] y"),  # no LayerNormalization
    (["s = Add(x, r)", "y = LayerNormalization <axis = -1> (g, s, b)"], "float[16] y"),  # s is the scale
])
def test_other_adds_are_kept(kit, lines, outputs):
    kit.check_unchanged(ResidualAddToSumPass(), block(kit, *lines, outputs=outputs))
