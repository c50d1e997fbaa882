"""fold-constants: subgraphs of constants become initializers; large weights stay as they are."""

import numpy as np

from qpass.passes.fold_constants import FoldConstantsPass


def literal(array):
    """ONNX text for a float tensor literal, e.g. float[2,2] {1.0, 2.0, 3.0, 4.0}."""
    dims = ",".join(str(d) for d in array.shape)
    values = ", ".join(repr(float(v)) for v in array.ravel())
    return f"float[{dims}] {{{values}}}" if dims else f"float {{{values}}}"


def constant_chain(kit):
    """A weight computed at run time from three Constants: w = (base + shift) * gain."""
    base = kit.randn(4, 3)
    text = f"""<ir_version: 8, opset_import: ["" : 17]>
    chain (float[N,4] x) => (float[N,3] y) {{
        base = Constant <value = {literal(base)}> ()
        shift = Constant <value = {literal(np.float32(0.5))}> ()
        gain = Constant <value = {literal(np.float32(-2.0))}> ()
        a = Add(base, shift)
        w = Mul(a, gain)
        y = MatMul(x, w)
    }}"""
    return kit.model(text), (base + np.float32(0.5)) * np.float32(-2.0)


def test_constant_chain_feeding_a_matmul_becomes_one_initializer(kit):
    proto, expected_w = constant_chain(kit)
    model, report = kit.apply(FoldConstantsPass(), proto)
    assert kit.ops(model) == ["MatMul"]
    weight = kit.node(model, "MatMul").inputs[1]
    assert weight.is_initializer()
    np.testing.assert_array_equal(weight.const_value.numpy(), expected_w)
    assert report.modified is True
    assert report.rewritten == 5  # three Constants, the Add and the Mul
    kit.check_equivalent(proto, model)
    kit.check_deterministic(FoldConstantsPass(), proto)


def test_constant_node_becomes_an_initializer(kit):
    text = f"""<ir_version: 8, opset_import: ["" : 17]>
    shift (float[N,3] x) => (float[N,3] y) {{
        c = Constant <value = {literal(kit.randn(3))}> ()
        y = Add(x, c)
    }}"""
    proto = kit.model(text)
    model, report = kit.apply(FoldConstantsPass(), proto)
    assert kit.ops(model) == ["Add"]
    assert kit.node(model, "Add").inputs[1].is_initializer()
    assert report.modified is True and report.rewritten == 1
    kit.check_equivalent(proto, model)


# A run-time scaled weight. (A Transpose of a single-use weight is folded whatever its size:
# onnxscript keeps that one because it does not grow the model.)
LARGE = """<ir_version: 8, opset_import: ["" : 17]>
big (float[N,128] x) => (float[N,128] y) {
    ws = Mul(W, gain)
    y = MatMul(x, ws)
}"""


def test_large_weight_is_left_as_it_is(kit):
    proto = kit.model(LARGE, W=kit.randn(128, 128), gain=np.float32(-2.0))  # 16384 > the 8192 limit
    report = kit.check_unchanged(FoldConstantsPass(), proto)
    assert not report.skipped


def test_raising_the_size_limit_folds_the_large_weight(kit):
    w = kit.randn(128, 128)
    proto = kit.model(LARGE, W=w, gain=np.float32(-2.0))
    model, report = kit.apply(FoldConstantsPass(input_size_limit=1 << 20), proto)
    assert kit.ops(model) == ["MatMul"]
    np.testing.assert_array_equal(kit.node(model, "MatMul").inputs[1].const_value.numpy(), w * np.float32(-2.0))
    assert report.modified is True and report.rewritten == 1
    kit.check_equivalent(proto, model)


def test_graph_without_constants_is_unchanged(kit):
    text = """<ir_version: 8, opset_import: ["" : 17]>
    plain (float[N,4] x) => (float[N,3] y) {
        m = MatMul(x, W)
        y = Relu(m)
    }"""
    kit.check_unchanged(FoldConstantsPass(), kit.model(text, W=kit.randn(4, 3)))
