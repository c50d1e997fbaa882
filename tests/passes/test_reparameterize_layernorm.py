import numpy as np
import pytest

import qpass
from qpass.demo import demo_calibration, demo_transformer, demo_vit
from qpass.passes.reparameterize_layernorm import ReparameterizeLayerNormPass, repq_ratios
from qpass.pipeline import Pipeline
from qpass.verify import run_model, sqnr_db


def test_per_tensor_codes_equal_per_channel_codes_in_float64():
    rng = np.random.default_rng(0)
    d = 16
    x = rng.standard_normal((200, d)) * rng.uniform(0.5, 20, d) + rng.normal(0, 3, d)
    gamma, beta = rng.uniform(0.5, 2, d), rng.normal(0, 1, d)
    y = gamma * x + beta  # stands in for the LayerNorm output
    bits = 4
    s, r1, r2 = repq_ratios(y.min(0), y.max(0), bits)
    z = np.clip(np.round(-np.minimum(y.min(0), 0) / s), 0, 2**bits - 1)
    codes_channel = np.clip(np.round(y / s) + z, 0, 2**bits - 1)
    y_new = (y + s * r2) / r1  # what the reparameterized LayerNorm emits
    s_t, z_t = s.mean(), np.round(z.mean())
    codes_tensor = np.clip(np.round(y_new / s_t) + z_t, 0, 2**bits - 1)
    assert np.mean(codes_channel == codes_tensor) > 0.999  # equal up to float rounding at ties
    w, b = rng.standard_normal((d, 8)), rng.standard_normal(8)
    np.testing.assert_allclose(y_new @ (w * r1[:, None]) + (b - (s * r2) @ w), y @ w + b, rtol=1e-10, atol=1e-9)


def test_pre_ln_vit_blocks_are_rewritten_and_verified():
    proto = demo_vit()
    model = qpass.load_model(proto)
    stats = Pipeline([ReparameterizeLayerNormPass(bits=6)], context={"calibration": demo_calibration(proto, 8)}).run(model).stats[0]
    assert stats.verification == "ok" and stats.rewritten == 4
    assert all(v > 1 for v in stats.details["r1_spread"].values())


def test_post_ln_is_rejected_and_counted():
    proto = demo_transformer()  # post-LN: the LayerNorm output feeds the residual too
    model = qpass.load_model(proto)
    pipeline = Pipeline([qpass.registry.make_pass("fuse-layernorm"), qpass.registry.make_pass("remove-noops"), ReparameterizeLayerNormPass()],
                        context={"calibration": demo_calibration(proto, 4)})
    stats = pipeline.run(model).stats[2]
    assert not stats.modified
    # ln1 feeds fc1 and the residual; ln2 (the block output) feeds no Linear
    assert stats.skipped == {"post-LN: the LayerNorm output also feeds non-Linear nodes": 1, "LayerNorm feeds no Linear": 1}


@pytest.mark.parametrize("bits", [4, 6])
def test_repq_recipe_beats_plain_uniform_at_low_bits(bits):
    proto = demo_vit()
    cal, ev = demo_calibration(proto, 16), demo_calibration(proto, 4, seed=9)
    ref_model = qpass.load_model(proto)
    ref = np.concatenate([run_model(ref_model, e)["embedding"].ravel() for e in ev])
    sq = {}
    for recipe in (f"w{bits}a{bits}", f"repq-w{bits}a{bits}"):
        model = qpass.quantize(proto, cal, recipe=recipe, report=False).model
        sq[recipe] = sqnr_db(ref, np.concatenate([run_model(model, e)["embedding"].ravel() for e in ev]))
    assert sq[f"repq-w{bits}a{bits}"] > sq[f"w{bits}a{bits}"] + 1.5, sq


CLASSIC = [(opset, tokens_2d, fused) for opset in (14, 17) for tokens_2d in (False, True) for fused in (True, False)]


