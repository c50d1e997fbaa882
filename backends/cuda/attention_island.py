"""Attention islands of the CUDA backend: ``softmax(q @ k^T * c (+ mask))`` whose probabilities
are quantized (QuantizeLinear -> DequantizeLinear, per tensor) before ``@ v`` — the form qpass
writes for a W8A8 attention block — run as one fused kernel
(:func:`qpass.backends.cuda.kernels.quantized_attention`), so the score matrix never reaches
memory. Matched from the ``P @ V`` MatMul backwards; every intermediate must have that one
reader."""

from __future__ import annotations

import dataclasses

import onnx_ir as ir

from qpass.backends.cuda.islands import is_tracing, per_tensor_qparams
from qpass.backends.cuda.ops import _torch
from qpass.graph_utils import const_scalar, only_consumer

__all__ = ["QuantizedAttention", "match_attention"]


@dataclasses.dataclass
class QuantizedAttention:
    """Names of q [B, H, M, D], k^T [B, H, D, N], v [B, H, N, D] and the additive mask (or None);
    the score scale and P's quantizer; ``nodes``: the graph nodes it replaces."""

    q: str
    k_t: str
    v: str
    mask: str | None
    sm_scale: float
    p_scale: float
    p_zero: int
    p_lo: int
    p_hi: int
    nodes: tuple[int, ...]

    def __call__(self, env: dict):
        q, k, v = env[self.q], env[self.k_t].transpose(-1, -2), env[self.v]
        mask = env[self.mask] if self.mask is not None else None
        if mask is not None and mask.dtype != q.dtype:
            mask = mask.to(q.dtype)
        args = (self.sm_scale, self.p_scale, self.p_zero, self.p_lo, self.p_hi)
        if is_tracing():
            return _attention_op()(q, k, v, mask, *args)
        return _attention(q, k, v, mask, *args)


def _attention(q, k, v, mask, sm_scale, p_scale, p_zero, p_lo, p_hi):
    from qpass.backends.cuda.kernels import quantized_attention

    out = quantized_attention(q, k, v, mask, sm_scale=sm_scale, p_scale=p_scale, p_zero=p_zero, p_lo=p_lo, p_hi=p_hi)
    return out if out.dtype == q.dtype else out.to(q.dtype)


_ATTENTION_OP: list = []


def _attention_op():
    """``qpass::quantized_attention`` as an opaque op for traced programs."""
    if not _ATTENTION_OP:
        torch = _torch()
        schema = ("(Tensor q, Tensor k, Tensor v, Tensor? mask, float sm_scale, float p_scale, int p_zero, "
                  "int p_lo, int p_hi) -> Tensor")

        @torch.library.custom_op("qpass::quantized_attention", mutates_args=(), schema=schema)
        def quantized_attention_op(q, k, v, mask, sm_scale, p_scale, p_zero, p_lo, p_hi):
            return _attention(q, k, v, mask, sm_scale, p_scale, p_zero, p_lo, p_hi)

        @quantized_attention_op.register_fake
        def _(q, k, v, mask, sm_scale, p_scale, p_zero, p_lo, p_hi):
            return q.new_empty((*q.shape[:-1], v.shape[-1]))

        _ATTENTION_OP.append(quantized_attention_op)
    return _ATTENTION_OP[0]


def _rank(value: ir.Value) -> int | None:
    return value.shape.rank() if value.shape is not None else None


def match_attention(pv: ir.Node) -> QuantizedAttention | None:
    """``MatMul(DQ(Q(Softmax([Add(mask,] Div|Mul(MatMul(q, k^T), c)))), v)`` with per-tensor
    8-bit P parameters and 4-D q, k^T, v; else None."""
    if pv.op_type != "MatMul" or len(pv.inputs) != 2:
        return None
    dq = pv.inputs[0].producer()
    if dq is None or dq.op_type != "DequantizeLinear" or only_consumer(dq.outputs[0]) is not pv:
        return None
    quant = dq.inputs[0].producer()
    if quant is None or quant.op_type != "QuantizeLinear" or only_consumer(quant.outputs[0]) is not dq:
        return None
    p_params = per_tensor_qparams(dq)
    if p_params is None or p_params != per_tensor_qparams(quant):
        return None
    softmax = quant.inputs[0].producer()
    if softmax is None or softmax.op_type != "Softmax" or only_consumer(softmax.outputs[0]) is not quant:
        return None
    if softmax.attributes.get_int("axis", -1) not in (-1, 3) or _rank(softmax.outputs[0]) != 4:
        return None
    nodes, value, mask, sm_scale = [pv, dq, quant, softmax], softmax.inputs[0], None, 1.0
    node = value.producer()
    if node is not None and node.op_type == "Add" and only_consumer(value) is softmax:
        a, b = node.inputs
        scores, mask = (a, b) if a.producer() is not None and a.producer().op_type in ("Div", "Mul", "MatMul") else (b, a)
        if mask is None or _rank(mask) is None or _rank(mask) > 4 or mask.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16):
            return None
        nodes.append(node)
        value, node = scores, scores.producer()
    if node is not None and node.op_type in ("Div", "Mul") and only_consumer(value) is not None:
        c = const_scalar(node.inputs[1])
        if c is None or c == 0:
            return None
        sm_scale = 1.0 / c if node.op_type == "Div" else c
        nodes.append(node)
        value, node = node.inputs[0], node.inputs[0].producer()
    if node is None or node.op_type != "MatMul" or only_consumer(value) is None:
        return None
    nodes.append(node)
    q, k_t, v = node.inputs[0], node.inputs[1], pv.inputs[1]
    if _rank(q) != 4 or _rank(k_t) != 4 or _rank(v) != 4:
        return None
    qs, ks, vs = list(q.shape), list(k_t.shape), list(v.shape)  # [B, H, M, D], [B, H, D, N], [B, H, N, D]
    if not (qs[:2] == ks[:2] == vs[:2] and qs[3] == ks[2] == vs[3] and ks[3] == vs[2]):
        return None  # broadcast heads (grouped-query attention) or a different value width: left op by op
    return QuantizedAttention(q.name, k_t.name, v.name, mask.name if mask is not None else None, float(sm_scale),
                              *p_params, tuple(id(n) for n in nodes))
