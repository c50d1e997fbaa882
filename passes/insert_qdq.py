"""Materialize quantization intent as standard QuantizeLinear/DequantizeLinear (QDQ) nodes.

Matches:   every value annotated with a ``QuantSpec`` (see ``annotate-quant``).
Rewrites:  constant weights -> integer initializer + DequantizeLinear (scales from min-max, or
           with the spec's observer ``mse`` from qpass.weight_search's clipping search; per-channel ``axis``;
           group-wise: ``axis`` and ``block_size`` G, scales of the weight's rank with
           ceil(K / G) entries along K, no zero-point input when symmetric, opset raised to 21;
           a weight-only Gemm(transB=1) gets its weight stored as [K, N] and transB cleared, the
           layout onnxruntime's MatMulNBits fusion reads);
           the float bias of a Conv/ConvTranspose/Gemm whose input and weight are quantized
           -> int32 initializer + DequantizeLinear with scale ``s_x * s_w`` (the weight scale
           is enlarged where the bias would overflow int32, ALGORITHMS.md §11.4); so is the
           constant [N] bias of the one Add after such a MatMul where onnxruntime turns the
           pair into a Gemm (an input of rank 2 or of a static shape, or a model whose inputs
           all have static shapes): a float bias would
           leave that Gemm in float, an int32 one makes it a QGemm;
           activations -> one QuantizeLinear and one DequantizeLinear after the producer,
           consumers read the DequantizeLinear (a marked model output becomes the
           DequantizeLinear's output, under its own name; unmarked outputs stay float). Outputs of
           data-movement ops (MaxPool, Reshape, Transpose, Flatten, Squeeze, Unsqueeze, Slice, Split,
           Resize) reuse their input's scale and zero-point, so onnxruntime can run them on
           integers. A product by a positive scalar constant k (Mul by k, Div by 1/k) is not
           computed: its readers read a DequantizeLinear of its input's codes at k times the
           input's scale (exact: the same codes). Parameters come from the ``Calibration`` analysis.
Preserves: nothing exactly: the float function moves by the quantization error, which the
           pipeline reports as SQNR. Placement follows onnxruntime's QDQ fusion rules
           (QLinearConv, QLinearMatMul, MatMulIntegerToFloat, QGemm). ALGORITHMS.md §11.3-11.4.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np
import onnx_ir as ir

from qpass.analyses.calibration import Calibration, annotated_activations, parameter_source
from qpass.graph_utils import add_initializer, unique_name, used_names
from qpass.model_io import opset_of, raise_opset_if_needed
from qpass.pass_base import Pass, PassReport
from qpass.schemes import SPEC_KEY, QuantSpec, qparams_from_range
from qpass.weight_search import clip_search

__all__ = ["InsertQDQPass", "quantize_array"]

_INT32_MAX = 2**31 - 1


def quantize_array(x: np.ndarray, scale: np.ndarray, zero: np.ndarray, spec: QuantSpec, axis: int | None) -> np.ndarray:
    """round-half-even(x / scale) + zero, clipped to the spec's range, as its integer dtype.

    Group-wise specs take ``scale`` and ``zero`` with one entry per group along ``axis``.
    """
    dtype = _NP_DTYPES[spec.dtype]
    if spec.granularity == "group":
        scale, zero = (_expand_groups(a, axis, spec.group_size, x.shape[axis]) for a in (scale, zero))
        out = np.empty(x.shape, dtype)
        _quantize_block(x, scale, zero, spec, out)
        return out
    # one row per scale, quantized in blocks of ~64K values: large weights never hold several
    # full-size float64 temporaries
    rows = np.moveaxis(x, axis, 0) if axis is not None else x.reshape(1, -1)
    flat = rows.reshape(rows.shape[0], -1)
    s, z = np.reshape(scale, (-1, 1)), np.reshape(zero, (-1, 1))
    out = np.empty(flat.shape, dtype)
    n_rows, n_cols = flat.shape
    col_step = max(1, min(n_cols, _BLOCK))
    row_step = max(1, _BLOCK // col_step)
    for i in range(0, n_rows, row_step):
        for j in range(0, n_cols, col_step):
            rs, cs = slice(i, i + row_step), slice(j, j + col_step)
            _quantize_block(flat[rs, cs], s[rs], z[rs], spec, out[rs, cs])
    out = out.reshape(rows.shape)
    return np.moveaxis(out, 0, axis) if axis is not None else out.reshape(x.shape)


def _quantize_block(x: np.ndarray, scale, zero, spec: QuantSpec, out: np.ndarray) -> None:
    """``out[...] = clip(round_half_even(x / scale) + zero)`` in float64, in place on one copy of ``x``."""
    buf = x.astype(np.float64)
    np.divide(buf, scale, out=buf)
    np.round(buf, out=buf)
    np.add(buf, zero, out=buf)
    np.clip(buf, spec.qmin, spec.qmax, out=buf)
    out[...] = buf


_BLOCK = 1 << 16


_NP_DTYPES = {"int8": np.int8, "uint8": np.uint8, "int16": np.int16, "uint16": np.uint16, "int4": np.int8, "uint4": np.uint8}
_IR_DTYPES = {
    "int8": ir.DataType.INT8, "uint8": ir.DataType.UINT8, "int16": ir.DataType.INT16,
    "uint16": ir.DataType.UINT16, "int4": ir.DataType.INT4, "uint4": ir.DataType.UINT4,
}


def _expand_groups(a: np.ndarray, axis: int, group_size: int, length: int) -> np.ndarray:
    """Repeat each group's entry ``group_size`` times along ``axis`` and cut to ``length``."""
    return np.repeat(a, group_size, axis=axis).take(np.arange(length), axis=axis)


