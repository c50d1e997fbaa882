"""Lower a QDQ model to QOperator form: integer ONNX ops in place of DQ -> op -> Q islands.

Matches:   islands of 8-bit QuantizeLinear/DequantizeLinear (per-tensor activations, constant
           scales and zero points) around
           1. Conv:   DQ(x), DQ(W, per tensor or per output channel) [, DQ(int32 bias)] -> Conv -> Q
           2. MatMul: DQ(a), DQ(b, per tensor, or per column when constant 2-D) -> MatMul -> Q
           3. MatMul whose output is read in float, Gemm (transA=0, alpha=beta=1): DQ(a), DQ(b)
           4. DQ -> Add / Mul / Sigmoid / LeakyRelu / Concat / AveragePool / GlobalAveragePool -> Q
Rewrites:  1 -> QLinearConv (int32 bias), 2 -> QLinearMatMul: they write the Q's output. A Relu
           or Clip between the op and its Q is dropped where the Q's range already clips it.
           3 stays QDQ by default (onnxruntime fuses it into MatMulIntegerToFloat / QGemm, faster
           than MatMulInteger -> Cast -> Mul); ``matmul_integer`` lowers it to MatMulInteger ->
           Cast -> Mul(s_a * s_b) [-> Add(bias)], Gemm's transposed weight stored as [K, N];
           ``contrib_ops`` to com.microsoft MatMulIntegerToFloat / QGemm.
           4 -> com.microsoft QLinear* ops, only with ``contrib_ops``.
           The Q feeding an island stays; a DQ left without readers is removed, with the
           initializers only it read. Everything else (float ops, other QDQ) is kept.
Preserves: the integer function of the QDQ model as onnxruntime runs it (same codes, up to
           1-LSB differences where a requantization rounds differently). Default-domain ops
           only, unless ``contrib_ops``. The input model is not modified.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter

import numpy as np
import onnx_ir as ir

from qpass.graph_utils import add_initializer, const_array, const_scalar, is_op, only_consumer, replace_subgraph, unique_name, used_names

__all__ = ["to_qoperator"]

logger = logging.getLogger(__name__)

_MS = "com.microsoft"
_U8, _I8 = ir.DataType.UINT8, ir.DataType.INT8
# (activation, weight/b, output) dtypes onnxruntime's CPU kernels accept for QLinearConv / QLinearMatMul
_QLINEAR_TYPES = {(_U8, _I8, _U8), (_U8, _U8, _U8), (_I8, _I8, _I8)}
_CONTRIB_OPS = {
    "Add": "QLinearAdd", "Mul": "QLinearMul", "Sigmoid": "QLinearSigmoid", "LeakyRelu": "QLinearLeakyRelu",
    "Concat": "QLinearConcat", "AveragePool": "QLinearAveragePool", "GlobalAveragePool": "QLinearGlobalAveragePool",
}


@dataclasses.dataclass
class _Q:
    """An 8-bit integer tensor with its constant scale and zero point."""

    codes: ir.Value
    scale: ir.Value
    zero: ir.Value
    axis: int | None  # None: per tensor

    @property
    def dtype(self) -> ir.DataType:
        return _U8 if self.zero_array().dtype == np.uint8 else _I8

    def scale_array(self) -> np.ndarray:
        return const_array(self.scale).astype(np.float32)

    def zero_array(self) -> np.ndarray:
        return const_array(self.zero)


def _qparams(node: ir.Node) -> _Q | None:
    """Codes, scale and zero point of a QuantizeLinear/DequantizeLinear (8-bit, constant parameters)."""
    if len(node.inputs) < 3 or node.inputs[2] is None or node.attributes.get_int("block_size", 0):
        return None
    codes = node.inputs[0] if node.op_type == "DequantizeLinear" else node.outputs[0]
    scale, zero = const_array(node.inputs[1]), const_array(node.inputs[2])
    if scale is None or zero is None or zero.dtype not in (np.uint8, np.int8) or scale.shape != zero.shape:
        return None
    axis = node.attributes.get_int("axis", 1) if scale.size > 1 else None
    return _Q(codes, node.inputs[1], node.inputs[2], axis)


def _dequantized(value: ir.Value | None, *, channel_axis: int | None = None, rank: int | None = None) -> _Q | None:
    """The integer tensor behind ``value = DequantizeLinear(...)``: per tensor, or (when
    ``channel_axis`` is given) per channel along that axis of a constant tensor of ``rank``."""
    node = value.producer() if value is not None else None
    if not is_op(node, "DequantizeLinear"):
        return None
    q = _qparams(node)
    if q is None or q.axis is None:
        return q
    codes = const_array(q.codes)
    if channel_axis is None or codes is None or (rank is not None and codes.ndim != rank):
        return None
    if q.axis % codes.ndim != channel_axis or q.scale_array().size != codes.shape[channel_axis]:
        return None
    return q


def _requantized(value: ir.Value) -> tuple[ir.Node, _Q, list[ir.Node]] | None:
    """The per-tensor QuantizeLinear that alone reads ``value``, possibly through a Relu/Clip it makes redundant."""
    user, dropped = only_consumer(value), []
    if is_op(user, "Relu", "Clip"):
        dropped, user = [user], only_consumer(user.outputs[0])
    if not is_op(user, "QuantizeLinear"):
        return None
    q = _qparams(user)
    if q is None or q.axis is not None:
        return None
    if dropped and not _clip_is_redundant(dropped[0], q):
        return None
    return user, q, dropped


def _clip_is_redundant(node: ir.Node, q: _Q) -> bool:
    """Q(clip(x)) == Q(x) for every x: the clip bounds lie outside Q's representable range."""
    info = np.iinfo(np.uint8 if q.dtype == _U8 else np.int8)
    scale, zero = float(q.scale_array().reshape(-1)[0]), int(q.zero_array().reshape(-1)[0])
    lo, hi = (info.min - zero) * scale, (info.max - zero) * scale
    if node.op_type == "Relu":
        return lo >= 0.0
    bounds = [node.inputs[i] if len(node.inputs) > i else None for i in (1, 2)]
    low, high = (const_scalar(v) if v is not None else default for v, default in zip(bounds, (-np.inf, np.inf)))
    return low is not None and high is not None and low <= lo and high >= hi


