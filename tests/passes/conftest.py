"""Shared helpers for the pass tests: build a tiny model, apply a pass, compare numbers.

Every pass test uses the ``kit`` fixture:
    proto = kit.model(TEXT, W=kit.randn(4, 3))    # textual graph + seeded initializers
    model, report = kit.apply(SomePass(), proto)   # qpass.load_model, then the pass
    kit.check_equivalent(proto, model)             # onnxruntime, optimizations off
    kit.check_unchanged(SomePass(), proto)         # a no-match: same bytes as a fresh load
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import numpy_helper

import qpass
from qpass.pipeline import check_graph
from qpass.verify import probe_feeds, run_model


class PassKit:
    """Build golden graphs and check what a pass did to them."""

    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)

    def randn(self, *shape: int) -> np.ndarray:
        return self.rng.standard_normal(shape).astype(np.float32)

    def uniform(self, low: float, high: float, *shape: int) -> np.ndarray:
        return self.rng.uniform(low, high, shape).astype(np.float32)

    @staticmethod
    def model(text: str, **initializers: np.ndarray) -> onnx.ModelProto:
        """Parse ONNX text and attach ``initializers`` (name=array); the result passes the checker."""
        proto = onnx.parser.parse_model(text)
        for name, array in initializers.items():
            proto.graph.initializer.append(numpy_helper.from_array(np.asarray(array), name))
        onnx.checker.check_model(proto, full_check=True)
        return proto

    @staticmethod
    def apply(pass_: qpass.Pass, proto: onnx.ModelProto) -> tuple[ir.Model, qpass.PassReport]:
        """Run ``pass_`` on a fresh load of ``proto``; the rewritten model must pass the checker."""
        model = qpass.load_model(proto)
        report = pass_(model)
        assert report.model is model, "qpass passes edit in place"
        check_graph(model)
        return model, report

    @staticmethod
    def ops(model: ir.Model) -> list[str]:
        return [node.op_type for node in model.graph]

    @staticmethod
    def node(model: ir.Model, op_type: str) -> ir.Node:
        (found,) = [n for n in model.graph if n.op_type == op_type]
        return found

    @staticmethod
    def serialized(model: ir.Model) -> bytes:
        return ir.to_proto(model).SerializeToString()

    def check_equivalent(
        self, before: onnx.ModelProto, after: ir.Model, rtol: float = 1e-5, atol: float = 1e-6, seed: int = 0
    ) -> None:
        """Run both models on one seeded batch and compare every output within rtol/atol."""
        reference = ir.from_proto(before)
        feeds = probe_feeds(reference, seed=seed)
        expected = run_model(reference, feeds)
        got = run_model(after, feeds)
        assert list(got) == list(expected), "the rewritten model has different outputs"
        for name, want in expected.items():
            assert np.abs(want).max() > 0, f"output '{name}' is all zeros: a useless probe"
            np.testing.assert_allclose(got[name], want, rtol=rtol, atol=atol, err_msg=f"output '{name}'")

    def check_deterministic(self, pass_: qpass.Pass, proto: onnx.ModelProto) -> None:
        """Two runs on fresh loads give identical bytes."""
        first, _ = self.apply(pass_, proto)
        second, _ = self.apply(pass_, proto)
        assert self.serialized(first) == self.serialized(second)

    def check_unchanged(self, pass_: qpass.Pass, proto: onnx.ModelProto) -> qpass.PassReport:
        """The pass reports no change and the graph is byte-identical to a fresh load."""
        model, report = self.apply(pass_, proto)
        assert report.modified is False
        assert report.rewritten == 0
        assert self.serialized(model) == self.serialized(qpass.load_model(proto))
        return report


@pytest.fixture
def kit() -> PassKit:
    return PassKit(seed=0)
