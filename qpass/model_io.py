"""Front door and back door: every model becomes one ``onnx_ir.Model``; saving is atomic.

``load_model`` accepts a path, an ``onnx.ModelProto``, an ``onnx_ir.Model`` (cloned, so the
caller's object is never edited) or a ``torch.nn.Module`` (with ``example_inputs``). It
validates what a user can get wrong and raises a one-line :class:`ModelError`:
unreadable/corrupt files, external data that is missing, short or outside the model's
folder, opset < 7, checker failures, unknown op domains, zero-size input dimensions,
NaN/Inf weights. Models below opset 13 are upgraded with ``onnx.version_converter`` and
checked numerically against the original. Opset 21 is used only where the quantized
output needs it (int4/uint4/int16/uint16 Q/DQ, ``block_size``): :func:`raise_opset_if_needed`.
"""

from __future__ import annotations

import logging
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from qpass.backends import onnxruntime as ort_backend
from qpass.errors import ModelError, OutputError, first_line
from qpass.graph_utils import make_node_names_unique

__all__ = [
    "MIN_INPUT_OPSET",
    "WORK_OPSET",
    "KNOWN_DOMAINS",
    "load_model",
    "save_model",
    "model_nbytes",
    "opset_of",
    "raise_opset_if_needed",
    "write_text",
]

logger = logging.getLogger(__name__)

MIN_INPUT_OPSET = 7
WORK_OPSET = 13
KNOWN_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "com.microsoft", "ai.qpass"})
_PROTOBUF_LIMIT = 2**31 - 1
_PACKED_TYPES = frozenset({ir.DataType.INT4, ir.DataType.UINT4, ir.DataType.FLOAT4E2M1, ir.DataType.STRING})


def opset_of(model: ir.Model) -> int:
    """The default-domain opset of ``model``."""
    return model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))


QDQ_OPSET = 21  # int4/uint4/int16/uint16 Q/DQ types and blocked (block_size) Q/DQ
_QDQ_OPSET_TYPES = frozenset({ir.DataType.INT4, ir.DataType.UINT4, ir.DataType.INT16, ir.DataType.UINT16})
_REDUCE_AXES_INPUT = frozenset({  # axes moved from an attribute to an input at opset 18
    "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin",
    "ReduceProd", "ReduceSumSquare",
})
_MEANING_CHANGED = {"DFT": 20, "GroupNormalization": 21}  # op: opset from which it means something else


def _default_domain_nodes(model: ir.Model):
    for graph_like in [model.graph, *model.functions.values()]:
        for node in ir.traversal.RecursiveGraphIterator(graph_like):
            if node.domain in ("", "ai.onnx"):
                yield node


def _needs_qdq_opset(model: ir.Model) -> bool:
    for node in _default_domain_nodes(model):
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        if "block_size" in node.attributes:
            return True
        typed = [node.inputs[0] if node.op_type == "DequantizeLinear" else node.outputs[0], *node.inputs[2:3]]
        if any(v is not None and v.dtype in _QDQ_OPSET_TYPES for v in typed):
            return True
    return any(
        v.const_value is not None and v.const_value.dtype in (ir.DataType.INT4, ir.DataType.UINT4)
        for v in model.graph.initializers.values()
    )


