"""Static int8 quantization end to end: placement, parameters, accuracy, report, CLI."""

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import qpass
from qpass.backends.onnxruntime import fused_op_census
from qpass.cli import main
from qpass.demo import demo_calibration, demo_cnn, demo_transformer
from qpass.verify import run_model, sqnr_db


def _calib(proto, n=16, seed=1):
    return demo_calibration(proto, n, seed)


def _dq_of(model: ir.Model, weight_name: str) -> ir.Node:
    return next(n for n in model.graph if n.op_type == "DequantizeLinear" and n.inputs[0].name.startswith(weight_name + "_quantized"))


def _conv_model(kind: str) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    if kind == "ConvTranspose":
        w = rng.standard_normal((4, 6, 3, 3)).astype(np.float32)  # [C_in, C_out, k, k]
        node = helper.make_node("ConvTranspose", ["x", "W", "B"], ["y"], name="layer")
        out_c = 6
    else:
        w = rng.standard_normal((6, 4, 3, 3)).astype(np.float32)
        node = helper.make_node("Conv", ["x", "W", "B"], ["y"], name="layer", pads=[1, 1, 1, 1])
        out_c = 6
    w[2] *= 10  # one channel with a much larger range
    graph = helper.make_graph(
        [node, helper.make_node("Relu", ["y"], ["r"], name="relu"), helper.make_node("MaxPool", ["r"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
         helper.make_node("Conv", ["p", "W2"], ["z"], name="head")],
        "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["n", "c", "h", "w"])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(rng.standard_normal(out_c).astype(np.float32), "B"),
         numpy_helper.from_array(rng.standard_normal((2, out_c, 1, 1)).astype(np.float32), "W2")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("kind,axis", [("Conv", 0), ("ConvTranspose", 1)])
def test_per_channel_axis_and_int32_bias(kind, axis):
    proto = _conv_model(kind)
    result = qpass.quantize(proto, _calib(proto), report=False)
    model = result.model
    dq = _dq_of(model, "W")
    assert dq.attributes.get_int("axis") == axis
    w = numpy_helper.to_array(proto.graph.initializer[0])
    scales = dq.inputs[1].const_value.numpy()
    assert scales.shape == (6,)
    channel_max = np.abs(np.moveaxis(w, axis, 0).reshape(6, -1)).max(axis=1)
    np.testing.assert_allclose(scales, channel_max / 127, rtol=1e-6)
    assert dq.inputs[0].const_value.dtype == ir.DataType.INT8
    # bias: int32, scale s_x * s_w, dequantizes within half a step
    layer = model.graph.node("layer")
    bias_dq = layer.inputs[2].producer()
    assert bias_dq.op_type == "DequantizeLinear" and bias_dq.inputs[0].const_value.dtype == ir.DataType.INT32
    x_scale = float(layer.inputs[0].producer().inputs[1].const_value.numpy())
    np.testing.assert_allclose(bias_dq.inputs[1].const_value.numpy(), x_scale * scales, rtol=1e-6)
    b = numpy_helper.to_array(proto.graph.initializer[1])
    deq = bias_dq.inputs[0].const_value.numpy() * bias_dq.inputs[1].const_value.numpy()
    assert np.all(np.abs(deq - b) <= 0.5 * x_scale * scales + 1e-9)


def test_matmul_and_gemm_axes():
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "Wm"], ["m"], name="mm"),
         helper.make_node("Gemm", ["m", "Wt", "bt"], ["g1"], name="gemm_t", transB=1),
         helper.make_node("Gemm", ["g1", "Wn"], ["y"], name="gemm_n")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
        [numpy_helper.from_array(rng.standard_normal((8, 5)).astype(np.float32), "Wm"),
         numpy_helper.from_array(rng.standard_normal((4, 5)).astype(np.float32), "Wt"),
         numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "bt"),
         numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32), "Wn")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model = qpass.quantize(proto, _calib(proto), report=False).model
    assert _dq_of(model, "Wm").attributes.get_int("axis") == 1
    assert _dq_of(model, "Wm").inputs[1].const_value.shape == (5,)
    assert _dq_of(model, "Wt").attributes.get_int("axis") == 0
    assert _dq_of(model, "Wt").inputs[1].const_value.shape == (4,)
    assert _dq_of(model, "Wn").attributes.get_int("axis") == 1


