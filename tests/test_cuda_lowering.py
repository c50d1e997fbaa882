"""The CUDA backend's lowering, tested on the CPU with the exact integer reference kernels."""

import numpy as np
import onnx_ir as ir
import pytest
import torch

import qpass
from qpass.backends.cuda.lower import QuantizedLinear, lower
from qpass.demo import demo_calibration, demo_cnn, demo_transformer, demo_vit
from qpass.verify import run_model


@pytest.mark.parametrize("builder,recipe,islands", [
    (demo_cnn, "w8a8", 4),
    (demo_transformer, "w8a8", 6),
    (demo_transformer, "smoothquant-w8a8", 6),
    (demo_vit, "repq-w4a4", 12),  # ai.qpass log-sqrt2 functions run from their bodies
])
def test_lowered_program_matches_onnxruntime(builder, recipe, islands):
    proto = builder()
    model = qpass.quantize(proto, demo_calibration(proto, 8), recipe=recipe, report=False).model
    program = lower(model, "cpu")
    assert program.quantized_layers == islands
    # an island holds its weight codes in its own layout: the DQ's initializer is not uploaded too
    weights = {n.inputs[1].producer().inputs[0].name for n in model.graph if id(n) in program.islands}
    assert weights and not weights & set(program.constants)
    for feeds in demo_calibration(proto, 2, seed=5):
        ref = run_model(model, feeds)
        got = program(**{k: torch.from_numpy(v) for k, v in feeds.items()})
        for name, expected in ref.items():
            # same integer products; only float epilogue rounding order differs
            np.testing.assert_allclose(got[name].numpy(), expected, rtol=0, atol=2e-6 * np.abs(expected).max() + 1e-6)


def test_static_shape_linear_biases_through_int32_dequantize():
    """With a static input shape, a Linear's bias Add reads an int32 bias through a
    DequantizeLinear (what onnxruntime's QGemm needs); the program still matches onnxruntime."""
    proto = demo_transformer()
    proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 2  # batch 2: a fully static shape
    model = qpass.quantize(proto, demo_calibration(proto, 8, seed=3), report=False).model
    int32_bias_adds = [n for n in model.graph if n.op_type == "Add" and any(
        v.producer() is not None and v.producer().op_type == "DequantizeLinear"
        and v.producer().inputs[0].dtype == ir.DataType.INT32 for v in n.inputs)]
    assert int32_bias_adds
    program = lower(model, "cpu")
    for feeds in demo_calibration(proto, 2, seed=5):
        ref = run_model(model, feeds)
        got = program(**{k: torch.from_numpy(v) for k, v in feeds.items()})
        for name, expected in ref.items():
            np.testing.assert_allclose(got[name].numpy(), expected, rtol=0, atol=2e-6 * np.abs(expected).max() + 1e-6)


@pytest.mark.parametrize("options", [dict(group_size=32), dict(activation_dtype="int16")], ids=["int8-groups", "int16-activations"])
def test_schemes_without_integer_islands_run_op_by_op(options):
    """Group-wise int8 weights and 16-bit activations have no integer kernel: they run op by op,
    matching onnxruntime (16-bit codes are not clamped to 8 bits)."""
    proto = demo_transformer()
    model = qpass.quantize(proto, demo_calibration(proto, 8), report=False, **options).model
    program = lower(model, "cpu")
    assert not any(isinstance(i, QuantizedLinear) for i in program.islands.values())
    for feeds in demo_calibration(proto, 2, seed=5):
        ref = run_model(model, feeds)
        got = program(**{k: torch.from_numpy(v) for k, v in feeds.items()})
        for name, value in ref.items():
            np.testing.assert_allclose(got[name].cpu().numpy(), value, rtol=1e-3, atol=1e-3 * np.abs(value).max())


