import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import qpass
from qpass.passes.split_outlier_channels import SplitOutlierChannelsPass, split_channels
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
    gather = model.graph.node("fc").inputs[0].producer()
    assert gather.op_type == "Gemm" or gather.op_type == "Gather"
    assert gather.inputs[1].const_value.numpy()[32:].tolist() == [4, 4, 4, 4]


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
