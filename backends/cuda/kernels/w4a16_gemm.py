"""W4A16 weight-only GEMM for decode shapes: float16 activations x packed int4 weights -> float16.

Weights (DECISIONS.md ``w4a16``: RTN, symmetric int4, per-group scales, group 128 along K)::

    q[n, k]  in [-8, 7]                  int4, zero-point 0
    s[n, g]  float (16 or 32 bit)        one scale per output channel and group of 128 k's
    W[n, k]  = s[n, k // group] * q[n, k]

Packed layout (``pack_int4``): ``uint8 [N, K // 2]``, two nibbles per byte along K — byte
``j`` of row ``n`` holds ``q[n, 2j]`` in bits 0-3 and ``q[n, 2j+1]`` in bits 4-7, each as
4-bit two's complement. Rows stay K-major like the int8 weights, so a kernel tile is a
contiguous run of bytes per output channel.

Semantics (the reference)::

    y[m, n] = fp16( sum_g s[n, g] * sum_{k in g} float32(x[m, k]) * q[n, k]  (+ bias[n]) )

Inner group sums are exact products of fp16 activations and small integers accumulated in
float32; the scale multiplies each group's float32 partial sum. Kernels (Triton, CUDA):

* ``kernel="gemv"`` (default for M == 1): that arithmetic on CUDA cores in another order
  (the scale multiplies partial sums of 8 k's, which add up to the group sum), with the
  products of each 8 k's taken and summed in float16 (``q / 8`` is exact in float16, so
  the sums stay finite for |x| up to 8188); float32 from there on.
* ``kernel="dot"`` (default for 2 <= M <= 16, any M works in 16-row tiles): dequantizes
  each weight tile to float16 ``W = fp16(q * s16)`` (scales rounded to float16 first) — the
  weights a float16 model would hold — and runs float16 tensor-core dots with float32
  accumulation (split along K into up to 8 float32 partial sums added at the end), so it
  differs from the reference by the float16 rounding of W.

Both agree with the reference to better than 1e-3 relative (norm of the difference over
the norm of the output). A dense fp16 GEMM is faster than either for M > 16.
"""

from __future__ import annotations

import numpy as np

__all__ = ["pack_int4", "unpack_int4", "quantize_int4_groupwise", "w4a16_gemm", "w4a16_gemm_reference",
           "w4a16_gemm_numpy", "GROUP_SIZE"]

GROUP_SIZE = 128


def _torch():
    import torch

    return torch


def _is_torch(t) -> bool:
    return type(t).__module__.startswith("torch")


def pack_int4(w_q):
    """int8 ``[N, K]`` with values in [-8, 7] (K even) -> uint8 ``[N, K // 2]`` (see module
    docstring). Accepts and returns numpy arrays or torch tensors (same device)."""
    if _is_torch(w_q):
        torch = _torch()
        if w_q.dim() != 2 or w_q.shape[1] % 2:
            raise ValueError(f"pack_int4: w_q must be [N, K] with K even, got shape {tuple(w_q.shape)}")
        if w_q.numel() and (int(w_q.min()) < -8 or int(w_q.max()) > 7):
            raise ValueError(f"pack_int4: values must be in [-8, 7], got [{int(w_q.min())}, {int(w_q.max())}]")
        u = (w_q.to(torch.int16) & 0xF).to(torch.uint8)
        return (u[:, 0::2] | (u[:, 1::2] << 4)).contiguous()
    w = np.asarray(w_q)
    if w.ndim != 2 or w.shape[1] % 2:
        raise ValueError(f"pack_int4: w_q must be [N, K] with K even, got shape {w.shape}")
    if w.size and (w.min() < -8 or w.max() > 7):
        raise ValueError(f"pack_int4: values must be in [-8, 7], got [{w.min()}, {w.max()}]")
    u = (w.astype(np.int16) & 0xF).astype(np.uint8)
    return np.ascontiguousarray(u[:, 0::2] | (u[:, 1::2] << 4))


def unpack_int4(packed):
    """Inverse of :func:`pack_int4`: uint8 ``[N, K // 2]`` -> int8 ``[N, K]`` in [-8, 7]."""
    if _is_torch(packed):
        torch = _torch()
        p = packed.view(torch.uint8).to(torch.int16)
        lo, hi = p & 0xF, p >> 4
        lo, hi = lo - ((lo >= 8) * 16), hi - ((hi >= 8) * 16)
        return torch.stack((lo, hi), dim=2).reshape(p.shape[0], -1).to(torch.int8)
    p = np.asarray(packed).view(np.uint8)
    lo = (p & 0xF).astype(np.int8)
    hi = (p >> 4).astype(np.int8)
    lo = np.where(lo >= 8, lo - 16, lo).astype(np.int8)
    hi = np.where(hi >= 8, hi - 16, hi).astype(np.int8)
    out = np.empty((p.shape[0], p.shape[1] * 2), np.int8)
    out[:, 0::2], out[:, 1::2] = lo, hi
    return out


