"""End-to-end W8A8 on the GPU: qpass-quantized transformer stacks lowered with the CUDA backend
vs the same models in fp16 eager torch and fp16 ``torch.compile``.

Models (random weights, built in code): a BERT-base-sized encoder (12 post-LN layers, hidden
768, 12 heads, FFN 3072, GELU; batch 16 x seq 512) and OPT-1.3B-sized decoder layers (pre-LN,
hidden 2048, 32 heads, FFN 8192, ReLU, causal; batch 4 x seq 512; ``--opt-layers`` of the 24).
Each is exported to ONNX (``qpass.load_model``), quantized with the default ``w8a8`` recipe on
a few random calibration batches, and lowered with ``qpass.backends.cuda.lower`` (float ops in
float16): run op by op, traced + compiled (``LoweredProgram.compile()``) and, in addition, with
the attention blocks as one fused kernel (``fused_attention=True``), each also replayed as a
CUDA graph. The peer is torchao's int8 dynamic config with ``torch.compile`` (when
installed). Timings: CUDA events, median of ``--iters`` runs after warm-up. Accuracy: SQNR of
each output vs the float32 torch model.

    python benchmarks/bench_cuda_e2e.py [--iters 20] [--opt-layers 4] [--variants op,compiled,fattn,torchao] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time

import numpy as np
import torch
from torch import nn

import qpass
from qpass.backends.cuda.lower import lower


class Attention(nn.Module):
    def __init__(self, hidden: int, heads: int, causal: bool):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.q, self.k, self.v, self.o = (nn.Linear(hidden, hidden) for _ in range(4))

    def forward(self, x):
        b, s, h = x.shape
        split = lambda t: t.reshape(b, s, self.heads, h // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        scores = q @ k.transpose(-1, -2) / math.sqrt(h // self.heads)
        if self.causal:
            mask = torch.full((s, s), float("-inf"), device=x.device, dtype=x.dtype).triu(1)
            scores = scores + mask
        out = torch.softmax(scores, dim=-1) @ v
        return self.o(out.transpose(1, 2).reshape(b, s, h))


class Block(nn.Module):
    """Attention + FFN with two LayerNorms; subclasses choose post-LN (BERT) or pre-LN (OPT)."""

    causal = False

    def __init__(self, hidden: int, heads: int, ffn: int):
        super().__init__()
        self.attn = Attention(hidden, heads, causal=self.causal)
        self.ln1, self.ln2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.fc1, self.fc2 = nn.Linear(hidden, ffn), nn.Linear(ffn, hidden)


class EncoderLayer(Block):  # BERT: post-LN, GELU
    def __init__(self, hidden=768, heads=12, ffn=3072):
        super().__init__(hidden, heads, ffn)

    def forward(self, x):
        x = self.ln1(x + self.attn(x))
        return self.ln2(x + self.fc2(torch.nn.functional.gelu(self.fc1(x))))


class DecoderLayer(Block):  # OPT: pre-LN, ReLU, causal
    causal = True

    def __init__(self, hidden=2048, heads=32, ffn=8192):
        super().__init__(hidden, heads, ffn)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(torch.relu(self.fc1(self.ln2(x))))


class Stack(nn.Module):
    def __init__(self, layers):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def build(kind: str, opt_layers: int) -> tuple[nn.Module, tuple[int, int, int]]:
    torch.manual_seed(0)
    if kind == "bert-base":
        model, shape = Stack([EncoderLayer() for _ in range(12)]), (16, 512, 768)
    else:
        model, shape = Stack([DecoderLayer() for _ in range(opt_layers)]), (4, 512, 2048)
    for m in model.modules():  # trained-like scales: small weights, LayerNorm gammas near 1
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            nn.init.normal_(m.bias, std=0.02)
    return model.eval(), shape


def cuda_time(fn, iters: int, warmup: int = 3) -> float:
    """Median milliseconds of ``fn()`` over ``iters`` runs, CUDA events, after warm-up."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def sqnr(ref: torch.Tensor, got: torch.Tensor) -> float:
    ref, got = ref.double(), got.double()
    return float(10 * torch.log10(ref.pow(2).sum() / (ref - got).pow(2).sum().clamp_min(1e-30)))


def bench_torchao(model: nn.Module, xh: torch.Tensor, ref: torch.Tensor, iters: int) -> dict:
    """The GPU peer: torchao's int8 dynamic-activation / int8-weight config + torch.compile."""
    try:
        import copy

        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    except ImportError as e:
        return {"torchao": f"not installed ({e})"}
    import torchao

    peer = copy.deepcopy(model).half()
    quantize_(peer, Int8DynamicActivationInt8WeightConfig())
    compiled = torch.compile(peer)
    with torch.no_grad():
        out = compiled(xh)
        return {"torchao": torchao.__version__, "torchao_w8a8_compiled_ms": cuda_time(lambda: compiled(xh), iters),
                "torchao_w8a8_sqnr_db": sqnr(ref, out.float())}


VARIANTS = ("op", "compiled", "fattn", "torchao")


