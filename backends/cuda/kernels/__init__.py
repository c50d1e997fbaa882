"""Integer kernels of the CUDA backend (Triton on the GPU, NumPy/torch references elsewhere).

* :func:`int8_gemm` — int8 x int8 -> int32 GEMM, weight ``[N, K]`` K-major, with the
  dequant ``acc * a_scale[m] * b_scale[n] + bias[n]`` (and optional requantization) fused
  in the epilogue.
* :func:`quantize_per_token` — dynamic per-token symmetric int8 quantization;
  :func:`add_layernorm_quantize` fuses it with the residual add and LayerNorm producer.
* :func:`quantized_attention` — softmax attention whose probabilities are quantized
  (Q -> DQ) before ``P @ V``, fused so the score matrix stays in registers.
* :func:`w4a16_gemm` — weight-only int4 (packed two per byte, group-128 scales) x float16
  GEMM for decode shapes; :func:`pack_int4` / :func:`unpack_int4` the weight layout.

Every kernel has a reference with identical semantics (``*_reference`` on torch tensors,
``*_numpy`` on arrays) that runs on machines without CUDA or triton; the public functions
fall back to it for CPU tensors. Importing this package needs neither torch nor triton.
"""

from qpass.backends.cuda.kernels.attention import quantized_attention, quantized_attention_reference
from qpass.backends.cuda.kernels.int8_gemm import TMA_MIN_M, int8_gemm, int8_gemm_numpy, int8_gemm_reference
from qpass.backends.cuda.kernels.quantize import (
    add_layernorm_quantize,
    add_layernorm_quantize_reference,
    quantize_per_token,
    quantize_per_token_numpy,
    quantize_per_token_reference,
)
from qpass.backends.cuda.kernels.w4a16_gemm import (
    GROUP_SIZE,
    pack_int4,
    quantize_int4_groupwise,
    unpack_int4,
    w4a16_gemm,
    w4a16_gemm_numpy,
    w4a16_gemm_reference,
)

__all__ = [
    "GROUP_SIZE", "TMA_MIN_M", "add_layernorm_quantize", "add_layernorm_quantize_reference", "int8_gemm",
    "int8_gemm_numpy", "int8_gemm_reference", "pack_int4", "quantize_int4_groupwise", "quantize_per_token",
    "quantize_per_token_numpy", "quantize_per_token_reference", "quantized_attention", "quantized_attention_reference", "triton_available", "unpack_int4", "w4a16_gemm",
    "w4a16_gemm_numpy", "w4a16_gemm_reference",
]


def triton_available() -> bool:
    """True when triton imports and torch sees a CUDA device (the kernels can run)."""
    try:
        import torch
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()
