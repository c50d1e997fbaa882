"""Quantize attention probabilities with a log2 or log-sqrt2 quantizer (FQ-ViT, RepQ-ViT).

Matches:   Softmax whose output is the left operand of a MatMul (P in P·V), directly or through
           the NaN guard ``Where(IsNaN(P), 0, P)`` that exporters put after the softmax of
           scaled_dot_product_attention. Others are counted and left alone.
Rewrites:  P -> LogQuantDequant(P): codes q = clamp(round(-k·log2(P/s)), 0, 2^b - 1), values
           s·2^(-q/k), and 0 where round(...) >= 2^b (underflow to zero, masked entries stay 0);
           k = 1 (log2) or 2 (log-sqrt2); s = 1 (softmax rows never exceed 1). Emitted as a
           model-local function in the ``ai.qpass`` domain whose body uses only standard ops,
           so any runtime inlines it and a backend that knows it can call a kernel;
           ``inline=True`` emits the standard ops directly instead.
           ``deploy="log2-parity"`` (log-sqrt2 only; RepQ-ViT §2.3): the same codes, deployed as
           two log2 tensors split by parity, 2^(-q/2) = 2^(-floor(q/2)) · (q odd ? 1/√2 : 1):
           LogSqrt2Parity(P) -> (P_even, P_odd), each 2^(-floor(q/2)) where q has that parity
           and 0 elsewhere, and P·V -> P_even·V + (P_odd·V)·(1/√2), the 1/√2 applied once per
           output element of the odd product (a shift kernel's output scale).
Preserves: nothing exactly (a quantizing pass; the pipeline reports the SQNR it costs). The
           parity form has the log-sqrt2 values exactly: P_even + P_odd/√2 is bit-identical to
           the log-sqrt2 dequantization; P·V differs only by float summation order.
Options:   bits (default 4), base ("log2" or "log_sqrt2"), inline, deploy ("direct" or
           "log2-parity"). ALGORITHMS.md §2.3, §3.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import onnx_ir as ir

from qpass.graph_utils import const_scalar, is_op, replace_subgraph, unique_name, used_names
from qpass.pass_base import Pass, PassReport
from qpass.schemes import LOG_QUANTIZED_KEY

__all__ = [
    "QuantizeSoftmaxLogPass",
    "log_quantize_reference",
    "log_dequantize_reference",
    "parity_split_reference",
    "DOMAIN",
    "INV_SQRT2",
]

DOMAIN = "ai.qpass"
DEPLOY_FORMS = ("direct", "log2-parity")
INV_SQRT2 = np.float32(1.0 / math.sqrt(2.0))


def _k(base: str) -> int:
    if base not in ("log2", "log_sqrt2"):
        raise ValueError(f"base must be 'log2' or 'log_sqrt2', got '{base}'")
    return 1 if base == "log2" else 2


def log_quantize_reference(p: np.ndarray, bits: int, base: str, scale: float = 1.0) -> np.ndarray:
    """Integer codes (int64), with 2^bits marking underflow-to-zero; float32 arithmetic as the ONNX body."""
    k = _k(base)
    u = np.maximum(p.astype(np.float32) / np.float32(scale), np.float32(_tiny(bits, k)))
    r = np.round(np.log(u) * np.float32(-k / math.log(2)))
    return np.where(r >= 2**bits, 2**bits, np.clip(r, 0, 2**bits - 1)).astype(np.int64)


def log_dequantize_reference(codes: np.ndarray, bits: int, base: str, scale: float = 1.0) -> np.ndarray:
    k = _k(base)
    q = np.minimum(codes, 2**bits - 1).astype(np.float32)
    values = np.power(np.float32(2.0), q * np.float32(-1.0 / k)) * np.float32(scale)
    return np.where(codes >= 2**bits, np.float32(0), values).astype(np.float32)


def parity_split_reference(codes: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Log-sqrt2 codes -> (P_even, P_odd): 2^(-floor(q/2)) where q is even / odd, else 0."""
    q = np.minimum(codes, 2**bits - 1)
    value = np.ldexp(np.float32(1.0), -(q // 2)).astype(np.float32)
    live = codes < 2**bits
    zero = np.float32(0)
    return np.where(live & (q % 2 == 0), value, zero), np.where(live & (q % 2 == 1), value, zero)


def _tiny(bits: int, k: int) -> float:
    return 2.0 ** (-(2**bits + 2) / k)


class _Builder:
    """Collects standard-op nodes with named outputs (constants as Constant nodes)."""

    def __init__(self):
        self.nodes: list[ir.Node] = []

    def const(self, value: float, name: str) -> ir.Value:
        node = ir.node("Constant", [], {"value": ir.tensor(np.array(value, np.float32), name=name)})
        node.outputs[0].name = name
        self.nodes.append(node)
        return node.outputs[0]

    def op(self, op_type: str, *inputs: ir.Value) -> ir.Value:
        node = ir.node(op_type, list(inputs))
        self.nodes.append(node)
        return node.outputs[0]

    def finish(self) -> list[ir.Node]:
        for i, node in enumerate(self.nodes):
            node.name = f"n{i}"
            if not node.outputs[0].name:
                node.outputs[0].name = f"t{i}"
        return self.nodes


def _codes(b: _Builder, p: ir.Value, bits: int, k: int, scale: float) -> tuple[ir.Value, ir.Value]:
    """(under, q): the underflow mask and the clamped codes, as floats (ALGORITHMS.md §3.4 A)."""
    u = b.op("Max", b.op("Div", p, b.const(scale, "s")), b.const(_tiny(bits, k), "tiny"))
    r = b.op("Round", b.op("Mul", b.op("Log", u), b.const(-k / math.log(2), "neg_k_over_ln2")))
    under = b.op("GreaterOrEqual", r, b.const(float(2**bits), "levels"))
    return under, b.op("Clip", r, b.const(0.0, "zero"), b.const(float(2**bits - 1), "qmax"))


def _body(p: ir.Value, bits: int, k: int, scale: float) -> tuple[list[ir.Node], ir.Value]:
    """The float emulation (ALGORITHMS.md §3.4 strategy A) as a list of standard-op nodes."""
    b = _Builder()
    under, q = _codes(b, p, bits, k, scale)
    deq = b.op("Mul", b.op("Pow", b.const(2.0, "two"), b.op("Mul", q, b.const(-1.0 / k, "neg_inv_k"))), b.const(scale, "s_out"))
    out = b.op("Where", under, b.const(0.0, "zero_out"), deq)
    return b.finish(), out


def _parity_body(p: ir.Value, bits: int, scale: float) -> tuple[list[ir.Node], tuple[ir.Value, ir.Value]]:
    """Log-sqrt2 codes split by parity into two log2 tensors, standard ops only (exact:
    floor(q/2) = round(q/2 - 1/4) has no ties, 2^-m is a power of two, the parity is 0 or 1)."""
    b = _Builder()
    under, q = _codes(b, p, bits, 2, scale)
    m = b.op("Round", b.op("Sub", b.op("Mul", q, b.const(0.5, "half")), b.const(0.25, "quarter")))
    odd = b.op("Sub", q, b.op("Add", m, m))
    value = b.op("Mul", b.op("Pow", b.const(2.0, "two"), b.op("Neg", m)), b.const(scale, "s_out"))
    odd_value = b.op("Mul", value, odd)
    zero = b.const(0.0, "zero_out")
    even = b.op("Where", under, zero, b.op("Sub", value, odd_value))
    odd_out = b.op("Where", under, zero, odd_value)
    return b.finish(), (even, odd_out)


def _probabilities(softmax: ir.Node) -> tuple[ir.Node, ir.Value]:
    """(node to insert after, P): the Softmax output, or the output of its NaN guard."""
    p = softmax.outputs[0]
    by_type = {u.node.op_type: u.node for u in p.uses()}
    if len(p.uses()) == 2 and set(by_type) == {"IsNaN", "Where"} and not p.is_graph_output():
        isnan, where = by_type["IsNaN"], by_type["Where"]
        if is_op(isnan, "IsNaN") and is_op(where, "Where") and where.inputs[0] is isnan.outputs[0] \
                and where.inputs[2] is p and const_scalar(where.inputs[1]) == 0.0:
            return where, where.outputs[0]
    return softmax, p


def _function_name(bits: int, k: int, parity: bool = False) -> str:
    if parity:
        return f"LogSqrt2Parity_{bits}bit"
    return f"LogQuantDequant{'2' if k == 1 else 'Sqrt2'}_{bits}bit"


def _function(bits: int, k: int, scale: float, opset: int, parity: bool) -> ir.Function:
    x = ir.Value(name="P")
    if parity:
        nodes, (even, odd) = _parity_body(x, bits, scale)
        even.name, odd.name = "P_even", "P_odd"
        outputs = [even, odd]
    else:
        nodes, out = _body(x, bits, k, scale)
        out.name = "P_quantized"
        outputs = [out]
    name = _function_name(bits, k, parity)
    graph = ir.Graph([x], outputs, nodes=nodes, opset_imports={"": opset}, name=name)
    return ir.Function(DOMAIN, name, graph=graph, attributes=[])


@dataclasses.dataclass
class QuantizeSoftmaxLogPass(Pass):
    name = "quantize-softmax-log"
    preserves_float = False

    bits: int = 4
    base: str = "log_sqrt2"
    inline: bool = False
    deploy: str = "direct"

    def __post_init__(self):
        _k(self.base)
        if not 1 <= self.bits <= 8:
            raise ValueError(f"bits must be in 1..8, got {self.bits}")
        if self.deploy not in DEPLOY_FORMS:
            raise ValueError(f"deploy must be one of {', '.join(DEPLOY_FORMS)}, got '{self.deploy}'")
        if self.deploy == "log2-parity" and self.base != "log_sqrt2":
            raise ValueError("deploy='log2-parity' re-expresses a log_sqrt2 quantizer: set base='log_sqrt2'")

    def call(self, model: ir.Model) -> PassReport:
        graph = model.graph
        report = PassReport(model, False)
        k = _k(self.base)
        parity = self.deploy == "log2-parity"
        opset = model.opset_imports.get("", 13)
        taken = used_names(graph)
        for softmax in list(graph):
            if softmax.op_type != "Softmax" or softmax.domain not in ("", "ai.onnx"):
                continue
            anchor, p = _probabilities(softmax)
            uses = [(u.node, u.idx) for u in p.uses() if u.node.op_type == "MatMul" and u.idx == 0]
            if not uses:
                report.skipped["Softmax does not feed a MatMul as P in P·V"] += 1
                continue
            prefix = softmax.name or p.name
            if self.inline:
                nodes, outs = _parity_body(p, self.bits, 1.0) if parity else _body(p, self.bits, k, 1.0)
                outs = outs if parity else (outs,)
                for i, node in enumerate(nodes):
                    node.name = f"{prefix}_logq_{i}"
                    if node.outputs[0] not in outs:
                        node.outputs[0].name = unique_name(graph, f"{p.name}_logq_{i}", taken)
            else:
                key = (DOMAIN, _function_name(self.bits, k, parity), "")
                if key not in model.functions:
                    model.functions[key] = _function(self.bits, k, 1.0, opset, parity)
                    model.opset_imports[DOMAIN] = 1
                call = ir.node(key[1], [p], domain=DOMAIN, name=f"{prefix}_logq", num_outputs=2 if parity else 1)
                nodes, outs = [call], tuple(call.outputs)
            for out, suffix in zip(outs, ("_even", "_odd") if parity else ("",)):
                out.name = unique_name(graph, f"{p.name}_logq{suffix}", taken)
                out.dtype, out.shape = p.dtype, p.shape
                out.meta[LOG_QUANTIZED_KEY] = self.deploy if parity else self.base
            graph.insert_after(anchor, nodes)
            for node, idx in uses:
                if parity:
                    self._split_matmul(graph, node, outs, taken)
                    report.details["matmuls_split"] = report.details.get("matmuls_split", 0) + 1
                else:
                    node.replace_input_with(idx, outs[0])
            report.rewritten += 1
        report.modified = report.rewritten > 0
        form = "inline" if self.inline else "ai.qpass function"
        report.details.update(bits=self.bits, base=self.base, form=form, deploy=self.deploy)
        return report

    @staticmethod
    def _split_matmul(graph: ir.Graph, matmul: ir.Node, parts: tuple[ir.Value, ir.Value], taken: set[str]) -> None:
        """MatMul(P, V) -> Add(MatMul(P_even, V), Mul(MatMul(P_odd, V), 1/√2)), same output value name."""
        v, out = matmul.inputs[1], matmul.outputs[0]
        base = matmul.name or out.name

        def value(node: ir.Node, name: str, shape=out.shape) -> ir.Value:
            node.outputs[0].name = unique_name(graph, name, taken)
            node.outputs[0].dtype, node.outputs[0].shape = out.dtype, shape
            return node.outputs[0]

        even = ir.node("MatMul", [parts[0], v], name=f"{base}_even_matmul")
        odd = ir.node("MatMul", [parts[1], v], name=f"{base}_odd_matmul")
        const = ir.node("Constant", [], {"value": ir.tensor(INV_SQRT2, name="inv_sqrt2")}, name=f"{base}_inv_sqrt2")
        inv_sqrt2 = value(const, f"{base}_inv_sqrt2", ir.Shape([]))
        scaled = ir.node("Mul", [value(odd, f"{out.name}_odd"), inv_sqrt2], name=f"{base}_odd_scale")
        add = ir.node("Add", [value(even, f"{out.name}_even"), value(scaled, f"{out.name}_odd_scaled")], name=f"{base}_parity_sum")
        new_nodes = [even, odd, const, scaled, add]
        replace_subgraph(graph, [matmul], new_nodes, out, add.outputs[0])