def _matmul_add_model(seq) -> onnx.ModelProto:
    """x [1, seq, 8] -> MatMul(W [8, 6]) -> Add(b [6]) -> MatMul(W2) -> y: a transformer linear layer."""
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["m"], name="linear"), helper.make_node("Add", ["m", "b"], ["h"], name="bias"),
         helper.make_node("MatMul", ["h", "W2"], ["y"], name="head")],
        "linear", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, seq, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, seq, 3])],
        [numpy_helper.from_array(rng.standard_normal((8, 6)).astype(np.float32), "W"),
         numpy_helper.from_array(rng.standard_normal(6).astype(np.float32), "b"),
         numpy_helper.from_array(rng.standard_normal((6, 3)).astype(np.float32), "W2")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_matmul_bias_goes_int32_where_onnxruntime_makes_a_gemm():
    """A static-shape MatMul + Add(bias) becomes a Gemm in onnxruntime: its bias must be int32 at
    s_x * s_w for a QGemm (a float bias leaves the Gemm in float); with a dynamic shape the pair
    stays a MatMul whose float bias onnxruntime folds into MatMulIntegerToFloat."""
    static = _matmul_add_model(5)
    result = qpass.quantize(static, _calib(static))
    model = result.model
    add = model.graph.node("bias")
    bias_dq = add.inputs[1].producer()
    assert bias_dq is not None and bias_dq.op_type == "DequantizeLinear"
    assert bias_dq.inputs[0].const_value.dtype == ir.DataType.INT32
    x_scale = float(model.graph.node("linear").inputs[0].producer().inputs[1].const_value.numpy())
    w_scale = _dq_of(model, "W").inputs[1].const_value.numpy()
    np.testing.assert_allclose(bias_dq.inputs[1].const_value.numpy(), x_scale * w_scale, rtol=1e-6)
    assert result.report.fused["integer"].get("QGemm") == 1
    assert not result.report.fused["float_behind_dq"]

    dynamic = _matmul_add_model("seq")
    model = qpass.quantize(dynamic, _calib(dynamic), report=False).model
    assert model.graph.node("bias").inputs[1].const_value is not None  # the float bias, as it was

    # QOperator form: either bias joins MatMulIntegerToFloat as its float bias input
    for proto in (static, dynamic):
        result = qpass.quantize(proto, _calib(proto), format="qoperator", contrib_ops=True)
        linear = result.model.graph.node("linear")
        assert linear.op_type == "MatMulIntegerToFloat" and len(linear.inputs) == 7
        assert "Add" not in [n.op_type for n in result.model.graph]
        assert not result.report.fused["float_behind_dq"]


def test_matmul_bias_goes_int32_when_only_onnxruntime_sees_the_static_shape():
    """Static model inputs, but the MatMul reads a Reshape whose target is computed (Shape, Gather,
    Div), which ONNX shape inference leaves unknown: onnxruntime folds that arithmetic, makes the
    MatMul + Add a Gemm, and needs the int32 bias for a QGemm (classic torch exports of windowed
    attention and MLPs look like this)."""
    rng = np.random.default_rng(0)
    ints = {"zero": [0], "two": [2], "neg": [-1]}
    graph = helper.make_graph(
        [helper.make_node("Shape", ["x"], ["shape"], name="shape"),
         helper.make_node("Gather", ["shape", "zero"], ["n"], name="batch"),
         helper.make_node("Mul", ["n", "two"], ["n2"], name="double"),
         helper.make_node("Div", ["n2", "two"], ["n1"], name="halve"),
         helper.make_node("Concat", ["n1", "neg", "four"], ["target"], name="target", axis=0),
         helper.make_node("Reshape", ["x", "target"], ["r"], name="windows"),
         helper.make_node("MatMul", ["r", "W"], ["m"], name="linear"), helper.make_node("Add", ["m", "b"], ["h"], name="bias"),
         helper.make_node("Relu", ["h"], ["y"], name="relu")],
        "computed_shape", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 6, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", "m", 5])],
        [*(numpy_helper.from_array(np.array(v, np.int64), k) for k, v in ints.items()),
         numpy_helper.from_array(np.array([4], np.int64), "four"),
         numpy_helper.from_array(rng.standard_normal((4, 5)).astype(np.float32), "W"),
         numpy_helper.from_array(rng.standard_normal(5).astype(np.float32), "b")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert not qpass.load_model(proto).graph.node("linear").inputs[0].shape.is_static()  # the premise
    # no fold-constants (which would resolve this arithmetic): what onnxruntime folds, qpass may not
    model = qpass.run(proto, passes="annotate-quant,insert-qdq", context={"calibration": _calib(proto)}).model
    bias_dq = model.graph.node("bias").inputs[1].producer()
    assert bias_dq is not None and bias_dq.inputs[0].const_value.dtype == ir.DataType.INT32
    census = fused_op_census(model)
    assert census["integer"].get("QGemm") == 1 and not census["float_behind_dq"]


def test_shared_weight_quantizes_every_readers_bias():
    """Two Gemms reading one weight with their own inputs and biases: both biases go int32,
    each at its own input's scale times the shared weight scale."""
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "W", "b1"], ["g1"], name="first", transB=1),
         helper.make_node("Relu", ["g1"], ["r"], name="relu"),
         helper.make_node("Mul", ["r", "ten"], ["r10"], name="scale_up"),
         helper.make_node("Gemm", ["r10", "W", "b2"], ["y"], name="second", transB=1)],
        "shared", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 6])],
        [numpy_helper.from_array(rng.standard_normal((6, 6)).astype(np.float32), "W"),
         numpy_helper.from_array(rng.standard_normal(6).astype(np.float32), "b1"),
         numpy_helper.from_array(rng.standard_normal(6).astype(np.float32), "b2"),
         numpy_helper.from_array(np.array(10.0, np.float32), "ten")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model = qpass.quantize(proto, _calib(proto), report=False).model
    w_scale = _dq_of(model, "W").inputs[1].const_value.numpy()
    input_scales = []
    for name in ("first", "second"):
        gemm = model.graph.node(name)
        bias_dq = gemm.inputs[2].producer()
        assert bias_dq.op_type == "DequantizeLinear" and bias_dq.inputs[0].const_value.dtype == ir.DataType.INT32
        x_scale = float(gemm.inputs[0].producer().inputs[1].const_value.numpy())
        np.testing.assert_allclose(bias_dq.inputs[1].const_value.numpy(), x_scale * w_scale, rtol=1e-6)
        input_scales.append(x_scale)
    assert input_scales[0] != input_scales[1]


def test_head_shared_by_two_levels_gets_uniquely_named_nodes():
    """One Conv head (weight and bias) applied to two feature levels, as FPN/RetinaNet heads are:
    each reader gets its own int32 bias, every node name stays unique, and onnxruntime runs it."""
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "W", "B"], ["p3"], name="level3", pads=[1, 1, 1, 1]),
         helper.make_node("MaxPool", ["x"], ["x4"], name="down", kernel_shape=[2, 2], strides=[2, 2]),
         helper.make_node("Conv", ["x4", "W", "B"], ["p4"], name="level4", pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["p3"], ["y3"], name="relu3"), helper.make_node("Relu", ["p4"], ["y4"], name="relu4")],
        "fpn_head", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
        [helper.make_tensor_value_info("y3", TensorProto.FLOAT, [1, 4, 8, 8]),
         helper.make_tensor_value_info("y4", TensorProto.FLOAT, [1, 4, 4, 4])],
        [numpy_helper.from_array(rng.standard_normal((4, 4, 3, 3)).astype(np.float32), "W"),
         numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "B")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model = qpass.quantize(proto, _calib(proto), report=False).model
    names = [node.name for node in model.graph]
    assert len(names) == len(set(names))
    for name in ("level3", "level4"):
        bias_dq = model.graph.node(name).inputs[2].producer()
        assert bias_dq.op_type == "DequantizeLinear" and bias_dq.inputs[0].const_value.dtype == ir.DataType.INT32
    feeds = _calib(proto, 4, seed=7)
    for feed in feeds:
        ref, got = run_model(ir.from_proto(proto), feed), run_model(model, feed)
        for k in ref:
            assert sqnr_db(ref[k], got[k]) > 25


