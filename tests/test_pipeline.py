import dataclasses

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from helpers import small_model

import qpass
from qpass.analyses import GraphFacts
from qpass.demo import demo_cnn, demo_transformer
from qpass.pipeline import Pipeline


@dataclasses.dataclass
class ScaleWeightsPass(qpass.Pass):
    """A user pass that claims to preserve the function but doubles every 2-D weight."""

    name = "scale-weights"
    preserves_float = True
    factor: float = 2.0

    def call(self, model):
        for value in model.graph.initializers.values():
            array = value.const_value.numpy()
            if array.ndim == 2:
                value.const_value = ir.tensor(array * self.factor)
        return qpass.PassReport(model, True, rewritten=1)


@dataclasses.dataclass
class FactsUserPass(qpass.Pass):
    name = "facts-user"
    preserves_float = True
    seen: list = dataclasses.field(default_factory=list)

    def call(self, model):
        self.seen.append(self.analysis(GraphFacts(), model))
        return qpass.PassReport(model, False)


def test_fold_recipe_on_demo_models_is_verified_and_counts_rewrites():
    cnn = qpass.run(demo_cnn(), "fold")
    by_name = {s.name: s for s in cnn.stats}
    assert by_name["fold-batchnorm"].rewritten == 3
    assert by_name["fold-batchnorm"].verification == "ok"
    assert by_name["fold-batchnorm"].max_error < 1e-5
    assert "BatchNormalization" not in {n.op_type for n in cnn.model.graph}
    tr = qpass.run(demo_transformer(), "fold")
    ops = [n.op_type for n in tr.model.graph]
    assert ops.count("LayerNormalization") == 2 and ops.count("Gelu") == 1 and "Identity" not in ops
    s = {s.name: s for s in tr.stats}["fuse-layernorm"]
    assert (s.rewritten, s.removed, s.added) == (2, 18, 2)


def test_verification_stops_a_pass_that_changes_the_function():
    with pytest.raises(qpass.VerificationError, match="pass 'scale-weights' changed the float function"):
        qpass.run(small_model(), passes=[ScaleWeightsPass()])


def test_verification_can_be_turned_off():
    result = qpass.run(small_model(), passes=[ScaleWeightsPass()], verify=False)
    assert result.stats[0].verification == "off"
    assert not result.verified


def test_quantizing_pass_reports_sqnr_instead_of_failing():
    @dataclasses.dataclass
    class Noisy(ScaleWeightsPass):
        name = "noisy"
        preserves_float = False
        factor: float = 1.01

    result = qpass.run(small_model(), passes=[Noisy()])
    sqnr = result.stats[0].sqnr_db["y"]
    assert 30 < sqnr < 60  # a 1% weight error is ~40 dB


def test_invalid_graph_is_reported_with_the_pass_name():
    @dataclasses.dataclass
    class Breaker(qpass.Pass):
        name = "breaker"

        def call(self, model):
            node = next(iter(model.graph))
            node.attributes["bogus"] = ir.AttrInt64("bogus", 1)
            node.op_type = "NoSuchOp"
            return qpass.PassReport(model, True)

    with pytest.raises(qpass.VerificationError, match="pass 'breaker'"):
        qpass.run(small_model(), passes=[Breaker()])


def test_analysis_is_cached_until_a_pass_modifies_the_graph():
    first, second = FactsUserPass(), FactsUserPass()
    pipeline = Pipeline([first, second, qpass.registry.make_pass("fold-batchnorm"), FactsUserPass()])
    model = qpass.load_model(demo_cnn())
    pipeline.run(model)
    assert first.seen[0] is second.seen[0]  # cached
    assert pipeline.analyses.computed["GraphFacts"] == 2  # once before, once after fold-batchnorm
    facts = first.seen[0]
    assert facts.census["BatchNormalization"] == 3
    assert facts.shape("logits")[1] == 10


def test_analysis_recomputed_after_modification():
    users = [FactsUserPass(), qpass.registry.make_pass("fold-batchnorm"), FactsUserPass()]
    pipeline = Pipeline(users)
    pipeline.run(qpass.load_model(demo_cnn()))
    assert pipeline.analyses.computed["GraphFacts"] == 2
    assert users[2].seen[0].census.get("BatchNormalization", 0) == 0


def test_same_input_gives_identical_bytes(tmp_path):
    outputs = []
    for i in range(2):
        result = qpass.run(demo_transformer(), "fold")
        path = qpass.save_model(result.model, tmp_path / f"out{i}.onnx")
        outputs.append(path.read_bytes())
    assert outputs[0] == outputs[1]


def test_caller_model_is_not_modified():
    proto = demo_cnn()
    before = proto.SerializeToString()
    ir_model = ir.from_proto(proto)
    nodes_before = ir_model.graph.num_nodes()
    qpass.run(proto, "fold")
    qpass.run(ir_model, "fold")
    assert proto.SerializeToString() == before
    assert ir_model.graph.num_nodes() == nodes_before


def test_stats_to_dict_is_json_ready():
    import json

    result = qpass.run(demo_cnn(), "fold")
    data = json.loads(json.dumps(result.to_dict()))
    assert [p["name"] for p in data["passes"]][:3] == ["fold-constants", "remove-noops", "fold-batchnorm"]


