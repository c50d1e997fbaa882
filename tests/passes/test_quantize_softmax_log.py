import dataclasses
import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import qpass
from qpass.demo import demo_calibration, demo_vit
from qpass.passes.quantize_softmax_log import (
    INV_SQRT2,
    QuantizeSoftmaxLogPass,
    log_dequantize_reference,
    log_quantize_reference,
    parity_split_reference,
)
from qpass.registry import load_recipe
from qpass.verify import run_model, sqnr_db


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
    with pytest.raises(ValueError):
        QuantizeSoftmaxLogPass(deploy="shift")
    with pytest.raises(ValueError, match="log_sqrt2"):
        QuantizeSoftmaxLogPass(base="log2", deploy="log2-parity")


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
def test_parity_split_code_table_is_bit_identical(bits):
    codes = np.arange(0, 2**bits + 1)
    even, odd = parity_split_reference(codes, bits)
    q = codes[:-1]
    # each part is a log2 level 2^-floor(q/2) (or 0), exactly a power of two
    live = np.where(q % 2 == 0, even[:-1], odd[:-1])
    np.testing.assert_array_equal(live, 2.0 ** -(q // 2))
    assert np.all(np.where(q % 2 == 0, odd[:-1], even[:-1]) == 0) and even[-1] == odd[-1] == 0
    # 2^(-q/2) = 2^(-floor(q/2)) * (q odd ? 1/sqrt2 : 1), bit for bit against the log-sqrt2 dequantizer
    recombined = even + odd * INV_SQRT2
    expected = log_dequantize_reference(codes, bits, "log_sqrt2")
    assert np.array_equal(recombined.view(np.int32), expected.view(np.int32))


@pytest.mark.parametrize("inline", [False, True])
@pytest.mark.parametrize("bits", [4, 6])
def test_parity_onnx_is_bit_identical_to_the_log_sqrt2_reference(inline, bits):
    proto = _probs_model()
    model = qpass.load_model(proto)
    report = QuantizeSoftmaxLogPass(bits=bits, deploy="log2-parity", inline=inline)(model)
    assert report.rewritten == 1 and report.details["matmuls_split"] == 1
    ops = [n.op_type for n in model.graph]
    assert ops.count("MatMul") == 2 and "Add" in ops
    parts = [n.inputs[0] for n in model.graph if n.op_type == "MatMul"]
    assert all(v.meta["qpass.log_quantized"] == "log2-parity" for v in parts)  # later quantizers skip them
    if not inline:
        function = model.functions[("ai.qpass", f"LogSqrt2Parity_{bits}bit", "")]
        assert [v.name for v in function.outputs] == ["P_even", "P_odd"]
    qpass.pipeline.check_graph(model)
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((64, 16)) * 4).astype(np.float32)
    logits[:8, 5:] = -np.inf
    logits[8, :] = 0.0  # uniform row: every p = 1/16 = 2^-4, an exact level (code 8)
    feeds = {"x": logits, "eye": np.eye(16, dtype=np.float32)}
    # with V = I: O = P_even + (P_odd·I)/√2 elementwise, the parity form's dequantized probabilities
    got = run_model(model, feeds)["o"]
    p = run_model(qpass.load_model(proto), feeds)["o"]
    expected = log_dequantize_reference(log_quantize_reference(p, bits, "log_sqrt2"), bits, "log_sqrt2")
    assert np.array_equal(got.view(np.int32), expected.view(np.int32))
    assert np.all(got[:8, 5:] == 0)
    direct = qpass.load_model(proto)
    QuantizeSoftmaxLogPass(bits=bits, inline=inline)(direct)
    d = run_model(direct, feeds)["o"]
    assert np.all(np.abs(got - d) <= np.spacing(np.maximum(np.abs(d), np.float32(1e-30))))


def test_parity_deploy_gives_the_same_vit_model_output():
    proto = demo_vit()
    cal, ev = demo_calibration(proto, 8), demo_calibration(proto, 2, seed=9)
    ref = np.concatenate([run_model(qpass.load_model(proto), e)["embedding"].ravel() for e in ev])
    got = {}
    for deploy in ("direct", "log2-parity"):
        passes = [dataclasses.replace(p, deploy=deploy) if p.name == "quantize-softmax-log" else p for p in load_recipe("repq-w4a4").build()]
        result = qpass.quantize(proto, cal, passes=passes, report=False)
        got[deploy] = np.concatenate([run_model(result.model, e)["embedding"].ravel() for e in ev])
        stats = next(s for s in result.stats if s.name == "quantize-softmax-log")
        assert stats.rewritten == 2 and stats.details["deploy"] == deploy
    # same quantized values; P·V only sums in another order
    np.testing.assert_allclose(got["log2-parity"], got["direct"], rtol=0, atol=1e-5 * np.abs(got["direct"]).max())
    assert abs(sqnr_db(ref, got["log2-parity"]) - sqnr_db(ref, got["direct"])) < 0.01


@pytest.mark.parametrize("deploy", ["direct", "log2-parity"])
def test_sdpa_nan_guard_between_softmax_and_pv_is_followed(deploy):
    # torch's scaled_dot_product_attention exports P = Where(IsNaN(softmax), 0, softmax)
    graph = helper.make_graph(
        [helper.make_node("Softmax", ["x"], ["p"], name="softmax", axis=-1),
         helper.make_node("IsNaN", ["p"], ["nan"], name="isnan"),
         helper.make_node("Where", ["nan", "zero", "p"], ["pg"], name="guard"),
         helper.make_node("MatMul", ["pg", "eye"], ["o"], name="pv")],
        "guarded", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64, 16]), helper.make_tensor_value_info("eye", TensorProto.FLOAT, [16, 16])],
        [helper.make_tensor_value_info("o", TensorProto.FLOAT, [64, 16])],
        [onnx.numpy_helper.from_array(np.array(0.0, np.float32), "zero")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model = qpass.load_model(proto)
    report = QuantizeSoftmaxLogPass(bits=4, deploy=deploy)(model)
    assert report.rewritten == 1 and not report.skipped
    qpass.pipeline.check_graph(model)
    feeds = {"x": (np.random.default_rng(2).standard_normal((64, 16)) * 4).astype(np.float32), "eye": np.eye(16, dtype=np.float32)}
    p = run_model(qpass.load_model(proto), feeds)["o"]
    expected = log_dequantize_reference(log_quantize_reference(p, 4, "log_sqrt2"), 4, "log_sqrt2")
    assert np.array_equal(run_model(model, feeds)["o"], expected)


@pytest.mark.parametrize("inline", [False, True])
def test_parity_rewrite_is_deterministic(kit, inline):
    kit.check_deterministic(QuantizeSoftmaxLogPass(deploy="log2-parity", inline=inline), _attention())
