"""eliminate-dead-nodes: what no graph output depends on goes; inputs and outputs stay."""

from qpass.passes.eliminate_dead_nodes import EliminateDeadNodesPass

HEADER = '<ir_version: 8, opset_import: ["" : 17]>'

DANGLING = f"""{HEADER}
dangling (float[N,4] x) => (float[N,3] y) {{
    m = MatMul(x, W)
    y = Relu(m)
    s = Sigmoid(x)
    dead = MatMul(s, W_dead)
}}"""


def build_dangling(kit):
    return kit.model(DANGLING, W=kit.randn(4, 3), W_dead=kit.randn(4, 2), unused=kit.randn(8))


def test_dangling_branch_and_unused_initializer_are_removed(kit):
    proto = build_dangling(kit)
    model, report = kit.apply(EliminateDeadNodesPass(), proto)
    assert kit.ops(model) == ["MatMul", "Relu"]
    assert sorted(model.graph.initializers) == ["W"]
    assert report.modified is True
    assert report.rewritten == 2
    assert report.details == {"nodes_removed": 2, "initializers_removed": 2, "functions_removed": 0}
    kit.check_equivalent(proto, model)
    kit.check_deterministic(EliminateDeadNodesPass(), proto)


def test_graph_inputs_and_outputs_are_kept(kit):
    # 'side' is a graph output nobody else reads; 'mask' is a graph input nobody reads.
    text = f"""{HEADER}
    outputs (float[N,4] x, float[N,4] mask) => (float[N,3] y, float[N,4] side) {{
        m = MatMul(x, W)
        y = Relu(m)
        side = Neg(x)
        dead = Exp(x)
    }}"""
    proto = kit.model(text, W=kit.randn(4, 3))
    model, report = kit.apply(EliminateDeadNodesPass(), proto)
    assert kit.ops(model) == ["MatMul", "Relu", "Neg"]
    assert [v.name for v in model.graph.inputs] == ["x", "mask"]
    assert [v.name for v in model.graph.outputs] == ["y", "side"]
    assert report.modified is True and report.rewritten == 1
    kit.check_equivalent(proto, model)


def test_fully_used_graph_is_unchanged(kit):
    text = f"""{HEADER}
    live (float[N,4] x) => (float[N,3] y) {{
        m = MatMul(x, W)
        y = Relu(m)
    }}"""
    report = kit.check_unchanged(EliminateDeadNodesPass(), kit.model(text, W=kit.randn(4, 3)))
    assert report.details == {"nodes_removed": 0, "initializers_removed": 0, "functions_removed": 0}