def raise_opset_if_needed(model: ir.Model) -> bool:
    """Raise the default-domain opset to 21 in place when the Q/DQ nodes need it; True if raised.

    Ops whose form changed on the way are rewritten (Reduce* ``axes`` attribute -> input at 18,
    GridSample mode names at 20, RoiAlign's default coordinate mode at 16); an op whose
    meaning changed otherwise (DFT before 20, GroupNormalization before 21) is a ModelError.
    """
    old = opset_of(model)
    if old >= QDQ_OPSET or not _needs_qdq_opset(model):
        return False
    nodes = list(_default_domain_nodes(model))
    for node in nodes:
        if old < _MEANING_CHANGED.get(node.op_type, 0):
            raise ModelError(
                f"quantized weights need opset {QDQ_OPSET}, but op '{node.op_type}' (node '{node.name}') changes "
                f"meaning between opset {old} and {QDQ_OPSET}: re-export the model at opset {QDQ_OPSET}"
            )
    from qpass.graph_utils import unique_name, used_names

    taken = used_names(model.graph) | {o.name for n in nodes for o in n.outputs}
    for node in nodes:
        if old < 18 and node.op_type in _REDUCE_AXES_INPUT and "axes" in node.attributes:
            axes = node.attributes.pop("axes").as_ints()
            const = ir.node("Constant", [], {"value_ints": list(axes)}, name=f"{node.name}_axes")
            const.outputs[0].name = unique_name(model.graph, f"{node.name or node.op_type}_axes", taken)
            node.graph.insert_before(node, const)
            node.resize_inputs(2)
            node.replace_input_with(1, const.outputs[0])
        elif old < 20 and node.op_type == "GridSample":
            mode = node.attributes.get_string("mode", "bilinear")
            node.attributes["mode"] = ir.AttrString("mode", {"bilinear": "linear", "bicubic": "cubic"}.get(mode, mode))
        elif old < 16 and node.op_type == "RoiAlign" and "coordinate_transformation_mode" not in node.attributes:
            node.attributes["coordinate_transformation_mode"] = ir.AttrString("coordinate_transformation_mode", "output_half_pixel")
    for imports in [model.opset_imports, *(f.opset_imports for f in model.functions.values())]:
        for key in ("", "ai.onnx"):
            if key in imports and imports[key] < QDQ_OPSET:
                imports[key] = QDQ_OPSET
    model.ir_version = max(model.ir_version or 0, 10)  # opset 21 needs IR version 10
    logger.info("raised the opset from %d to %d for the quantized weights", old, QDQ_OPSET)
    return True


def model_nbytes(model: ir.Model) -> int:
    """Total bytes of the model's initializers."""
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def load_model(source: Any, example_inputs: Any = None, *, check: bool = True, **export_options: Any) -> ir.Model:
    """Return ``source`` as a validated ``onnx_ir.Model`` at opset >= 13."""
    if isinstance(source, ir.Model):
        model = source.clone()
    elif isinstance(source, onnx.ModelProto):
        _check_proto(source, None)
        model = ir.from_proto(source)
        _run_checker(model, "the model")
    elif isinstance(source, (str, os.PathLike)):
        model = _load_path(Path(source))
    elif _is_torch_module(source):
        from qpass.frontends import torch_to_ir

        model = torch_to_ir(source, example_inputs, **export_options)
    else:
        raise ModelError(
            f"cannot load a model from {type(source).__name__}: pass an ONNX file path, "
            "an onnx.ModelProto, an onnx_ir.Model or a torch.nn.Module"
        )
    make_node_names_unique(model)
    if check:
        validate_model(model)
    if opset_of(model) < WORK_OPSET:
        model = _upgrade_opset(model)
    from qpass.pipeline import infer_shapes

    infer_shapes(model)
    return model


def _is_torch_module(obj: Any) -> bool:
    return any(c.__module__.startswith("torch.nn") and c.__name__ == "Module" for c in type(obj).__mro__)


def _load_path(path: Path) -> ir.Model:
    if not path.exists():
        raise ModelError(f"model file '{path}' does not exist: check the path")
    if path.is_dir():
        raise ModelError(f"'{path}' is a directory: pass the .onnx file inside it")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except PermissionError as e:
        raise ModelError(f"cannot read model file '{path}': permission denied") from e
    except Exception as e:  # protobuf DecodeError and friends
        raise ModelError(
            f"'{path}' is not a valid ONNX model (corrupt, truncated or another format): "
            "re-export it or check the file"
        ) from e
    if not proto.HasField("graph") or (not proto.graph.node and not proto.graph.output):
        raise ModelError(f"'{path}' holds no ONNX graph (not an ONNX model or truncated): re-export it")
    has_external = _check_external_data(proto, path)
    _check_proto(proto, path)
    try:
        model = ir.serde.deserialize_model(proto)
        if has_external:
            ir.external_data.set_base_dir(model.graph, path.parent)
    except Exception as e:
        raise ModelError(f"cannot read model '{path}': {first_line(e)}") from e
    del proto
    _own_weights(model)
    _run_checker(model, f"'{path}'")
    return model


