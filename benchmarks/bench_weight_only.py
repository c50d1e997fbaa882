"""Benchmark: qpass weight-only int4 (recipe w4a16) against onnxruntime's own 4-bit quantizer.

all-MiniLM-L6-v2, the same data and metrics as bench_quantize.py's MiniLM evaluation: 300
generated sentences (batch 1, natural lengths), sentence embedding = mean pooling over the
attention mask, L2-normalized; mean (and min) cosine of quantized vs float embeddings, Spearman
correlation of all 44,850 pairwise cosine similarities (quantized vs float), SQNR of the raw
token embeddings.

Variants (all: MatMul weights, 4 bits, one scale per 128 weights along K, MatMulNBits after
onnxruntime's graph optimizations):
  qpass w4a16 (default)        symmetric int4 [-8, 7], per-group clipping search
                               (weight_observer mse), DequantizeLinear(block_size=128), no zero-point
  qpass w4a16 RTN              the same form, round-to-nearest: scale max|w| / 7 (weight_observer minmax)
  qpass w4a16 asym uint4       option: affine uint4 + zero-point, clipping search
                               (weight_dtype uint4, symmetric_weights false)
  qpass w8a16                  per-channel int8 weight-only, for reference
  ort MatMulNBits sym / asym   onnxruntime.quantization MatMulNBitsQuantizer(bits=4, block_size=128,
                               is_symmetric=True / False (its default)), RTN
Runtime settings: the default session (ORT_ENABLE_ALL). onnxruntime fuses qpass's
DequantizeLinear -> MatMul into MatMulNBits with accuracy_level 4 (session option
session.qdq_matmulnbits_accuracy_level, default 4: activations quantized to int8 inside the
kernel where the CPU has the instructions); MatMulNBitsQuantizer writes nodes without
accuracy_level (0: float compute). The "acc0" columns rerun the qpass models at level 0, the
setting onnxruntime's own models run at.

Latency: bench_quantize.latencies (ORT_ENABLE_ALL, 1 and 2 intra-op threads, 10 warm-up runs,
3 round-robin rounds of 50 runs, lowest round median), batch 1 x seq 64. Size: the saved file.

    python benchmarks/bench_weight_only.py     # prints a table, writes benchmarks/out/bench_weight_only.json
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_quantize as bq  # noqa: E402
import models  # noqa: E402
import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402

WORK = models.OUT / "bench_weight_only"

QPASS_VARIANTS = {
    "qpass w4a16 (default)": ("w4a16", {}),
    "qpass w4a16 RTN": ("w4a16", {"weight_observer": "minmax"}),
    "qpass w4a16 asym uint4": ("w4a16", {"weight_dtype": "uint4", "symmetric_weights": False}),
    "qpass w8a16": ("w8a16", {}),
}
ORT_VARIANTS = {"ort MatMulNBits sym": True, "ort MatMulNBits asym (default)": False}


def qpass_variant(src: Path, calib, recipe: str, options: dict, dst: Path) -> tuple[Path, float]:
    import qpass

    t0 = time.perf_counter()
    result = qpass.quantize(str(src), calib, recipe=recipe, report=False, **options)
    seconds = time.perf_counter() - t0
    return qpass.save_model(result.model, dst), seconds


def ort_variant(src: Path, symmetric: bool, dst: Path) -> tuple[Path, float]:
    import logging

    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    t0 = time.perf_counter()
    quantizer = MatMulNBitsQuantizer(onnx.load(str(src)), bits=4, block_size=128, is_symmetric=symmetric)
    quantizer.process()
    quantizer.model.save_model_to_file(str(dst), use_external_data_format=False)
    return dst, time.perf_counter() - t0


def run_accuracy_level_0(path: Path, feeds) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return [sess.run(None, f)[0] for f in feeds]


def main() -> None:
    WORK.mkdir(parents=True, exist_ok=True)
    os.chdir(WORK)
    import onnx

    print(f"onnxruntime {ort.__version__}, onnx {onnx.__version__}, qpass commit {bq.git_commit()}, {os.cpu_count()} cores", flush=True)
    src = models.minilm_onnx()
    calib, evals, lat, _ = bq.minilm_data()  # weight-only recipes read none: the same inputs feed the checks
    ref_raw = bq.run_all(src, evals)
    ref_emb = np.concatenate([bq.embed(h, f["attention_mask"]) for h, f in zip(ref_raw, evals)])
    ref = {"raw": ref_raw, "emb": ref_emb, "pair": (ref_emb @ ref_emb.T)[np.triu_indices(len(ref_emb), 1)]}

    paths, rows = {"float": src}, {"float": {}}
    for label, (recipe, options) in QPASS_VARIANTS.items():
        slug = label.split(" ", 1)[1].replace(" ", "-").replace("(", "").replace(")", "")
        paths[label], seconds = qpass_variant(src, calib, recipe, options, WORK / f"minilm.{slug}.onnx")
        rows[label] = {"quantize_s": seconds, "options": {"recipe": recipe, **options}}
    for label, symmetric in ORT_VARIANTS.items():
        paths[label], seconds = ort_variant(src, symmetric, WORK / f"minilm.ort4.{'sym' if symmetric else 'asym'}.onnx")
        rows[label] = {"quantize_s": seconds}

    for label, path in paths.items():
        rows[label]["size_mb"] = path.stat().st_size / 2**20
        rows[label]["metrics"] = bq.eval_minilm(bq.run_all(path, evals), ref, evals)
        rows[label]["census"] = bq.census(path)
        if label.startswith("qpass"):
            rows[label]["metrics_acc0"] = bq.eval_minilm(run_accuracy_level_0(path, evals), ref, evals)
        print(f"evaluated {label}", flush=True)
    for label, result in bq.latencies(paths, lat).items():
        rows[label]["latency_ms"] = result["ms"]

    nan = float("nan")
    print(f"\n{'variant':32s} {'MB':>6s} {'mean cos':>9s} {'min cos':>8s} {'spearman':>9s} {'SQNR':>6s} {'1T ms':>6s} {'2T ms':>6s}"
          f" {'acc0 cos':>9s} {'acc0 rho':>9s} {'quant s':>8s}  kernels")
    for label, r in rows.items():
        m, a = r["metrics"], r.get("metrics_acc0", {})
        lat_ms = r.get("latency_ms", {})
        print(f"{label:32s} {r['size_mb']:6.1f} {m['mean_cos']:9.4f} {m['min_cos']:8.4f} {m['spearman']:9.4f} {m['sqnr_db']:6.2f}"
              f" {lat_ms.get('1T', nan):6.2f} {lat_ms.get('2T', nan):6.2f} {a.get('mean_cos', nan):9.4f} {a.get('spearman', nan):9.4f}"
              f" {r.get('quantize_s', nan):8.2f}  {bq.census_text(r['census'])}")
    out = models.OUT / "bench_weight_only.json"
    out.write_text(json.dumps(bq.jsonable({"onnxruntime": ort.__version__, "qpass_commit": bq.git_commit(), "rows": rows}), indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
