"""Lowerings of the qpass IR to runtimes: ``onnxruntime`` (QDQ ONNX) and ``cuda``."""
