"""PyTorch front-end: ``torch.export`` + ``torch.onnx.export(dynamo=True)`` to an ``onnx_ir.Model``.

The exporter already builds an ``onnx_ir.Model`` (``ONNXProgram.model``); qpass takes it as
is, with no protobuf round-trip. The batch axis (axis 0 of every tensor input) is exported
as dynamic unless ``dynamic_batch=False``. torch is an optional dependency (``qpass[torch]``).
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import numpy as np
import onnx_ir as ir

from qpass.errors import ModelError

__all__ = ["torch_to_ir"]

logger = logging.getLogger(__name__)


def torch_to_ir(
    module: Any,
    example_inputs: Any,
    *,
    dynamic_batch: bool = True,
    opset: int = 18,
    input_names: list[str] | None = None,
    output_names: list[str] | None = None,
    dynamic_shapes: Any = None,
) -> ir.Model:
    """Export ``module`` called on ``example_inputs`` (a tensor, tuple of tensors or dict of kwargs).

    ``dynamic_shapes`` (torch.export's format) overrides the default dynamic batch axis.
    """
    try:
        import torch
    except ImportError as e:  # pragma: no cover - torch is installed with the extra
        raise ModelError("torch is not installed: pip install 'qpass[torch]' to load PyTorch modules") from e
    if example_inputs is None:
        raise ModelError("a torch module needs example inputs: pass example_inputs=(tensor, ...)")
    if isinstance(example_inputs, dict):
        args, kwargs = (), dict(example_inputs)
    elif isinstance(example_inputs, torch.Tensor):
        args, kwargs = (example_inputs,), {}
    else:
        args, kwargs = tuple(example_inputs), {}
    if dynamic_shapes is None and dynamic_batch:
        batch = torch.export.Dim("batch")
        spec = lambda t: {0: batch} if isinstance(t, torch.Tensor) and t.dim() > 0 else None  # noqa: E731
        dynamic_shapes = {k: spec(v) for k, v in kwargs.items()} if kwargs else tuple(spec(a) for a in args)
        if any(isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == 1 for t in list(args) + list(kwargs.values())):
            logger.info("example batch size 1 may specialize the batch axis; use batch >= 2 for a dynamic batch")
    module = module.eval()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module,
                args,
                kwargs=kwargs or None,
                dynamo=True,
                opset_version=opset,
                dynamic_shapes=dynamic_shapes,
                input_names=input_names,
                output_names=output_names,
                optimize=True,
                verbose=False,
            )
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise ModelError(
            f"torch module {type(module).__name__} failed to export ({first}): check that it runs on the example "
            "inputs and that its code is traceable by torch.export"
        ) from e
    model = program.model
    for value in model.graph.initializers.values():  # own the weights: the module may change later
        tensor = value.const_value
        if tensor is not None and not isinstance(tensor.raw, np.ndarray):
            value.const_value = ir.Tensor(np.array(tensor.numpy(), copy=True), dtype=tensor.dtype, name=tensor.name)
    return model
