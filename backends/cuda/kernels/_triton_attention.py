"""Triton kernel behind :func:`qpass.backends.cuda.kernels.quantized_attention` (imported only
where triton is installed).

One program computes ``BLOCK_M`` query rows of one (batch, head) in two passes over the keys,
so the ``[M, N]`` score matrix never reaches memory:

1. ``s = (q @ k^T) * sm_scale (+ mask)``; running row max ``m`` and sum ``l = sum exp(s - m)``;
2. ``s`` again, ``p = exp(s - m) / l`` (the exact softmax row), then the Q->DQ of the
   probabilities ``(clamp(rint(p * p_inv) + p_zero, p_lo, p_hi) - p_zero) * p_scale`` in
   registers, and ``acc += p @ v`` on the tensor cores (float16 operands, float32 accumulator).

The second pass repeats the ``q @ k^T`` work (a quantized ``P`` needs each row's final max and
sum before any of it is rounded); the memory traffic of the scores, which dominates an
unfused attention at sequence length 512, is gone.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _scores(q, k_ptrs, mask_ptrs, rm, rn, M, N, sm_scale, HAS_MASK: tl.constexpr, EVEN_N: tl.constexpr):
    if EVEN_N:
        k = tl.load(k_ptrs)
    else:
        k = tl.load(k_ptrs, mask=rn[None, :] < N, other=0.0)
    s = tl.dot(q, k) * sm_scale
    if HAS_MASK:
        s += tl.load(mask_ptrs, mask=(rm[:, None] < M) & (rn[None, :] < N), other=0.0).to(tl.float32)
    if not EVEN_N:
        s = tl.where(rn[None, :] < N, s, float("-inf"))
    return s


@triton.jit
def _quantized_attention_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, o_ptr, H, M, N, sm_scale, p_inv, p_scale, p_zero, p_lo, p_hi,
    sq_b, sq_h, sq_m, sq_d, sk_b, sk_h, sk_n, sk_d, sv_b, sv_h, sv_n, sv_d,
    sm_b, sm_h, sm_m, sm_n, so_b, so_h, so_m, so_d,
    HAS_MASK: tl.constexpr, EVEN_N: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rd = tl.arange(0, D)
    rn0 = tl.arange(0, BLOCK_N)
    q = tl.load(q_ptr + b * sq_b + h * sq_h + rm[:, None] * sq_m + rd[None, :] * sq_d, mask=rm[:, None] < M, other=0.0)
    k_base = k_ptr + b * sk_b + h * sk_h + rd[:, None] * sk_d  # k^T tile [D, BLOCK_N]
    mask_base = mask_ptr + b * sm_b + h * sm_h + rm[:, None] * sm_m
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    for j in range(0, tl.cdiv(N, BLOCK_N)):
        rn = j * BLOCK_N + rn0
        s = _scores(q, k_base + rn[None, :] * sk_n, mask_base + rn[None, :] * sm_n, rm, rn, M, N, sm_scale, HAS_MASK, EVEN_N)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a block masked out so far: no NaN from -inf - -inf
        l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(s - m_safe[:, None]), 1)
        m_i = m_new
    acc = tl.zeros((BLOCK_M, D), tl.float32)
    v_base = v_ptr + b * sv_b + h * sv_h + rd[None, :] * sv_d
    for j in range(0, tl.cdiv(N, BLOCK_N)):
        rn = j * BLOCK_N + rn0
        s = _scores(q, k_base + rn[None, :] * sk_n, mask_base + rn[None, :] * sm_n, rm, rn, M, N, sm_scale, HAS_MASK, EVEN_N)
        p = tl.exp(s - tl.where(m_i == float("-inf"), 0.0, m_i)[:, None]) / l_i[:, None]
        # round half to even: adding 1.5 * 2^23 leaves the integer part in the mantissa (p * p_inv < 2^22)
        code = tl.minimum(tl.maximum(((p * p_inv + 12582912.0) - 12582912.0) + p_zero, p_lo), p_hi)
        p = (code - p_zero) * p_scale
        if EVEN_N:
            v = tl.load(v_base + rn[:, None] * sv_n)
        else:
            v = tl.load(v_base + rn[:, None] * sv_n, mask=rn[:, None] < N, other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc)
    o = o_ptr + b * so_b + h * so_h + rm[:, None] * so_m + rd[None, :] * so_d
    tl.store(o, acc.to(o_ptr.dtype.element_ty), mask=rm[:, None] < M)


def launch(q, k, v, mask, out, sm_scale: float, p_scale: float, p_zero: int, p_lo: int, p_hi: int) -> None:
    """``q`` [B, H, M, D], ``k`` and ``v`` [B, H, N, D] (any strides), ``mask`` broadcastable to
    [B, H, M, N] (expanded with zero strides) or None, ``out`` [B, H, M, D]."""
    import numpy as np

    B, H, M, D = q.shape
    N = k.shape[2]
    block_m, block_n = (64, 64) if D <= 64 else (64, 32)
    if mask is not None:
        mask = mask.expand(B, H, M, N)
        ms = mask.stride()
    else:
        mask, ms = q, (0, 0, 0, 0)
    grid = (triton.cdiv(M, block_m), B * H)
    p_inv = float(np.float32(1.0) / np.float32(p_scale))
    _quantized_attention_kernel[grid](
        q, k, v, mask, out, H, M, N, float(sm_scale), p_inv, float(p_scale), float(p_zero), float(p_lo), float(p_hi),
        *q.stride(), *k.stride(), *v.stride(), *ms, *out.stride(),
        HAS_MASK=mask is not q, EVEN_N=N % block_n == 0, D=D, BLOCK_M=block_m, BLOCK_N=block_n,
        num_warps=4, num_stages=2,
    )