def _run_checker(model: ir.Model, where: str) -> None:
    """The ONNX checker on the graph (weights are not copied for it)."""
    from qpass.pipeline import check_graph

    try:
        check_graph(model, infer=False)
    except Exception as e:
        raise ModelError(f"{where} fails the ONNX checker: {first_line(e)}") from e


def _own_weights(model: ir.Model) -> None:
    """Give each in-file initializer its own numpy array, so the protobuf is freed and later
    sessions view the arrays without copying. External-data tensors stay memory-mapped."""
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if isinstance(tensor, ir.TensorProtoTensor) and tensor.dtype not in _PACKED_TYPES:
            value.const_value = ir.Tensor(tensor.numpy(), dtype=tensor.dtype, name=tensor.name)


def _check_proto(proto: onnx.ModelProto, path: Path | None) -> None:
    """Cheap checks on the protobuf: opset, op domains, zero-size inputs."""
    where = f"'{path}'" if path else "the model"
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None:
        raise ModelError(f"{where} imports no default ONNX opset: re-export it with opset >= {WORK_OPSET}")
    if opset < MIN_INPUT_OPSET:
        raise ModelError(
            f"{where} uses opset {opset}; qpass needs opset >= {MIN_INPUT_OPSET} "
            f"(>= {WORK_OPSET} preferred): re-export or convert it with onnx.version_converter"
        )
    local = {f.domain for f in proto.functions}
    for node in proto.graph.node:
        if node.domain not in KNOWN_DOMAINS and node.domain not in local:
            raise ModelError(
                f"node '{node.name or node.op_type}' uses op '{node.domain}::{node.op_type}' from an unknown "
                "domain: qpass supports the standard ONNX ops, com.microsoft and ai.qpass"
            )
    for inp in proto.graph.input:
        dims = inp.type.tensor_type.shape.dim
        if any(d.HasField("dim_value") and d.dim_value == 0 for d in dims):
            raise ModelError(f"model input '{inp.name}' has a zero-size dimension: fix the export's input shape")


