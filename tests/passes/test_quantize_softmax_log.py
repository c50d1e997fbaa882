import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import qpass
from qpass.passes.quantize_softmax_log import (
    QuantizeSoftmaxLogPass,
    log_dequantize_reference,
    log_quantize_reference,
)
from qpass.verify import run_model


def _attention(seq=6) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Softmax", ["scores"], ["p"], name="softmax", axis=-1), helper.make_node("MatMul", ["p", "v"], ["o"], name="pv")],
        "attn",
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, 2, seq, seq]), helper.make_tensor_value_info("v", TensorProto.FLOAT, [1, 2, seq, 4])],
        [helper.make_tensor_value_info("o", TensorProto.FLOAT, [1, 2, seq, 4])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _probs_model() -> onnx.ModelProto:
    """Identity-like model: P in, LogQuantDequant(P)·I out, so the function's values are visible."""
    graph = helper.make_graph(
        [helper.make_node("Softmax", ["x"], ["p"], name="softmax", axis=-1), helper.make_node("MatMul", ["p", "eye"], ["o"], name="pv")],
        "probs", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64, 16]), helper.make_tensor_value_info("eye", TensorProto.FLOAT, [16, 16])],
        [helper.make_tensor_value_info("o", TensorProto.FLOAT, [64, 16])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return (e / e.sum(-1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("base", ["log2", "log_sqrt2"])
@pytest.mark.parametrize("inline", [False, True])
def test_onnx_matches_numpy_reference(base, inline):
    proto = _probs_model()
    model = qpass.load_model(proto)
    report = QuantizeSoftmaxLogPass(bits=4, base=base, inline=inline)(model)
    assert report.rewritten == 1
    if not inline:
        assert ("ai.qpass", "LogQuantDequant" + ("2" if base == "log2" else "Sqrt2") + "_4bit", "") in model.functions
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((64, 16)) * 4).astype(np.float32)
    logits[:8, 5:] = -np.inf  # masked positions: probability exactly 0, must stay 0
    got = run_model(model, {"x": logits, "eye": np.eye(16, dtype=np.float32)})["o"]
    p = run_model(qpass.load_model(proto), {"x": logits, "eye": np.eye(16, dtype=np.float32)})["o"]  # float softmax
    codes = log_quantize_reference(p, 4, base)
    expected = log_dequantize_reference(codes, 4, base)
    assert np.all(got[:8, 5:] == 0)
    ulp = np.abs(got - expected) <= np.spacing(np.maximum(np.abs(expected), np.float32(1e-30)))
    assert ulp.all()
    qpass.pipeline.check_graph(model)


@pytest.mark.parametrize("bits,base", [(4, "log2"), (4, "log_sqrt2"), (3, "log2")])
def test_exhaustive_code_table(bits, base):
    k = 1 if base == "log2" else 2
    codes = np.arange(0, 2**bits + 1)
    values = log_dequantize_reference(codes, bits, base)
    assert values[-1] == 0.0  # the underflow code
    np.testing.assert_allclose(values[:-1], 2.0 ** (-codes[:-1] / k), rtol=2e-7)
    # every level quantizes back to its own code
    assert np.array_equal(log_quantize_reference(values[:-1], bits, base), codes[:-1])
    # values below the last level's rounding boundary underflow to zero
    boundary = 2.0 ** (-(2**bits - 0.5) / k)
    assert log_quantize_reference(np.array([boundary * 0.99], np.float32), bits, base)[0] == 2**bits


def test_rounding_is_nearest_in_log_domain():
    # round(-log2(p)) steps at p = 2^-(n+0.5): 0.70 -> code 1 (0.5), 0.72 -> code 0 (1.0)
    codes = log_quantize_reference(np.array([0.72, 0.70, 0.36, 0.35], np.float32), 4, "log2")
    assert codes.tolist() == [0, 1, 1, 2]


def test_softmax_not_feeding_pv_is_counted_and_left():
    graph = helper.make_graph([helper.make_node("Softmax", ["x"], ["y"], axis=-1)], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])])
    model = qpass.load_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    report = QuantizeSoftmaxLogPass()(model)
    assert not report.modified and sum(report.skipped.values()) == 1


def test_log_sqrt2_beats_uniform_on_attention_output_at_4_bits():
    rng = np.random.default_rng(1)
    p = _softmax(rng.standard_normal((512, 64)) * 3)
    v = rng.standard_normal((64, 32)).astype(np.float32)
    ref = p @ v
    uniform = np.clip(np.round(p * 15), 0, 15) / 15  # 4-bit uniform on [0, 1]
    log2 = log_dequantize_reference(log_quantize_reference(p, 4, "log2"), 4, "log2")
    logs2 = log_dequantize_reference(log_quantize_reference(p, 4, "log_sqrt2"), 4, "log_sqrt2")
    sqnr = lambda a: 10 * math.log10(np.sum(ref**2) / np.sum((ref - a @ v) ** 2))  # noqa: E731
    assert sqnr(logs2) > sqnr(uniform)
    assert sqnr(logs2) > sqnr(log2)


def test_bad_options():
    with pytest.raises(ValueError):
        QuantizeSoftmaxLogPass(base="log3")
    with pytest.raises(ValueError):
        QuantizeSoftmaxLogPass(bits=0)