def test_pipeline_renames_repeated_node_names():
    """A pass that leaves two nodes of one name (onnxruntime refuses such a graph) gets them renamed."""
    import dataclasses

    @dataclasses.dataclass
    class DuplicateNames(qpass.Pass):
        name = "duplicate-names"
        preserves_float = True

        def call(self, model):
            for node in model.graph:
                node.name = "same"
            return qpass.PassReport(model, modified=True)

    proto = _conv_model("Conv")
    result = qpass.run(proto, passes=[DuplicateNames()])
    names = [node.name for node in result.model.graph]
    assert len(names) == len(set(names)) and result.stats[0].verification == "ok"


def test_conv_writing_a_model_output_runs_on_integers_and_keeps_the_output_name():
    """A detection head's Conv whose output is a model output gets Q/DQ there, so onnxruntime runs
    it as QLinearConv (left float it ran as a float Conv); the model output keeps its name."""
    proto = _conv_model("Conv")  # ... -> MaxPool -> Conv "head" -> graph output z
    result = qpass.quantize(proto, _calib(proto))
    graph = result.model.graph
    assert [o.name for o in graph.outputs] == ["z"]
    assert graph.outputs[0].producer().op_type == "DequantizeLinear"
    assert graph.node("head").outputs[0].uses()[0].node.op_type == "QuantizeLinear"
    assert result.report.fused["integer"].get("QLinearConv") == 2 and not result.report.fused["float_behind_dq"]
    assert result.report.output_sqnr_db["z"] > 25


