"""Triton kernels behind ``quantize.py`` (imported only where triton is installed).

One program per row (token). ``_quant_row_kernel``: absmax of the row in float32, scale =
absmax / 127 (1.0 for an all-zero row), ``q = clamp(rint(x / scale), -127, 127)`` with the
IEEE division ``div_rn``, so codes are bit-exact with the NumPy reference. Rows longer than
``BLOCK`` are read twice (absmax pass, then quantize pass; the second read hits L2).
``_add_ln_quant_kernel``: ``h = x + residual`` (stored, the next residual), LayerNorm of h
in float32, then the same quantization of the normalized row, in one pass over the row
(the row must fit one block).
"""

from __future__ import annotations

import triton
import triton.language as tl

try:
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover
    from triton.language.extra.cuda import libdevice


@triton.jit
def _quant_store(y, absmax, q_ptrs, s_ptr, mask):
    scale = tl.where(absmax > 0, tl.math.div_rn(absmax, 127.0), 1.0)
    q = libdevice.rint(tl.math.div_rn(y, tl.zeros_like(y) + scale))
    q = tl.minimum(tl.maximum(q, -127.0), 127.0)
    tl.store(q_ptrs, q.to(tl.int8), mask=mask)
    tl.store(s_ptr, scale)


@triton.jit
def _quant_row_kernel(x_ptr, q_ptr, s_ptr, K, stride_xm, stride_qm, BLOCK: tl.constexpr, SINGLE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xm
    q_row = q_ptr + row * stride_qm
    cols = tl.arange(0, BLOCK)
    if SINGLE:
        mask = cols < K
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        absmax = tl.max(tl.abs(x), axis=0)
        _quant_store(x, absmax, q_row + cols, s_ptr + row, mask)
    else:
        amax = tl.zeros((BLOCK,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK):
            mask = k0 + cols < K
            x = tl.load(x_row + k0 + cols, mask=mask, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(x))
        absmax = tl.max(amax, axis=0)
        scale = tl.where(absmax > 0, tl.math.div_rn(absmax, 127.0), 1.0)
        for k0 in range(0, K, BLOCK):
            mask = k0 + cols < K
            x = tl.load(x_row + k0 + cols, mask=mask, other=0.0).to(tl.float32)
            q = libdevice.rint(tl.math.div_rn(x, tl.zeros_like(x) + scale))
            q = tl.minimum(tl.maximum(q, -127.0), 127.0)
            tl.store(q_row + k0 + cols, q.to(tl.int8), mask=mask)
        tl.store(s_ptr + row, scale)


@triton.jit
def _add_ln_quant_kernel(x_ptr, r_ptr, h_ptr, w_ptr, b_ptr, q_ptr, s_ptr, K, eps,
                         stride_xm, stride_rm, stride_hm, stride_qm, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < K
    x = tl.load(x_ptr + row * stride_xm + cols, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(r_ptr + row * stride_rm + cols, mask=mask, other=0.0).to(tl.float32)
    h = x + r
    tl.store(h_ptr + row * stride_hm + cols, h.to(h_ptr.dtype.element_ty), mask=mask)
    mean = tl.sum(h, axis=0) / K
    d = tl.where(mask, h - mean, 0.0)
    var = tl.sum(d * d, axis=0) / K
    rstd = 1.0 / tl.sqrt_rn(var + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    y = d * rstd * w
    if HAS_BIAS:
        y = y + tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    y = tl.where(mask, y, 0.0)
    absmax = tl.max(tl.abs(y), axis=0)
    _quant_store(y, absmax, q_ptr + row * stride_qm + cols, s_ptr + row, mask)


MAX_SINGLE = 16384


def quant_rows(x, q, s) -> None:
    M, K = x.shape
    single = K <= MAX_SINGLE
    block = triton.next_power_of_2(K) if single else 4096
    warps = 4 if block <= 2048 else (8 if block <= 8192 else 16)
    _quant_row_kernel[(M,)](x, q, s, K, x.stride(0), q.stride(0), BLOCK=block, SINGLE=single, num_warps=warps)


def add_ln_quant(x, r, h, w, b, q, s, eps: float) -> None:
    M, K = x.shape
    block = triton.next_power_of_2(K)
    warps = 4 if block <= 2048 else (8 if block <= 8192 else 16)
    _add_ln_quant_kernel[(M,)](x, r, h, w, b if b is not None else w, q, s, K, float(eps),
                               x.stride(0), r.stride(0), h.stride(0), q.stride(0),
                               HAS_BIAS=b is not None, BLOCK=block, num_warps=warps)
