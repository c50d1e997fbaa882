"""spatial-mean-to-pool: a ReduceMean over every spatial axis becomes GlobalAveragePool."""

import pytest

from qpass.passes.spatial_mean_to_pool import SpatialMeanToPoolPass


def build(kit, line, out_shape, opset=17, x_shape="N,8,5,6"):
    text = (f'<ir_version: 8, opset_import: ["" : {opset}]>\n'
            f'mean (float[{x_shape}] x) => (float[{out_shape}] y) {{\n    {line}\n}}')
    return kit.model(text)


@pytest.mark.parametrize("opset,line", [
    (17, "y = ReduceMean <axes = [2, 3]> (x)"),
    (17, "y = ReduceMean <axes = [-1, -2], keepdims = 1> (x)"),
    (18, "axes = Constant <value = int64[2] {2, 3}> ()\n    y = ReduceMean(x, axes)"),
])
def test_keepdims_mean_becomes_global_average_pool(kit, opset, line):
    proto = build(kit, line, "N,8,1,1", opset)
    model, report = kit.apply(SpatialMeanToPoolPass(), proto)
    assert [op for op in kit.ops(model) if op != "Constant"] == ["GlobalAveragePool"]
    assert report.rewritten == 1 and model.graph.outputs[0].name == "y"
    kit.check_equivalent(proto, model)


@pytest.mark.parametrize("x_shape,axes,out", [("N,8,5,6", "[2, 3]", "N,8"), ("N,8,7", "[2]", "N,8")])
def test_mean_without_kept_dims_is_pooled_then_flattened(kit, x_shape, axes, out):
    proto = build(kit, f"y = ReduceMean <axes = {axes}, keepdims = 0> (x)", out, x_shape=x_shape)
    model, _ = kit.apply(SpatialMeanToPoolPass(), proto)
    assert kit.ops(model) == ["GlobalAveragePool", "Flatten"]
    kit.check_equivalent(proto, model)


@pytest.mark.parametrize("line,out", [
    ("y = ReduceMean <axes = [1, 2, 3]> (x)", "N,1,1,1"),  # channels too
    ("y = ReduceMean <axes = [3]> (x)", "N,8,5,1"),  # one of two spatial axes
    ("y = ReduceMean (x)", "1,1,1,1"),  # no axes: every axis
])
def test_other_means_are_kept(kit, line, out):
    kit.check_unchanged(SpatialMeanToPoolPass(), build(kit, line, out))