def _weight_params(w: np.ndarray, spec: QuantSpec) -> tuple[np.ndarray, np.ndarray, int | None]:
    """Scale and zero-point of a constant weight: min-max (RTN) unless the spec's observer is
    ``mse``, which searches each group's (channel's, tensor's) clipping scale (qpass.weight_search)."""

    def fit(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # rows: [groups, elements]
        if spec.observer == "mse":
            return clip_search(rows, spec)
        return qparams_from_range(spec, rows.min(axis=1), rows.max(axis=1))

    if spec.granularity == "group":
        axis, g = spec.axis % w.ndim, spec.group_size
        moved = np.moveaxis(w, axis, 0)
        groups = -(-moved.shape[0] // g)
        # a short last group is padded with zeros: harmless, the range always includes 0 and
        # zeros quantize exactly
        padded = np.concatenate([moved, np.zeros((groups * g - moved.shape[0], *moved.shape[1:]), w.dtype)])
        blocks = np.moveaxis(padded.reshape(groups, g, -1), 1, 2).reshape(-1, g)  # [groups * rest, g]
        scale, zero = (a.reshape(groups, *moved.shape[1:]) for a in fit(blocks))
        return np.moveaxis(scale, 0, axis), np.moveaxis(zero, 0, axis), axis
    if spec.granularity == "channel":
        axis = spec.axis % w.ndim
        scale, zero = fit(np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1))
        return scale, zero, axis
    scale, zero = fit(w.reshape(1, -1))
    return scale.reshape(()), zero.reshape(()), None


_VALUE_DEPENDENT_SHAPES = ("NonZero", "Compress", "Unique", "NonMaxSuppression", "Loop", "Scan", "If")


def _static_shapes_everywhere(graph: ir.Graph) -> bool:
    """Every graph input has a static shape and no op's output shape depends on input values (a
    TopK or Range whose bounds are not constants counts as one)."""
    if not graph.inputs or not all(v.shape is not None and v.shape.is_static() for v in graph.inputs):
        return False
    for node in graph:
        if node.op_type in _VALUE_DEPENDENT_SHAPES:
            return False
        bounds = node.inputs[1:2] if node.op_type == "TopK" else node.inputs if node.op_type == "Range" else ()
        if any(v is not None and v.const_value is None for v in bounds):
            return False
    return True


@dataclasses.dataclass
class InsertQDQPass(Pass):
    name = "insert-qdq"
    preserves_float = False
    keeps_shapes = True

    def call(self, model: ir.Model) -> PassReport:
        graph = model.graph
        self._taken = used_names(graph) | {node.name for node in graph if node.name}  # value and node names
        report = PassReport(model, False)
        acts = annotated_activations(model)
        calib = self.analysis(Calibration(), model) if acts else None
        params: dict[str, tuple[np.ndarray, np.ndarray, QuantSpec]] = {}
        counts: Counter = Counter()
        sources = {}  # value name -> (input, factor) it takes its parameters from

        def act_params(value: ir.Value):
            if value.name in params:
                return params[value.name]
            if (source := parameter_source(value)) is not None:
                sources[value.name] = source
                scale, zero, spec = act_params(source[0])
                if source[1] != 1.0:
                    scale = np.asarray(np.float64(scale) * source[1], np.float32)
                params[value.name] = (scale, zero, spec)
                counts["shared parameters" if source[1] == 1.0 else "rescaled parameters"] += 1
            else:
                scale, zero = calib.observers[value.name].qparams()
                params[value.name] = (np.asarray(scale, np.float32), np.asarray(zero), value.meta[SPEC_KEY])
            return params[value.name]

        values = {name: v for name, v in ((v.name, v) for v in list(graph.inputs) + [o for n in graph for o in n.outputs])}
        for name in acts:
            act_params(values[name])

        weight_done: dict[str, ir.Value] = {}
        static_graph = _static_shapes_everywhere(graph)
        for node in list(graph):
            if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
                continue
            for i, value in enumerate(node.inputs):
                if value is None or value.const_value is None or SPEC_KEY not in value.meta:
                    continue
                if value.name not in weight_done:
                    # every reader's bias becomes int32 at its own s_x * s_w (a weight may be shared)
                    biases = [b for use in value.uses() if (b := self._bias_of(use.node, use.idx, params, static_graph)) is not None]
                    weight_done[value.name] = self._quantize_weight(graph, node, value, biases, params)
                    counts["weights"] += 1
                    if value.meta[SPEC_KEY].granularity == "group":
                        counts["group-wise weights"] += 1
                node.replace_input_with(i, weight_done[value.name])
        codes: dict[str, ir.Value] = {}  # value name -> the QuantizeLinear output holding its codes
        self._output_swaps: list[tuple[ir.Value, ir.Value]] = []
        for name in acts:
            value = values[name]
            scale, zero, spec = params[name]
            source = sources.get(name)
            if source is not None and source[1] != 1.0:
                # x * k: x's codes read with the scale times k; the product node is left unread
                codes[name] = codes[source[0].name]
                self._reinterpret(graph, value, codes[name], scale, zero, spec)
            else:
                codes[name] = self._insert_pair(graph, value, scale, zero, spec)
            counts["activations"] += 1
        for value, dequantized in self._output_swaps:  # a quantized model output keeps its name
            name = value.name
            value.name = unique_name(graph, f"{name}_float", self._taken)
            dequantized.name = name
            for index in [i for i, v in enumerate(graph.outputs) if v is value]:
                graph.outputs[index] = dequantized
        report.rewritten = counts["weights"] + counts["activations"]
        report.details = dict(counts)
        if report.rewritten and raise_opset_if_needed(model):
            report.details["opset"] = opset_of(model)
        report.modified = report.rewritten > 0
        for value in values.values():
            value.meta.pop(SPEC_KEY, None)
        for value in graph.initializers.values():
            value.meta.pop(SPEC_KEY, None)
        return report

    @staticmethod
    def _bias_of(node: ir.Node, weight_index: int, params, static_graph: bool) -> tuple[ir.Node, ir.Node, int] | None:
        """(reader, holder, input index) of the float bias that goes int32 with ``node``'s weight:
        a Conv/ConvTranspose/Gemm's own bias, or the bias Add after a MatMul (see the module doc)."""
        if weight_index != 1 or node.inputs[1].meta[SPEC_KEY].granularity == "group":
            return None  # a bias scale s_x * s_w needs one weight scale per output channel
        x = node.inputs[0]
        if x is None or x.name not in params or params[x.name][0].size != 1:
            return None
        if node.op_type == "MatMul":
            return InsertQDQPass._matmul_bias(node, static_graph)
        if node.op_type not in ("Conv", "ConvTranspose", "Gemm") or len(node.inputs) < 3:
            return None
        bias = node.inputs[2]
        if bias is None or bias.const_value is None:
            return None
        if node.op_type == "Gemm" and node.attributes.get_float("beta", 1.0) != 1.0:
            return None
        return node, node, 2

    @staticmethod
    def _matmul_bias(node: ir.Node, static_graph: bool) -> tuple[ir.Node, ir.Node, int] | None:
        """The bias Add after a MatMul that onnxruntime's MatMul+Add fusion makes a Gemm;
        ``static_graph``: :func:`_static_shapes_everywhere` of the graph."""
        x, w, out = node.inputs[0], node.inputs[1], node.outputs[0]
        uses = list(out.uses())
        if len(uses) != 1 or out.is_graph_output() or uses[0].node.op_type != "Add" or w.const_value is None:
            return None
        add, index = uses[0].node, 1 - uses[0].idx
        bias = add.inputs[index]
        # onnxruntime fuses when it knows x's shape: rank 2, static, or every graph input static and
        # no shape depends on input values (then its constant folding resolves all shape arithmetic,
        # which ONNX inference may not)
        if len(w.const_value.shape) != 2 or not (static_graph or (x.shape is not None and (x.shape.rank() == 2 or x.shape.is_static()))):
            return None
        if bias is None or bias.const_value is None or SPEC_KEY in bias.meta or bias.dtype != out.dtype:
            return None
        if tuple(bias.const_value.shape) != (w.const_value.shape[1],):
            return None
        return node, add, index

    @staticmethod
    def _untranspose(node: ir.Node, weight: ir.Value, params) -> bool:
        """A Gemm(transB=1) weight read by this node alone, with a float activation input."""
        return (node.op_type == "Gemm" and node.inputs[1] is weight and bool(node.attributes.get_int("transB", 0))
                and node.inputs[0].name not in params and len(weight.uses()) == 1 and not weight.is_graph_output()
                and weight.const_value.shape.rank() == 2)

    def _quantize_weight(
        self, graph: ir.Graph, node: ir.Node, value: ir.Value, biases: list[tuple[ir.Node, ir.Node, int]], params
    ) -> ir.Value:
        """The weight's DequantizeLinear; ``biases`` (see :meth:`_bias_of`): each float bias becomes
        an int32 one with scale ``s_x * s_w`` of its reader."""
        spec: QuantSpec = value.meta[SPEC_KEY]
        w = value.const_value.numpy()
        shape = value.shape
        if self._untranspose(node, value, params):
            # weight-only Gemm: store W as [K, N] and clear transB, the layout MatMulNBits fusion reads
            w, shape = w.T, ir.Shape(reversed(value.shape.dims))
            spec = spec.replace(axis=1 - spec.axis) if spec.axis is not None else spec
            node.attributes["transB"] = ir.AttrInt64("transB", 0)
        scale, zero, axis = _weight_params(w, spec)
        # per bias: its holder, input index, float values and its reader's input scale s_x
        floats = [(holder, index, holder.inputs[index].const_value.numpy().astype(np.float64).reshape(-1),
                   float(params[reader.inputs[0].name][0].reshape(()))) for reader, holder, index in biases]
        for _, _, b, s_x in floats:
            # enlarge weight scales where the int32 bias would overflow (§11.4)
            need = np.abs(b) / (s_x * _INT32_MAX)
            scale = np.maximum(scale.astype(np.float64), need if axis is not None else need.max()).astype(np.float32)
        q = quantize_array(w, scale, zero, spec, axis)
        block = spec.group_size if spec.granularity == "group" else None
        dq = self._dequantize(graph, value, q, scale, zero.astype(q.dtype), spec.dtype, axis, block, shape)
        for holder, index, b, s_x in floats:
            bias_scale = (s_x * scale.astype(np.float64)).astype(np.float32)
            b_q = np.clip(np.round(b / bias_scale.astype(np.float64)), -_INT32_MAX, _INT32_MAX).astype(np.int32)
            bias_axis = 0 if bias_scale.size > 1 else None
            bias_dq = self._dequantize(graph, holder.inputs[index], b_q, bias_scale, np.zeros_like(bias_scale, np.int32), None, bias_axis)
            holder.replace_input_with(index, bias_dq)
        return dq

    def _dequantize(self, graph, value, q, scale, zero, dtype_name, axis, block_size=None, shape=None) -> ir.Value:
        ir_dtype = _IR_DTYPES[dtype_name] if dtype_name else None
        q_init = add_initializer(graph, f"{value.name}_quantized", q, ir_dtype, taken=self._taken)
        if block_size:  # scale (and zero-point) keep the weight's rank: one entry per block
            inputs = [q_init, add_initializer(graph, f"{value.name}_scale", scale, taken=self._taken)]
            if np.any(zero):  # symmetric: no zero-point input (ONNX's default is 0)
                inputs.append(add_initializer(graph, f"{value.name}_zero_point", zero, ir_dtype, taken=self._taken))
            attrs = {"axis": axis, "block_size": block_size}
        else:
            s_init = add_initializer(graph, f"{value.name}_scale", scale.reshape(-1) if axis is not None else scale.reshape(()), taken=self._taken)
            z_init = add_initializer(graph, f"{value.name}_zero_point", zero.reshape(-1) if axis is not None else zero.reshape(()), ir_dtype, taken=self._taken)
            inputs, attrs = [q_init, s_init, z_init], {"axis": axis} if axis is not None else {}
        dq = ir.node("DequantizeLinear", inputs, attrs, name=unique_name(graph, f"{value.name}_DequantizeLinear", self._taken))
        out = dq.outputs[0]
        out.name, out.dtype, out.shape = unique_name(graph, f"{value.name}_dequantized", self._taken), ir.DataType.FLOAT, shape or value.shape
        graph.insert_before(next(iter(graph)), dq) if len(graph) else graph.append(dq)
        return out

    def _qparam_initializers(self, graph, value: ir.Value, scale, zero, spec: QuantSpec) -> tuple[ir.Value, ir.Value]:
        s_init = add_initializer(graph, f"{value.name}_scale", np.asarray(scale, np.float32).reshape(()), taken=self._taken)
        z_init = add_initializer(graph, f"{value.name}_zero_point", np.asarray(zero).astype(_NP_DTYPES[spec.dtype]).reshape(()), _IR_DTYPES[spec.dtype], taken=self._taken)
        return s_init, z_init

    def _reinterpret(self, graph, value: ir.Value, codes: ir.Value, scale, zero, spec: QuantSpec) -> None:
        """Every reader of ``value`` reads DequantizeLinear(codes) at ``value``'s own scale and zero-point."""
        s_init, z_init = self._qparam_initializers(graph, value, scale, zero, spec)
        self._read_dequantized(graph, value, codes, s_init, z_init, [])

    def _insert_pair(self, graph, value: ir.Value, scale, zero, spec: QuantSpec) -> ir.Value:
        """QuantizeLinear -> DequantizeLinear after ``value``, read by all its readers; returns the codes."""
        s_init, z_init = self._qparam_initializers(graph, value, scale, zero, spec)
        source, extra = value, []
        if spec.restricted:  # fewer levels than the storage type: clip to the representable range first
            lo = float(np.float32(scale) * (spec.qmin - int(zero)))
            hi = float(np.float32(scale) * (spec.qmax - int(zero)))
            lo_v = add_initializer(graph, f"{value.name}_clip_min", np.array(lo, np.float32), taken=self._taken)
            hi_v = add_initializer(graph, f"{value.name}_clip_max", np.array(hi, np.float32), taken=self._taken)
            clip = ir.node("Clip", [value, lo_v, hi_v], name=unique_name(graph, f"{value.name}_Clip", self._taken))
            clip.outputs[0].name, clip.outputs[0].dtype, clip.outputs[0].shape = unique_name(graph, f"{value.name}_clipped", self._taken), value.dtype, value.shape
            source, extra = clip.outputs[0], [clip]
        q = ir.node("QuantizeLinear", [source, s_init, z_init], name=unique_name(graph, f"{value.name}_QuantizeLinear", self._taken))
        q.outputs[0].name, q.outputs[0].dtype, q.outputs[0].shape = unique_name(graph, f"{value.name}_quantized", self._taken), _IR_DTYPES[spec.dtype], value.shape
        self._read_dequantized(graph, value, q.outputs[0], s_init, z_init, [*extra, q])
        return q.outputs[0]

    def _read_dequantized(self, graph, value: ir.Value, codes: ir.Value, s_init, z_init, new_nodes: list[ir.Node]) -> None:
        """Insert ``new_nodes`` and DequantizeLinear(codes) after ``value``'s producer (first in the graph for
        an input); every other reader of ``value`` then reads the DequantizeLinear."""
        users = [(u.node, u.idx) for u in value.uses() if u.node not in new_nodes]
        dq = ir.node("DequantizeLinear", [codes, s_init, z_init], name=unique_name(graph, f"{value.name}_DequantizeLinear", self._taken))
        dq.outputs[0].name, dq.outputs[0].dtype, dq.outputs[0].shape = unique_name(graph, f"{value.name}_dequantized", self._taken), value.dtype, value.shape
        producer = value.producer()
        if producer is None:
            graph.insert_before(next(iter(graph)), [*new_nodes, dq])
        else:
            graph.insert_after(producer, [*new_nodes, dq])
        for user, idx in users:
            user.replace_input_with(idx, dq.outputs[0])
        if value.is_graph_output() and producer is not None:  # the model output becomes the DequantizeLinear's
            # (after the loop, where names key the parameters; a model input passed through stays as it is)
            self._output_swaps.append((value, dq.outputs[0]))
