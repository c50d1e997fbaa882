"""fuse-layernorm: a decomposed layer normalization becomes one LayerNormalization."""

import itertools

import numpy as np
import pytest
from onnx import numpy_helper

from qpass.passes.fuse_layernorm import FuseLayerNormPass

EPS = 1e-3  # not LayerNormalization's default 1e-5, so a dropped epsilon shows in the numbers
C = 8


def layernorm_text(opset=17, square="pow", divide="div", affine=True, axis=-1, extra_outputs=()):
    """x[N,T,C] -> the textbook decomposition -> y; ``extra_outputs`` exposes intermediates."""
    n = "n" if affine else "y"
    reduce = f"<axes = [{axis}]>" if opset < 18 else ""
    axes = ", axes" if opset >= 18 else ""
    lines = [
        f"mean = ReduceMean {reduce} (x{axes})",
        "d = Sub(x, mean)",
        "sq = Pow(d, two)" if square == "pow" else "sq = Mul(d, d)",
        f"var = ReduceMean {reduce} (sq{axes})",
        "ve = Add(var, eps)",
        "std = Sqrt(ve)",
        *([f"{n} = Div(d, std)"] if divide == "div" else ["inv = Reciprocal(std)", f"{n} = Mul(d, inv)"]),
        *(["g = Mul(n, gamma)", "y = Add(g, beta)"] if affine else []),
    ]
    shapes = {"mean": "[N,T,1]", "var": "[N,T,1]", "std": "[N,T,1]", "inv": "[N,T,1]", "d": f"[N,T,{C}]"}
    outs = ", ".join([f"float[N,T,{C}] y", *(f"float{shapes[v]} {v}" for v in extra_outputs)])
    body = "\n    ".join(lines)
    return f'<ir_version: 8, opset_import: ["" : {opset}]>\nln (float[N,T,{C}] x) => ({outs}) {{\n    {body}\n}}'


def build(kit, **options):
    weights = {"two": np.float32(2.0), "eps": np.float32(EPS)}
    if options.get("opset", 17) >= 18:
        weights["axes"] = np.array([options.get("axis", -1)], np.int64)
    if options.get("affine", True):
        weights["gamma"] = kit.uniform(0.5, 2.0, C)
        weights["beta"] = kit.randn(C)
    return kit.model(layernorm_text(**options), **weights)


FORMS = list(itertools.product([17, 18], ["pow", "mul"], ["div", "reciprocal"], [True, False]))


@pytest.mark.parametrize("opset, square, divide, affine", FORMS)
def test_decomposed_layernorm_is_fused(kit, opset, square, divide, affine):
    proto = build(kit, opset=opset, square=square, divide=divide, affine=affine)
    model, report = kit.apply(FuseLayerNormPass(), proto)
    assert kit.ops(model) == ["LayerNormalization"]
    assert report.modified is True
    assert report.rewritten == 1
    assert not report.skipped
    ln = kit.node(model, "LayerNormalization")
    assert ln.inputs[0] is model.graph.inputs[0]
    assert ln.outputs[0] is model.graph.outputs[0] and ln.outputs[0].name == "y"
    assert ln.attributes.get_int("axis") == -1
    assert ln.attributes.get_float("epsilon") == pytest.approx(EPS, rel=1e-6)
    init = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    gamma = init["gamma"] if affine else np.ones(C, np.float32)
    beta = init["beta"] if affine else np.zeros(C, np.float32)
    np.testing.assert_array_equal(ln.inputs[1].const_value.numpy(), gamma)
    np.testing.assert_array_equal(ln.inputs[2].const_value.numpy(), beta)
    kit.check_equivalent(proto, model)


def test_fusion_is_deterministic(kit):
    kit.check_deterministic(FuseLayerNormPass(), build(kit, opset=18, divide="reciprocal"))


def test_normalization_over_a_non_last_axis_is_kept(kit):
    proto = build(kit, opset=17, axis=1)
    report = kit.check_unchanged(FuseLayerNormPass(), proto)
    assert not report.skipped  # "not over the last axis" is not worth counting


@pytest.mark.parametrize(
    "intermediate, divide", [("d", "div"), ("mean", "div"), ("var", "div"), ("std", "div"), ("inv", "reciprocal")]
)
def test_decomposition_with_an_intermediate_graph_output_is_kept(kit, intermediate, divide):
    proto = build(kit, opset=17, divide=divide, extra_outputs=[intermediate])
    report = kit.check_unchanged(FuseLayerNormPass(), proto)
    assert sum(report.skipped.values()) == 1  # one decomposition, counted once


def test_opset_16_model_is_kept_and_counted(kit):
    proto = build(kit, opset=16)
    report = kit.check_unchanged(FuseLayerNormPass(), proto)
    assert report.skipped == {"opset < 17 (LayerNormalization needs 17)": 1}
