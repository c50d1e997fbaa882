"""RepQ-ViT: turn a per-channel post-LayerNorm quantizer into a per-tensor one, exactly.

Matches:   a LayerNorm over the last axis with a constant affine (``LayerNormalization``, or the
           decomposed form of opset < 17 exports with its gamma ``Mul``) whose output feeds only
           Linears — MatMul with a constant [K, N] weight, Gemm with transA = 0 — directly or
           through Identity chains (pre-LN blocks: ViT qkv, fused or split, and fc1). Rejected and
           counted: post-LN (the output also feeds anything else), a Linear weight shared with
           another node, a decomposed LayerNorm without gamma, a MatMul output that is a graph output.
Rewrites:  with the per-channel affine quantizer of the LN output calibrated at ``bits``
           (s_d, z_d from min/max), s~ = mean(s), z~ = round(mean(z)), r1 = s/s~, r2 = z - z~:
           gamma' = gamma/r1, beta' = (beta + s*r2)/r1 (an absent beta is created); each consumer
           weight row d *= r1_d and the bias moves by -(s*r2) @ W: folded into an existing constant
           bias Add (MatMul) or into C (Gemm, scaled by alpha/beta), else a new Add / C.
           Later per-tensor calibration of the LN output then sees the same codes the per-channel
           quantizer would (ALGORITHMS.md §2.2).
Preserves: the float function (verified). Reports max(r1)/min(r1) per LayerNorm.
Needs:     ``ActivationSamples`` (per-channel min/max of the LayerNorm outputs).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from qpass.analyses.activation_samples import ActivationSamples
from qpass.graph_utils import add_initializer, const_array, rewire_after, unique_name
from qpass.pass_base import Pass, PassReport
from qpass.transformer_patterns import layernorm_groups, set_layernorm_affine

__all__ = ["ReparameterizeLayerNormPass", "repq_ratios"]


def repq_ratios(lo: np.ndarray, hi: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-channel affine (s, z) at ``bits`` and the ratios (r1, r2): returns s, r1, r2."""
    lo, hi = np.minimum(lo, 0.0).astype(np.float64), np.maximum(hi, 0.0).astype(np.float64)
    s = np.maximum((hi - lo) / (2**bits - 1), 1e-8)
    z = np.clip(np.round(-lo / s), 0, 2**bits - 1)
    r1 = s / s.mean()
    r2 = z - np.round(z.mean())
    return s, r1, r2


@dataclasses.dataclass
class ReparameterizeLayerNormPass(Pass):
    name = "reparameterize-layernorm"
    preserves_float = True

    bits: int = 8

    def call(self, model: ir.Model) -> PassReport:
        graph = model.graph
        report = PassReport(model, False)
        groups = []
        for match, uses in layernorm_groups(graph, report):
            if not uses.only_linears:
                report.skipped["post-LN: the LayerNorm output also feeds non-Linear nodes"] += 1
            elif match.gamma_site is None:
                report.skipped["decomposed LayerNorm without a gamma Mul"] += 1
            elif any(n.op_type == "MatMul" and n.outputs[0].is_graph_output() for n, _, _ in uses.linears):
                report.skipped["a Linear output is a graph output"] += 1
            else:
                groups.append((match, uses.linears))
        if not groups:
            return report
        stats = self.analysis(ActivationSamples(tuple(m.output.name for m, _ in groups)), model)
        spreads = {}
        for match, linears in groups:
            name = match.output.name
            s, r1, r2 = repq_ratios(stats.minimum[name], stats.maximum[name], self.bits)
            gamma = match.gamma.astype(np.float64)
            beta = match.beta.astype(np.float64) if match.beta is not None else np.zeros_like(gamma)
            dtype = match.gamma.dtype
            set_layernorm_affine(graph, match, gamma / r1, (beta + s * r2) / r1)
            for node, w, transposed in linears:
                stored = w.const_value.numpy().astype(np.float64)
                new = stored * (r1[None, :] if transposed else r1[:, None])
                node.replace_input_with(1, add_initializer(graph, f"{w.name}_repq", new.astype(dtype)))
                self._add_bias(graph, node, -(s * r2) @ (stored.T if transposed else stored), dtype)
            spreads[match.nodes[0].name or name] = round(float(r1.max() / r1.min()), 3)
            report.rewritten += 1
        report.details = {"r1_spread": spreads, "bits": self.bits}
        report.modified = True
        return report

    @staticmethod
    def _add_bias(graph: ir.Graph, node: ir.Node, delta: np.ndarray, dtype) -> None:
        if not np.any(delta):
            return
        if node.op_type == "Gemm":  # Y = alpha*A*B + beta*C: C moves by delta*alpha/beta
            alpha, beta = node.attributes.get_float("alpha", 1.0), node.attributes.get_float("beta", 1.0)
            c = const_array(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
            if c is not None and beta != 0.0:
                new = (c.astype(np.float64) + delta * alpha / beta).astype(dtype)
                node.replace_input_with(2, add_initializer(graph, f"{node.inputs[2].name}_repq", new))
                return
            if c is None and (len(node.inputs) < 3 or node.inputs[2] is None):
                node.resize_inputs(3)
                node.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
                node.replace_input_with(2, add_initializer(graph, f"{node.name or node.outputs[0].name}_repq_bias", (delta * alpha).astype(dtype)))
                return
        out = node.outputs[0]
        uses = out.uses()
        if node.op_type == "MatMul" and len(uses) == 1 and uses[0].node.op_type == "Add" and not out.is_graph_output():
            add = uses[0].node
            other_index = 1 - uses[0].idx
            bias = const_array(add.inputs[other_index])
            if bias is not None and bias.shape[-1:] == delta.shape:
                add.replace_input_with(other_index, add_initializer(graph, f"{add.inputs[other_index].name}_repq", (bias + delta).astype(dtype)))
                return
        value = add_initializer(graph, f"{node.name or out.name}_repq_bias", delta.astype(dtype))
        add = ir.node("Add", [out, value], name=f"{node.name or out.name}_repq_bias_add")
        add.outputs[0].name = unique_name(graph, f"{out.name}_repq")
        add.outputs[0].dtype, add.outputs[0].shape = out.dtype, out.shape
        rewire_after(graph, out, add)
