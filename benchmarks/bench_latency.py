"""Benchmark: latency of qpass's default int8 model against onnxruntime's best, interleaved A/B.

Reads the models the full quantization benchmark wrote (run ``bench_quantize.py`` first): per
real model, qpass's default model, onnxruntime's best grid configuration (as that run chose it
by accuracy) and the float model. For each feed and thread count (1, 2) the sessions are built
once (ORT_ENABLE_ALL), warmed up, then timed in ROUNDS rounds of RUNS runs, the models
alternating round by round so that a disturbance on this small VM hits all of them alike.
Reported per model: the lowest and the median round median, the ratio qpass / onnxruntime of
both, and in how many rounds qpass was faster. MiniLM runs at several sentence lengths (the
short ones are where fixed per-op costs dominate).

    python benchmarks/bench_quantize.py      # once: writes the models and bench_quantize.json
    python benchmarks/bench_latency.py       # prints the table, writes benchmarks/out/bench_latency.json
"""

from __future__ import annotations

import gc
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_quantize as bq  # noqa: E402
import models  # noqa: E402

WARMUP, RUNS, ROUNDS = 20, 40, 15
MINILM_TOKENS = (8, 13, 32, 64, 128)


def minilm_feed(tokens: int) -> dict:
    """One sentence of exactly ``tokens`` real tokens (no padding), cut from the benchmark's texts."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(models.minilm_dir()))
    text = " ".join(bq.sentences(bq.N_CALIB + bq.N_EVAL_MINILM)[bq.N_CALIB:bq.N_CALIB + 40])
    enc = tok(text, return_tensors="np", truncation=True, max_length=tokens)
    feed = {k: np.ascontiguousarray(enc[k].astype(np.int64)) for k in ("input_ids", "attention_mask", "token_type_ids")}
    assert feed["input_ids"].shape == (1, tokens)
    return feed


def ab(paths: dict[str, Path], feed: dict, threads: int) -> dict[str, list[float]]:
    """Round medians (ms) per model label, the models alternating round by round."""
    sessions = {label: bq.session(path, threads) for label, path in paths.items()}
    for sess in sessions.values():
        for _ in range(WARMUP):
            sess.run(None, feed)
    medians: dict[str, list[float]] = {label: [] for label in sessions}
    gc.disable()
    try:
        for r in range(ROUNDS):
            order = list(sessions) if r % 2 == 0 else list(reversed(sessions))
            for label in order:
                sess, times = sessions[label], []
                for _ in range(RUNS):
                    t0 = time.perf_counter()
                    sess.run(None, feed)
                    times.append(time.perf_counter() - t0)
                medians[label].append(float(np.median(times) * 1000))
    finally:
        gc.enable()
    return medians


def main() -> None:
    summary_path = models.OUT / "bench_quantize.json"
    if not summary_path.exists():
        sys.exit("run benchmarks/bench_quantize.py first: it writes the quantized models and bench_quantize.json")
    records = {r["model"]: r for r in json.loads(summary_path.read_text())["models"]}
    work = bq.WORK
    srcs = {"all-MiniLM-L6-v2": models.minilm_onnx(), **{
        "ddddocr OCR (common.onnx)": models.ddddocr_models()["ddddocr-ocr"],
        "ddddocr detector (common_det.onnx)": models.ddddocr_models()["ddddocr-det"]}}
    feeds: list[tuple[str, str, dict]] = [("all-MiniLM-L6-v2", f"{t} tokens", minilm_feed(t)) for t in MINILM_TOKENS]
    feeds.append(("ddddocr OCR (common.onnx)", "one text line", bq.ocr_data()[2]))
    feeds.append(("ddddocr detector (common_det.onnx)", "one scene 416x416", bq.det_data()[2]))
    env = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "onnxruntime": ort.__version__,
           "qpass_commit": bq.git_commit(), "date": time.strftime("%Y-%m-%d %H:%M"),
           "settings": f"{WARMUP} warm-up, {ROUNDS} rounds x {RUNS} runs, ORT_ENABLE_ALL"}
    print("environment: " + ", ".join(f"{k} {v}" for k, v in env.items()), flush=True)
    rows = []
    print("| model, feed | threads | qpass ms (min / median) | ort best ms (min / median) | float ms (median) | "
          "ratio (min / median) | rounds qpass faster |")
    print("|---|---:|---|---|---:|---|---:|")
    for model, label, feed in feeds:
        src = srcs[model]
        best = records[model]["best_ort"]
        cfg = records[model]["rows"][best]  # named as bench_quantize.py names its outputs
        paths = {"qpass": work / f"{src.stem}.qpass-default.onnx", "float": src,
                 "ort": work / f"{src.stem}.ort-{cfg['method']}-{'pc' if cfg['per_channel'] else 'pt'}.onnx"}
        for threads in (1, 2):
            med = ab(paths, feed, threads)
            q, o, f = (np.array(med[k]) for k in ("qpass", "ort", "float"))
            row = {"model": model, "feed": label, "threads": threads, "ort_config": best,
                   "qpass_ms": [q.min(), float(np.median(q))], "ort_ms": [o.min(), float(np.median(o))],
                   "float_ms": float(np.median(f)), "ratio": [q.min() / o.min(), float(np.median(q) / np.median(o))],
                   "rounds_qpass_faster": int(np.sum(q < o)), "round_medians": med}
            rows.append(row)
            print(f"| {model.split(' (')[0]}, {label} | {threads} | {q.min():.2f} / {np.median(q):.2f} | "
                  f"{o.min():.2f} / {np.median(o):.2f} | {np.median(f):.2f} | {row['ratio'][0]:.2f} / "
                  f"{row['ratio'][1]:.2f} | {row['rounds_qpass_faster']} / {ROUNDS} |", flush=True)
    out = models.OUT / "bench_latency.json"
    out.write_text(json.dumps(bq.jsonable({"environment": env, "rows": rows}), indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
