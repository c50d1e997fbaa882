"""Dynamic per-token symmetric int8 quantization (the activation side of a W8A8 island).

For each row ``x[m, :]`` (a token), in float32::

    scale[m] = absmax(x[m, :]) / 127            (1.0 for an all-zero row: a valid scale)
    q[m, k]  = clamp(rint(x[m, k] / scale[m]), -127, 127)      int8, round half to even

Narrow range [-127, 127] (ALGORITHMS.md §0.2, r = 1), so ``-q`` is always representable.
The Triton kernel uses the IEEE division (``div_rn``) and ``rint``: its codes and scales are
bit-exact with the NumPy reference below. Output ``(q int8 [M, K], scale float32 [M])``;
``scale`` feeds :func:`int8_gemm`'s ``a_scale``.

:func:`add_layernorm_quantize` fuses the producer (the transformer block's residual add and
LayerNorm) with the quantization: ``h = x + residual`` (returned: the next residual),
``y = LayerNorm(h) * weight + bias`` in float32, then ``quantize_per_token(y)`` — one read
of x and residual, no float y in memory. Its reductions run in a different order than
NumPy's, so codes agree with the reference within 1 LSB.
"""

from __future__ import annotations

import numpy as np

__all__ = ["quantize_per_token", "quantize_per_token_reference", "quantize_per_token_numpy",
           "add_layernorm_quantize", "add_layernorm_quantize_reference"]


def quantize_per_token_numpy(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """NumPy reference: ``x`` [M, K] (any float dtype) -> (int8 [M, K], float32 [M])."""
    x = np.asarray(x).astype(np.float32)
    if x.ndim != 2:
        raise ValueError(f"quantize_per_token: x must be [M, K], got shape {x.shape}")
    absmax = np.abs(x).max(axis=1, initial=0.0).astype(np.float32)
    scale = np.where(absmax > 0, absmax / np.float32(127), np.float32(1)).astype(np.float32)
    q = np.clip(np.rint(x / scale[:, None]), -127, 127).astype(np.int8)
    return q, scale


def _torch():
    import torch

    return torch


def quantize_per_token_reference(x):
    """Torch-in, torch-out wrapper of the NumPy reference (same device as ``x``)."""
    torch = _torch()
    q, s = quantize_per_token_numpy(x.detach().cpu().float().numpy())
    return torch.from_numpy(q).to(x.device), torch.from_numpy(s).to(x.device)


def _have_triton() -> bool:
    try:
        from . import _triton_quantize  # noqa: F401
    except ImportError:
        return False
    return True


def quantize_per_token(x, *, backend: str = "auto"):
    """Per-token dynamic int8 quantization of ``x`` [M, K] (float16/bfloat16/float32).

    Triton on CUDA tensors (``backend="auto"|"triton"``), the reference elsewhere.
    Returns ``(q int8 [M, K], scale float32 [M])``.
    """
    torch = _torch()
    if x.dim() != 2:
        raise ValueError(f"quantize_per_token: x must be [M, K], got shape {tuple(x.shape)}")
    if backend == "reference" or not x.is_cuda or not _have_triton():
        return quantize_per_token_reference(x)
    from . import _triton_quantize as tq

    if x.stride(1) != 1:
        x = x.contiguous()
    M, K = x.shape
    q = torch.empty((M, K), device=x.device, dtype=torch.int8)
    s = torch.empty((M,), device=x.device, dtype=torch.float32)
    if M and K:
        tq.quant_rows(x, q, s)
    elif M:
        s.fill_(1.0)
    return q, s


def add_layernorm_quantize_numpy(x, residual, weight, bias=None, eps: float = 1e-5):
    """NumPy reference of :func:`add_layernorm_quantize`: returns (q, scale, h float32)."""
    h = np.asarray(x, np.float32) + np.asarray(residual, np.float32)
    mean = h.mean(axis=1, keepdims=True, dtype=np.float32)
    d = h - mean
    var = (d * d).mean(axis=1, keepdims=True, dtype=np.float32)
    y = d * (np.float32(1) / np.sqrt(var + np.float32(eps))) * np.asarray(weight, np.float32)
    if bias is not None:
        y = y + np.asarray(bias, np.float32)
    q, s = quantize_per_token_numpy(y)
    return q, s, h


def add_layernorm_quantize_reference(x, residual, weight, bias=None, eps: float = 1e-5):
    """Torch wrapper of the NumPy reference; ``h`` is returned in ``x``'s dtype."""
    torch = _torch()

    def np_(t):
        return None if t is None else t.detach().cpu().float().numpy()

    q, s, h = add_layernorm_quantize_numpy(np_(x), np_(residual), np_(weight), np_(bias), eps)
    dev = x.device
    return torch.from_numpy(q).to(dev), torch.from_numpy(s).to(dev), torch.from_numpy(h).to(device=dev, dtype=x.dtype)


def add_layernorm_quantize(x, residual, weight, bias=None, eps: float = 1e-5, *, backend: str = "auto"):
    """Fused ``h = x + residual; q, scale = quantize_per_token(LayerNorm(h))``.

    ``x``, ``residual``: [M, K]; ``weight``, ``bias``: [K]. Returns ``(q int8 [M, K],
    scale float32 [M], h [M, K] in x's dtype)``. One program per row; K up to 16384.
    """
    torch = _torch()
    if x.dim() != 2 or residual.shape != x.shape:
        raise ValueError(f"add_layernorm_quantize: x and residual must be the same [M, K], got {tuple(x.shape)}, {tuple(residual.shape)}")
    if backend == "reference" or not x.is_cuda or not _have_triton():
        return add_layernorm_quantize_reference(x, residual, weight, bias, eps)
    from . import _triton_quantize as tq

    M, K = x.shape
    if K > tq.MAX_SINGLE:
        raise ValueError(f"add_layernorm_quantize: rows of at most {tq.MAX_SINGLE} elements, got {K}")
    x, residual = x.contiguous(), residual.contiguous()
    weight = weight.contiguous()
    bias = bias.contiguous() if bias is not None else None
    q = torch.empty((M, K), device=x.device, dtype=torch.int8)
    s = torch.empty((M,), device=x.device, dtype=torch.float32)
    h = torch.empty_like(x)
    if M and K:
        tq.add_ln_quant(x, residual, h, weight, bias, q, s, eps)
    return q, s, h
