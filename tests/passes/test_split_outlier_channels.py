import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import qpass
from qpass.passes.split_outlier_channels import SplitOutlierChannelsPass, split_activation_channels, split_channels
from qpass.pipeline import Pipeline
from qpass.verify import run_model, sqnr_db


def _quant_error(w: np.ndarray) -> np.ndarray:
    step = np.abs(w).max(axis=0) / 127
    return np.round(w / step) * step


def test_qa_split_halves_round_to_the_whole():
    rng = np.random.default_rng(0)
    w = rng.standard_normal(10000)
    delta = 0.037
    q = lambda v: np.round(v / delta)  # noqa: E731
    assert np.array_equal(q(w / 2 - delta / 4) + q(w / 2 + delta / 4), q(w))


@pytest.mark.parametrize("qa", [False, True])
def test_split_preserves_the_product_and_shrinks_the_range(qa):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((64, 16))
    w[7, 2] = 20.0
    new, origin = split_channels(w, 2, qa, 8)
    assert new.shape == (66, 16) and origin == [7, 7]
    x = rng.standard_normal((5, 64))
    np.testing.assert_allclose(np.concatenate([x, x[:, origin]], 1) @ new, x @ w, rtol=1e-12, atol=1e-12)
    assert np.abs(new).max() <= 20.0 / 2 + 0.05  # two splits of one outlier: 20 -> 10 + (5 + 5)


def _linear_model(op="MatMul"):
    rng = np.random.default_rng(2)
    w = rng.standard_normal((32, 8)).astype(np.float32)
    w[4, :] *= 15  # an outlier input channel
    if op == "Gemm":
        node = helper.make_node("Gemm", ["x", "W"], ["y"], name="fc", transB=1)
        w = np.ascontiguousarray(w.T)
    else:
        node = helper.make_node("MatMul", ["x", "W"], ["y"], name="fc")
    graph = helper.make_graph([node], "lin", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8])], [numpy_helper.from_array(w, "W")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("op", ["MatMul", "Gemm"])
def test_pass_widens_with_gather_and_is_verified(op):
    proto = _linear_model(op)
    model = qpass.load_model(proto)
    stats = Pipeline([SplitOutlierChannelsPass(expand_ratio=0.1)]).run(model).stats[0]
    assert stats.verification == "ok" and stats.details["channels_added"] == 4
    concat = model.graph.node("fc").inputs[0].producer()
    assert concat.op_type == "Concat" and concat.inputs[0].name == "x"
    assert concat.inputs[1].producer().op_type == "Gather"
    assert concat.inputs[1].producer().inputs[1].const_value.numpy().tolist() == [4, 4, 4, 4]


def test_split_reduces_weight_quantization_error():
    proto = _linear_model()
    w = numpy_helper.to_array(proto.graph.initializer[0]).astype(np.float64)
    new, origin = split_channels(w, 3, True, 8)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((256, 32))
    ref = x @ w
    before = sqnr_db(ref, x @ _quant_error(w))
    after = sqnr_db(ref, np.concatenate([x, x[:, origin]], 1) @ _quant_error(new))
    assert after > before + 3.0


def test_grouped_conv_and_input_conv_are_skipped():
    rng = np.random.default_rng(4)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "W1"], ["a"], name="stem"), helper.make_node("Conv", ["a", "W2"], ["y"], name="dw", group=8)],
        "convs", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 8, 8])],
        [numpy_helper.from_array(rng.standard_normal((8, 3, 1, 1)).astype(np.float32), "W1"),
         numpy_helper.from_array(rng.standard_normal((8, 1, 1, 1)).astype(np.float32), "W2")],
    )
    model = qpass.load_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    report = SplitOutlierChannelsPass()(model)
    assert not report.modified
    assert dict(report.skipped) == {"grouped Conv": 1, "Conv on the network input (<= 3 channels)": 1}


def test_ocs_recipe_improves_int8_sqnr_on_outlier_weights():
    proto = _linear_model()
    rng = np.random.default_rng(5)
    cal = [{"x": rng.standard_normal((4, 32)).astype(np.float32)} for _ in range(8)]
    ev = [{"x": rng.standard_normal((4, 32)).astype(np.float32)} for _ in range(4)]
    ref_model = qpass.load_model(proto)
    ref = np.concatenate([run_model(ref_model, e)["y"].ravel() for e in ev])
    sq = {}
    for recipe in ("w8a8", "ocs-w8a8"):
        model = qpass.quantize(proto, cal, recipe=recipe, report=False).model
        sq[recipe] = sqnr_db(ref, np.concatenate([run_model(model, e)["y"].ravel() for e in ev]))
    assert sq["ocs-w8a8"] > sq["w8a8"], sq


