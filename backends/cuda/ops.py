"""Op-by-op lowering of the ONNX ops outside integer islands to torch (``OPS``), and the
(op, input) pairs read on the host (``SHAPE_INPUTS``)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import onnx_ir as ir

from qpass.errors import PipelineError
from qpass.schemes import INT_RANGES

__all__ = ["OPS", "SHAPE_INPUTS", "to_torch", "attr"]


def _torch():
    try:
        import torch
    except ImportError as e:  # pragma: no cover
        raise PipelineError("the CUDA backend needs torch: pip install 'qpass[torch]'") from e
    return torch


def to_torch(array: np.ndarray, device):
    torch = _torch()
    if array.dtype == np.uint8:
        return torch.from_numpy(array.astype(np.int16)).to(device)  # uint8 math would wrap
    array = np.ascontiguousarray(array)
    if not array.flags.writeable:
        array = array.copy()
    return torch.from_numpy(array).to(device)


def attr(node, name, default=None):
    a = node.attributes.get(name)
    return default if a is None else a.value


def _q(node, x, scale, zero=None):
    torch = _torch()
    lo, hi = q_range(node)
    axis = attr(node, "axis", 1)
    shape = _bshape(x, scale, axis)
    z = zero.reshape(shape).float() if zero is not None else 0.0
    return (torch.round(x / scale.reshape(shape)) + z).clamp(lo, hi)


def q_range(node) -> tuple[int, int]:
    """The integer range of a QuantizeLinear's output: its zero-point's type (uint8 without one, as ONNX)."""
    if len(node.inputs) < 3 or node.inputs[2] is None:
        return INT_RANGES["uint8"]
    name = {ir.DataType.INT8: "int8", ir.DataType.UINT8: "uint8", ir.DataType.INT16: "int16", ir.DataType.UINT16: "uint16",
            ir.DataType.INT4: "int4", ir.DataType.UINT4: "uint4"}.get(node.inputs[2].dtype)
    if name is None:
        raise PipelineError(f"the CUDA backend cannot lower QuantizeLinear '{node.name}' to {node.inputs[2].dtype}")
    return INT_RANGES[name]


def _dq(node, x, scale, zero=None):
    axis = attr(node, "axis", 1)
    block = attr(node, "block_size", 0)
    if block:  # blocked: each scale covers `block` consecutive entries along axis (the last may be short)
        axis %= x.dim()
        scale = scale.repeat_interleave(block, dim=axis).narrow(axis, 0, x.shape[axis])
        zero = zero.repeat_interleave(block, dim=axis).narrow(axis, 0, x.shape[axis]) if zero is not None else None
        return (x.float() - (zero.float() if zero is not None else 0.0)) * scale.float()
    shape = _bshape(x, scale, axis)
    z = zero.reshape(shape).float() if zero is not None else 0.0
    return (x.float() - z) * scale.reshape(shape).float()


def _bshape(x, scale, axis):
    if scale.numel() == 1:
        return ()
    shape = [1] * x.dim()
    shape[axis % x.dim()] = -1
    return shape


def _reduce(fn):
    def run(node, x, axes=None):
        axes_list = attr(node, "axes") if axes is None else axes.tolist()
        keep = bool(attr(node, "keepdims", 1))
        if axes_list is None:
            axes_list = list(range(x.dim()))
        return fn(x, dim=tuple(axes_list), keepdim=keep)
    return run


def _reshape(node, x, shape):
    target = [int(d) for d in shape.tolist()]
    target = [x.shape[i] if d == 0 and not attr(node, "allowzero", 0) else d for i, d in enumerate(target)]
    return x.reshape(target)


def _slice(node, x, starts, ends, axes=None, steps=None):
    index = [slice(None)] * x.dim()
    axes = axes.tolist() if axes is not None else list(range(len(starts)))
    steps = steps.tolist() if steps is not None else [1] * len(axes)
    for a, s, e, st in zip(axes, starts.tolist(), ends.tolist(), steps):
        size = x.shape[a]
        s, e = max(min(s, size), -size), max(min(e, size), -size - 1)
        index[a] = slice(s, e, st)
    return x[tuple(index)]


def _gemm(node, a, b, c=None):
    a = a.t() if attr(node, "transA", 0) else a
    b = b.t() if attr(node, "transB", 0) else b
    y = attr(node, "alpha", 1.0) * (a.float() @ b.float())
    return y + attr(node, "beta", 1.0) * c if c is not None else y


def _conv(node, x, w, b=None):
    torch = _torch()
    pads = attr(node, "pads", [0, 0, 0, 0])
    return torch.nn.functional.conv2d(
        x, w.float(), b, stride=attr(node, "strides", [1, 1]), padding=(pads[0], pads[1]),
        dilation=attr(node, "dilations", [1, 1]), groups=attr(node, "group", 1),
    )


def _layernorm(node, x, scale, bias=None):
    torch = _torch()
    axis = attr(node, "axis", -1) % x.dim()
    return torch.nn.functional.layer_norm(x, x.shape[axis:], scale, bias, eps=attr(node, "epsilon", 1e-5))


def _gelu(node, x):
    torch = _torch()
    return torch.nn.functional.gelu(x, approximate="tanh" if attr(node, "approximate", "none") == "tanh" else "none")


# ONNX element types the lowered program handles, by torch dtype name
TORCH_DTYPE_NAMES = {ir.DataType.FLOAT: "float32", ir.DataType.FLOAT16: "float16", ir.DataType.INT64: "int64",
                     ir.DataType.INT32: "int32", ir.DataType.BOOL: "bool", ir.DataType.DOUBLE: "float64"}


def _cast(node, x):
    to = ir.DataType(attr(node, "to"))
    if to not in TORCH_DTYPE_NAMES:
        raise PipelineError(f"Cast '{node.name}' to {to.name} is not supported by the CUDA backend")
    return x.to(getattr(_torch(), TORCH_DTYPE_NAMES[to]))


def _constant(node):
    return to_torch(node.attributes["value"].as_tensor().numpy(), "cpu")


def _maxpool(node, x):
    torch = _torch()
    pads = attr(node, "pads", [0, 0, 0, 0])
    return torch.nn.functional.max_pool2d(x, attr(node, "kernel_shape"), attr(node, "strides", None), (pads[0], pads[1]))


def _avgpool(node, x):
    torch = _torch()
    pads = attr(node, "pads", [0, 0, 0, 0])
    return torch.nn.functional.avg_pool2d(x, attr(node, "kernel_shape"), attr(node, "strides", None), (pads[0], pads[1]), count_include_pad=bool(attr(node, "count_include_pad", 0)))


def _clip(node, x, lo=None, hi=None):
    return x.clamp(min=lo.item() if lo is not None else None, max=hi.item() if hi is not None else None)


def _softmax(node, x):
    return x.softmax(dim=attr(node, "axis", -1))


def _split(node, x, split=None):
    """Split along ``axis``: by the ``split`` sizes (input, or attribute below opset 13), else into
    ``num_outputs`` (or as many as the node has outputs) pieces, the last one smaller if need be."""
    axis = attr(node, "axis", 0) % x.dim()
    sizes = split.tolist() if split is not None else attr(node, "split")
    if sizes is None:
        pieces = attr(node, "num_outputs") or len(node.outputs)
        step = -(-x.shape[axis] // pieces)
        sizes = [min(step, x.shape[axis] - i * step) for i in range(pieces)]
    return tuple(_t().split(x, [int(s) for s in sizes], dim=axis))


def _t():
    return _torch()


# (op, input index) pairs that are read on the host (shapes, axes, slice bounds)
SHAPE_INPUTS = frozenset({
    ("Reshape", 1), ("Slice", 1), ("Slice", 2), ("Slice", 3), ("Slice", 4), ("Unsqueeze", 1), ("Squeeze", 1),
    ("Expand", 1), ("Trilu", 1), ("ReduceMean", 1), ("ReduceSum", 1), ("ReduceMax", 1), ("ReduceMin", 1),
    ("Tile", 1), ("ConstantOfShape", 0), ("Split", 1), ("Pad", 1), ("Resize", 2), ("Resize", 3),
})

OPS: Mapping[str, Callable[..., Any]] = {
    "QuantizeLinear": _q,
    "DequantizeLinear": _dq,
    "MatMul": lambda n, a, b: a @ b if a.dtype == b.dtype and a.is_floating_point() else a.float() @ b.float(),
    "Trilu": lambda n, x, k=None: (x.triu if attr(n, "upper", 1) else x.tril)(int(k) if k is not None else 0),
    "Gemm": _gemm,
    "Conv": _conv,
    "Add": lambda n, a, b: a + b,
    "Sub": lambda n, a, b: a - b,
    "Mul": lambda n, a, b: a * b,
    "Div": lambda n, a, b: a / b if a.is_floating_point() else _t().div(a, b, rounding_mode="trunc"),
    "Pow": lambda n, a, b: _t().pow(a, b),
    "Sqrt": lambda n, x: x.sqrt(),
    "Exp": lambda n, x: x.exp(),
    "Log": lambda n, x: x.log(),
    "Erf": lambda n, x: _t().erf(x),
    "Tanh": lambda n, x: x.tanh(),
    "Sigmoid": lambda n, x: x.sigmoid(),
    "Relu": lambda n, x: x.relu(),
    "Neg": lambda n, x: -x,
    "Abs": lambda n, x: x.abs(),
    "Reciprocal": lambda n, x: x.reciprocal(),
    "Round": lambda n, x: _t().round(x),
    "Max": lambda n, *xs: _reduce_pairs(_t().maximum, xs),
    "Min": lambda n, *xs: _reduce_pairs(_t().minimum, xs),
    "Sum": lambda n, *xs: _reduce_pairs(lambda a, b: a + b, xs),
    "Where": lambda n, c, a, b: _t().where(c.bool(), a, b),
    "Equal": lambda n, a, b: a == b,
    "Less": lambda n, a, b: a < b,
    "Greater": lambda n, a, b: a > b,
    "GreaterOrEqual": lambda n, a, b: a >= b,
    "Not": lambda n, x: ~x.bool(),
    "IsNaN": lambda n, x: _t().isnan(x),
    "Clip": _clip,
    "Softmax": _softmax,
    "LayerNormalization": _layernorm,
    "Gelu": _gelu,
    "ReduceMean": _reduce(lambda x, dim, keepdim: x.mean(dim=dim, keepdim=keepdim)),
    "ReduceSum": _reduce(lambda x, dim, keepdim: x.sum(dim=dim, keepdim=keepdim)),
    "ReduceMax": _reduce(lambda x, dim, keepdim: x.amax(dim=dim, keepdim=keepdim)),
    "Reshape": _reshape,
    "Flatten": lambda n, x: x.reshape(int(np.prod(x.shape[: attr(n, "axis", 1)])), -1),
    "Transpose": lambda n, x: x.permute(*(attr(n, "perm") or list(range(x.dim()))[::-1])),
    "Unsqueeze": lambda n, x, axes=None: _unsqueeze(x, axes.tolist() if axes is not None else attr(n, "axes")),
    "Squeeze": lambda n, x, axes=None: x.squeeze(tuple(axes.tolist())) if axes is not None else x.squeeze(),
    "Concat": lambda n, *xs: _t().cat(xs, dim=attr(n, "axis")),
    "Gather": lambda n, x, i: _t().index_select(x, attr(n, "axis", 0) % x.dim(), i.reshape(-1).long()).reshape(
        *x.shape[: attr(n, "axis", 0) % x.dim()], *i.shape, *x.shape[attr(n, "axis", 0) % x.dim() + 1:]),
    "Slice": _slice,
    "Split": _split,
    "Shape": lambda n, x: _t().tensor(list(x.shape), dtype=_t().int64),
    "Cast": _cast,
    "Identity": lambda n, x: x,
    "Constant": _constant,
    "Expand": lambda n, x, s: x * _t().ones(s.tolist(), dtype=x.dtype, device=x.device) if x.dtype != _t().bool else x.expand(*s.tolist()),
    "Range": lambda n, a, b, d: _t().arange(a.item(), b.item(), d.item()),
    "ConstantOfShape": lambda n, s: _t().full(s.tolist(), float(n.attributes["value"].as_tensor().numpy().reshape(-1)[0]) if "value" in n.attributes else 0.0),
    "MaxPool": _maxpool,
    "AveragePool": _avgpool,
    "GlobalAveragePool": lambda n, x: x.mean(dim=(2, 3), keepdim=True),
    "Dropout": lambda n, x, *rest: x,
    "BatchNormalization": lambda n, x, g, b, m, v: _t().nn.functional.batch_norm(x, m, v, g, b, False, 0.0, attr(n, "epsilon", 1e-5)),
}


def _unsqueeze(x, axes):
    for a in sorted(a % (x.dim() + len(axes)) for a in axes):
        x = x.unsqueeze(a)
    return x


def _reduce_pairs(fn, xs):
    out = xs[0]
    for x in xs[1:]:
        out = fn(out, x)
    return out
