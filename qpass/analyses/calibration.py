"""Calibration statistics: an observer per annotated activation, fed by running the graph.

The current graph runs in onnxruntime with every value that carries a
:class:`~qpass.schemes.QuantSpec` (and no constant) exposed as an output, batch by batch;
each value's observer sees every batch. Values that take their input's parameters
(data-movement ops, products by a positive constant: :func:`parameter_source`) get no
observer. Memory stays bounded: nothing but the observers' statistics is kept. The
analysis is cached by the pipeline and recomputed only after a pass changes the graph.

Context keys read from the analysis manager: ``calibration`` (an iterable of feed dicts,
e.g. :class:`qpass.calib_data.CalibrationSet`), ``progress`` (optional: wraps the
iterable, e.g. with a progress bar).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from types import MappingProxyType

import numpy as np
import onnx_ir as ir

from qpass.analyses.calibration_batches import calibration_batches
from qpass.errors import CalibrationError
from qpass.graph_utils import const_scalar
from qpass.observers import Observer, make_observer
from qpass.pass_base import Analysis, AnalysisManager
from qpass.schemes import SHARED_PARAMETER_OPS, SPEC_KEY, QuantSpec

__all__ = ["Calibration", "CalibrationResult", "annotated_activations", "parameter_source", "scalar_product"]


@dataclasses.dataclass(frozen=True)
class CalibrationResult:
    """``observers[value_name]`` for each annotated activation with parameters of its own
    (see :func:`parameter_source`); ``samples`` batches seen."""

    observers: Mapping[str, Observer]
    samples: int


def parameter_source(value: ir.Value) -> tuple[ir.Value, float] | None:
    """``(input, factor)`` when annotated ``value`` takes its quantization parameters from its
    producer's annotated activation input of the same dtype: the output of a data-movement op
    (SHARED_PARAMETER_OPS: the same scale and zero-point, factor 1), or of a product by a positive
    scalar constant (Mul by k, Div by 1/k: the same codes with the scale times k)."""
    producer = value.producer()
    if producer is None or not producer.inputs or producer.domain not in ("", "ai.onnx"):
        return None
    if producer.op_type in SHARED_PARAMETER_OPS:
        source, factor = producer.inputs[0], 1.0
    elif (found := scalar_product(producer)) is not None:
        source, factor = found
    else:
        return None
    spec = None if source is None or source.const_value is not None else source.meta.get(SPEC_KEY)
    if spec is None or spec.granularity != "tensor" or spec.dtype != value.meta[SPEC_KEY].dtype:
        return None
    return source, factor


def scalar_product(node: ir.Node) -> tuple[ir.Value, float] | None:
    """``(x, k)`` for ``Mul(x, k)``, ``Mul(k, x)`` or ``Div(x, 1/k)`` with a positive, finite scalar constant."""
    if node.op_type not in ("Mul", "Div") or len(node.inputs) != 2 or None in node.inputs:
        return None
    a, b = node.inputs
    if node.op_type == "Mul" and const_scalar(b) is None:
        a, b = b, a
    k = const_scalar(b)
    if k is None or const_scalar(a) is not None or not (np.isfinite(k) and k > 0):
        return None
    return a, (k if node.op_type == "Mul" else 1.0 / k)


def annotated_activations(model: ir.Model, *, observed_only: bool = False) -> dict[str, QuantSpec]:
    """Names and specs of non-constant values annotated for quantization, in graph order;
    with ``observed_only``, less those that take their parameters from their producer's input."""
    found: dict[str, QuantSpec] = {}
    values = list(model.graph.inputs) + [o for node in model.graph for o in node.outputs]
    for value in values:
        spec = value.meta.get(SPEC_KEY)
        if spec is None or value.const_value is not None or spec.granularity == "token":
            continue
        if not (observed_only and parameter_source(value) is not None):
            found[value.name] = spec
    return found


@dataclasses.dataclass(frozen=True)
class Calibration(Analysis):
    """Observers for every annotated activation with parameters of its own, after one pass over
    the calibration data."""

    def compute(self, model: ir.Model, manager: AnalysisManager) -> CalibrationResult:
        data = manager.context.get("calibration")
        if data is None:
            raise CalibrationError(
                "this pipeline quantizes activations and needs calibration data: pass --calib DATA "
                "(or --random-calib to try it on random inputs)"
            )
        targets = annotated_activations(model, observed_only=True)
        observers = {
            name: make_observer(spec, spec.axis if spec.granularity == "channel" else None)
            for name, spec in targets.items()
        }
        wrap = manager.context.get("progress") or (lambda it, **_: it)
        samples = 0
        for values in calibration_batches(model, targets, wrap(data, desc="calibrating", unit="batch")):
            for name, array in values.items():
                try:
                    observers[name].update(array)
                except ValueError as e:
                    raise CalibrationError(f"calibration batch {samples}: value '{name}': {e}") from e
            samples += 1
        if samples == 0:
            raise CalibrationError("the calibration set is empty: pass at least one sample")
        return CalibrationResult(MappingProxyType(observers), samples)