def test_integer_island_is_exact():
    rng = np.random.default_rng(0)
    w_t = rng.integers(-127, 128, (5, 7)).astype(np.int8)
    island = QuantizedLinear(0.05, 128, True, torch.from_numpy(w_t), torch.tensor([0.01]), torch.from_numpy(w_t.astype(np.int32).sum(1)), None)
    x = rng.uniform(-6, 6, (4, 7)).astype(np.float32)
    q = np.clip(np.round(x / np.float32(0.05)) + 128, 0, 255).astype(np.int64)
    acc = (q - 128) @ w_t.T.astype(np.int64)
    expected = acc.astype(np.float32) * np.float32(0.05 * 0.01)
    got = island(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_round_half_to_even_like_onnx():
    island = QuantizedLinear(1.0, 0, False, torch.ones((1, 4), dtype=torch.int8), torch.tensor([1.0]), torch.tensor([4]), None)
    out = island(torch.tensor([[0.5, 1.5, 2.5, -0.5]]))
    assert out.item() == 0 + 2 + 2 + 0


def test_unsupported_op_and_missing_input_and_no_gpu():
    model = qpass.load_model(demo_cnn())
    model.graph.node("relu1").op_type = "Selu"
    with pytest.raises(qpass.PipelineError, match="no lowering for op 'Selu'"):
        lower(model, "cpu")
    program = lower(qpass.load_model(demo_cnn()), "cpu")
    with pytest.raises(qpass.PipelineError, match="missing model input 'input'"):
        program()
    x = demo_calibration(demo_cnn(), 1)[0]["input"]
    with pytest.raises(qpass.PipelineError, match="unknown model input 'pixels'"):
        program(input=x, pixels=x)
    with pytest.raises(qpass.PipelineError, match=r"model input 'input' must have shape \[.*\], got \[1, 3\]"):
        program(input=np.zeros((1, 3), np.float32))
    with pytest.raises(qpass.PipelineError, match="model input 'input' must be float32, got int64"):
        program(input=x.astype(np.int64))
    assert program(input=x.astype(np.float64))  # float64 is cast, as calibration data
    if not torch.cuda.is_available():
        with pytest.raises(qpass.PipelineError, match="no CUDA GPU"):
            lower(qpass.load_model(demo_cnn()), "cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("static", [False, True], ids=["dynamic-batch", "static-shape"])
def test_gpu_program_matches_cpu_reference(static):
    """Static shapes give the Linears int32 biases through a DequantizeLinear: the GPU program
    still folds them into the GEMM epilogue and requantizes there."""
    proto = demo_transformer()
    if static:
        proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    model = qpass.quantize(proto, demo_calibration(proto, 8), report=False).model
    feeds = {k: torch.from_numpy(v) for k, v in demo_calibration(proto, 1, seed=5)[0].items()}
    cpu = lower(model, "cpu")(**feeds)["output"]
    program = lower(model, "cuda")
    gpu = program(**feeds)["output"].cpu()
    torch.testing.assert_close(gpu, cpu, rtol=1e-4, atol=1e-4)
    assert program.int8_values  # Linear -> bias -> GELU -> next Linear stays int8 between the GEMMs


def test_half_precision_mode_and_skipped_qdq():
    proto = demo_cnn()
    model = qpass.quantize(proto, demo_calibration(proto, 8), report=False).model
    feeds = {k: torch.from_numpy(v) for k, v in demo_calibration(proto, 1, seed=5)[0].items()}
    full, half = lower(model, "cpu"), lower(model, "cpu", "float16")
    assert full.skipped and len(full.skipped) == len(half.skipped)  # Q/DQ read only by islands are not run
    name = proto.graph.output[0].name
    a, b = full(**feeds)[name], half(**feeds)[name]
    assert b.dtype == torch.float32
    assert float((a - b).abs().max() / a.abs().max()) < 1e-2
    with pytest.raises(qpass.PipelineError, match="float32 or float16"):
        lower(model, "cpu", "bfloat16")


@pytest.mark.parametrize("upper", [0, 1])
def test_trilu_matches_onnxruntime(upper):
    from onnx import TensorProto, helper, numpy_helper

    from qpass.verify import run_model

    graph = helper.make_graph(
        [helper.make_node("Trilu", ["x", "k"], ["y"], upper=upper)], "trilu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 5])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 5])],
        [numpy_helper.from_array(np.array(1, np.int64), "k")],
    )
    model = qpass.load_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    x = np.random.default_rng(0).standard_normal((4, 5)).astype(np.float32)
    np.testing.assert_array_equal(lower(model, "cpu")(x=x)["y"].numpy(), run_model(model, {"x": x})["y"])


@pytest.mark.parametrize("split", ["num_outputs", "sizes"])
def test_split_c2f_block_with_a_quantized_model_output_matches_onnxruntime(split):
    """A C2f-style block (Conv, Split into shared-parameter pieces, Concat, Conv writing the model
    output through its own Q/DQ) lowers and matches onnxruntime."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inputs, attrs, inits = (["c"], {"num_outputs": 2}, []) if split == "num_outputs" else (["c", "sizes"], {}, [
        numpy_helper.from_array(np.array([3, 5], np.int64), "sizes")])
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "W1"], ["c"], name="cv1"),
         helper.make_node("Split", inputs, ["a", "b"], name="chunk", axis=1, **attrs),
         helper.make_node("Concat", ["a", "b", "a"], ["cat"], name="cat", axis=1),
         helper.make_node("Conv", ["cat", "W2"], ["y"], name="cv2", pads=[1, 1, 1, 1])],
        "c2f", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6])],
        [numpy_helper.from_array(rng.standard_normal((8, 8, 1, 1)).astype(np.float32), "W1"),
         numpy_helper.from_array(rng.standard_normal((4, 12 if split == "num_outputs" else 11, 3, 3)).astype(np.float32), "W2"),
         *inits])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model = qpass.quantize(proto, demo_calibration(proto, 8), report=False).model
    program = lower(model, "cpu")
    for feeds in demo_calibration(proto, 2, seed=5):
        expected = run_model(model, feeds)["y"]
        got = program(**{k: torch.from_numpy(v) for k, v in feeds.items()})["y"].numpy()
        np.testing.assert_allclose(got, expected, rtol=0, atol=2e-6 * np.abs(expected).max() + 1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_capture_replays_like_the_op_by_op_run():
    proto = demo_transformer()
    model = qpass.quantize(proto, demo_calibration(proto, 8), report=False).model
    first, second = ({k: torch.from_numpy(v) for k, v in demo_calibration(proto, 1, seed=s)[0].items()} for s in (5, 6))
    program = lower(model, "cuda", "float16")
    replay = program.capture(**first)
    for feeds in (second, first):
        torch.testing.assert_close(replay(**feeds)["output"].clone(), program(**feeds)["output"], rtol=0, atol=0)


@pytest.mark.parametrize("builder,recipe,backend", [
    (demo_cnn, "w8a8", "eager"),
    (demo_vit, "repq-w4a4", "eager"),
    (demo_vit, "w8a8", "eager"),
    (demo_transformer, "w8a8", "inductor"),
])
def test_compiled_program_matches_onnxruntime(builder, recipe, backend):
    proto = builder()
    model = qpass.quantize(proto, demo_calibration(proto, 8), recipe=recipe, report=False).model
    program = lower(model, "cpu").compile(backend=backend)
    for feeds in demo_calibration(proto, 2, seed=5):
        ref = run_model(model, feeds)
        got = program(**{k: torch.from_numpy(v) for k, v in feeds.items()})
        for name, expected in ref.items():
            # the epilogue is fused (bias with the zero-point correction folded in): float rounding only
            np.testing.assert_allclose(got[name].numpy(), expected, rtol=0, atol=1e-5 * np.abs(expected).max() + 1e-6)
    assert len(program._compiled) == 1  # one trace per input shape
    if recipe == "w8a8" and builder is not demo_cnn:  # fc1 -> bias -> GELU -> Q runs in fc1's epilogue
        assert program.int8_values


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_gpu_program_matches_op_by_op_and_replays():
    proto = demo_transformer()
    model = qpass.quantize(proto, demo_calibration(proto, 8), report=False).model
    first, second = ({k: torch.from_numpy(v) for k, v in demo_calibration(proto, 1, seed=s)[0].items()} for s in (5, 6))
    eager = lower(model, "cuda")(**first)["output"]
    compiled = lower(model, "cuda").compile()
    # the compiler's float32 division may round a quantization tie the other way: 1 LSB at most
    torch.testing.assert_close(compiled(**first)["output"], eager, rtol=1e-3, atol=1e-3)
    replay = compiled.capture(**first)
    torch.testing.assert_close(replay(**second)["output"].clone(), compiled(**second)["output"], rtol=0, atol=0)


def test_weight_only_int4_blocks_match_onnxruntime():
    proto = demo_transformer()
    model = qpass.quantize(proto, demo_calibration(proto, 4), recipe="w4a16", report=False).model
    program = lower(model, "cpu")
    for feeds in demo_calibration(proto, 2, seed=5):
        ref = run_model(model, feeds)
        got = program(**{k: torch.from_numpy(v) for k, v in feeds.items()})
        np.testing.assert_allclose(got["output"].numpy(), ref["output"], rtol=0, atol=1e-5 * np.abs(ref["output"]).max())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("batch", [1, 8])  # 16 rows: the W4A16 kernel; 128 rows: dequantized dense GEMM
def test_weight_only_gpu_islands(batch):
    from qpass.backends.cuda.lower import WeightOnlyLinear

    proto = demo_transformer()
    model = qpass.quantize(proto, demo_calibration(proto, 4), recipe="w4a16", report=False).model
    feeds = {k: torch.from_numpy(np.repeat(v, batch, axis=0)) for k, v in demo_calibration(proto, 1, seed=5)[0].items()}
    cpu = lower(model, "cpu")(**feeds)["output"]
    for program in (lower(model, "cuda", "float16"), lower(model, "cuda", "float16").compile()):
        # islands where K is a whole number of groups (fc2, K = 256); K = 64 < 128 runs op by op
        assert sum(isinstance(i, WeightOnlyLinear) for i in program.islands.values()) == 1
        gpu = program(**feeds)["output"].cpu()
        assert float((gpu - cpu).norm() / cpu.norm()) < 2e-3  # float16 activations and weights


@pytest.mark.parametrize("builder,backend", [(demo_transformer, None), (demo_vit, None), (demo_vit, "eager")])
def test_fused_attention_matches_onnxruntime(builder, backend):
    proto = builder()
    model = qpass.quantize(proto, demo_calibration(proto, 8), report=False).model
    program = lower(model, "cpu", fused_attention=True)
    assert len(program.attention) == (1 if builder is demo_transformer else 2)
    if backend:
        program.compile(backend=backend)
    for feeds in demo_calibration(proto, 2, seed=5):
        ref = run_model(model, feeds)
        got = program(**{k: torch.from_numpy(v) for k, v in feeds.items()})
        for name, expected in ref.items():  # P's codes: multiply by the reciprocal, ties may differ by 1 LSB
            np.testing.assert_allclose(got[name].numpy(), expected, rtol=0, atol=1e-4 * np.abs(expected).max())


def test_fused_attention_leaves_other_softmax_alone():
    from qpass.backends.cuda.attention_island import match_attention

    proto = demo_transformer()
    model = qpass.quantize(proto, demo_calibration(proto, 8), report=False).model
    matched = [n for n in model.graph if match_attention(n) is not None]
    assert [n.op_type for n in matched] == ["MatMul"]
    softmax = next(n for n in model.graph if n.op_type == "Softmax")
    extra = ir.node("Identity", [softmax.outputs[0]])  # a second reader of the probabilities
    model.graph.append(extra)
    assert not [n for n in model.graph if match_attention(n) is not None]


def _position_model(shape_from_input: bool):
    """y = x + Range(0, x.shape[1]) (position ids from a Shape), or Reshape(x, s) with s a graph input."""
    from onnx import TensorProto, helper, numpy_helper

    if shape_from_input:
        nodes = [helper.make_node("Reshape", ["x", "s"], ["y"])]
        inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4]), helper.make_tensor_value_info("s", TensorProto.INT64, [2])]
        inits = []
    else:
        nodes = [
            helper.make_node("Shape", ["x"], ["shape"]),
            helper.make_node("Gather", ["shape", "one"], ["n"], axis=0),
            helper.make_node("Range", ["zero", "n", "one"], ["pos"]),
            helper.make_node("Cast", ["pos"], ["posf"], to=TensorProto.FLOAT),
            helper.make_node("Add", ["x", "posf"], ["y"]),
        ]
        inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])]
        inits = [numpy_helper.from_array(np.array(1, np.int64), "one"), numpy_helper.from_array(np.array(0, np.int64), "zero")]
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4] if not shape_from_input else [4, 2])], inits)
    return qpass.load_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def test_compile_computes_shape_arithmetic_and_refuses_shapes_from_input_values():
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    model = _position_model(False)
    program = lower(model, "cpu").compile(backend="eager")
    np.testing.assert_array_equal(program(x=x)["y"].numpy(), run_model(model, {"x": x})["y"])
    program = lower(_position_model(True), "cpu").compile(backend="eager")
    with pytest.raises(qpass.PipelineError, match="input 's' depends on input values; run the program without compile"):
        program(x=x, s=np.array([4, 2], np.int64))


def test_weight_only_matcher_skips_quantized_activations():
    from qpass.backends.cuda.islands import match_weight_only

    proto = demo_transformer()
    model = qpass.quantize(proto, demo_calibration(proto, 4), weight_dtype="int4", group_size=32, report=False).model
    assert any(n.op_type == "DequantizeLinear" and n.attributes.get_int("block_size", 0) for n in model.graph)
    assert not [n for n in model.graph if match_weight_only(n, "cpu") is not None]
    weight_only = qpass.quantize(proto, demo_calibration(proto, 4), recipe="w4a16", report=False).model
    assert [n for n in weight_only.graph if match_weight_only(n, "cpu") is not None]


def test_island_needs_the_same_parameters_on_its_quantize_and_dequantize():
    """An island quantizes x with its DQ's parameters: a Q with other ones runs op by op."""
    proto = demo_transformer()
    model = qpass.quantize(proto, demo_calibration(proto, 4), report=False).model
    before = lower(model, "cpu").quantized_layers
    dq = next(n.inputs[0].producer() for n in model.graph
              if n.op_type == "MatMul" and n.inputs[0].producer() is not None and n.inputs[0].producer().op_type == "DequantizeLinear")
    scale = float(dq.inputs[1].const_value.numpy())
    other = ir.Value(name="other_scale", const_value=ir.tensor(np.array(scale * 1.5, np.float32)))
    model.graph.register_initializer(other)
    dq.replace_input_with(1, other)
    program = lower(model, "cpu")
    assert program.quantized_layers == before - sum(u.node.op_type == "MatMul" and u.idx == 0 for u in dq.outputs[0].uses())
    for feeds in demo_calibration(proto, 2, seed=5):
        ref = run_model(model, feeds)
        got = program(**{k: torch.from_numpy(v) for k, v in feeds.items()})
        for name, value in ref.items():
            np.testing.assert_allclose(got[name].numpy(), value, rtol=1e-5, atol=1e-5 * np.abs(value).max())
