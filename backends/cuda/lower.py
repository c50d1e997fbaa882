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

from collections.abc import Callable
from typing import Any

import numpy as np
import onnx_ir as ir

from qpass.backends.cuda.attention_island import QuantizedAttention, match_attention
from qpass.backends.cuda.islands import (
    QuantizedLinear,
    WeightOnlyLinear,
    constant_bias,
    conv_island,
    is_tracing,
    match_island,
    match_weight_only,
    per_tensor_qparams,
    tracing,
)
from qpass.backends.cuda.ops import OPS, SHAPE_INPUTS, TORCH_DTYPE_NAMES, _torch, attr, to_torch
from qpass.errors import PipelineError
from qpass.graph_utils import const_array, only_consumer
from qpass.op_patterns import match_gelu

__all__ = ["lower", "LoweredProgram", "QuantizedLinear", "WeightOnlyLinear"]

_const = const_array


class LoweredProgram:
    """A callable torch program for a quantized ONNX model. ``program(**inputs)`` -> dict of outputs."""

    def __init__(self, model: ir.Model, device: str = "cpu", dtype: str = "float32", fused_attention: bool | None = None):
        torch = _torch()
        if dtype not in ("float32", "float16"):
            raise PipelineError(f"the CUDA backend computes in float32 or float16, not '{dtype}'")
        self.device = torch.device(device)
        self.dtype = getattr(torch, dtype)
        self.model = model
        self.input_names = [v.name for v in model.graph.inputs if not v.is_initializer()]
        self.output_names = [v.name for v in model.graph.outputs]
        self.islands: dict[int, QuantizedLinear | WeightOnlyLinear] = {}
        self._compile_options: dict | None = None
        self._compiled: dict[tuple, Callable] = {}
        self._dynamic: set[str] = set()
        self.functions = {(f.domain, f.name): f for f in model.functions.values()}
        for node in model.graph:
            island = match_island(node, self.device)
            if island is None and self.device.type == "cuda":
                island = match_weight_only(node, self.device)
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
        # after the Q/DQ skipping: the attention kernel reads q, k and v as floats
        self.attention: dict[int, QuantizedAttention] = {}
        if fused_attention is None:  # the fused kernel is the faster path for float16 on the GPU
            fused_attention = self.device.type == "cuda" and self.dtype == torch.float16
        for node in model.graph if fused_attention else ():
            found = match_attention(node)
            if found is not None:
                self.attention[id(node)] = found
                self.skipped.update(n for n in found.nodes if n != id(node))
        self.int8_values: set[str] = set()  # values held as int8 codes (written by a requantizing island)
        self.island_outputs: dict[int, str] = {}
        if self.device.type == "cuda":
            self._pair_qdq(model)
            self._chain_requant()
        self.constants = self._upload_constants(model)
        for node in ir.traversal.RecursiveGraphIterator(model.graph):
            if node.domain not in ("", "ai.onnx") and (node.domain, node.op_type) not in self.functions:
                raise PipelineError(f"the CUDA backend cannot lower op '{node.domain}::{node.op_type}' (node '{node.name}')")
            if node.domain in ("", "ai.onnx") and node.op_type not in OPS:
                raise PipelineError(f"the CUDA backend has no lowering for op '{node.op_type}' (node '{node.name}'): keep it out of the model or use the onnxruntime backend")

    def _upload_constants(self, model: ir.Model) -> dict[str, Any]:
        """The initializers that nodes left to run read, as tensors. Weights an island or the
        attention kernel holds in its own layout (and skipped Q/DQ parameters) stay on the host."""
        torch = _torch()
        read = {v.name for v in model.graph.outputs}
        for node in ir.traversal.RecursiveGraphIterator(model.graph):
            if id(node) in self.islands:
                read.add(self._island_input(node, self.islands[id(node)]).name)
            elif id(node) in self.attention:
                found = self.attention[id(node)]
                read.update(n for n in (found.q, found.k_t, found.v, found.mask) if n is not None)
            elif id(node) in self.fake_quant:
                read.add(self.fake_quant[id(node)][0])
            elif id(node) not in self.skipped:
                read.update(v.name for v in node.inputs if v is not None)
        constants, cpu = {}, torch.device("cpu")
        for name, value in model.graph.initializers.items():
            if value.const_value is None or name not in read:
                continue
            array = value.const_value.numpy()
            if array.dtype.name in ("int4", "uint4"):  # ml_dtypes 4-bit: one code per int8/uint8
                array = array.astype(np.int8 if array.dtype.name == "int4" else np.uint8)
            if self.dtype == torch.float16 and array.dtype == np.float32 and array.ndim > 0:
                array = array.astype(np.float16)  # 0-d scales stay float32
            # shapes, axes and starts stay on the host: reading them never waits for the GPU
            host = value.uses() and all((u.node.op_type, u.idx) in SHAPE_INPUTS for u in value.uses())
            constants[name] = to_torch(array, cpu if host else self.device)
        return constants

    def _pair_qdq(self, model: ir.Model) -> None:
        for node in model.graph:
            if node.op_type != "DequantizeLinear" or id(node) in self.skipped:
                continue
            q = node.inputs[0].producer()
            if q is None or q.op_type != "QuantizeLinear":
                continue
            params = per_tensor_qparams(node)
            if params is None or params != per_tensor_qparams(q):
                continue
            self.fake_quant[id(node)] = (q.inputs[0].name, *params)
            if all(u.node.op_type == "DequantizeLinear" and id(u.node) in self.fake_quant or id(u.node) in self.skipped
                   for u in q.outputs[0].uses()) and not q.outputs[0].is_graph_output():
                self.skipped.add(id(q))

    def _chain_requant(self) -> None:
        """Island -> [Add(bias)] -> [Relu | Gelu | decomposed GELU] -> Q read only by islands:
        the bias, activation and quantization move into the GEMM epilogue, which writes the
        int8 codes the next islands read (no float activation in memory)."""
        if self.int8_values or any(isinstance(i, QuantizedLinear) and i.fused is None for i in self.islands.values()):
            return
        gelus = {}
        for node in self.model.graph:
            matched = match_gelu(node)
            if matched is not None:
                gelus[matched[0].name] = matched

        for node in self.model.graph:
            island = self.islands.get(id(node))
            if not isinstance(island, QuantizedLinear) or node.op_type == "Conv":
                continue
            value, fold, extra_bias, act = node.outputs[0], [], None, None
            nxt = only_consumer(value)
            if nxt is not None and nxt.op_type == "Add":
                bias = nxt.inputs[1] if nxt.inputs[0] is value else nxt.inputs[0]
                b = constant_bias(bias)
                rank = value.shape.rank() if value.shape is not None else None
                if (b is not None and b.dtype == np.float32 and b.size == island.w_t.shape[0] and b.shape[-1] == b.size
                        and rank is not None and b.ndim <= rank):
                    extra_bias, value = b.reshape(-1), nxt.outputs[0]
                    fold.append(nxt)
                    if bias.producer() is not None and len(bias.uses()) == 1 and not bias.is_graph_output():
                        fold.append(bias.producer())  # an int32 bias's DequantizeLinear: only the Add read it
                    nxt = only_consumer(value)
            if nxt is not None and nxt.op_type in ("Relu", "Gelu"):
                act = "relu" if nxt.op_type == "Relu" else ("gelu_tanh" if attr(nxt, "approximate", "none") == "tanh" else "gelu")
                fold.append(nxt)
                value = nxt.outputs[0]
            elif value.name in gelus and not value.is_graph_output():
                _, nodes, out, approximate = gelus[value.name]
                if {id(u.node) for u in value.uses()} <= {id(n) for n in nodes}:
                    act = "gelu_tanh" if approximate == "tanh" else "gelu"
                    fold.extend(nodes)
                    value = out
            q = only_consumer(value)
            if q is None or q.op_type != "QuantizeLinear" or id(q) not in self.skipped:
                continue
            params = per_tensor_qparams(q)
            if params is None:
                continue
            scale, zero, lo, _ = params
            dqs = [u.node for u in q.outputs[0].uses()]
            if q.outputs[0].is_graph_output() or not all(
                    d.op_type == "DequantizeLinear" and id(d) in self.skipped and id(d) not in self.fake_quant
                    and not d.outputs[0].is_graph_output() and d.outputs[0].uses() for d in dqs):
                continue
            readers = [u.node for d in dqs for u in d.outputs[0].uses()]
            if not readers or not all(isinstance(self.islands.get(id(r)), QuantizedLinear) and r.op_type != "Conv"
                                      and (self.islands[id(r)].x_scale, self.islands[id(r)].x_zero) == (scale, zero) for r in readers):
                continue
            island.requant = (scale, zero - (128 if lo == 0 else 0))  # uint8 codes shifted to int8
            island.activation = act
            if extra_bias is not None:
                island.fused = (island.fused[0], island.fused[1] + to_torch(extra_bias.astype(np.float32), self.device))
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
            for _ in range(2):  # autotuning and allocations (kernel workspaces, per stream) happen outside the graph
                self(**static)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):  # the warm-up's stream: its workspaces
            outputs = self(**static)

        def replay(**new):
            if set(new) != set(static):
                raise PipelineError(f"a captured program takes exactly the inputs it was captured with: {', '.join(sorted(static))}")
            for k, v in new.items():
                v = v if isinstance(v, torch.Tensor) else torch.from_numpy(np.asarray(v))
                if v.shape != static[k].shape or v.dtype != static[k].dtype:
                    raise PipelineError(f"input '{k}' must match the captured one ({static[k].dtype} {list(static[k].shape)}), "
                                        f"got {v.dtype} {list(v.shape)}: capture again for other shapes")
                static[k].copy_(v)
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
        self._compiled.clear()
        return self

    def _compiled_for(self, tensors: dict[str, Any]):
        torch = _torch()
        key = tuple((n, tuple(t.shape), t.dtype) for n, t in tensors.items())
        if key not in self._compiled:
            from torch.fx.experimental.proxy_tensor import make_fx

            names = list(tensors)

            def run(*args):
                return tuple(self._run(dict(zip(names, args))))

            self._dynamic = set(names)  # values that depend on input values (not only on shapes)
            try:
                with tracing(), torch.no_grad():
                    traced = make_fx(run)(*tensors.values())
            except PipelineError:
                raise
            except Exception as e:  # noqa: BLE001 - one line for the user, the cause chained
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                raise PipelineError(f"compile() could not trace this program ({type(e).__name__}: {first[:200]}); "
                                    "run it without compile()") from e
            self._compiled[key] = torch.compile(traced, **self._compile_options)
        return self._compiled[key]

    def __call__(self, **inputs) -> dict[str, Any]:
        torch = _torch()
        missing = [n for n in self.input_names if n not in inputs]
        if missing:
            raise PipelineError(f"missing model input '{missing[0]}' (inputs: {', '.join(self.input_names)})")
        unknown = sorted(set(inputs) - set(self.input_names))
        if unknown:
            raise PipelineError(f"unknown model input '{unknown[0]}' (inputs: {', '.join(self.input_names)})")
        tensors = {}
        for value_info in self.model.graph.inputs:
            if value_info.name not in self.input_names:
                continue
            name, value = value_info.name, inputs[value_info.name]
            value = value.to(self.device) if isinstance(value, torch.Tensor) else to_torch(np.asarray(value), self.device)
            _check_input(value_info, value)
            tensors[name] = value.to(self.dtype) if value.is_floating_point() and value_info.dtype == ir.DataType.FLOAT else value
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
        traced = top and is_tracing()
        for node in nodes:
            dynamic = traced and self._track(node)
            if top and id(node) in self.skipped:
                continue
            if traced and not dynamic:  # depends on shapes and constants only: computed, not traced
                from torch.fx.experimental.proxy_tensor import disable_proxy_modes_tracing

                with disable_proxy_modes_tracing():
                    self._run_node(node, env, half)
                continue
            if top and id(node) in self.attention:
                env[node.outputs[0].name] = self.attention[id(node)](env)
                continue
            if top and id(node) in self.islands:
                env[self.island_outputs.get(id(node), node.outputs[0].name)] = self._run_island(node, self.islands[id(node)], env)
                continue
            if top and id(node) in self.fake_quant:
                source, scale, zero, lo, hi = self.fake_quant[id(node)]
                x = env[source]
                if is_tracing():
                    y = ((torch.round(x.float() / scale) + zero).clamp(lo, hi) - zero) * scale
                else:
                    y = torch.fake_quantize_per_tensor_affine(x.float(), scale, zero, lo, hi)
                env[node.outputs[0].name] = y.to(x.dtype) if x.dtype != y.dtype else y
                continue
            self._run_node(node, env, half)

    def _run_node(self, node: ir.Node, env: dict, half: bool) -> None:
        torch = _torch()
        args = [env[v.name] if v is not None and v.name in env else None for v in node.inputs]
        if (node.domain, node.op_type) in self.functions:
            outs = self._run_function(self.functions[(node.domain, node.op_type)], args)
        else:
            outs = OPS[node.op_type](node, *args)
        if not isinstance(outs, tuple):
            outs = (outs,)
        if half:  # ops that compute in float32 (DequantizeLinear) hand half on
            outs = tuple(o.half() if isinstance(o, torch.Tensor) and o.dtype == torch.float32 and o.dim() else o for o in outs)
        for value, out in zip(node.outputs, outs):
            env[value.name] = out

    def _track(self, node: ir.Node) -> bool:
        """While tracing: True when ``node`` reads input values (its outputs join ``_dynamic``).
        A shape, axis or bound computed from input values cannot be traced: one-line error."""
        dynamic = [i for i, v in enumerate(node.inputs) if v is not None and v.name in self._dynamic]
        if not dynamic:
            return False
        if node.op_type == "Shape":  # the trace is keyed by input shapes
            return True
        host = [i for i in dynamic if (node.op_type, i) in SHAPE_INPUTS or node.op_type in ("Range", "ConstantOfShape")
                or (node.op_type in ("Clip", "Trilu") and i > 0)]
        if host:
            raise PipelineError(f"compile() cannot trace node '{node.name}' ({node.op_type}): its input "
                                f"'{node.inputs[host[0]].name}' depends on input values; run the program without compile()")
        self._dynamic.update(v.name for v in node.outputs)
        self._dynamic.update(n for n in (self.island_outputs.get(id(node)),) if n)
        return True

    @staticmethod
    def _island_input(node: ir.Node, island) -> ir.Value:
        if isinstance(island, WeightOnlyLinear):
            return node.inputs[0]
        return node.inputs[0].producer().inputs[0].producer().inputs[0]  # before Q (or its int8 codes)

    def _run_island(self, node: ir.Node, island, env: dict):
        x = env[self._island_input(node, island).name]
        if node.op_type == "Conv":
            return conv_island(node, island, x)
        y = island(x.reshape(-1, x.shape[-1]), self.dtype)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    def _run_function(self, function: ir.Function, args):
        env = {v.name: a for v, a in zip(function.inputs, args)}
        self._run_graph(iter(function), env)
        return tuple(env[v.name] for v in function.outputs)


