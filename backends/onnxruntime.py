"""onnxruntime backend: sessions straight from the in-memory IR, the default executor.

A session is built without copying weights through protobuf: large initializers are
serialized as external-data placeholders and handed to onnxruntime as ``OrtValue``s that
view the IR's own arrays (``SessionOptions.add_external_initializers``). The serialized
graph is therefore small whatever the model size, also for models over 2 GB.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

__all__ = [
    "fused_op_census", "fused_op_census_of_bytes", "half_the_cores", "is_placeholder", "make_session", "run",
    "session_bytes", "session_from_bytes",
]

logger = logging.getLogger(__name__)

_INLINE_LIMIT = 1024  # bytes: smaller tensors stay inside the graph


def half_the_cores() -> int:
    """Threads for each of two sessions that run side by side: half the cores this process may use."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // 2)
_PLACEHOLDER = "qpass-in-memory"


def make_session(
    model: ir.Model,
    *,
    optimize: bool = False,
    threads: int | None = None,
    extra_outputs: Sequence[str] = (),
    outputs_only: bool = False,
    optimized_model_path: str | None = None,
    config: Mapping[str, str] | None = None,
) -> ort.InferenceSession:
    """An onnxruntime CPU session over ``model``.

    optimize: False runs the graph exactly as written (verification); True enables all
    graph optimizations (the fused integer kernels of a deployed QDQ model).
    extra_outputs: names of intermediate values to expose as outputs (calibration).
    outputs_only: run just what ``extra_outputs`` need (see :func:`session_bytes`).
    config: further session config entries (``SessionOptions.add_session_config_entry``).
    """
    graph = session_bytes(model, extra_outputs, drop_unused=True, outputs_only=outputs_only)
    return session_from_bytes(
        *graph, optimize=optimize, threads=threads, optimized_model_path=optimized_model_path, config=config
    )


