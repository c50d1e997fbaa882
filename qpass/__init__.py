"""qpass: a compiler for post-training quantization of neural networks.

A model (ONNX file, ``onnx.ModelProto``, ``onnx_ir.Model`` or ``torch.nn.Module``) becomes
one ``onnx_ir.Model``; composable, verified passes rewrite it; backends lower it.
"""

import os as _os

# In a source checkout, passes/ and backends/ sit beside qpass/ and are mapped to
# qpass.passes / qpass.backends by the build config; make that mapping hold also when the
# checkout itself is on sys.path (before an installed or editable copy).
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_root, "pyproject.toml")) and _os.path.isfile(_os.path.join(_root, "passes", "__init__.py")):
    __path__.append(_root)  # type: ignore[name-defined]

from qpass.errors import (  # noqa: E402
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
