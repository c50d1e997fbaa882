"""Run a model over calibration batches and hand back chosen values, one batch at a time."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnx_ir as ir

from qpass.backends import onnxruntime as ort_backend

__all__ = ["calibration_batches"]


def calibration_batches(
    model: ir.Model, names: Iterable[str], data: Iterable[Mapping[str, np.ndarray]]
) -> Iterator[dict[str, np.ndarray]]:
    """For each feed dict of ``data``: ``{name: array}`` for ``names`` (in order), graph inputs
    taken from the feeds, other values exposed as extra outputs of one onnxruntime session."""
    names = list(names)
    graph_inputs = {v.name for v in model.graph.inputs}
    outputs = [n for n in names if n not in graph_inputs]
    # onnxruntime runs batch i+1 on a worker thread (it releases the GIL) while the caller's
    # observers digest batch i; batches still come back in order. Idle onnxruntime threads
    # sleep instead of spinning, so they leave the cores to the observers.
    session = ort_backend.make_session(model, extra_outputs=outputs, config={"session.intra_op.allow_spinning": "0"})
    inputs = {i.name for i in session.get_inputs()}

    def run(feeds):
        return feeds, ort_backend.run(session, {k: v for k, v in feeds.items() if k in inputs}, outputs)

    batches = iter(data)
    with ThreadPoolExecutor(1) as worker:
        first = next(batches, None)
        pending = None if first is None else worker.submit(run, first)
        while pending is not None:
            feeds, results = pending.result()
            upcoming = next(batches, None)
            pending = None if upcoming is None else worker.submit(run, upcoming)
            yield {name: feeds[name] if name in graph_inputs else results[name] for name in names}
