"""SmoothQuant: move activation outliers into the weights of the Linears after a LayerNorm.

Matches:   a LayerNorm over the last axis with a constant affine — ``LayerNormalization`` or the
           decomposed ReduceMean/Sub/Pow/ReduceMean/Add/Sqrt/Div(/Mul/Add) of opset < 17
           exports — whose output feeds Linears (MatMul with a constant [K, N] weight, Gemm with
           transA = 0) directly or through Identity chains (Q/K/V share one vector, a fused QKV
           Linear is one consumer; FFN fc1 after the second LayerNorm).
Rewrites:  s_j = max|X_j|^alpha / max|W_j|^(1-alpha) (W_j: max over every consumer's input
           channel j; s_j = 1 for dead channels); each consumer weight row j *= s_j (new
           initializers). 1/s goes into gamma and beta when the Linears are the LayerNorm's only
           consumers (pre-LN); otherwise (post-LN: the output also feeds the residual) or when a
           decomposed LayerNorm has no gamma, a ``Mul(x, 1/s)`` is inserted on the Linear edges only.
Preserves: the float function (verified). Left alone and counted: LayerNorms feeding no Linear,
           groups where a Linear's weight is shared with another node (scaling it would change
           the other user), groups no alpha improves. Counted: groups rewritten, Muls inserted.
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
from qpass.graph_utils import add_initializer, unique_name
from qpass.pass_base import Pass, PassReport
from qpass.transformer_patterns import layernorm_groups, set_layernorm_affine

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


def _w8a8_error(x: np.ndarray, w: np.ndarray, groups: np.ndarray, ref: np.ndarray, power: np.ndarray, s: np.ndarray) -> float:
    """Summed relative output MSE of per-tensor int8 activations x/s and per-channel int8 weights
    s*W, where ``w`` holds every consumer's columns side by side (column j belongs to consumer
    ``groups[j]``, whose float output power is ``power``). Products run in float32: the error of
    an 8-bit quantizer needs no more."""
    xs = x / s
    xq = _fake_quant(xs, np.abs(xs).max(), 127).astype(np.float32)
    ws = w * s[:, None]
    wq = _fake_quant(ws, np.abs(ws).max(axis=0, keepdims=True), 127).astype(np.float32)
    column_mse = np.mean(np.square(xq @ wq - ref), axis=0, dtype=np.float64)
    return float(np.sum(np.bincount(groups, column_mse) / power))


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
        groups = layernorm_groups(graph, report)
        if not groups:
            return report
        stats = self.analysis(ActivationSamples(tuple(m.output.name for m, _ in groups)), model)
        alphas = []
        for match, uses in groups:
            out = match.output
            linears = uses.linears
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
            if uses.only_linears and match.gamma_site is not None:
                set_layernorm_affine(graph, match, match.gamma / s, None if match.beta is None else match.beta / s)
            else:
                self._insert_mul(graph, out, [n for n, _, _ in linears], s)
                report.details["muls_inserted"] = report.details.get("muls_inserted", 0) + 1
            forms = report.details.setdefault("forms", {})
            form = "LayerNormalization" if match.fused else "decomposed"
            forms[form] = forms.get(form, 0) + 1
            alphas.append(alpha)
            report.rewritten += 1
        report.details["alphas"] = [round(a, 2) for a in alphas]
        report.modified = report.rewritten > 0
        return report

    @staticmethod
    def _search(rows: np.ndarray, weights, a_absmax, w_absmax) -> float | None:
        """The alpha with the least W8A8 output error, or None when no smoothing is best."""
        x = rows.astype(np.float64)
        w = np.concatenate(weights, axis=1)
        groups = np.concatenate([np.full(m.shape[1], i) for i, m in enumerate(weights)])
        ref = x.astype(np.float32) @ w.astype(np.float32)
        power = np.bincount(groups, np.mean(np.square(ref), axis=0, dtype=np.float64)) + 1e-30
        error = lambda s: _w8a8_error(x, w, groups, ref, power, s)  # noqa: E731
        best_error, best = error(np.ones_like(a_absmax, dtype=np.float64)), None
        for a in np.round(np.arange(0, 1.01, 0.1), 2):
            error_a = error(smoothing_factors(a_absmax, w_absmax, a))
            if error_a < best_error:
                best_error, best = error_a, float(a)
        return best

    @staticmethod
    def _insert_mul(graph: ir.Graph, out: ir.Value, consumers: list[ir.Node], s: np.ndarray) -> None:
        dtype = out.dtype.numpy() if out.dtype is not None else np.float32
        inv = add_initializer(graph, f"{out.name}_smooth_scale", (1.0 / s).astype(dtype))
        mul = ir.node("Mul", [out, inv], name=f"{out.producer().name or out.name}_smooth")
        mul.outputs[0].name = unique_name(graph, f"{out.name}_smoothed")
        mul.outputs[0].dtype, mul.outputs[0].shape = out.dtype, out.shape
        graph.insert_after(out.producer(), mul)
        for node in consumers:
            node.replace_input_with(0, mul.outputs[0])