def _check_external_data(proto: onnx.ModelProto, path: Path) -> bool:
    """Validate every external-data reference; True when the model has any."""
    base = path.parent.resolve()
    found = False
    for tensor in _all_tensors(proto.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        found = True
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        if not location or os.path.isabs(location) or ".." in Path(location).parts:
            raise ModelError(
                f"initializer '{tensor.name}' points to external data '{location}' outside the model's folder: "
                "refusing to read it; keep data files beside the model"
            )
        data_path = base / location
        if not data_path.is_file():
            raise ModelError(
                f"external data file '{location}' of initializer '{tensor.name}' is missing: "
                f"copy it next to '{path.name}'"
            )
        offset = int(info.get("offset", 0))
        length = int(info.get("length", -1))
        need = offset + (length if length >= 0 else _expected_nbytes(tensor))
        if data_path.stat().st_size < need:
            raise ModelError(
                f"external data file '{location}' is truncated ({data_path.stat().st_size} bytes, "
                f"initializer '{tensor.name}' needs {need}): copy the complete file"
            )
    return found


def _expected_nbytes(tensor: onnx.TensorProto) -> int:
    itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    return int(np.prod(tensor.dims, dtype=np.int64)) * itemsize


def _all_tensors(graph: onnx.GraphProto):
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            for g in [attr.g] if attr.HasField("g") else list(attr.graphs):
                yield from _all_tensors(g)


_WEIGHT_OPS = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm", "BatchNormalization", "LayerNormalization"})


def validate_model(model: ir.Model) -> None:
    """Raise :class:`ModelError` for NaN weights, and Inf in a weight of a Conv/MatMul/Gemm/
    normalization (checked once at load). ``-inf`` elsewhere is legitimate: attention masks."""
    for name, value in model.graph.initializers.items():
        tensor = value.const_value
        if tensor is None or not tensor.dtype.is_floating_point():
            continue
        try:
            array = tensor.numpy()
        except Exception:  # dtypes numpy cannot view (e.g. float8): nothing to check
            continue
        if np.isfinite(array).all():
            continue
        if np.isnan(array).any():
            raise ModelError(f"initializer '{name}' contains NaN: fix the weights before quantizing")
        readers = sorted({u.node.op_type for u in value.uses()} & _WEIGHT_OPS)
        if readers:
            raise ModelError(f"initializer '{name}' contains Inf and is a {readers[0]} weight: fix the weights before quantizing")


def _upgrade_opset(model: ir.Model) -> ir.Model:
    """Convert to opset 13 with onnx.version_converter and check outputs did not move.

    Only the graph skeleton goes through the converter: large weights are declared as graph
    inputs for the conversion and re-attached afterwards, so they are never copied.
    """
    from qpass.verify import compare_outputs, probe_feeds, run_model

    old = opset_of(model)
    graph = model.graph
    weights = {n: v for n, v in graph.initializers.items() if v.const_value is not None and v.const_value.nbytes > 1024}
    for name, value in weights.items():
        value.shape, value.dtype = value.const_value.shape, value.const_value.dtype
        graph.initializers.pop(name)
        graph.inputs.append(value)
    try:
        proto = ir.to_proto(model)
    finally:
        for name, value in weights.items():
            graph.inputs.remove(value)
            graph.register_initializer(value)
    try:
        converted = onnx.version_converter.convert_version(proto, WORK_OPSET)
        onnx.checker.check_model(converted)
    except Exception as e:
        op = _unconvertible_op(proto)
        raise ModelError(
            f"cannot upgrade the model from opset {old} to {WORK_OPSET}"
            + (f" (op '{op}')" if op else "")
            + f": {first_line(e)}; re-export it at opset >= {WORK_OPSET}"
        ) from e
    new_model = ir.from_proto(converted)
    new_graph = new_model.graph
    by_name = {v.name: v for v in new_graph.inputs}
    for name, old_value in weights.items():
        value = by_name[name]
        new_graph.inputs.remove(value)
        value.const_value = old_value.const_value
        new_graph.register_initializer(value)
    feeds = probe_feeds(model)
    half = ort_backend.half_the_cores()
    with ThreadPoolExecutor(1) as pool:  # both models at once, each on half the cores
        before = pool.submit(run_model, model, feeds, threads=half)
        after = run_model(new_model, feeds, threads=half)
        problem = compare_outputs(before.result(), after)
    if problem:
        raise ModelError(
            f"upgrading the model from opset {old} to {WORK_OPSET} changed its outputs ({problem}): "
            f"re-export it at opset >= {WORK_OPSET}"
        )
    logger.info("upgraded the model from opset %d to %d", old, WORK_OPSET)
    return new_model


def _unconvertible_op(proto: onnx.ModelProto) -> str | None:
    for node in proto.graph.node:
        single = onnx.helper.make_model(
            onnx.helper.make_graph([node], "g", [], []), opset_imports=proto.opset_import
        )
        try:
            onnx.version_converter.convert_version(single, WORK_OPSET)
        except Exception:
            return node.op_type
    return None


def save_model(
    model: ir.Model,
    path: str | os.PathLike,
    *,
    input_path: str | os.PathLike | None = None,
    external_data: bool | None = None,
) -> Path:
    """Write ``model`` to ``path`` atomically (temp file beside it, then rename).

    External data (``<name>.data`` beside the file) is used when ``external_data`` is True,
    or when None and the weights exceed what one protobuf can hold.
    """
    path = Path(path)
    if input_path is not None and _same_file(path, Path(input_path)):
        raise OutputError(f"output '{path}' is the input model: choose another output path (the input is never overwritten)")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.exists():
        raise OutputError(f"output directory '{parent}' does not exist: create it first")
    if not parent.is_dir():
        raise OutputError(f"output directory '{parent}' is not a directory: choose another output path")
    if path.is_dir():
        raise OutputError(f"output '{path}' is a directory: give a file name ending in .onnx")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"output directory '{parent}' is not writable: choose another output path")
    if external_data is None:
        external_data = model_nbytes(model) > 1_800_000_000
    try:
        tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=parent))
    except OSError as e:
        raise OutputError(f"cannot write to '{parent}': {e.strerror}") from e
    try:
        tmp = tmp_dir / path.name
        if external_data:
            data_name = f"{path.name}.data"
            ir.save(model, tmp, external_data=data_name, size_threshold_bytes=1024)
            os.replace(tmp_dir / data_name, parent / data_name)
        else:
            _write_streaming(model, tmp)
        os.replace(tmp, path)
    except OSError as e:
        raise OutputError(f"cannot write '{path}': {e.strerror or e}") from e
    finally:
        for leftover in tmp_dir.iterdir() if tmp_dir.exists() else []:
            leftover.unlink()
        if tmp_dir.exists():
            tmp_dir.rmdir()
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write a text file atomically (temporary file beside it, then rename)."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"output directory '{parent}' does not exist: create it first")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=parent)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as e:
        raise OutputError(f"cannot write '{path}': {e.strerror or e}") from e
    return path


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