def bench(kind: str, iters: int, opt_layers: int, variants=VARIANTS) -> dict:
    model, shape = build(kind, opt_layers)
    rec: dict = {"model": kind, "input": list(shape), "layers": len(model.layers)}
    t0 = time.perf_counter()
    ir_model = qpass.load_model(model, (torch.randn(*shape),))
    rec["export_s"] = time.perf_counter() - t0
    rng = np.random.default_rng(1)
    calib = [{ir_model.graph.inputs[0].name: rng.standard_normal(shape, dtype=np.float32)} for _ in range(4)]
    t0 = time.perf_counter()
    quantized = qpass.quantize(ir_model, calib, report=False).model
    rec["quantize_s"] = time.perf_counter() - t0
    x = torch.from_numpy(rng.standard_normal(shape, dtype=np.float32)).cuda()
    name = ir_model.graph.inputs[0].name

    with torch.no_grad():
        ref = model.cuda()(x)
        fp16 = model.half()
        xh = x.half()
        rec["fp16_eager_ms"] = cuda_time(lambda: fp16(xh), iters)
        rec["fp16_sqnr_db"] = sqnr(ref, fp16(xh).float())
        t0 = time.perf_counter()
        compiled = torch.compile(fp16)
        compiled(xh)
        rec["compile_s"] = time.perf_counter() - t0
        rec["fp16_compile_ms"] = cuda_time(lambda: compiled(xh), iters)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    program = lower(quantized, "cuda", dtype="float16", fused_attention=False)
    torch.cuda.synchronize()
    rec["program_device_mb"] = (torch.cuda.memory_allocated() - before) / 2**20  # weights and constants, once
    rec["fp16_weights_mb"] = sum(p.numel() * 2 for p in fp16.parameters()) / 2**20
    runs = {"op": ("qpass_w8a8_fp16", program), "compiled": ("qpass_w8a8_compiled", False), "fattn": ("qpass_w8a8_compiled_fattn", True)}
    for key, run in (runs[v] for v in variants if v in runs):
        if isinstance(run, bool):  # traced and compiled (quantize/casts fuse into producers); fused attention or not
            t0 = time.perf_counter()
            run = lower(quantized, "cuda", dtype="float16", fused_attention=run).compile()
            run(**{name: x})
            rec[f"{key}_compile_s"] = time.perf_counter() - t0
        out = run(**{name: x})
        rec[f"{key}_ms"] = cuda_time(lambda: run(**{name: x}), iters)
        rec[f"{key}_sqnr_db"] = sqnr(ref, next(iter(out.values())))
        replay = run.capture(**{name: x})
        rec[f"{key}_graph_ms"] = cuda_time(lambda: replay(**{name: x}), iters)
        rec[f"{key}_graph_sqnr_db"] = sqnr(ref, next(iter(replay(**{name: x}).values())))
        del run, replay
    rec["integer_islands"] = program.quantized_layers
    del program
    if "torchao" in variants:
        rec.update(bench_torchao(model, xh, ref, iters))
    for key in ("qpass_w8a8_fp16", "qpass_w8a8_fp16_graph", "qpass_w8a8_compiled", "qpass_w8a8_compiled_graph",
                "qpass_w8a8_compiled_fattn", "qpass_w8a8_compiled_fattn_graph", "torchao_w8a8_compiled"):
        if f"{key}_ms" in rec:
            rec[f"{key}_vs_eager"] = rec["fp16_eager_ms"] / rec[f"{key}_ms"]
            rec[f"{key}_vs_compile"] = rec["fp16_compile_ms"] / rec[f"{key}_ms"]
    del model, fp16, compiled
    torch.cuda.empty_cache()
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--opt-layers", type=int, default=4)
    ap.add_argument("--models", default="bert-base,opt-1.3b")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="which of op,compiled,fattn,torchao to run (fp16 eager and compile always run)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_cuda_e2e needs a CUDA GPU")
    env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "python": platform.python_version()}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    print(json.dumps(env))
    results = []
    for kind in args.models.split(","):
        rec = bench(kind, args.iters, args.opt_layers, tuple(args.variants.split(",")))
        results.append(rec)
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in rec.items()}), flush=True)
    print("\n| model | fp16 eager ms | fp16 compile ms | qpass op by op, CUDA graph ms | qpass compiled, CUDA graph ms | "
          "+ fused attention ms | torchao compiled ms | qpass × eager | qpass × compile | SQNR dB fp16 / qpass / torchao |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    nan = float("nan")
    for r in results:
        g = lambda k: r.get(k, nan)  # noqa: E731 - variants not run print as nan
        best = min((v for v in (g("qpass_w8a8_compiled_graph_ms"), g("qpass_w8a8_compiled_fattn_graph_ms"), g("qpass_w8a8_fp16_graph_ms"))
                    if v == v), default=nan)
        print(f"| {r['model']} {r['input']} | {r['fp16_eager_ms']:.2f} | {r['fp16_compile_ms']:.2f} | {g('qpass_w8a8_fp16_graph_ms'):.2f} | "
              f"{g('qpass_w8a8_compiled_graph_ms'):.2f} | {g('qpass_w8a8_compiled_fattn_graph_ms'):.2f} | "
              f"{g('torchao_w8a8_compiled_ms'):.2f} | {r['fp16_eager_ms'] / best:.2f} | {r['fp16_compile_ms'] / best:.2f} | "
              f"{r['fp16_sqnr_db']:.1f} / {g('qpass_w8a8_compiled_fattn_graph_sqnr_db'):.1f} / {g('torchao_w8a8_sqnr_db'):.1f} |")

    if args.out:
        with open(args.out, "w") as f:
            json.dump({"environment": env, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
