"""fuse-gelu: the decomposed erf and tanh GELU become one Gelu node (opset 20)."""

import math

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from qpass.backends.onnxruntime import make_session

from qpass.passes.fuse_gelu import FuseGeluPass

CONSTANTS = {
    "sqrt2": math.sqrt(2),
    "inv_sqrt2": 1 / math.sqrt(2),
    "half": 0.5,
    "one": 1.0,
    "two": 2.0,
    "three": 3.0,
    "k": 0.044715,
    "c": math.sqrt(2 / math.pi),
}

SCALES = {"div": "s = Div(x, sqrt2)", "mul": "s = Mul(x, inv_sqrt2)"}
CUBES = {"pow": ["x3 = Pow(x, three)"], "mul": ["x2 = Mul(x, x)", "x3 = Mul(x, x2)"]}
# How the product 0.5 * x * (1 + core) is associated; ``p`` is 1 + core.
ORDERS = {
    "x*0.5*(1+f)": ["h = Mul(x, half)", "y = Mul(h, p)"],
    "(0.5*x)*(1+f)": ["h = Mul(half, x)", "y = Mul(h, p)"],
    "x*((1+f)*0.5)": ["q = Mul(p, half)", "y = Mul(x, q)"],
    "x*(0.5*(1+f))": ["q = Mul(half, p)", "y = Mul(x, q)"],
}


def erf_lines(scale="div", order="x*0.5*(1+f)"):
    return [SCALES[scale], "e = Erf(s)", "p = Add(e, one)", *ORDERS[order]]


def tanh_lines(cube="pow", order="x*0.5*(1+f)"):
    inner = ["k3 = Mul(x3, k)", "u = Add(x, k3)", "v = Mul(u, c)", "t = Tanh(v)", "p = Add(one, t)"]
    return [*CUBES[cube], *inner, *ORDERS[order]]


def build(kit, lines, opset=20, extra_outputs=()):
    outs = ", ".join(["float[N,16] y", *(f"float[N,16] {v}" for v in extra_outputs)])
    body = "\n    ".join(lines)
    text = f'<ir_version: 10, opset_import: ["" : {opset}]>\ngelu (float[N,16] x) => ({outs}) {{\n    {body}\n}}'
    return kit.model(text, **{name: np.float32(v) for name, v in CONSTANTS.items()})


def check_fused(kit, proto, approximate):
    model, report = kit.apply(FuseGeluPass(), proto)
    assert kit.ops(model) == ["Gelu"]
    assert report.modified is True
    assert report.rewritten == 1
    assert not report.skipped
    gelu = kit.node(model, "Gelu")
    assert gelu.inputs[0] is model.graph.inputs[0]
    assert gelu.outputs[0] is model.graph.outputs[0] and gelu.outputs[0].name == "y"
    assert gelu.attributes.get_string("approximate", "none") == approximate
    kit.check_equivalent(proto, model)


@pytest.mark.parametrize("scale", list(SCALES))
@pytest.mark.parametrize("order", list(ORDERS))
def test_erf_form_is_fused(kit, scale, order):
    check_fused(kit, build(kit, erf_lines(scale, order)), approximate="none")


@pytest.mark.parametrize("cube", list(CUBES))
def test_tanh_form_is_fused_with_approximate_tanh(kit, cube):
    check_fused(kit, build(kit, tanh_lines(cube)), approximate="tanh")


def test_tanh_form_in_another_association_is_fused(kit):
    check_fused(kit, build(kit, tanh_lines("mul", "x*((1+f)*0.5)")), approximate="tanh")


def test_fusion_is_deterministic(kit):
    kit.check_deterministic(FuseGeluPass(), build(kit, erf_lines("mul", "(0.5*x)*(1+f)")))
    kit.check_deterministic(FuseGeluPass(), build(kit, tanh_lines("pow")))


@pytest.mark.parametrize("order", ["x*0.5*(1+f)", "(0.5*x)*(1+f)"])
def test_below_opset_20_the_runtime_spelling_is_kept(kit, order):
    report = kit.check_unchanged(FuseGeluPass(), build(kit, erf_lines("div", order), opset=18))
    assert not report.skipped


def test_below_opset_20_the_tanh_form_is_kept_and_counted(kit):
    report = kit.check_unchanged(FuseGeluPass(), build(kit, tanh_lines(), opset=18))
    assert report.skipped == {"tanh form below opset 20 (Gelu needs 20)": 1}


@pytest.mark.parametrize("scale,order", [("div", "x*((1+f)*0.5)"), ("div", "x*(0.5*(1+f))"), ("mul", "x*0.5*(1+f)"), ("mul", "x*((1+f)*0.5)")])
def test_below_opset_20_an_erf_form_is_respelled_for_onnxruntime(kit, tmp_path, scale, order):
    proto = build(kit, erf_lines(scale, order), opset=18)
    model, report = kit.apply(FuseGeluPass(), proto)
    assert report.rewritten == 1 and kit.ops(model) == ["Div", "Erf", "Add", "Mul", "Mul"]
    assert model.graph.outputs[0].name == "y"
    kit.check_equivalent(proto, model)
    kit.check_unchanged(FuseGeluPass(), ir.to_proto(model))  # the new spelling is final
    path = str(tmp_path / "optimized.onnx")
    make_session(model, optimize=True, optimized_model_path=path)
    assert [node.op_type for node in onnx.load(path).graph.node] == ["Gelu"]


def test_erf_of_x_over_two_is_not_gelu(kit):
    report = kit.check_unchanged(FuseGeluPass(), build(kit, ["s = Div(x, two)", *erf_lines()[1:]]))
    assert not report.skipped


@pytest.mark.parametrize("intermediate", ["s", "e", "p", "h"])
def test_erf_form_with_an_intermediate_graph_output_is_kept(kit, intermediate):
    report = kit.check_unchanged(FuseGeluPass(), build(kit, erf_lines(), extra_outputs=[intermediate]))
    assert not report.skipped


def test_tanh_form_with_its_cube_as_a_graph_output_is_kept(kit):
    report = kit.check_unchanged(FuseGeluPass(), build(kit, tanh_lines("pow"), extra_outputs=["x3"]))
    assert not report.skipped