def quantize_int4_groupwise(w, group: int = GROUP_SIZE):
    """RTN symmetric int4 per group along K: ``w`` float ``[N, K]`` -> (q int8 ``[N, K]``,
    s float32 ``[N, K // group]``) with ``s = absmax / 7`` (1 for an all-zero group) and
    ``q = clamp(rint(w / s), -8, 7)``. numpy in, numpy out (torch in, torch out)."""
    if _is_torch(w):
        torch = _torch()
        q, s = quantize_int4_groupwise(w.detach().cpu().float().numpy(), group)
        return torch.from_numpy(q).to(w.device), torch.from_numpy(s).to(w.device)
    w = np.asarray(w, np.float32)
    n, k = w.shape
    if k % group:
        raise ValueError(f"quantize_int4_groupwise: K={k} is not a multiple of the group size {group}")
    g = w.reshape(n, k // group, group)
    absmax = np.abs(g).max(axis=2)
    s = np.where(absmax > 0, absmax / np.float32(7), np.float32(1)).astype(np.float32)
    q = np.clip(np.rint(g / s[:, :, None]), -8, 7).astype(np.int8).reshape(n, k)
    return q, s


def w4a16_gemm_numpy(x, w_packed, scales, bias=None, group: int = GROUP_SIZE) -> np.ndarray:
    """NumPy reference (module docstring): float32 group sums, float16 output."""
    x = np.asarray(x, np.float32)
    q = unpack_int4(w_packed).astype(np.float32)
    n, k = q.shape
    if x.ndim != 2 or x.shape[1] != k:
        raise ValueError(f"w4a16_gemm: x must be [M, {k}], got {x.shape}")
    s = np.asarray(scales, np.float32).reshape(n, k // group)
    g = k // group
    xg = x.reshape(-1, g, group).transpose(1, 0, 2)  # [G, M, group]
    qg = q.reshape(n, g, group).transpose(1, 2, 0)  # [G, group, N]
    part = np.matmul(xg, qg)  # [G, M, N] float32 group sums
    y = (part * s.T[:, None, :]).sum(axis=0, dtype=np.float32)
    if bias is not None:
        y = y + np.asarray(bias, np.float32)[None]
    return y.astype(np.float16)


def w4a16_gemm_reference(x, w_packed, scales, bias=None, group: int = GROUP_SIZE):
    """Torch wrapper of the NumPy reference (same device as ``x``)."""
    torch = _torch()

    def np_(t):
        return None if t is None else t.detach().cpu().numpy()

    y = w4a16_gemm_numpy(np_(x.float()), np_(w_packed), np_(scales.float()), np_(bias.float() if bias is not None else None), group)
    return torch.from_numpy(y).to(x.device)


def w4a16_gemm(x, w_packed, scales, bias=None, group: int = GROUP_SIZE, *, backend: str = "auto", kernel: str = "auto"):
    """``x`` float16 ``[M, K]`` x packed int4 ``[N, K // 2]`` (scales ``[N, K // group]``) -> float16 ``[M, N]``.

    Triton on CUDA tensors, the reference elsewhere (or with ``backend="reference"``).
    ``kernel``: "auto" (gemv for M == 1, dot otherwise), "gemv" or "dot". K must be a
    multiple of ``group`` (a power of two >= 32; 128 by default).
    """
    torch = _torch()
    if x.dim() != 2 or w_packed.dim() != 2 or x.shape[1] != 2 * w_packed.shape[1]:
        raise ValueError(f"w4a16_gemm: x [M, K] and w_packed [N, K // 2] expected, got {tuple(x.shape)}, {tuple(w_packed.shape)}")
    M, K = x.shape
    N = w_packed.shape[0]
    if K % group or tuple(scales.shape) != (N, K // group):
        raise ValueError(f"w4a16_gemm: K={K} must be a multiple of group={group} and scales [N, K // group] = {(N, K // group)}, got {tuple(scales.shape)}")
    use_ref = backend == "reference" or not x.is_cuda
    if not use_ref:
        try:
            from . import _triton_w4a16 as tw
        except ImportError:
            use_ref = True
    if use_ref:
        return w4a16_gemm_reference(x, w_packed, scales, bias, group)
    if kernel == "auto":
        kernel = "gemv" if M == 1 else "dot"
    if kernel not in ("gemv", "dot"):
        raise ValueError(f"w4a16_gemm: kernel must be 'auto', 'gemv' or 'dot', got {kernel!r}")
    x = x.to(torch.float16)
    if x.stride(1) != 1:
        x = x.contiguous()
    w = w_packed.contiguous().view(torch.int8)
    s = scales.contiguous()
    b = bias.contiguous() if bias is not None else None
    y = torch.empty((M, N), device=x.device, dtype=torch.float16)
    if M and N:
        tw.launch(x, w, s, b, y, group, kernel)
    return y
