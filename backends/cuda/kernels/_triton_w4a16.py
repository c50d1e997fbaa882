"""Triton kernels behind ``w4a16_gemm.py`` (imported only where triton is installed).

Weights arrive packed: byte ``p[n, j]`` holds ``q[n, 2j]`` in its low nibble and
``q[n, 2j+1]`` in its high nibble (two's complement, [-8, 7]); scales ``s[n, g]``, one per
group of ``GROUP`` (128) K-elements. Both kernels are weight-streaming (memory-bound).
Nibbles become numbers without int->float conversions: a nibble ``u`` xor'ed into the bit
pattern of 2**23 (or 1024 in float16) with its sign bit flipped, ``(u ^ 8) = q + 8``, reads
as ``2**23 + 8 + q``; one subtraction gives ``q`` exactly.

``_w4a16_gemv_kernel`` (M == 1, one program per BLOCK_N channels and row): reads the weights
as int32 words (8 nibbles, ``k = 8 w + j`` in nibble ``j``) in ``[BLOCK_N, BLOCK_K // 8]``
tiles and x as int32 float16 pairs. Inline PTX (``_WORD_DOT``) turns each word into four
float16x2 registers holding ``q / 8`` (prmt + lop3 + one fma per pair, exact) and multiplies
them with x in float16x2: 8 products per word summed in float16, then float32. Each word's sum
is scaled by its group's scale into a 2-D float32 accumulator reduced once at the end. Half
the integer work of a nibble-at-a-time float32 dequantization, which left the GEMV
ALU-bound rather than memory-bound.
``_w4a16_dot_kernel`` (2 <= M <= 16, a 16-row tile): reads ``[BLOCK_N, BLOCK_K // GROUP,
GROUP // 2]`` byte tiles, dequantizes them to float16 ``W = fp16(q * s)`` (as a float16
layer with dequantized weights would hold it), interleaves low/high nibbles back into K
order (``tl.join`` + reshape) and runs one float16 tensor-core dot per tile with float32
accumulation. Its autotuner chooses between triton's software pipeliner (``num_stages``
tiles in flight) and a register double-buffer (``PREFETCH``: the next tile loaded one
iteration ahead).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._autotune import autotune


def _cfg(bn, bk, stages, warps, prefetch):
    return triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "PREFETCH": prefetch}, num_stages=stages, num_warps=warps)


def _gemv_cfg(bn, bk, stages, warps):
    return triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_stages=stages, num_warps=warps)


GEMV_CONFIGS = [_gemv_cfg(*c) for c in [(4, 2048, 1, 2), (4, 2048, 1, 1), (8, 1024, 1, 1), (8, 2048, 1, 2),
                                        (16, 1024, 1, 2), (16, 512, 1, 2), (8, 1024, 1, 4), (4, 1024, 1, 2),
                                        (4, 1024, 1, 4), (4, 512, 1, 2), (4, 256, 1, 4), (8, 256, 1, 8),
                                        (2, 1024, 1, 4), (2, 256, 1, 2)]]
# PREFETCH=False leaves the loads in the loop body to triton's software pipeliner (num_stages
# deep); PREFETCH=True double-buffers in registers.
DOT_CONFIGS = [_cfg(*c) for c in [(32, 256, 3, 4, True), (16, 512, 3, 4, True), (16, 256, 3, 4, True),
                                  (32, 256, 3, 4, False), (32, 256, 4, 4, False), (16, 256, 4, 4, False),
                                  (64, 256, 3, 4, False), (32, 512, 3, 4, False), (16, 512, 3, 4, False),
                                  (64, 128, 4, 4, False)]]


def _prune(configs, named_args, **kwargs):
    k = named_args["K"]
    out = [c for c in configs if k % c.kwargs["BLOCK_K"] == 0]
    if out:
        return out
    bk = min(128, k & -k)  # the largest power of two dividing K: a multiple of the group
    return [_cfg(16, bk, 3, 4, False) if "PREFETCH" in configs[0].kwargs else _gemv_cfg(16, bk, 3, 4)]


# One int32 weight word (8 nibbles, k = 8w + j in nibble j) against four int32 words of x, each
# a float16 pair (x[8w + 2i], x[8w + 2i + 1]). Per pair i: prmt copies byte i into bytes 0 and
# 2, lop3 keeps nibble 2i in the low half and nibble 2i + 1 in the high half (x16) and xors in
# 0x6400 | 8 (0x6480), so the halves read 1024 + (q + 8) and 1024 + 16 (q + 8); one fma with
# (1/8, 1/128) and (-129, -9) gives q/8 in both, exactly. Four fp16x2 fmas multiply with x and
# sum; the two halves add in float16 and convert to float32 ($0). At most 8 |x| in float16.
_WORD_DOT = tl.constexpr("""
{
.reg .b32 d, z, t0, t1, t2, t3, msk, mag, mul, off, acc;
.reg .b16 h0, h1, h;
mov.b32 z, 0;
mov.b32 msk, 0x00F0000F;
mov.b32 mag, 0x64806408;
mov.b32 mul, 0x20003000;
mov.b32 off, 0xC880D808;
prmt.b32 d, $1, z, 0x4040;
lop3.b32 t0, d, msk, mag, 0x6A;
prmt.b32 d, $1, z, 0x4141;
lop3.b32 t1, d, msk, mag, 0x6A;
prmt.b32 d, $1, z, 0x4242;
lop3.b32 t2, d, msk, mag, 0x6A;
prmt.b32 d, $1, z, 0x4343;
lop3.b32 t3, d, msk, mag, 0x6A;
fma.rn.f16x2 t0, t0, mul, off;
fma.rn.f16x2 t1, t1, mul, off;
fma.rn.f16x2 t2, t2, mul, off;
fma.rn.f16x2 t3, t3, mul, off;
mul.rn.f16x2 acc, t0, $2;
fma.rn.f16x2 acc, t1, $3, acc;
fma.rn.f16x2 acc, t2, $4, acc;
fma.rn.f16x2 acc, t3, $5, acc;
mov.b32 {h0, h1}, acc;
add.rn.f16 h, h0, h1;
cvt.f32.f16 $0, h;
}
""")


@autotune(configs=GEMV_CONFIGS, key=["N", "K"], prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _w4a16_gemv_kernel(x_ptr, w_ptr, s_ptr, bias_ptr, y_ptr, N, K, stride_xm, stride_wn, stride_sn, stride_ym,
                       HAS_BIAS: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    m = tl.program_id(1)
    WORDS: tl.constexpr = BLOCK_K // 8  # int32 words (8 nibbles each) per row and tile
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rn_w = rn % N  # wrapped rows are computed but never stored
    rw = tl.arange(0, WORDS)
    w_ptrs = w_ptr + (rn_w[:, None].to(tl.int64) * stride_wn + rw[None, :])
    s_ptrs = s_ptr + (rn_w[:, None] * stride_sn + (rw[None, :] * 8) // GROUP)
    x_ptrs = x_ptr + m * stride_xm + rw * 4  # x as int32 float16 pairs: pair i of word w at 4w + i
    acc = tl.zeros((BLOCK_N, WORDS), dtype=tl.float32)
    for i in range(K // BLOCK_K):
        k0 = i * BLOCK_K
        w = tl.load(w_ptrs + k0 // 8)
        s = tl.load(s_ptrs + k0 // GROUP).to(tl.float32)
        p = x_ptrs + k0 // 2
        x0 = tl.broadcast_to(tl.load(p)[None, :], (BLOCK_N, WORDS))
        x1 = tl.broadcast_to(tl.load(p + 1)[None, :], (BLOCK_N, WORDS))
        x2 = tl.broadcast_to(tl.load(p + 2)[None, :], (BLOCK_N, WORDS))
        x3 = tl.broadcast_to(tl.load(p + 3)[None, :], (BLOCK_N, WORDS))
        part = tl.inline_asm_elementwise(_WORD_DOT, "=f,r,r,r,r,r", [w, x0, x1, x2, x3], dtype=tl.float32,
                                         is_pure=True, pack=1)
        acc += part * s
    y = tl.sum(acc, axis=1) * 8.0  # the words computed with q / 8
    if HAS_BIAS:
        y += tl.load(bias_ptr + rn_w).to(tl.float32)
    tl.store(y_ptr + m * stride_ym + rn, y.to(y_ptr.dtype.element_ty), mask=rn < N)


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

        w32 = w_packed.view(torch.int32)  # rows of K // 2 bytes: K is a multiple of the group (>= 32)
        if x.stride(0) % 2 or x.storage_offset() % 2:
            x = x.clone()  # an even offset and row stride: whole float16 pairs
        x32 = x.view(torch.int32)  # float16 pairs
        _w4a16_gemv_kernel[grid](x32, w32, scales, b, y, N, K, x32.stride(0), w32.stride(0), scales.stride(0),
                                 y.stride(0), HAS_BIAS=bias is not None, GROUP=group)
        return
    block_m = 16

    def grid(meta):
        return (triton.cdiv(N, meta["BLOCK_N"]), triton.cdiv(M, block_m))

    _w4a16_dot_kernel[grid](x, w_packed, scales, b, y, M, N, K, x.stride(0), w_packed.stride(0), scales.stride(0),
                            y.stride(0), max(16, triton.next_power_of_2(M)), HAS_BIAS=bias is not None, GROUP=group,
                            BLOCK_M=block_m)
