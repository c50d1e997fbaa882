"""Fold subgraphs whose inputs are all constants into initializers.

Matches:   nodes whose inputs are constants (initializers, Constant nodes, known shapes),
           within onnxscript's size limits (large weights are left as they are).
Rewrites:  each such node into an initializer holding its value (onnxscript's optimizer:
           ``FoldConstantsPass``); ``Constant`` nodes become initializers.
Preserves: the float function. Orphaned nodes are left to ``eliminate-dead-nodes``.
           A ConstantOfShape, which onnxscript keeps so as not to grow the model, is folded
           when it makes at most ``small_constant_of_shape`` elements: pads and shape arithmetic
           (a classic export's F.pad), which shape inference and onnxruntime's fusions then see as
           constants; large fills (masks) stay.
Options:   input_size_limit / output_size_limit: elements above which a node is not folded.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common
from onnxscript.optimizer import _constant_folding as folding

from qpass.pass_base import Pass, PassReport

__all__ = ["FoldConstantsPass"]


@dataclasses.dataclass
class FoldConstantsPass(Pass):
    name = "fold-constants"
    preserves_float = True

    input_size_limit: int = folding.DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT
    output_size_limit: int = folding.DEFAULT_CONSTANT_FOLD_OUTPUT_SIZE_LIMIT
    small_constant_of_shape: int = 1024

    def call(self, model: ir.Model) -> PassReport:
        before = {id(n) for n in model.graph}
        result = folding.FoldConstantsPass(
            shape_inference=True,
            input_size_limit=self.input_size_limit,
            output_size_limit=self.output_size_limit,
            should_fold=self._should_fold,
        )(model)
        # Nodes turned into constants are orphaned; drop them so the count is what was folded.
        ir.passes.common.RemoveUnusedNodesPass()(model)
        lifted = ir.passes.common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
        folded = len(before - {id(n) for n in model.graph})
        return PassReport(model, result.modified or lifted.modified or folded > 0, rewritten=folded)

    def _should_fold(self, node: ir.Node) -> bool | None:
        """True for a small ConstantOfShape; None leaves the decision to onnxscript's rules."""
        if node.op_type != "ConstantOfShape" or node.domain not in ("", "ai.onnx"):
            return None
        shape = node.inputs[0].const_value if node.inputs and node.inputs[0] is not None else None
        if shape is None or int(np.prod(shape.numpy(), dtype=np.int64)) > self.small_constant_of_shape:
            return None
        return True
