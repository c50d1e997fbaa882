"""qpass: a compiler for post-training quantization of neural networks.

A model (ONNX file, ``onnx.ModelProto``, ``onnx_ir.Model`` or ``torch.nn.Module``) becomes
one ``onnx_ir.Model``; composable, verified passes rewrite it; backends lower it.
"""

from qpass.errors import (
    CalibrationError,
    ModelError,
    OutputError,
    PipelineError,
    QpassError,
    UnknownNameError,
    VerificationError,
)
from qpass.model_io import load_model, save_model
from qpass.pass_base import Analysis, AnalysisManager, Pass, PassReport
from qpass.pipeline import Pipeline, PipelineResult, PassStats
from qpass.api import run
from qpass.quantize import QuantizeResult, quantize

__version__ = "0.1.0"

__all__ = [
    "Analysis",
    "AnalysisManager",
    "CalibrationError",
    "ModelError",
    "OutputError",
    "Pass",
    "PassReport",
    "PassStats",
    "Pipeline",
    "PipelineError",
    "PipelineResult",
    "QpassError",
    "UnknownNameError",
    "VerificationError",
    "load_model",
    "quantize",
    "QuantizeResult",
    "run",
    "save_model",
]