def test_split_pieces_share_their_input_parameters_so_the_concat_runs_on_integers():
    """torch.chunk exported by dynamo is Split(num_outputs=2); each piece takes its input's scale
    and zero-point, so the C2f-style Concat after it runs as QLinearConcat, not in float."""
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "W1"], ["c"], name="cv1"),
         helper.make_node("Split", ["c"], ["a", "b"], name="chunk", axis=1, num_outputs=2),
         helper.make_node("Conv", ["b", "W2"], ["m"], name="bottleneck", pads=[1, 1, 1, 1]),
         helper.make_node("Concat", ["a", "b", "m"], ["cat"], name="cat", axis=1),
         helper.make_node("Conv", ["cat", "W3"], ["y"], name="cv2")],
        "c2f", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 6, 6])],
        [numpy_helper.from_array(rng.standard_normal((8, 8, 1, 1)).astype(np.float32), "W1"),
         numpy_helper.from_array(rng.standard_normal((4, 4, 3, 3)).astype(np.float32), "W2"),
         numpy_helper.from_array(rng.standard_normal((8, 12, 1, 1)).astype(np.float32), "W3")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    result = qpass.quantize(proto, _calib(proto))
    split = result.model.graph.node("chunk")
    source = split.inputs[0].producer()  # reads the DequantizeLinear of the Conv's output
    for piece in split.outputs:
        q = next(u.node for u in piece.uses() if u.node.op_type == "QuantizeLinear")
        assert q.inputs[1].const_value.numpy() == source.inputs[1].const_value.numpy()
        assert q.inputs[2].const_value.numpy() == source.inputs[2].const_value.numpy()
    fused = result.report.fused
    assert fused["integer"].get("QLinearConcat") == 1 and fused["integer"].get("QLinearConv") == 3
    assert not fused["float_behind_dq"]


def test_model_outputs_keep_their_names_when_an_input_passes_through_or_an_output_repeats():
    """A model input that is also a model output stays as it is; a quantized output listed twice keeps
    both entries; the model runs and its interface is unchanged."""
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "W"], ["y"], name="head", pads=[1, 1, 1, 1])], "passthrough",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 6, 6])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 4, 6, 6]) for n in ("x", "y", "y")],
        [numpy_helper.from_array(rng.standard_normal((4, 4, 3, 3)).astype(np.float32), "W")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model = qpass.quantize(proto, _calib(proto), report=False).model
    assert [v.name for v in model.graph.inputs] == ["x"]
    assert [v.name for v in model.graph.outputs] == ["x", "y", "y"]
    assert model.graph.outputs[0] is model.graph.inputs[0]
    assert model.graph.outputs[1] is model.graph.outputs[2] and model.graph.outputs[1].producer().op_type == "DequantizeLinear"
    feed = _calib(proto, 1, seed=3)[0]
    assert sqnr_db(run_model(ir.from_proto(proto), feed)["y"], run_model(model, feed)["y"]) > 25


def test_matmul_bias_stays_float_when_a_shape_depends_on_input_values():
    """Static inputs, but a Slice bound comes from NonZero: onnxruntime cannot fold that shape, keeps
    MatMul + Add apart (MatMulIntegerToFloat), and reads the float bias."""
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("NonZero", ["x"], ["nz"], name="nonzero"), helper.make_node("Shape", ["nz"], ["s"], name="shape"),
         helper.make_node("Gather", ["s", "one"], ["count"], name="count"),
         helper.make_node("Min", ["count", "six"], ["end"], name="end"),
         helper.make_node("Slice", ["x", "zero", "end", "one"], ["sl"], name="slice"),
         helper.make_node("MatMul", ["sl", "W"], ["m"], name="linear"), helper.make_node("Add", ["m", "b"], ["y"], name="bias")],
        "value_dependent", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 6, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, "n", 5])],
        [numpy_helper.from_array(np.array([1], np.int64), "one"), numpy_helper.from_array(np.array([0], np.int64), "zero"),
         numpy_helper.from_array(np.array([6], np.int64), "six"),
         numpy_helper.from_array(rng.standard_normal((4, 5)).astype(np.float32), "W"),
         numpy_helper.from_array(rng.standard_normal(5).astype(np.float32), "b")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model = qpass.run(proto, passes="annotate-quant,insert-qdq", context={"calibration": _calib(proto)}).model
    assert model.graph.node("bias").inputs[1].const_value is not None  # the float bias, as it was
    assert not fused_op_census(model)["float_behind_dq"]


def test_maxpool_shares_its_input_parameters():
    proto = _conv_model("Conv")
    model = qpass.quantize(proto, _calib(proto), report=False).model
    pool = model.graph.node("pool")
    q_in = pool.inputs[0].producer().inputs[0].producer()  # DQ <- Q
    head = model.graph.node("head")
    q_out = head.inputs[0].producer().inputs[0].producer()
    assert q_in.op_type == q_out.op_type == "QuantizeLinear" and q_in is not q_out
    assert q_in.inputs[1].const_value.numpy() == q_out.inputs[1].const_value.numpy()
    assert q_in.inputs[2].const_value.numpy() == q_out.inputs[2].const_value.numpy()


def test_calibration_observes_no_value_that_takes_its_input_parameters():
    from qpass.analyses.calibration import annotated_activations, parameter_source
    from qpass.api import build_passes
    from qpass.model_io import load_model

    model = load_model(_conv_model("Conv"))
    for p in build_passes("w8a8"):
        if p.name == "insert-qdq":
            break
        p(model)
    pool_out = model.graph.node("pool").outputs[0]
    assert parameter_source(pool_out) == (model.graph.node("pool").inputs[0], 1.0)
    assert pool_out.name in annotated_activations(model)
    assert pool_out.name not in annotated_activations(model, observed_only=True)
    assert model.graph.node("pool").inputs[0].name in annotated_activations(model, observed_only=True)


@pytest.mark.parametrize("threads", [1, 2])
def test_calibration_batches_come_back_in_order_with_the_values_of_each_feed(monkeypatch, threads):
    """Two runs at once (one shared session with one thread each, else a session per run): every
    batch's values are those of a plain run on its own feed, in feed order; an early stop is clean."""
    from qpass.analyses import calibration_batches as cb
    from qpass.model_io import load_model

    monkeypatch.setattr(cb.ort_backend, "half_the_cores", lambda: threads)
    proto = demo_cnn()
    model = load_model(proto)
    names = [model.graph.inputs[0].name] + [n.outputs[0].name for n in model.graph][:3]
    feeds = _calib(proto, n=7)
    got = list(cb.calibration_batches(model, names, feeds))
    assert len(got) == 7
    plain = cb.ort_backend.make_session(model, extra_outputs=names[1:])
    for feed, values in zip(feeds, got):
        expected = cb.ort_backend.run(plain, feed, names[1:])
        np.testing.assert_array_equal(values[names[0]], feed[names[0]])
        for name in names[1:]:
            np.testing.assert_allclose(values[name], expected[name], rtol=1e-6, atol=1e-6)
    batches = cb.calibration_batches(model, names, feeds)
    next(batches)
    batches.close()


def test_calibration_sessions_run_only_what_the_observed_values_need():
    """outputs_only: the graph's outputs are the values asked for; nodes and weights that none of them
    needs (a head) are left out, values read inside a subgraph are kept, and the values are the same."""
    from qpass.backends.onnxruntime import run, session_bytes, session_from_bytes, make_session
    from qpass.model_io import load_model

    rng = np.random.default_rng(0)
    branch = lambda op: helper.make_graph(  # noqa: E731  reads 'a' from the outer scope
        [helper.make_node(op, ["a", "one"], [f"{op}_out"])], op, [],
        [helper.make_tensor_value_info(f"{op}_out", TensorProto.FLOAT, [1, 64])])
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["a"], name="relu"),
         helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=branch("Add"), else_branch=branch("Sub")),
         helper.make_node("MatMul", ["x", "W"], ["z"], name="head")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64]),
              helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64]),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 64])],
        [numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), "W"),
         numpy_helper.from_array(np.float32(1.0), "one")],
    )
    model = load_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    graph_bytes, names, arrays = session_bytes(model, ["y", "a"], drop_unused=True, outputs_only=True)
    pruned = onnx.load_from_string(graph_bytes).graph
    assert [n.name for n in pruned.node] == ["relu", "branch"]
    assert [o.name for o in pruned.output] == ["y", "a"]
    assert "W" not in names + [t.name for t in pruned.initializer]
    feeds = {"x": rng.standard_normal((1, 64)).astype(np.float32), "cond": np.array(False)}
    got = run(session_from_bytes(graph_bytes, names, arrays), feeds)
    full = run(make_session(model, extra_outputs=["a"]), feeds)
    for name in ("y", "a"):
        np.testing.assert_array_equal(got[name], full[name])
    assert [n.name for n in model.graph] == ["relu", "branch", "head"]  # the model itself is untouched