def test_activation_split_multipliers_sum_to_one_and_shrink_the_range():
    absmax = np.array([1.0, 20.0, 3.0, 2.0])
    source, mult = split_activation_channels(absmax, 3)
    assert source.tolist() == [0, 1, 2, 3, 1, 1, 1]  # 20 -> 10+10 -> 5+10+5 -> 5+5+5+5
    assert np.allclose(mult, [1, 0.25, 1, 1, 0.25, 0.25, 0.25])
    for c in range(4):
        assert np.isclose(mult[source == c].sum(), 1.0)
    assert (absmax[source] * mult).max() == 5.0


def _mlp(op="MatMul", relu=True, extra_reader=False):
    """x[8,16] -> fc1 (+bias) -> Relu -> fc2 -> y, with an outlier channel (5) in fc1's output."""
    rng = np.random.default_rng(7)
    w1 = (rng.standard_normal((16, 32)) / 4).astype(np.float32)
    w1[:, 5] *= 25
    b1 = rng.normal(0, 0.1, 32).astype(np.float32)
    w2 = (rng.standard_normal((32, 8)) / 6).astype(np.float32)
    if op == "Gemm":
        nodes = [helper.make_node("Gemm", ["x", "W1", "b1"], ["hb"], name="fc1", transB=1)]
        w1 = np.ascontiguousarray(w1.T)
    else:
        nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="fc1"), helper.make_node("Add", ["h", "b1"], ["hb"], name="fc1.add")]
    nodes.append(helper.make_node("Relu" if relu else "Sigmoid", ["hb"], ["a"], name="act"))
    nodes.append(helper.make_node("MatMul", ["a", "W2"], ["y"], name="fc2"))
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8, 8])]
    if extra_reader:
        nodes.append(helper.make_node("ReduceSum", ["a"], ["s"], name="other", keepdims=0))
        outputs.append(helper.make_tensor_value_info("s", TensorProto.FLOAT, []))
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, 16])], outputs,
                              [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(b1, "b1"), numpy_helper.from_array(w2, "W2")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _data(n, shape, seed):
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal(shape).astype(np.float32)} for _ in range(n)]


@pytest.mark.parametrize("op", ["MatMul", "Gemm"])
def test_activation_ocs_widens_the_producer(op):
    proto = _mlp(op)
    model = qpass.load_model(proto)
    pass_ = SplitOutlierChannelsPass(target="activation", expand_ratio=0.1, op_types=("MatMul",) if op == "MatMul" else ("MatMul", "Gemm"))
    stats = Pipeline([pass_], context={"calibration": _data(8, [8, 16], 1)}).run(model).stats[0]
    assert stats.verification == "ok"
    fc2 = model.graph.node("fc2")
    assert fc2.inputs[0].producer().op_type == "Relu"  # no new op on fc2's input
    assert fc2.inputs[1].const_value.shape[0] == 32 + 4
    w1 = model.graph.node("fc1").inputs[1].const_value.numpy()
    assert (w1.shape[1] if op == "MatMul" else w1.shape[0]) == 32 + 4
    assert stats.details["producers_widened"] == 1 and stats.details["activation_channels_added"] >= 4


def test_activation_ocs_uses_gather_when_x_has_other_readers_or_no_homogeneous_path():
    for proto in (_mlp(extra_reader=True), _mlp(relu=False)):
        model = qpass.load_model(proto)
        pass_ = SplitOutlierChannelsPass(target="activation", expand_ratio=0.1, op_types=("MatMul",))
        stats = Pipeline([pass_], context={"calibration": _data(8, [8, 16], 1)}).run(model).stats[0]
        assert stats.verification == "ok" and stats.details["producers_widened"] == 0
        halve = model.graph.node("fc2").inputs[0].producer()
        assert halve.op_type == "Mul" and halve.inputs[0].producer().op_type == "Concat"
        scales = halve.inputs[1].const_value.numpy()
        assert scales.size == 32 + 4 and scales.min() < 1.0 and np.all(np.log2(scales) == np.round(np.log2(scales)))


def test_activation_ocs_lowers_the_quantized_layer_error():
    proto = _mlp()
    cal, ev = _data(16, [8, 16], 1), _data(8, [8, 16], 2)
    ref = np.concatenate([run_model(qpass.load_model(proto), e)["y"].ravel() for e in ev])
    sq = {}
    for target in (None, "weight", "activation", "both"):
        passes = qpass.registry.load_recipe("w8a8").build()
        if target:
            passes.insert(6, SplitOutlierChannelsPass(target=target, expand_ratio=0.1))
        model = qpass.quantize(proto, cal, passes=passes, report=False).model
        sq[target] = sqnr_db(ref, np.concatenate([run_model(model, e)["y"].ravel() for e in ev]))
    assert sq["activation"] > sq[None] + 1.5, sq
    assert sq["both"] > sq["weight"] + 1.5, sq


