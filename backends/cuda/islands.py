"""Integer islands of the CUDA backend: the quantized Linear/Conv GEMM (W8A8) and the
weight-only int4 GEMM (W4A16), their matchers on the ONNX graph, and the custom torch ops a
traced program calls them through (``qpass::int8_linear``, ``qpass::w4a16_linear``)."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import numpy as np
import onnx_ir as ir
from qpass.backends.cuda.ops import _torch

from qpass.errors import PipelineError
from qpass.graph_utils import const_array
from qpass.schemes import INT_RANGES

__all__ = ["QuantizedLinear", "WeightOnlyLinear", "match_island", "match_weight_only", "conv_island", "tracing", "is_tracing",
           "per_tensor_qparams"]

_const = const_array


@dataclasses.dataclass
class QuantizedLinear:
    """One integer GEMM island: y = dequant(quant(x) @ Wq) (+ bias), x in float."""

    x_scale: float
    x_zero: int
    x_unsigned: bool
    w_t: Any  # torch int8 [N, K]
    w_scale: Any  # torch float32 [N] or [1]
    col_sum: Any  # torch int32 [N]: sum_k Wq[n, k] (zero-point correction)
    bias: Any | None  # torch float32 [N]
    fused: tuple | None = None  # GPU: (scale [N], bias [N]) for the kernel's epilogue
    activation: str | None = None  # fused: "relu" | "gelu" | "gelu_tanh" after the bias
    requant: tuple[float, int] | None = None  # fused: int8 codes out, (scale, zero - shift) of the next Q

    def quantize(self, x2d):
        """int8 codes of ``x2d`` (unsigned activations shifted by -128)."""
        torch = _torch()
        shift = 128 if self.x_unsigned else 0
        lo, hi = (0, 255) if self.x_unsigned else (-128, 127)
        if self.fused is not None and x2d.is_cuda and not _TRACING:  # one kernel; the int8 shift rides on the zero-point
            return torch.quantize_per_tensor(x2d.float(), self.x_scale, self.x_zero - shift, torch.qint8).int_repr()
        # exact: round half to even of x / scale, as ONNX (traced: fused into the producer)
        return (torch.round(x2d.float() / self.x_scale) + self.x_zero).clamp(lo, hi).sub(shift).to(torch.int8)

    def __call__(self, x2d, out_dtype=None):
        """y = dequant(quantize(x2d) @ Wq) (+ bias); ``x2d`` may already be int8 codes."""
        torch = _torch()
        a = x2d if x2d.dtype == torch.int8 else self.quantize(x2d)
        out_dtype = out_dtype or (torch.float32 if x2d.dtype == torch.int8 else x2d.dtype)
        if self.fused is not None and _TRACING:
            act = self.activation or ""
            out_scale, out_zero = self.requant or (1.0, 0)
            return _linear_op()(a, self.w_t, self.fused[0], self.fused[1], torch.int8 if self.requant else out_dtype, act, out_scale, out_zero)
        if self.fused is not None and a.is_cuda:
            from qpass.backends.cuda.kernels import int8_gemm

            scale, bias = self.fused
            return int8_gemm(a, self.w_t, b_scale=scale, bias=bias, out_dtype=out_dtype, requant=self.requant, activation=self.activation)
        shift = 128 if self.x_unsigned else 0
        acc = _int8_gemm(a, self.w_t)
        correction = shift - self.x_zero
        if correction:
            acc = acc + correction * self.col_sum
        y = acc.float() * (self.x_scale * self.w_scale)
        y = y + self.bias if self.bias is not None else y
        return y if out_dtype == torch.float32 else y.to(out_dtype)

    def fuse(self) -> None:
        """Fold the zero-point correction into the bias: (acc + c*colsum)*s + b = acc*s + (b + c*colsum*s)."""
        scale = (self.x_scale * self.w_scale.double()).expand(self.w_t.shape[0])
        bias = (128 if self.x_unsigned else 0) - self.x_zero
        bias = bias * self.col_sum.double() * scale
        if self.bias is not None:
            bias = bias + self.bias.double()
        self.fused = (scale.float().contiguous(), bias.float().contiguous())


@dataclasses.dataclass
class WeightOnlyLinear:
    """A W4A16 island on the GPU: y = x @ (q * s) (+ bias), int4 codes packed two per byte
    ([N, K/2], K-major) with one scale per output channel and group of K. Decode shapes
    (M <= 16) run the Triton W4A16 kernel; larger M dequantizes the weight to float16 and
    uses a dense GEMM, which is faster there (kernels/w4a16_gemm.py)."""

    w_packed: Any  # uint8 [N, K // 2]
    scales: Any  # float32 [N, K // group]
    bias: Any | None  # float32 [N]
    group: int

    def __call__(self, x2d, out_dtype=None):
        out_dtype = out_dtype or x2d.dtype
        if _TRACING:
            y = _weight_only_op()(x2d.half(), self.w_packed, self.scales, self.bias, self.group)
        else:
            y = _weight_only_gemm(x2d.half(), self.w_packed, self.scales, self.bias, self.group)
        return y if y.dtype == out_dtype else y.to(out_dtype)


def _weight_only_gemm(x, w_packed, scales, bias, group):
    torch = _torch()
    from qpass.backends.cuda.kernels import unpack_int4, w4a16_gemm

    if x.shape[0] <= 16:
        return w4a16_gemm(x, w_packed, scales, bias, group)
    w = (unpack_int4(w_packed).to(torch.float16).view(w_packed.shape[0], -1, group) * scales.half()[:, :, None]).view(w_packed.shape[0], -1)
    y = x @ w.t()
    return y + bias.half() if bias is not None else y


_WEIGHT_ONLY_OP: list = []


def _weight_only_op():
    """``qpass::w4a16_linear``: the weight-only GEMM as an opaque op for traced programs."""
    if not _WEIGHT_ONLY_OP:
        torch = _torch()

        @torch.library.custom_op("qpass::w4a16_linear", mutates_args=(),
                                 schema="(Tensor x, Tensor w_packed, Tensor scales, Tensor? bias, int group) -> Tensor")
        def w4a16_linear(x, w_packed, scales, bias, group):
            return _weight_only_gemm(x, w_packed, scales, bias, group)

        @w4a16_linear.register_fake
        def _(x, w_packed, scales, bias, group):
            return x.new_empty((x.shape[0], w_packed.shape[0]), dtype=torch.float16)

        _WEIGHT_ONLY_OP.append(w4a16_linear)
    return _WEIGHT_ONLY_OP[0]


def match_weight_only(node: ir.Node, device) -> WeightOnlyLinear | None:
    """MatMul / Gemm(transB=0) reading DequantizeLinear(int4 [K, N], scale [K/G, N], axis=0,
    block_size=G) with no zero-point, K a multiple of G and G a power of two >= 32."""
    torch = _torch()
    if node.op_type not in ("MatMul", "Gemm") or len(node.inputs) < 2:
        return None
    if node.op_type == "Gemm" and (node.attributes.get_int("transA", 0) or node.attributes.get_int("transB", 0)
                                   or node.attributes.get_float("alpha", 1.0) != 1.0 or node.attributes.get_float("beta", 1.0) != 1.0):
        return None
    x_producer, dq = node.inputs[0].producer(), node.inputs[1].producer()
    if x_producer is not None and x_producer.op_type == "DequantizeLinear":  # quantized activations: not weight-only
        return None
    if dq is None or dq.op_type != "DequantizeLinear" or (len(dq.inputs) > 2 and dq.inputs[2] is not None):
        return None
    group, data = dq.attributes.get_int("block_size", 0), dq.inputs[0].const_value
    scale = _const(dq.inputs[1])
    if not group or data is None or data.dtype != ir.DataType.INT4 or scale is None or len(data.shape) != 2:
        return None
    k, n = data.shape
    # the kernel's K tiles hold whole groups: K a multiple of 128, groups of 32, 64 or 128
    if dq.attributes.get_int("axis", 1) % 2 != 0 or k % 128 or group not in (32, 64, 128) or scale.shape != (k // group, n):
        return None
    from qpass.backends.cuda.kernels import pack_int4

    bias = None
    if node.op_type == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None:
        bias = _const(node.inputs[2])
        if bias is None or bias.size != n:
            return None
        bias = torch.from_numpy(bias.astype(np.float32).reshape(-1)).to(device)
    q_t = np.ascontiguousarray(data.numpy().astype(np.int8).T)  # [N, K]
    return WeightOnlyLinear(
        w_packed=torch.from_numpy(pack_int4(q_t)).to(device),
        scales=torch.from_numpy(np.ascontiguousarray(scale.astype(np.float32).T)).to(device),
        bias=bias, group=group,
    )


def per_tensor_qparams(node: ir.Node) -> tuple[float, int, int, int] | None:
    """(scale, zero-point, q_min, q_max) of a QuantizeLinear/DequantizeLinear with constant
    per-tensor 8-bit parameters (no zero-point input: uint8 zero, as ONNX); else None."""
    scale = _const(node.inputs[1])
    zero = _const(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else np.zeros((), np.uint8)
    if scale is None or zero is None or scale.size != 1 or zero.size != 1 or zero.dtype not in (np.uint8, np.int8):
        return None
    lo, hi = INT_RANGES[zero.dtype.name]
    return float(scale.reshape(())), int(zero.reshape(())), lo, hi


_TRACING = False  # True while a program is traced: plain torch ops and the custom GEMM ops


@contextlib.contextmanager
def tracing():
    """Within: islands quantize with plain torch ops and call the custom GEMM ops (traceable)."""
    global _TRACING
    _TRACING = True
    try:
        yield
    finally:
        _TRACING = False


def is_tracing() -> bool:
    return _TRACING

_LINEAR_OP: list = []


def _linear_op():
    """``qpass::int8_linear(a, w_t, scale, bias, out_dtype)``: the fused-epilogue GEMM as an
    opaque torch op, so a traced program keeps it whole while the compiler fuses around it."""
    if not _LINEAR_OP:
        torch = _torch()

        schema = ("(Tensor a, Tensor w_t, Tensor scale, Tensor bias, ScalarType out_dtype, str activation, "
                  "float out_scale, int out_zero) -> Tensor")

        @torch.library.custom_op("qpass::int8_linear", mutates_args=(), schema=schema)
        def int8_linear(a, w_t, scale, bias, out_dtype, activation, out_scale, out_zero):
            from qpass.backends.cuda.kernels import int8_gemm

            requant = (out_scale, out_zero) if out_dtype == torch.int8 else None
            return int8_gemm(a, w_t, b_scale=scale, bias=bias, out_dtype=out_dtype, requant=requant, activation=activation or None)

        @int8_linear.register_fake
        def _(a, w_t, scale, bias, out_dtype, activation, out_scale, out_zero):
            return a.new_empty((a.shape[0], w_t.shape[0]), dtype=out_dtype)

        _LINEAR_OP.append(int8_linear)
    return _LINEAR_OP[0]


def _int8_gemm(a, w_t):
    """int8 [M, K] x int8 [N, K]^T -> int32 [M, N]."""
    torch = _torch()
    if a.is_cuda:
        try:
            from qpass.backends.cuda.kernels import int8_gemm

            return int8_gemm(a, w_t, out_dtype=torch.int32)
        except (ImportError, TypeError):
            if a.shape[0] > 16:
                return torch._int_mm(a, w_t.t())
            return (a.float() @ w_t.t().float()).to(torch.int32)  # exact below 2^24
    return a.to(torch.int32) @ w_t.t().to(torch.int32)


def _dq_params(node: ir.Node | None):
    if node is None or node.op_type != "DequantizeLinear":
        return None
    data, scale = _const(node.inputs[0]), _const(node.inputs[1])
    zero = _const(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
    return data, scale, zero


def constant_bias(value: ir.Value | None) -> np.ndarray | None:
    """A constant bias in float32: an initializer, or constant int32 codes through a
    DequantizeLinear (as onnxruntime computes it: float32(code - zero) * scale)."""
    dq = _dq_params(value.producer()) if value is not None else None
    if dq is not None and dq[0] is not None and dq[1] is not None:
        codes, scale, zero = dq
        return (codes.astype(np.int64) - (0 if zero is None else zero)).astype(np.float32) * scale.astype(np.float32)
    return _const(value)


def match_island(node: ir.Node, device) -> QuantizedLinear | None:
    torch = _torch()
    if node.op_type not in ("MatMul", "Gemm", "Conv") or len(node.inputs) < 2:
        return None
    if node.op_type == "Gemm" and (node.attributes.get_int("transA", 0) or node.attributes.get_float("alpha", 1.0) != 1.0):
        return None
    if node.op_type == "Conv" and node.attributes.get_int("group", 1) != 1:
        return None
    x_dq, w_dq = node.inputs[0].producer(), node.inputs[1].producer()
    if x_dq is None or x_dq.op_type != "DequantizeLinear" or x_dq.inputs[0].producer() is None or x_dq.inputs[0].producer().op_type != "QuantizeLinear":
        return None
    w = _dq_params(w_dq)
    # the island quantizes x itself with the DQ's parameters: the Q must use the same ones
    x_params = per_tensor_qparams(x_dq)  # constant, per tensor, 8-bit: what the integer kernels take
    if w is None or w[0] is None or w[0].dtype != np.int8 or x_params is None or x_params != per_tensor_qparams(x_dq.inputs[0].producer()):
        return None
    wq, w_scale, _ = w
    if w_dq.attributes.get_int("block_size", 0):
        return None  # group-wise int8 weights run op by op
    n_axis = 1  # the weight axis that holds the N output channels
    if node.op_type == "MatMul":
        if wq.ndim != 2:
            return None
        w_t = wq.T  # [N, K]
    elif node.op_type == "Gemm":
        n_axis = 0 if node.attributes.get_int("transB", 0) else 1
        w_t = wq if n_axis == 0 else wq.T
    else:
        n_axis = 0
        w_t = wq.reshape(wq.shape[0], -1)  # [C_out, C_in*kh*kw]
    if w_scale is None or (w_scale.size != 1 and (w_scale.size != w_t.shape[0] or w_dq.attributes.get_int("axis", 1) % wq.ndim != n_axis)):
        return None  # per-channel scales along another axis run op by op
    bias = None
    if node.op_type in ("Gemm", "Conv") and len(node.inputs) > 2 and node.inputs[2] is not None:
        bias = constant_bias(node.inputs[2])
        if bias is None:
            return None
        if node.op_type == "Gemm" and node.attributes.get_float("beta", 1.0) != 1.0:
            return None
    x_scale, x_zero, x_lo, _ = x_params
    return QuantizedLinear(
        x_scale=x_scale,
        x_zero=x_zero,
        x_unsigned=x_lo == 0,
        w_t=torch.from_numpy(np.ascontiguousarray(w_t)).to(device),
        w_scale=torch.from_numpy(w_scale.astype(np.float32).reshape(-1)).to(device),
        col_sum=torch.from_numpy(w_t.astype(np.int32).sum(axis=1)).to(device),
        bias=torch.from_numpy(bias.astype(np.float32).reshape(-1)).to(device) if bias is not None else None,
    )


def conv_island(node: ir.Node, island: QuantizedLinear, x):
    torch = _torch()
    w_shape = node.inputs[1].producer().inputs[0].const_value.shape
    kernel = tuple(w_shape[2:])
    strides = tuple(node.attributes.get_ints("strides", [1] * len(kernel)))
    dil = tuple(node.attributes.get_ints("dilations", [1] * len(kernel)))
    pads = node.attributes.get_ints("pads", [0] * 2 * len(kernel))
    if len(kernel) != 2 or pads[0] != pads[2] or pads[1] != pads[3] or node.attributes.get_string("auto_pad", "NOTSET") != "NOTSET":
        raise PipelineError(f"the CUDA backend lowers 2-D Convs with symmetric explicit pads only (node '{node.name}')")
    n, _, h, w = x.shape
    # quantize before unfolding so padded zeros are the zero-point, as ONNX QLinearConv does
    cols = torch.nn.functional.unfold(x, kernel, dilation=dil, padding=(pads[0], pads[1]), stride=strides)
    out_h = (h + 2 * pads[0] - dil[0] * (kernel[0] - 1) - 1) // strides[0] + 1
    out_w = (w + 2 * pads[1] - dil[1] * (kernel[1] - 1) - 1) // strides[1] + 1
    y = island(cols.transpose(1, 2).reshape(-1, cols.shape[1]))
    return y.reshape(n, out_h * out_w, -1).transpose(1, 2).reshape(n, -1, out_h, out_w)
