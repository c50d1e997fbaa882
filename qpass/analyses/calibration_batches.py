"""Run a model over calibration batches and hand back chosen values, one batch at a time."""

from __future__ import annotations

import queue
from collections import deque
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
    taken from the feeds, other values the outputs of an onnxruntime session that runs just
    the nodes they need."""
    names = list(names)
    graph_inputs = {v.name for v in model.graph.inputs}
    outputs = [n for n in names if n not in graph_inputs]
    # Two batches run at once, each on half the cores (onnxruntime releases the GIL), and a
    # third waits, while the caller's observers digest the oldest one; batches come back in
    # order and at most four are held. One sample rarely keeps all cores busy on its own: on 2
    # cores onnxruntime ran the OCR model's 64 calibration samples (52 values exposed) in 0.62 s
    # one 2-thread run at a time and in 0.50 s this way. Each run gets a session of its own
    # (sessions share the weight arrays; a session's threads serve one run at a time), except
    # with one thread per run: no thread pool to share, so both runs use one session. Idle
    # onnxruntime threads sleep instead of spinning, so they leave the cores to the observers.
    workers, threads = 2, ort_backend.half_the_cores()

    if not outputs:  # every value wanted is a graph input: nothing to run
        for feeds in data:
            yield {name: feeds[name] for name in names}
        return

    def new_session():  # the nodes no wanted value needs (heads, post-processing) are left out
        return ort_backend.make_session(model, extra_outputs=outputs, outputs_only=True, threads=threads,
                                        config={"session.intra_op.allow_spinning": "0"})

    session = new_session()
    inputs = {i.name for i in session.get_inputs()}
    idle: queue.SimpleQueue = queue.SimpleQueue()  # a run takes a session from here and puts it back
    for i in range(workers):
        idle.put(session if i == 0 or threads == 1 else new_session())

    def run(feeds):
        session = idle.get()  # each run has a session to itself
        try:
            return feeds, ort_backend.run(session, {k: v for k, v in feeds.items() if k in inputs}, outputs)
        finally:
            idle.put(session)

    batches = iter(data)
    pending: deque = deque()
    with ThreadPoolExecutor(workers) as pool:
        try:
            while True:
                while len(pending) < workers + 1:
                    upcoming = next(batches, None)
                    if upcoming is None:
                        break
                    pending.append(pool.submit(run, upcoming))
                if not pending:
                    return
                feeds, results = pending.popleft().result()
                yield {name: feeds[name] if name in graph_inputs else results[name] for name in names}
        finally:  # an error or an early stop: batches not yet started are dropped
            for future in pending:
                future.cancel()
