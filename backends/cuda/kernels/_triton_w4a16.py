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
GROUP // 2]`` byte tiles. Inline PTX (``_DEQUANT``, four bytes at a time) turns the low and the
high nibbles into two float16 tiles ``W = fp16(q * s)`` (as a float16 layer with dequantized
weights would hold them): the low nibbles are the even k's, the high nibbles the odd k's, so
one float16 tensor-core dot takes them with x's even columns and another with its odd
columns: no interleaving, and triton loads the bytes from shared memory straight into the
dot-operand layout. At M <= 16 the N tiles alone are too few to stream the weights at full
bandwidth, so ``SPLIT_K`` programs share one output tile: each stores its float32 partial sum
in its own workspace slot and bumps the tile's counter; the last one adds the slots in a fixed
order (for a given tile configuration, the same bytes every call), adds the bias, stores float16
and resets the counter: one launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._autotune import autotune


try:  # TMA tensor descriptors (triton >= 3.4)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older triton: pointer loads only
    TensorDescriptor = None


def _cfg(bn, bk, stages, warps, split_k, w_tma=False, x_tma=False):
    return triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split_k, "W_TMA": w_tma, "X_TMA": x_tma},
                         num_stages=stages, num_warps=warps, pre_hook=_tma_block_hook if w_tma else None)


def _tma_block_hook(nargs):
    nargs["w_desc"].block_shape = [nargs["BLOCK_N"], nargs["BLOCK_K"] // 2]
    if nargs["X_TMA"]:
        nargs["x_desc"].block_shape = [nargs["BLOCK_M"], nargs["BLOCK_K"]]


def _gemv_cfg(bn, bk, stages, warps):
    return triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_stages=stages, num_warps=warps)


GEMV_CONFIGS = [_gemv_cfg(*c) for c in [(4, 2048, 1, 2), (4, 2048, 1, 1), (8, 1024, 1, 1), (8, 2048, 1, 2),
                                        (16, 1024, 1, 2), (16, 512, 1, 2), (8, 1024, 1, 4), (4, 1024, 1, 2),
                                        (4, 1024, 1, 4), (4, 512, 1, 2), (4, 256, 1, 4), (8, 256, 1, 8),
                                        (2, 1024, 1, 4), (2, 256, 1, 2)]]
# (BLOCK_N, BLOCK_K, stages, warps, SPLIT_K): the fastest of a sweep at M = 4 and 16 on 4096 x 4096
# and 4096 x 11008 (H100), and split-free tiles for larger M.
# With TMA (Hopper): the weight tile (and x's) arrives by tensor descriptor, the fastest of a
# sweep of about 170 tile/stage/split/x-load variants at M = 4 and 16 on the same shapes.
DOT_CONFIGS = [_cfg(*c) for c in [(32, 128, 4, 2, 4), (32, 128, 2, 2, 8), (64, 128, 4, 4, 8), (128, 256, 4, 4, 4),
                                  (128, 128, 4, 4, 4), (32, 128, 4, 2, 2), (64, 128, 4, 4, 2), (128, 128, 4, 8, 8),
                                  (16, 128, 4, 1, 4), (32, 256, 2, 2, 4), (64, 128, 4, 4, 1), (32, 128, 4, 2, 1),
                                  (128, 256, 3, 4, 4, True), (64, 256, 3, 2, 4, True, True), (64, 128, 3, 2, 4, True, True),
                                  (128, 128, 3, 4, 4, True, True), (64, 256, 3, 4, 2, True), (64, 512, 3, 4, 2, True),
                                  (128, 256, 3, 4, 8, True), (64, 256, 3, 4, 1, True, True)]]
_KEYS = ("BLOCK_N", "BLOCK_K", "SPLIT_K", "W_TMA", "X_TMA")
_DECODE_TMA = {(128, 256, 4, True, False, 3, 4), (64, 256, 4, True, True, 3, 2), (64, 128, 4, True, True, 3, 2)}
MOST_SPLIT_K = max(c.kwargs["SPLIT_K"] for c in DOT_CONFIGS)
SPLIT_K_ROWS = 16  # split K (and hold a workspace) only up to this many rows


def _prune_gemv(configs, named_args, **kwargs):
    k = named_args["K"]
    # else the largest power of two dividing K, at most 128 (K is a multiple of the group)
    return [c for c in configs if k % c.kwargs["BLOCK_K"] == 0] or [_gemv_cfg(16, min(128, k & -k), 3, 4)]


