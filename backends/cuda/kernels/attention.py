"""Attention with quantized probabilities, fused: ``Q->DQ(softmax(q k^T * sm_scale + mask)) @ v``.

The ONNX form qpass writes for a W8A8 attention block quantizes the softmax output P
(QuantizeLinear -> DequantizeLinear, per tensor) before ``P @ V``. Unfused, the ``[M, N]``
scores and probabilities go through memory several times; the Triton kernel keeps them in
registers (two passes over the keys: row max and sum, then ``P @ V``). Semantics (float32
scores and softmax; P's codes ``clamp(rint(p * (1 / p_scale)) + p_zero, p_lo, p_hi)``, then
``(code - p_zero) * p_scale`` rounded to V's dtype for the product, float32 accumulation)::

    out = ((code(softmax(q @ k^T * sm_scale + mask)) - p_zero) * p_scale) @ v

``q`` [B, H, M, D], ``k``/``v`` [B, H, N, D] (any strides: a transposed K is a view), ``mask``
broadcastable to [B, H, M, N] (additive, e.g. a causal ``-inf`` triangle) or None. The kernel
and the reference agree within float32 rounding of the scores (a probability at a rounding tie
may take the neighbouring code); for float32 or CPU tensors, without triton or with a head size
other than 16, 32, 64 or 128, the reference runs.
"""

from __future__ import annotations

import numpy as np

__all__ = ["quantized_attention", "quantized_attention_reference"]


def quantized_attention_reference(q, k, v, mask=None, *, sm_scale: float, p_scale: float, p_zero: int, p_lo: int, p_hi: int):
    """Torch reference (any device) with the kernel's semantics; returns ``q``'s dtype."""
    import torch

    s = (q.float() @ k.float().transpose(-1, -2)) * sm_scale
    if mask is not None:
        s = s + mask.float()
    p = torch.softmax(s, dim=-1)
    code = torch.clamp(torch.round(p * float(np.float32(1.0) / np.float32(p_scale))) + p_zero, p_lo, p_hi)
    p = ((code - p_zero) * p_scale).to(v.dtype)
    return (p.float() @ v.float()).to(q.dtype)


def quantized_attention(q, k, v, mask=None, *, sm_scale: float, p_scale: float, p_zero: int, p_lo: int, p_hi: int,
                        backend: str = "auto"):
    """Fused attention with quantized probabilities (module docstring); ``backend`` "auto",
    "triton" or "reference"."""
    import torch

    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or k.shape != v.shape or q.shape[-1] != k.shape[-1] or q.shape[:2] != k.shape[:2]:
        raise ValueError(f"quantized_attention: q [B, H, M, D] and k, v [B, H, N, D] expected, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    kw = dict(sm_scale=sm_scale, p_scale=p_scale, p_zero=p_zero, p_lo=p_lo, p_hi=p_hi)
    use_triton = backend == "triton" or (backend == "auto" and q.is_cuda and q.shape[-1] in (16, 32, 64, 128)
                                         and q.dtype in (torch.float16, torch.bfloat16))
    if use_triton:
        try:
            from . import _triton_attention as ta
        except ImportError:
            use_triton = backend == "triton"
            if use_triton:
                raise
    if not use_triton:
        return quantized_attention_reference(q, k, v, mask, **kw)
    dtype = v.dtype if v.dtype in (torch.float16, torch.bfloat16) else torch.float16
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    out = torch.empty(q.shape, device=q.device, dtype=dtype)
    ta.launch(q, k, v, mask, out, sm_scale, p_scale, p_zero, p_lo, p_hi)
    return out
