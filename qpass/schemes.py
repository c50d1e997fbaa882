"""Quantization intent: a frozen, self-validating :class:`QuantSpec` stored on ``ir.Value.meta``.

A spec says how a tensor is quantized (integer type, symmetric or affine, granularity,
quantizer kind, power-of-two scales, observer). Parameters come later from calibration
(:func:`qparams_from_range`); Q/DQ nodes are materialized last. ALGORITHMS.md §0.2.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np

__all__ = ["QuantSpec", "SPEC_KEY", "LOG_QUANTIZED_KEY", "valid_scale", "SHARED_PARAMETER_OPS", "qparams_from_range", "INT_RANGES"]

SPEC_KEY = "qpass.quant_spec"
LOG_QUANTIZED_KEY = "qpass.log_quantized"  # value.meta mark: already quantized by a log quantizer
# data-movement ops: their quantized output reuses the input's scale and zero-point
SHARED_PARAMETER_OPS = ("MaxPool", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Slice", "Split", "Resize")

INT_RANGES = {
    "int8": (-128, 127),
    "uint8": (0, 255),
    "int4": (-8, 7),
    "uint4": (0, 15),
    "int16": (-32768, 32767),
    "uint16": (0, 65535),
}
Granularity = Literal["tensor", "channel", "group", "token"]
Kind = Literal["uniform", "log2", "log_sqrt2"]
OBSERVERS = ("minmax", "moving_average", "percentile", "mse", "entropy")


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized.

    dtype: integer storage type; symmetric: zero-point 0 (signed) or affine;
    granularity: tensor / channel (``axis``) / group (``axis`` and ``group_size``, blocks
    along the reduction axis) / token (dynamic, one scale per row at run time);
    narrow_range: symmetric signed range [-2^(b-1)+1, 2^(b-1)-1] (e.g. [-127, 127]);
    pow2_scale: round scales up to a power of two (HPTQ); kind: uniform or log quantizer;
    observer: how calibration turns statistics into a range; percentile: for that observer;
    num_bits: fewer bits than the storage type holds (e.g. 6-bit codes in int8): the integer
    range shrinks to 2^num_bits levels.
    """

    dtype: str = "int8"
    symmetric: bool = True
    granularity: Granularity = "tensor"
    axis: int | None = None
    group_size: int | None = None
    narrow_range: bool = False
    pow2_scale: bool = False
    kind: Kind = "uniform"
    observer: str = "minmax"
    percentile: float = 99.999
    num_bits: int | None = None

    def __post_init__(self) -> None:
        if self.dtype not in INT_RANGES:
            raise ValueError(f"unknown quantized dtype '{self.dtype}': choose one of {', '.join(INT_RANGES)}")
        if self.granularity not in ("tensor", "channel", "group", "token"):
            raise ValueError(f"unknown granularity '{self.granularity}': tensor, channel, group or token")
        if self.granularity in ("channel", "group") and self.axis is None:
            raise ValueError(f"granularity '{self.granularity}' needs an axis")
        if self.granularity == "group" and not (self.group_size and self.group_size > 0):
            raise ValueError("granularity 'group' needs a positive group_size")
        if self.kind not in ("uniform", "log2", "log_sqrt2"):
            raise ValueError(f"unknown quantizer kind '{self.kind}': uniform, log2 or log_sqrt2")
        if self.observer not in OBSERVERS:
            raise ValueError(f"unknown observer '{self.observer}': choose one of {', '.join(OBSERVERS)}")
        if self.num_bits is not None and not 2 <= self.num_bits <= int("".join(c for c in self.dtype if c.isdigit())):
            raise ValueError(f"num_bits must be between 2 and the bits of {self.dtype}, got {self.num_bits}")
        if not 50.0 < self.percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {self.percentile}")

    @property
    def signed(self) -> bool:
        return self.dtype.startswith("int")

    @property
    def bits(self) -> int:
        return self.num_bits or int("".join(c for c in self.dtype if c.isdigit()))

    @property
    def qmin(self) -> int:
        lo = -(2 ** (self.bits - 1)) if self.signed else 0
        return lo + 1 if (self.narrow_range and self.signed) else lo

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    @property
    def restricted(self) -> bool:
        """True when the codes use fewer levels than the storage type (a Clip emulates it in ONNX)."""
        return self.qmax - self.qmin < INT_RANGES[self.dtype][1] - INT_RANGES[self.dtype][0] - (1 if self.narrow_range and self.signed else 0)

    def replace(self, **changes) -> QuantSpec:
        return dataclasses.replace(self, **changes)


def valid_scale(scale: np.ndarray, spec: QuantSpec) -> np.ndarray:
    """A positive, finite scale (1.0 for a degenerate range), power of two when the spec asks."""
    scale = np.where(np.isfinite(scale) & (scale > 0), scale, 1.0)
    scale = np.maximum(scale, np.finfo(np.float32).tiny * 2**10)
    return 2.0 ** np.ceil(np.log2(scale)) if spec.pow2_scale else scale


def qparams_from_range(spec: QuantSpec, lo: np.ndarray | float, hi: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
    """Scale (float32) and zero-point (int64) covering ``[lo, hi]`` (arrays: one per channel).

    Zero is always representable. A degenerate range (constant or all-zero tensor) still gets
    a valid positive scale, so the model runs and never divides by zero.
    """
    lo = np.minimum(np.asarray(lo, dtype=np.float64), 0.0)
    hi = np.maximum(np.asarray(hi, dtype=np.float64), 0.0)
    qmin, qmax = spec.qmin, spec.qmax
    if spec.symmetric:
        amax = np.maximum(np.abs(lo), np.abs(hi))
        if spec.signed:
            scale = amax / float(qmax)
            zero = np.zeros_like(scale, dtype=np.int64)
        else:  # unsigned symmetric: a non-negative tensor, zero-point at qmin
            scale = hi / float(qmax - qmin)
            zero = np.full(scale.shape, qmin, dtype=np.int64)
    else:
        scale = (hi - lo) / float(qmax - qmin)
    scale = valid_scale(scale, spec)
    if not spec.symmetric:
        zero = np.clip(np.round(qmin - lo / scale), qmin, qmax).astype(np.int64)
    return scale.astype(np.float32), zero