def test_activation_ocs_post_ln_shares_one_gather():
    rng = np.random.default_rng(3)
    d = 16
    gamma = rng.uniform(0.5, 1.5, d).astype(np.float32)
    gamma[4] = 30.0
    nodes = [helper.make_node("LayerNormalization", ["x", "g", "b"], ["h"], name="ln", axis=-1)]
    inits = [numpy_helper.from_array(gamma, "g"), numpy_helper.from_array(np.zeros(d, np.float32), "b")]
    for name in "qkv":
        inits.append(numpy_helper.from_array(rng.standard_normal((d, d)).astype(np.float32), f"W{name}"))
        nodes.append(helper.make_node("MatMul", ["h", f"W{name}"], [name], name=name))
    nodes.append(helper.make_node("Sum", ["q", "k", "v", "h"], ["y"], name="sum"))  # h: the residual
    graph = helper.make_graph(nodes, "postln", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5, d])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5, d])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model = qpass.load_model(proto)
    stats = Pipeline([SplitOutlierChannelsPass(target="activation", expand_ratio=0.1)],
                     context={"calibration": _data(4, [2, 5, d], 1)}).run(model).stats[0]
    assert stats.verification == "ok" and stats.rewritten == 3
    assert stats.details["gathers"] == 1 and stats.details["activation_channels_added"] == 2
    readers = {model.graph.node(n).inputs[0] for n in "qkv"}
    assert len(readers) == 1 and model.graph.node("sum").inputs[3].producer().op_type == "LayerNormalization"


def test_activation_ocs_conv_relu_conv():
    rng = np.random.default_rng(5)
    w1 = rng.standard_normal((8, 4, 3, 3)).astype(np.float32) / 6
    w1[2] *= 20  # outlier output channel of conv1 = input channel 2 of conv2
    w2 = rng.standard_normal((6, 8, 1, 1)).astype(np.float32) / 3
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "W1", "B1"], ["c"], name="conv1", pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["c"], ["r"], name="relu"),
         helper.make_node("MaxPool", ["r"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
         helper.make_node("Conv", ["p", "W2"], ["y"], name="conv2")],
        "convs", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, 4, 4])],
        [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(rng.normal(0, 0.1, 8).astype(np.float32), "B1"),
         numpy_helper.from_array(w2, "W2")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model = qpass.load_model(proto)
    stats = Pipeline([SplitOutlierChannelsPass(target="both", expand_ratio=0.25)],
                     context={"calibration": _data(4, [1, 4, 8, 8], 1)}).run(model).stats[0]
    assert stats.verification == "ok"
    assert stats.details["producers_widened"] == 1  # conv2's input: conv1 -> Relu -> MaxPool
    assert model.graph.node("conv1").inputs[1].const_value.shape[0] == 8 + 2
    assert model.graph.node("conv1").inputs[2].const_value.shape[0] == 8 + 2


def test_shared_weight_is_left_alone_and_counted():
    rng = np.random.default_rng(6)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["a"], name="fc1"), helper.make_node("MatMul", ["a", "W"], ["y"], name="fc2")],
        "tied", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 16])],
        [numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32), "W")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    for target in ("weight", "activation"):
        model = qpass.load_model(proto)
        report = SplitOutlierChannelsPass(target=target)(model)
        assert not report.modified and dict(report.skipped) == {"weight shared with another node": 2}


def test_activation_target_needs_calibration_and_bad_target_is_rejected():
    with pytest.raises(ValueError):
        SplitOutlierChannelsPass(target="bias")
    with pytest.raises(qpass.errors.CalibrationError):
        SplitOutlierChannelsPass(target="activation")(qpass.load_model(_mlp()))


@pytest.mark.parametrize("exporter,opset,tokens_2d", [("classic", 14, False), ("classic", 17, True), ("dynamo", 18, False)])
def test_exported_blocks_keep_their_function(kit, exporter, opset, tokens_2d):
    proto = kit.torch_block(exporter, opset=opset, tokens_2d=tokens_2d)
    model = qpass.load_model(proto)
    stats = Pipeline([SplitOutlierChannelsPass(target="both")], context={"calibration": kit.calibration(proto)}).run(model).stats[0]
    assert stats.verification == "ok" and stats.rewritten == 4  # qkv, proj, fc1, fc2
    assert stats.details["producers_widened"] == 1  # fc1 -> Relu -> fc2


def test_activation_ocs_widens_a_producer_whose_weight_sits_behind_identity():
    proto = _mlp("Gemm")
    fc1 = next(n for n in proto.graph.node if n.name == "fc1")
    fc1.input[1] = "W1_id"
    proto.graph.node.insert(0, helper.make_node("Identity", ["W1"], ["W1_id"], name="w1.identity"))
    model = qpass.load_model(proto)
    pass_ = SplitOutlierChannelsPass(target="activation", expand_ratio=0.1, op_types=("MatMul",))  # fc2 only
    stats = Pipeline([pass_], context={"calibration": _data(8, [8, 16], 1)}).run(model).stats[0]
    assert stats.verification == "ok" and stats.details["producers_widened"] == 1
    assert model.graph.node("fc1").inputs[1].const_value.shape[0] == 32 + 4
