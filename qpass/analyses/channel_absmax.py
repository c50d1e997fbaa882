"""Per-channel max|x| of chosen activations along a chosen channel axis, over the calibration set.

For values ``names[i]`` with channels on axis ``axes[i]`` (-1 for Linear inputs, 1 for NCHW
Conv inputs), returns ``result[name]``: max |x| per channel over every calibration batch, in
float64. Used by activation outlier channel splitting; only the maxima are kept.
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

__all__ = ["ChannelAbsMax"]


@dataclasses.dataclass(frozen=True)
class ChannelAbsMax(Analysis):
    """max|x| per channel (axis ``axes[i]`` of value ``names[i]``) over the calibration set."""

    names: tuple[str, ...]
    axes: tuple[int, ...]

    def compute(self, model: ir.Model, manager: AnalysisManager) -> Mapping[str, np.ndarray]:
        data = manager.context.get("calibration")
        if data is None:
            raise CalibrationError("activation OCS needs calibration data: pass --calib DATA (or --random-calib N)")
        found: dict[str, np.ndarray] = {}
        for values in calibration_batches(model, self.names, data):
            for name, axis in zip(self.names, self.axes):
                x = values[name]
                m = np.abs(np.moveaxis(x, axis, 0).reshape(x.shape[axis], -1)).max(axis=1).astype(np.float64)
                found[name] = m if name not in found else np.maximum(found[name], m)
        if not found:
            raise CalibrationError("the calibration set is empty: pass at least one sample")
        return MappingProxyType(found)
