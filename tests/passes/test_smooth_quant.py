import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import qpass
from qpass.passes.smooth_quant import SmoothQuantPass, smoothing_factors
from qpass.pipeline import Pipeline
from qpass.verify import run_model, sqnr_db


def _block(post_ln: bool, gemm: bool = False, seed: int = 0) -> onnx.ModelProto:
    """LayerNorm -> Q/K/V Linears (outlier channels in gamma); post_ln adds the residual use."""
    rng = np.random.default_rng(seed)
    d = 32
    gamma = np.ones(d, np.float32)
    gamma[[2, 11, 20]] = 40.0
    inits = [numpy_helper.from_array(gamma, "gamma"), numpy_helper.from_array(rng.normal(0, 0.1, d).astype(np.float32), "beta")]
    nodes = [helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["h"], name="ln", axis=-1)]
    outs = []
    for name in "qkv":
        w = (rng.standard_normal((d, d)) / np.sqrt(d)).astype(np.float32)
        if gemm:
            inits.append(numpy_helper.from_array(np.ascontiguousarray(w.T), f"{name}.w"))
            nodes.append(helper.make_node("Gemm", ["h2d", f"{name}.w"], [name], name=name, transB=1))
        else:
            inits.append(numpy_helper.from_array(w, f"{name}.w"))
            nodes.append(helper.make_node("MatMul", ["h", f"{name}.w"], [name], name=name))
        outs.append(name)
    if gemm:
        nodes.insert(1, helper.make_node("Identity", ["h"], ["h2d"], name="id"))
    nodes.append(helper.make_node("Sum", outs + (["h"] if post_ln else []), ["y"], name="sum"))
    shape = [8, d] if gemm else [1, 8, d]
    graph = helper.make_graph(nodes, "block", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _calib(proto, n=8, seed=1):
    rng = np.random.default_rng(seed)
    shape = [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    return [{"x": rng.standard_normal(shape).astype(np.float32)} for _ in range(n)]


def _apply(proto, **options):
    model = qpass.load_model(proto)
    result = Pipeline([SmoothQuantPass(**options)], context={"calibration": _calib(proto)}).run(model)
    return model, result.stats[0]


def test_smoothing_factor_formula_balances_ranges():
    a, w = np.array([100.0, 1.0, 4.0]), np.array([0.5, 2.0, 1.0])
    s = smoothing_factors(a, w, 0.5)
    np.testing.assert_allclose(a / s, w * s, rtol=1e-12)  # alpha 0.5: both become sqrt(a*w)
    assert smoothing_factors(np.array([0.0]), np.array([1.0]), 0.5)[0] == 1.0  # dead channel


def test_pre_ln_folds_into_layernorm_and_keeps_the_function():
    proto = _block(post_ln=False)
    model, stats = _apply(proto, alpha=0.5)  # the pipeline already verified equivalence
    assert stats.verification == "ok" and stats.rewritten == 1
    assert [n.op_type for n in model.graph].count("Mul") == 0
    gamma = model.graph.node("ln").inputs[1].const_value.numpy()
    assert gamma[2] < 40.0  # outlier channel scaled down
    feeds = _calib(proto, 2, seed=5)[0]
    np.testing.assert_allclose(run_model(model, feeds)["y"], run_model(qpass.load_model(proto), feeds)["y"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("gemm", [False, True])
def test_post_ln_inserts_mul_on_linear_edges_only(gemm):
    proto = _block(post_ln=True, gemm=gemm)  # gemm: 2-D Gemms reached through an Identity
    model, stats = _apply(proto, alpha=0.5)
    assert stats.details["muls_inserted"] == 1 and stats.verification == "ok"
    mul = next(n for n in model.graph if n.op_type == "Mul")
    assert {u.node.name for u in mul.outputs[0].uses()} == {"q", "k", "v"}
    assert model.graph.node("sum").inputs[3].producer().op_type == "LayerNormalization"


def test_smoothing_improves_w8a8_sqnr_on_outlier_channels():
    proto = _block(post_ln=False)
    cal, ev = _calib(proto, 16), _calib(proto, 4, seed=9)
    ref_model = qpass.load_model(proto)
    ref = np.concatenate([run_model(ref_model, e)["y"].ravel() for e in ev])
    results = {}
    for recipe in ("w8a8", "smoothquant-w8a8"):
        q = qpass.quantize(proto, cal, recipe=recipe, report=False).model
        results[recipe] = sqnr_db(ref, np.concatenate([run_model(q, e)["y"].ravel() for e in ev]))
    assert results["smoothquant-w8a8"] > results["w8a8"] + 6.0, results


def test_alpha_search_picks_a_grid_value_and_is_deterministic():
    proto = _block(post_ln=False)
    _, a = _apply(proto)
    _, b = _apply(proto)
    assert a.details["alphas"] == b.details["alphas"]
    assert a.details["alphas"][0] in [round(x, 1) for x in np.arange(0, 1.01, 0.1)]


def test_layernorm_feeding_non_linear_is_left_alone():
    graph = helper.make_graph(
        [helper.make_node("LayerNormalization", ["x", "g", "b"], ["h"], name="ln", axis=-1), helper.make_node("Relu", ["h"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8])],
        [numpy_helper.from_array(np.ones(8, np.float32), "g"), numpy_helper.from_array(np.zeros(8, np.float32), "b")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model, stats = _apply(proto)
    assert not stats.modified and stats.skipped == {"LayerNorm feeds no Linear": 1}


def test_bad_alpha_is_rejected():
    with pytest.raises(ValueError):
        SmoothQuantPass(alpha=1.5)


CLASSIC = [(opset, tokens_2d, fused) for opset in (14, 17) for tokens_2d in (False, True) for fused in (True, False)]


@pytest.mark.parametrize("opset,tokens_2d,fused_qkv", CLASSIC)
def test_classic_export_pre_ln_folds_into_both_layernorm_forms(kit, opset, tokens_2d, fused_qkv):
    proto = kit.torch_block("classic", opset=opset, tokens_2d=tokens_2d, fused_qkv=fused_qkv)
    ops = [n.op_type for n in proto.graph.node]
    assert ("Gemm" in ops) == tokens_2d and ("LayerNormalization" in ops) == (opset >= 17)
    model = qpass.load_model(proto)
    stats = Pipeline([SmoothQuantPass(alpha=0.5)], context={"calibration": kit.calibration(proto)}).run(model).stats[0]
    assert stats.verification == "ok" and stats.rewritten == 2 and not stats.skipped
    assert stats.details["forms"] == {"decomposed" if opset < 17 else "LayerNormalization": 2}
    assert "muls_inserted" not in stats.details and "Mul" not in [n.op_type for n in model.graph if n.name.endswith("_smooth")]


@pytest.mark.parametrize("exporter,opset", [("classic", 14), ("classic", 17), ("dynamo", 18)])
def test_exported_post_ln_block_gets_muls_and_counts_the_output_norm(kit, exporter, opset):
    proto = kit.torch_block(exporter, opset=opset, pre_ln=False)
    model = qpass.load_model(proto)
    stats = Pipeline([SmoothQuantPass(alpha=0.5)], context={"calibration": kit.calibration(proto)}).run(model).stats[0]
    assert stats.verification == "ok" and stats.rewritten == 1 and stats.details["muls_inserted"] == 1
    assert stats.skipped == {"LayerNorm feeds no Linear": 1}  # ln2 is the block output


def test_deduplicated_layernorm_weights_behind_identity(kit):
    # the classic exporter stores ln2's all-ones weight as Identity(ln1.weight)
    proto = kit.torch_block("classic", opset=14, plain_ln=True)
    assert [n.op_type for n in proto.graph.node][:2] == ["Identity", "Identity"]
    model = qpass.load_model(proto)
    stats = Pipeline([SmoothQuantPass(alpha=0.5)], context={"calibration": kit.calibration(proto)}).run(model).stats[0]
    assert stats.verification == "ok" and stats.rewritten == 2 and "muls_inserted" not in stats.details


@pytest.mark.parametrize("exporter,tokens_2d", [("classic", False), ("classic", True), ("dynamo", True)])
def test_shared_weight_group_is_left_alone_and_counted(kit, exporter, tokens_2d):
    proto = kit.torch_block(exporter, opset=17, fused_qkv=False, tied=True, tokens_2d=tokens_2d)
    model = qpass.load_model(proto)
    stats = Pipeline([SmoothQuantPass(alpha=0.5)], context={"calibration": kit.calibration(proto)}).run(model).stats[0]
    assert stats.skipped == {"a Linear weight is shared with another node": 1}
    assert stats.rewritten == 1 and stats.verification == "ok"  # only ln2 -> fc1


def test_smoothing_improves_w8a8_on_a_classic_opset14_export(kit):
    proto = kit.torch_block("classic", opset=14)
    cal, ev = kit.calibration(proto, 16), kit.calibration(proto, 4)
    out = proto.graph.output[0].name
    ref = np.concatenate([run_model(qpass.load_model(proto), e)[out].ravel() for e in ev])
    sq = {}
    for recipe in ("w8a8", "smoothquant-w8a8"):
        result = qpass.quantize(proto, cal, recipe=recipe, report=False)
        sq[recipe] = sqnr_db(ref, np.concatenate([run_model(result.model, e)[out].ravel() for e in ev]))
        if recipe != "w8a8":
            assert next(s for s in result.stats if s.name == "smooth-quant").details["forms"] == {"decomposed": 2}
    assert sq["smoothquant-w8a8"] > sq["w8a8"] + 1.0, sq
