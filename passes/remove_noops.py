"""Remove Identity nodes and no-op Reshape / Transpose / Cast / Expand / Dropout chains.

Matches:   Identity; Dropout at inference; Transpose with the identity permutation;
           Transpose(Transpose(x)) (composed, removed when the result is the identity);
           Reshape(Reshape(x)) (collapsed); Reshape to the static shape x already has;
           Cast to x's own type; Expand to a shape x already has.
Rewrites:  consumers read x directly (onnx_ir ``IdentityEliminationPass`` and onnxscript's
           basic rules, plus the no-op Reshape rule here).
Preserves: the float function. A graph output keeps its name.
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir
import onnx_ir.passes.common
from onnxscript.rewriter import pattern
from onnxscript.rewriter.rules.common import _basic_rules, _no_op

from qpass.graph_utils import const_array
from qpass.pass_base import Pass, PassReport

__all__ = ["RemoveNoopsPass"]


class _NoOpReshape(pattern.RewriteRuleClassBase):
    """Reshape(x, shape) where x's static shape already equals the target shape."""

    def pattern(self, op, x, shape):
        return op.Reshape(x, shape, _allow_other_attributes=True)

    def check(self, context, x, shape, **_):
        fail = pattern.MatchResult().fail
        target = const_array(shape)
        if target is None or x.shape is None:
            return fail("target or input shape unknown", x)
        allow_zero = context.root.attributes.get_int("allowzero", 0) == 1
        if len(target) != x.shape.rank():
            return fail("rank changes", shape)
        for t, d in zip(target.tolist(), x.shape.dims):
            if t == -1 or (t == 0 and not allow_zero):
                continue  # -1 infers the one remaining dim; 0 copies the input dim
            if not isinstance(d, int) or t != d:
                return fail("shape changes or is unknown", shape)
        return pattern.MatchResult()

    def rewrite(self, op, x, shape, **_):
        return op.Identity(x)


class _InferenceDropout(pattern.RewriteRuleClassBase):
    """Dropout(x[, ratio, training_mode]) at opset >= 12 with training_mode absent or false."""

    def pattern(self, op, x):
        return op.Dropout(x, _allow_other_inputs=True, _outputs=["y"])

    def check(self, context, x, y, **_):
        fail = pattern.MatchResult().fail
        node = y.producer()
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            training = const_array(node.inputs[2])
            if training is None or bool(training.reshape(())):
                return fail("training_mode is not a constant false", node.inputs[2])
        if len(node.outputs) > 1 and (node.outputs[1].uses() or node.outputs[1].is_graph_output()):
            return fail("the dropout mask is used", node)
        return pattern.MatchResult()

    def rewrite(self, op, x, y, **_):
        return op.Identity(x)


_rules = pattern.RewriteRuleSet(
    [
        _no_op.dropout_inference_rule,
        _no_op.dropout_zero_rule,
        _basic_rules.no_op_transpose_rule,
        _basic_rules.transpose_transpose_rule,
        _basic_rules.reshape_reshape_rule,
        _basic_rules.no_op_cast_rule,
        _basic_rules.no_op_expand_rule,
        _NoOpReshape.rule(),
        _InferenceDropout.rule(),
    ]
)


@dataclasses.dataclass
class RemoveNoopsPass(Pass):
    name = "remove-noops"
    preserves_float = True

    def call(self, model: ir.Model) -> PassReport:
        before = model.graph.num_nodes()
        rewritten = _rules.apply_to_model(model)
        modified = onnx_ir.passes.common.IdentityEliminationPass()(model).modified or rewritten > 0
        removed = before - model.graph.num_nodes()
        return PassReport(model, modified, rewritten=max(rewritten, removed))