def test_pipeline_rejects_non_passes():
    with pytest.raises(qpass.PipelineError, match="not a pass"):
        Pipeline(["fold-constants"])


def test_onnx_ir_passes_compose_in_pipeline():
    result = qpass.run(demo_cnn(), passes=[ir.passes.common.IdentityEliminationPass()])
    assert result.stats[0].name == "IdentityEliminationPass"
    assert result.stats[0].verification == "ok"


def test_probe_feeds_respect_embedding_tables():
    model = qpass.load_model(demo_transformer())
    feeds = qpass.verify.probe_feeds(model)
    assert feeds["hidden_states"].shape == (2, 16, 64)
    assert feeds["hidden_states"].dtype == np.float32


@dataclasses.dataclass
class TagPass(qpass.Pass):
    """Changes metadata only (as annotate-quant does)."""

    name = "tag"

    def call(self, model):
        for node in model.graph:
            node.outputs[0].meta["tag"] = True
        return qpass.PassReport(model, True)


@dataclasses.dataclass
class CopyWeightsPass(qpass.Pass):
    """Replaces every weight by an equal copy: same bytes, new arrays."""

    name = "copy-weights"

    def call(self, model):
        for value in model.graph.initializers.values():
            value.const_value = ir.tensor(value.const_value.numpy().copy(), name=value.name)
        return qpass.PassReport(model, True)


def _count_runs(monkeypatch) -> list:
    calls = []
    real = qpass.verify.run_model
    monkeypatch.setattr(qpass.verify, "run_model", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def test_metadata_only_pass_keeps_the_outputs_new_weights_are_run(monkeypatch, tmp_path):
    onnx.save(demo_cnn(), tmp_path / "cnn.onnx")
    model = qpass.load_model(tmp_path / "cnn.onnx")  # weights in numpy arrays of its own
    calls = _count_runs(monkeypatch)
    tag, copy = Pipeline([TagPass(), CopyWeightsPass()]).run(model).stats
    assert tag.verification == copy.verification == "ok"
    assert tag.max_error == copy.max_error == 0.0
    assert len(calls) == 2  # the reference, and the pass that made new weight arrays


def test_known_reference_outputs_are_not_computed_again(monkeypatch):
    model = qpass.load_model(demo_cnn())
    feeds = qpass.verify.probe_feeds(model)
    reference = qpass.verify.run_model(model, feeds)
    calls = _count_runs(monkeypatch)
    pipeline = Pipeline([qpass.registry.make_pass("fold-batchnorm")], probe_feeds=feeds, reference_outputs=reference)
    result = pipeline.run(model)
    assert result.stats[0].verification == "ok" and len(calls) == 1
    assert result.reference_outputs is not None and list(result.reference_outputs) == ["logits"]


def test_sessions_and_checks_leave_out_unused_initializers():
    from qpass.backends.onnxruntime import make_session, session_bytes

    model = qpass.load_model(demo_cnn())
    before = session_bytes(model, drop_unused=True)
    for name, shape in (("unused_big", (64, 64)), ("unused_small", (3,))):
        model.graph.register_initializer(ir.Value(name=name, const_value=ir.tensor(np.ones(shape, np.float32), name=name)))
    after = session_bytes(model, drop_unused=True)
    assert after[0] == before[0] and after[1] == before[1]  # removing them changes nothing
    assert b"unused_big" in session_bytes(model)[0]  # by default they stay inline (save_model writes them)
    feeds = qpass.verify.probe_feeds(model)
    np.testing.assert_array_equal(make_session(model).run(None, feeds)[0], qpass.verify.run_model(model, feeds)["logits"])
    qpass.pipeline.check_graph(model)


@dataclasses.dataclass
class KeepShapesTagPass(TagPass):
    keeps_shapes = True


@dataclasses.dataclass
class UntypedOutputPass(qpass.Pass):
    """Claims to keep shapes, but inserts an Identity whose output has no dtype."""

    name = "untyped-output"
    keeps_shapes = True

    def call(self, model):
        out = model.graph.outputs[0]
        node = ir.node("Identity", [out.producer().inputs[0]])
        model.graph.insert_before(out.producer(), node)
        out.producer().replace_input_with(0, node.outputs[0])
        return qpass.PassReport(model, True, rewritten=1)


def test_shape_inference_runs_after_passes_that_do_not_keep_shapes(monkeypatch):
    import qpass.pipeline as pipeline_module

    model = qpass.load_model(demo_cnn())
    calls = []
    real = pipeline_module.infer_shapes
    monkeypatch.setattr(pipeline_module, "infer_shapes", lambda m: (calls.append(1), real(m)))
    Pipeline([KeepShapesTagPass()]).run(model)
    assert calls == []  # annotations only: every value keeps its dtype and shape
    Pipeline([UntypedOutputPass()]).run(model)
    assert calls == [1]  # a value without a dtype: inferred although the pass claims to keep shapes
    identity = next(n for n in model.graph if n.op_type == "Identity")
    assert identity.outputs[0].dtype == ir.DataType.FLOAT
    Pipeline([qpass.registry.make_pass("fold-batchnorm")]).run(model)
    assert calls == [1, 1]
