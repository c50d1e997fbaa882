"""SmoothQuant: move activation outliers into the weights of the Linears after a LayerNorm.

Matches:   LayerNormalization (constant Scale/B) whose output feeds Linears — MatMul with a
           constant [K, N] weight, or Gemm with a constant weight — directly (Q/K/V share one
           vector; FFN fc1 after the second LayerNorm). Weights used by other nodes are cloned.
Rewrites:  s_j = max|X_j|^alpha / max|W_j|^(1-alpha) (W_j: max over every consumer's input
           channel j; s_j = 1 for dead channels); each consumer weight row j *= s_j (new
           initializers). 1/s goes into the LayerNorm Scale and B when the Linears are its only
           consumers (pre-LN); otherwise (post-LN: the output also feeds the residual) a
           ``Mul(x, 1/s)`` is inserted on the Linear edges only.
Preserves: the float function (verified). Counted: LayerNorms feeding no Linear, groups
           rewritten, Muls inserted.
Needs:     ``ActivationSamples`` (calibration data) for max|X_j| and the alpha search.
Options:   alpha: a fixed value in [0, 1], or None (default) to search 0.0..1.0 step 0.1 per
           group for the least MSE between the float and the W8A8 fake-quantized outputs of
           the group's Linears on calibration rows; a group that no alpha improves over no
           smoothing is left alone (counted). ALGORITHMS.md §1.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from qpass.analyses.activation_samples import ActivationSamples
from qpass.graph_utils import add_initializer, linear_weight, unique_name
from qpass.pass_base import Pass, PassReport

__all__ = ["SmoothQuantPass", "smoothing_factors"]

_EPS = 1e-5


def smoothing_factors(act_absmax: np.ndarray, weight_absmax: np.ndarray, alpha: float) -> np.ndarray:
    """s_j = a_j^alpha / w_j^(1-alpha), with s_j = 1 where the activation channel is dead."""
    a = act_absmax.astype(np.float64)
    w = np.maximum(weight_absmax.astype(np.float64), _EPS)
    s = np.power(np.maximum(a, _EPS), alpha) / np.power(w, 1.0 - alpha)
    return np.where(a < _EPS, 1.0, np.maximum(s, _EPS))


def _fake_quant(x: np.ndarray, amax: np.ndarray | float, qmax: int) -> np.ndarray:
    scale = np.maximum(amax, 1e-12) / qmax
    return np.clip(np.round(x / scale), -qmax, qmax) * scale


def _w8a8_error(x: np.ndarray, weights: list[np.ndarray], s: np.ndarray) -> float:
    """Output MSE of per-tensor int8 activations x/s and per-channel int8 weights s*W."""
    xs = x / s
    xq = _fake_quant(xs, np.abs(xs).max(), 127)
    err = 0.0
    for w in weights:
        ws = w * s[:, None]
        wq = _fake_quant(ws, np.abs(ws).max(axis=0, keepdims=True), 127)
        ref = x @ w
        err += float(np.mean((xq @ wq - ref) ** 2)) / (float(np.mean(ref**2)) + 1e-30)
    return err


@dataclasses.dataclass
class SmoothQuantPass(Pass):
    name = "smooth-quant"
    preserves_float = True

    alpha: float | None = None

    def __post_init__(self):
        if self.alpha is not None and not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")

    def call(self, model: ir.Model) -> PassReport:
        graph = model.graph
        report = PassReport(model, False)
        groups = []
        for ln in graph:
            if ln.op_type != "LayerNormalization" or ln.domain not in ("", "ai.onnx"):
                continue
            if any(v is None or v.const_value is None for v in ln.inputs[1:]) or ln.inputs[1] is None:
                report.skipped["LayerNorm Scale/B not constant"] += 1
                continue
            out = ln.outputs[0]
            linears = [(u.node, *lw) for u in out.uses() if u.idx == 0 and (lw := linear_weight(u.node, out))]
            if not linears:
                report.skipped["LayerNorm feeds no Linear"] += 1
                continue
            groups.append((ln, linears))
        if not groups:
            return report
        stats = self.analysis(ActivationSamples(tuple(ln.outputs[0].name for ln, _ in groups)), model)
        alphas = []
        for ln, linears in groups:
            out = ln.outputs[0]
            weights = [w.const_value.numpy().astype(np.float64) for _, w, _ in linears]
            weights = [w.T if t else w for w, (_, _, t) in zip(weights, linears)]  # [K, N]
            w_absmax = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)
            a_absmax = stats.absmax[out.name]
            alpha = self.alpha if self.alpha is not None else self._search(stats.rows[out.name], weights, a_absmax, w_absmax)
            if alpha is None:  # smoothing would not reduce this group's error: leave it
                report.skipped["smoothing does not help this group"] += 1
                continue
            s = smoothing_factors(a_absmax, w_absmax, alpha)
            for node, w, transposed in linears:
                scaled = w.const_value.numpy().astype(np.float64) * (s[None, :] if transposed else s[:, None])
                node.replace_input_with(1, add_initializer(graph, f"{w.name}_smoothed", scaled.astype(w.const_value.numpy().dtype)))
            only_linears = len(out.uses()) == len(linears) and not out.is_graph_output()
            if only_linears:
                self._fold_into_layernorm(graph, ln, s)
            else:
                self._insert_mul(graph, ln, [n for n, _, _ in linears], s)
                report.details["muls_inserted"] = report.details.get("muls_inserted", 0) + 1
            alphas.append(alpha)
            report.rewritten += 1
        report.details["alphas"] = [round(a, 2) for a in alphas]
        report.modified = report.rewritten > 0
        return report

    @staticmethod
    def _search(rows: np.ndarray, weights, a_absmax, w_absmax) -> float | None:
        """The alpha with the least W8A8 output error, or None when no smoothing is best."""
        x = rows.astype(np.float64)
        best_error, best = _w8a8_error(x, weights, np.ones_like(a_absmax, dtype=np.float64)), None
        for a in np.round(np.arange(0, 1.01, 0.1), 2):
            error = _w8a8_error(x, weights, smoothing_factors(a_absmax, w_absmax, a))
            if error < best_error:
                best_error, best = error, float(a)
        return best

    @staticmethod
    def _fold_into_layernorm(graph: ir.Graph, ln: ir.Node, s: np.ndarray) -> None:
        for index in (1, 2):
            if index < len(ln.inputs) and ln.inputs[index] is not None:
                old = ln.inputs[index]
                array = old.const_value.numpy()
                ln.replace_input_with(index, add_initializer(graph, f"{old.name}_smoothed", (array / s).astype(array.dtype)))

    @staticmethod
    def _insert_mul(graph: ir.Graph, ln: ir.Node, consumers: list[ir.Node], s: np.ndarray) -> None:
        out = ln.outputs[0]
        inv = add_initializer(graph, f"{out.name}_smooth_scale", (1.0 / s).astype(np.float32))
        mul = ir.node("Mul", [out, inv], name=f"{ln.name or out.name}_smooth")
        mul.outputs[0].name = unique_name(graph, f"{out.name}_smoothed")
        mul.outputs[0].dtype, mul.outputs[0].shape = out.dtype, out.shape
        graph.insert_after(ln, mul)
        for node in consumers:
            node.replace_input_with(0, mul.outputs[0])
