"""Sweep: W4A16 decode-shape variants (M = 4..16) on the GPU, each checked, then timed as the benchmark does.

Variants: the shipped dot kernel forced to each of its configs and to one-stage "GEMV-like"
tiles (a whole K chunk per program, every load issued at once), and a swapped dot
(``acc[n, m] = W[n, :] . x[m, :]``: the dequantized weights are the dot's first operand,
held in registers, x the second; on Hopper a 64-row weight tile is one wgmma with N = 16).
Each variant is checked against the float64 reference (relative error < 1e-3) before it is
timed: CUDA-graph replays, weights rotated through >= 128 MB (``bench_cuda_gemm.time_calls``).

    python benchmarks/sweep_w4a16.py [--out DIR]          # needs a CUDA GPU + triton
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cuda_gemm import n_rotations, time_calls  # noqa: E402

from qpass.backends.cuda.kernels import _triton_w4a16 as tw  # noqa: E402
from qpass.backends.cuda.kernels import pack_int4, w4a16_gemm  # noqa: E402

SHAPES = [(4096, 4096), (4096, 11008)]
MS = [4, 16]
GROUP = 128


@triton.jit
def _swap_kernel(x_ptr, w_ptr, w_desc, s_ptr, y_ptr, ws_ptr, count_ptr, M, N, K, stride_xm, stride_wn, stride_sn,
                 stride_ym, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 SPLIT_K: tl.constexpr, W_TMA: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    HALF: tl.constexpr = GROUP // 2
    G: tl.constexpr = BLOCK_K // GROUP
    KH: tl.constexpr = BLOCK_K // 2
    rm = tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = rm < M
    rn_w = rn % N
    rg = tl.arange(0, G)
    rh = tl.arange(0, HALF)
    rk = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + (rn_w[:, None, None].to(tl.int64) * stride_wn + rg[None, :, None] * HALF + rh[None, None, :])
    s_ptrs = s_ptr + (rn_w[:, None] * stride_sn + rg[None, :])
    x_ptrs = x_ptr + rm[:, None] * stride_xm + rk[None, :]
    n_tiles = K // BLOCK_K // SPLIT_K
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for i in range(pid_k * n_tiles, (pid_k + 1) * n_tiles):
        k0 = i * BLOCK_K
        if W_TMA:
            p = tl.reshape(w_desc.load([pid_n * BLOCK_N, k0 // 2]), (BLOCK_N, G, HALF))
        else:
            p = tl.load(w_ptrs + k0 // 2)
        s = tl.broadcast_to(tl.load(s_ptrs + k0 // GROUP).to(tl.float16)[:, :, None], (BLOCK_N, G, HALF))
        x = tl.load(x_ptrs + k0, mask=mask_m[:, None], other=0.0)
        x_even, x_odd = tl.split(tl.reshape(x, (BLOCK_M, KH, 2)))
        lo, hi = tl.inline_asm_elementwise(tw._DEQUANT, "=r,=r,=r,=r,r,r,r", [p, s], dtype=(tl.float16, tl.float16),
                                           is_pure=True, pack=4)
        acc = tl.dot(tl.reshape(lo, (BLOCK_N, KH)), tl.trans(x_even), acc)
        acc = tl.dot(tl.reshape(hi, (BLOCK_N, KH)), tl.trans(x_odd), acc)
    mask = (rn < N)[:, None] & mask_m[None, :]
    offs = rm[None, :] * N + rn[:, None]
    if SPLIT_K > 1:
        tl.store(ws_ptr + pid_k * M * N + offs, acc, mask=mask)
        tl.debug_barrier()
        count = count_ptr + pid_n
        if tl.atomic_add(count, 1, sem="acq_rel") == SPLIT_K - 1:
            acc = tl.load(ws_ptr + offs, mask=mask, cache_modifier=".cg")
            for j in tl.static_range(1, SPLIT_K):
                acc += tl.load(ws_ptr + j * M * N + offs, mask=mask, cache_modifier=".cg")
            tl.atomic_xchg(count, 0, sem="relaxed")
            tl.store(y_ptr + rm[None, :] * stride_ym + rn[:, None], acc.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(y_ptr + rm[None, :] * stride_ym + rn[:, None], acc.to(y_ptr.dtype.element_ty), mask=mask)


def dot_call(x, w, s, y, ws, count, cfg):
    bn, bk, sk, stages, warps, w_tma, x_tma = cfg
    M, K = x.shape
    N = w.shape[0]
    w_desc = tw.TensorDescriptor.from_tensor(w, [bn, bk // 2]) if w_tma else None
    x_desc = tw.TensorDescriptor.from_tensor(x, [16, bk]) if x_tma else None
    grid = (triton.cdiv(N, bn), 1, sk)

    def call():
        tw._w4a16_dot_kernel.fn[grid](x, w, x_desc, w_desc, s, s, y, ws, count, M, N, K, x.stride(0), w.stride(0),
                                      s.stride(0), y.stride(0), 16, HAS_BIAS=False, GROUP=GROUP, BLOCK_M=16, BLOCK_N=bn,
                                      BLOCK_K=bk, SPLIT_K=sk, W_TMA=w_tma, X_TMA=x_tma, num_warps=warps,
                                      num_stages=stages)
    return call


def swap_call(x, w, s, y, ws, count, cfg):
    bn, bk, sk, stages, warps, w_tma = cfg
    M, K = x.shape
    N = w.shape[0]
    w_desc = tw.TensorDescriptor.from_tensor(w, [bn, bk // 2]) if w_tma else None
    grid = (triton.cdiv(N, bn), sk)

    def call():
        _swap_kernel[grid](x, w, w_desc, s, y, ws, count, M, N, K, x.stride(0), w.stride(0), s.stride(0), y.stride(0),
                           GROUP=GROUP, BLOCK_M=16, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=sk, W_TMA=w_tma, num_warps=warps,
                           num_stages=stages)
    return call


def dot_variants():
    shipped = [tuple(c.kwargs[k] for k in ("BLOCK_N", "BLOCK_K", "SPLIT_K")) + (c.num_stages, c.num_warps,
               c.kwargs["W_TMA"], c.kwargs["X_TMA"]) for c in tw.DOT_CONFIGS]
    gemv_like = [(bn, bk, sk, 1, warps, tma, False) for bn, bk, sk, warps in
                 [(16, 1024, 4, 4), (16, 2048, 2, 4), (16, 512, 8, 2), (32, 1024, 4, 4), (32, 512, 8, 4),
                  (32, 2048, 2, 8), (64, 1024, 4, 4), (64, 512, 8, 4), (16, 1024, 4, 2), (32, 1024, 2, 4)]
                 for tma in (False, True)]
    return [("dot", c) for c in shipped + gemv_like]


def swap_variants():
    return [("swap", (bn, bk, sk, stages, warps, tma)) for bn, warps in ((64, 4), (128, 4), (128, 8))
            for bk in (128, 256, 512) for sk in (2, 4, 8) for stages, tma in ((1, False), (3, True), (4, False))]


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=None)
    p.add_argument("--max-seconds", type=float, default=540.0)
    args = p.parse_args(argv)
    t_start = time.time()
    dev = torch.device("cuda")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}", flush=True)
    results = []
    variants = dot_variants() + swap_variants()
    for K, N in SHAPES:
        gen = torch.Generator().manual_seed(K + N)
        q = torch.randint(-8, 8, (N, K), generator=gen, dtype=torch.int8)
        s = (torch.rand(N, K // GROUP, generator=gen) * 0.02 + 1e-3).half()
        packed = pack_int4(q)
        rot = n_rotations(packed.numel(), 16 * N * 2)
        ws_list = [packed.cuda().view(torch.int8) for _ in range(rot)]
        s_cuda = s.cuda()
        w_fp16 = [(q.float() * s.float().repeat_interleave(GROUP, 1)).half().cuda() for _ in range(max(2, rot // 4))]
        for M in MS:
            x = torch.randn(M, K, generator=gen).half()
            ref = w4a16_gemm(x, packed, s, backend="reference").float()
            xc = x.cuda()
            fp16_ms = time_calls([lambda w=w: torch.matmul(xc, w.T) for w in w_fp16])
            auto_ms = time_calls([lambda w=w: w4a16_gemm(xc, w, s_cuda) for w in ws_list])
            base = {"K": K, "N": N, "M": M, "fp16_us": fp16_ms * 1e3, "shipped_auto_us": auto_ms * 1e3}
            print(f"\nK={K} N={N} M={M}: fp16 {fp16_ms * 1e3:.2f} us, shipped auto {auto_ms * 1e3:.2f} us "
                  f"({fp16_ms / auto_ms:.2f}x); target 2.5x = {fp16_ms * 1e3 / 2.5:.2f} us", flush=True)
            ws, count = tw._workspace(dev, tw.MOST_SPLIT_K * M * N, triton.cdiv(N, 16))
            rows = []
            for kind, cfg in variants:
                if time.time() - t_start > args.max_seconds:
                    break
                bn, bk, sk = cfg[:3]
                if K % (bk * sk):
                    continue
                y = torch.full((M, N), float("nan"), device=dev, dtype=torch.float16)
                make = dot_call if kind == "dot" else swap_call
                try:
                    make(xc, ws_list[0], s_cuda, y, ws, count, cfg)()
                    torch.cuda.synchronize()
                    err = float((y.float().cpu() - ref).norm() / ref.norm())
                    if not err < 1e-3 or count.any():
                        rows.append({"kind": kind, "cfg": cfg, "error": f"wrong: rel err {err:.2e}"})
                        count.zero_()
                        continue
                    us = time_calls([make(xc, w, s_cuda, y, ws, count, cfg) for w in ws_list], target_ms=60.0) * 1e3
                    rows.append({"kind": kind, "cfg": cfg, "us": us, "x_fp16": fp16_ms * 1e3 / us, "rel_err": err})
                except Exception as e:  # noqa: BLE001 - a config that does not compile is a sweep result
                    rows.append({"kind": kind, "cfg": cfg, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"})
            ok = sorted((r for r in rows if "us" in r), key=lambda r: r["us"])
            for r in ok[:10]:
                print(f"  {r['kind']:4s} {str(r['cfg']):42s} {r['us']:7.2f} us  {r['x_fp16']:.2f}x  err {r['rel_err']:.1e}")
            bad = [r for r in rows if "error" in r]
            print(f"  ({len(ok)} timed, {len(bad)} failed; e.g. {bad[0]['kind']} {bad[0]['cfg']}: {bad[0]['error']})"
                  if bad else f"  ({len(ok)} timed)", flush=True)
            best = {k: min((r for r in ok if r["kind"] == k), key=lambda r: r["us"], default=None) for k in ("dot", "swap")}
            for k, r in best.items():
                if r:
                    print(f"  best {k}: {r['cfg']} {r['us']:.2f} us = {r['x_fp16']:.2f}x fp16")
            results.append({**base, "rows": rows})
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "sweep_w4a16.json").write_text(json.dumps(results, indent=1, default=str))
    print(f"\nsweep took {time.time() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
