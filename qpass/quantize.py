"""``qpass.quantize``: float model + calibration data -> quantized model + report.

Runs a quantizing recipe (default ``w8a8``) in two stages: the equivalence passes that
canonicalize the float model, then the quantizing passes (annotation, calibration,
Q/DQ insertion). The float graph between the stages is the reference for the per-layer
report. The result is QDQ ONNX, or with ``format="qoperator"`` its lowering to integer ops.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import onnx_ir as ir

from qpass.api import build_passes, check_format, to_format
from qpass.errors import PipelineError
from qpass.model_io import load_model
from qpass.pipeline import PassStats, Pipeline, PipelineResult
from qpass.report import QuantReport, build_report
from qpass.verify import probe_feeds

__all__ = ["quantize", "QuantizeResult"]

logger = logging.getLogger(__name__)

_ANNOTATION_OPTIONS = ("activation_dtype", "weight_dtype", "per_channel", "symmetric_activations", "observer", "percentile", "exclude",
                       "overrides", "op_types", "integer_ops", "group_size", "weight_observer", "symmetric_weights")


@dataclasses.dataclass
class QuantizeResult:
    model: ir.Model
    report: QuantReport
    stats: list[PassStats]
    float_model: ir.Model
    seconds: float


def quantize(
    model: Any,
    calibration: Any = None,
    *,
    recipe: str = "w8a8",
    passes: str | Sequence[ir.passes.PassBase] | None = None,
    random_calibration: int = 0,
    limit: int | None = None,
    verify: bool = True,
    report: bool = True,
    progress: Callable | None = None,
    on_pass: Callable[[PassStats], None] | None = None,
    example_inputs: Any = None,
    format: str = "qdq",
    contrib_ops: bool = False,
    **options: Any,
) -> QuantizeResult:
    """Quantize ``model`` with ``calibration`` data (see :func:`qpass.calib_data.load_calibration`).

    ``options`` set fields of the recipe's ``annotate-quant`` pass: ``activation_dtype``,
    ``weight_dtype``, ``per_channel``, ``symmetric_activations``, ``observer``, ``percentile``,
    ``exclude`` (node names, op types or regexes), ``overrides``, ``op_types``, ``integer_ops``,
    ``group_size``, ``weight_observer`` (``minmax`` or ``mse`` clipping search), ``symmetric_weights``.
    ``format``: ``qdq`` (QuantizeLinear/DequantizeLinear around float ops) or ``qoperator``
    (QLinearConv, QLinearMatMul; ``contrib_ops`` adds onnxruntime's ``com.microsoft`` QLinear
    ops, QGemm and MatMulIntegerToFloat; see :func:`qpass.backends.qoperator.to_qoperator`). The report's per-layer SQNR is measured on the QDQ form
    (the same integer function); its kernel census on the model returned.
    """
    from qpass.calib_data import load_calibration

    check_format(format, contrib_ops)
    unknown = sorted(set(options) - set(_ANNOTATION_OPTIONS))
    if unknown:
        raise PipelineError(f"unknown quantization option '{unknown[0]}' (options: {', '.join(_ANNOTATION_OPTIONS)})")
    pass_list = build_passes(None if passes is not None else recipe, passes)
    options = {k: v for k, v in options.items() if v is not None}
    for i, p in enumerate(pass_list):
        if getattr(p, "name", None) == "annotate-quant" and options:
            pass_list[i] = dataclasses.replace(p, **options)
    first_quant = next((i for i, p in enumerate(pass_list) if not getattr(p, "preserves_float", True)), None)
    if first_quant is None:
        raise PipelineError(f"recipe '{recipe}' does not quantize: choose a quantizing recipe (see 'qpass recipes')")
    split = next((i for i, p in enumerate(pass_list) if getattr(p, "name", "") == "annotate-quant"), first_quant)
    ir_model = load_model(model, example_inputs)
    no_data = calibration is None and not random_calibration
    if no_data:
        # generated inputs feed only the checks and the report: an analysis that needs data
        # (activation ranges, smoothing statistics) finds none in the context and says so
        logger.info("no calibration data: checks and the report use 4 generated inputs")
        calibration = [probe_feeds(ir_model, seed) for seed in range(4)]
    calib = load_calibration(calibration, ir_model, limit=limit, random_samples=random_calibration)
    if calib.is_random:
        logger.warning("calibrating on RANDOM data: scales will not fit real inputs; pass real calibration data")
    first_feeds = next(iter(calib))
    context = {"calibration": None if no_data else calib, "progress": progress}
    stage1 = Pipeline(pass_list[:split], verify=verify, probe_feeds=first_feeds, context=context, on_pass=on_pass).run(ir_model)
    float_model = ir_model.clone()
    stage2 = Pipeline(
        pass_list[split:], verify=verify, probe_feeds=first_feeds, context=context, on_pass=on_pass,
        reference_outputs=stage1.final_outputs,  # the same model on the same feeds: not run again
    ).run(ir_model)
    stats = stage1.stats + stage2.stats
    start = time.perf_counter()
    out_model = to_format(ir_model, format, contrib_ops=contrib_ops, verify=verify)
    seconds = stage1.seconds + stage2.seconds + time.perf_counter() - start
    result_report = build_report(float_model, ir_model, calib, census_model=out_model) if report else None
    if result_report is not None:
        result_report.passes = PipelineResult(ir_model, stats, 0.0, verify).to_dict()["passes"]
    return QuantizeResult(out_model, result_report, stats, float_model, seconds)