def _check_input(info: ir.Value, value) -> None:
    """One-line error for a model input of the wrong dtype, rank or fixed dimension."""
    expected = TORCH_DTYPE_NAMES.get(info.dtype)
    got = str(value.dtype).removeprefix("torch.")
    if expected is not None and got != expected and not (expected == "float32" and got in ("float16", "float64")):
        raise PipelineError(f"model input '{info.name}' must be {expected}, got {got}")
    if info.shape is None:
        return
    dims = list(info.shape)
    if value.dim() != len(dims) or any(isinstance(d, int) and d != n for d, n in zip(dims, value.shape)):
        want = "[" + ", ".join(str(d) if isinstance(d, int) else "?" for d in dims) + "]"
        raise PipelineError(f"model input '{info.name}' must have shape {want}, got {list(value.shape)}")


def lower(model: ir.Model, device: str | None = None, dtype: str = "float32", fused_attention: bool | None = None) -> LoweredProgram:
    """Lower ``model`` for ``device`` ("cuda" when available, else "cpu"); float ops in ``dtype``.
    ``fused_attention``: run attention blocks with quantized probabilities as one kernel
    (:mod:`qpass.backends.cuda.attention_island`); by default on for float16 on the GPU,
    where it is faster, and off elsewhere (the op-by-op path is the reference)."""
    torch = _torch()
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise PipelineError("no CUDA GPU is available: lower with device='cpu' (reference kernels) or run on a GPU machine")
    return LoweredProgram(model, device, dtype, fused_attention)
