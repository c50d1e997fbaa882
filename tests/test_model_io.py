import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from helpers import small_model
from onnx import TensorProto, helper, numpy_helper

import qpass
from qpass.verify import run_model


def test_load_sources_agree(small_model_path):
    proto = onnx.load(small_model_path)
    models = [qpass.load_model(small_model_path), qpass.load_model(proto), qpass.load_model(ir.from_proto(proto))]
    feeds = {"x": np.ones((3, 4), np.float32)}
    outs = [run_model(m, feeds)["y"] for m in models]
    assert all(np.array_equal(outs[0], o) for o in outs[1:])
    # shapes are inferred at load
    assert models[0].graph.node("add").outputs[0].shape.dims[1] == 3


def test_old_opset_is_upgraded_and_checked(tmp_path):
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Clip", ["x"], ["c"], min=-0.5, max=0.5),  # attributes in opset < 11
        helper.make_node("MatMul", ["c", "W"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "old", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        [numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32), "W")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)])
    proto.ir_version = 7
    model = qpass.load_model(proto)
    assert qpass.model_io.opset_of(model) == 13
    x = rng.standard_normal((2, 4)).astype(np.float32)
    expected = np.clip(x, -0.5, 0.5) @ numpy_helper.to_array(graph.initializer[0])
    np.testing.assert_allclose(run_model(model, {"x": x})["y"], expected, rtol=1e-5, atol=1e-6)


def test_external_data_round_trip(tmp_path):
    src = tmp_path / "in" / "m.onnx"
    src.parent.mkdir()
    onnx.save(small_model(), src, save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    model = qpass.load_model(src)
    out = qpass.save_model(model, tmp_path / "out.onnx", input_path=src, external_data=True)
    assert (tmp_path / "out.onnx.data").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp files left
    again = qpass.load_model(out)
    feeds = {"x": np.ones((1, 4), np.float32)}
    assert np.array_equal(run_model(model, feeds)["y"], run_model(again, feeds)["y"])


def test_save_refuses_input_path_and_leaves_nothing(small_model_path):
    model = qpass.load_model(small_model_path)
    with pytest.raises(qpass.OutputError, match="is the input model"):
        qpass.save_model(model, small_model_path, input_path=small_model_path)
    with pytest.raises(qpass.OutputError, match="is a directory"):
        qpass.save_model(model, small_model_path.parent)


def test_zero_size_input_dimension():
    proto = small_model()
    proto.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 0
    with pytest.raises(qpass.ModelError, match="zero-size dimension"):
        qpass.load_model(proto)


def test_unsupported_source_type():
    with pytest.raises(qpass.ModelError, match="cannot load a model from int"):
        qpass.load_model(42)


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = torch.nn.BatchNorm2d(8)
        self.fc = torch.nn.Linear(8, 5)
        self.ln = torch.nn.LayerNorm(5)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3))
        return self.ln(torch.nn.functional.gelu(self.fc(y)))


def test_torch_module_exports_with_dynamic_batch():
    torch.manual_seed(0)
    module = _Block().eval()
    with torch.no_grad():
        module.bn.running_mean.uniform_(-0.5, 0.5)
        module.bn.running_var.uniform_(0.5, 2.0)
    result = qpass.run(module, "fold", example_inputs=(torch.randn(2, 3, 8, 8),))
    assert not isinstance(result.model.graph.inputs[0].shape[0], int)  # dynamic batch
    x = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        expected = module(x).numpy()
    got = run_model(result.model, {result.model.graph.inputs[0].name: x.numpy()})
    np.testing.assert_allclose(next(iter(got.values())), expected, rtol=1e-4, atol=1e-5)


def test_torch_module_that_fails_to_export():
    class Bad(torch.nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow
                return x.numpy()
            return x

    with pytest.raises(qpass.ModelError, match="failed to export"):
        qpass.load_model(Bad(), (torch.randn(2, 3),))
    with pytest.raises(qpass.ModelError, match="needs example inputs"):
        qpass.load_model(Bad())


def test_inf_is_an_error_in_weights_but_not_in_masks():
    proto = small_model()
    proto.graph.initializer[1].CopyFrom(numpy_helper.from_array(np.array([0.0, -np.inf, 1.0], np.float32), "b"))
    model = qpass.load_model(proto)  # an additive -inf mask (Add input) is legitimate
    out = run_model(model, {"x": np.ones((2, 4), np.float32)})["y"]
    assert (out[:, 1] == 0).all()
    proto.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.full((4, 3), np.inf, np.float32), "W"))
    with pytest.raises(qpass.ModelError, match="'W' contains Inf and is a MatMul weight"):
        qpass.load_model(proto)


def test_torch_export_owns_its_weights():
    module = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3)).eval()
    model = qpass.load_model(module, (torch.randn(2, 4),))
    before = {n: v.const_value.numpy().copy() for n, v in model.graph.initializers.items()}
    module.half()  # changing the module afterwards leaves the loaded model alone
    with torch.no_grad():
        module[0].weight.zero_()
    for name, value in model.graph.initializers.items():
        assert value.const_value.numpy().dtype == before[name].dtype
        np.testing.assert_array_equal(value.const_value.numpy(), before[name])


def test_save_keeps_the_models_ir_version(tmp_path):
    from qpass.demo import demo_cnn

    model = qpass.load_model(demo_cnn())
    model.ir_version = 10
    qpass.save_model(model, tmp_path / "m.onnx")
    assert onnx.load(tmp_path / "m.onnx").ir_version == 10


def test_repeated_node_names_are_renamed_at_load():
    """onnxruntime refuses two nodes of one name; the loaded model names them apart and runs."""
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["a"], name="n"), helper.make_node("Neg", ["a"], ["y"], name="n")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model = qpass.load_model(proto)
    names = [node.name for node in model.graph]
    assert names[0] == "n" and len(set(names)) == 2
    x = np.array([[-1.0, 2.0, -3.0, 4.0]], np.float32)
    np.testing.assert_array_equal(run_model(model, {"x": x})["y"], -np.maximum(x, 0))
