"""Benchmark: QDQ vs QOperator output of qpass w8a8 in onnxruntime — kernels, latency, agreement.

Models, calibration / evaluation / latency feeds and the latency protocol are
bench_quantize.py's (all-MiniLM-L6-v2, ddddocr's OCR CNN and detector; 64 calibration
samples; one fixed latency input per model). Each model is quantized once with
``qpass.quantize`` (default recipe w8a8) and written in four forms:

  qdq                        the QDQ model as qpass.quantize returns it (the default format)
  qoperator                  to_qoperator(qdq): QLinearConv / QLinearMatMul, default ONNX domain;
                             MatMul/Gemm islands with a float output or a Gemm bias stay QDQ
  qoperator+matmul_integer   to_qoperator(qdq, matmul_integer=True): those islands become
                             MatMulInteger -> Cast -> Mul [-> Add]
  qoperator+contrib_ops      to_qoperator(qdq, contrib_ops=True): also onnxruntime's com.microsoft
                             QLinearAdd/Mul/Sigmoid/Concat/..., QGemm, MatMulIntegerToFloat

Per form: the integer ops in the file, the kernel census of onnxruntime's optimized graph
(ORT_ENABLE_ALL), latency with 1 and 2 threads (``--rounds`` rounds of ``--runs`` timed runs
after warm-up, round-robin over the four forms; lowest round median), and agreement with the
QDQ model on the first ``--agree`` held-out inputs (largest difference relative to the output
range, share of bit-identical output elements, SQNR vs QDQ, and the task metric: decoded OCR
text equal, MiniLM embedding cosine). ``--latency-only`` times the model files an earlier run
left in benchmarks/out/bench_qoperator/ again, without quantizing.

    python benchmarks/bench_qoperator.py      # prints tables, writes benchmarks/out/bench_qoperator.json
    python benchmarks/bench_qoperator.py --models minilm --latency-only --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_quantize as bq  # noqa: E402
import models  # noqa: E402

import qpass  # noqa: E402
from qpass.backends.qoperator import to_qoperator  # noqa: E402

WORK = models.OUT / "bench_qoperator"
MODELS = ("ocr", "det", "minilm")
VARIANTS = {
    "qoperator": {},
    "qoperator+matmul_integer": {"matmul_integer": True},
    "qoperator+contrib_ops": {"contrib_ops": True},
}
FILE_INTEGER_OPS = ("QLinearConv", "QLinearMatMul", "MatMulInteger", "ConvInteger", "MatMulIntegerToFloat", "QGemm")


def model_data(name: str):
    """(float model path, calibration feeds, evaluation feeds, latency feed, task metric or None)."""
    if name == "minilm":
        calib, evals, lat, _ = bq.minilm_data()

        def cosine(ref, got, feed):
            mask = feed["attention_mask"]
            return float(np.dot(bq.embed(ref[0], mask)[0], bq.embed(got[0], mask)[0]))

        return models.minilm_onnx(), calib, evals, lat, ("mean_embedding_cosine", cosine)
    if name == "ocr":
        calib, evals, lat, _, _ = bq.ocr_data()
        charset = bq.ocr_charset()

        def same_text(ref, got, feed):
            return float(bq.ocr_decode(ref[0], charset) == bq.ocr_decode(got[0], charset))

        return models.ddddocr_models()["ddddocr-ocr"], calib, evals, lat, ("text_equal", same_text)
    if name == "det":
        calib, evals, lat, _ = bq.det_data()
        return models.ddddocr_models()["ddddocr-det"], calib, evals, lat, None
    raise SystemExit(f"unknown model '{name}': choose from {', '.join(MODELS)}")


def file_integer_ops(path: Path) -> dict[str, int]:
    """Integer operators written in the model file itself (before onnxruntime's fusions)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return dict(Counter(n.op_type for n in graph.node if n.op_type.startswith("QLinear") or n.op_type in FILE_INTEGER_OPS))


def agreement(paths: dict[str, Path], feeds: list[dict], task) -> dict[str, dict]:
    """Each QOperator form vs the QDQ model on the same inputs (onnxruntime, 1 thread)."""
    sessions = {k: bq.session(p, 1) for k, p in paths.items()}
    refs = [sessions["qdq"].run(None, f) for f in feeds]
    out = {}
    for label, sess in sessions.items():
        if label == "qdq":
            continue
        rel, equal, total, signal, noise, score = 0.0, 0, 0, 0.0, 0.0, 0.0
        for feed, ref in zip(feeds, refs):
            got = sess.run(None, feed)
            for r, g in zip(ref, got):
                r64, g64 = r.astype(np.float64), g.astype(np.float64)
                rel = max(rel, float(np.max(np.abs(r64 - g64)) / (np.max(np.abs(r64)) + 1e-30)))
                equal += int(np.sum(r == g))
                total += r.size
                signal += float(np.sum(r64**2))
                noise += float(np.sum((r64 - g64) ** 2))
            if task is not None:
                score += task[1](ref, got, feed)
        rec = {"inputs": len(feeds), "max_rel_diff": rel, "equal_frac": equal / total,
               "bit_identical": noise == 0.0, "sqnr_vs_qdq_db": float("inf") if noise == 0 else 10 * np.log10(signal / noise)}
        if task is not None:
            rec[task[0]] = score / len(feeds)
        out[label] = rec
    return out


def agreement_text(a: dict | None) -> str:
    if a is None:
        return "—"
    if a["bit_identical"]:
        return "bit-identical"
    extra = "".join(f", {k} {v:.4f}" for k, v in a.items() if k in ("text_equal", "mean_embedding_cosine"))
    return f"max {a['max_rel_diff'] * 100:.2f}% of range, {a['sqnr_vs_qdq_db']:.1f} dB{extra}"


def bench(name: str, n_agree: int, latency_only: bool) -> dict:
    src, calib, evals, lat, task = model_data(name)
    paths = {k: WORK / f"{name}.{k}.onnx" for k in ("qdq", *VARIANTS)}
    rec: dict = {"model": src.name}
    if latency_only:
        missing = [str(p) for p in paths.values() if not p.exists()]
        if missing:
            raise SystemExit(f"--latency-only: no earlier run's files ({missing[0]}); run without it first")
    else:
        t0 = time.perf_counter()
        qdq = qpass.quantize(str(src), calib, report=False).model
        rec["quantize_s"] = time.perf_counter() - t0
        qpass.save_model(qdq, paths["qdq"])
        rec["to_qoperator_s"] = {}
        for label, kwargs in VARIANTS.items():
            t0 = time.perf_counter()
            lowered = to_qoperator(qdq, **kwargs)
            rec["to_qoperator_s"][label] = time.perf_counter() - t0
            qpass.save_model(lowered, paths[label])
        rec["file_integer_ops"] = {k: file_integer_ops(p) for k, p in paths.items()}
        rec["census"] = {k: bq.census(p) for k, p in paths.items()}
        rec["agreement"] = agreement(paths, evals[:n_agree], task)
    rec["latency"] = bq.latencies(paths, lat)
    return rec


def print_table(name: str, rec: dict) -> None:
    print(f"\n== {name} ({rec['model']})")
    if "quantize_s" in rec:
        conv = ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in rec["to_qoperator_s"].items())
        print(f"  quantize (w8a8) {rec['quantize_s']:.2f} s; to_qoperator: {conv}")
    fmt = lambda d: ", ".join(f"{k} {v}" for k, v in sorted(d.items())) or "none"  # noqa: E731
    print(f"  {'variant':26s} {'1T ms':>7s} {'2T ms':>7s}  agreement with qdq")
    for label, lat in rec["latency"].items():
        ms = lat.get("ms", {})
        cells = " ".join(f"{ms[t]:7.2f}" if t in ms else f"{'error':>7s}" for t in ("1T", "2T"))
        agree = agreement_text(rec["agreement"].get(label)) if "agreement" in rec else ""
        print(f"  {label:26s} {cells}  {agree}")
        if "census" in rec:
            print(f"  {'':26s} file: {fmt(rec['file_integer_ops'][label])}")
            print(f"  {'':26s} onnxruntime: {bq.census_text(rec['census'][label])}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    ap.add_argument("--agree", type=int, default=100, help="held-out inputs for the agreement with QDQ")
    ap.add_argument("--rounds", type=int, default=5, help="latency rounds (round-robin over the forms)")
    ap.add_argument("--runs", type=int, default=bq.LAT_RUNS, help="timed runs per round")
    ap.add_argument("--latency-only", action="store_true", help="only time the files an earlier run left")
    ap.add_argument("--out", default=str(models.OUT / "bench_qoperator.json"), help="JSON results file")
    args = ap.parse_args()

    import onnx

    WORK.mkdir(parents=True, exist_ok=True)
    bq.WORK = WORK  # census() writes onnxruntime's optimized graph to a temporary folder there
    bq.LAT_ROUNDS, bq.LAT_RUNS = args.rounds, args.runs
    env = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "python": platform.python_version(),
           "onnxruntime": bq.ort.__version__, "onnx": onnx.__version__, "qpass_commit": bq.git_commit(),
           "date": time.strftime("%Y-%m-%d")}
    print("environment: " + ", ".join(f"{k} {v}" for k, v in env.items()), flush=True)
    records = {}
    for name in args.models.split(","):
        records[name] = bench(name, args.agree, args.latency_only)
        print_table(name, records[name])
    settings = {"agree_inputs": args.agree, "latency": {"warmup": bq.LAT_WARMUP, "runs_per_round": args.runs,
                "rounds": args.rounds, "statistic": "lowest round median", "graph_optimization": "ORT_ENABLE_ALL"},
                "latency_only": args.latency_only}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(bq.jsonable({"environment": env, "settings": settings, "models": records}), indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
