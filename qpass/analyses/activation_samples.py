"""Per-channel abs-max, min, max and a bounded row sample of chosen activations, over the calibration set.

For values ``names`` (channels on the last axis), returns ``absmax[name]`` (max |x| per
channel over every calibration batch) and ``rows[name]``: at most ``max_rows`` rows
(tokens / positions) drawn evenly from each batch, for searches that need real data
(SmoothQuant's alpha). Memory is bounded by ``max_rows`` whatever the calibration size.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from types import MappingProxyType

import numpy as np
import onnx_ir as ir

from qpass.analyses.calibration_batches import calibration_batches
from qpass.errors import CalibrationError
from qpass.pass_base import Analysis, AnalysisManager

__all__ = ["ActivationSamples", "ActivationSamplesResult"]


@dataclasses.dataclass(frozen=True)
class ActivationSamplesResult:
    absmax: Mapping[str, np.ndarray]
    rows: Mapping[str, np.ndarray]
    minimum: Mapping[str, np.ndarray]
    maximum: Mapping[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class ActivationSamples(Analysis):
    names: tuple[str, ...]
    max_rows: int = 2048
    rows_per_batch: int = 64

    def compute(self, model: ir.Model, manager: AnalysisManager) -> ActivationSamplesResult:
        data = manager.context.get("calibration")
        if data is None:
            raise CalibrationError("this pass needs calibration data: pass --calib DATA (or --random-calib N)")
        absmax: dict[str, np.ndarray] = {}
        low: dict[str, np.ndarray] = {}
        high: dict[str, np.ndarray] = {}
        rows: dict[str, list[np.ndarray]] = {n: [] for n in self.names}
        kept = 0
        for values in calibration_batches(model, self.names, data):
            take = None
            for name in self.names:
                x = values[name]
                flat = x.reshape(-1, x.shape[-1]).astype(np.float32)
                batch_max = np.abs(flat).max(axis=0)
                absmax[name] = batch_max if name not in absmax else np.maximum(absmax[name], batch_max)
                lo, hi = flat.min(axis=0), flat.max(axis=0)
                low[name] = lo if name not in low else np.minimum(low[name], lo)
                high[name] = hi if name not in high else np.maximum(high[name], hi)
                if kept < self.max_rows:
                    if take is None:
                        n = min(self.rows_per_batch, flat.shape[0], self.max_rows - kept)
                        take = np.linspace(0, flat.shape[0] - 1, n).round().astype(int)
                    rows[name].append(flat[take])
            if take is not None:
                kept += len(take)
        if not absmax:
            raise CalibrationError("the calibration set is empty: pass at least one sample")
        return ActivationSamplesResult(
            MappingProxyType(absmax),
            MappingProxyType({k: np.concatenate(v) for k, v in rows.items() if v}),
            MappingProxyType(low),
            MappingProxyType(high),
        )
