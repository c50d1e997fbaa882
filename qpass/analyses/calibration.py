"""Calibration statistics: an observer per annotated activation, fed by running the graph.

The current graph runs in onnxruntime with every value that carries a
:class:`~qpass.schemes.QuantSpec` (and no constant) exposed as an output, batch by batch;
each value's observer sees every batch. Outputs of data-movement ops that take their
input's parameters (:func:`shares_input_parameters`) get no observer. Memory stays bounded:
nothing but the observers' statistics is kept. The analysis is cached by the pipeline and
recomputed only after a pass changes the graph.

Context keys read from the analysis manager: ``calibration`` (an iterable of feed dicts,
e.g. :class:`qpass.calib_data.CalibrationSet`), ``progress`` (optional: wraps the
iterable, e.g. with a progress bar).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from types import MappingProxyType

import onnx_ir as ir

from qpass.analyses.calibration_batches import calibration_batches
from qpass.errors import CalibrationError
from qpass.observers import Observer, make_observer
from qpass.pass_base import Analysis, AnalysisManager
from qpass.schemes import SHARED_PARAMETER_OPS, SPEC_KEY, QuantSpec

__all__ = ["Calibration", "CalibrationResult", "annotated_activations", "shares_input_parameters"]


@dataclasses.dataclass(frozen=True)
class CalibrationResult:
    """``observers[value_name]`` for each annotated activation with parameters of its own
    (see :func:`shares_input_parameters`); ``samples`` batches seen."""

    observers: Mapping[str, Observer]
    samples: int


def shares_input_parameters(value: ir.Value) -> bool:
    """Whether annotated ``value`` is the output of a data-movement op (SHARED_PARAMETER_OPS)
    whose annotated activation input of the same dtype lends it its quantization parameters."""
    producer = value.producer()
    if producer is None or producer.op_type not in SHARED_PARAMETER_OPS or not producer.inputs:
        return False
    source = producer.inputs[0]
    spec = None if source is None or source.const_value is not None else source.meta.get(SPEC_KEY)
    return spec is not None and spec.granularity != "token" and spec.dtype == value.meta[SPEC_KEY].dtype


def annotated_activations(model: ir.Model, *, observed_only: bool = False) -> dict[str, QuantSpec]:
    """Names and specs of non-constant values annotated for quantization, in graph order;
    with ``observed_only``, less those that take their parameters from their producer's input."""
    found: dict[str, QuantSpec] = {}
    values = list(model.graph.inputs) + [o for node in model.graph for o in node.outputs]
    for value in values:
        spec = value.meta.get(SPEC_KEY)
        if spec is None or value.const_value is not None or spec.granularity == "token":
            continue
        if not (observed_only and shares_input_parameters(value)):
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
