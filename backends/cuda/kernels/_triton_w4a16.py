"""Triton kernels behind ``w4a16_gemm.py`` (imported only where triton is installed).

Weights arrive packed: byte ``p[n, j]`` holds ``q[n, 2j]`` in its low nibble and
``q[n, 2j+1]`` in its high nibble (two's complement, [-8, 7]); scales ``s[n, g]``, one per
group of ``GROUP`` (128) K-elements. Both kernels are weight-streaming (memory-bound) and
read each weight tile as a 3-D block ``[BLOCK_N, BLOCK_K // GROUP, GROUP // 2]`` of bytes
(contiguous per output channel). The autotuner chooses per shape between triton's software
pipeliner (``num_stages`` tiles in flight) and a register double-buffer (``PREFETCH``: the
next tile's bytes and scales loaded one iteration ahead). Nibbles become numbers without int->float conversions: a nibble
``u`` xor'ed into the bit pattern of 2**23 (or 1024 in float16) with its sign bit flipped,
``(u ^ 8) = q + 8``, reads as ``2**23 + 8 + q``; one subtraction gives ``q`` exactly.

``_w4a16_gemv_kernel`` (M == 1, one program per BLOCK_N channels and row): CUDA-core
multiply-adds in float32, each group's sum scaled in float32 — the reference's arithmetic.
``_w4a16_dot_kernel`` (2 <= M <= 16, a 16-row tile): dequantizes the tile to float16
``W = fp16(q * s)`` (as a float16 layer with dequantized weights would hold it),
interleaves low/high nibbles back into K order (``tl.join`` + reshape) and runs one float16
tensor-core dot per tile with float32 accumulation.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._autotune import autotune


def _cfg(bn, bk, stages, warps, prefetch):
    return triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "PREFETCH": prefetch}, num_stages=stages, num_warps=warps)


# PREFETCH=False leaves the loads in the loop body to triton's software pipeliner (num_stages
# deep; a loop without a dot pipelines all its loads); PREFETCH=True double-buffers in registers.
GEMV_CONFIGS = [_cfg(*c) for c in [(8, 1024, 1, 4, True), (16, 512, 1, 4, True), (16, 1024, 1, 4, True),
                                   (8, 1024, 3, 4, False), (16, 512, 3, 4, False), (16, 512, 4, 4, False),
                                   (32, 256, 4, 4, False), (8, 512, 4, 4, False), (16, 1024, 3, 8, False),
                                   (32, 512, 3, 8, False)]]
DOT_CONFIGS = [_cfg(*c) for c in [(32, 256, 3, 4, True), (16, 512, 3, 4, True), (16, 256, 3, 4, True),
                                  (32, 256, 3, 4, False), (32, 256, 4, 4, False), (16, 256, 4, 4, False),
                                  (64, 256, 3, 4, False), (32, 512, 3, 4, False), (16, 512, 3, 4, False),
                                  (64, 128, 4, 4, False)]]


def _prune(configs, named_args, **kwargs):
    k = named_args["K"]
    out = [c for c in configs if k % c.kwargs["BLOCK_K"] == 0]
    return out or [_cfg(16, 128, 3, 4, False)]


@triton.jit
def _gemv_tile(p, s, xe, xo):
    """[BN, G, HALF] packed bytes, [BN, G] scales, [G, HALF] even/odd x -> [BN] float32."""
    pi = p.to(tl.int32)
    lo = ((pi & 0xF) ^ 0x4B000008).to(tl.float32, bitcast=True) - 8388616.0
    hi = (((pi >> 4) & 0xF) ^ 0x4B000008).to(tl.float32, bitcast=True) - 8388616.0
    part = tl.sum(lo * xe[None, :, :] + hi * xo[None, :, :], axis=2)  # [BN, G] group sums
    return tl.sum(part * s.to(tl.float32), axis=1)


@autotune(configs=GEMV_CONFIGS, key=["N", "K"], prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _w4a16_gemv_kernel(x_ptr, w_ptr, s_ptr, bias_ptr, y_ptr, N, K, stride_xm, stride_wn, stride_sn, stride_ym,
                       HAS_BIAS: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       PREFETCH: tl.constexpr):
    pid_n = tl.program_id(0)
    m = tl.program_id(1)
    HALF: tl.constexpr = GROUP // 2
    G: tl.constexpr = BLOCK_K // GROUP
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rn_w = rn % N  # wrapped rows are computed but never stored
    rg = tl.arange(0, G)
    rh = tl.arange(0, HALF)
    w_ptrs = w_ptr + (rn_w[:, None, None].to(tl.int64) * stride_wn + rg[None, :, None] * HALF + rh[None, None, :])
    s_ptrs = s_ptr + (rn_w[:, None] * stride_sn + rg[None, :])
    x_even = x_ptr + m * stride_xm + rg[:, None] * GROUP + 2 * rh[None, :]  # [G, HALF]
    n_tiles = K // BLOCK_K
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if PREFETCH:
        p = tl.load(w_ptrs)
        s = tl.load(s_ptrs)
        for i in range(n_tiles):
            k0 = i * BLOCK_K
            nxt = tl.minimum(i + 1, n_tiles - 1) * BLOCK_K  # the last iteration re-reads its own tile
            p_next = tl.load(w_ptrs + nxt // 2)
            s_next = tl.load(s_ptrs + nxt // GROUP)
            xe = tl.load(x_even + k0).to(tl.float32)
            xo = tl.load(x_even + k0 + 1).to(tl.float32)
            acc += _gemv_tile(p, s, xe, xo)
            p = p_next
            s = s_next
    else:
        for i in range(n_tiles):
            k0 = i * BLOCK_K
            p = tl.load(w_ptrs + k0 // 2)
            s = tl.load(s_ptrs + k0 // GROUP)
            xe = tl.load(x_even + k0).to(tl.float32)
            xo = tl.load(x_even + k0 + 1).to(tl.float32)
            acc += _gemv_tile(p, s, xe, xo)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn_w).to(tl.float32)
    tl.store(y_ptr + m * stride_ym + rn, acc.to(y_ptr.dtype.element_ty), mask=rn < N)


@triton.jit
def _dot_weights(p, s, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """[BN, G, HALF] packed bytes, [BN, G] scales -> float16 W [BN, BLOCK_K] in K order."""
    pi = p.to(tl.int32)
    sc = s.to(tl.float16)[:, :, None]
    lo = ((pi & 0xF) ^ 0x6408).to(tl.int16).to(tl.float16, bitcast=True)
    hi = (((pi >> 4) & 0xF) ^ 0x6408).to(tl.int16).to(tl.float16, bitcast=True)
    lo = (lo - 1032.0).to(tl.float16) * sc
    hi = (hi - 1032.0).to(tl.float16) * sc
    return tl.reshape(tl.join(lo, hi), (BLOCK_N, BLOCK_K))  # k = 2j + (0: low, 1: high nibble)


@autotune(configs=DOT_CONFIGS, key=["M_BUCKET", "N", "K"], prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _w4a16_dot_kernel(x_ptr, w_ptr, s_ptr, bias_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_sn, stride_ym, M_BUCKET,
                      HAS_BIAS: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, PREFETCH: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    HALF: tl.constexpr = GROUP // 2
    G: tl.constexpr = BLOCK_K // GROUP
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = rm < M
    rn_w = rn % N
    rg = tl.arange(0, G)
    rh = tl.arange(0, HALF)
    rk = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + (rn_w[:, None, None].to(tl.int64) * stride_wn + rg[None, :, None] * HALF + rh[None, None, :])
    s_ptrs = s_ptr + (rn_w[:, None] * stride_sn + rg[None, :])
    x_ptrs = x_ptr + rm[:, None] * stride_xm + rk[None, :]
    n_tiles = K // BLOCK_K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if PREFETCH:
        p = tl.load(w_ptrs)
        s = tl.load(s_ptrs)
        for i in range(n_tiles):
            k0 = i * BLOCK_K
            nxt = tl.minimum(i + 1, n_tiles - 1) * BLOCK_K
            p_next = tl.load(w_ptrs + nxt // 2)
            s_next = tl.load(s_ptrs + nxt // GROUP)
            x = tl.load(x_ptrs + k0, mask=mask_m[:, None], other=0.0).to(tl.float16)
            acc = tl.dot(x, tl.trans(_dot_weights(p, s, BLOCK_N, BLOCK_K)), acc)
            p = p_next
            s = s_next
    else:
        for i in range(n_tiles):
            k0 = i * BLOCK_K
            p = tl.load(w_ptrs + k0 // 2)
            s = tl.load(s_ptrs + k0 // GROUP)
            x = tl.load(x_ptrs + k0, mask=mask_m[:, None], other=0.0).to(tl.float16)
            acc = tl.dot(x, tl.trans(_dot_weights(p, s, BLOCK_N, BLOCK_K)), acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn_w).to(tl.float32)[None, :]
    y_ptrs = y_ptr + rm[:, None] * stride_ym + rn[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & (rn < N)[None, :])


def launch(x, w_packed, scales, bias, y, group: int, kernel: str) -> None:
    M, K = x.shape
    N = w_packed.shape[0]
    b = bias if bias is not None else scales
    if kernel == "gemv":
        def grid(meta):
            return (triton.cdiv(N, meta["BLOCK_N"]), M)

        _w4a16_gemv_kernel[grid](x, w_packed, scales, b, y, N, K, x.stride(0), w_packed.stride(0), scales.stride(0),
                                 y.stride(0), HAS_BIAS=bias is not None, GROUP=group)
        return
    block_m = 16

    def grid(meta):
        return (triton.cdiv(N, meta["BLOCK_N"]), triton.cdiv(M, block_m))

    _w4a16_dot_kernel[grid](x, w_packed, scales, b, y, M, N, K, x.stride(0), w_packed.stride(0), scales.stride(0),
                            y.stride(0), max(16, triton.next_power_of_2(M)), HAS_BIAS=bias is not None, GROUP=group,
                            BLOCK_M=block_m)