_MODEL_GRAPH_FIELD = 7  # ModelProto.graph
_GRAPH_INITIALIZER_FIELD = 5  # GraphProto.initializer


def _write_streaming(model: ir.Model, path: Path) -> None:
    """Write one self-contained ONNX file, one large initializer at a time.

    The skeleton (everything but the large weights) is written first, then each weight as a
    further ``graph { initializer { ... } }`` record; protobuf merges repeated messages, so
    readers see one graph. Peak memory stays at one tensor instead of a whole model copy.
    """
    from qpass.backends.onnxruntime import session_bytes

    skeleton_bytes, names, _ = session_bytes(model)
    skeleton = onnx.load_from_string(skeleton_bytes)
    skeleton.ir_version = model.ir_version  # session bytes may carry a lower one for onnxruntime
    big = set(names)
    kept = [t for t in skeleton.graph.initializer if t.name not in big]
    del skeleton.graph.initializer[:]
    skeleton.graph.initializer.extend(kept)
    with open(path, "wb") as f:
        f.write(skeleton.SerializeToString())
        for name in names:
            tensor = model.graph.initializers[name].const_value
            header, payload = _tensor_record(name, tensor)
            body = len(header) + len(payload)
            inner = _varint(_GRAPH_INITIALIZER_FIELD << 3 | 2) + _varint(body)
            f.write(_varint(_MODEL_GRAPH_FIELD << 3 | 2) + _varint(len(inner) + body) + inner + header)
            f.write(payload)


def _tensor_record(name: str, tensor: ir.TensorProtocol) -> tuple[bytes, memoryview | bytes]:
    """A TensorProto as (fields before raw_data, raw bytes); the bytes view the array, uncopied."""
    header = bytearray()
    for d in tensor.shape.numpy():
        header += _varint(1 << 3) + _varint(int(d))  # dims
    header += _varint(2 << 3) + _varint(int(tensor.dtype))  # data_type
    header += _field(8, name.encode())  # name
    if tensor.dtype in _PACKED_TYPES:
        payload: memoryview | bytes = tensor.tobytes()
    else:
        array = np.ascontiguousarray(tensor.numpy())
        if array.dtype.byteorder == ">":
            array = array.astype(array.dtype.newbyteorder("<"))
        payload = memoryview(array.reshape(-1).view(np.uint8))
    header += _varint(9 << 3 | 2) + _varint(len(payload))  # raw_data tag and length
    return bytes(header), payload


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and a.samefile(b))
    except OSError:
        return False
