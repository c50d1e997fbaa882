"""Weight-only quantization (w4a16 group-wise int4, w8a16 per-channel int8): form, codes, fusion, accuracy."""

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import qpass
from qpass.api import build_passes
from qpass.backends.onnxruntime import fused_op_census, make_session
from qpass.cli import main
from qpass.demo import demo_calibration, demo_cnn, demo_transformer
from qpass.verify import probe_feeds, run_model, sqnr_db


def _w4(group_size: int = 128, **options) -> str:
    extra = "".join(f",{k}={v}" for k, v in options.items())
    return f"annotate-quant(activations=false,weight_dtype=int4,group_size={group_size}{extra}),insert-qdq,eliminate-dead-nodes"


def _rtn_reference(w: np.ndarray, group_size: int, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int4 RTN in NumPy: scale = max|w| / 7 per group of ``group_size`` along ``axis``."""
    wk = np.moveaxis(w, axis, 0).astype(np.float64)
    codes, scales = np.empty_like(wk), []
    for start in range(0, wk.shape[0], group_size):
        block = wk[start:start + group_size]
        scale = (np.abs(block).max(axis=0) / 7).astype(np.float32)
        scale = np.where(scale > 0, scale, np.float32(1.0))
        codes[start:start + group_size] = np.clip(np.rint(block / scale.astype(np.float64)), -7, 7)
        scales.append(scale)
    return np.moveaxis(codes, 0, axis).astype(np.int8), np.moveaxis(np.stack(scales), 0, axis)


def _search_reference(w: np.ndarray, group_size: int, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """The w4a16 clipping search in plain NumPy loops, one group of one column at a time: int4
    [-8, 7]; the group negated (scale stored negative) when its largest |w| is positive; candidates
    m/7 (RTN), m/8, m/7.5·r for r = 0.70, 0.71, ..., 1.00 (m = max|w|, float32 scales); the first
    of least float64 squared error ||w - s·clip(round(w/s), -8, 7)||²."""
    wk = np.moveaxis(w, axis, 0).astype(np.float64)
    codes, scales = np.empty_like(wk), np.empty((-(-wk.shape[0] // group_size), wk.shape[1]), np.float32)
    for gi, start in enumerate(range(0, wk.shape[0], group_size)):
        for col in range(wk.shape[1]):
            block = wk[start:start + group_size, col]
            sign = -1.0 if block[np.abs(block).argmax()] > 0 else 1.0
            m = np.abs(block).max()
            best = None
            for divisor in [7.0, 8.0] + [7.5 / (0.70 + 0.01 * i) for i in range(31)]:
                scale = np.float32(m / divisor) if m > 0 else np.float32(1.0)
                q = np.clip(np.rint(sign * block / np.float64(scale)), -8, 7)
                err = float(np.sum((sign * block - np.float64(scale) * q) ** 2))
                if best is None or err < best[0]:
                    best = (err, sign * scale, q)  # w = (sign·s)·q: the codes of the negated group
            scales[gi, col], codes[start:start + group_size, col] = best[1], best[2]
    return np.moveaxis(codes, 0, axis).astype(np.int8), np.moveaxis(scales, 0, axis)


def _group_errors(w: np.ndarray, codes: np.ndarray, scales: np.ndarray, group_size: int) -> np.ndarray:
    """Squared weight error of each (group, column) for a [K, N] weight quantized along K."""
    dq = codes.astype(np.float64) * np.repeat(scales.astype(np.float64), group_size, axis=0)[: w.shape[0]]
    sq = (w.astype(np.float64) - dq) ** 2
    return np.add.reduceat(sq, np.arange(0, w.shape[0], group_size), axis=0)


def _dq_of(model: ir.Model, node_name: str) -> ir.Node:
    return model.graph.node(node_name).inputs[1].producer()


def _mlp(k: int = 200) -> onnx.ModelProto:
    """x[N, 256] -> MatMul+Add -> Tanh -> MatMul -> Tanh -> MatMul -> y[N, 10]; the last MatMul has K = ``k``.

    (Tanh, not Relu: onnxruntime 1.32 does not fuse a MatMul whose only reader is a Relu/Clip
    that feeds another node into MatMulNBits; it takes the Relu for a clip before a Q.)
    """
    rng = np.random.default_rng(0)
    lin = lambda i, o: (rng.standard_normal((i, o)) / np.sqrt(i)).astype(np.float32)  # noqa: E731
    w2 = lin(512, k)
    w2[:, 5] = 0.0  # an all-zero column: every group of it gets a valid scale
    inits = [numpy_helper.from_array(a, n) for n, a in [
        ("W1", lin(256, 512)), ("b1", np.full(512, 0.1, np.float32)), ("W2", w2), ("W3", lin(k, 10)),
    ]]
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["m1"], name="fc1"), helper.make_node("Add", ["m1", "b1"], ["a1"], name="fc1.add"),
        helper.make_node("Tanh", ["a1"], ["r1"], name="act1"), helper.make_node("MatMul", ["r1", "W2"], ["m2"], name="fc2"),
        helper.make_node("Tanh", ["m2"], ["r2"], name="act2"), helper.make_node("MatMul", ["r2", "W3"], ["y"], name="fc3"),
    ]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 256])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _matmulnbits(model: ir.Model) -> dict:
    """onnxruntime's fused-op census, stated for 1.32: its DQ->MatMul selector fuses blocked int4
    (axis 0, block_size a power of two >= 16) and per-channel int8 weights into MatMulNBits."""
    if not ort.__version__.startswith("1.32"):
        pytest.skip(f"fused-op census stated for onnxruntime 1.32, found {ort.__version__}")
    return fused_op_census(model)


def test_int4_codes_and_scales_match_numpy_rtn_with_a_partial_last_group():
    proto = _mlp(k=200)
    model = qpass.run(proto, passes=_w4(group_size=64)).model
    weights = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    for node_name, name in (("fc1", "W1"), ("fc2", "W2"), ("fc3", "W3")):
        dq = _dq_of(model, node_name)
        assert dq.op_type == "DequantizeLinear" and len(dq.inputs) == 2  # symmetric: no zero-point
        assert dq.attributes.get_int("axis") == 0 and dq.attributes.get_int("block_size") == 64
        q, scale = dq.inputs[0].const_value, dq.inputs[1].const_value
        assert q.dtype == ir.DataType.INT4 and q.shape == weights[name].shape
        assert scale.dtype == ir.DataType.FLOAT
        codes, scales = _rtn_reference(weights[name], 64, axis=0)
        assert scale.shape == (-(-weights[name].shape[0] // 64), weights[name].shape[1])
        np.testing.assert_array_equal(q.numpy().astype(np.int8), codes)
        np.testing.assert_array_equal(scale.numpy(), scales)
    assert _dq_of(model, "fc3").inputs[1].const_value.shape == (4, 10)  # K = 200: groups of 64, 64, 64, 8
    assert model.opset_imports[""] == 21


def test_clip_search_codes_and_scales_match_the_numpy_reference():
    proto = _mlp(k=200)
    weights = {t.name: numpy_helper.to_array(t).copy() for t in proto.graph.initializer}
    weights["W3"][:64, 3] = 0.0  # a whole group of zeros: scale 1, codes 0
    weights["W3"][70, 4] = 5.0  # one outlier in a group: the search clips it
    proto.graph.ClearField("initializer")
    proto.graph.initializer.extend(numpy_helper.from_array(a, n) for n, a in weights.items())
    model = qpass.run(proto, passes=_w4(group_size=64, weight_observer="mse")).model
    for node_name, name in (("fc1", "W1"), ("fc2", "W2"), ("fc3", "W3")):
        dq = _dq_of(model, node_name)
        assert len(dq.inputs) == 2 and dq.attributes.get_int("block_size") == 64  # same form as RTN: no zero-point
        q, scale = dq.inputs[0].const_value, dq.inputs[1].const_value
        assert q.dtype == ir.DataType.INT4 and scale.dtype == ir.DataType.FLOAT
        codes, scales = _search_reference(weights[name], 64, axis=0)
        np.testing.assert_array_equal(q.numpy().astype(np.int8), codes)
        np.testing.assert_array_equal(scale.numpy(), scales)
        assert codes.min() == -8 and (scales < 0).any() and (scales > 0).any()  # full range, both orientations
    assert _dq_of(model, "fc3").inputs[1].const_value.numpy()[0, 3] == 1.0


def test_clip_search_error_is_never_above_rtn_per_group():
    rng = np.random.default_rng(5)
    w = rng.standard_normal((300, 48)).astype(np.float32)  # K = 300: groups of 128, 128, 44
    w[:, :16] = rng.laplace(size=(300, 16)).astype(np.float32)  # heavy tails: clipping pays
    w[5, 20], w[140, 21] = 9.0, -9.0
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], "one",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 300])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 48])], [numpy_helper.from_array(w, "W")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    errors = {}
    for observer in ("minmax", "mse"):
        dq = _dq_of(qpass.run(proto, passes=_w4(weight_observer=observer)).model, "mm")
        errors[observer] = _group_errors(w, dq.inputs[0].const_value.numpy().astype(np.int8), dq.inputs[1].const_value.numpy(), 128)
    np.testing.assert_array_equal(errors["minmax"], _group_errors(w, *_rtn_reference(w, 128, 0), 128))
    assert errors["mse"].shape == (3, 48) and np.all(errors["mse"] <= errors["minmax"])
    assert errors["mse"].sum() < 0.8 * errors["minmax"].sum()  # int4 RTN leaves a lot on the table


def test_clip_search_model_computes_exactly_its_codes_times_scales():
    proto = _mlp(k=200)
    w = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    model = qpass.run(proto, passes=_w4(weight_observer="mse", exclude="[fc1,fc2]")).model  # fc3 alone
    dq = _dq_of(model, "fc3")
    scales = dq.inputs[1].const_value.numpy()
    assert (scales < 0).any()  # negative scales: run as written and fused
    w_dq = dq.inputs[0].const_value.numpy().astype(np.float32) * np.repeat(scales, 128, axis=0)[:200]
    feeds = probe_feeds(qpass.load_model(proto), 0)
    hidden = np.tanh(np.tanh(feeds["x"] @ w["W1"] + w["b1"]) @ w["W2"])
    exact = run_model(model, feeds)["y"]  # DequantizeLinear as written
    np.testing.assert_allclose(exact, hidden @ w_dq, rtol=1e-5, atol=1e-5)
    fused = make_session(model, optimize=True).run(None, feeds)[0]  # MatMulNBits
    assert sqnr_db(exact, fused) > 30.0


def test_asymmetric_uint4_search_option():
    proto = _mlp(k=200)
    w2 = numpy_helper.to_array(next(t for t in proto.graph.initializer if t.name == "W2"))
    errors = {}
    for observer in ("minmax", "mse"):
        model = qpass.run(proto, passes=_w4(weight_dtype="uint4", symmetric_weights="false", weight_observer=observer)).model
        dq = _dq_of(model, "fc2")
        assert len(dq.inputs) == 3 and dq.inputs[2].const_value.dtype == ir.DataType.UINT4
        q, s, z = (dq.inputs[i].const_value.numpy().astype(np.float64) for i in range(3))
        dequantized = (q - np.repeat(z, 128, axis=0)[:512]) * np.repeat(s, 128, axis=0)[:512]
        errors[observer] = np.add.reduceat((w2 - dequantized) ** 2, [0, 128, 256, 384], axis=0)
        assert np.all(s > 0)
    assert np.all(errors["mse"] <= errors["minmax"]) and errors["mse"].sum() < 0.9 * errors["minmax"].sum()
    census = _matmulnbits(model)
    assert census["integer"] == {"MatMulNBits": 3} and census["float_behind_dq"] == {}


def test_weight_observer_is_validated():
    with pytest.raises(qpass.errors.UnknownNameError, match="unknown weight_observer 'entropy'"):
        build_passes(None, "annotate-quant(weight_observer=entropy)")


def test_w4a16_recipe_uses_the_search():
    annotate = next(p for p in build_passes("w4a16") if p.name == "annotate-quant")
    assert annotate.weight_observer == "mse" and annotate.symmetric_weights
    proto = _mlp(k=200)
    model = qpass.quantize(proto, demo_calibration(proto, 2), recipe="w4a16", report=False).model
    w2 = numpy_helper.to_array(next(t for t in proto.graph.initializer if t.name == "W2"))
    codes, scales = _search_reference(w2, 128, axis=0)
    dq = _dq_of(model, "fc2")
    np.testing.assert_array_equal(dq.inputs[0].const_value.numpy().astype(np.int8), codes)
    np.testing.assert_array_equal(dq.inputs[1].const_value.numpy(), scales)


def test_gemm_weights_group_along_k_and_untranspose_when_alone():
    rng = np.random.default_rng(1)
    wt = rng.standard_normal((24, 160)).astype(np.float32)  # Gemm transB=1: [N, K]
    shared = rng.standard_normal((160, 160)).astype(np.float32)
    nodes = [
        helper.make_node("Gemm", ["x", "Wt", "b"], ["g"], name="gemm_t", transB=1),
        helper.make_node("Gemm", ["x", "S"], ["s1"], name="shared_a", transB=1),
        helper.make_node("Gemm", ["s1", "S"], ["s2"], name="shared_b", transB=1),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 160])],
                              [helper.make_tensor_value_info("g", TensorProto.FLOAT, [2, 24]),
                               helper.make_tensor_value_info("s2", TensorProto.FLOAT, [2, 160])],
                              [numpy_helper.from_array(wt, "Wt"), numpy_helper.from_array(np.ones(24, np.float32), "b"),
                               numpy_helper.from_array(shared, "S")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model = qpass.run(proto, passes=_w4()).model
    gemm = model.graph.node("gemm_t")
    assert gemm.attributes.get_int("transB", 0) == 0  # stored [K, N]: the layout MatMulNBits reads
    dq = gemm.inputs[1].producer()
    assert dq.attributes.get_int("axis") == 0 and dq.inputs[0].const_value.shape == (160, 24)
    codes, scales = _rtn_reference(wt.T, 128, axis=0)
    np.testing.assert_array_equal(dq.inputs[0].const_value.numpy().astype(np.int8), codes)
    np.testing.assert_array_equal(dq.inputs[1].const_value.numpy(), scales)
    shared_dq = model.graph.node("shared_a").inputs[1].producer()  # two readers: layout kept, blocks along axis 1
    assert model.graph.node("shared_a").attributes.get_int("transB") == 1 and model.graph.node("shared_b").inputs[1].producer() is shared_dq
    assert shared_dq.attributes.get_int("axis") == 1 and shared_dq.inputs[1].const_value.shape == (160, 2)
    feeds = {"x": rng.standard_normal((2, 160)).astype(np.float32)}
    ref, got = run_model(qpass.load_model(proto), feeds), run_model(model, feeds)
    assert sqnr_db(ref["g"], got["g"]) > 14 and sqnr_db(ref["s2"], got["s2"]) > 10


def test_odd_shapes_and_convs_are_left_float():
    rng = np.random.default_rng(2)
    nodes = [
        helper.make_node("MatMul", ["x", "V"], ["dot"], name="vector"),  # 1-D weight
        helper.make_node("MatMul", ["x3", "B3"], ["batched"], name="batched"),  # 3-D weight
        helper.make_node("MatMul", ["x", "x_t"], ["act"], name="act_x_act"),  # no constant
        helper.make_node("Conv", ["img", "C"], ["conv"], name="conv"),
    ]
    graph = helper.make_graph(
        nodes, "odd",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 32]), helper.make_tensor_value_info("x3", TensorProto.FLOAT, [3, 2, 32]),
         helper.make_tensor_value_info("x_t", TensorProto.FLOAT, [32, 2]), helper.make_tensor_value_info("img", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 2, 2, 2][:r]) for n, r in (("dot", 1), ("batched", 3), ("act", 2), ("conv", 4))],
        [numpy_helper.from_array(rng.standard_normal(32).astype(np.float32), "V"),
         numpy_helper.from_array(rng.standard_normal((3, 32, 16)).astype(np.float32), "B3"),
         numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "C")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    result = qpass.run(proto, passes=_w4(op_types="[MatMul,Gemm,Conv]"))
    assert all(n.op_type != "DequantizeLinear" for n in result.model.graph)
    assert result.stats[0].skipped == {"group-wise weight not 2-D": 2, "Conv weight: group-wise is for MatMul/Gemm": 1}
    assert result.model.opset_imports[""] == 17  # nothing needed opset 21


def test_w4a16_fuses_into_matmulnbits_and_stays_close_to_float(tmp_path):
    proto = _mlp(k=200)
    result = qpass.quantize(proto, demo_calibration(proto, 4), recipe="w4a16")
    census = _matmulnbits(result.model)
    assert census["integer"] == {"MatMulNBits": 3} and census["float_behind_dq"] == {}
    path = qpass.save_model(result.model, tmp_path / "mlp.w4a16.onnx")
    saved = onnx.load(path)
    onnx.checker.check_model(saved, full_check=True)
    assert saved.opset_import[0].version == 21 and saved.ir_version >= 10
    feeds = [probe_feeds(qpass.load_model(proto), seed) for seed in range(4)]
    ref = np.concatenate([run_model(qpass.load_model(proto), f)["y"].ravel() for f in feeds])
    exact = np.concatenate([run_model(result.model, f)["y"].ravel() for f in feeds])  # DequantizeLinear as written
    session = make_session(result.model, optimize=True)  # MatMulNBits
    fused = np.concatenate([session.run(None, f)[0].ravel() for f in feeds])
    assert sqnr_db(ref, exact) > 14.8 and sqnr_db(ref, fused) > 14.8  # three int4 layers: about 15.6 dB (plain RTN: 13.9)
    assert path.stat().st_size < 0.2 * sum(t.raw_data.__len__() for t in proto.graph.initializer)


@pytest.mark.parametrize("recipe,floor", [("w4a16", 19.0), ("w8a16", 35.0)])  # w4a16: 20.2 dB (plain RTN: 18.4)
def test_weight_only_recipes_on_the_demo_transformer(recipe, floor):
    proto = demo_transformer()
    result = qpass.quantize(proto, demo_calibration(proto, 4), recipe=recipe)
    assert result.report.output_sqnr_db["output"] > floor
    census = _matmulnbits(result.model)
    assert census["integer"] == {"MatMulNBits": 6} and census["float_behind_dq"] == {}
    assert not any(n.op_type == "QuantizeLinear" for n in result.model.graph)  # activations stay float
    assert result.model.opset_imports[""] == (21 if recipe == "w4a16" else 20)


def test_w8a16_is_per_channel_int8_at_the_model_opset():
    proto = _mlp()
    model = qpass.quantize(proto, demo_calibration(proto, 2), recipe="w8a16", report=False).model
    dq = _dq_of(model, "fc2")
    assert dq.attributes.get_int("axis") == 1 and dq.inputs[0].const_value.dtype == ir.DataType.INT8
    w = numpy_helper.to_array(next(t for t in proto.graph.initializer if t.name == "W2"))
    scale = np.where(np.abs(w).max(axis=0) > 0, np.abs(w).max(axis=0) / 127, 1.0).astype(np.float32)
    np.testing.assert_array_equal(dq.inputs[1].const_value.numpy(), scale)
    assert model.opset_imports[""] == 17


def test_opset_is_raised_with_reduce_axes_moved_to_an_input():
    rng = np.random.default_rng(3)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["m"], name="mm"),
             helper.make_node("ReduceMean", ["m"], ["y"], name="mean", axes=[-1], keepdims=1)]
    graph = helper.make_graph(nodes, "r", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 1])],
                              [numpy_helper.from_array(rng.standard_normal((64, 8)).astype(np.float32), "W")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model = qpass.run(proto, passes=_w4(group_size=32)).model
    mean = model.graph.node("mean")
    assert model.opset_imports[""] == 21 and "axes" not in mean.attributes
    assert mean.inputs[1].producer().op_type == "Constant"
    dq = _dq_of(model, "mm")
    w_dq = dq.inputs[0].const_value.numpy().astype(np.float32) * np.repeat(dq.inputs[1].const_value.numpy(), 32, axis=0)
    x = rng.standard_normal((2, 64)).astype(np.float32)
    np.testing.assert_allclose(run_model(model, {"x": x})["y"], (x @ w_dq).mean(axis=-1, keepdims=True), rtol=1e-5, atol=1e-6)


def test_opset_raise_refuses_an_op_whose_meaning_changed():
    rng = np.random.default_rng(4)
    nodes = [helper.make_node("DFT", ["x"], ["f"], name="dft", axis=1),  # opset 20 moved axis to an input
             helper.make_node("MatMul", ["f", "W"], ["y"], name="mm")]
    graph = helper.make_graph(nodes, "dft", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 32, 1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32, 8])],
                              [numpy_helper.from_array(rng.standard_normal((2, 8)).astype(np.float32), "W")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(qpass.ModelError, match="'DFT'.*re-export the model at opset 21"):
        qpass.run(proto, passes=_w4(group_size=16), verify=False)


def test_int4_per_channel_weights_now_raise_the_opset_too():
    proto = demo_cnn()
    model = qpass.quantize(proto, demo_calibration(proto, 4), weight_dtype="int4", report=False).model
    assert model.opset_imports[""] == 21
    dq = _dq_of(model, "fc2")
    assert dq.inputs[0].const_value.dtype == ir.DataType.INT4 and "block_size" not in dq.attributes


def test_only_passes_that_read_data_need_calibration():
    proto = demo_transformer()
    for recipe in ("w4a16", "w8a16"):
        assert qpass.quantize(proto, None, recipe=recipe, report=False).model is not None
    for recipe in ("w8a8", "smoothquant-w8a8"):
        with pytest.raises(qpass.CalibrationError, match="needs calibration data"):
            qpass.quantize(proto, None, recipe=recipe, report=False)
    with pytest.raises(qpass.CalibrationError, match="needs calibration data"):
        qpass.quantize(proto, None, passes=_w4(overrides="{fc1: {activations: true}}"), report=False)


def test_cli_quantize_w4a16_without_calibration(tmp_path):
    src, out = tmp_path / "t.onnx", tmp_path / "t.w4a16.onnx"
    onnx.save(demo_transformer(), src)
    result = CliRunner().invoke(main, ["quantize", str(src), "-o", str(out), "--recipe", "w4a16"])
    assert result.exit_code == 0, result.output
    assert "MatMulNBits" in result.output and "needs no calibration data" in result.output
    saved = onnx.load(out)
    onnx.checker.check_model(saved, full_check=True)
    assert saved.opset_import[0].version == 21
    result = CliRunner().invoke(main, ["quantize", str(src), "-o", str(tmp_path / "x.onnx")])  # w8a8 still needs data
    assert result.exit_code == 2 and "needs calibration data" in result.output


def test_api_weight_only_needs_no_calibration_data():
    from qpass.demo import demo_transformer

    result = qpass.quantize(demo_transformer(), None, recipe="w4a16")
    assert any(n.attributes.get_int("block_size", 0) for n in result.model.graph if n.op_type == "DequantizeLinear")
    with pytest.raises(qpass.CalibrationError):
        qpass.quantize(demo_transformer(), None, recipe="w8a8")


def test_per_tensor_weight_only_gemm_untransposes():
    """w8a16 with per-tensor weights on a lone Gemm(transB=1): the weight is stored [K, N] as well."""
    rng = np.random.default_rng(2)
    wt = rng.standard_normal((24, 160)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("Gemm", ["x", "Wt"], ["g"], name="gemm_t", transB=1)], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 160])],
                              [helper.make_tensor_value_info("g", TensorProto.FLOAT, [2, 24])], [numpy_helper.from_array(wt, "Wt")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model = qpass.quantize(proto, recipe="w8a16", per_channel=False, report=False).model
    gemm = model.graph.node("gemm_t")
    assert gemm.attributes.get_int("transB", 0) == 0 and gemm.inputs[1].producer().inputs[1].const_value.size == 1
    feeds = {"x": rng.standard_normal((2, 160)).astype(np.float32)}
    assert sqnr_db(run_model(qpass.load_model(proto), feeds)["g"], run_model(model, feeds)["g"]) > 30
