"""Fold inference BatchNormalization into the preceding Conv, ConvTranspose, Gemm or MatMul(+Add).

Matches:   BatchNormalization(Conv | ConvTranspose | Gemm (x, W[, b])) with constant W, b and
           BN parameters (onnxscript's rules, bias-less Conv included); and
           BatchNormalization(MatMul(x, W) [+ b]) with constant W [K, C], b [C], when the
           MatMul output is 2-D [N, C], so BN's channel axis 1 is the MatMul's last axis.
Rewrites:  the producer with W' = W * s, b' = (b - mean) * s + beta, s = gamma / sqrt(var + eps)
           (scaled along the producer's output-channel axis); the BN node goes away.
Preserves: the float function. Kept and counted: BN after a MatMul whose output is not 2-D,
           and BN whose input has other consumers. ALGORITHMS.md §11.2.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern
from onnxscript.rewriter.rules.common import _fuse_batchnorm

from qpass.pass_base import Pass, PassReport

__all__ = ["FoldBatchNormPass"]


def _bn_scale_shift(bn: ir.Node) -> tuple[np.ndarray, np.ndarray]:
    gamma, beta, mean, var = (v.const_value.numpy().astype(np.float64) for v in bn.inputs[1:5])
    eps = bn.attributes.get_float("epsilon", 1e-5)
    scale = gamma / np.sqrt(var + eps)
    return scale, beta - mean * scale


class _FoldIntoMatMul(pattern.RewriteRuleClassBase):
    """BatchNormalization(MatMul(x, W) [+ b]) on a 2-D output -> MatMul(x, W') + b'."""

    def __init__(self, with_bias: bool):
        super().__init__(f"FoldBatchNormIntoMatMul{'Add' if with_bias else ''}")
        self.with_bias = with_bias

    def pattern(self, op, x, w, b):
        y = op.MatMul(x, w, _outputs=["mm"])
        if self.with_bias:
            y = op.Add(y, b, _outputs=["add"])
        return op.BatchNormalization(y, _allow_other_inputs=True, _outputs=["bn"])

    def check(self, context, x, w, b, bn, mm, **_):
        fail = pattern.MatchResult().fail
        node = bn.producer()
        if any(v is None or v.const_value is None for v in node.inputs[1:5]):
            return fail("BatchNormalization parameters are not constant", bn)
        if w.const_value is None or w.const_value.shape.rank() != 2:
            return fail("MatMul weight is not a constant 2-D matrix", w)
        if mm.shape is None or mm.shape.rank() != 2:
            return fail("MatMul output is not 2-D, so BN's channel axis is not its last axis", mm)
        channels = w.const_value.shape[1]
        if node.inputs[1].const_value.shape != (channels,):
            return fail("BN channels do not match the MatMul output channels", bn)
        if self.with_bias:
            if b.const_value is None or b.const_value.size not in (1, channels):
                return fail("bias is not a constant per-channel vector", b)
            if len(mm.uses()) != 1:
                return fail("MatMul output has other consumers", mm)
        return pattern.MatchResult()

    def rewrite(self, op, x, w, b, bn, mm, **_):
        scale, shift = _bn_scale_shift(bn.producer())
        weight = w.const_value.numpy()
        bias = np.broadcast_to(b.const_value.numpy().reshape(-1), scale.shape) if self.with_bias else 0.0
        new_w = (weight.astype(np.float64) * scale[None, :]).astype(weight.dtype)
        new_b = (bias * scale + shift).astype(weight.dtype)
        out = op.MatMul(x, op.initializer(ir.tensor(new_w), name=f"{w.name}_bnfolded"))
        return op.Add(out, op.initializer(ir.tensor(new_b), name=f"{bn.name}_bias"))


_rules = pattern.RewriteRuleSet(
    [
        _fuse_batchnorm.fuse_batchnorm_into_conv_rule,
        _fuse_batchnorm.fuse_batchnorm_into_conv_transpose_rule,
        _fuse_batchnorm.fuse_batchnorm_into_gemm_rule,
        _FoldIntoMatMul.rule(with_bias=True),
        _FoldIntoMatMul.rule(with_bias=False),
    ]
)


@dataclasses.dataclass
class FoldBatchNormPass(Pass):
    name = "fold-batchnorm"
    preserves_float = True

    def call(self, model: ir.Model) -> PassReport:
        folded = _rules.apply_to_model(model)
        left = sum(1 for n in model.graph if n.op_type == "BatchNormalization")
        skipped = {"BatchNormalization not after a foldable producer": left} if left else {}
        return PassReport(model, folded > 0, rewritten=folded, skipped=skipped)