def _prune_dot(configs, named_args, **kwargs):
    k, group = named_args["K"], kwargs.get("GROUP", named_args.get("GROUP", 128))  # a keyword: in kwargs
    most = MOST_SPLIT_K if named_args["M"] <= SPLIT_K_ROWS else 1  # more rows have tiles enough
    tma = named_args["w_desc"] is not None
    out = [c for c in configs if c.kwargs["SPLIT_K"] <= most and c.kwargs["BLOCK_K"] % group == 0
           and k % (c.kwargs["BLOCK_K"] * c.kwargs["SPLIT_K"]) == 0 and (tma or not c.kwargs["W_TMA"])
           and (named_args["x_desc"] is not None or not c.kwargs["X_TMA"])]
    if tma and named_args["M"] <= SPLIT_K_ROWS:
        # decode rows: the TMA configs that led the sweep (CUDA-graph replays streaming the weights
        # from HBM). The autotuner times single launches after an L2 flush, where pointer configs
        # can look faster and then lose by up to 30% back to back (4096 x 11008: 20.4 vs 15.3 us).
        out = [c for c in out if tuple(c.kwargs[f] for f in _KEYS) + (c.num_stages, c.num_warps) in _DECODE_TMA] or out
    return out or [_cfg(16, group, 3, 4, 1)]  # K is a multiple of the group


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


@autotune(configs=GEMV_CONFIGS, key=["N", "K"], prune_configs_by={"early_config_prune": _prune_gemv})
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


# Four packed bytes (elements j..j+3 of a row) and their four float16 scales (two registers) ->
# the low nibbles' fp16(q * s) in $0, $1 and the high nibbles' in $2, $3 (float16 pairs). prmt
# spreads bytes (0, 1) and (2, 3) into the two halves of a word; lop3 keeps the low nibbles and
# xors in 0x6408: 1024 + (q + 8), minus 1032 is q; or keeps the high nibbles and xors in 0x6480:
# 1024 + 16 (q + 8), times 1/16 minus 72 is q. All exact; one rounding in the multiply by s.
_DEQUANT = tl.constexpr("""
{
.reg .b32 d0, d1, z, t, c1032, c16, c72;
mov.b32 z, 0;
mov.b32 c1032, 0x64086408;
mov.b32 c16, 0x2C002C00;
mov.b32 c72, 0xD480D480;
prmt.b32 d0, $4, z, 0x4140;
prmt.b32 d1, $4, z, 0x4342;
lop3.b32 t, d0, 0x000F000F, 0x64086408, 0x6A;
sub.rn.f16x2 t, t, c1032;
mul.rn.f16x2 $0, t, $5;
lop3.b32 t, d1, 0x000F000F, 0x64086408, 0x6A;
sub.rn.f16x2 t, t, c1032;
mul.rn.f16x2 $1, t, $6;
lop3.b32 t, d0, 0x00F000F0, 0x64806480, 0x6A;
fma.rn.f16x2 t, t, c16, c72;
mul.rn.f16x2 $2, t, $5;
lop3.b32 t, d1, 0x00F000F0, 0x64806480, 0x6A;
fma.rn.f16x2 t, t, c16, c72;
mul.rn.f16x2 $3, t, $6;
}
""")


