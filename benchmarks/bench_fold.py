"""Benchmark: load -> fold pipeline (verified) -> save, against onnxruntime's own preprocessing.

For each model, each tool runs in a fresh subprocess so its peak memory is its own:
  qpass          qpass.load_model -> Pipeline(recipe 'fold', verify=True) -> qpass.save_model
  ort-preprocess onnxruntime.quantization.quant_pre_process (symbolic shapes + ORT optimizer)
  ort-optimize   InferenceSession(ORT_ENABLE_BASIC, optimized_model_filepath=...)
Peak memory = ru_maxrss minus the process's RSS after imports (DECISIONS.md).

    python benchmarks/bench_fold.py            # MiniLM + ddddocr OCR + ddddocr detector
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

CHILD = r'''
import json, resource, sys, time, os
tool, src, dst = sys.argv[1:4]
import numpy, onnx, onnxruntime
if tool == "qpass":
    import qpass
    from qpass.api import build_passes
    from qpass.pipeline import Pipeline
else:
    from onnxruntime.quantization.shape_inference import quant_pre_process
def rss_kb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024
base = rss_kb()
t0 = time.perf_counter()
stats = {}
if tool == "qpass":
    model = qpass.load_model(src)
    result = Pipeline(build_passes("fold"), verify=True).run(model)
    qpass.save_model(result.model, dst, input_path=src)
    stats = {s.name: [s.rewritten, s.verification] for s in result.stats}
elif tool == "ort-preprocess":
    try:
        quant_pre_process(src, dst, skip_symbolic_shape=False)
    except Exception:  # its symbolic shape inference gives up on some exports: retry as its docs advise
        stats = {"note": "retried with skip_symbolic_shape=True"}
        quant_pre_process(src, dst, skip_symbolic_shape=True)
else:
    so = onnxruntime.SessionOptions()
    so.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.optimized_model_filepath = dst
    onnxruntime.InferenceSession(src, so, providers=["CPUExecutionProvider"])
seconds = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": seconds, "peak_mb": (peak - base) / 1024, "stats": stats}))
'''


def run_case(tool: str, src: Path, dst: Path) -> dict:
    # onnxruntime's tools leave temporary files in the working directory: run in the output folder
    proc = subprocess.run([sys.executable, "-c", CHILD, tool, str(src), str(dst)], capture_output=True, text=True, cwd=dst.parent)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1][:200]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    import models

    cases = {"all-MiniLM-L6-v2": models.minilm_onnx(), **models.ddddocr_models()}
    out = models.OUT
    out.mkdir(exist_ok=True)
    import onnxruntime

    print(f"machine: {platform.processor() or platform.machine()}, {__import__('os').cpu_count()} cores; "
          f"onnxruntime {onnxruntime.__version__}; python {platform.python_version()}")
    rows = []
    for name, src in cases.items():
        size_mb = src.stat().st_size / 2**20
        results = {}
        for tool in ("qpass", "ort-preprocess", "ort-optimize"):
            best = None
            for _ in range(3):  # best of 3 (wall time); memory of that run
                r = run_case(tool, src, out / f"{src.stem}.{tool}.onnx")
                if "error" in r or best is None or r["seconds"] < best["seconds"]:
                    best = r
                if "error" in r:
                    break
            results[tool] = best
        rows.append((name, size_mb, results))
        q = results["qpass"]
        print(f"\n{name} ({size_mb:.1f} MB)")
        for tool, r in results.items():
            if "error" in r:
                print(f"  {tool:15s} error: {r['error']}")
                continue
            ratio = r["seconds"] / q["seconds"] if "seconds" in q else float("nan")
            print(f"  {tool:15s} {r['seconds']:6.2f} s  peak +{r['peak_mb']:6.1f} MB ({r['peak_mb'] / size_mb:4.2f}x model)"
                  + ("" if tool == "qpass" else f"  time {ratio:4.2f}x qpass's"))
        print("  qpass rewrites:", ", ".join(f"{k}={v[0]}" for k, v in q.get("stats", {}).items()))
        if results["ort-preprocess"].get("stats"):
            print("  ort-preprocess:", results["ort-preprocess"]["stats"]["note"])


if __name__ == "__main__":
    main()
