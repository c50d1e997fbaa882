"""Mark which tensors to quantize and how (the intent), without changing the graph's function.

Matches:   Conv, ConvTranspose, Gemm, MatMul (``op_types``): their activation inputs, constant
           weights and (for ops onnxruntime fuses with an output Q: Conv, ConvTranspose,
           Gemm; MatMul when ``quantize_matmul_output``) their output — taken after a single
           Relu/Clip, which onnxruntime absorbs; a Conv's also when it is a model output (a
           detection head: without the Q it would run as a float Conv). A Gemm's output stays float when nothing
           reads it on integers (a classifier's logits): onnxruntime's QGemm writes float
           itself, and calibration then need not run the Gemm. Pooling ops (MaxPool, AveragePool,
           GlobalAveragePool) between quantized tensors get their input and output marked.
           With ``integer_ops`` (default on), ops onnxruntime runs on integers between Q/DQ
           (Sigmoid, LeakyRelu, Add, Mul, Concat, average pools; data-movement ops share
           their input's parameters, a Mul/Div by a positive scalar constant rescales them; an
           Add's constant operand read by it alone gets min-max parameters of its own, per
           tensor) get their output marked when every activation input is
           already marked and the output feeds something that runs on integers (so no Q/DQ
           pair is spent on a tensor that is only read in float: graph outputs and float
           heads stay float); a Sigmoid's output, bounded, is observed with min-max.
           Excluded: nodes whose name, op type or a ``re.fullmatch`` of ``exclude`` matches;
           values ``quantize-softmax-log`` already quantized (its ``ai.qpass`` function's
           outputs, or its inline ops' outputs, marked ``value.meta["qpass.log_quantized"]``)
           get no second, uniform quantizer.
Rewrites:  sets a :class:`qpass.schemes.QuantSpec` on ``value.meta["qpass.quant_spec"]``:
           activations ``activation_dtype`` per tensor (affine unless ``symmetric_activations``,
           observer ``observer``); weights ``weight_dtype`` symmetric narrow-range, per output
           channel (Conv axis 0, ConvTranspose 1, MatMul [K, N] 1, Gemm 0 with transB else 1);
           the activation observer defaults to the 99.999th percentile (measured best across the
           benchmark models: MiniLM, ddddocr OCR and detector; min-max lost on the CNNs)
           unless ``per_channel`` is false; ``activation_bits``/``weight_bits`` use fewer levels
           than the storage type (w6a6, w4a4 studies). ``overrides`` maps a node name/op type/regex to
           option changes for that node (e.g. ``{"fc2": {"weight_dtype": "int4"}}``).
           Weight-only schemes (w4a16, w8a16): ``activations`` false marks constant weights only.
           ``group_size`` G makes MatMul/Gemm weights group-wise: one scale per G consecutive
           elements of the reduction axis K (MatMul ``[K, N]``: axis 0; Gemm: 1 with transB else
           0); K need not be a multiple of G (the last group is shorter). Conv/ConvTranspose
           weights, weights that are not 2-D float32 are then left float (counted as skipped):
           onnxruntime has no block-wise conv kernel, and its ``MatMulNBits`` fusion wants 2-D
           weights and G a power of two >= 16.
           ``weight_observer``: ``minmax`` (default: round-to-nearest, scale max|w| / q_max, narrow
           range) or ``mse`` (the full signed range, e.g. int4 [-8, 7], and per group / channel the
           clipping scale of least squared weight error ||w - s·q(w/s)||², never worse than RTN's:
           :mod:`qpass.weight_search`; the w4a16 recipe uses it; group-wise, each group also
           picks its orientation: a negative scale puts its largest |w| on the -8 end).
           ``symmetric_weights`` false: affine weights with a zero-point (e.g. ``weight_dtype``
           uint4: onnxruntime's MatMulNBits default form; the CUDA W4A16 kernel wants symmetric).
Preserves: the float function (only metadata changes). ``insert-qdq`` materializes it.
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter

import onnx_ir as ir

from qpass.analyses.calibration import scalar_product
from qpass.pass_base import Pass, PassReport
from qpass.schemes import LOG_QUANTIZED_KEY, SHARED_PARAMETER_OPS, SPEC_KEY, QuantSpec

__all__ = ["AnnotateQuantPass", "weight_channel_axis", "weight_reduction_axis"]

_POOLS = ("MaxPool", "AveragePool", "GlobalAveragePool")
_OUTPUT_FUSING = ("Conv", "ConvTranspose", "Gemm")
_FLOAT_OUTPUT_FUSING = ("Gemm",)  # onnxruntime also fuses it without an output Q (QGemm, float output)
_WEIGHT_OBSERVERS = ("minmax", "mse")  # mse: per-group clipping search, qpass.weight_search
# ops with a QLinear* kernel in onnxruntime (QDQ fusion); data-movement ops are SHARED_PARAMETER_OPS
_INTEGER_OPS = ("Sigmoid", "LeakyRelu", "Add", "Mul", "Concat", "AveragePool", "GlobalAveragePool")
_BOUNDED_OUTPUT = ("Sigmoid",)  # outputs in a fixed interval, saturating at its ends


def weight_channel_axis(node: ir.Node) -> int:
    """The output-channel axis of a node's weight input (ALGORITHMS.md §0.1)."""
    if node.op_type == "ConvTranspose":
        return 1
    if node.op_type == "Gemm":
        return 0 if node.attributes.get_int("transB", 0) else 1
    if node.op_type == "MatMul":
        return 1
    return 0


