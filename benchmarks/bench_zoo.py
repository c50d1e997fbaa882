"""Static int8 on architectures built in code: qpass's default vs onnxruntime's quantize_static.

    python benchmarks/bench_zoo.py [names...]    # vit mbv3 yolo crnn effnet convnext resnet (default: all)

Seven models with random weights (BatchNorm statistics from a few training-mode batches), exported
with torch.onnx at fixed input shapes: a ViT-Tiny-like encoder (patch 16, 4 pre-LN layers, width
192), a MobileNetV3-like CNN (Hardswish, depthwise convs, squeeze-excite), a YOLO-like detector
(SiLU, upsample, concat, sigmoid head), a CRNN (convs, LeakyReLU, bidirectional LSTM, log-softmax), an
EfficientNet-like CNN (MBConv: SiLU, depthwise convs, squeeze-excite by a spatial mean), a ConvNeXt-like
CNN (7x7 depthwise, channels-last LayerNorm, GELU MLP, per-channel layer scale, residuals) and a
ResNet-like CNN (basic blocks, Add + ReLU).
Same 32 random calibration inputs for both tools; 16 other inputs score the output SQNR against the
float model. onnxruntime: ``quant_pre_process`` then QDQ ``quantize_static`` (QUInt8 activations,
QInt8 weights) over MinMax / Percentile / Entropy x per-channel off / on, best SQNR kept. Also the
fused-op census of onnxruntime's optimized graph and 1-thread latency (median of 50 runs).
Needs torch (the ``test`` extra). Writes benchmarks/out/bench_zoo.json.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import torch
from torch import nn

import qpass
from qpass.backends.onnxruntime import fused_op_census

OUT = Path(__file__).resolve().parent / "out"


class SqueezeExcite(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.reduce, self.expand = nn.Conv2d(c, c // 4, 1), nn.Conv2d(c // 4, c, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.expand(torch.relu(self.reduce(x.mean((2, 3), keepdim=True)))))


class MobileNetLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.Hardswish())
        blocks, c = [], 16
        for out, stride in ((24, 2), (24, 1), (40, 2), (40, 1), (80, 2)):
            e = 4 * c
            blocks.append(nn.Sequential(
                nn.Conv2d(c, e, 1), nn.BatchNorm2d(e), nn.Hardswish(),
                nn.Conv2d(e, e, 3, stride, 1, groups=e), nn.BatchNorm2d(e), nn.Hardswish(),
                SqueezeExcite(e), nn.Conv2d(e, out, 1), nn.BatchNorm2d(out)))
            c = out
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 100))

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            y = block(x)
            x = y + x if y.shape == x.shape else y
        return self.head(x)


def _conv_bn_silu(i, o, k=3, s=1):
    return nn.Sequential(nn.Conv2d(i, o, k, s, k // 2), nn.BatchNorm2d(o), nn.SiLU())


class YoloLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.c3 = _conv_bn_silu(3, 16, 3, 2), _conv_bn_silu(16, 32, 3, 2), _conv_bn_silu(32, 64, 3, 2)
        self.c4 = _conv_bn_silu(64, 128, 3, 2)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.fuse = _conv_bn_silu(128 + 64, 64, 1)
        self.head_small, self.head_large = nn.Conv2d(64, 3 * 85, 1), nn.Conv2d(128, 3 * 85, 1)

    def forward(self, x):
        a = self.c3(self.c2(self.c1(x)))
        b = self.c4(a)
        return self.head_small(self.fuse(torch.cat([self.up(b), a], 1))), torch.sigmoid(self.head_large(b))


class ViTLike(nn.Module):
    def __init__(self, width=192, layers=4):
        super().__init__()
        self.patch = nn.Conv2d(3, width, 16, 16)
        self.cls = nn.Parameter(torch.randn(1, 1, width) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, 197, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, 3, 4 * width, 0.0, activation="gelu", batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        for i, block in enumerate(self.encoder.layers):  # the clones start equal: give each its own weights
            torch.manual_seed(100 + i)
            for p in block.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)
        self.norm, self.fc = nn.LayerNorm(width), nn.Linear(width, 100)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos
        return self.fc(self.norm(self.encoder(x))[:, 0])


class CRNNLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.cnn = nn.Sequential(
            nn.Conv2d(1, 32, 3, 1, 1), nn.BatchNorm2d(32), nn.LeakyReLU(0.1), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, 1, 1), nn.BatchNorm2d(64), nn.LeakyReLU(0.1), nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, 1, 1), nn.BatchNorm2d(128), nn.ReLU(), nn.MaxPool2d((2, 1)))
        self.rnn = nn.LSTM(128 * 8, 128, bidirectional=True, batch_first=True)
        self.fc = nn.Linear(256, 80)

    def forward(self, x):
        f = self.cnn(x)
        b, c, h, w = f.shape
        return self.fc(self.rnn(f.permute(0, 3, 1, 2).reshape(b, w, c * h))[0]).log_softmax(-1)


class SqueezeExciteSiLU(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.r, self.e = nn.Conv2d(c, c // 4, 1), nn.Conv2d(c // 4, c, 1)
    def forward(self, x):
        return x * torch.sigmoid(self.e(nn.functional.silu(self.r(x.mean((2, 3), keepdim=True)))))

class MBConv(nn.Module):
    def __init__(self, c, o, s):
        super().__init__()
        e = 4 * c
        self.body = nn.Sequential(nn.Conv2d(c, e, 1), nn.BatchNorm2d(e), nn.SiLU(), nn.Conv2d(e, e, 3, s, 1, groups=e),
                                  nn.BatchNorm2d(e), nn.SiLU(), SqueezeExciteSiLU(e), nn.Conv2d(e, o, 1), nn.BatchNorm2d(o))
        self.res = s == 1 and c == o
    def forward(self, x):
        y = self.body(x)
        return x + y if self.res else y

class EffNetLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.SiLU())
        self.blocks = nn.Sequential(MBConv(16, 24, 2), MBConv(24, 24, 1), MBConv(24, 40, 2), MBConv(40, 40, 1), MBConv(40, 80, 2))
        self.head = nn.Linear(80, 100)
    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))

class ConvNeXtBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.dw, self.ln = nn.Conv2d(c, c, 7, 1, 3, groups=c), nn.LayerNorm(c)
        self.fc1, self.fc2 = nn.Linear(c, 4 * c), nn.Linear(4 * c, c)
        self.gamma = nn.Parameter(torch.rand(c) * 0.5 + 0.1)
    def forward(self, x):
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.gamma * self.fc2(nn.functional.gelu(self.fc1(self.ln(y))))
        return x + y.permute(0, 3, 1, 2)

class ConvNeXtLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 64, 4, 4)
        self.blocks = nn.Sequential(*[ConvNeXtBlock(64) for _ in range(3)])
        self.down = nn.Conv2d(64, 128, 2, 2)
        self.blocks2 = nn.Sequential(*[ConvNeXtBlock(128) for _ in range(3)])
        self.head = nn.Linear(128, 100)
    def forward(self, x):
        return self.head(self.blocks2(self.down(self.blocks(self.stem(x)))).mean((2, 3)))

class ResNetLike(nn.Module):
    def __init__(self):
        super().__init__()
        def block(c):
            return nn.Sequential(nn.Conv2d(c, c, 3, 1, 1), nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, c, 3, 1, 1), nn.BatchNorm2d(c))
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 7, 2, 3), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(3, 2, 1))
        self.b = nn.ModuleList([block(32) for _ in range(2)])
        self.down = nn.Sequential(nn.Conv2d(32, 64, 3, 2, 1), nn.BatchNorm2d(64), nn.ReLU())
        self.b2 = nn.ModuleList([block(64) for _ in range(2)])
        self.fc = nn.Linear(64, 100)
    def forward(self, x):
        x = self.stem(x)
        for blk in self.b:
            x = torch.relu(x + blk(x))
        x = self.down(x)
        for blk in self.b2:
            x = torch.relu(x + blk(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


MODELS = {"vit": (ViTLike, (1, 3, 224, 224)), "mbv3": (MobileNetLike, (1, 3, 224, 224)),
          "yolo": (YoloLike, (1, 3, 256, 256)), "crnn": (CRNNLike, (1, 1, 64, 256)),
          "effnet": (EffNetLike, (1, 3, 224, 224)), "convnext": (ConvNeXtLike, (1, 3, 224, 224)),
          "resnet": (ResNetLike, (1, 3, 224, 224))}


class _Reader:
    def __init__(self, feeds):
        self.feeds, self.i = list(feeds), 0

    def get_next(self):
        self.i += 1
        return self.feeds[self.i - 1] if self.i <= len(self.feeds) else None

    def rewind(self):
        self.i = 0


def sqnr_db(ref: list[list[np.ndarray]], got: list[list[np.ndarray]]) -> float:
    """Mean over the outputs of 10 log10(signal / noise), all evaluation inputs pooled."""
    values = []
    for k in range(len(ref[0])):
        r = np.concatenate([o[k].ravel() for o in ref]).astype(np.float64)
        g = np.concatenate([o[k].ravel() for o in got]).astype(np.float64)
        values.append(10 * np.log10((r ** 2).sum() / max(((r - g) ** 2).sum(), 1e-30)))
    return float(np.mean(values))


def latency_ms(path: str, feed: dict) -> float:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    session.run(None, feed)
    times = []
    for _ in range(50):
        t = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - t)
    return float(np.median(times) * 1e3)


def bench(name: str, work: Path) -> dict:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    build, shape = MODELS[name]
    torch.manual_seed(0)
    model = build()
    model.train()
    with torch.no_grad():  # BatchNorm statistics of a few batches
        for _ in range(8):
            model(torch.randn(*shape))
    model.eval()
    src = work / f"{name}.onnx"
    torch.onnx.export(model, (torch.randn(*shape),), str(src), input_names=["x"], opset_version=17, dynamo=False)
    rng = np.random.default_rng(0)
    calib = [{"x": rng.standard_normal(shape).astype(np.float32)} for _ in range(32)]
    evaluation = [{"x": rng.standard_normal(shape).astype(np.float32)} for _ in range(16)]
    float_session = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"])
    ref = [float_session.run(None, f) for f in evaluation]

    def score(path: Path) -> dict:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        census = fused_op_census(ir.load(str(path)))
        return {"sqnr_db": sqnr_db(ref, [session.run(None, f) for f in evaluation]),
                "latency_1t_ms": latency_ms(str(path), evaluation[0]),
                "integer_ops": sum(census["integer"].values()), "float_behind_dq": census["float_behind_dq"]}

    rec: dict = {"model": name, "input": list(shape), "float_latency_1t_ms": latency_ms(str(src), evaluation[0])}
    t = time.perf_counter()
    result = qpass.quantize(str(src), calib)
    rec["qpass_seconds"] = time.perf_counter() - t
    qpass.save_model(result.model, work / f"{name}.qpass.onnx")
    rec["qpass"] = score(work / f"{name}.qpass.onnx")
    pre = work / f"{name}.pre.onnx"
    try:
        quant_pre_process(str(src), str(pre))
    except Exception:  # noqa: BLE001 - its failure only means quantizing the original
        pre = src
    best = None
    for method in ("MinMax", "Percentile", "Entropy"):
        for per_channel in (False, True):
            out = work / f"{name}.ort-{method}-{'pc' if per_channel else 'pt'}.onnx"
            t = time.perf_counter()
            try:
                quantize_static(str(pre), str(out), _Reader(calib), quant_format=QuantFormat.QDQ,
                                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=per_channel,
                                calibrate_method=getattr(CalibrationMethod, method))
            except Exception as e:  # noqa: BLE001 - a configuration that fails is reported, not fatal
                rec.setdefault("ort_errors", {})[f"{method} pc={per_channel}"] = str(e).splitlines()[0][:200]
                continue
            seconds = time.perf_counter() - t
            scored = {"config": f"{method} per_channel={per_channel}", "seconds": seconds, **score(out)}
            if best is None or scored["sqnr_db"] > best["sqnr_db"]:
                best = scored
    rec["ort_best"] = best
    return rec


def main() -> None:
    warnings.filterwarnings("ignore")
    import logging

    logging.disable(logging.WARNING)
    names = sys.argv[1:] or list(MODELS)
    OUT.mkdir(parents=True, exist_ok=True)
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            rec = bench(name, Path(tmp))
            records.append(rec)
            q, o = rec["qpass"], rec["ort_best"]
            print(f"{name}: qpass {q['sqnr_db']:.1f} dB, {q['latency_1t_ms']:.2f} ms, {q['integer_ops']} integer ops, "
                  f"float behind DQ {q['float_behind_dq']} | ort best ({o['config']}) {o['sqnr_db']:.1f} dB, "
                  f"{o['latency_1t_ms']:.2f} ms, {o['integer_ops']} integer ops, float behind DQ {o['float_behind_dq']} | "
                  f"float {rec['float_latency_1t_ms']:.2f} ms", flush=True)
    (OUT / "bench_zoo.json").write_text(json.dumps({"onnxruntime": ort.__version__, "torch": torch.__version__,
                                                    "date": time.strftime("%Y-%m-%d %H:%M:%S"), "models": records}, indent=1))
    print(f"wrote {OUT / 'bench_zoo.json'}")


if __name__ == "__main__":
    main()
