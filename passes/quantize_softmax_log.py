"""Quantize attention probabilities with a log2 or log-sqrt2 quantizer (FQ-ViT, RepQ-ViT).

Matches:   Softmax whose output is the left operand of a MatMul (P in P·V). Others are
           counted and left alone.
Rewrites:  P -> LogQuantDequant(P): codes q = clamp(round(-k·log2(P/s)), 0, 2^b - 1), values
           s·2^(-q/k), and 0 where round(...) >= 2^b (underflow to zero, masked entries stay 0);
           k = 1 (log2) or 2 (log-sqrt2); s = 1 (softmax rows never exceed 1). Emitted as a
           model-local function in the ``ai.qpass`` domain whose body uses only standard ops,
           so any runtime inlines it and a backend that knows it can call a kernel;
           ``inline=True`` emits the standard ops directly instead.
Preserves: nothing exactly (a quantizing pass; the pipeline reports the SQNR it costs).
Options:   bits (default 4), base ("log2" or "log_sqrt2"), inline. ALGORITHMS.md §3.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import onnx_ir as ir

from qpass.pass_base import Pass, PassReport

__all__ = ["QuantizeSoftmaxLogPass", "log_quantize_reference", "log_dequantize_reference", "DOMAIN"]

DOMAIN = "ai.qpass"


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


def _tiny(bits: int, k: int) -> float:
    return 2.0 ** (-(2**bits + 2) / k)


def _body(op_inputs: ir.Value, bits: int, k: int, scale: float) -> tuple[list[ir.Node], ir.Value]:
    """The float emulation (ALGORITHMS.md §3.4 strategy A) as a list of standard-op nodes."""
    nodes: list[ir.Node] = []

    def const(value: float, name: str) -> ir.Value:
        node = ir.node("Constant", [], {"value": ir.tensor(np.array(value, np.float32), name=name)})
        node.outputs[0].name = name
        nodes.append(node)
        return node.outputs[0]

    def op(op_type: str, *inputs: ir.Value) -> ir.Value:
        node = ir.node(op_type, list(inputs))
        nodes.append(node)
        return node.outputs[0]

    u = op("Max", op("Div", op_inputs, const(scale, "s")), const(_tiny(bits, k), "tiny"))
    r = op("Round", op("Mul", op("Log", u), const(-k / math.log(2), "neg_k_over_ln2")))
    under = op("GreaterOrEqual", r, const(float(2**bits), "levels"))
    q = op("Clip", r, const(0.0, "zero"), const(float(2**bits - 1), "qmax"))
    deq = op("Mul", op("Pow", const(2.0, "two"), op("Mul", q, const(-1.0 / k, "neg_inv_k"))), const(scale, "s_out"))
    out = op("Where", under, const(0.0, "zero_out"), deq)
    for i, node in enumerate(nodes):
        node.name = f"n{i}"
        if not node.outputs[0].name:
            node.outputs[0].name = f"t{i}"
    return nodes, out


def _function(bits: int, k: int, scale: float, opset: int) -> ir.Function:
    x = ir.Value(name="P")
    nodes, out = _body(x, bits, k, scale)
    out.name = "P_quantized"
    graph = ir.Graph([x], [out], nodes=nodes, opset_imports={"": opset}, name=_function_name(bits, k))
    return ir.Function(DOMAIN, _function_name(bits, k), graph=graph, attributes=[])


def _function_name(bits: int, k: int) -> str:
    return f"LogQuantDequant{'2' if k == 1 else 'Sqrt2'}_{bits}bit"


@dataclasses.dataclass
class QuantizeSoftmaxLogPass(Pass):
    name = "quantize-softmax-log"
    preserves_float = False

    bits: int = 4
    base: str = "log_sqrt2"
    inline: bool = False

    def __post_init__(self):
        _k(self.base)
        if not 1 <= self.bits <= 8:
            raise ValueError(f"bits must be in 1..8, got {self.bits}")

    def call(self, model: ir.Model) -> PassReport:
        graph = model.graph
        report = PassReport(model, False)
        k = _k(self.base)
        opset = model.opset_imports.get("", 13)
        for softmax in list(graph):
            if softmax.op_type != "Softmax" or softmax.domain not in ("", "ai.onnx"):
                continue
            p = softmax.outputs[0]
            uses = [(u.node, u.idx) for u in p.uses() if u.node.op_type == "MatMul" and u.idx == 0]
            if not uses:
                report.skipped["Softmax does not feed a MatMul as P in P·V"] += 1
                continue
            if self.inline:
                nodes, out = _body(p, self.bits, k, 1.0)
                for i, node in enumerate(nodes):
                    node.name = f"{softmax.name or p.name}_logq_{i}"
                    node.outputs[0].name = f"{p.name}_logq_{i}"
            else:
                key = (DOMAIN, _function_name(self.bits, k), "")
                if key not in model.functions:
                    model.functions[key] = _function(self.bits, k, 1.0, opset)
                    model.opset_imports[DOMAIN] = 1
                call = ir.node(_function_name(self.bits, k), [p], domain=DOMAIN, name=f"{softmax.name or p.name}_logq")
                nodes, out = [call], call.outputs[0]
                out.name = f"{p.name}_logq"
            out.dtype, out.shape = p.dtype, p.shape
            graph.insert_after(softmax, nodes)
            for node, idx in uses:
                node.replace_input_with(idx, out)
            report.rewritten += 1
        report.modified = report.rewritten > 0
        report.details = {"bits": self.bits, "base": self.base, "form": "inline" if self.inline else "ai.qpass function"}
        return report