@pytest.mark.parametrize("opset,tokens_2d,fused_qkv", CLASSIC)
def test_classic_export_pre_ln_is_reparameterized(kit, opset, tokens_2d, fused_qkv):
    proto = kit.torch_block("classic", opset=opset, tokens_2d=tokens_2d, fused_qkv=fused_qkv)
    model = qpass.load_model(proto)
    adds = kit.ops(model).count("Add")
    stats = Pipeline([ReparameterizeLayerNormPass(bits=4)], context={"calibration": kit.calibration(proto)}).run(model).stats[0]
    assert stats.verification == "ok" and stats.rewritten == 2 and not stats.skipped
    # the bias shift lands in the existing bias: Gemm's C or the Add after the MatMul
    assert kit.ops(model).count("Add") == adds


def test_dynamo_export_pre_ln_is_reparameterized(kit):
    proto = kit.torch_block("dynamo", tokens_2d=True)
    model = qpass.load_model(proto)
    stats = Pipeline([ReparameterizeLayerNormPass(bits=4)], context={"calibration": kit.calibration(proto)}).run(model).stats[0]
    assert stats.verification == "ok" and stats.rewritten == 2


@pytest.mark.parametrize("exporter,opset", [("classic", 14), ("classic", 17), ("dynamo", 18)])
def test_exported_post_ln_and_shared_weights_are_left_alone(kit, exporter, opset):
    for options, reason in (({"pre_ln": False}, "post-LN: the LayerNorm output also feeds non-Linear nodes"),
                            ({"fused_qkv": False, "tied": True, "tokens_2d": True}, "a Linear weight is shared with another node")):
        proto = kit.torch_block(exporter, opset=opset, **options)
        model = qpass.load_model(proto)
        stats = Pipeline([ReparameterizeLayerNormPass(bits=4)], context={"calibration": kit.calibration(proto)}).run(model).stats[0]
        assert stats.skipped[reason] == 1
        assert stats.verification in ("ok", "not modified")


def test_decomposed_layernorm_without_beta_gets_one(kit):
    text = """<ir_version: 8, opset_import: ["" : 14]>
    ln (float[4,6,8] x) => (float[4,6,5] y) {
        mean = ReduceMean <axes = [-1]> (x)
        d = Sub(x, mean)
        sq = Pow(d, two)
        var = ReduceMean <axes = [-1]> (sq)
        ve = Add(var, eps)
        std = Sqrt(ve)
        n = Div(d, std)
        g = Mul(n, gamma)
        m = MatMul(g, W)
        y = Relu(m)
    }"""
    gamma = kit.uniform(0.5, 2.0, 8)
    gamma[3] = 20.0
    proto = kit.model(text, two=np.float32(2.0), eps=np.float32(1e-5), gamma=gamma, W=kit.randn(8, 5))
    model = qpass.load_model(proto)
    stats = Pipeline([ReparameterizeLayerNormPass(bits=4)], context={"calibration": kit.calibration(proto)}).run(model).stats[0]
    assert stats.verification == "ok" and stats.rewritten == 1
    # beta created after gamma's Mul; the bias shift gets its own Add after the MatMul
    assert kit.ops(model)[-5:] == ["Mul", "Add", "MatMul", "Add", "Relu"]


def test_repq_recipe_beats_plain_uniform_on_a_classic_opset14_export(kit):
    bits = 6  # at 4 bits a 64-wide block is too noisy to rank; demo_vit covers W4A4
    proto = kit.torch_block("classic", opset=14, d=64)
    cal, ev = kit.calibration(proto, 16), kit.calibration(proto, 4)
    out = proto.graph.output[0].name
    ref = np.concatenate([run_model(qpass.load_model(proto), e)[out].ravel() for e in ev])
    sq = {}
    for recipe in (f"w{bits}a{bits}", f"repq-w{bits}a{bits}"):
        model = qpass.quantize(proto, cal, recipe=recipe, report=False).model
        sq[recipe] = sqnr_db(ref, np.concatenate([run_model(model, e)[out].ravel() for e in ev]))
    assert sq[f"repq-w{bits}a{bits}"] > sq[f"w{bits}a{bits}"] + 2.0, sq