class _Lowering:
    def __init__(self, model: ir.Model, contrib_ops: bool, matmul_integer: bool):
        self.model, self.graph = model, model.graph
        self.contrib_ops, self.matmul_integer = contrib_ops, matmul_integer
        self.taken = used_names(model.graph)
        self.counts: Counter = Counter()

    def run(self) -> None:
        for node in list(self.graph):
            if node.graph is not self.graph or node.domain not in ("", "ai.onnx"):
                continue  # removed by an earlier rewrite, or not an ONNX op
            rewrite = {"Conv": self._conv, "MatMul": self._matmul, "Gemm": self._gemm}.get(node.op_type)
            if rewrite is None and self.contrib_ops and node.op_type in _CONTRIB_OPS:
                rewrite = self._contrib
            if rewrite is None:
                continue
            if rewrite(node):
                self.counts[node.op_type] += 1
            elif any(is_op(v.producer(), "DequantizeLinear") for v in node.inputs if v is not None):
                self.counts[f"{node.op_type} kept in QDQ"] += 1
        self._remove_unused_dequantize()
        if any(n.domain == _MS for n in self.graph):
            self.model.opset_imports.setdefault(_MS, 1)

    # --- islands with a Q after them: the integer op writes the Q's output ---------------------

    def _conv(self, node: ir.Node) -> bool:
        x = _dequantized(node.inputs[0])
        w = _dequantized(node.inputs[1], channel_axis=0)
        out = _requantized(node.outputs[0])
        if x is None or w is None or out is None or const_array(w.codes) is None:
            return False
        q_node, y, dropped = out
        if (x.dtype, w.dtype, y.dtype) not in _QLINEAR_TYPES:
            return False
        inputs = [x.codes, x.scale, x.zero, w.codes, w.scale, w.zero, y.scale, y.zero]
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            bias = self._int32_bias(node.inputs[2], x.scale_array() * w.scale_array())
            if bias is None:
                return False
            inputs.append(bias)
        new = ir.node("QLinearConv", inputs, _attributes(node), name=node.name)
        self._replace([node, *dropped, q_node], [new], q_node.outputs[0], new.outputs[0])
        return True

    def _matmul(self, node: ir.Node) -> bool:
        a = _dequantized(node.inputs[0])
        b = _dequantized(node.inputs[1], channel_axis=1, rank=2)
        if a is None or b is None:
            return False
        out = _requantized(node.outputs[0])
        if out is not None and (a.dtype, b.dtype, out[1].dtype) in _QLINEAR_TYPES:
            q_node, y, dropped = out
            inputs = [a.codes, a.scale, a.zero, b.codes, b.scale, b.zero, y.scale, y.zero]
            new = ir.node("QLinearMatMul", inputs, name=node.name)
            self._replace([node, *dropped, q_node], [new], q_node.outputs[0], new.outputs[0])
            return True
        if self.contrib_ops:
            inputs = [a.codes, b.codes, a.scale, b.scale, a.zero, b.zero]
            old, old_out = [node], node.outputs[0]
            bias_add = self._bias_add(node, b)
            if bias_add is not None:  # the Add of a bias (int32 through a DQ, or float) joins as the bias input
                add, bias = bias_add
                inputs.append(bias)
                old, old_out = [node, add], add.outputs[0]
            new = ir.node("MatMulIntegerToFloat", inputs, domain=_MS, name=node.name)
            self._replace(old, [new], old_out, new.outputs[0])
            return True
        return self.matmul_integer and self._integer_matmul(node, a, b, b.codes, None)

    def _gemm(self, node: ir.Node) -> bool:
        attrs = node.attributes
        if attrs.get_int("transA", 0) or attrs.get_float("alpha", 1.0) != 1.0 or attrs.get_float("beta", 1.0) != 1.0:
            return False
        trans_b = bool(attrs.get_int("transB", 0))
        a = _dequantized(node.inputs[0])
        b = _dequantized(node.inputs[1], channel_axis=int(not trans_b), rank=2)
        if a is None or b is None or (trans_b and const_array(b.codes) is None):
            return False
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        if self.contrib_ops:
            return self._qgemm(node, a, b, bias, trans_b)
        if not self.matmul_integer:
            return False
        if bias is not None:
            bias = self._float_bias(bias)
            if bias is None:
                return False
        codes = b.codes
        if trans_b:
            codes = add_initializer(self.graph, f"{b.codes.name}_t", const_array(b.codes).T, b.dtype, taken=self.taken)
        return self._integer_matmul(node, a, b, codes, bias)

    # --- float-output islands: MatMulInteger -> Cast -> Mul(s_a * s_b) [-> Add(bias)] ------------

    def _integer_matmul(self, node: ir.Node, a: _Q, b: _Q, b_codes: ir.Value, bias: ir.Value | None) -> bool:
        inputs = [a.codes, b_codes, a.zero]
        if np.any(b.zero_array() != 0):
            inputs.append(b.zero)
        out = node.outputs[0]
        base = node.name or out.name
        scale = add_initializer(self.graph, f"{base}_scale", a.scale_array() * b.scale_array(), taken=self.taken)
        mm = ir.node("MatMulInteger", inputs, name=base)
        cast = ir.node("Cast", [mm.outputs[0]], {"to": ir.DataType.FLOAT}, name=f"{base}_cast")
        mul = ir.node("Mul", [cast.outputs[0], scale], name=f"{base}_scale")
        new = [mm, cast, mul]
        if bias is not None:
            new.append(ir.node("Add", [mul.outputs[0], bias], name=f"{base}_bias"))
        for n, dtype in zip(new[:-1], (ir.DataType.INT32, ir.DataType.FLOAT, ir.DataType.FLOAT)):
            n.outputs[0].name = unique_name(self.graph, f"{out.name}_{n.op_type.lower()}", self.taken)
            n.outputs[0].dtype, n.outputs[0].shape = dtype, out.shape
        self._replace([node], new, out, new[-1].outputs[0])
        return True

    def _qgemm(self, node: ir.Node, a: _Q, b: _Q, bias: ir.Value | None, trans_b: bool) -> bool:
        """com.microsoft QGemm: int32 bias, requantized output when a Q follows, else float."""
        if (a.dtype, b.dtype, a.dtype) not in _QLINEAR_TYPES:
            return False
        if bias is not None:
            bias = self._int32_bias(bias, a.scale_array() * b.scale_array())
            if bias is None:
                return False
        out = _requantized(node.outputs[0])
        if out is not None and out[1].dtype != a.dtype:
            out = None
        inputs = [a.codes, a.scale, a.zero, b.codes, b.scale, b.zero, bias]
        old, old_out = [node], node.outputs[0]
        if out is not None:
            q_node, y, dropped = out
            inputs += [y.scale, y.zero]
            old, old_out = [node, *dropped, q_node], q_node.outputs[0]
        new = ir.node("QGemm", inputs, {"transB": int(trans_b)}, domain=_MS, name=node.name)
        self._replace(old, [new], old_out, new.outputs[0])
        return True

    # --- com.microsoft element-wise, concat and pooling ops ----------------------------------

    def _contrib(self, node: ir.Node) -> bool:
        xs = [_dequantized(v) for v in node.inputs]
        out = _requantized(node.outputs[0])
        if not xs or any(x is None for x in xs) or out is None or out[2]:
            return False
        q_node, y, _ = out
        if any(x.dtype != y.dtype for x in xs):
            return False
        attrs = _attributes(node)
        if node.op_type == "Concat":
            inputs = [y.scale, y.zero] + [v for x in xs for v in (x.codes, x.scale, x.zero)]
        else:
            dilations = attrs.pop("dilations", None)
            if dilations is not None and any(d != 1 for d in dilations.value):
                return False
            inputs = [v for x in xs for v in (x.codes, x.scale, x.zero)] + [y.scale, y.zero]
        new = ir.node(_CONTRIB_OPS[node.op_type], inputs, attrs, domain=_MS, name=node.name)
        self._replace([node, q_node], [new], q_node.outputs[0], new.outputs[0])
        return True

    # --- helpers ----------------------------------------------------------------------------------

    def _int32_bias(self, value: ir.Value, expected_scale: np.ndarray) -> ir.Value | None:
        """The int32 codes of a bias DQ whose scale is s_x * s_w (as QLinearConv assumes)."""
        node = value.producer()
        if not is_op(node, "DequantizeLinear") or node.inputs[0].const_value is None:
            return None
        codes = node.inputs[0]
        scale = const_array(node.inputs[1])
        zero = const_array(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else np.zeros(1, np.int32)
        if codes.dtype != ir.DataType.INT32 or scale is None or zero is None or np.any(zero != 0):
            return None
        try:
            same = np.allclose(*np.broadcast_arrays(scale, expected_scale), rtol=1e-5, atol=0)
        except ValueError:  # shapes that do not broadcast
            return None
        return codes if same else None

    def _bias_add(self, node: ir.Node, b: _Q) -> tuple[ir.Node, ir.Value] | None:
        """The one Add after MatMul ``node`` with a constant [N] bias, and that bias in float."""
        out = node.outputs[0]
        uses = list(out.uses())
        if len(uses) != 1 or out.is_graph_output() or not is_op(uses[0].node, "Add"):
            return None
        add, source = uses[0].node, uses[0].node.inputs[1 - uses[0].idx]
        weight = const_array(b.codes)
        if weight is None or source is None or source.shape is None or tuple(source.shape) != (weight.shape[1],):
            return None
        bias = self._float_bias(source)
        return None if bias is None else (add, bias)

    def _float_bias(self, value: ir.Value) -> ir.Value | None:
        """A constant float bias, dequantized here when it is read through a DQ."""
        if value.const_value is not None:
            return value
        node = value.producer()
        if not is_op(node, "DequantizeLinear"):
            return None
        codes, scale = const_array(node.inputs[0]), const_array(node.inputs[1])
        zero = const_array(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else 0
        if codes is None or scale is None or zero is None:
            return None
        floats = (codes.astype(np.int64) - zero).astype(np.float32) * scale.astype(np.float32)
        return add_initializer(self.graph, f"{value.name}_float", floats, taken=self.taken)

    def _replace(self, old: list[ir.Node], new: list[ir.Node], old_out: ir.Value, new_out: ir.Value) -> None:
        replace_subgraph(self.graph, old, new, old_out, new_out)
        for value in (v for n in old for v in n.inputs if v is not None):
            self._maybe_drop_initializer(value)

    def _maybe_drop_initializer(self, value: ir.Value) -> None:
        if self.graph.initializers.get(value.name) is value and not value.uses() and not value.is_graph_output() \
                and value not in self.graph.inputs:
            self.graph.initializers.pop(value.name)

    def _remove_unused_dequantize(self) -> None:
        for node in reversed(list(self.graph)):
            if is_op(node, "DequantizeLinear") and not node.outputs[0].uses() and not node.outputs[0].is_graph_output():
                inputs = [v for v in node.inputs if v is not None]
                self.graph.remove(node, safe=True)
                for value in inputs:
                    self._maybe_drop_initializer(value)
                self.counts["DequantizeLinear removed"] += 1


def _attributes(node: ir.Node) -> dict[str, ir.Attr]:
    return {name: ir.Attr(name, attr.type, attr.value) for name, attr in node.attributes.items()}


def to_qoperator(model: ir.Model, *, contrib_ops: bool = False, matmul_integer: bool = False) -> ir.Model:
    """A copy of the QDQ ``model`` with its quantized islands as integer operators (see module doc).

    contrib_ops: also use onnxruntime's ``com.microsoft`` ops: QLinearAdd/Mul/Sigmoid/LeakyRelu/
    Concat/AveragePool/GlobalAveragePool, QGemm, MatMulIntegerToFloat (off: default domain only).
    matmul_integer: lower MatMul/Gemm islands that QLinearMatMul cannot express (float output,
    Gemm bias) to MatMulInteger -> Cast -> Mul [-> Add] instead of leaving them in QDQ.
    """
    model = model.clone()
    lowering = _Lowering(model, contrib_ops, matmul_integer)
    lowering.run()
    logger.info("qoperator: %s", ", ".join(f"{k} {v}" for k, v in sorted(lowering.counts.items())) or "nothing to lower")
    return model
