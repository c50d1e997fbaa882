"""Benchmark: the CUDA backend's integer kernels against cuBLAS, side by side in one run.

int8 GEMM rows (M in {1, 16, 128, 2048, 8192} x (K, N) in BERT/ViT and Llama-7B shapes):
  fp16        torch.matmul(x_fp16, W_fp16.T)            (cuBLAS, no bias)
  int_mm      torch._int_mm(a_q, W_q.T) -> int32         (cuBLASLt int8; needs M > 16; no epilogue)
  int_mm+epi  _int_mm then the epilogue in torch eager   (acc * s_a * s_w + bias -> fp16)
  ours        int8_gemm(a_q, W_q [N,K], s_a [M], s_w [N], bias) -> fp16, epilogue fused
  ptr / tma   ours forced to one kernel (M >= 128), to check the dispatch rule
  quant+ours  quantize_per_token(x_fp16) + ours: the whole dynamic W8A8 linear
W4A16 rows (M in {1, 4, 16}, (K, N) in {(4096, 4096), (4096, 11008)}): fp16 vs w4a16_gemm
(int4 RTN group 128, packed two per byte), and ours int8 at the same shape.

Timing: each candidate's calls are captured in a CUDA graph (after a warm-up that also runs
the Triton autotuner) and the graph is replayed with CUDA events around each replay; the
number reported is the median over replays divided by the calls per graph. Each call in a
graph reads a different copy of the weights (at least ~128 MB of int8 weights in rotation)
so decode shapes stream their weights from HBM rather than L2, as in a real model.
Every "ours" result is checked against an exact float64 product with the same epilogue.

    python benchmarks/bench_cuda_gemm.py [--out DIR] [--quick]     # needs a CUDA GPU + triton
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from qpass.backends.cuda.kernels import (
    int8_gemm,
    pack_int4,
    quantize_per_token,
    w4a16_gemm,
)

MS = [1, 16, 128, 2048, 8192]
KNS = [(768, 768), (768, 3072), (3072, 768), (4096, 4096), (4096, 11008)]
W4_MS = [1, 4, 16]
W4_KNS = [(4096, 4096), (4096, 11008)]

# Dense (no sparsity) tensor-core peaks from NVIDIA's datasheets: (INT8 TOPS, FP16 TFLOP/s).
PEAKS = {"H100 SXM": (1979.0, 989.4), "H100 PCIe": (1513.0, 756.0), "H100 NVL": (1671.0, 835.0), "H200": (1979.0, 989.4)}


def peak_for(name: str) -> tuple[str, float, float]:
    if "H200" in name:
        key = "H200"
    elif "PCIe" in name or "PCIE" in name:
        key = "H100 PCIe"
    elif "NVL" in name:
        key = "H100 NVL"
    else:
        key = "H100 SXM"
    return (key, *PEAKS[key])


def time_calls(calls, target_ms: float = 250.0) -> float:
    """Median milliseconds per call: the calls replayed as one CUDA graph (falls back to a
    plain launch loop timed with events if capture fails)."""
    for c in calls[: min(3, len(calls))]:
        c()
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for c in calls:
            c()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = None
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for c in calls:
                c()
        run = graph.replay
    except Exception as e:  # pragma: no cover - diagnostics
        print(f"  (graph capture failed: {type(e).__name__}: {e}; timing a launch loop)", flush=True)
        graph = None

        def run():
            for c in calls:
                c()
    run()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    run()
    end.record()
    end.synchronize()
    once = max(start.elapsed_time(end), 1e-3)
    reps = int(min(100, max(10, target_ms / once)))
    times = []
    for _ in range(reps):
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / len(calls))
    del graph
    return statistics.median(times)


def n_rotations(weight_bytes: int, out_bytes: int) -> int:
    n = math.ceil(128e6 / max(weight_bytes, 1))
    n = min(n, 200, max(2, int(2e9 // max(out_bytes, 1))))
    return max(2, n)


def exact_epilogue(a_q, w_q, sa, sb, bias):
    acc = a_q.double() @ w_q.double().T  # exact: |acc| < 2^53
    y = acc.float() * sa[:, None]
    return (y * sb[None, :] + bias[None, :])


def rel_err(got, ref) -> float:
    return ((got.float() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def bench_int8_shape(m: int, k: int, n: int, peak_int8: float, gen) -> dict:
    dev = "cuda"
    x16 = torch.randn(m, k, device=dev, generator=gen, dtype=torch.float16)
    a_q, sa = quantize_per_token(x16)
    w_bytes = n * k
    nrot = n_rotations(w_bytes, m * n * 4)
    w8 = [torch.randint(-127, 128, (n, k), device=dev, generator=gen, dtype=torch.int8) for _ in range(nrot)]
    w16 = [(w.to(torch.float16) * 0.01) for w in w8]
    sb = torch.rand(n, device=dev, generator=gen) * 0.01 + 1e-3
    bias = torch.randn(n, device=dev, generator=gen)
    flop = 2.0 * m * n * k
    row = {"M": m, "K": k, "N": n, "rotations": nrot}

    def rate(ms):
        return flop / (ms * 1e-3) / 1e12

    ms = time_calls([lambda i=i: torch.matmul(x16, w16[i].T) for i in range(nrot)])
    row["fp16_us"], row["fp16_tflops"] = ms * 1e3, rate(ms)
    if m > 16:
        ms = time_calls([lambda i=i: torch._int_mm(a_q, w8[i].T) for i in range(nrot)])
        row["int_mm_us"], row["int_mm_tops"] = ms * 1e3, rate(ms)

        def int_mm_epi(i):
            acc = torch._int_mm(a_q, w8[i].T)
            return (acc.float() * sa[:, None] * sb[None, :] + bias).half()

        ms = time_calls([lambda i=i: int_mm_epi(i) for i in range(nrot)])
        row["int_mm_epi_us"], row["int_mm_epi_tops"] = ms * 1e3, rate(ms)
    ms = time_calls([lambda i=i: int8_gemm(a_q, w8[i], sa, sb, bias, torch.float16) for i in range(nrot)])
    row["ours_us"], row["ours_tops"] = ms * 1e3, rate(ms)
    if m >= 128:
        for backend in ("ptr", "tma"):
            try:
                ms = time_calls([lambda i=i: int8_gemm(a_q, w8[i], sa, sb, bias, torch.float16, backend=backend) for i in range(nrot)])
                row[f"{backend}_us"], row[f"{backend}_tops"] = ms * 1e3, rate(ms)
            except Exception as e:  # keep the run going; report it
                row[f"{backend}_error"] = f"{type(e).__name__}: {str(e)[:200]}"
                print(f"  {backend} failed: {row[f'{backend}_error']}", flush=True)

    def e2e(i):
        q, s = quantize_per_token(x16)
        return int8_gemm(q, w8[i], s, sb, bias, torch.float16)

    ms = time_calls([lambda i=i: e2e(i) for i in range(nrot)])
    row["quant_ours_us"], row["quant_ours_tops"] = ms * 1e3, rate(ms)
    ms = time_calls([lambda: quantize_per_token(x16)] * 4)
    row["quant_us"] = ms * 1e3

    got = int8_gemm(a_q, w8[0], sa, sb, bias, torch.float16)
    row["err_ours"] = rel_err(got, exact_epilogue(a_q, w8[0], sa, sb, bias))
    acc = int8_gemm(a_q, w8[0], out_dtype=torch.int32)
    row["int32_exact"] = bool(torch.equal(acc.double(), a_q.double() @ w8[0].double().T))
    row["ours_vs_fp16"] = row["fp16_us"] / row["ours_us"]
    if "int_mm_us" in row:
        row["ours_vs_int_mm"] = row["int_mm_us"] / row["ours_us"]
        row["ours_vs_int_mm_epi"] = row["int_mm_epi_us"] / row["ours_us"]
    row["quant_ours_vs_fp16"] = row["fp16_us"] / row["quant_ours_us"]
    row["pct_int8_peak"] = 100.0 * row["ours_tops"] / peak_int8
    return row


def bench_w4_shape(m: int, k: int, n: int, gen) -> dict:
    dev = "cuda"
    x16 = torch.randn(m, k, device=dev, generator=gen, dtype=torch.float16)
    nrot = n_rotations(n * k // 2, m * n * 2)
    qs = [torch.randint(-8, 8, (n, k), device=dev, generator=gen, dtype=torch.int8) for _ in range(nrot)]
    packed = [pack_int4(q) for q in qs]
    scales = [(torch.rand(n, k // 128, device=dev, generator=gen) * 0.02 + 1e-3).half() for _ in range(nrot)]
    w16 = [(q.half().reshape(n, k // 128, 128) * s[:, :, None]).reshape(n, k) for q, s in zip(qs, scales)]
    w8 = [q.clone() for q in qs]
    a_q, sa = quantize_per_token(x16)
    sb = torch.rand(n, device=dev, generator=gen) * 0.01 + 1e-3
    bias = torch.zeros(n, device=dev)
    row = {"M": m, "K": k, "N": n, "rotations": nrot}
    ms = time_calls([lambda i=i: torch.matmul(x16, w16[i].T) for i in range(nrot)])
    row["fp16_us"] = ms * 1e3
    ms = time_calls([lambda i=i: w4a16_gemm(x16, packed[i], scales[i]) for i in range(nrot)])
    row["w4a16_us"] = ms * 1e3
    for kernel in ("gemv", "dot"):
        try:
            ms = time_calls([lambda i=i: w4a16_gemm(x16, packed[i], scales[i], kernel=kernel) for i in range(nrot)])
            row[f"{kernel}_us"] = ms * 1e3
        except Exception as e:
            row[f"{kernel}_error"] = f"{type(e).__name__}: {str(e)[:200]}"
            print(f"  w4a16 {kernel} failed: {row[f'{kernel}_error']}", flush=True)
    ms = time_calls([lambda i=i: int8_gemm(a_q, w8[i], sa, sb, bias, torch.float16) for i in range(nrot)])
    row["int8_us"] = ms * 1e3
    got = w4a16_gemm(x16, packed[0], scales[0])
    ref = x16.double() @ w16[0].double().T
    row["err_w4a16"] = rel_err(got, ref.float())
    for kernel in ("gemv", "dot"):
        if f"{kernel}_us" in row:
            row[f"err_{kernel}"] = rel_err(w4a16_gemm(x16, packed[0], scales[0], kernel=kernel), ref.float())
    row["w4a16_vs_fp16"] = row["fp16_us"] / row["w4a16_us"]
    row["int8_vs_fp16"] = row["fp16_us"] / row["int8_us"]
    row["w4a16_weight_GBps"] = (n * k / 2 + n * k // 128 * 2) / (row["w4a16_us"] * 1e-6) / 1e9
    row["fp16_weight_GBps"] = (n * k * 2) / (row["fp16_us"] * 1e-6) / 1e9
    return row


def ceilings(gen) -> dict:
    """Measured ceilings on this GPU: device-to-device copy bandwidth and 8192^3 products."""
    out = {}
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = time_calls([lambda: dst.copy_(src)] * 2)
    out["copy_GBps_read_plus_write"] = 2 * src.numel() / (ms * 1e-3) / 1e9
    del src, dst
    n = 8192
    a = torch.randn(n, n, device="cuda", generator=gen, dtype=torch.float16)
    b = torch.randn(n, n, device="cuda", generator=gen, dtype=torch.float16)
    ms = time_calls([lambda: torch.matmul(a, b.T)] * 2)
    out["fp16_8192_tflops"] = 2 * n**3 / (ms * 1e-3) / 1e12
    ai = torch.randint(-127, 128, (n, n), device="cuda", generator=gen, dtype=torch.int8)
    bi = torch.randint(-127, 128, (n, n), device="cuda", generator=gen, dtype=torch.int8)
    ms = time_calls([lambda: torch._int_mm(ai, bi.T)] * 2)
    out["int_mm_8192_tops"] = 2 * n**3 / (ms * 1e-3) / 1e12
    one = torch.ones(1, device="cuda")
    ms = time_calls([lambda: int8_gemm(ai, bi, one, one, None, torch.float16)] * 2)
    out["ours_8192_tops"] = 2 * n**3 / (ms * 1e-3) / 1e12
    return out


def fmt(v, spec=".1f"):
    return "-" if v is None else format(v, spec)


def print_tables(env, rows, w4rows, ceil) -> None:
    print()
    print(f"GPU: {env['gpu']}  torch {env['torch']}  triton {env['triton']}  CUDA {env['cuda']}  SMs {env['sms']}")
    print(f"int8 peak used: {env['peak_name']} dense INT8 {env['peak_int8_tops']:.0f} TOPS, FP16 {env['peak_fp16_tflops']:.0f} TFLOP/s")
    if ceil:
        print("measured ceilings: " + ", ".join(f"{k} {v:.0f}" for k, v in ceil.items()))
    print()
    hdr = (f"{'M':>5} {'K':>5} {'N':>6} | {'fp16':>7} {'int_mm':>7} {'+epi':>7} {'ours':>7} {'ptr':>7} {'tma':>7} | "
           f"{'x fp16':>6} {'x i_mm':>6} {'x i+ep':>6} {'%peak':>5} | {'q+ours':>7} {'x fp16':>6} | {'err':>7} {'int32':>5}")
    print("int8 GEMM, TFLOP/s or TOPS (2MNK / median time); 'x' = speedup of ours; q+ours = per-token quant + ours")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print(f"{r['M']:>5} {r['K']:>5} {r['N']:>6} | {fmt(r.get('fp16_tflops')):>7} {fmt(r.get('int_mm_tops')):>7} "
              f"{fmt(r.get('int_mm_epi_tops')):>7} {fmt(r.get('ours_tops')):>7} {fmt(r.get('ptr_tops')):>7} {fmt(r.get('tma_tops')):>7} | "
              f"{fmt(r.get('ours_vs_fp16'), '.2f'):>6} {fmt(r.get('ours_vs_int_mm'), '.2f'):>6} {fmt(r.get('ours_vs_int_mm_epi'), '.2f'):>6} "
              f"{fmt(r.get('pct_int8_peak')):>5} | {fmt(r.get('quant_ours_tops')):>7} {fmt(r.get('quant_ours_vs_fp16'), '.2f'):>6} | "
              f"{fmt(r.get('err_ours'), '.1e'):>7} {str(r.get('int32_exact')):>5}")
    print()
    print("int8 GEMM, microseconds")
    for r in rows:
        print(f"{r['M']:>5} {r['K']:>5} {r['N']:>6} | fp16 {fmt(r.get('fp16_us'), '.1f'):>8}  int_mm {fmt(r.get('int_mm_us'), '.1f'):>8}  "
              f"ours {fmt(r.get('ours_us'), '.1f'):>8}  ptr {fmt(r.get('ptr_us'), '.1f'):>8}  tma {fmt(r.get('tma_us'), '.1f'):>8}  "
              f"quant {fmt(r.get('quant_us'), '.1f'):>6}  q+ours {fmt(r.get('quant_ours_us'), '.1f'):>8}")
    if w4rows:
        print()
        print("W4A16 (int4 group 128) vs fp16, microseconds; GB/s = weight bytes / time")
        h = (f"{'M':>3} {'K':>5} {'N':>6} | {'fp16':>7} {'w4a16':>7} {'gemv':>7} {'dot':>7} {'int8':>7} | {'w4 x fp16':>9} {'i8 x fp16':>9} | "
             f"{'w4 GB/s':>8} {'fp16 GB/s':>9} | {'err':>7} {'err gemv':>8} {'err dot':>8}")
        print(h)
        print("-" * len(h))
        for r in w4rows:
            print(f"{r['M']:>3} {r['K']:>5} {r['N']:>6} | {r['fp16_us']:>7.1f} {r['w4a16_us']:>7.1f} {fmt(r.get('gemv_us')):>7} "
                  f"{fmt(r.get('dot_us')):>7} {r['int8_us']:>7.1f} | "
                  f"{r['w4a16_vs_fp16']:>9.2f} {r['int8_vs_fp16']:>9.2f} | {r['w4a16_weight_GBps']:>8.0f} {r['fp16_weight_GBps']:>9.0f} | "
                  f"{r['err_w4a16']:>7.1e} {fmt(r.get('err_gemv'), '.1e'):>8} {fmt(r.get('err_dot'), '.1e'):>8}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT", str(Path(__file__).parent / "out")), help="folder for bench_cuda_gemm.json")
    p.add_argument("--quick", action="store_true", help="two shapes only (smoke test)")
    p.add_argument("--no-w4", action="store_true")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_cuda_gemm: needs a CUDA GPU", file=sys.stderr)
        return 2
    import triton

    from qpass.backends.cuda.kernels import _triton_int8_gemm as tk

    name = torch.cuda.get_device_name()
    props = torch.cuda.get_device_properties(0)
    peak_name, peak_i8, peak_f16 = peak_for(name)
    env = {"gpu": name, "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
           "sms": props.multi_processor_count, "python": platform.python_version(),
           "peak_name": peak_name, "peak_int8_tops": peak_i8, "peak_fp16_tflops": peak_f16,
           "timing": "median of CUDA-graph replays, weights rotated (>=128 MB int8)", "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    out_path = out_dir / "bench_cuda_gemm.json"
    gen = torch.Generator(device="cuda").manual_seed(0)
    result = {"env": env, "ceilings": {}, "int8": [], "w4a16": [], "configs": {}}

    def save():
        result["configs"] = {
            "ptr": {str(k): str(v) for k, v in tk._int8_gemm_kernel.cache.items()},
            "tma": {str(k): str(v) for k, v in tk._int8_gemm_tma_kernel.cache.items()},
        }
        try:
            from qpass.backends.cuda.kernels import _triton_w4a16 as tw

            result["configs"]["w4a16_gemv"] = {str(k): str(v) for k, v in tw._w4a16_gemv_kernel.cache.items()}
            result["configs"]["w4a16_dot"] = {str(k): str(v) for k, v in tw._w4a16_dot_kernel.cache.items()}
        except Exception:
            pass
        out_path.write_text(json.dumps(result, indent=1))

    print(f"GPU {name}; writing {out_path}", flush=True)
    t0 = time.time()
    result["ceilings"] = ceilings(gen)
    print("ceilings:", {k: round(v) for k, v in result["ceilings"].items()}, flush=True)
    shapes = [(m, k, n) for (k, n) in KNS for m in MS]
    if args.quick:
        shapes = [(16, 4096, 4096), (2048, 4096, 4096)]
    for m, k, n in shapes:
        t = time.time()
        try:
            row = bench_int8_shape(m, k, n, peak_i8, gen)
        except Exception as e:
            row = {"M": m, "K": k, "N": n, "error": f"{type(e).__name__}: {str(e)[:300]}"}
        result["int8"].append(row)
        save()
        print(f"M={m:<5} K={k:<5} N={n:<6} ours {row.get('ours_tops', float('nan')):7.1f} TOPS  fp16 {row.get('fp16_tflops', float('nan')):7.1f}"
              f"  int_mm {row.get('int_mm_tops', float('nan')):7.1f}  x fp16 {row.get('ours_vs_fp16', float('nan')):.2f}"
              f"  ({time.time() - t:.1f}s) {row.get('error', '')}", flush=True)
        torch.cuda.empty_cache()
    if not args.no_w4:
        for k, n in W4_KNS:
            for m in W4_MS:
                try:
                    row = bench_w4_shape(m, k, n, gen)
                except Exception as e:
                    row = {"M": m, "K": k, "N": n, "error": f"{type(e).__name__}: {str(e)[:300]}"}
                    print(row, flush=True)
                result["w4a16"].append(row)
                save()
                torch.cuda.empty_cache()
    env["seconds"] = time.time() - t0
    save()
    print_tables(env, [r for r in result["int8"] if "error" not in r], [r for r in result["w4a16"] if "error" not in r], result["ceilings"])
    errors = [r for r in result["int8"] + result["w4a16"] if "error" in r]
    for r in errors:
        print("ERROR", r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
