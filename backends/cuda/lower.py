"""Lower a quantized ``onnx_ir.Model`` to a torch program (the CUDA backend).

Quantized islands — ``DQ(Q(x)) -> MatMul | Gemm | Conv <- DQ(int8 weight)`` — become integer
GEMMs: the activation is quantized with the Q's scale and zero-point (round half to even),
multiplied with the int8 weight (stored once, transposed to [N, K] as the kernels read it)
with int32 accumulation, and dequantized in the epilogue ``acc * s_x * s_w + bias``. An
unsigned activation (zero-point z) is shifted to int8 (``q - 128``) and corrected by
``(128 - z) * colsum(W)``. Convs go through im2col (``unfold``). On a GPU the GEMM is the
Triton kernel of ``qpass.backends.cuda.kernels``; elsewhere an exact int32 CPU reference,
so the lowering is tested without a GPU. On the GPU the zero-point correction is folded
into the bias and the whole epilogue runs inside the GEMM kernel. Every other op maps to
torch one by one; an op without a mapping is a one-line :class:`~qpass.errors.PipelineError`
naming it. ``dtype="float16"`` runs the float ops in half precision (the integer islands
are unchanged; outputs come back as float32): faster, no longer bit-comparable with
onnxruntime's float32 ops.
Weight-only islands — ``MatMul | Gemm <- DequantizeLinear(int4, block_size=G)`` (the ``w4a16``
recipe) — keep the codes packed two per byte on the GPU and run the W4A16 kernel at decode
shapes (a dense float16 GEMM on the dequantized weight above 16 rows); on the CPU the
block-wise DequantizeLinear runs op by op. ``LoweredProgram.compile()`` traces the program into
one graph for ``torch.compile`` (the GEMMs stay opaque custom ops), and a quantized Linear whose
output only feeds (bias Add, ReLU/GELU and) the next quantized Linears writes that Linear's int8
codes straight from its epilogue. Model-local functions (``ai.qpass`` log quantizers) are run from
their bodies.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import onnx_ir as ir

from qpass.errors import PipelineError
from qpass.graph_utils import const_array

__all__ = ["lower", "LoweredProgram", "QuantizedLinear", "WeightOnlyLinear"]


def _torch():
    try:
        import torch
    except ImportError as e:  # pragma: no cover
        raise PipelineError("the CUDA backend needs torch: pip install 'qpass[torch]'") from e
    return torch


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
        out_dtype = out_dtype or x2d.dtype
        if self.fused is not None and _TRACING:
            act = self.activation or ""
            out_scale, out_zero = self.requant or (1.0, 0)
            return _linear_op()(a, self.w_t, self.fused[0], self.fused[1], torch.int8 if self.requant else out_dtype, act, out_scale, out_zero)
        if self.fused is not None and a.is_cuda:
            out = self._kernel(a, out_dtype)
            if out is not None:
                return out
        shift = 128 if self.x_unsigned else 0
        acc = _int8_gemm(a, self.w_t)
        correction = shift - self.x_zero
        if correction:
            acc = acc + correction * self.col_sum
        y = acc.float() * (self.x_scale * self.w_scale)
        y = y + self.bias if self.bias is not None else y
        return y if out_dtype == torch.float32 else y.to(out_dtype)

    def _kernel(self, a, out_dtype):
        try:
            from qpass.backends.cuda.kernels import int8_gemm
        except ImportError:
            return None
        scale, bias = self.fused
        return int8_gemm(a, self.w_t, b_scale=scale, bias=bias, out_dtype=out_dtype, requant=self.requant, activation=self.activation)

    def fuse(self) -> None:
        """Fold the zero-point correction into the bias: (acc + c*colsum)*s + b = acc*s + (b + c*colsum*s)."""
        torch = _torch()
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
        torch = _torch()
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


def _match_weight_only(node: ir.Node, device) -> WeightOnlyLinear | None:
    """MatMul / Gemm(transB=0) reading DequantizeLinear(int4 [K, N], scale [K/G, N], axis=0,
    block_size=G) with no zero-point, K a multiple of G and G a power of two >= 32."""
    torch = _torch()
    if node.op_type not in ("MatMul", "Gemm") or len(node.inputs) < 2:
        return None
    if node.op_type == "Gemm" and (node.attributes.get_int("transA", 0) or node.attributes.get_int("transB", 0)
                                   or node.attributes.get_float("alpha", 1.0) != 1.0 or node.attributes.get_float("beta", 1.0) != 1.0):
        return None
    dq = node.inputs[1].producer()
    if dq is None or dq.op_type != "DequantizeLinear" or (len(dq.inputs) > 2 and dq.inputs[2] is not None):
        return None
    group, data = dq.attributes.get_int("block_size", 0), dq.inputs[0].const_value
    scale = _const(dq.inputs[1])
    if not group or data is None or data.dtype != ir.DataType.INT4 or scale is None or len(data.shape) != 2:
        return None
    k, n = data.shape
    if dq.attributes.get_int("axis", 1) % 2 != 0 or k % group or group < 32 or group & (group - 1) or scale.shape != (k // group, n):
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


_TRACING = False  # True while LoweredProgram.compile traces: plain torch ops and the custom GEMM op
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


class LoweredProgram:
    """A callable torch program for a quantized ONNX model. ``program(**inputs)`` -> dict of outputs."""

    def __init__(self, model: ir.Model, device: str = "cpu", dtype: str = "float32"):
        torch = _torch()
        if dtype not in ("float32", "float16"):
            raise PipelineError(f"the CUDA backend computes in float32 or float16, not '{dtype}'")
        self.device = torch.device(device)
        self.dtype = getattr(torch, dtype)
        self.model = model
        self.input_names = [v.name for v in model.graph.inputs if not v.is_initializer()]
        self.output_names = [v.name for v in model.graph.outputs]
        self.constants: dict[str, Any] = {}
        cpu = torch.device("cpu")
        for name, value in model.graph.initializers.items():
            if value.const_value is not None:
                array = value.const_value.numpy()
                if array.dtype.name in ("int4", "uint4"):  # ml_dtypes 4-bit: one code per int8/uint8
                    array = array.astype(np.int8 if array.dtype.name == "int4" else np.uint8)
                if self.dtype == torch.float16 and array.dtype == np.float32 and array.ndim > 0:
                    array = array.astype(np.float16)  # 0-d scales stay float32
                # shapes, axes and starts stay on the host: reading them never waits for the GPU
                host = value.uses() and all((u.node.op_type, u.idx) in _SHAPE_INPUTS for u in value.uses())
                self.constants[name] = _to_torch(array, cpu if host else self.device)
        self.islands: dict[int, QuantizedLinear | WeightOnlyLinear] = {}
        self._compile_options: dict | None = None
        self._compiled: dict[tuple, Callable] = {}
        self.functions = {(f.domain, f.name): f for f in model.functions.values()}
        for node in model.graph:
            island = _match_island(node, self.device)
            if island is None and self.device.type == "cuda":
                island = _match_weight_only(node, self.device)
            if island is not None:
                if self.device.type == "cuda" and isinstance(island, QuantizedLinear):
                    island.fuse()
                self.islands[id(node)] = island
        # Q/DQ nodes read only by islands (which quantize the float input themselves) are not run
        self.skipped: set[int] = set()
        self.fake_quant: dict[int, tuple] = {}  # GPU: DQ(Q(x)) per tensor as one kernel
        for node in reversed(list(model.graph)):
            if node.op_type in ("QuantizeLinear", "DequantizeLinear") and all(
                o.uses() and not o.is_graph_output() and all(id(u.node) in self.islands or id(u.node) in self.skipped for u in o.uses())
                for o in node.outputs
            ):
                self.skipped.add(id(node))
        self.int8_values: set[str] = set()  # values held as int8 codes (written by a requantizing island)
        self.island_outputs: dict[int, str] = {}
        if self.device.type == "cuda":
            self._pair_qdq(model)
            self._chain_requant()
        for node in ir.traversal.RecursiveGraphIterator(model.graph):
            if node.domain not in ("", "ai.onnx") and (node.domain, node.op_type) not in self.functions:
                raise PipelineError(f"the CUDA backend cannot lower op '{node.domain}::{node.op_type}' (node '{node.name}')")
            if node.domain in ("", "ai.onnx") and node.op_type not in _OPS:
                raise PipelineError(f"the CUDA backend has no lowering for op '{node.op_type}' (node '{node.name}'): keep it out of the model or use the onnxruntime backend")

    def _pair_qdq(self, model: ir.Model) -> None:
        for node in model.graph:
            if node.op_type != "DequantizeLinear" or id(node) in self.skipped or len(node.inputs) < 3:
                continue
            q = node.inputs[0].producer()
            if q is None or q.op_type != "QuantizeLinear" or len(q.inputs) < 3 or [v.name for v in q.inputs[1:3]] != [v.name for v in node.inputs[1:3]]:
                continue
            scale, zero = _const(node.inputs[1]), _const(node.inputs[2])
            if scale is None or zero is None or scale.size != 1 or zero.dtype not in (np.uint8, np.int8):
                continue
            lo, hi = (0, 255) if zero.dtype == np.uint8 else (-128, 127)
            self.fake_quant[id(node)] = (q.inputs[0].name, float(scale.reshape(())), int(zero.reshape(())), lo, hi)
            if all(u.node.op_type == "DequantizeLinear" and id(u.node) in self.fake_quant or id(u.node) in self.skipped
                   for u in q.outputs[0].uses()) and not q.outputs[0].is_graph_output():
                self.skipped.add(id(q))

    def _chain_requant(self) -> None:
        """Island -> [Add(bias)] -> [Relu | Gelu | decomposed GELU] -> Q read only by islands:
        the bias, activation and quantization move into the GEMM epilogue, which writes the
        int8 codes the next islands read (no float activation in memory)."""
        from qpass.passes.fuse_gelu import match_gelu

        if self.int8_values or any(isinstance(i, QuantizedLinear) and i.fused is None for i in self.islands.values()):
            return
        gelus = {}
        for node in self.model.graph:
            matched = match_gelu(node)
            if matched is not None:
                gelus[matched[0].name] = matched

        def only_use(value):
            uses = value.uses()
            return uses[0].node if len(uses) == 1 and not value.is_graph_output() else None

        for node in self.model.graph:
            island = self.islands.get(id(node))
            if not isinstance(island, QuantizedLinear) or node.op_type == "Conv":
                continue
            value, fold, extra_bias, act = node.outputs[0], [], None, None
            nxt = only_use(value)
            if nxt is not None and nxt.op_type == "Add":
                b = _const(nxt.inputs[1] if nxt.inputs[0] is value else nxt.inputs[0])
                if b is not None and b.dtype == np.float32 and b.size == island.w_t.shape[0] and b.shape[-1] == b.size:
                    extra_bias, value = b.reshape(-1), nxt.outputs[0]
                    fold.append(nxt)
                    nxt = only_use(value)
            if nxt is not None and nxt.op_type in ("Relu", "Gelu"):
                act = "relu" if nxt.op_type == "Relu" else ("gelu_tanh" if _attr(nxt, "approximate", "none") == "tanh" else "gelu")
                fold.append(nxt)
                value = nxt.outputs[0]
            elif value.name in gelus and not value.is_graph_output():
                _, nodes, out, approximate = gelus[value.name]
                if {id(u.node) for u in value.uses()} <= {id(n) for n in nodes}:
                    act = "gelu_tanh" if approximate == "tanh" else "gelu"
                    fold.extend(nodes)
                    value = out
            q = only_use(value)
            if q is None or q.op_type != "QuantizeLinear" or id(q) not in self.skipped:
                continue
            scale = _const(q.inputs[1])
            zero = _const(q.inputs[2]) if len(q.inputs) > 2 and q.inputs[2] is not None else np.zeros((), np.int8)
            if scale is None or zero is None or scale.size != 1 or zero.dtype not in (np.uint8, np.int8):
                continue
            readers = [u.node for dq in q.outputs[0].uses() for u in dq.node.outputs[0].uses()]
            if not all(isinstance(self.islands.get(id(r)), QuantizedLinear) and r.op_type != "Conv" and self.islands[id(r)].x_scale == float(scale.reshape(()))
                       and self.islands[id(r)].x_zero == int(zero.reshape(())) for r in readers):
                continue
            island.requant = (float(scale.reshape(())), int(zero.reshape(())) - (128 if zero.dtype == np.uint8 else 0))
            island.activation = act
            if extra_bias is not None:
                island.fused = (island.fused[0], island.fused[1] + _to_torch(extra_bias.astype(np.float32), self.device))
            self.skipped.update(id(n) for n in fold)
            self.int8_values.add(value.name)
            self.island_outputs[id(node)] = value.name

    def capture(self, **inputs) -> Callable[..., dict[str, Any]]:
        """Record one run on ``inputs`` as a CUDA graph; the returned function copies new
        inputs of the same shapes into place and replays it (no per-op launch overhead).
        The outputs it returns are overwritten by the next replay."""
        torch = _torch()
        if self.device.type != "cuda":
            raise PipelineError("capture() records a CUDA graph: lower with device='cuda'")
        static = {k: (v if isinstance(v, torch.Tensor) else torch.from_numpy(np.asarray(v))).to(self.device).clone() for k, v in inputs.items()}
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # autotuning and allocations happen outside the graph
                self(**static)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = self(**static)

        def replay(**new):
            for k, v in new.items():
                static[k].copy_(v if isinstance(v, torch.Tensor) else torch.from_numpy(np.asarray(v)))
            graph.replay()
            return outputs

        return replay

    @property
    def quantized_layers(self) -> int:
        return len(self.islands)

    def compile(self, **options) -> LoweredProgram:
        """Run through ``torch.compile`` from now on: on the first call with new input shapes
        the program is traced to one FX graph (the integer GEMMs stay opaque ``qpass::int8_linear``
        ops) and compiled, so activation quantization, casts and element-wise ops fuse into
        their producers. ``options`` go to ``torch.compile``. Returns ``self``."""
        for island in self.islands.values():
            if isinstance(island, QuantizedLinear) and island.fused is None:
                island.fuse()
        self._chain_requant()
        self._compile_options = options
        return self

    def _compiled_for(self, tensors: dict[str, Any]):
        torch = _torch()
        key = tuple((n, tuple(t.shape), t.dtype) for n, t in tensors.items())
        if key not in self._compiled:
            from torch.fx.experimental.proxy_tensor import make_fx

            global _TRACING
            names = list(tensors)

            def run(*args):
                return tuple(self._run(dict(zip(names, args))))

            _TRACING = True
            try:
                with torch.no_grad():
                    traced = make_fx(run)(*tensors.values())
            finally:
                _TRACING = False
            self._compiled[key] = torch.compile(traced, **self._compile_options)
        return self._compiled[key]

    def __call__(self, **inputs) -> dict[str, Any]:
        torch = _torch()
        missing = [n for n in self.input_names if n not in inputs]
        if missing:
            raise PipelineError(f"missing model input '{missing[0]}' (inputs: {', '.join(self.input_names)})")
        tensors = {}
        for name in self.input_names:
            value = inputs[name]
            value = value.to(self.device) if isinstance(value, torch.Tensor) else _to_torch(np.asarray(value), self.device)
            tensors[name] = value.to(self.dtype) if value.dtype == torch.float32 else value
        if self._compile_options is None:
            outputs = self._run(tensors)
        else:
            with torch.no_grad():
                outputs = self._compiled_for(tensors)(*tensors.values())
        return dict(zip(self.output_names, outputs))

    def _run(self, tensors: dict[str, Any]) -> list[Any]:
        torch = _torch()
        env = dict(self.constants)
        env.update(tensors)
        with torch.no_grad():
            self._run_graph(self.model.graph.__iter__(), env, top=True)
        return [env[name].float() if env[name].dtype == self.dtype != torch.float32 else env[name] for name in self.output_names]

    def _run_graph(self, nodes, env: dict, top: bool = False) -> None:
        torch = _torch()
        half = self.dtype == torch.float16
        for node in nodes:
            if top and id(node) in self.skipped:
                continue
            if top and id(node) in self.islands:
                env[self.island_outputs.get(id(node), node.outputs[0].name)] = self._run_island(node, self.islands[id(node)], env)
                continue
            if top and id(node) in self.fake_quant:
                source, scale, zero, lo, hi = self.fake_quant[id(node)]
                x = env[source]
                if _TRACING:
                    y = ((torch.round(x.float() / scale) + zero).clamp(lo, hi) - zero) * scale
                else:
                    y = torch.fake_quantize_per_tensor_affine(x.float(), scale, zero, lo, hi)
                env[node.outputs[0].name] = y.to(x.dtype) if x.dtype != y.dtype else y
                continue
            args = [env[v.name] if v is not None and v.name in env else None for v in node.inputs]
            if (node.domain, node.op_type) in self.functions:
                outs = self._run_function(self.functions[(node.domain, node.op_type)], args)
            else:
                outs = _OPS[node.op_type](node, *args)
            if not isinstance(outs, tuple):
                outs = (outs,)
            if half:  # ops that compute in float32 (DequantizeLinear) hand half on
                outs = tuple(o.half() if isinstance(o, torch.Tensor) and o.dtype == torch.float32 and o.dim() else o for o in outs)
            for value, out in zip(node.outputs, outs):
                env[value.name] = out

    def _run_island(self, node: ir.Node, island, env: dict):
        if isinstance(island, WeightOnlyLinear):
            x = env[node.inputs[0].name]
        else:
            x = env[node.inputs[0].producer().inputs[0].producer().inputs[0].name]  # before Q (or its int8 codes)
        if node.op_type == "Conv":
            return _conv_island(node, island, x)
        y = island(x.reshape(-1, x.shape[-1]), self.dtype)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    def _run_function(self, function: ir.Function, args):
        env = {v.name: a for v, a in zip(function.inputs, args)}
        self._run_graph(iter(function), env)
        return tuple(env[v.name] for v in function.outputs)


def lower(model: ir.Model, device: str | None = None, dtype: str = "float32") -> LoweredProgram:
    """Lower ``model`` for ``device`` ("cuda" when available, else "cpu"); float ops in ``dtype``."""
    torch = _torch()
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise PipelineError("no CUDA GPU is available: lower with device='cpu' (reference kernels) or run on a GPU machine")
    return LoweredProgram(model, device, dtype)


def _to_torch(array: np.ndarray, device):
    torch = _torch()
    if array.dtype == np.uint8:
        return torch.from_numpy(array.astype(np.int16)).to(device)  # uint8 math would wrap
    array = np.ascontiguousarray(array)
    if not array.flags.writeable:
        array = array.copy()
    return torch.from_numpy(array).to(device)


def _dq_params(node: ir.Node | None):
    if node is None or node.op_type != "DequantizeLinear":
        return None
    data, scale = _const(node.inputs[0]), _const(node.inputs[1])
    zero = _const(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
    return data, scale, zero


def _match_island(node: ir.Node, device) -> QuantizedLinear | None:
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
    x_scale, x_zero = _const(x_dq.inputs[1]), _const(x_dq.inputs[2]) if len(x_dq.inputs) > 2 else None
    if w is None or w[0] is None or w[0].dtype != np.int8 or x_scale is None or x_scale.size != 1:
        return None
    wq, w_scale, _ = w
    if node.op_type == "MatMul":
        if wq.ndim != 2:
            return None
        w_t = wq.T  # [N, K]
    elif node.op_type == "Gemm":
        w_t = wq if node.attributes.get_int("transB", 0) else wq.T
    else:
        w_t = wq.reshape(wq.shape[0], -1)  # [C_out, C_in*kh*kw]
    bias = None
    if node.op_type in ("Gemm", "Conv") and len(node.inputs) > 2 and node.inputs[2] is not None:
        b = _dq_params(node.inputs[2].producer())
        if b is not None and b[0] is not None:
            bias = b[0].astype(np.float64) * b[1].astype(np.float64)
        else:
            bias = _const(node.inputs[2])
            if bias is None:
                return None
        if node.op_type == "Gemm" and node.attributes.get_float("beta", 1.0) != 1.0:
            return None
    unsigned = x_zero is not None and x_zero.dtype == np.uint8
    return QuantizedLinear(
        x_scale=float(x_scale.reshape(())),
        x_zero=int(x_zero.reshape(())) if x_zero is not None else 0,
        x_unsigned=unsigned,
        w_t=torch.from_numpy(np.ascontiguousarray(w_t)).to(device),
        w_scale=torch.from_numpy(w_scale.astype(np.float32).reshape(-1)).to(device),
        col_sum=torch.from_numpy(w_t.astype(np.int32).sum(axis=1)).to(device),
        bias=torch.from_numpy(bias.astype(np.float32).reshape(-1)).to(device) if bias is not None else None,
    )




def _conv_island(node: ir.Node, island: QuantizedLinear, x):
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


# ---- op-by-op lowering of everything else -------------------------------------------------


def _attr(node, name, default=None):
    a = node.attributes.get(name)
    return default if a is None else a.value


def _q(node, x, scale, zero=None):
    torch = _torch()
    lo, hi = (0, 255) if zero is not None and node.inputs[2].dtype == ir.DataType.UINT8 else (-128, 127)
    axis = _attr(node, "axis", 1)
    shape = _bshape(x, scale, axis)
    z = zero.reshape(shape).float() if zero is not None else 0.0
    return (torch.round(x / scale.reshape(shape)) + z).clamp(lo, hi)


def _dq(node, x, scale, zero=None):
    axis = _attr(node, "axis", 1)
    block = _attr(node, "block_size", 0)
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
        axes_list = _attr(node, "axes") if axes is None else axes.tolist()
        keep = bool(_attr(node, "keepdims", 1))
        if axes_list is None:
            axes_list = list(range(x.dim()))
        return fn(x, dim=tuple(axes_list), keepdim=keep)
    return run


def _reshape(node, x, shape):
    target = [int(d) for d in shape.tolist()]
    target = [x.shape[i] if d == 0 and not _attr(node, "allowzero", 0) else d for i, d in enumerate(target)]
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
    torch = _torch()
    a = a.t() if _attr(node, "transA", 0) else a
    b = b.t() if _attr(node, "transB", 0) else b
    y = _attr(node, "alpha", 1.0) * (a.float() @ b.float())
    return y + _attr(node, "beta", 1.0) * c if c is not None else y


def _conv(node, x, w, b=None):
    torch = _torch()
    pads = _attr(node, "pads", [0, 0, 0, 0])
    return torch.nn.functional.conv2d(
        x, w.float(), b, stride=_attr(node, "strides", [1, 1]), padding=(pads[0], pads[1]),
        dilation=_attr(node, "dilations", [1, 1]), groups=_attr(node, "group", 1),
    )


def _layernorm(node, x, scale, bias=None):
    torch = _torch()
    axis = _attr(node, "axis", -1) % x.dim()
    return torch.nn.functional.layer_norm(x, x.shape[axis:], scale, bias, eps=_attr(node, "epsilon", 1e-5))


def _gelu(node, x):
    torch = _torch()
    return torch.nn.functional.gelu(x, approximate="tanh" if _attr(node, "approximate", "none") == "tanh" else "none")


def _cast(node, x):
    torch = _torch()
    to = ir.DataType(_attr(node, "to"))
    return x.to(getattr(torch, {"FLOAT": "float32", "FLOAT16": "float16", "INT64": "int64", "INT32": "int32", "BOOL": "bool", "DOUBLE": "float64"}[to.name]))


def _constant(node):
    return _to_torch(node.attributes["value"].as_tensor().numpy(), "cpu")


def _maxpool(node, x):
    torch = _torch()
    pads = _attr(node, "pads", [0, 0, 0, 0])
    return torch.nn.functional.max_pool2d(x, _attr(node, "kernel_shape"), _attr(node, "strides", None), (pads[0], pads[1]))


def _avgpool(node, x):
    torch = _torch()
    pads = _attr(node, "pads", [0, 0, 0, 0])
    return torch.nn.functional.avg_pool2d(x, _attr(node, "kernel_shape"), _attr(node, "strides", None), (pads[0], pads[1]), count_include_pad=bool(_attr(node, "count_include_pad", 0)))


def _clip(node, x, lo=None, hi=None):
    return x.clamp(min=lo.item() if lo is not None else None, max=hi.item() if hi is not None else None)


def _softmax(node, x):
    return x.softmax(dim=_attr(node, "axis", -1))


def _t():
    return _torch()


# (op, input index) pairs that are read on the host (shapes, axes, slice bounds)
_SHAPE_INPUTS = frozenset({
    ("Reshape", 1), ("Slice", 1), ("Slice", 2), ("Slice", 3), ("Slice", 4), ("Unsqueeze", 1), ("Squeeze", 1),
    ("Expand", 1), ("Trilu", 1), ("ReduceMean", 1), ("ReduceSum", 1), ("ReduceMax", 1), ("ReduceMin", 1),
    ("Tile", 1), ("ConstantOfShape", 0), ("Split", 1), ("Pad", 1), ("Resize", 2), ("Resize", 3),
})

_OPS: Mapping[str, Callable[..., Any]] = {
    "QuantizeLinear": _q,
    "DequantizeLinear": _dq,
    "MatMul": lambda n, a, b: a @ b if a.dtype == b.dtype and a.is_floating_point() else a.float() @ b.float(),
    "Trilu": lambda n, x, k=None: (x.triu if _attr(n, "upper", 1) else x.tril)(int(k) if k is not None else 0),
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
    "Flatten": lambda n, x: x.reshape(int(np.prod(x.shape[: _attr(n, "axis", 1)])), -1),
    "Transpose": lambda n, x: x.permute(*(_attr(n, "perm") or list(range(x.dim()))[::-1])),
    "Unsqueeze": lambda n, x, axes=None: _unsqueeze(x, axes.tolist() if axes is not None else _attr(n, "axes")),
    "Squeeze": lambda n, x, axes=None: x.squeeze(tuple(axes.tolist())) if axes is not None else x.squeeze(),
    "Concat": lambda n, *xs: _t().cat(xs, dim=_attr(n, "axis")),
    "Gather": lambda n, x, i: _t().index_select(x, _attr(n, "axis", 0) % x.dim(), i.reshape(-1).long()).reshape(
        *x.shape[: _attr(n, "axis", 0) % x.dim()], *i.shape, *x.shape[_attr(n, "axis", 0) % x.dim() + 1:]),
    "Slice": _slice,
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
    "BatchNormalization": lambda n, x, g, b, m, v: _t().nn.functional.batch_norm(x, m, v, g, b, False, 0.0, _attr(n, "epsilon", 1e-5)),
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
