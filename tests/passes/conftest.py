"""Shared helpers for the pass tests: build a tiny model, apply a pass, compare numbers.

Every pass test uses the ``kit`` fixture:
    proto = kit.model(TEXT, W=kit.randn(4, 3))    # textual graph + seeded initializers
    model, report = kit.apply(SomePass(), proto)   # qpass.load_model, then the pass
    kit.check_equivalent(proto, model)             # onnxruntime, optimizations off
    kit.check_unchanged(SomePass(), proto)         # a no-match: same bytes as a fresh load
    proto = kit.torch_block("classic", opset=14)   # a tiny transformer block exported by torch
"""

from __future__ import annotations

import io
import warnings

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
    def torch_block(
        exporter: str = "classic", *, opset: int = 17, tokens_2d: bool = False, fused_qkv: bool = True,
        pre_ln: bool = True, tied: bool = False, plain_ln: bool = False, d: int = 16, seed: int = 0,
    ) -> onnx.ModelProto:
        """A transformer block (attention + ReLU MLP) exported by ``torch.onnx.export``.

        exporter: "classic" (TorchScript, ``dynamo=False``: Gemm for 2-D inputs, decomposed
        LayerNorm below opset 17, Identity for deduplicated initializers) or "dynamo".
        tokens_2d: input [tokens, d] (Gemm) instead of [batch, tokens, d]; fused_qkv: one
        Linear then chunk; pre_ln: ViT-style, else BERT-style post-LN; tied: q and k share one
        weight; plain_ln: LayerNorm weights left at 1/0 (the classic exporter shares them).
        """
        import torch

        torch.manual_seed(seed)

        class Block(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.ln1, self.ln2 = torch.nn.LayerNorm(d), torch.nn.LayerNorm(d)
                if fused_qkv:
                    self.qkv = torch.nn.Linear(d, 3 * d)
                else:
                    self.q, self.k, self.v = (torch.nn.Linear(d, d) for _ in range(3))
                    if tied:
                        self.k.weight = self.q.weight
                self.proj, self.fc1, self.fc2 = torch.nn.Linear(d, d), torch.nn.Linear(d, 4 * d), torch.nn.Linear(4 * d, d)
                if not plain_ln:
                    with torch.no_grad():
                        for ln in (self.ln1, self.ln2):
                            ln.weight.uniform_(0.5, 1.5)
                            ln.weight[[2, 9]] *= 12.0  # outlier channels, as trained transformers have
                            ln.bias.normal_(0, 0.5)

            def attention(self, h):
                q, k, v = self.qkv(h).chunk(3, dim=-1) if fused_qkv else (self.q(h), self.k(h), self.v(h))
                return self.proj(torch.softmax(q @ k.transpose(-1, -2) / 4.0, dim=-1) @ v)

            def forward(self, x):
                if pre_ln:
                    x = x + self.attention(self.ln1(x))
                    return x + self.fc2(torch.relu(self.fc1(self.ln2(x))))
                x = self.ln1(x + self.attention(x))
                return self.ln2(x + self.fc2(torch.relu(self.fc1(x))))

        example = torch.randn(*((6, d) if tokens_2d else (2, 6, d)))
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            if exporter == "dynamo":
                program = torch.onnx.export(Block().eval(), (example,), dynamo=True, opset_version=max(opset, 18), optimize=True, verbose=False)
                return ir.to_proto(program.model)
            f = io.BytesIO()
            torch.onnx.export(Block().eval(), (example,), f, dynamo=False, opset_version=opset)
        return onnx.load_from_string(f.getvalue())

    def calibration(self, proto: onnx.ModelProto, n: int = 8) -> list[dict[str, np.ndarray]]:
        """Seeded normal batches shaped like the model's (static) first input."""
        inp = proto.graph.input[0]
        shape = [dim.dim_value for dim in inp.type.tensor_type.shape.dim]
        return [{inp.name: self.rng.standard_normal(shape).astype(np.float32)} for _ in range(n)]

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
