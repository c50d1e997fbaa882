"""Fold subgraphs whose inputs are all constants into initializers.

Matches:   nodes whose inputs are constants (initializers, Constant nodes, known shapes),
           within onnxscript's size limits (large weights are left as they are).
Rewrites:  each such node into an initializer holding its value (onnxscript's optimizer:
           ``FoldConstantsPass``); ``Constant`` nodes become initializers.
Preserves: the float function. Orphaned nodes are left to ``eliminate-dead-nodes``.
Options:   input_size_limit / output_size_limit: elements above which a node is not folded.
"""

from __future__ import annotations

import dataclasses

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

    def call(self, model: ir.Model) -> PassReport:
        before = {id(n) for n in model.graph}
        result = folding.FoldConstantsPass(
            shape_inference=False,
            input_size_limit=self.input_size_limit,
            output_size_limit=self.output_size_limit,
        )(model)
        # Nodes turned into constants are orphaned; drop them so the count is what was folded.
        ir.passes.common.RemoveUnusedNodesPass()(model)
        lifted = ir.passes.common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
        folded = len(before - {id(n) for n in model.graph})
        return PassReport(model, result.modified or lifted.modified or folded > 0, rewritten=folded)
