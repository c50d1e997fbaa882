"""remove-noops: Identity, Dropout and no-op Transpose / Reshape chains disappear."""

import numpy as np
import pytest

from qpass.passes.remove_noops import RemoveNoopsPass

SHAPE = "[N,16,64]"  # a symbolic batch dim: a no-op Reshape must be recognised through it


def build(kit, lines, out_shape=SHAPE, **initializers):
    body = "\n    ".join(lines)
    text = (
        '<ir_version: 8, opset_import: ["" : 17]>\n'
        f"noops (float{SHAPE} x) => (float{out_shape} y) {{\n    {body}\n}}"
    )
    return kit.model(text, **initializers)


# name: (graph lines, extra initializers, nodes removed)
NOOPS = {
    "identity": (["i = Identity(x)", "y = Relu(i)"], {}, 1),
    "identity_transpose": (["t = Transpose <perm = [0, 1, 2]> (x)", "y = Relu(t)"], {}, 1),
    "transpose_pair": (
        ["t1 = Transpose <perm = [0, 2, 1]> (x)", "t2 = Transpose <perm = [0, 2, 1]> (t1)", "y = Relu(t2)"],
        {},
        2,
    ),
    "reshape_same_shape": (["r = Reshape(x, shape)", "y = Relu(r)"], {"shape": np.array([0, 16, 64], np.int64)}, 1),
    "dropout": (["d = Dropout(x)", "y = Relu(d)"], {}, 1),
    "dropout_training_false": (
        ["d = Dropout(x, ratio, training)", "y = Relu(d)"],
        {"ratio": np.float32(0.5), "training": np.array(False)},
        1,
    ),
}


@pytest.mark.parametrize("case", list(NOOPS))
def test_noop_is_removed(kit, case):
    lines, initializers, removed = NOOPS[case]
    proto = build(kit, lines, **initializers)
    model, report = kit.apply(RemoveNoopsPass(), proto)
    assert kit.ops(model) == ["Relu"]
    assert kit.node(model, "Relu").inputs[0] is model.graph.inputs[0]
    assert report.modified is True
    assert report.rewritten == removed
    kit.check_equivalent(proto, model)
    kit.check_deterministic(RemoveNoopsPass(), proto)


def test_identity_producing_a_graph_output_keeps_the_output_name(kit):
    proto = build(kit, ["r = Relu(x)", "y = Identity(r)"])
    model, report = kit.apply(RemoveNoopsPass(), proto)
    assert kit.ops(model) == ["Relu"]
    assert [v.name for v in model.graph.outputs] == ["y"]
    assert report.modified is True and report.rewritten == 1
    kit.check_equivalent(proto, model)


def test_transpose_pair_that_is_not_identity_becomes_one_transpose(kit):
    # perm p1 = [0,2,1] then p2 = [1,0,2] compose to p1[p2[i]] = [2,0,1]: still a real transpose
    proto = build(
        kit,
        ["t1 = Transpose <perm = [0, 2, 1]> (x)", "t2 = Transpose <perm = [1, 0, 2]> (t1)", "y = Relu(t2)"],
        out_shape="[64,N,16]",
    )
    model, report = kit.apply(RemoveNoopsPass(), proto)
    assert kit.ops(model) == ["Transpose", "Relu"]
    assert kit.node(model, "Transpose").attributes.get_ints("perm") == (2, 0, 1)
    assert report.modified is True
    kit.check_equivalent(proto, model)
    kit.check_deterministic(RemoveNoopsPass(), proto)


def test_reshape_that_changes_the_shape_is_kept(kit):
    proto = build(
        kit, ["r = Reshape(x, shape)", "y = Relu(r)"], out_shape="[N,64,16]", shape=np.array([0, 64, 16], np.int64)
    )
    kit.check_unchanged(RemoveNoopsPass(), proto)


def test_single_transpose_that_permutes_is_kept(kit):
    proto = build(kit, ["t = Transpose <perm = [0, 2, 1]> (x)", "y = Relu(t)"], out_shape="[N,64,16]")
    kit.check_unchanged(RemoveNoopsPass(), proto)


def test_dropout_in_training_mode_is_kept(kit):
    proto = build(
        kit, ["y = Dropout(x, ratio, training)"], ratio=np.float32(0.5), training=np.array(True)
    )
    kit.check_unchanged(RemoveNoopsPass(), proto)
