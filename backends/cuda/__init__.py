"""CUDA backend: lowers a quantized ``onnx_ir.Model`` to a torch program whose quantized
layers run integer GEMMs (Triton kernels on the GPU, exact CPU references elsewhere)."""

from qpass.backends.cuda.lower import LoweredProgram, lower

__all__ = ["LoweredProgram", "lower"]
