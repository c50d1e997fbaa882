"""QOperator lowering: QDQ islands -> QLinearConv / QLinearMatMul / MatMulInteger (+ contrib ops)."""

from collections import Counter

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import qpass
from qpass.backends import onnxruntime as ort_backend
from qpass.backends.qoperator import to_qoperator
from qpass.cli import main
from qpass.demo import demo_calibration, demo_cnn, demo_transformer
from qpass.verify import sqnr_db

INTEGER_OPS = {"QLinearConv", "QLinearMatMul", "MatMulInteger", "MatMulIntegerToFloat", "QGemm", "QLinearAdd",
               "QLinearMul", "QLinearSigmoid", "QLinearLeakyRelu", "QLinearConcat", "QLinearAveragePool",
               "QLinearGlobalAveragePool"}


def _mlp() -> onnx.ModelProto:
    """x -> MatMul -> MatMul -> Relu -> MatMul -> y: two islands with a Q after them, one float output."""
    rng = np.random.default_rng(0)
    w = lambda name, *shape: numpy_helper.from_array((rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32), name)  # noqa: E731
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h1"], name="mm1"),
             helper.make_node("MatMul", ["h1", "W2"], ["h2"], name="mm2"),
             helper.make_node("Relu", ["h2"], ["r2"], name="relu"),
             helper.make_node("MatMul", ["r2", "W3"], ["y"], name="mm3")]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8])],
                              [w("W1", 16, 32), w("W2", 32, 32), w("W3", 32, 8)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _ops_cnn() -> onnx.ModelProto:
    """Conv, SiLU, LeakyRelu, residual Add, Concat, AveragePool, GlobalAveragePool; a float Conv head."""
    rng = np.random.default_rng(3)
    inits = []

    def w(*shape):
        inits.append(numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), f"w{len(inits)}"))
        return inits[-1].name

    nodes = [
        helper.make_node("Conv", ["x", w(4, 3, 3, 3)], ["c0"], name="conv0", pads=[1, 1, 1, 1]),
        helper.make_node("Sigmoid", ["c0"], ["s0"], name="sig0"),
        helper.make_node("Mul", ["c0", "s0"], ["a0"], name="silu0"),
        helper.make_node("Conv", ["a0", w(4, 4, 3, 3)], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("LeakyRelu", ["c1"], ["a1"], name="lrelu1", alpha=0.1),
        helper.make_node("Add", ["a0", "a1"], ["r"], name="residual"),
        helper.make_node("Concat", ["r", "a1"], ["cat"], name="cat", axis=1),
        helper.make_node("AveragePool", ["cat"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p", w(4, 8, 1, 1)], ["c2"], name="conv2"),
        helper.make_node("GlobalAveragePool", ["c2"], ["g"], name="gap"),
        helper.make_node("Conv", ["g", w(5, 4, 1, 1)], ["y"], name="head"),
    ]
    graph = helper.make_graph(nodes, "ops", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5, 1, 1])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


_QDQ_CACHE: dict = {}


def _qdq(builder) -> ir.Model:
    """The w8a8 QDQ model of ``builder()`` (quantized once per test session; never modified by tests)."""
    if builder not in _QDQ_CACHE:
        proto = builder()
        _QDQ_CACHE[builder] = qpass.quantize(proto, demo_calibration(proto, 16, 1), report=False).model
    return _QDQ_CACHE[builder]


def _feeds(builder, n=3):
    return demo_calibration(builder(), n, seed=7)


def _census(model: ir.Model) -> Counter:
    return Counter(n.op_type for n in model.graph)


def _outputs(model: ir.Model, feeds, extra=()) -> list[dict]:
    session = ort_backend.make_session(model, optimize=True, extra_outputs=list(extra))
    return [ort_backend.run(session, f) for f in feeds]


def _assert_close_to_qdq(qdq: ir.Model, qop: ir.Model, feeds) -> None:
    """Float outputs agree up to the effect of rare 1-LSB requantization differences."""
    for ref, got in zip(_outputs(qdq, feeds), _outputs(qop, feeds)):
        assert list(ref) == list(got)
        for name in ref:
            assert got[name].shape == ref[name].shape and got[name].dtype == ref[name].dtype
            assert np.max(np.abs(got[name] - ref[name])) <= 0.02 * np.max(np.abs(ref[name])) + 1e-6, name
            assert sqnr_db(ref[name], got[name]) > 35, name


def _assert_codes_match(qdq: ir.Model, qop: ir.Model, feeds) -> int:
    """Integer tensors written by the new integer ops equal the QDQ model's Q outputs, up to rare 1-LSB steps."""
    names = [n.outputs[0].name for n in qop.graph if n.op_type in INTEGER_OPS and n.outputs[0].dtype in (ir.DataType.UINT8, ir.DataType.INT8)]
    assert names
    for ref, got in zip(_outputs(qdq, feeds, names), _outputs(qop, feeds, names)):
        for name in names:
            diff = np.abs(ref[name].astype(np.int32) - got[name].astype(np.int32))
            assert diff.max() <= 1 and np.mean(diff > 0) <= 0.01, name
    return len(names)


def _check(model: ir.Model) -> None:
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    ort_backend.make_session(model, optimize=True)


# --- default: default-domain ops only ------------------------------------------------------

def test_cnn_convs_become_qlinearconv():
    qdq = _qdq(demo_cnn)
    qop = to_qoperator(qdq)
    ops = _census(qop)
    assert ops["QLinearConv"] == 2 and ops["Conv"] == 0
    assert ops["Relu"] == 1  # conv Relus are absorbed (Q's zero point is 0); the MatMul head's stays
    for node in qop.graph:
        if node.op_type == "QLinearConv":
            assert not any(v.producer() is not None and v.producer().op_type == "DequantizeLinear" for v in node.inputs)
            w_scale, bias = node.inputs[4].const_value.numpy(), node.inputs[8]
            assert w_scale.shape == (node.inputs[3].const_value.shape[0],)  # per output channel
            assert bias.const_value.dtype == ir.DataType.INT32
        assert node.domain == ""
    assert "com.microsoft" not in qop.opset_imports
    # float-output MatMul/Gemm stay QDQ by default (onnxruntime fuses them)
    assert ops["MatMul"] == 1 and ops["Gemm"] == 1
    assert ops["DequantizeLinear"] < _census(qdq)["DequantizeLinear"]
    _check(qop)
    assert _assert_codes_match(qdq, qop, _feeds(demo_cnn)) == 2
    _assert_close_to_qdq(qdq, qop, _feeds(demo_cnn))


def test_mlp_matmuls_become_qlinearmatmul_with_per_column_scales():
    qdq = _qdq(_mlp)
    qop = to_qoperator(qdq)
    ops = _census(qop)
    assert ops["QLinearMatMul"] == 2 and ops["Relu"] == 0 and ops["MatMul"] == 1  # mm3's output is float
    for node in (n for n in qop.graph if n.op_type == "QLinearMatMul"):
        assert node.inputs[4].const_value.shape == (node.inputs[3].const_value.shape[1],)  # b_scale per column
    _check(qop)
    _assert_codes_match(qdq, qop, _feeds(_mlp))
    _assert_close_to_qdq(qdq, qop, _feeds(_mlp))


@pytest.mark.parametrize("builder", [demo_cnn, demo_transformer, _mlp])
def test_matmul_integer_lowers_float_output_islands(builder):
    qdq = _qdq(builder)
    qop = to_qoperator(qdq, matmul_integer=True)
    ops = _census(qop)
    assert ops["MatMul"] == ops["Gemm"] == 0 and ops["MatMulInteger"] >= 1
    assert ops["Cast"] >= ops["MatMulInteger"]
    assert not any(v.producer() is not None and v.producer().op_type == "DequantizeLinear"
                   for n in qop.graph if n.op_type == "MatMulInteger" for v in n.inputs if v is not None)
    _check(qop)
    _assert_close_to_qdq(qdq, qop, _feeds(builder))


def test_transformer_default_leaves_float_output_matmuls_in_qdq():
    qdq = _qdq(demo_transformer)
    qop = to_qoperator(qdq)
    assert _census(qop) == _census(qdq)  # every MatMul output is read in float (bias Add, Softmax, ...)


def test_input_model_is_not_modified():
    qdq = _qdq(demo_cnn)
    before = ir.to_proto(qdq).SerializeToString()
    for options in ({}, {"contrib_ops": True}, {"matmul_integer": True}):
        to_qoperator(qdq, **options)
    assert ir.to_proto(qdq).SerializeToString() == before


def test_islands_qoperator_cannot_express_stay_qdq():
    qdq = _qdq(demo_cnn).clone()
    conv_a, conv_b = [n for n in qdq.graph if n.op_type == "Conv"]
    # conv_a -> Relu -> Q with a zero point above 0: the Q no longer clips what the Relu clips
    q = conv_a.outputs[0].uses()[0].node.outputs[0].uses()[0].node
    assert q.op_type == "QuantizeLinear"
    zero = ir.Value(name="shifted_zero", const_value=ir.tensor(np.array(5, np.uint8)))
    qdq.graph.register_initializer(zero)
    q.replace_input_with(2, zero)
    # conv_b's bias scale is not s_x * s_w, as QLinearConv assumes
    bias_dq = conv_b.inputs[2].producer()
    scale = ir.Value(name="doubled_scale", const_value=ir.tensor(bias_dq.inputs[1].const_value.numpy() * 2))
    qdq.graph.register_initializer(scale)
    bias_dq.replace_input_with(1, scale)
    qop = to_qoperator(qdq)
    assert _census(qop)["QLinearConv"] == 0 and _census(qop)["Conv"] == 2
    _check(qop)


# --- contrib ops ---------------------------------------------------------------------------

def test_contrib_ops_lower_elementwise_concat_and_pools():
    qdq = _qdq(_ops_cnn)
    plain = to_qoperator(qdq)
    assert {n.domain for n in plain.graph} == {""}
    assert _census(plain)["QLinearConv"] == 4 and _census(plain)["Sigmoid"] == 1
    qop = to_qoperator(qdq, contrib_ops=True)
    ops = _census(qop)
    for op in ("QLinearSigmoid", "QLinearMul", "QLinearLeakyRelu", "QLinearAdd", "QLinearConcat", "QLinearAveragePool", "QLinearGlobalAveragePool"):
        assert ops[op] == 1, op
    assert ops["QLinearConv"] == 4 and ops["Conv"] == 0  # the head writing the model output too
    assert qop.opset_imports["com.microsoft"] == 1
    assert all(n.domain == "com.microsoft" for n in qop.graph if n.op_type in ("QLinearSigmoid", "QLinearConcat"))
    _check(qop)
    assert _assert_codes_match(qdq, qop, _feeds(_ops_cnn)) == 11
    _assert_close_to_qdq(qdq, qop, _feeds(_ops_cnn))


@pytest.mark.parametrize("builder", [demo_cnn, demo_transformer])
def test_contrib_ops_use_qgemm_and_matmulintegertofloat(builder):
    qdq = _qdq(builder)
    qop = to_qoperator(qdq, contrib_ops=True)
    ops = _census(qop)
    assert ops["MatMul"] == ops["Gemm"] == 0
    assert ops["MatMulIntegerToFloat"] + ops["QGemm"] >= 1
    _check(qop)
    _assert_close_to_qdq(qdq, qop, _feeds(builder))


# --- qpass.quantize and the CLI ------------------------------------------------------------

def test_quantize_format_qoperator_and_report():
    proto = demo_cnn()
    result = qpass.quantize(proto, demo_calibration(proto, 16, 1), format="qoperator")
    assert _census(result.model)["QLinearConv"] == 2
    assert result.report.fused["integer"]["QLinearConv"] == 2 and result.report.layers
    _assert_close_to_qdq(_qdq(demo_cnn), result.model, _feeds(demo_cnn))


def test_unknown_format_is_a_clear_error():
    proto = demo_cnn()
    with pytest.raises(qpass.PipelineError, match="unknown output format 'qlinear': choose one of qdq, qoperator"):
        qpass.quantize(proto, demo_calibration(proto, 2), format="qlinear")
    with pytest.raises(qpass.PipelineError, match="use them with format 'qoperator'"):
        qpass.run(proto, recipe="fold", contrib_ops=True)


def _cli_inputs(tmp_path):
    proto = demo_cnn()
    src = tmp_path / "cnn.onnx"
    onnx.save(proto, src)
    np.savez(tmp_path / "calib.npz", input=np.concatenate([f["input"] for f in demo_calibration(proto, 8)]))
    return src, tmp_path / "calib.npz"


@pytest.mark.parametrize("command", ["quantize", "run"])
def test_cli_format_qoperator_writes_a_valid_model(tmp_path, command):
    src, calib = _cli_inputs(tmp_path)
    out = tmp_path / "cnn.qop.onnx"
    args = [command, str(src), "-o", str(out), "--calib", str(calib), "--format", "qoperator"]
    result = CliRunner().invoke(main, args + (["--recipe", "w8a8"] if command == "run" else []))
    assert result.exit_code == 0, result.output
    written = onnx.load(out)
    onnx.checker.check_model(written, full_check=True)
    assert Counter(n.op_type for n in written.graph.node)["QLinearConv"] == 2
    assert all(n.domain == "" for n in written.graph.node)
    ort_backend.make_session(qpass.load_model(out), optimize=True)


def test_cli_bad_format_is_one_line(tmp_path):
    src, calib = _cli_inputs(tmp_path)
    for extra, fragment in ((["--format", "qlinear"], "unknown output format 'qlinear'"), (["--contrib-ops"], "format 'qoperator'")):
        result = CliRunner().invoke(main, ["quantize", str(src), "-o", str(tmp_path / "o.onnx"), "--calib", str(calib), *extra])
        assert result.exit_code == 2, result.output
        assert result.output.strip().splitlines() == [result.output.strip()] and result.output.startswith("qpass: error:")
        assert fragment in result.output
    assert not (tmp_path / "o.onnx").exists()
