"""The pipeline runner: passes in order, each checked, timed and counted.

After every pass that reports ``modified`` the runner
1. validates the graph (``onnx.checker`` with strict shape inference; weights are not
   copied: the checked graph holds placeholders for them),
2. for an equivalence pass (``preserves_float``), runs the model on a fixed probe batch
   and stops with :class:`VerificationError` naming the pass if any float output moved
   beyond ``max|after - before| <= rtol * max|before| + atol`` (it reuses the previous
   pass's outputs, so each verified pass costs one onnxruntime session),
3. for a quantizing pass, reports the SQNR of each model output against the float model.
The graph is serialized once for 1 and 2; a pass that left it and the weight arrays as they
were (it changed metadata only, e.g. quantization annotations) keeps the previous outputs.
Analyses are cached in an :class:`AnalysisManager` and dropped whenever a pass modifies
the graph. ``verify=False`` skips 1-3 for speed.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common

from qpass import verify as qverify
from qpass.backends.onnxruntime import is_placeholder, session_bytes
from qpass.errors import PipelineError, QpassError, VerificationError, first_line
from qpass.graph_utils import make_node_names_unique
from qpass.pass_base import AnalysisManager, Pass, PassReport, release_manager, use_manager

__all__ = ["Pipeline", "PipelineResult", "PassStats", "check_graph", "check_graph_bytes", "infer_shapes"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class PassStats:
    """What one pass did."""

    name: str
    spec: str
    preserves_float: bool
    modified: bool
    nodes_before: int
    nodes_after: int
    added: int
    removed: int
    rewritten: int
    skipped: dict[str, int]
    seconds: float
    verify_seconds: float
    verification: str
    max_error: float | None = None
    sqnr_db: dict[str, float] | None = None
    details: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class PipelineResult:
    """The rewritten model and per-pass statistics."""

    model: ir.Model
    stats: list[PassStats]
    seconds: float
    verified: bool
    reference_outputs: dict[str, np.ndarray] | None = None
    final_outputs: dict[str, np.ndarray] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "seconds": round(self.seconds, 4),
            "verified": self.verified,
            "passes": [_jsonable(dataclasses.asdict(s)) for s in self.stats],
        }


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return None if not np.isfinite(obj) else round(float(obj), 6)
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def check_graph(model: ir.Model, infer: bool = True) -> None:
    """Raise if the graph fails the ONNX checker or strict shape inference.

    Weights are not copied: large initializers are declared as typed graph inputs instead.
    """
    check_graph_bytes(session_bytes(model, drop_unused=True)[0], infer)


def check_graph_bytes(graph_bytes: bytes, infer: bool = True) -> None:
    """:func:`check_graph` on what :func:`qpass.backends.onnxruntime.session_bytes` returned."""
    proto = onnx.load_from_string(graph_bytes)
    moved = [t for t in proto.graph.initializer if is_placeholder(t)]
    if moved:
        kept = [t for t in proto.graph.initializer if not is_placeholder(t)]
        for t in moved:
            proto.graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        del proto.graph.initializer[:]
        proto.graph.initializer.extend(kept)
    # full_check: strict shape inference with type checks, as infer_shapes(check_type=True, strict_mode=True)
    onnx.checker.check_model(proto.SerializeToString(), full_check=infer)


def infer_shapes(model: ir.Model) -> None:
    """Fill in value shapes and dtypes (ONNX shape inference; weights are not copied)."""
    onnx_ir.passes.common.ShapeInferencePass(check_type=False, strict_mode=False, data_prop=True)(model)


def _untyped(model: ir.Model) -> bool:
    """Whether some node output has no dtype (shape inference would fill it in)."""
    return any(o.dtype is None for node in model.graph for o in node.outputs)


def _node_ids(model: ir.Model) -> set[int]:
    return {id(node) for node in ir.traversal.RecursiveGraphIterator(model.graph)}


class Pipeline(ir.passes.InPlacePass):
    """Run ``passes`` in order with verification and statistics.

    passes: qpass :class:`Pass` instances or any in-place ``onnx_ir`` pass (those count as
    equivalence passes unless they define ``preserves_float = False``).
    verify: validate and numerically check after each modifying pass.
    probe_feeds: the fixed batch for numeric checks (default: generated from input shapes).
    context: data handed to analyses (e.g. calibration data).
    on_pass: callback(stats) after each pass (the CLI prints progress with it).
    reference_outputs: the model's outputs on ``probe_feeds`` when already known (e.g. the
    ``final_outputs`` of a pipeline that ran before on the same model): not computed again.
    """

    def __init__(
        self,
        passes: Sequence[ir.passes.PassBase],
        *,
        verify: bool = True,
        probe_feeds: Mapping[str, np.ndarray] | None = None,
        rtol: float = qverify.RTOL,
        atol: float = qverify.ATOL,
        context: Mapping[str, Any] | None = None,
        on_pass: Callable[[PassStats], None] | None = None,
        reference_outputs: Mapping[str, np.ndarray] | None = None,
    ):
        self.passes = list(passes)
        for p in self.passes:
            if not isinstance(p, ir.passes.PassBase):
                raise PipelineError(f"{p!r} is not a pass: subclass qpass.Pass and pass an instance")
            if not p.in_place:
                raise PipelineError(f"pass {_name(p)} is not in place: qpass pipelines run in-place passes")
        self.verify = verify
        self.probe_feeds = dict(probe_feeds) if probe_feeds is not None else None
        self.rtol, self.atol = rtol, atol
        self.analyses = AnalysisManager(context)
        self.on_pass = on_pass
        self.reference_outputs = dict(reference_outputs) if reference_outputs is not None else None
        self._checked: tuple | None = None  # the serialized graph last checked and run
        self.last_result: PipelineResult | None = None

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        result = self.run(model)
        return ir.passes.PassResult(result.model, any(s.modified for s in result.stats))

    def run(self, model: ir.Model) -> PipelineResult:
        """Run every pass on ``model`` (edited in place) and return the statistics."""
        start = time.perf_counter()
        feeds = reference = current = None
        if self.verify:
            feeds = self.probe_feeds if self.probe_feeds is not None else qverify.probe_feeds(model)
            self.analyses.context.setdefault("probe_feeds", feeds)
            self._checked = session_bytes(model, drop_unused=True)
            reference = current = self.reference_outputs
            if reference is None:
                try:
                    reference = current = qverify.run_model(model, feeds, graph=self._checked)
                except Exception as e:
                    raise PipelineError(
                        f"onnxruntime cannot run the input model on the probe batch (the first calibration sample, "
                        f"or generated inputs): {first_line(e)}: "
                        "check the model and the calibration data"
                    ) from e
        stats = []
        token = use_manager(self.analyses)
        try:
            for p in self.passes:
                s, current = self._run_one(p, model, feeds, reference, current)
                stats.append(s)
                if self.on_pass:
                    self.on_pass(s)
        finally:
            release_manager(token)
        self.last_result = PipelineResult(model, stats, time.perf_counter() - start, self.verify, reference, current)
        return self.last_result

    def _run_one(self, p, model, feeds, reference, current):
        name = _name(p)
        before_ids = _node_ids(model)
        t0 = time.perf_counter()
        try:
            result = p(model)
        except QpassError:
            raise
        except Exception as e:
            raise PipelineError(f"pass '{name}' failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")) from e
        seconds = time.perf_counter() - t0
        if result.model is not model:
            raise PipelineError(f"pass '{name}' returned a different model object; qpass passes edit in place")
        after_ids = _node_ids(model)
        preserves = bool(getattr(p, "preserves_float", True))
        if result.modified:
            self.analyses.invalidate()
            make_node_names_unique(model)
            if not getattr(p, "keeps_shapes", False) or _untyped(model):
                infer_shapes(model)
        t1 = time.perf_counter()
        verification, max_error, sqnr = "not modified", None, None
        if not self.verify:
            verification = "off"
        elif result.modified:
            outputs = self._check_and_run(name, model, feeds, current)
            if preserves:
                problem = qverify.compare_outputs(current, outputs, self.rtol, self.atol)
                if problem:
                    raise VerificationError(
                        f"pass '{name}' changed the float function ({problem}): "
                        f"remove it from the pipeline and report the model that triggers it"
                    )
                max_error = _max_rel_error(current, outputs)
                verification = "ok"
            else:
                sqnr = {k: qverify.sqnr_db(reference[k], outputs[k]) for k in reference if reference[k].dtype.kind == "f"}
                verification = "sqnr " + ", ".join(f"{v:.1f} dB" for v in sqnr.values())
            current = outputs
        report = result if isinstance(result, PassReport) else None
        stats = PassStats(
            name=name,
            spec=str(p) if isinstance(p, Pass) else name,
            preserves_float=preserves,
            modified=result.modified,
            nodes_before=len(before_ids),
            nodes_after=len(after_ids),
            added=len(after_ids - before_ids),
            removed=len(before_ids - after_ids),
            rewritten=report.rewritten if report else 0,
            skipped=dict(report.skipped) if report else {},
            seconds=seconds,
            verify_seconds=time.perf_counter() - t1,
            verification=verification,
            max_error=max_error,
            sqnr_db=sqnr,
            details=dict(report.details) if report else {},
        )
        logger.info("%s: %s in %.3fs (%s)", name, "modified" if result.modified else "unchanged", seconds, verification)
        return stats, current

    def _check_and_run(self, name, model, feeds, current):
        """Validate ``model`` and run it on ``feeds``; a pass that left the serialized graph and
        the weight arrays as they were (metadata only, e.g. annotations) keeps ``current``."""
        graph = session_bytes(model, drop_unused=True)  # serialized once for the checker and the session
        if _same_graph(graph, self._checked):
            return current
        try:
            check_graph_bytes(graph[0])
        except Exception as e:
            raise VerificationError(
                f"pass '{name}' produced an invalid graph: {first_line(e)}"
            ) from e
        try:
            outputs = qverify.run_model(model, feeds, graph=graph)
        except Exception as e:
            raise VerificationError(
                f"pass '{name}' produced a model onnxruntime cannot run: {first_line(e)}"
            ) from e
        self._checked = graph
        return outputs


def _same_graph(a: tuple, b: tuple | None) -> bool:
    """Same graph bytes and the same weight memory (placeholders carry names and shapes only;
    ``b`` holds its arrays, so their memory cannot have been reused for new weights)."""
    return b is not None and a[0] == b[0] and len(a[2]) == len(b[2]) and all(map(_same_memory, a[2], b[2]))


def _same_memory(x: np.ndarray, y: np.ndarray) -> bool:
    return x is y or (x.__array_interface__["data"][0] == y.__array_interface__["data"][0] and x.nbytes == y.nbytes)


def _max_rel_error(before: Mapping[str, np.ndarray], after: Mapping[str, np.ndarray]) -> float:
    worst = 0.0
    for k, ref in before.items():
        if ref.dtype.kind != "f" or ref.size == 0:
            continue
        finite = np.isfinite(ref)
        if not finite.any():
            continue
        scale = float(np.max(np.abs(ref[finite]))) or 1.0
        worst = max(worst, float(np.max(np.abs(after[k][finite].astype(np.float64) - ref[finite]))) / scale)
    return worst


def _name(p: Any) -> str:
    return getattr(p, "name", "") or type(p).__name__