def session_from_bytes(
    graph_bytes: bytes,
    names: Sequence[str],
    arrays: Sequence[np.ndarray],
    *,
    optimize: bool = False,
    threads: int | None = None,
    optimized_model_path: str | None = None,
    config: Mapping[str, str] | None = None,
) -> ort.InferenceSession:
    """A session over what :func:`session_bytes` returned (see :func:`make_session`)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    options.log_severity_level = 3
    if not optimize:  # verification/calibration: no pre-packed weight copies
        options.add_session_config_entry("session.disable_prepacking", "1")
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if optimized_model_path:
        options.optimized_model_filepath = optimized_model_path
    for key, value in (config or {}).items():
        options.add_session_config_entry(key, value)
    if names:
        options.add_external_initializers(list(names), [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays])
    return ort.InferenceSession(graph_bytes, options, providers=["CPUExecutionProvider"])


def session_bytes(
    model: ir.Model, extra_outputs: Sequence[str] = (), *, drop_unused: bool = False, outputs_only: bool = False
) -> tuple[bytes, list[str], list[np.ndarray]]:
    """Serialize ``model`` with its large initializers replaced by placeholders.

    Returns the graph bytes and the (names, arrays) onnxruntime must be given beside them.
    drop_unused: leave out the large initializers nothing reads (e.g. float weights a
    quantizing pass replaced, until dead-code elimination; onnxruntime would drop them), so
    that removing them does not change the bytes. Otherwise they are serialized inline.
    outputs_only: the graph's outputs are ``extra_outputs`` alone, and the nodes (and
    initializers) none of them needs are left out: onnxruntime runs every node it is given.
    """
    names: list[str] = []
    arrays: list[np.ndarray] = []
    with _placeholders(model, names, arrays, drop_unused) as dropped, _extra_outputs(model, extra_outputs):
        proto = ir.to_proto(model)
    if outputs_only:
        dropped = dropped | _prune_to(proto.graph, list(extra_outputs))
        kept_arrays = [(n, a) for n, a in zip(names, arrays) if n not in dropped]
        names[:], arrays[:] = [n for n, _ in kept_arrays], [a for _, a in kept_arrays]
    if dropped:
        for field in (proto.graph.initializer, proto.graph.value_info):
            kept = [t for t in field if t.name not in dropped]
            del field[:]
            field.extend(kept)
    proto.ir_version = _session_ir_version(proto)
    return proto.SerializeToString(), names, arrays


def _prune_to(graph, outputs: list[str]) -> set[str]:
    """Make ``outputs`` the outputs of the ``GraphProto`` and remove the nodes they do not need;
    returns the names of the initializers no node reads any more."""
    nodes = list(graph.node)
    producer = {name: i for i, node in enumerate(nodes) for name in node.output if name}
    live: set[int] = set()
    read: set[str] = set()
    pending = list(outputs)
    while pending:
        name = pending.pop()
        i = producer.get(name)
        if i is None or i in live:
            continue
        live.add(i)
        reads = set(_reads(nodes[i])) - read
        read |= reads
        pending.extend(reads)
    wanted = {name: i for i, name in enumerate(outputs)}
    kept_outputs = sorted((o for o in graph.output if o.name in wanted), key=lambda o: wanted[o.name])
    del graph.output[:]
    graph.output.extend(kept_outputs)
    del graph.node[:]
    graph.node.extend(node for i, node in enumerate(nodes) if i in live)
    return {t.name for t in graph.initializer if t.name not in read and t.name not in wanted}


def _reads(node) -> Iterator[str]:
    """Names a ``NodeProto`` reads, those its subgraphs read from outer scopes included."""
    yield from (name for name in node.input if name)
    for attribute in node.attribute:
        for sub in [attribute.g] if attribute.HasField("g") else list(attribute.graphs):
            for inner in sub.node:
                yield from _reads(inner)


def is_placeholder(tensor) -> bool:
    """Whether a ``TensorProto`` from :func:`session_bytes` is a placeholder for an in-memory array."""
    external = tensor.data_location == 1  # TensorProto.EXTERNAL
    return external and any(e.key == "location" and e.value == _PLACEHOLDER for e in tensor.external_data)


def _session_ir_version(proto) -> int:
    """The lowest IR version the model's opsets need: newer onnx packages stamp IR versions
    that older onnxruntime releases refuse ("Unsupported model IR version")."""
    import onnx

    needed = onnx.helper.find_min_ir_version_for(list(proto.opset_import), ignore_unknown=True)
    if proto.functions:
        needed = max(needed, 8)
    return min(proto.ir_version, max(needed, 7)) if proto.ir_version else max(needed, 7)


@contextlib.contextmanager
def _placeholders(model: ir.Model, names: list[str], arrays: list[np.ndarray], drop_unused: bool = False) -> Iterator[set[str]]:
    """Swap large initializers for placeholders; yields the names of unused ones to leave out."""
    swapped: list[tuple[ir.Value, ir.TensorProtocol]] = []
    dropped: set[str] = set()
    inputs = {id(v) for v in model.graph.inputs} if drop_unused else set()
    try:
        for name, value in model.graph.initializers.items():
            tensor = value.const_value
            if drop_unused and not _used(value) and id(value) not in inputs:
                dropped.add(name)  # left out after serializing; large ones get a cheap stand-in first
                if tensor is not None and tensor.nbytes > _INLINE_LIMIT:
                    swapped.append((value, tensor))
                    value.const_value = _placeholder(tensor, name, tensor.nbytes)
                continue
            if tensor is None or tensor.dtype in _PACKED:
                continue
            external = isinstance(tensor, ir.ExternalTensor)
            if not external and tensor.nbytes <= _INLINE_LIMIT:
                continue
            swapped.append((value, tensor))
            if not _used(value):
                # onnxruntime drops unused initializers before it looks for external ones: inline them.
                if external:
                    value.const_value = ir.tensor(tensor.numpy(), name=name)
                else:
                    swapped.pop()
                continue
            array = np.ascontiguousarray(tensor.numpy())  # read-only views are fine: never copied
            names.append(name)
            arrays.append(array)
            value.const_value = _placeholder(tensor, name, array.nbytes)
        yield dropped
    finally:
        for value, tensor in swapped:
            value.const_value = tensor


def _placeholder(tensor: ir.TensorProtocol, name: str, nbytes: int) -> ir.ExternalTensor:
    return ir.ExternalTensor(_PLACEHOLDER, 0, nbytes, tensor.dtype, shape=tensor.shape, name=name)


def _used(value: ir.Value) -> bool:
    return bool(value.uses()) or value.is_graph_output()


_PACKED = frozenset({ir.DataType.INT4, ir.DataType.UINT4, ir.DataType.FLOAT4E2M1, ir.DataType.STRING})


@contextlib.contextmanager
def _extra_outputs(model: ir.Model, names: Sequence[str]) -> Iterator[None]:
    if not names:
        yield
        return
    values = {v.name: v for v in _all_values(model.graph)}
    existing = {o.name for o in model.graph.outputs}
    added = [values[n] for n in names if n in values and n not in existing]
    model.graph.outputs.extend(added)
    try:
        yield
    finally:
        for _ in added:
            model.graph.outputs.pop()


def _all_values(graph: ir.Graph) -> Iterator[ir.Value]:
    yield from graph.inputs
    for node in graph:
        yield from node.outputs


def run(
    session: ort.InferenceSession, feeds: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None
) -> dict[str, np.ndarray]:
    """Run ``session`` and return outputs by name."""
    names = list(outputs) if outputs is not None else [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, dict(feeds))))


INTEGER_OPS = frozenset({
    "QLinearConv", "QLinearMatMul", "MatMulIntegerToFloat", "QGemm", "QLinearAdd", "QLinearMul",
    "QLinearGlobalAveragePool", "QLinearAveragePool", "QLinearConcat", "QLinearSigmoid", "QLinearLeakyRelu",
    "QLinearSoftmax", "QLinearConvTranspose", "ConvInteger", "MatMulInteger", "DynamicQuantizeMatMul",
    "MatMulNBits", "QAttention", "DynamicQuantizeLSTM",
})
FLOAT_COMPUTE_OPS = frozenset({
    "Conv", "ConvTranspose", "MatMul", "Gemm", "FusedConv", "FusedMatMul", "FusedGemm",
    "Add", "Mul", "Sigmoid", "Concat", "LeakyRelu", "AveragePool", "GlobalAveragePool",
})


def fused_op_census(model: ir.Model, threads: int | None = None) -> dict:
    """What onnxruntime's optimizer makes of a QDQ model: integer kernels vs float compute ops.

    Returns ``{"integer": {op: n}, "float_behind_dq": {op: n}, "float_other": {op: n},
    "onnxruntime": version}``; ``float_behind_dq`` counts float compute ops (Conv/MatMul/Gemm and the
    element-wise ops that have QLinear kernels) still fed by a DequantizeLinear, i.e.
    quantized layers that did not get an integer kernel.
    """
    return fused_op_census_of_bytes(session_bytes(model, drop_unused=True), threads)


def fused_op_census_of_bytes(graph: tuple[bytes, list[str], list[np.ndarray]], threads: int | None = None) -> dict:
    """:func:`fused_op_census` on what :func:`session_bytes` returned (safe on a worker thread:
    the model itself is not touched)."""
    import os
    import tempfile

    import onnx

    config = {  # the census runs nothing: no pre-packed weights; weights written beside the graph, never read
        "session.disable_prepacking": "1",
        "session.optimized_model_external_initializers_file_name": "optimized.data",
        "session.optimized_model_external_initializers_min_size_in_bytes": str(_INLINE_LIMIT),
    }
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "optimized.onnx")
        session_from_bytes(*graph, optimize=True, threads=threads, optimized_model_path=path, config=config)
        optimized = onnx.load(path, load_external_data=False)
    producers = {o: n for n in optimized.graph.node for o in n.output}
    integer: dict[str, int] = {}
    behind: dict[str, int] = {}
    other: dict[str, int] = {}
    for node in optimized.graph.node:
        if node.op_type in INTEGER_OPS:
            integer[node.op_type] = integer.get(node.op_type, 0) + 1
        elif node.op_type in FLOAT_COMPUTE_OPS:
            fed_by_dq = any(producers.get(i) is not None and producers[i].op_type == "DequantizeLinear" for i in node.input)
            bucket = behind if fed_by_dq else other
            bucket[node.op_type] = bucket.get(node.op_type, 0) + 1
    return {"integer": integer, "float_behind_dq": behind, "float_other": other, "onnxruntime": ort.__version__}