def weight_reduction_axis(node: ir.Node) -> int | None:
    """The reduction (K) axis of a MatMul/Gemm 2-D weight input; None for other ops."""
    if node.op_type == "Gemm":
        return 1 if node.attributes.get_int("transB", 0) else 0
    return 0 if node.op_type == "MatMul" else None


def _group_skip(node: ir.Node, weight: ir.Value) -> str | None:
    """Why a weight cannot be quantized group-wise, or None."""
    if weight_reduction_axis(node) is None:
        return f"{node.op_type} weight: group-wise is for MatMul/Gemm"
    if weight.const_value.shape.rank() != 2:
        return "group-wise weight not 2-D"
    if weight.const_value.dtype != ir.DataType.FLOAT:
        return "group-wise weight not float32"
    return None


def _log_quantized(value: ir.Value) -> bool:
    """Already quantized by a qpass quantizer (log2 / log-sqrt2 softmax: a function call or its
    inline ops, marked ``qpass.log_quantized``): a uniform Q/DQ pair would quantize it twice."""
    return bool(value.meta.get(LOG_QUANTIZED_KEY)) or (value.producer() is not None and value.producer().domain == "ai.qpass")


def _matches(node: ir.Node, patterns: tuple[str, ...]) -> str | None:
    for pattern in patterns:
        if pattern in (node.name, node.op_type) or (node.name and re.fullmatch(pattern, node.name)):
            return pattern
    return None


