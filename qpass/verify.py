"""Numeric verification: probe batches, running a model, comparing float outputs.

Tolerance (DECISIONS.md): per output, ``max|after - before| <= rtol * max|before| + atol``
with ``rtol = 1e-4`` and ``atol = 1e-6``, in float32 on a fixed probe batch.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from qpass.backends import onnxruntime as ort_backend
from qpass.graph_utils import indexed_table_rows

__all__ = ["RTOL", "ATOL", "probe_feeds", "run_model", "compare_outputs", "sqnr_db", "sqnr_from_sums"]

RTOL = 1e-4
ATOL = 1e-6
_DYNAMIC_DIM = {0: 2}  # symbolic batch axis -> 2; other symbolic axes -> 8


def probe_feeds(model: ir.Model, seed: int = 0) -> dict[str, np.ndarray]:
    """A deterministic batch of inputs shaped like the model's (symbolic dims: batch 2, others 8).

    Float inputs are standard normal. Integer inputs that index a constant table (token
    ids into an embedding Gather) are drawn below the table size; other integer inputs
    (masks, flags) are ones.
    """
    rng = np.random.default_rng(seed)
    feeds = {}
    for value in model.graph.inputs:
        if value.is_initializer():
            continue
        shape = _concrete_shape(value)
        dtype = value.dtype.numpy() if value.dtype is not None else np.dtype(np.float32)
        if np.issubdtype(dtype, np.floating):
            feeds[value.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype == np.bool_:
            feeds[value.name] = np.ones(shape, dtype)
        else:
            bound = indexed_table_rows(value)
            feeds[value.name] = (
                rng.integers(0, min(bound, 1000), shape).astype(dtype) if bound else np.ones(shape, dtype)
            )
    return feeds


def _concrete_shape(value: ir.Value) -> tuple[int, ...]:
    if value.shape is None:
        raise ValueError(f"input '{value.name}' has no shape")
    return tuple(
        d if isinstance(d, int) else _DYNAMIC_DIM.get(i, 8) for i, d in enumerate(value.shape.dims)
    )


def run_model(
    model: ir.Model, feeds: Mapping[str, np.ndarray], *, optimize: bool = False, graph: tuple | None = None,
    threads: int | None = None,
) -> dict[str, np.ndarray]:
    """Outputs of ``model`` on ``feeds`` (onnxruntime CPU); ``graph``: ``model`` already
    serialized by :func:`qpass.backends.onnxruntime.session_bytes` (no extra outputs)."""
    if graph is not None:
        session = ort_backend.session_from_bytes(*graph, optimize=optimize, threads=threads)
    else:
        session = ort_backend.make_session(model, optimize=optimize, threads=threads)
    names = {i.name for i in session.get_inputs()}
    return ort_backend.run(session, {k: v for k, v in feeds.items() if k in names})


def compare_outputs(
    before: Mapping[str, np.ndarray], after: Mapping[str, np.ndarray], rtol: float = RTOL, atol: float = ATOL
) -> str | None:
    """None when every output matches within tolerance, else a one-line description."""
    if list(before) != list(after):
        return f"outputs changed from {list(before)} to {list(after)}"
    for name, ref in before.items():
        got = after[name]
        if ref.shape != got.shape:
            return f"output '{name}' changed shape from {ref.shape} to {got.shape}"
        if ref.dtype.kind not in "fc":
            if not np.array_equal(ref, got):
                return f"output '{name}' ({ref.dtype}) changed"
            continue
        ref64, got64 = ref.astype(np.float64), got.astype(np.float64)
        finite = np.isfinite(ref64)
        if not np.array_equal(finite, np.isfinite(got64)) or not np.array_equal(ref64[~finite], got64[~finite]):
            return f"output '{name}' changed which elements are NaN/Inf"
        if not finite.any():
            continue
        err = float(np.max(np.abs(got64[finite] - ref64[finite])))
        scale = float(np.max(np.abs(ref64[finite])))
        if err > rtol * scale + atol:
            return f"output '{name}' max abs error {err:.3g} exceeds {rtol:g}*{scale:.3g}+{atol:g}"
    return None


def sqnr_db(reference: np.ndarray, approx: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio in dB; inf when equal."""
    ref = reference.astype(np.float64)
    noise = float(np.sum((ref - approx.astype(np.float64)) ** 2))
    return sqnr_from_sums(float(np.sum(ref**2)), noise)


def sqnr_from_sums(signal: float, noise: float) -> float:
    """10·log10(signal / noise) of two sums of squares; inf when there is no noise."""
    if noise == 0.0:
        return float("inf")
    return float("-inf") if signal == 0.0 else 10.0 * float(np.log10(signal / noise))
