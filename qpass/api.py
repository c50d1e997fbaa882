"""The Python entry points: ``qpass.run`` a recipe or list of passes on any model."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from qpass.errors import PipelineError
from qpass.model_io import load_model
from qpass.pipeline import PassStats, Pipeline, PipelineResult
from qpass.registry import load_recipe, parse_pipeline

__all__ = ["run", "build_passes"]


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
) -> PipelineResult:
    """Load ``model`` (never edited: it is cloned or read from disk) and run a pipeline on it.

    recipe: a built-in recipe name or YAML file (default ``fold``); passes: a pipeline
    string (``"fold-constants,fuse-gelu"``) or pass instances, user-written ones included.
    Returns a :class:`PipelineResult` with ``.model`` and per-pass ``.stats``.
    """
    ir_model = load_model(model, example_inputs)
    pipeline = Pipeline(
        build_passes(recipe, passes), verify=verify, probe_feeds=probe_feeds, context=context, on_pass=on_pass
    )
    return pipeline.run(ir_model)