@dataclasses.dataclass
class AnnotateQuantPass(Pass):
    name = "annotate-quant"
    preserves_float = True
    keeps_shapes = True

    activation_dtype: str = "uint8"
    weight_dtype: str = "int8"
    per_channel: bool = True
    symmetric_activations: bool = False
    observer: str = "percentile"
    percentile: float = 99.999
    activation_bits: int | None = None
    weight_bits: int | None = None
    op_types: tuple[str, ...] = ("Conv", "ConvTranspose", "Gemm", "MatMul")
    quantize_matmul_output: bool = False
    integer_ops: bool = True
    exclude: tuple[str, ...] = ()
    overrides: dict = dataclasses.field(default_factory=dict)
    activations: bool = True
    group_size: int | None = None
    weight_observer: str = "minmax"
    symmetric_weights: bool = True

    def __post_init__(self):
        self.op_types = tuple(self.op_types)
        self.exclude = tuple(self.exclude)
        self._act_spec(self)  # validate early: bad dtypes/observers fail at construction
        self._weight_spec(self, 0)
        if self.group_size is not None:
            self._weight_spec(self, 0, group_axis=0)

    def _act_spec(self, o) -> QuantSpec:
        return QuantSpec(
            o.activation_dtype, symmetric=o.symmetric_activations, observer=o.observer, percentile=o.percentile,
            num_bits=o.activation_bits,
        )

    def _weight_spec(self, o, axis: int, group_axis: int | None = None) -> QuantSpec:
        if o.weight_observer not in _WEIGHT_OBSERVERS:
            raise ValueError(f"unknown weight_observer '{o.weight_observer}': choose one of {', '.join(_WEIGHT_OBSERVERS)}")
        # symmetric min-max (RTN) keeps the narrow range [-2^(b-1)+1, 2^(b-1)-1]; the search uses the full one
        narrow = o.symmetric_weights and o.weight_observer == "minmax"
        common = dict(symmetric=o.symmetric_weights, narrow_range=narrow, observer=o.weight_observer, num_bits=o.weight_bits)
        if group_axis is not None:
            return QuantSpec(o.weight_dtype, granularity="group", axis=group_axis, group_size=o.group_size, **common)
        if o.per_channel:
            return QuantSpec(o.weight_dtype, granularity="channel", axis=axis, **common)
        return QuantSpec(o.weight_dtype, **common)

    def _options_for(self, node: ir.Node):
        key = _matches(node, tuple(self.overrides))
        return dataclasses.replace(self, **self.overrides[key]) if key else self

    def _output_spec(self, node: ir.Node) -> QuantSpec:
        """The activation spec of an integer op's output. A bounded output (Sigmoid: (0, 1)) has
        no tail to clip: min-max, unless an override names its observer."""
        spec = self._act_spec(self._options_for(node))
        key = _matches(node, tuple(self.overrides))
        if node.op_type in _BOUNDED_OUTPUT and not (key and "observer" in self.overrides[key]):
            spec = spec.replace(observer="minmax")
        return spec

    def call(self, model: ir.Model) -> PassReport:
        report = PassReport(model, False)
        marked: Counter = Counter()
        optional: list = []  # outputs of ops fused with or without an output Q: kept if read on integers

        def mark(value: ir.Value | None, spec: QuantSpec) -> None:
            if value is None or value.meta.get(SPEC_KEY) is not None:
                return
            if _log_quantized(value):
                return
            if value.const_value is None and (value.dtype is None or not value.dtype.is_floating_point()):
                return
            value.meta[SPEC_KEY] = spec
            marked["weights" if value.const_value is not None else "activations"] += 1

        for node in model.graph:
            if node.domain not in ("", "ai.onnx") or node.op_type not in self.op_types + _POOLS:
                continue
            if (hit := _matches(node, self.exclude)) is not None:
                report.skipped[f"excluded by '{hit}'"] += 1
                continue
            o = self._options_for(node)
            act = self._act_spec(o)
            if node.op_type in _POOLS:
                if not o.activations:
                    continue
                source = node.inputs[0].producer()
                if source is None or SPEC_KEY not in node.inputs[0].meta:
                    report.skipped[f"{node.op_type} input not quantized"] += 1
                    continue
                mark(node.outputs[0], act)
                report.rewritten += 1
                continue
            weight_index = 1 if node.op_type != "Gemm" or not node.attributes.get_int("transA", 0) else None
            for i, value in enumerate(node.inputs[:2]):
                if value is None:
                    continue
                if value.const_value is not None:
                    if i != weight_index or not value.const_value.dtype.is_floating_point():
                        continue
                    if o.group_size is None:
                        mark(value, self._weight_spec(o, weight_channel_axis(node)))
                    elif (reason := _group_skip(node, value)) is not None:
                        report.skipped[reason] += 1
                    else:
                        mark(value, self._weight_spec(o, weight_channel_axis(node), weight_reduction_axis(node)))
                elif o.activations:
                    mark(value, act)
            if not o.activations:
                report.rewritten += any(v is not None and v.const_value is not None and SPEC_KEY in v.meta for v in node.inputs[:2])
                continue
            if node.op_type in _OUTPUT_FUSING or (node.op_type == "MatMul" and o.quantize_matmul_output):
                out = node.outputs[0]
                follower = out.uses()[0].node if len(out.uses()) == 1 else None
                if follower is not None and follower.op_type in ("Relu", "Clip") and not out.is_graph_output():
                    out = follower.outputs[0]
                # a Conv writing a model output still needs its output Q to run as QLinearConv (not
                # for fewer levels than the storage type: simulation studies, no integer kernel to gain)
                if (not out.is_graph_output() or (node.op_type == "Conv" and not act.restricted)) and SPEC_KEY not in out.meta:
                    mark(out, act)
                    if node.op_type in _FLOAT_OUTPUT_FUSING and SPEC_KEY in out.meta:
                        optional.append((node, out, None, False))
            report.rewritten += 1
        candidates = self._propagate(model) if self.integer_ops and self.activations else []
        self._unmark_float_only(model, _in_graph_order(model, candidates + optional), marked, report)
        marked = +marked  # drops the zero counts
        report.details = dict(marked)
        report.modified = bool(marked)
        return report

    def _propagate(self, model: ir.Model) -> list[tuple[ir.Node, ir.Value, ir.Value | None, bool]]:
        """Mark outputs of integer-capable ops whose activation inputs are all marked; returns
        them as candidates for :meth:`_unmark_float_only`."""
        quantized = lambda v: v is not None and (v.const_value is not None or SPEC_KEY in v.meta)  # noqa: E731
        candidates: list[tuple[ir.Node, ir.Value, ir.Value | None, bool]] = []
        for node in model.graph:
            if node.domain not in ("", "ai.onnx") or node.op_type not in _INTEGER_OPS + SHARED_PARAMETER_OPS + ("Div",):
                continue
            if _matches(node, self.exclude) is not None:
                continue
            data = node.inputs[:1] if node.op_type in SHARED_PARAMETER_OPS else node.inputs
            constant = None  # an Add's constant operand, quantized with its own parameters
            if (scaled := scalar_product(node)) is not None:
                data = [scaled[0]]  # x * k: the same codes with a scaled scale (parameter_source)
            elif node.op_type == "Div":
                continue
            elif node.op_type == "Add" and sum(v is not None and v.const_value is not None for v in data) == 1:
                constant = next(v for v in data if v.const_value is not None)
                if not constant.dtype.is_floating_point() or len(constant.uses()) != 1 or constant.is_graph_output():
                    continue
                data = [v for v in data if v is not constant]
            if not data or any(v is None or v.const_value is not None for v in data):
                continue  # constant operands of other ops (x * w) would need their own quantized copy
            if not all(quantized(v) for v in data):
                continue
            out = node.outputs[0]
            follower = out.uses()[0].node if len(out.uses()) == 1 else None
            if node.op_type in ("Add", "Mul") and not scaled and follower is not None and follower.op_type in ("Relu", "Clip"):
                out = follower.outputs[0]
            for out in node.outputs if node.op_type == "Split" else [out]:  # each piece of a Split
                if out.is_graph_output() or SPEC_KEY in out.meta or _log_quantized(out) or not out.dtype or not out.dtype.is_floating_point():
                    continue
                out.meta[SPEC_KEY] = self._output_spec(node)
                candidates.append((node, out, constant, True))
        return candidates

    def _unmark_float_only(self, model: ir.Model, candidates: list, marked: Counter, report: PassReport) -> None:
        """Unmark the candidate outputs that nothing integer reads, in reverse graph order so that
        consumers decide first; count the new marks (``fresh``) that stay."""

        def integer_reader(node: ir.Node) -> bool:
            if node.op_type in self.op_types:
                return _matches(node, self.exclude) is None
            return any(o is not None and SPEC_KEY in o.meta for o in node.outputs)

        for node, out, constant, fresh in reversed(candidates):
            if not any(integer_reader(u.node) for u in out.uses()):
                del out.meta[SPEC_KEY]
                marked["activations"] -= not fresh  # marked already, by the first sweep
                continue
            if not fresh:
                continue
            if constant is not None:  # min-max over the constant itself, per tensor
                constant.meta[SPEC_KEY] = out.meta[SPEC_KEY].replace(observer="minmax")
                marked["weights"] += 1
            marked["activations"] += 1
            report.rewritten += 1


def _in_graph_order(model: ir.Model, entries: list) -> list:
    """``entries`` (tuples led by a node of ``model.graph``) sorted by their node's position."""
    position = {id(node): i for i, node in enumerate(model.graph)}
    return sorted(entries, key=lambda entry: position[id(entry[0])])
