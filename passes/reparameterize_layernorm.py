"""RepQ-ViT: turn a per-channel post-LayerNorm quantizer into a per-tensor one, exactly.

Matches:   LayerNormalization (constant Scale, optional B) whose output feeds only Linears —
           MatMul with a constant [K, N] weight — (pre-LN blocks: ViT qkv and fc1). A LayerNorm
           whose output also feeds anything else (post-LN, residual) is rejected and counted.
Rewrites:  with the per-channel affine quantizer of the LN output calibrated at ``bits``
           (s_d, z_d from min/max), s~ = mean(s), z~ = round(mean(z)), r1 = s/s~, r2 = z - z~:
           gamma' = gamma/r1, beta' = (beta + s*r2)/r1; each consumer weight row d *= r1_d and a
           bias -(s*r2) @ W is added after it (folded into an existing constant bias Add).
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
from qpass.graph_utils import add_initializer, const_array, linear_weight, unique_name
from qpass.pass_base import Pass, PassReport

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
        for ln in graph:
            if ln.op_type != "LayerNormalization" or ln.domain not in ("", "ai.onnx"):
                continue
            out = ln.outputs[0]
            uses = out.uses()
            linear = [u.node for u in uses if u.node.op_type == "MatMul" and linear_weight(u.node, out)]
            if not linear:
                continue
            if any(n.outputs[0].is_graph_output() for n in linear):
                report.skipped["a Linear output is a graph output"] += 1
                continue
            if len(linear) != len(uses) or out.is_graph_output():
                report.skipped["post-LN: the LayerNorm output also feeds non-Linear nodes"] += 1
                continue
            if ln.inputs[1] is None or ln.inputs[1].const_value is None or (len(ln.inputs) > 2 and ln.inputs[2] is not None and ln.inputs[2].const_value is None):
                report.skipped["LayerNorm Scale/B not constant"] += 1
                continue
            groups.append((ln, linear))
        if not groups:
            return report
        stats = self.analysis(ActivationSamples(tuple(ln.outputs[0].name for ln, _ in groups)), model)
        spreads = {}
        for ln, linears in groups:
            name = ln.outputs[0].name
            s, r1, r2 = repq_ratios(stats.minimum[name], stats.maximum[name], self.bits)
            gamma = ln.inputs[1].const_value.numpy().astype(np.float64)
            beta = ln.inputs[2].const_value.numpy().astype(np.float64) if len(ln.inputs) > 2 and ln.inputs[2] is not None else np.zeros_like(gamma)
            dtype = ln.inputs[1].const_value.numpy().dtype
            new_gamma = add_initializer(graph, f"{ln.inputs[1].name}_repq", (gamma / r1).astype(dtype))
            new_beta = add_initializer(graph, f"{ln.name or name}_bias_repq", ((beta + s * r2) / r1).astype(dtype))
            ln.replace_input_with(1, new_gamma)
            if len(ln.inputs) > 2:
                ln.replace_input_with(2, new_beta)
            else:
                ln.resize_inputs(3)
                ln.replace_input_with(2, new_beta)
            for node in linears:
                w = node.inputs[1].const_value.numpy().astype(np.float64)
                node.replace_input_with(1, add_initializer(graph, f"{node.inputs[1].name}_repq", (w * r1[:, None]).astype(dtype)))
                self._add_bias(graph, node, -(s * r2) @ w, dtype)
            spreads[ln.name or name] = round(float(r1.max() / r1.min()), 3)
            report.rewritten += 1
        report.details = {"r1_spread": spreads, "bits": self.bits}
        report.modified = True
        return report

    @staticmethod
    def _add_bias(graph: ir.Graph, node: ir.Node, delta: np.ndarray, dtype) -> None:
        if not np.any(delta):
            return
        out = node.outputs[0]
        uses = out.uses()
        if len(uses) == 1 and uses[0].node.op_type == "Add" and not out.is_graph_output():
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
        users = [(u.node, u.idx) for u in out.uses()]
        graph.insert_after(node, add)
        for user, idx in users:
            user.replace_input_with(idx, add.outputs[0])
