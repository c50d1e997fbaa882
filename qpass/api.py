"""The Python entry points: ``qpass.run`` a recipe or list of passes on any model."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from qpass.errors import PipelineError, VerificationError
from qpass.model_io import load_model
from qpass.pipeline import PassStats, Pipeline, PipelineResult, check_graph
from qpass.registry import load_recipe, parse_pipeline

__all__ = ["run", "build_passes", "FORMATS", "check_format", "to_format"]

FORMATS = ("qdq", "qoperator")


def check_format(format: str, contrib_ops: bool = False) -> None:
    """Raise a one-line error for an unknown output format, or contrib ops outside QOperator."""
    if format not in FORMATS:
        raise PipelineError(f"unknown output format '{format}': choose one of {', '.join(FORMATS)}")
    if contrib_ops and format != "qoperator":
        raise PipelineError("contrib ops are a QOperator option: use them with format 'qoperator'")


def to_format(model: ir.Model, format: str = "qdq", *, contrib_ops: bool = False, verify: bool = True) -> ir.Model:
    """``model`` itself for ``qdq``; for ``qoperator`` a lowered copy (see :mod:`qpass.backends.qoperator`),
    checked with the ONNX checker unless ``verify`` is False."""
    check_format(format, contrib_ops)
    if format == "qdq":
        return model
    from qpass.backends.qoperator import to_qoperator

    lowered = to_qoperator(model, contrib_ops=contrib_ops)
    if verify:
        try:
            check_graph(lowered)
        except Exception as e:
            raise VerificationError(f"the QOperator model fails the ONNX checker: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    return lowered


def build_passes(
    recipe: str | None = None,
    passes: str | Sequence[ir.passes.PassBase] | None = None,
    *,
    add: Sequence[str] = (),
    remove: Sequence[str] = (),
) -> list[ir.passes.PassBase]:
    """The pass list of ``recipe`` (or ``passes``), with passes added/removed by name."""
    if recipe is not None and passes is not None:
        raise PipelineError("give a recipe or a pass list, not both")
    if passes is None:
        result: list = load_recipe(recipe or "fold").build()
    elif isinstance(passes, str):
        result = parse_pipeline(passes)
    else:
        result = list(passes)
    for name in remove:
        if not any(getattr(p, "name", None) == name for p in result):
            raise PipelineError(f"cannot remove pass '{name}': it is not in the pipeline ({', '.join(map(str, result))})")
        result = [p for p in result if getattr(p, "name", None) != name]
    for spec in add:
        result.extend(parse_pipeline(spec))
    return result


def run(
    model: Any,
    recipe: str | None = None,
    passes: str | Sequence[ir.passes.PassBase] | None = None,
    *,
    verify: bool = True,
    probe_feeds: Mapping[str, np.ndarray] | None = None,
    context: Mapping[str, Any] | None = None,
    example_inputs: Any = None,
    on_pass: Callable[[PassStats], None] | None = None,
    format: str = "qdq",
    contrib_ops: bool = False,
) -> PipelineResult:
    """Load ``model`` (never edited: it is cloned or read from disk) and run a pipeline on it.

    recipe: a built-in recipe name or YAML file (default ``fold``); passes: a pipeline
    string (``"fold-constants,fuse-gelu"``) or pass instances, user-written ones included.
    format: ``qdq`` (as the passes leave it) or ``qoperator`` (quantized islands lowered to
    integer ops; ``contrib_ops`` also allows onnxruntime's ``com.microsoft`` ones).
    Returns a :class:`PipelineResult` with ``.model`` and per-pass ``.stats``.
    """
    check_format(format, contrib_ops)
    ir_model = load_model(model, example_inputs)
    pipeline = Pipeline(
        build_passes(recipe, passes), verify=verify, probe_feeds=probe_feeds, context=context, on_pass=on_pass
    )
    result = pipeline.run(ir_model)
    result.model = to_format(result.model, format, contrib_ops=contrib_ops, verify=verify)
    return result