def test_gemm_logits_stay_float_and_its_inner_outputs_are_quantized():
    """A Gemm whose output is read on integers (Relu -> Gemm) gets its output quantized; the last one,
    whose logits only reach the graph output through a Reshape, stays float: onnxruntime still fuses
    both into QGemm (the second with float output)."""
    from qpass.analyses.calibration import annotated_activations
    from qpass.model_io import load_model
    from qpass.passes.annotate_quant import AnnotateQuantPass

    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "W1", "b1"], ["h"], name="fc1", transB=1),
         helper.make_node("Relu", ["h"], ["r"], name="relu"),
         helper.make_node("Gemm", ["r", "W2", "b2"], ["logits"], name="fc2", transB=1),
         helper.make_node("Reshape", ["logits", "shape"], ["y"], name="reshape")],
        "classifier", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 2, 5])],
        [numpy_helper.from_array(rng.standard_normal((32, 16)).astype(np.float32), "W1"),
         numpy_helper.from_array(rng.standard_normal(32).astype(np.float32), "b1"),
         numpy_helper.from_array(rng.standard_normal((10, 32)).astype(np.float32), "W2"),
         numpy_helper.from_array(rng.standard_normal(10).astype(np.float32), "b2"),
         numpy_helper.from_array(np.array([4, 2, 5], np.int64), "shape")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model = load_model(proto)
    report = AnnotateQuantPass()(model)
    assert sorted(annotated_activations(model)) == ["r", "x"]
    assert report.details == {"activations": 2, "weights": 2}
    result = qpass.quantize(proto, _calib(proto))
    assert result.model.graph.node("fc2").outputs[0].uses()[0].node.op_type == "Reshape"  # no Q on the logits
    assert result.report.fused["integer"] == {"QGemm": 2} and not result.report.fused["float_behind_dq"]
    assert result.report.output_sqnr_db["y"] > 30


def test_one_quantize_pair_per_tensor_and_outputs_stay_float():
    proto = demo_transformer()
    model = qpass.quantize(proto, _calib(proto), report=False).model
    q_inputs = [n.inputs[0].name for n in model.graph if n.op_type == "QuantizeLinear"]
    assert len(q_inputs) == len(set(q_inputs))  # q, k, v share one pair on hidden_states
    assert model.graph.outputs[0].producer().op_type == "LayerNormalization"


def test_exclude_keeps_nodes_float():
    proto = demo_transformer()
    model = qpass.quantize(proto, _calib(proto), report=False, exclude=("fc2", "attn\\..*")).model
    fc2 = model.graph.node("fc2")
    assert fc2.inputs[1].producer() is None  # float weight, no DequantizeLinear
    assert all(v.producer() is None or v.producer().op_type != "DequantizeLinear" for v in model.graph.node("attn.qk").inputs)
    assert model.graph.node("fc1").inputs[1].producer().op_type == "DequantizeLinear"


@pytest.mark.parametrize("builder,floor", [(demo_cnn, 30.0), (demo_transformer, 25.0)])
def test_quantized_demo_models_stay_close_to_float(builder, floor):
    proto = builder()
    result = qpass.quantize(proto, _calib(proto, 32))
    feeds = _calib(proto, 4, seed=7)
    ref = np.concatenate([run_model(qpass.load_model(proto), f)[proto.graph.output[0].name].ravel() for f in feeds])
    got = np.concatenate([run_model(result.model, f)[proto.graph.output[0].name].ravel() for f in feeds])
    assert sqnr_db(ref, got) > floor
    report = result.report
    assert report.layers == sorted(report.layers, key=lambda l: l.sqnr_db)
    assert report.quantized_bytes < report.float_bytes / 3
    assert all(np.isfinite(l.sqnr_db) and l.sqnr_db > 15 for l in report.layers)


def test_onnxruntime_fuses_integer_kernels():
    # Fused-op names are onnxruntime's: stated for 1.30-1.32 (QLinearConv for QDQ Conv on CPU).
    proto = demo_cnn()
    report = qpass.quantize(proto, _calib(proto)).report
    assert report.fused["integer"].get("QLinearConv", 0) == 2
    assert report.fused["float_behind_dq"] == {}


def _silu_cnn() -> onnx.ModelProto:
    """Conv -> SiLU (Sigmoid, Mul) twice, Concat, Conv; a float head: Conv -> Sigmoid -> output,
    and a Mul by a constant."""
    rng = np.random.default_rng(3)
    w = lambda *shape: numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32) * 0.3, f"w{len(inits)}")  # noqa: E731
    inits: list = []
    nodes = []
    for i, (src, cin) in enumerate([("x", 3), ("a0", 4)]):
        inits.append(w(4, cin, 3, 3))
        nodes += [
            helper.make_node("Conv", [src, inits[-1].name], [f"c{i}"], name=f"conv{i}", pads=[1, 1, 1, 1]),
            helper.make_node("Sigmoid", [f"c{i}"], [f"s{i}"], name=f"sig{i}"),
            helper.make_node("Mul", [f"c{i}", f"s{i}"], [f"a{i}"], name=f"silu{i}"),
        ]
    inits.append(w(4, 8, 1, 1))
    inits.append(numpy_helper.from_array(np.array(0.5, np.float32), "half"))
    nodes += [
        helper.make_node("Concat", ["a0", "a1"], ["cat"], name="cat", axis=1),
        helper.make_node("Conv", ["cat", inits[-2].name], ["h"], name="head"),
        helper.make_node("Mul", ["h", "half"], ["hh"], name="scale"),
        helper.make_node("Sigmoid", ["hh"], ["y"], name="head_sig"),
    ]
    graph = helper.make_graph(nodes, "silu", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 16, 16])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_integer_capable_ops_get_quantized_where_integers_flow():
    proto = _silu_cnn()
    result = qpass.quantize(proto, _calib(proto, 32))
    fused = result.report.fused
    assert fused["integer"].get("QLinearSigmoid") == 2 and fused["integer"].get("QLinearMul") == 2
    assert fused["integer"].get("QLinearConcat") == 1 and fused["integer"].get("QLinearConv") == 3
    assert fused["float_behind_dq"] == {"Mul": 1}  # x * 0.5: a constant operand stays float
    graph = result.model.graph
    assert not graph.node("head_sig").outputs[0].uses() and graph.outputs[0].producer().name == "head_sig"
    assert all(u.node.op_type != "QuantizeLinear" for u in graph.node("scale").outputs[0].uses())  # read in float only
    assert result.report.output_sqnr_db["y"] > 30
    plain = qpass.quantize(proto, _calib(proto, 32), integer_ops=False).report.fused
    assert "QLinearSigmoid" not in plain["integer"] and plain["float_behind_dq"].get("Sigmoid") == 2


