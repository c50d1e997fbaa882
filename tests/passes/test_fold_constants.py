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


# F.pad as a classic torch export spells it: the pads come out of ConstantOfShape, Concat,
# Reshape, Slice and Transpose; a Shape of the padded tensor then feeds a Reshape.
COMPUTED_PADS = """<ir_version: 8, opset_import: ["" : 17]>
padded (float[1,2,6,6] x) => (float[1,2,64] y) {
    four = Constant <value = int64[1] {4}> ()
    zeros = ConstantOfShape <value = int64[1] {0}> (four)
    given = Constant <value = int64[4] {1, 1, 1, 1}> ()
    flat = Concat <axis = 0> (given, zeros)
    pairs_shape = Constant <value = int64[2] {-1, 2}> ()
    pairs = Reshape(flat, pairs_shape)
    starts = Constant <value = int64[1] {-1}> ()
    ends = Constant <value = int64[1] {-9223372036854775807}> ()
    axes = Constant <value = int64[1] {0}> ()
    steps = Constant <value = int64[1] {-1}> ()
    rev = Slice(pairs, starts, ends, axes, steps)
    cols = Transpose <perm = [1, 0]> (rev)
    back = Constant <value = int64[1] {-1}> ()
    pads = Reshape(cols, back)
    p = Pad(x, pads)
    s = Shape(p)
    zero = Constant <value = int64[1] {0}> ()
    n = Gather(s, zero)
    rest = Constant <value = int64[2] {2, -1}> ()
    target = Concat <axis = 0> (n, rest)
    y = Reshape(p, target)
}"""


def test_small_constant_of_shape_folds_so_computed_pads_become_constants(kit):
    """onnxscript keeps ConstantOfShape so as not to grow a model; a small one (pads, shape
    arithmetic) is folded, and the shapes after the Pad become static."""
    proto = kit.model(COMPUTED_PADS)
    model, report = kit.apply(FoldConstantsPass(), proto)
    pad = kit.node(model, "Pad")
    assert pad.inputs[1].is_initializer()
    np.testing.assert_array_equal(pad.inputs[1].const_value.numpy(), [0, 0, 1, 1, 0, 0, 1, 1])
    assert kit.ops(model) == ["Pad", "Reshape"]
    assert kit.node(model, "Reshape").inputs[1].is_initializer()
    kit.check_equivalent(proto, model)


def test_large_constant_of_shape_stays(kit):
    text = """<ir_version: 8, opset_import: ["" : 17]>
    mask (float[N,4096] x) => (float[N,4096] y) {
        shape = Constant <value = int64[1] {4096}> ()
        ones = ConstantOfShape <value = float[1] {1.0}> (shape)
        y = Mul(x, ones)
    }"""
    model, _ = kit.apply(FoldConstantsPass(), kit.model(text))
    assert "ConstantOfShape" in kit.ops(model)
