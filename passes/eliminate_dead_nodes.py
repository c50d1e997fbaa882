"""Remove nodes, initializers and functions that no graph output depends on.

Matches:   nodes whose outputs are unused (transitively), unused initializers, unused
           model-local functions.
Rewrites:  deletes them (onnx_ir's ``RemoveUnusedNodesPass`` / ``RemoveUnusedFunctionsPass``).
Preserves: the float function; graph inputs and outputs are kept.
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir
import onnx_ir.passes.common

from qpass.pass_base import Pass, PassReport

__all__ = ["EliminateDeadNodesPass"]


@dataclasses.dataclass
class EliminateDeadNodesPass(Pass):
    name = "eliminate-dead-nodes"
    preserves_float = True
    keeps_shapes = True

    def call(self, model: ir.Model) -> PassReport:
        nodes = model.graph.num_nodes()
        inits = len(model.graph.initializers)
        funcs = len(model.functions)
        modified = ir.passes.common.RemoveUnusedNodesPass()(model).modified
        modified |= ir.passes.common.RemoveUnusedFunctionsPass()(model).modified
        removed = nodes - model.graph.num_nodes()
        return PassReport(
            model,
            modified,
            rewritten=removed,
            details={
                "nodes_removed": removed,
                "initializers_removed": inits - len(model.graph.initializers),
                "functions_removed": funcs - len(model.functions),
            },
        )
