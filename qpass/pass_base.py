"""The pass contract: an in-place ``onnx_ir`` pass that says whether it keeps the float function.

A qpass pass is a dataclass subclass of :class:`Pass` (itself an ``ir.passes.InPlacePass``)
with a kebab-case ``name``, ``preserves_float`` and typed option fields. ``call`` returns a
:class:`PassReport` (a ``PassResult`` that also counts rewrites and skipped matches with
their reasons); a plain ``PassResult`` is accepted too, so any onnx_ir pass can be used.
Passes ask for analyses with :meth:`Pass.analysis`; inside a pipeline the runner serves
them from its cache, standalone they are computed on the spot. A pass that changes a weight
gives its value a new tensor and never writes into an existing array: the runner re-verifies
a modified graph unless its serialized form and every weight array are the ones it last ran.
"""

from __future__ import annotations

import contextvars
import dataclasses
from collections import Counter
from typing import Any, ClassVar, TypeVar

import onnx_ir as ir

__all__ = ["Pass", "PassReport", "Analysis", "AnalysisManager"]

T = TypeVar("T")


@dataclasses.dataclass
class PassReport(ir.passes.PassResult):
    """A ``PassResult`` with what the pass did: rewrites, skipped matches by reason, details."""

    rewritten: int = 0
    skipped: Counter = dataclasses.field(default_factory=Counter)
    details: dict[str, Any] = dataclasses.field(default_factory=dict)


class Analysis:
    """A fact about a model computed on demand, cached by the runner until the graph changes.

    Subclasses are frozen dataclasses (their fields are the analysis options) with
    ``compute(model, manager) -> result``; the result is never edited afterwards.
    """

    def compute(self, model: ir.Model, manager: AnalysisManager) -> Any:
        raise NotImplementedError


class AnalysisManager:
    """Computes each analysis once per graph version; ``invalidate`` drops them all."""

    def __init__(self, context: dict[str, Any] | None = None):
        self.context: dict[str, Any] = dict(context or {})
        self._cache: dict[Analysis, Any] = {}
        self.computed: Counter = Counter()

    def get(self, analysis: Analysis, model: ir.Model) -> Any:
        if analysis not in self._cache:
            self._cache[analysis] = analysis.compute(model, self)
            self.computed[type(analysis).__name__] += 1
        return self._cache[analysis]

    def invalidate(self) -> None:
        self._cache.clear()


_current_manager: contextvars.ContextVar[AnalysisManager | None] = contextvars.ContextVar(
    "qpass_analysis_manager", default=None
)


class Pass(ir.passes.InPlacePass):
    """Base of every qpass pass. Subclass as a dataclass; set ``name`` and ``preserves_float``.

    ``preserves_float``: True for equivalence passes (the runner checks outputs before and
    after on a probe batch), False for passes that change numerics on purpose (the runner
    reports the SQNR they cost instead).
    ``keeps_shapes``: True for passes that only change metadata, remove nodes, or give every
    value they create its dtype and shape: the runner then skips ONNX shape inference after
    them (it still runs it when some node output has no dtype).
    """

    name: ClassVar[str] = ""
    preserves_float: ClassVar[bool] = True
    keeps_shapes: ClassVar[bool] = False

    def analysis(self, analysis: Analysis, model: ir.Model) -> Any:
        """The result of ``analysis`` on ``model``, from the running pipeline's cache if any."""
        manager = _current_manager.get()
        if manager is None:
            return analysis.compute(model, AnalysisManager())
        return manager.get(analysis, model)

    def options(self) -> dict[str, Any]:
        """The option fields and their values (for reports and the CLI)."""
        if dataclasses.is_dataclass(self):
            return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {}

    def __str__(self) -> str:
        opts = ",".join(f"{k}={v}" for k, v in self.options().items())
        return f"{self.name}({opts})" if opts else self.name


def use_manager(manager: AnalysisManager) -> contextvars.Token:
    """Make ``manager`` serve ``Pass.analysis`` calls (the runner does this)."""
    return _current_manager.set(manager)


def release_manager(token: contextvars.Token) -> None:
    _current_manager.reset(token)
