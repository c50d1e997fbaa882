"""fold-batchnorm: BatchNormalization folded into Conv, ConvTranspose, Gemm and MatMul(+Add)."""

import numpy as np
import pytest
from onnx import numpy_helper

from qpass.passes.fold_batchnorm import FoldBatchNormPass

HEADER = '<ir_version: 8, opset_import: ["" : 17]>'
SKIP_REASON = "BatchNormalization not after a foldable producer"

# name: (graph text, {initializer: shape}, ops expected after folding)
CASES = {
    "conv_bias": (
        """conv_bn (float[1,3,8,8] x) => (float[1,4,6,6] y) {
            c = Conv(x, W, B)
            y = BatchNormalization(c, gamma, beta, mean, var)
        }""",
        {"W": (4, 3, 3, 3), "B": (4,)},
        ["Conv"],
    ),
    "conv_no_bias": (
        """conv_bn (float[1,3,8,8] x) => (float[1,4,6,6] y) {
            c = Conv(x, W)
            y = BatchNormalization(c, gamma, beta, mean, var)
        }""",
        {"W": (4, 3, 3, 3)},
        ["Conv"],
    ),
    "conv_transpose": (
        """deconv_bn (float[1,3,5,5] x) => (float[1,4,7,7] y) {
            c = ConvTranspose <group = 1> (x, W, B)
            y = BatchNormalization(c, gamma, beta, mean, var)
        }""",
        {"W": (3, 4, 3, 3), "B": (4,)},
        ["ConvTranspose"],
    ),
    "gemm_transB": (
        """gemm_bn (float[2,5] x) => (float[2,4] y) {
            g = Gemm <transB = 1> (x, W, B)
            y = BatchNormalization(g, gamma, beta, mean, var)
        }""",
        {"W": (4, 5), "B": (4,)},
        ["Gemm"],
    ),
    "matmul_add": (
        """linear_bn (float[N,5] x) => (float[N,4] y) {
            m = MatMul(x, W)
            a = Add(m, B)
            y = BatchNormalization(a, gamma, beta, mean, var)
        }""",
        {"W": (5, 4), "B": (4,)},
        ["MatMul", "Add"],
    ),
    "matmul_no_add": (
        """linear_bn (float[N,5] x) => (float[N,4] y) {
            m = MatMul(x, W)
            y = BatchNormalization(m, gamma, beta, mean, var)
        }""",
        {"W": (5, 4)},
        ["MatMul", "Add"],
    ),
}


def build(kit, text, shapes, channels=4):
    weights = {name: kit.randn(*shape) for name, shape in shapes.items()}
    bn = {
        "gamma": kit.uniform(0.5, 2.0, channels),
        "beta": kit.randn(channels),
        "mean": kit.randn(channels),
        "var": kit.uniform(0.1, 3.0, channels),  # var far from 1 so a wrong fold shows in numbers
    }
    return kit.model(f"{HEADER}\n{text}", **weights, **bn)


@pytest.mark.parametrize("case", list(CASES))
def test_batchnorm_is_folded_into_its_producer(kit, case):
    text, shapes, expected_ops = CASES[case]
    proto = build(kit, text, shapes)
    model, report = kit.apply(FoldBatchNormPass(), proto)
    assert kit.ops(model) == expected_ops
    assert report.modified is True
    assert report.rewritten == 1
    assert not report.skipped
    kit.check_equivalent(proto, model)
    kit.check_deterministic(FoldBatchNormPass(), proto)


def test_matmul_fold_scales_weight_columns_and_folds_bias(kit):
    text, shapes, _ = CASES["matmul_add"]
    proto = build(kit, text, shapes)
    arrays = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    scale = arrays["gamma"] / np.sqrt(arrays["var"] + 1e-5)
    model, _ = kit.apply(FoldBatchNormPass(), proto)
    mm, add = kit.node(model, "MatMul"), kit.node(model, "Add")
    w_new = mm.inputs[1].const_value.numpy()
    b_new = add.inputs[1].const_value.numpy()
    np.testing.assert_allclose(w_new, arrays["W"] * scale[None, :], rtol=1e-6)
    np.testing.assert_allclose(b_new, (arrays["B"] - arrays["mean"]) * scale + arrays["beta"], rtol=1e-5, atol=1e-6)
    assert add.inputs[0] is mm.outputs[0]
    assert model.graph.outputs[0].name == "y"


def test_batchnorm_after_3d_matmul_is_kept_and_counted(kit):
    # BN's channel axis is 1 (T = 4), not the MatMul's last axis: folding into W would be wrong.
    proto = build(
        kit,
        """seq_bn (float[2,4,6] x) => (float[2,4,4] y) {
            m = MatMul(x, W)
            y = BatchNormalization(m, gamma, beta, mean, var)
        }""",
        {"W": (6, 4)},
    )
    report = kit.check_unchanged(FoldBatchNormPass(), proto)
    assert report.skipped == {SKIP_REASON: 1}


def test_batchnorm_without_producer_is_kept_and_counted(kit):
    proto = build(
        kit,
        """bn_only (float[2,4,3,3] x) => (float[2,4,3,3] y) {
            r = Relu(x)
            y = BatchNormalization(r, gamma, beta, mean, var)
        }""",
        {},
    )
    report = kit.check_unchanged(FoldBatchNormPass(), proto)
    assert report.skipped == {SKIP_REASON: 1}


def test_batchnorm_whose_input_is_also_a_graph_output_is_kept(kit):
    # The pre-BN activation is observable: folding would change the graph output 'm'.
    proto = build(
        kit,
        """linear_bn (float[N,5] x) => (float[N,4] y, float[N,4] m) {
            m = MatMul(x, W)
            y = BatchNormalization(m, gamma, beta, mean, var)
        }""",
        {"W": (5, 4)},
    )
    report = kit.check_unchanged(FoldBatchNormPass(), proto)
    assert report.skipped == {SKIP_REASON: 1}