@autotune(configs=DOT_CONFIGS, key=["M_BUCKET", "N", "K"], prune_configs_by={"early_config_prune": _prune_dot})
@triton.jit
def _w4a16_dot_kernel(x_ptr, w_ptr, x_desc, w_desc, s_ptr, bias_ptr, y_ptr, ws_ptr, count_ptr, M, N, K, stride_xm,
                      stride_wn, stride_sn, stride_ym, M_BUCKET, HAS_BIAS: tl.constexpr, GROUP: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
                      W_TMA: tl.constexpr, X_TMA: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    HALF: tl.constexpr = GROUP // 2
    G: tl.constexpr = BLOCK_K // GROUP
    KH: tl.constexpr = BLOCK_K // 2
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = rm < M
    rn_w = rn % N  # wrapped rows are computed but never stored
    rg = tl.arange(0, G)
    rh = tl.arange(0, HALF)
    rk = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + (rn_w[:, None, None].to(tl.int64) * stride_wn + rg[None, :, None] * HALF + rh[None, None, :])
    s_ptrs = s_ptr + (rn_w[:, None] * stride_sn + rg[None, :])
    x_ptrs = x_ptr + rm[:, None] * stride_xm + rk[None, :]
    n_tiles = K // BLOCK_K // SPLIT_K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for i in range(pid_k * n_tiles, (pid_k + 1) * n_tiles):
        k0 = i * BLOCK_K
        if W_TMA:
            p = tl.reshape(w_desc.load([pid_n * BLOCK_N, k0 // 2]), (BLOCK_N, G, HALF))
        else:
            p = tl.load(w_ptrs + k0 // 2)
        s = tl.broadcast_to(tl.load(s_ptrs + k0 // GROUP).to(tl.float16)[:, :, None], (BLOCK_N, G, HALF))
        if X_TMA:  # rows past M read as zeros
            x = x_desc.load([pid_m * BLOCK_M, k0])
        else:
            x = tl.load(x_ptrs + k0, mask=mask_m[:, None], other=0.0)
        x_even, x_odd = tl.split(tl.reshape(x, (BLOCK_M, KH, 2)))
        lo, hi = tl.inline_asm_elementwise(_DEQUANT, "=r,=r,=r,=r,r,r,r", [p, s], dtype=(tl.float16, tl.float16),
                                           is_pure=True, pack=4)
        acc = tl.dot(x_even, tl.trans(tl.reshape(lo, (BLOCK_N, KH))), acc)
        acc = tl.dot(x_odd, tl.trans(tl.reshape(hi, (BLOCK_N, KH))), acc)
    mask = mask_m[:, None] & (rn < N)[None, :]
    offs = rm[:, None] * N + rn[None, :]
    if SPLIT_K > 1:  # partial sums into slot pid_k; the tile's last program adds the slots in order
        tl.store(ws_ptr + pid_k * M * N + offs, acc, mask=mask)
        tl.debug_barrier()  # every thread's partial sums precede the counter's release
        count = count_ptr + pid_m * tl.num_programs(0) + pid_n
        if tl.atomic_add(count, 1, sem="acq_rel") == SPLIT_K - 1:
            acc = tl.load(ws_ptr + offs, mask=mask, cache_modifier=".cg")
            for j in tl.static_range(1, SPLIT_K):
                acc += tl.load(ws_ptr + j * M * N + offs, mask=mask, cache_modifier=".cg")
            tl.atomic_xchg(count, 0, sem="relaxed")
            if HAS_BIAS:
                acc += tl.load(bias_ptr + rn_w).to(tl.float32)[None, :]
            tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn_w).to(tl.float32)[None, :]
        tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)


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
    tiles_m = triton.cdiv(M, block_m)
    split = M <= SPLIT_K_ROWS
    ws, count = _workspace(x.device, MOST_SPLIT_K * M * N if split else 0, tiles_m * triton.cdiv(N, 16) if split else 0)

    def grid(meta):
        return (triton.cdiv(N, meta["BLOCK_N"]), tiles_m, meta["SPLIT_K"])

    w_desc = x_desc = None
    if _tma_ok(w_packed):  # block shapes are set per config by the pre-hook
        w_desc = TensorDescriptor.from_tensor(w_packed, [1, 16])
        x_desc = TensorDescriptor.from_tensor(x, [1, 8]) if _tma_ok(x) else None
    _w4a16_dot_kernel[grid](x, w_packed, x_desc, w_desc, scales, b, y, ws, count, M, N, K, x.stride(0), w_packed.stride(0),
                            scales.stride(0), y.stride(0), max(16, triton.next_power_of_2(M)),
                            HAS_BIAS=bias is not None, GROUP=group, BLOCK_M=block_m)


def _tma_ok(t) -> bool:
    """A tensor a TMA descriptor can read: Hopper or newer, unit inner stride, 16-byte aligned rows and base."""
    return (TensorDescriptor is not None and torch.cuda.get_device_capability(t.device)[0] >= 9 and t.stride(1) == 1
            and (t.stride(0) * t.element_size()) % 16 == 0 and t.data_ptr() % 16 == 0)


_WORKSPACES: dict = {}  # (device, stream) -> [partial sums, counters]
_RETIRED: list = []  # outgrown buffers: a captured CUDA graph may still address them


def _workspace(device, size: int, tiles: int):
    """Per stream: room for the split-K partial sums (float32, one [M, N] slot per program along
    K) and the per-tile counters, which are zero between calls (each tile's last program resets
    its counter). Buffers only grow, and an outgrown one is kept alive, so a CUDA graph captured
    on this stream keeps valid addresses; ``capture()`` warms up on its capture stream, so the
    buffers exist before the graph records them."""
    key = (device, torch.cuda.current_stream(device).cuda_stream)
    found = _WORKSPACES.get(key)
    if found is None:
        found = _WORKSPACES[key] = [torch.empty(0, device=device, dtype=torch.float32),
                                    torch.zeros(0, device=device, dtype=torch.int32)]
    if found[0].numel() < size:
        _RETIRED.append(found[0])
        found[0] = torch.empty(size, device=device, dtype=torch.float32)
    if found[1].numel() < tiles:
        _RETIRED.append(found[1])
        found[1] = torch.zeros(tiles, device=device, dtype=torch.int32)
    return found