def test_sigmoid_outputs_are_observed_with_min_max_unless_an_override_names_the_observer():
    """A Sigmoid's output lies in (0, 1): min-max, no histogram; the Conv outputs keep the percentile."""
    from qpass.analyses.calibration import annotated_activations
    from qpass.model_io import load_model
    from qpass.passes.annotate_quant import AnnotateQuantPass

    model = load_model(_silu_cnn())
    AnnotateQuantPass()(model)
    specs = annotated_activations(model)
    assert specs["s0"].observer == specs["s1"].observer == "minmax"
    assert specs["c0"].observer == specs["a0"].observer == "percentile"
    model = load_model(_silu_cnn())
    AnnotateQuantPass(observer="mse", overrides={"sig1": {"observer": "entropy"}})(model)
    specs = annotated_activations(model)
    assert (specs["s0"].observer, specs["s1"].observer, specs["c1"].observer) == ("minmax", "entropy", "mse")


def _hardswish_se_cnn() -> onnx.ModelProto:
    """MobileNetV3-style: Conv -> HardSwish -> depthwise Conv -> ReLU6 -> squeeze-excite (ReduceMean,
    Conv, Relu, Conv, HardSigmoid, Mul) -> Conv."""
    rng = np.random.default_rng(5)
    inits = {"w0": (8, 3, 3, 3), "w1": (8, 1, 3, 3), "w2": (4, 8, 1, 1), "w3": (8, 4, 1, 1), "w4": (6, 8, 1, 1)}
    inits = [numpy_helper.from_array((rng.standard_normal(s) * (3.0 if n == "w1" else 0.5)).astype(np.float32), n)
             for n, s in inits.items()]  # w1: the ReLU6 saturates often
    inits += [numpy_helper.from_array(np.array(v, np.float32), n) for n, v in (("zero", 0.0), ("six", 6.0))]
    nodes = [
        helper.make_node("Conv", ["x", "w0"], ["c0"], name="stem", pads=[1, 1, 1, 1]),
        helper.make_node("HardSwish", ["c0"], ["a0"], name="hswish"),
        helper.make_node("Conv", ["a0", "w1"], ["c1"], name="dw", pads=[1, 1, 1, 1], group=8),
        helper.make_node("Clip", ["c1", "zero", "six"], ["a1"], name="relu6"),
        helper.make_node("ReduceMean", ["a1"], ["m"], name="squeeze", axes=[2, 3]),
        helper.make_node("Conv", ["m", "w2"], ["r"], name="reduce"),
        helper.make_node("Relu", ["r"], ["rr"], name="relu"),
        helper.make_node("Conv", ["rr", "w3"], ["e"], name="expand"),
        helper.make_node("HardSigmoid", ["e"], ["g"], name="gate", alpha=1 / 6),
        helper.make_node("Mul", ["a1", "g"], ["se"], name="excite"),
        helper.make_node("Conv", ["se", "w4"], ["y"], name="project"),
    ]
    graph = helper.make_graph(nodes, "mbv3", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 12, 12])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, 12, 12])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_hardswish_squeeze_excite_and_relu6_run_on_integers():
    """HardSwish/HardSigmoid as QLinearAdd (its saturation is the clip) and QLinearMul, the gate's
    1/6 as a rescaled DequantizeLinear of the same codes, ReduceMean as QLinearGlobalAveragePool,
    and a ReLU6's range kept inside [0, 6] so onnxruntime drops the Clip."""
    proto = _hardswish_se_cnn()
    result = qpass.quantize(proto, _calib(proto, 32))
    fused = result.report.fused
    assert fused["float_behind_dq"] == {}  # the last Conv, writing the graph output, too
    assert fused["integer"].get("QLinearConv") == 5 and fused["integer"].get("QLinearGlobalAveragePool") == 1
    assert fused["integer"].get("QLinearAdd") == 2 and fused["integer"].get("QLinearMul") == 2
    assert result.report.output_sqnr_db["y"] > 25
    graph = result.model.graph
    ratios = []  # the clipped shift's codes are read at 1/6 of their scale: the gate's 1/6, no Mul node
    for q in graph:
        if q.op_type == "QuantizeLinear" and "clipped" in q.inputs[0].name:
            ratios += [float(q.inputs[1].const_value.numpy()) / float(u.node.inputs[1].const_value.numpy()) for u in q.outputs[0].uses()]
    assert ratios == pytest.approx([6.0, 6.0], rel=1e-6)
    assert not any(n.op_type == "Mul" and n.inputs[1].const_value is not None for n in graph)
    qop = qpass.quantize(proto, _calib(proto, 32), format="qoperator", contrib_ops=True)  # reads each DQ's own scale
    feeds = _calib(proto, 1, seed=7)[0]
    np.testing.assert_array_equal(run_model(qop.model, feeds)["y"], run_model(result.model, feeds)["y"])
    for n in graph:  # every clipped value's quantized range lies inside its clip
        if n.op_type == "QuantizeLinear" and n.inputs[0].producer() is not None and n.inputs[0].producer().op_type == "Clip":
            scale, zero = float(n.inputs[1].const_value.numpy()), int(n.inputs[2].const_value.numpy())
            assert zero == 0 and scale * 255 <= float(n.inputs[0].producer().inputs[2].const_value.numpy()) * (1 + 1e-6)


