"""Clipping search for weight scales: per group (per channel, per tensor), the candidate scale with
the least squared weight error (ALGORITHMS.md §12.1 "MSE search", applied to weights).

For a group ``w`` (one row of ``blocks``) and a candidate scale ``s`` (zero-point ``z``), the
error is ``||w - s·(clamp(round(w/s) + z, q_min, q_max) - z)||²``, computed in float64 with the
float32 scale that is stored, i.e. the exact dequantization ``insert-qdq`` then writes. Candidates
(``m = max|w|``; symmetric signed, e.g. int4 [-8, 7]):

    m / q_max                       round-to-nearest (RTN), first: ties keep it
    m / |q_min|                     the extreme weight on the negative end (-8), the positive one clips at 7
    m / (q_max + 1/2) · r           r in ``CLIP_RATIOS`` (0.70 ... 1.00): clip the outliers of the group

Group-wise symmetric specs first pick each group's orientation (:func:`orientation`): where the
largest-magnitude weight is positive the group is searched negated and its scale stored negative,
so that weight lands on the 8-level end. Affine (asymmetric) specs shrink both ends of
``[min(w, 0), max(w, 0)]`` by r (GPTQ's search, with RTN at r = 1). The argmin is taken per
group, so the chosen error is never above RTN's (RTN never clips: its error is the same in
either orientation).

Cost: 33 candidates, vectorized over groups in cache-sized chunks; all-MiniLM-L6-v2's 36 weights
(10.6 M values) take about half a second on one core.
"""

from __future__ import annotations

import numpy as np

from qpass.schemes import QuantSpec, qparams_from_range, valid_scale

__all__ = ["CLIP_RATIOS", "candidate_qparams", "quantization_errors", "orientation", "clip_search"]

CLIP_RATIOS = tuple(round(0.70 + 0.01 * i, 2) for i in range(31))
_CHUNK = 1 << 17  # elements per chunk: the working arrays (1 MiB of float64) stay in cache


def candidate_qparams(spec: QuantSpec, lo: np.ndarray, hi: np.ndarray, ratios=CLIP_RATIOS) -> tuple[np.ndarray, np.ndarray]:
    """Candidate scales (float32) and zero-points (int64), ``[groups, candidates]``, RTN first."""
    lo = np.minimum(np.asarray(lo, np.float64), 0.0)[:, None]
    hi = np.maximum(np.asarray(hi, np.float64), 0.0)[:, None]
    r = np.asarray(ratios, np.float64)[None, :]
    if spec.symmetric and spec.signed:
        amax = np.maximum(-lo, hi)
        divisors = np.concatenate([[spec.qmax, -spec.qmin], (spec.qmax + 0.5) / r[0]])
        scale = valid_scale(amax / divisors[None, :], spec).astype(np.float32)
        return scale, np.zeros(scale.shape, np.int64)
    r = np.concatenate([[[1.0]], r], axis=1)
    return qparams_from_range(spec, lo * r, hi * r)


def quantization_errors(blocks: np.ndarray, scale: np.ndarray, zero: np.ndarray, spec: QuantSpec) -> np.ndarray:
    """``errors[i, c] = ||blocks[i] - DQ(Q(blocks[i]; scale[i, c], zero[i, c]))||²`` in float64."""
    n, g = blocks.shape
    errors = np.empty(scale.shape, np.float64)
    rows = max(1, _CHUNK // max(g, 1))
    affine = bool(np.any(zero))
    for start in range(0, n, rows):
        w = blocks[start:start + rows].astype(np.float64)
        s, z = scale[start:start + rows].astype(np.float64), zero[start:start + rows].astype(np.float64)
        t = np.empty_like(w)
        for c in range(scale.shape[1]):
            sc, zc = s[:, c:c + 1], z[:, c:c + 1]
            np.divide(w, sc, out=t)
            np.round(t, out=t)
            if affine:
                t += zc
            np.clip(t, spec.qmin, spec.qmax, out=t)
            if affine:
                t -= zc
            t *= sc
            t -= w
            errors[start:start + rows, c] = np.einsum("ij,ij->i", t, t)
    return errors


def orientation(blocks: np.ndarray, spec: QuantSpec) -> np.ndarray | None:
    """Per row, -1 where the row is searched (and its scale stored) negated, else +1; None when
    the spec has no orientation to choose.

    A symmetric signed full range is lopsided (int4: [-8, 7]); a negative scale mirrors it, so
    each group can put its largest-magnitude weight on the 8-level end (onnxruntime's own
    symmetric 4-bit quantizer does the same). Only for group-wise specs (weight-only kernels:
    ``MatMulNBits``, the CUDA W4A16 kernel, multiply codes by the scale whatever its sign)."""
    if not (spec.symmetric and spec.signed and spec.granularity == "group" and spec.qmin < -spec.qmax):
        return None
    extreme = blocks[np.arange(blocks.shape[0]), np.abs(blocks).argmax(axis=1)]
    return np.where(extreme > 0, -1.0, 1.0)


def clip_search(blocks: np.ndarray, spec: QuantSpec, ratios=CLIP_RATIOS) -> tuple[np.ndarray, np.ndarray]:
    """Per row of ``blocks`` ``[groups, elements]``: the scale (float32) and zero-point (int64) of
    least squared error among :func:`candidate_qparams` (first one on ties: RTN), in the row's
    :func:`orientation` (a negative scale where it is -1)."""
    blocks = np.asarray(blocks)
    if blocks.shape[1] == 0:
        return qparams_from_range(spec, np.zeros(blocks.shape[0]), np.zeros(blocks.shape[0]))
    sign = orientation(blocks, spec)
    if sign is not None:
        blocks = blocks * sign[:, None].astype(blocks.dtype)
    scale, zero = candidate_qparams(spec, blocks.min(axis=1), blocks.max(axis=1), ratios)
    best = quantization_errors(blocks, scale, zero, spec).argmin(axis=1)
    rows = np.arange(blocks.shape[0])
    scale, zero = scale[rows, best], zero[rows, best]
    return (scale * sign.astype(np.float32) if sign is not None else scale), zero
