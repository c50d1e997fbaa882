"""decompose-hard-activations: HardSwish / HardSigmoid become Add -> Clip -> Mul (-> Mul)."""

import numpy as np
import onnx_ir as ir
import pytest

from qpass.passes.decompose_hard_activations import DecomposeHardActivationsPass
from qpass.verify import run_model


def build(kit, line, opset=17):
    text = f'<ir_version: 8, opset_import: ["" : {opset}]>\nhard (float[N,8,5,5] x) => (float[N,8,5,5] y) {{\n    {line}\n}}'
    return kit.model(text)


def _constants(model):
    return {v.name.rsplit("_", 1)[-1]: float(v.const_value.numpy()) for v in model.graph.initializers.values()}


def test_hardswish_becomes_x_times_a_clipped_shift(kit):
    proto = build(kit, "y = HardSwish(x)")
    model, report = kit.apply(DecomposeHardActivationsPass(), proto)
    assert kit.ops(model) == ["Add", "Clip", "Mul", "Mul"]
    assert report.rewritten == 1 and report.modified
    assert _constants(model) == pytest.approx({"offset": 3.0, "min": 0.0, "max": 6.0, "alpha": 1 / 6})
    last = model.graph.outputs[0].producer()
    assert last.op_type == "Mul" and last.inputs[0] is model.graph.inputs[0] and model.graph.outputs[0].name == "y"
    kit.check_equivalent(proto, model)


@pytest.mark.parametrize("alpha,beta", [(0.2, 0.5), (1 / 6, 0.5), (0.5, -1.0)])
def test_hardsigmoid_keeps_its_alpha_and_beta(kit, alpha, beta):
    proto = build(kit, f"y = HardSigmoid <alpha = {alpha}, beta = {beta}> (x)")
    model, _ = kit.apply(DecomposeHardActivationsPass(), proto)
    assert kit.ops(model) == ["Add", "Clip", "Mul"]
    assert _constants(model) == pytest.approx({"offset": beta / alpha, "min": 0.0, "max": 1 / alpha, "alpha": alpha}, rel=1e-6)
    kit.check_equivalent(proto, model)


def test_non_positive_alpha_and_old_opsets_are_kept(kit):
    kept = kit.check_unchanged(DecomposeHardActivationsPass(), build(kit, "y = HardSigmoid <alpha = -0.2> (x)"))
    assert dict(kept.skipped) == {"HardSigmoid with alpha <= 0": 1}
    old = ir.from_proto(build(kit, "y = HardSigmoid (x)", opset=10))  # qpass.load_model would upgrade it
    report = DecomposeHardActivationsPass()(old)
    assert not report.modified and dict(report.skipped) == {"opset < 11 (Clip bound inputs)": 1}


def test_values_far_outside_the_knee_match(kit):
    proto = build(kit, "y = HardSwish(x)")
    model, _ = kit.apply(DecomposeHardActivationsPass(), proto)
    x = np.linspace(-10, 10, 2 * 8 * 25, dtype=np.float32).reshape(2, 8, 5, 5)
    want, got = run_model(ir.from_proto(proto), {"x": x})["y"], run_model(model, {"x": x})["y"]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert want.min() < -0.3 and want.max() == pytest.approx(10.0)