def test_degenerate_ranges_give_valid_scales():
    # Relu of a negative constant: the activation after it is all zeros.
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "W", "B"], ["c"], name="c1"), helper.make_node("Relu", ["c"], ["r"], name="relu"),
         helper.make_node("Conv", ["r", "W2"], ["y"], name="c2")],
        "zeros", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", "c", "h", "w"])],
        [numpy_helper.from_array(np.zeros((2, 1, 1, 1), np.float32), "W"),
         numpy_helper.from_array(np.full(2, -1.0, np.float32), "B"),
         numpy_helper.from_array(np.zeros((1, 2, 1, 1), np.float32), "W2")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model = qpass.quantize(proto, [{"x": np.ones((1, 1, 4, 4), np.float32)}] * 2, report=False).model
    for node in model.graph:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            scale = node.inputs[1].const_value.numpy()
            assert np.all(np.isfinite(scale)) and np.all(scale > 0)
    out = run_model(model, {"x": np.ones((1, 1, 4, 4), np.float32)})["y"]
    assert np.all(out == 0)


def test_report_json_and_html(tmp_path):
    proto = demo_cnn()
    report = qpass.quantize(proto, _calib(proto)).report
    data = json.loads(report.to_json())
    assert data["layers"][0]["sqnr_db"] == min(l["sqnr_db"] for l in data["layers"])
    assert "<svg" in report.to_html() and data["fused"]["onnxruntime"]


def test_quantize_is_deterministic(tmp_path):
    proto = demo_transformer()
    blobs = []
    for i in range(2):
        model = qpass.quantize(proto, _calib(proto), report=False).model
        blobs.append(qpass.save_model(model, tmp_path / f"q{i}.onnx").read_bytes())
    assert blobs[0] == blobs[1]


def test_quantize_without_calibration_or_unknown_option():
    with pytest.raises(qpass.CalibrationError):
        qpass.quantize(demo_cnn(), None)
    with pytest.raises(qpass.PipelineError, match="unknown quantization option 'bits'"):
        qpass.quantize(demo_cnn(), _calib(demo_cnn()), bits=4)


def test_cli_quantize_writes_model_and_reports(tmp_path):
    proto = demo_cnn()
    src = tmp_path / "cnn.onnx"
    onnx.save(proto, src)
    np.savez(tmp_path / "calib.npz", input=np.concatenate([f["input"] for f in _calib(proto, 8)]))
    out = tmp_path / "cnn.q.onnx"
    result = CliRunner().invoke(main, ["quantize", str(src), "-o", str(out), "--calib", str(tmp_path / "calib.npz"),
                                       "--report-json", str(tmp_path / "r.json"), "--report-html", str(tmp_path / "r.html")])
    assert result.exit_code == 0, result.output
    assert "per-layer SQNR" in result.output and "QLinearConv" in result.output
    onnx.checker.check_model(onnx.load(out))
    assert json.loads((tmp_path / "r.json").read_text())["output_sqnr_db"]["logits"] > 25


def test_cli_quantize_bad_calibration(tmp_path):
    src = tmp_path / "cnn.onnx"
    onnx.save(demo_cnn(), src)
    for args, fragment in (([], "needs calibration data"), (["--calib", str(tmp_path / "none.npz")], "none.npz")):
        result = CliRunner().invoke(main, ["quantize", str(src), "-o", str(tmp_path / "o.onnx"), *args])
        assert result.exit_code == 2, result.output
        assert result.output.startswith("qpass: error:") and fragment in result.output
    assert not (tmp_path / "o.onnx").exists()


def test_model_that_onnxruntime_cannot_run_on_the_probe_batch_is_one_clear_error():
    """A failure of the input model in onnxruntime (here a Reshape the data cannot satisfy) is a
    QpassError naming the probe batch, not a raw onnxruntime exception."""
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["y"], name="reshape")], "bad",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])],
        [numpy_helper.from_array(np.array([2, 2], np.int64), "shape")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(qpass.errors.PipelineError, match="onnxruntime cannot run the input model on the probe batch"):
        qpass.run(proto, recipe="fold")


@pytest.mark.parametrize("deploy", ["direct", "log2-parity"])
def test_inline_log_quantized_softmax_gets_no_second_qdq(deploy):
    """quantize-softmax-log(inline=true) emits standard ops whose outputs are already log-quantized
    (value.meta "qpass.log_quantized"): annotate-quant leaves them alone, V still gets its pair."""
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "Wq"], ["scores"], name="qk"),
         helper.make_node("Softmax", ["scores"], ["p"], name="softmax", axis=-1),
         helper.make_node("MatMul", ["x", "Wv"], ["v"], name="proj_v"),
         helper.make_node("MatMul", ["p", "v"], ["o"], name="pv")],
        "attn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 8])],
        [helper.make_tensor_value_info("o", TensorProto.FLOAT, [1, 8, 8])],
        [numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), n) for n in ("Wq", "Wv")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    passes = f"quantize-softmax-log(inline=true,deploy={deploy}),annotate-quant,insert-qdq"
    model = qpass.quantize(proto, _calib(proto, 4), passes=passes, report=False).model
    logq = [v for n in model.graph for v in n.outputs if v.meta.get("qpass.log_quantized")]
    assert len(logq) == (2 if deploy == "log2-parity" else 1)
    for value in logq:
        assert value.uses() and all(u.node.op_type == "MatMul" for u in value.uses())  # read directly: no Q/DQ
    pv = [n for n in model.graph if n.op_type == "MatMul" and n.inputs[0] in logq]
    assert pv and all(n.inputs[1].producer().op_type == "DequantizeLinear" for n in pv)  # V is quantized
    assert sum(n.op_type == "QuantizeLinear" for n in model.graph) == 2  # x and V only
