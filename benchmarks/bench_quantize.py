"""Benchmark: qpass static int8 (recipe w8a8) against onnxruntime's quantize_static.

Same calibration feeds for both tools, each model quantized once per configuration and
then evaluated against the float model on held-out data:

  all-MiniLM-L6-v2       generated English sentences (tokenized, batch 1, natural lengths);
                         64 calibrate, the rest evaluate. Sentence embedding = mean pooling
                         over the attention mask, L2-normalized. Metrics: mean cosine
                         (quantized vs float embedding) and Spearman correlation of all
                         pairwise cosine similarities (quantized vs float).
  ddddocr common.onnx    rendered text lines (4-8 random alphanumerics), preprocessed and
                         CTC-decoded exactly as ddddocr's OCREngine (beta model, beta
                         charset). Metrics: exact-match rate and character agreement
                         (1 - edit distance / length) of the decoded text vs float's.
  ddddocr common_det     rendered scenes (words and shapes on varied backgrounds), ddddocr's
                         YOLOX preprocessing. Metrics: SQNR of the raw output [3549 x 6] vs
                         float (the asked-for metric; it is dominated by the box-size columns of
                         background anchors that ddddocr throws away, so also: SQNR over the
                         anchors ddddocr keeps in float, obj x cls > 0.1); top-50 agreement
                         (share of float's 50 highest-scoring anchors, score = objectness x
                         class as ddddocr decodes it, also in the quantized top 50); box F1 at
                         IoU >= 0.5 of the final detections (ddddocr's decode + NMS) vs float's.

Tools (each quantization in a fresh child process: it first warms up on a tiny built-in
model so lazy imports are not timed, then the timer and the peak-RSS mark start):
  qpass   qpass.quantize(path, feeds) with default options (w8a8: per-channel symmetric
          int8 weights, uint8 per-tensor activations; its default activation observer is
          read from the recipe, not assumed: minmax until commit 14ded3d, percentile since)
          -> save_model; for reference also every other observer of minmax / percentile /
          mse / entropy. The "same configuration" in onnxruntime for the time and latency
          ratios is its calibrate_method of that observer, per-channel (MinMax per-channel
          where that one crashed).
  ort     opset upgrade to 13 with onnx.version_converter when the model is older (the
          ddddocr models: per-channel QDQ needs 13, and without it onnxruntime writes
          per-channel models that do not load), quant_pre_process (retried with
          skip_symbolic_shape=True when it fails), then quantize_static(QDQ, activations
          QUInt8, weights QInt8) for calibrate_method in {MinMax, Entropy, Percentile} x
          per_channel in {False, True}. Its time is the two steps together. "Best" = best
          primary metric among the grid configurations that ran. One more row, outside the
          grid, restricts onnxruntime to qpass's op types (Conv/ConvTranspose/Gemm/MatMul).

Latency: onnxruntime, ORT_ENABLE_ALL, intra_op_num_threads 1 and 2, 10 warm-up runs then
3 rounds of 50 timed runs, the rounds going round-robin over all of a model's variants;
the lowest round median is reported (a 2-core VM: a round disturbed by background work,
e.g. the kernel reclaiming memory after onnxruntime's multi-GB histogram calibrations, is
dropped rather than averaged in). One fixed input per model (MiniLM batch 1 x seq 64 real
tokens; one OCR line; one detector scene).
Peak memory = VmHWM (reset through /proc/self/clear_refs after imports, warm-up and
building the feeds) minus VmRSS at that point: the same quantity as DECISIONS.md's
ru_maxrss minus the baseline, but ru_maxrss of a child inherits the parent's peak (vfork
+ exec), which this benchmark's large parent process would dominate. Reported per
quantization, and for qpass calibrating MiniLM on 512 samples (onnxruntime beside it,
and qpass with report=False as a diagnostic of what the default report costs).

    python benchmarks/bench_quantize.py          # prints tables, writes benchmarks/out/bench_quantize.json
    python benchmarks/bench_quantize.py --timing [N]   # quantize time only: qpass default vs onnxruntime's
                                                       # same configuration, N alternating runs (default 3),
                                                       # writes benchmarks/out/bench_quantize_timing.json
"""

from __future__ import annotations

import json
import os
import platform
import random
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import models  # noqa: E402

OUT = models.OUT
WORK = OUT / "bench_quantize"
ort.set_default_logger_severity(3)

N_CALIB = 64
N_EVAL_MINILM = 300
N_EVAL_OCR = 1600  # 1 line = 0.0625 accuracy points (400 lines moved the score by several lines between runs)
N_EVAL_DET = 300
LAT_WARMUP, LAT_RUNS, LAT_ROUNDS = 10, 50, 3
TOPK = 50
ALLOW_DB, ALLOW_POINTS = 0.2, 0.3  # DECISIONS.md: noise allowance vs onnxruntime

QPASS_OBSERVERS = ("minmax", "percentile", "mse", "entropy")  # the default one is run without options
ORT_METHOD_OF = {"minmax": "MinMax", "percentile": "Percentile", "entropy": "Entropy"}  # same calibration in ORT
DEFAULT_LABEL = "qpass w8a8 (default)"
ORT_METHODS = ("MinMax", "Entropy", "Percentile")
QPASS_OP_TYPES = ("Conv", "ConvTranspose", "Gemm", "MatMul")  # what w8a8 quantizes (annotate-quant op_types)


# --- data: MiniLM ------------------------------------------------------------------------

def sentences(n: int) -> list[str]:
    """``n`` distinct sentences from templates x subjects x verbs x objects, shuffled with a fixed seed."""
    templates = [
        "The {s} {v} the {o}.",
        "Yesterday my {s} {v} a {o} near the old station.",
        "Why does the {s} always {vb} the {o} before dinner?",
        "In the morning, a quiet {s} {v} the {o} and then went home.",
        "Nobody expected that the {s} {v} the {o} so quickly.",
        "According to the report, the {s} {v} every {o} in the city last year.",
        "{S} {v} the {o}, but it was too late to change anything.",
        "Can a {s} really {vb} a {o} without any help?",
    ]
    subjects = ["teacher", "dog", "engineer", "child", "doctor", "robot", "farmer", "musician",
                "pilot", "cat", "student", "chef", "committee", "neighbor"]
    verbs = [("repaired", "repair"), ("painted", "paint"), ("found", "find"), ("sold", "sell"),
             ("described", "describe"), ("ignored", "ignore"), ("carried", "carry"), ("measured", "measure"),
             ("borrowed", "borrow"), ("cleaned", "clean")]
    objects = ["bicycle", "letter", "piano", "garden", "contract", "telescope", "bridge", "sandwich",
               "computer", "boat", "painting", "umbrella"]
    combos = [(t, s, v, o) for t in templates for s in subjects for v in verbs for o in objects]
    rng = random.Random(1234)
    picked = rng.sample(combos, n)
    out = []
    for t, s, (v, vb), o in picked:
        out.append(t.format(s=s, S=s.capitalize(), v=v, vb=vb, o=o))
    return out


def minilm_data():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(models.minilm_dir()))
    texts = sentences(N_CALIB + N_EVAL_MINILM)

    def feed(text, **kw):
        enc = tok(text, return_tensors="np", **kw)
        return {k: np.ascontiguousarray(enc[k].astype(np.int64)) for k in ("input_ids", "attention_mask", "token_type_ids")}

    feeds = [feed(t) for t in texts]
    long_text = " ".join(texts[N_CALIB:N_CALIB + 12])
    lat = feed(long_text, truncation=True, max_length=64, padding="max_length")
    assert lat["input_ids"].shape == (1, 64) and lat["attention_mask"].all()
    return feeds[:N_CALIB], feeds[N_CALIB:], lat, texts


# --- data: ddddocr OCR -------------------------------------------------------------------

FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")


def fonts() -> list[str]:
    names = ["DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf",
             "DejaVuSansCondensed.ttf", "DejaVuSerif-Bold.ttf"]
    found = [str(FONT_DIR / n) for n in names if (FONT_DIR / n).exists()]
    if not found:
        found = sorted(str(p) for p in Path("/usr/share/fonts").rglob("*.ttf"))[:6]
    return found  # empty: PIL's default bitmap font is used


def _font(path: str | None, size: int):
    from PIL import ImageFont

    if path is None:
        try:
            return ImageFont.load_default(size=size)
        except TypeError:
            return ImageFont.load_default()
    return ImageFont.truetype(path, size)


def render_line(rng: random.Random, font_paths: list[str]):
    """A text line image (RGB) with 4-8 random alphanumerics; returns (image, text)."""
    from PIL import Image, ImageDraw, ImageFilter

    alphabet = string.ascii_letters + string.digits
    text = "".join(rng.choice(alphabet) for _ in range(rng.randint(4, 8)))
    size = rng.randint(30, 46)
    font = _font(rng.choice(font_paths) if font_paths else None, size)
    left, top, right, bottom = ImageDraw.Draw(Image.new("L", (1, 1))).textbbox((0, 0), text, font=font)
    pad_x, pad_y = rng.randint(6, 20), rng.randint(6, 14)
    w, h = right - left + 2 * pad_x, bottom - top + 2 * pad_y
    bg = tuple(rng.randint(170, 255) for _ in range(3))
    fg = tuple(rng.randint(0, 90) for _ in range(3))
    img = Image.new("RGB", (w, h), bg)
    d = ImageDraw.Draw(img)
    for _ in range(rng.randint(0, 3)):  # light clutter lines
        c = tuple(rng.randint(120, 200) for _ in range(3))
        d.line([(rng.randint(0, w), rng.randint(0, h)), (rng.randint(0, w), rng.randint(0, h))], fill=c, width=1)
    d.text((pad_x - left, pad_y - top), text, fill=fg, font=font)
    img = img.rotate(rng.uniform(-3.0, 3.0), resample=Image.BILINEAR, expand=False, fillcolor=bg)
    if rng.random() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.8)))
    arr = np.asarray(img).astype(np.float32)
    nrng = np.random.default_rng(rng.randint(0, 2**31))
    arr += nrng.normal(0, rng.uniform(0, 8), arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)), text


def ocr_preprocess(image) -> np.ndarray:
    """ddddocr OCREngine._preprocess_image for its default models (no import_onnx_path)."""
    from PIL import Image

    target_height = 64
    target_width = int(image.size[0] * (target_height / image.size[1]))
    image = image.resize((target_width, target_height), Image.LANCZOS)  # ImageProcessor.resize_image
    image = image.convert("L")  # ImageProcessor.convert_to_grayscale
    arr = np.array(image).astype(np.float32) / 255.0
    return arr[None, None]  # [1, 1, 64, W]


def ocr_charset() -> list[str]:
    """The charset OCREngine uses with common.onnx (beta=True: CharsetManager's beta charset)."""
    from ddddocr.models.charset_manager import CharsetManager

    cm = CharsetManager()
    cm.load_default_charset(old=False, beta=True)
    return cm.get_charset()


def ocr_decode(output: np.ndarray, charset: list[str]) -> str:
    """OCREngine._process_text_output (output [T, 1, C]): argmax, collapse repeats, drop blank 0."""
    if output.ndim == 3:
        if output.shape[1] == 1:
            idx = np.argmax(output[:, 0, :], axis=1)
        else:
            idx = np.argmax(output[0, :, :], axis=1)
    else:
        idx = np.atleast_1d(np.argmax(output, axis=-1))
    chars, prev = [], None
    for i in idx:
        i = int(i)
        if i != prev and i != 0 and 0 <= i < len(charset):
            chars.append(charset[i])
        prev = i
    return "".join(chars)


def ocr_data():
    rng = random.Random(2024)
    fp = fonts()
    items = [render_line(rng, fp) for _ in range(N_CALIB + N_EVAL_OCR)]
    feeds = [{"input1": ocr_preprocess(img)} for img, _ in items]
    truth = [t for _, t in items]
    lat_index = max(range(N_CALIB, len(items)), key=lambda i: (len(truth[i]) == 6, -abs(feeds[i]["input1"].shape[3] - 260)))
    return feeds[:N_CALIB], feeds[N_CALIB:], feeds[lat_index], truth[N_CALIB:], fp


# --- data: ddddocr detector --------------------------------------------------------------

def render_scene(rng: random.Random, font_paths: list[str]) -> np.ndarray:
    """A BGR uint8 image (like cv2.imdecode) with a few words/characters and shapes on a varied background."""
    from PIL import Image, ImageDraw

    w, h = rng.randint(280, 640), rng.randint(150, 420)
    nrng = np.random.default_rng(rng.randint(0, 2**31))
    kind = rng.choice(("solid", "gradient", "noise", "blocks"))
    if kind == "solid":
        arr = np.ones((h, w, 3)) * np.array([rng.randint(0, 255) for _ in range(3)])
    elif kind == "gradient":
        a, b = nrng.uniform(0, 255, 3), nrng.uniform(0, 255, 3)
        t = np.linspace(0, 1, w)[None, :, None] if rng.random() < 0.5 else np.linspace(0, 1, h)[:, None, None]
        arr = np.broadcast_to(a * (1 - t) + b * t, (h, w, 3))
    elif kind == "noise":
        small = nrng.uniform(0, 255, (max(2, h // 16), max(2, w // 16), 3)).astype(np.uint8)
        arr = np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC)).astype(np.float64)
    else:
        arr = np.ones((h, w, 3)) * nrng.uniform(0, 255, 3)
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(img)
    if kind == "blocks":
        for _ in range(rng.randint(3, 8)):
            x0, y0 = rng.randint(0, w), rng.randint(0, h)
            d.rectangle([x0, y0, x0 + rng.randint(20, 200), y0 + rng.randint(20, 150)], fill=tuple(rng.randint(0, 255) for _ in range(3)))
    for _ in range(rng.randint(1, 4)):  # shapes
        x0, y0 = rng.randint(0, w - 20), rng.randint(0, h - 20)
        box = [x0, y0, x0 + rng.randint(15, 90), y0 + rng.randint(15, 90)]
        col = tuple(rng.randint(0, 255) for _ in range(3))
        (d.ellipse if rng.random() < 0.5 else d.rectangle)(box, outline=col, width=rng.randint(1, 4))
    words = ["OK", "Go", "AB", "x7", "Q", "M", "zeta", "42", "Hi", "W", "K9", "R", "pz", "7", "Ng"]
    for _ in range(rng.randint(2, 6)):  # words / single characters, each a target for the detector
        font = _font(rng.choice(font_paths) if font_paths else None, rng.randint(22, 56))
        d.text((rng.randint(0, max(1, w - 80)), rng.randint(0, max(1, h - 60))), rng.choice(words),
               fill=tuple(rng.randint(0, 255) for _ in range(3)), font=font)
    return np.ascontiguousarray(np.asarray(img)[:, :, ::-1])  # RGB -> BGR


def det_preprocess(img: np.ndarray, input_size=(416, 416)) -> tuple[np.ndarray, float]:
    """ddddocr DetectionEngine.preproc: resize keeping aspect, pad with 114, HWC -> CHW float32 (0..255)."""
    import cv2

    padded = np.ones((input_size[0], input_size[1], 3), dtype=np.uint8) * 114
    r = min(input_size[0] / img.shape[0], input_size[1] / img.shape[1])
    resized = cv2.resize(img, (int(img.shape[1] * r), int(img.shape[0] * r)), interpolation=cv2.INTER_LINEAR).astype(np.uint8)
    padded[: int(img.shape[0] * r), : int(img.shape[1] * r)] = resized
    return np.ascontiguousarray(padded.transpose(2, 0, 1), dtype=np.float32), r


def det_scores(output: np.ndarray) -> np.ndarray:
    """Per-anchor score as ddddocr computes it: objectness x class probability (one class)."""
    pred = output[0]
    return (pred[:, 4:5] * pred[:, 5:]).max(axis=1)


def det_boxes(output: np.ndarray, ratio: float) -> np.ndarray:
    """ddddocr DetectionEngine.get_bbox decode (grids, strides, exp) + class-agnostic NMS(0.45), score > 0.1."""
    pred = output[0].copy()
    grids, strides = [], []
    for stride in (8, 16, 32):
        hs = ws = 416 // stride
        xv, yv = np.meshgrid(np.arange(ws), np.arange(hs))
        grids.append(np.stack((xv, yv), 2).reshape(-1, 2))
        strides.append(np.full((hs * ws, 1), stride))
    grids, strides = np.concatenate(grids), np.concatenate(strides)
    pred[:, :2] = (pred[:, :2] + grids) * strides
    pred[:, 2:4] = np.exp(pred[:, 2:4]) * strides
    scores = (pred[:, 4:5] * pred[:, 5:]).max(axis=1)
    b = pred[:, :4]
    xyxy = np.stack([b[:, 0] - b[:, 2] / 2, b[:, 1] - b[:, 3] / 2, b[:, 0] + b[:, 2] / 2, b[:, 1] + b[:, 3] / 2], 1) / ratio
    keep_mask = scores > 0.1
    boxes, sc = xyxy[keep_mask], scores[keep_mask]
    order = sc.argsort()[::-1]
    keep = []
    while order.size > 0:
        i = order[0]
        keep.append(i)
        rest = order[1:]
        xx1, yy1 = np.maximum(boxes[i, 0], boxes[rest, 0]), np.maximum(boxes[i, 1], boxes[rest, 1])
        xx2, yy2 = np.minimum(boxes[i, 2], boxes[rest, 2]), np.minimum(boxes[i, 3], boxes[rest, 3])
        inter = np.maximum(0.0, xx2 - xx1 + 1) * np.maximum(0.0, yy2 - yy1 + 1)
        area = lambda k: (boxes[k, 2] - boxes[k, 0] + 1) * (boxes[k, 3] - boxes[k, 1] + 1)  # noqa: E731
        ovr = inter / (area(i) + area(rest) - inter)
        order = rest[ovr <= 0.45]
    return boxes[keep]


def box_f1(ref: np.ndarray, got: np.ndarray, thr: float = 0.5) -> tuple[int, int, int]:
    """(matched, n_ref, n_got): greedy one-to-one matching at IoU >= thr."""
    if len(ref) == 0 or len(got) == 0:
        return 0, len(ref), len(got)
    x1 = np.maximum(ref[:, None, 0], got[None, :, 0])
    y1 = np.maximum(ref[:, None, 1], got[None, :, 1])
    x2 = np.minimum(ref[:, None, 2], got[None, :, 2])
    y2 = np.minimum(ref[:, None, 3], got[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = lambda b: (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])  # noqa: E731
    iou = inter / (area(ref)[:, None] + area(got)[None, :] - inter + 1e-9)
    matched = 0
    for i in np.argsort(-iou.max(axis=1)):  # most confident reference boxes first
        j = int(np.argmax(iou[i]))
        if iou[i, j] >= thr:
            iou[:, j] = -1.0  # each detection matches once
            matched += 1
    return matched, len(ref), len(got)


def det_data():
    rng = random.Random(77)
    fp = fonts()
    feeds, ratios = [], []
    for _ in range(N_CALIB + N_EVAL_DET):
        x, r = det_preprocess(render_scene(rng, fp))
        feeds.append({"images": x[None]})
        ratios.append(r)
    return feeds[:N_CALIB], feeds[N_CALIB:], feeds[N_CALIB], ratios[N_CALIB:]


# --- metrics ---------------------------------------------------------------------------

def sqnr_db(ref: np.ndarray, got: np.ndarray) -> float:
    ref, got = ref.astype(np.float64).ravel(), got.astype(np.float64).ravel()
    noise = np.sum((ref - got) ** 2)
    return float("inf") if noise == 0 else float(10 * np.log10(np.sum(ref ** 2) / noise))


def ranks(x: np.ndarray) -> np.ndarray:
    r = np.empty(len(x), dtype=np.float64)
    r[np.argsort(x, kind="stable")] = np.arange(len(x), dtype=np.float64)
    return r


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(ranks(a), ranks(b))[0, 1])


def edit_distance(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def embed(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    m = mask[..., None].astype(np.float32)
    e = (hidden * m).sum(1) / np.clip(m.sum(1), 1e-9, None)
    return e / np.linalg.norm(e, axis=1, keepdims=True)


# --- sessions, latency, census -----------------------------------------------------------

# --- sessions, latency, census -----------------------------------------------------------

def session(path: Path, threads: int | None = None, optimized_path: str | None = None) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if optimized_path:
        so.optimized_model_filepath = optimized_path
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def latencies(paths: dict[str, Path], feed: dict) -> dict[str, dict]:
    """Per model and thread count (1, 2): LAT_ROUNDS rounds of LAT_RUNS timed runs after LAT_WARMUP.

    Rounds go round-robin over all models, so a disturbance (this 2-core VM also runs the
    kernel's memory reclaim after the multi-GB calibrations) hits every model alike; each
    model's lowest round median is reported.
    """
    import gc

    out: dict[str, dict] = {k: {"ms": {}, "round_medians": {}} for k in paths}
    for threads in (1, 2):
        sessions = {}
        for label, path in paths.items():
            try:
                sessions[label] = session(path, threads)
                for _ in range(LAT_WARMUP):
                    sessions[label].run(None, feed)
            except Exception as e:
                out[label]["error"] = first_line(e)
                sessions.pop(label, None)
        for label in sessions:
            out[label]["round_medians"][f"{threads}T"] = []
        gc.disable()
        try:
            for _ in range(LAT_ROUNDS):
                for label, sess in sessions.items():
                    times = []
                    for _ in range(LAT_RUNS):
                        t0 = time.perf_counter()
                        sess.run(None, feed)
                        times.append(time.perf_counter() - t0)
                    out[label]["round_medians"][f"{threads}T"].append(float(np.median(times) * 1000))
        finally:
            gc.enable()
        for label in sessions:
            out[label]["ms"][f"{threads}T"] = min(out[label]["round_medians"][f"{threads}T"])
        del sessions
    return out


def census(path: Path) -> dict:
    """Integer kernels vs float Conv/MatMul/Gemm left behind a DequantizeLinear after ORT_ENABLE_ALL."""
    import onnx

    from qpass.backends.onnxruntime import FLOAT_COMPUTE_OPS, INTEGER_OPS

    with tempfile.TemporaryDirectory(dir=WORK) as tmp:
        opt = os.path.join(tmp, "opt.onnx")
        session(path, 1, optimized_path=opt)
        g = onnx.load(opt, load_external_data=False).graph
    producers = {o: n.op_type for n in g.node for o in n.output}
    integer, behind, other, qdq = {}, {}, {}, {}
    for n in g.node:
        if n.op_type in INTEGER_OPS:
            integer[n.op_type] = integer.get(n.op_type, 0) + 1
        elif n.op_type in FLOAT_COMPUTE_OPS:
            b = behind if any(producers.get(i) == "DequantizeLinear" for i in n.input) else other
            b[n.op_type] = b.get(n.op_type, 0) + 1
        elif n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            qdq[n.op_type] = qdq.get(n.op_type, 0) + 1
    return {"integer": integer, "float_behind_dq": behind, "float_other": other, "qdq_left": qdq}


def census_text(c: dict) -> str:
    f = lambda d: ",".join(f"{k}:{v}" for k, v in sorted(d.items())) or "-"  # noqa: E731
    return f"int[{f(c['integer'])}] float-behind-DQ[{f(c['float_behind_dq'])}] Q/DQ-left[{f(c['qdq_left'])}]"


# --- quantizers (run in a fresh child process each: clean time and peak memory) ------------

class Reader:
    """onnxruntime CalibrationDataReader over a list of feed dicts."""

    def __init__(self, feeds):
        self.feeds, self.i = feeds, 0

    def get_next(self):
        if self.i >= len(self.feeds):
            return None
        self.i += 1
        return self.feeds[self.i - 1]

    def rewind(self):
        self.i = 0


def make_reader(feeds):
    from onnxruntime.quantization import CalibrationDataReader

    return type("FeedReader", (Reader, CalibrationDataReader), {})(feeds)


def ort_preprocess(src: Path, dst: Path) -> dict:
    """Opset < 13 -> onnx.version_converter to 13 (per-channel QDQ needs it), then quant_pre_process."""
    import onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process

    notes = []
    model_in = src
    opset = next((o.version for o in onnx.load(str(src), load_external_data=False).opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 13:
        model_in = dst.with_suffix(".opset13.onnx")
        onnx.save(onnx.version_converter.convert_version(onnx.load(str(src)), 13), str(model_in))
        notes.append(f"opset {opset} -> 13 with onnx.version_converter (without it, per-channel models do not load: "
                     "'Unrecognized attribute: axis for operator DequantizeLinear')")
    try:
        quant_pre_process(str(model_in), str(dst), skip_symbolic_shape=False)
    except Exception as e:
        notes.append(f"symbolic shape inference failed ({first_line(e)[:70]}); retried with skip_symbolic_shape=True")
        quant_pre_process(str(model_in), str(dst), skip_symbolic_shape=True)
    return {"notes": notes}


def ort_quantize(src: Path, dst: Path, feeds, method: str, per_channel: bool, op_types=None) -> dict:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    quantize_static(
        str(src), str(dst), make_reader(feeds), quant_format=QuantFormat.QDQ, op_types_to_quantize=op_types,
        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=per_channel,
        calibrate_method=getattr(CalibrationMethod, method),
    )
    return {}


def qpass_quantize(src: Path, dst: Path, feeds, observer: str, report: bool = True) -> dict:
    import qpass

    opts = {} if observer is None else {"observer": observer}  # None: the default options, nothing passed
    if not report:
        opts["report"] = False  # diagnostics only
    t0 = time.perf_counter()
    result = qpass.quantize(str(src), feeds, **opts)
    t1 = time.perf_counter()
    qpass.save_model(result.model, dst)
    t2 = time.perf_counter()
    rep = result.report
    out = {
        "quantize_seconds": t1 - t0, "pipeline_seconds": result.seconds, "save_seconds": t2 - t1,
        "pass_seconds": {s.name: round(s.seconds, 3) for s in result.stats if s.seconds > 0.05},
    }
    if rep is None:
        return out
    return {
        **out,
        "report_output_sqnr_db": {k: round(float(v), 3) for k, v in rep.output_sqnr_db.items()},
        "report_fused": rep.fused,
        "worst_layers": [(l.node, l.op_type, round(float(l.sqnr_db), 2)) for l in rep.layers[:3]],
    }


def _warm_up(tool: str) -> None:
    """Pay lazy imports once on a tiny built-in model, before the timer starts."""
    import onnx

    from qpass.demo import demo_calibration, demo_cnn

    m = demo_cnn()
    calib = demo_calibration(m, 4)
    src = WORK / f"warmup.{os.getpid()}.onnx"
    onnx.save(m, src)
    try:
        if tool == "qpass":
            qpass_quantize(src, src.with_suffix(".q.onnx"), calib, None)
        elif tool == "ort":
            ort_quantize(src, src.with_suffix(".q.onnx"), calib, "MinMax", True)
        else:
            ort_preprocess(src, src.with_suffix(".q.onnx"))
    finally:
        for p in (src, src.with_suffix(".q.onnx")):
            p.unlink(missing_ok=True)


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def child_main(spec_path: str) -> None:
    """Child process: warm up, load the feeds, reset the peak-RSS mark, run one tool, print JSON."""
    import gc

    spec = json.loads(Path(spec_path).read_text())
    tool = spec["tool"]
    _warm_up(tool)
    feeds = load_feeds(Path(spec["calib"])) if spec.get("calib") else []
    if spec.get("repeat"):
        feeds = [feeds[i % len(feeds)] for i in range(spec["repeat"])]
    gc.collect()
    base = _status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # peak RSS (VmHWM) := current RSS
        f.write("5")
    t0 = time.perf_counter()
    src, dst = Path(spec["src"]), Path(spec["dst"])
    if tool == "qpass":
        extra = qpass_quantize(src, dst, feeds, spec["observer"], spec.get("report", True))
    elif tool == "ort":
        extra = ort_quantize(src, dst, feeds, spec["method"], spec["per_channel"], spec.get("op_types"))
    else:
        extra = ort_preprocess(src, dst)
    seconds = time.perf_counter() - t0
    peak = _status_kb("VmHWM")
    print("RESULT " + json.dumps(jsonable({"seconds": seconds, "peak_mb": (peak - base) / 1024, "base_mb": base / 1024, **extra})))


def save_feeds(feeds, path: Path) -> None:
    np.savez(path, count=len(feeds), **{f"{i}.{k}": v for i, f in enumerate(feeds) for k, v in f.items()})


def load_feeds(path: Path) -> list[dict]:
    with np.load(path) as z:
        names = sorted({k.split(".", 1)[1] for k in z.files if "." in k})
        return [{k: z[f"{i}.{k}"] for k in names if f"{i}.{k}" in z.files} for i in range(int(z["count"]))]


def run_child(spec: dict) -> dict:
    spec_path = WORK / f"spec.{os.getpid()}.json"
    spec_path.write_text(json.dumps(spec))
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", str(spec_path)],
                          capture_output=True, text=True, cwd=WORK)
    spec_path.unlink(missing_ok=True)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    err = [l for l in proc.stderr.strip().splitlines() if l.strip() and not l.startswith("WARNING")]
    return {"error": (err or [f"exit code {proc.returncode}"])[-1][:300], "returncode": proc.returncode}


def first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return f"{type(e).__name__}: {text.splitlines()[0][:160]}"


# --- evaluation ------------------------------------------------------------------------

def run_all(path: Path, feeds) -> list[np.ndarray]:
    sess = session(path)
    return [sess.run(None, f)[0] for f in feeds]


def eval_minilm(outs, ref, eval_feeds) -> dict:
    emb = lambda o: np.concatenate([embed(h, f["attention_mask"]) for h, f in zip(o, eval_feeds)])  # noqa: E731
    ef, eq = ref["emb"], emb(outs)
    cos = np.sum(ef * eq, axis=1)
    iu = np.triu_indices(len(ef), 1)
    sq = (eq @ eq.T)[iu]
    return {"mean_cos": float(cos.mean()), "min_cos": float(cos.min()), "spearman": spearman(ref["pair"], sq),
            "pairs": int(len(sq)), "sqnr_db": sqnr_db(np.concatenate([o.ravel() for o in ref["raw"]]), np.concatenate([o.ravel() for o in outs]))}


def eval_ocr(outs, ref, charset, truth) -> dict:
    texts = [ocr_decode(o, charset) for o in outs]
    exact = np.mean([a == b for a, b in zip(texts, ref["texts"])])
    dist = sum(edit_distance(a, b) for a, b in zip(ref["texts"], texts))
    total = sum(max(len(a), 1) for a in ref["texts"])
    return {"exact_vs_float": float(exact), "char_agree_vs_float": float(1 - dist / total),
            "exact_vs_truth": float(np.mean([a == b for a, b in zip(texts, truth)])),
            "exact_vs_truth_nocase": float(np.mean([a.lower() == b.lower() for a, b in zip(texts, truth)])),
            "sqnr_db": sqnr_db(np.concatenate([o.ravel() for o in ref["raw"]]), np.concatenate([o.ravel() for o in outs]))}


def eval_det(outs, ref, ratios) -> dict:
    raw_f = np.concatenate([o[0] for o in ref["raw"]])
    raw_q = np.concatenate([o[0] for o in outs])
    fg = det_scores(raw_f[None]) > 0.1  # anchors ddddocr's decode keeps (score > 0.1) in the float model
    overlaps, m, nr, ng = [], 0, 0, 0
    for o, r_out, ratio, r_boxes in zip(outs, ref["raw"], ratios, ref["boxes"]):
        top_f = set(np.argsort(-det_scores(r_out))[:TOPK].tolist())
        top_q = set(np.argsort(-det_scores(o))[:TOPK].tolist())
        overlaps.append(len(top_f & top_q) / TOPK)
        a, b, c = box_f1(r_boxes, det_boxes(o, ratio))
        m, nr, ng = m + a, nr + b, ng + c
    return {"sqnr_db": sqnr_db(raw_f, raw_q), "fg_sqnr_db": sqnr_db(raw_f[fg], raw_q[fg]),
            "col_sqnr_db": [sqnr_db(raw_f[:, c], raw_q[:, c]) for c in range(raw_f.shape[1])],
            "top50_agree": float(np.mean(overlaps)), "box_f1": float(2 * m / (nr + ng)) if nr + ng else 1.0,
            "boxes_float": nr, "boxes_quant": ng, "fg_anchors": int(fg.sum())}


# --- driver ----------------------------------------------------------------------------

def qpass_default_observer() -> str:
    """The activation observer of the default recipe's annotate-quant pass (read, not assumed)."""
    from qpass.api import build_passes

    return next(getattr(p, "observer", "?") for p in build_passes("w8a8", None) if getattr(p, "name", "") == "annotate-quant")


def git_commit() -> str:
    proc = subprocess.run(["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(HERE.parent), "status", "--porcelain", "--", "qpass", "passes", "backends"],
                           capture_output=True, text=True).stdout.strip()
    return proc.stdout.strip() + (" (+ local changes)" if dirty else "")


def configs(src: Path) -> list[dict]:
    """Every (label, child spec) to run for one model, qpass first."""
    default = qpass_default_observer()
    out = [{"label": DEFAULT_LABEL, "tool": "qpass", "observer": None, "default": True, "default_observer": default,
            "dst": str(WORK / f"{src.stem}.qpass-default.onnx")}]
    for obs in QPASS_OBSERVERS:
        if obs != default:
            out.append({"label": f"qpass observer={obs} [ref]", "tool": "qpass", "observer": obs, "default": False,
                        "dst": str(WORK / f"{src.stem}.qpass-{obs}.onnx")})
    for method in ORT_METHODS:
        for pc in (False, True):
            out.append({"label": f"ort {method} per_channel={pc}", "tool": "ort", "method": method, "per_channel": pc,
                        "grid": True, "dst": str(WORK / f"{src.stem}.ort-{method}-{'pc' if pc else 'pt'}.onnx")})
        if method == "MinMax":  # before the histogram methods, whose multi-GB runs disturb the VM for a while
            out.append({"label": "ort MinMax pc, qpass's op types [ref]", "tool": "ort", "method": "MinMax",
                        "per_channel": True, "grid": False, "op_types": list(QPASS_OP_TYPES),
                        "dst": str(WORK / f"{src.stem}.ort-MinMax-pc-ops.onnx")})
    return out


def bench_model(name: str, src: Path, calib, eval_feeds, lat_feed, evaluate, metrics: list[tuple[str, str]]) -> dict:
    """Quantize ``src`` with every configuration (child processes), evaluate, time; returns the model's record."""
    print(f"\n== {name} ({src.name}, {src.stat().st_size / 2**20:.1f} MB): calibration {len(calib)}, "
          f"evaluation {len(eval_feeds)}", flush=True)
    t_model = time.perf_counter()
    calib_npz = WORK / f"{src.stem}.calib.npz"
    save_feeds(calib, calib_npz)
    rows: dict[str, dict] = {}

    paths: dict[str, Path] = {"float": src}
    rows["float"] = {"tool": "float"}
    pre = WORK / f"{src.stem}.ort-pre.onnx"
    pre_res = run_child({"tool": "ort-pre", "src": str(src), "dst": str(pre)})
    if "error" in pre_res:
        pre_res = {"seconds": 0.0, "peak_mb": 0.0, "notes": [f"quant_pre_process failed ({pre_res['error']}); quantizing the original"]}
        pre = src
    for cfg in configs(src):  # 1. quantize every configuration, each in a fresh process
        label = cfg.pop("label")
        spec = {**cfg, "src": str(src if cfg["tool"] == "qpass" else pre), "calib": str(calib_npz)}
        res = run_child(spec)
        row = {k: v for k, v in cfg.items() if k != "dst"}
        if "error" in res:
            rows[label] = {**row, "error": res["error"]}
            print(f"   {label:38s} ERROR {res['error']}", flush=True)
            continue
        if cfg["tool"] == "ort":
            res = {"seconds": pre_res["seconds"] + res["seconds"], "quantize_static_seconds": res["seconds"],
                   "preprocess_seconds": pre_res["seconds"], "peak_mb": max(res["peak_mb"], pre_res["peak_mb"]),
                   "quantize_static_peak_mb": res["peak_mb"], "preprocess_peak_mb": pre_res["peak_mb"]}
        rows[label] = {**row, **res}
        paths[label] = Path(cfg["dst"])
        print(f"   {label:38s} quantize {res['seconds']:6.2f} s, peak +{res['peak_mb']:7.1f} MB", flush=True)
    t0 = time.perf_counter()
    for label, path in list(paths.items()):  # 2. accuracy and kernel census
        row = rows[label]
        try:
            row["metrics"] = evaluate(run_all(path, eval_feeds))
            row["census"] = census(path)
            row["size_mb"] = path.stat().st_size / 2**20
        except Exception as e:
            row["error"] = "evaluation: " + first_line(e)
            print(f"   {label:38s} ERROR {row['error']}", flush=True)
            paths.pop(label)
    print(f"   evaluation of {len(paths)} models: {time.perf_counter() - t0:.1f} s", flush=True)
    t0 = time.perf_counter()
    for label, lat in latencies(paths, lat_feed).items():  # 3. latency, round-robin
        rows[label]["latency_ms"] = lat["ms"]
        rows[label]["latency_round_medians"] = lat["round_medians"]
        if "error" in lat:
            rows[label]["latency_error"] = lat["error"]
    print(f"   latency of {len(paths)} models: {time.perf_counter() - t0:.1f} s", flush=True)
    f_lat = rows["float"].get("latency_ms", {})
    for row in rows.values():
        if "latency_ms" in row and f_lat:
            row["speedup"] = {t: f_lat[t] / v for t, v in row["latency_ms"].items()}
    ok_ort = {k: r for k, r in rows.items() if r.get("grid") and "metrics" in r}
    best_ort = max(ok_ort, key=lambda k: tuple(ok_ort[k]["metrics"][m] for m, _ in metrics)) if ok_ort else None
    return {"model": name, "file": str(src), "size_mb": src.stat().st_size / 2**20, "rows": rows, "metrics": metrics,
            "best_ort": best_ort, "ort_preprocess_notes": pre_res.get("notes", []), "seconds_total": time.perf_counter() - t_model,
            "calibration_samples": len(calib), "eval_samples": len(eval_feeds)}


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def print_table(rec: dict, columns: list[tuple[str, str, str]]) -> None:
    print(f"\n### {rec['model']}  (calibration {rec['calibration_samples']}, evaluation {rec['eval_samples']}; "
          f"onnxruntime best on its grid by {rec['metrics'][0][0]}: {rec['best_ort']})")
    for note in rec["ort_preprocess_notes"]:
        print(f"    ort pre-processing: {note}")
    head = f"| {'tool / config':38s} | " + " | ".join(f"{h:>9s}" for h, _, _ in columns)
    head += f" | {'quant s':>7s} | {'peak MB':>7s} | {'file MB':>7s} | {'lat 1T ms':>9s} | {'lat 2T ms':>9s} | {'speedup 1T/2T':>13s} |"
    print(head)
    print("|" + "|".join("-" * len(c) for c in head.split("|")[1:-1]) + "|")
    for label, r in rec["rows"].items():
        name = label + (" *" if label == rec["best_ort"] else "")
        if "metrics" not in r:
            print(f"| {name:38s} | ERROR: {r.get('error', '?')[:160]}")
            continue
        m = r["metrics"]
        cells = " | ".join(f"{fmt(m.get(k), f):>9s}" for _, k, f in columns)
        lat, sp = r.get("latency_ms", {}), r.get("speedup", {})
        sp_txt = f"{sp['1T']:.2f}x/{sp['2T']:.2f}x" if sp else "-"
        print(f"| {name:38s} | {cells} | {fmt(r.get('seconds'), '7.2f'):>7s} | {fmt(r.get('peak_mb'), '7.0f'):>7s} | {fmt(r.get('size_mb'), '7.1f'):>7s} | "
              f"{fmt(lat.get('1T'), '9.2f')} | {fmt(lat.get('2T'), '9.2f')} | {sp_txt:>13s} |")
    print("  * onnxruntime's best grid configuration. quant s: wall time in a fresh process (after a warm-up on a tiny "
          "model), calibration and writing the model included; ort = opset upgrade if needed + quant_pre_process + "
          "quantize_static. peak MB: peak RSS increase of that process (ort: the larger of its two steps). file MB: the written model.")
    for label, r in rec["rows"].items():
        if r.get("census"):
            print(f"  kernels  {label:38s} {census_text(r['census'])}")
    q = rec["rows"].get(DEFAULT_LABEL, {})
    if "pipeline_seconds" in q:
        print(f"  qpass default: quantize() {q['quantize_seconds']:.2f} s = passes {q['pipeline_seconds']:.2f} s "
              f"({', '.join(f'{k} {v:.2f}' for k, v in q['pass_seconds'].items())}) + load/report "
              f"{q['quantize_seconds'] - q['pipeline_seconds']:.2f} s; save {q['save_seconds']:.2f} s. "
              f"Its report: output SQNR {q['report_output_sqnr_db']} dB, worst layers {q['worst_layers']}")


def summary(rec: dict) -> dict:
    rows = rec["rows"]
    q = rows.get(DEFAULT_LABEL, {})
    b = rows.get(rec["best_ort"]) if rec["best_ort"] else None
    default = q.get("default_observer", "?")
    same_label = f"ort {ORT_METHOD_OF.get(default, 'MinMax')} per_channel=True"
    same = rows.get(same_label, {})
    if "seconds" not in same:  # onnxruntime has no such method or it crashed: fall back to MinMax per-channel
        same_label = "ort MinMax per_channel=True"
        same = rows.get(same_label, {})
    ops = rows.get("ort MinMax pc, qpass's op types [ref]", {})
    out = {"model": rec["model"], "best_ort": rec["best_ort"], "metrics": [], "eval_samples": rec["eval_samples"],
           "qpass_default_observer": default, "same_config_ort": same_label}
    if "metrics" not in q or b is None:
        out["verdict"] = "n/a (qpass default or every onnxruntime grid config failed)"
        return out
    grid = {k: r for k, r in rows.items() if r.get("grid") and "metrics" in r}
    for i, (key, unit) in enumerate(rec["metrics"]):
        scale, allow, u = (1.0, ALLOW_DB, "dB") if unit == "dB" else (100.0, ALLOW_POINTS, "points")
        best_k = max(grid, key=lambda k: grid[k]["metrics"][key])
        entry = {"metric": key, "primary": i == 0, "unit": u, "allowance": allow, "qpass": q["metrics"][key],
                 "ort_best_config": rec["best_ort"], "ort_best": b["metrics"][key],
                 "diff_vs_best_config": (q["metrics"][key] - b["metrics"][key]) * scale,
                 "ort_best_on_this_metric": best_k, "diff_vs_best_on_this_metric": (q["metrics"][key] - grid[best_k]["metrics"][key]) * scale}
        if "metrics" in ops:
            entry["diff_vs_ort_qpass_op_types"] = (q["metrics"][key] - ops["metrics"][key]) * scale
        entry["ok"] = entry["diff_vs_best_config"] >= -allow
        out["metrics"].append(entry)
    if "seconds" in same:
        out["time_ratio_vs_same_config"] = q["seconds"] / same["seconds"]
        out["time_ratio_vs_same_config_quantize_static_only"] = q["seconds"] / same["quantize_static_seconds"]
        out["peak_ratio_vs_same_config"] = q["peak_mb"] / same["peak_mb"] if same.get("peak_mb") else None
    mm = rows.get("ort MinMax per_channel=True", {})
    if "seconds" in mm:
        out["time_ratio_vs_ort_minmax_pc"] = q["seconds"] / mm["seconds"]
    if "latency_ms" in q and "latency_ms" in b:
        out["latency_ratio_vs_best_ort"] = {t: q["latency_ms"][t] / b["latency_ms"][t] for t in ("1T", "2T")}
    if "latency_ms" in q and "latency_ms" in same:
        out["latency_ratio_vs_same_config"] = {t: q["latency_ms"][t] / same["latency_ms"][t] for t in ("1T", "2T")}
    return out


def print_summary(s: dict) -> None:
    print(f"  {s['model']}  (onnxruntime best grid config: {s['best_ort']}; qpass default observer: "
          f"{s.get('qpass_default_observer')}; same configuration in onnxruntime: {s.get('same_config_ort')})")
    if "verdict" in s:
        print(f"    {s['verdict']}")
        return
    for e in s["metrics"]:
        v = "ok (within allowance or better)" if e["ok"] else "WORSE than onnxruntime beyond the allowance"
        line = (f"    {'PRIMARY ' if e['primary'] else ''}{e['metric']}: qpass {e['qpass']:.5f} vs ort {e['ort_best']:.5f} "
                f"-> {e['diff_vs_best_config']:+.2f} {e['unit']} (allowance {e['allowance']}) {v}")
        if e["ort_best_on_this_metric"] != e["ort_best_config"]:
            line += f"; vs ort's best on this metric [{e['ort_best_on_this_metric']}] {e['diff_vs_best_on_this_metric']:+.2f}"
        if "diff_vs_ort_qpass_op_types" in e:
            line += f"; vs ort with qpass's op types {e['diff_vs_ort_qpass_op_types']:+.2f}"
        if e["metric"] in ("exact_vs_float", "box_f1"):
            line += f"  [one eval sample ~ {100 / s['eval_samples']:.2f} points]"
        print(line)
    if "time_ratio_vs_same_config" in s:
        txt = (f"    quantize time qpass / [{s['same_config_ort']}]: {s['time_ratio_vs_same_config']:.2f}x "
               f"({s['time_ratio_vs_same_config_quantize_static_only']:.2f}x vs its quantize_static step alone); "
               f"peak memory {s['peak_ratio_vs_same_config']:.2f}x")
        if s["same_config_ort"] != "ort MinMax per_channel=True" and "time_ratio_vs_ort_minmax_pc" in s:
            txt += f"; time / [ort MinMax per_channel=True]: {s['time_ratio_vs_ort_minmax_pc']:.2f}x"
        print(txt)
    if "latency_ratio_vs_best_ort" in s:
        lr = s["latency_ratio_vs_best_ort"]
        txt = f"    latency qpass / ort best: 1T {lr['1T']:.2f}x, 2T {lr['2T']:.2f}x"
        if "latency_ratio_vs_same_config" in s:
            lm = s["latency_ratio_vs_same_config"]
            txt += f"; / [{s['same_config_ort']}]: 1T {lm['1T']:.2f}x, 2T {lm['2T']:.2f}x"
        print(txt + "  (<1 = qpass faster)")


def jsonable(x):
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return None if not np.isfinite(x) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


def memory_512(minilm: Path) -> dict:
    """Peak memory of a 512-sample calibration on MiniLM: qpass default, qpass without its report, onnxruntime."""
    print("\n== peak memory, 512-sample calibration on MiniLM (fresh process each; peak RSS over the RSS "
          "after imports, warm-up and building the 512-feed list)", flush=True)
    size = minilm.stat().st_size / 2**20
    npz = WORK / "minilm.calib.npz"
    pre = WORK / "minilm.ort-pre.onnx"
    mem = {DEFAULT_LABEL: run_child({"tool": "qpass", "observer": None, "src": str(minilm), "calib": str(npz),
                                              "repeat": 512, "dst": str(WORK / "mem.qpass.onnx")}),
           "qpass w8a8, report=False [diagnostic]": run_child({"tool": "qpass", "observer": None, "src": str(minilm),
                                                               "calib": str(npz), "repeat": 512, "report": False,
                                                               "dst": str(WORK / "mem.qpass-noreport.onnx")}),
           "ort MinMax per_channel=True (peer)": run_child({"tool": "ort", "method": "MinMax", "per_channel": True,
                                                            "src": str(pre if pre.exists() else minilm), "calib": str(npz),
                                                            "repeat": 512, "dst": str(WORK / "mem.ort.onnx")})}
    for tool, r in mem.items():
        keep = {k: r[k] for k in ("seconds", "peak_mb", "base_mb", "error") if k in r}
        mem[tool] = keep
        if "error" in r:
            print(f"  {tool:36s} ERROR {r['error']}")
        else:
            print(f"  {tool:36s} {r['seconds']:6.2f} s  peak +{r['peak_mb']:7.1f} MB ({r['peak_mb'] / size:4.2f}x the "
                  f"{size:.1f} MB model; process RSS before {r['base_mb']:.0f} MB)")

    return mem


def main() -> None:
    t_start = time.perf_counter()
    WORK.mkdir(parents=True, exist_ok=True)
    os.chdir(WORK)  # onnxruntime's quantization tools leave temporary files in the working directory
    for stale in [*WORK.glob("*.data"), *WORK.glob("*.onnx"), *WORK.glob("*.npz")]:
        stale.unlink()
    import onnx
    import onnx_ir

    import qpass

    env = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "python": platform.python_version(),
           "onnxruntime": ort.__version__, "onnx": onnx.__version__, "onnx_ir": onnx_ir.__version__,
           "qpass": getattr(qpass, "__version__", "?"), "qpass_commit": git_commit(),
           "qpass_default_observer": qpass_default_observer(), "date": time.strftime("%Y-%m-%d")}
    print("environment: " + ", ".join(f"{k} {v}" for k, v in env.items()), flush=True)

    records = []
    # MiniLM
    calib, evals, lat, _ = minilm_data()
    minilm = models.minilm_onnx()
    ref_raw = run_all(minilm, evals)
    ref_emb = np.concatenate([embed(h, f["attention_mask"]) for h, f in zip(ref_raw, evals)])
    ref = {"raw": ref_raw, "emb": ref_emb, "pair": (ref_emb @ ref_emb.T)[np.triu_indices(len(ref_emb), 1)]}
    rec = bench_model("all-MiniLM-L6-v2", minilm, calib, evals, lat, lambda o: eval_minilm(o, ref, evals),
                      [("mean_cos", "cos"), ("spearman", "rho")])
    rec["latency_input"] = "batch 1 x seq 64 (real tokens, no padding)"
    records.append(rec)
    print_table(rec, [("mean cos", "mean_cos", ".5f"), ("min cos", "min_cos", ".4f"),
                      ("spearman", "spearman", ".5f"), ("out SQNR", "sqnr_db", ".2f")])

    # memory: qpass calibration with 512 samples on MiniLM (before the multi-GB onnxruntime runs on the detector)
    mem = memory_512(minilm)

    # OCR
    ocr_path, det_path = models.ddddocr_models()["ddddocr-ocr"], models.ddddocr_models()["ddddocr-det"]
    charset = ocr_charset()
    calib, evals, lat, truth, fp = ocr_data()
    ref_raw = run_all(ocr_path, evals)
    ref = {"raw": ref_raw, "texts": [ocr_decode(o, charset) for o in ref_raw]}
    rec = bench_model("ddddocr OCR (common.onnx)", ocr_path, calib, evals, lat, lambda o: eval_ocr(o, ref, charset, truth),
                      [("exact_vs_float", "acc"), ("char_agree_vs_float", "acc")])
    rec["fonts"] = [Path(p).name for p in fp]
    rec["latency_input"] = f"one text line, input {list(lat['input1'].shape)}"
    records.append(rec)
    print_table(rec, [("exact", "exact_vs_float", ".4f"), ("char agr", "char_agree_vs_float", ".4f"),
                      ("truth", "exact_vs_truth", ".3f"), ("truth ci", "exact_vs_truth_nocase", ".3f"),
                      ("out SQNR", "sqnr_db", ".2f")])
    print("  exact / char agr: decoded text vs the float model's. truth / truth ci: exact match with the rendered "
          "string (case-sensitive / -insensitive), for context.")

    # detector
    calib, evals, lat, ratios = det_data()
    ref_raw = run_all(det_path, evals)
    ref = {"raw": ref_raw, "boxes": [det_boxes(o, r) for o, r in zip(ref_raw, ratios)]}
    rec = bench_model("ddddocr detector (common_det.onnx)", det_path, calib, evals, lat,
                      lambda o: eval_det(o, ref, ratios),
                      [("sqnr_db", "dB"), ("fg_sqnr_db", "dB"), ("top50_agree", "acc"), ("box_f1", "acc")])
    rec["latency_input"] = "one rendered scene, [1, 3, 416, 416]"
    records.append(rec)
    print_table(rec, [("raw SQNR", "sqnr_db", ".2f"), ("fg SQNR", "fg_sqnr_db", ".2f"), ("top50", "top50_agree", ".4f"),
                      ("box F1", "box_f1", ".4f")])
    print("  raw SQNR: whole output [3549 x 6] vs float; fg SQNR: only the anchors ddddocr keeps in float "
          "(obj x cls > 0.1); top50: share of float's 50 best anchors in the quantized top 50; box F1: final boxes "
          "(decode + NMS) matched at IoU >= 0.5.")
    cols = ["x", "y", "log w", "log h", "obj", "cls"]
    for label, r in rec["rows"].items():
        if "metrics" in r and label != "float":
            print(f"  per-column raw SQNR dB {label:38s} " + " ".join(f"{c}:{v:6.2f}" for c, v in zip(cols, r["metrics"]["col_sqnr_db"])))

    print(f"\n== summary: qpass default (w8a8: observer={env['qpass_default_observer']}, per-channel weights) "
          "vs onnxruntime quantize_static")
    sums = [summary(r) for r in records]
    for s in sums:
        print_summary(s)
    q = mem[DEFAULT_LABEL]
    size = minilm.stat().st_size / 2**20
    if "peak_mb" in q:
        print(f"  qpass calibration peak memory, 512 MiniLM samples: +{q['peak_mb']:.0f} MB "
              f"({q['peak_mb'] / size:.2f}x the model), {q['seconds']:.1f} s")
    total = time.perf_counter() - t_start
    for leftover in WORK.glob("*.data"):  # onnxruntime's pre-processing leaves external-data files behind
        leftover.unlink()
    print(f"\ntotal benchmark time {total:.0f} s")
    path = OUT / "bench_quantize.json"
    path.write_text(json.dumps(jsonable({"environment": env, "settings": {
        "calibration": N_CALIB, "eval": {"minilm": N_EVAL_MINILM, "ocr": N_EVAL_OCR, "det": N_EVAL_DET},
        "latency": {"warmup": LAT_WARMUP, "runs_per_round": LAT_RUNS, "rounds": LAT_ROUNDS,
                    "statistic": "lowest round median", "graph_optimization": "ORT_ENABLE_ALL"},
        "allowance": {"db": ALLOW_DB, "points": ALLOW_POINTS}, "topk": TOPK},
        "models": records, "memory_512_minilm": mem, "summary": sums, "total_seconds": total}), indent=1))
    print(f"wrote {path}")


def timing_main(repeats: int) -> None:
    """Quantize time only: per model, ``repeats`` rounds of [qpass default, onnxruntime pre-processing, onnxruntime's
    same configuration] (each a fresh process, as in the full run); the ratio of the round medians."""
    t_start = time.perf_counter()
    WORK.mkdir(parents=True, exist_ok=True)
    os.chdir(WORK)
    default = qpass_default_observer()
    method = ORT_METHOD_OF.get(default, "MinMax")
    paths = models.ddddocr_models()
    data = [("all-MiniLM-L6-v2", models.minilm_onnx(), lambda: minilm_data()[0]),
            ("ddddocr OCR (common.onnx)", paths["ddddocr-ocr"], lambda: ocr_data()[0]),
            ("ddddocr detector (common_det.onnx)", paths["ddddocr-det"], lambda: det_data()[0])]
    records = []
    print(f"quantize time, {repeats} rounds: qpass default (observer {default}) vs onnxruntime {method} per-channel "
          "(MinMax per-channel where that crashes), pre-processing included", flush=True)
    for name, src, calib_of in data:
        calib_npz = WORK / f"{src.stem}.calib.npz"
        save_feeds(calib_of(), calib_npz)
        pre = WORK / f"{src.stem}.ort-pre.onnx"
        base = {"calib": str(calib_npz)}
        runs: dict[str, list[dict]] = {"qpass": [], "ort": []}
        same = method
        for _ in range(repeats):
            runs["qpass"].append(run_child({**base, "tool": "qpass", "observer": None, "src": str(src),
                                            "dst": str(WORK / f"{src.stem}.qpass-default.onnx")}))
            if same != method:  # onnxruntime fell back to MinMax: qpass with the same observer too
                runs.setdefault("qpass minmax", []).append(run_child({
                    **base, "tool": "qpass", "observer": "minmax", "src": str(src),
                    "dst": str(WORK / f"{src.stem}.qpass-minmax.onnx")}))
            pre_res = run_child({"tool": "ort-pre", "src": str(src), "dst": str(pre)})
            ort_src = pre if "error" not in pre_res else src
            res = run_child({**base, "tool": "ort", "method": same, "per_channel": True, "src": str(ort_src),
                             "dst": str(WORK / f"{src.stem}.ort-{same}-pc.onnx")})
            if "error" in res and same != "MinMax":
                same = "MinMax"
                res = run_child({**base, "tool": "ort", "method": same, "per_channel": True, "src": str(ort_src),
                                 "dst": str(WORK / f"{src.stem}.ort-{same}-pc.onnx")})
                runs["qpass minmax"] = [run_child({**base, "tool": "qpass", "observer": "minmax", "src": str(src),
                                                   "dst": str(WORK / f"{src.stem}.qpass-minmax.onnx")})]
            if "error" not in res:
                res["quantize_static_seconds"] = res["seconds"]
                res["seconds"] += pre_res.get("seconds", 0.0)
                res["peak_mb"] = max(res["peak_mb"], pre_res.get("peak_mb", 0.0))
            runs["ort"].append(res)
        errors = [r["error"] for rs in runs.values() for r in rs if "error" in r]
        rec = {"model": name, "ort_config": f"ort {same} per_channel=True", "runs": runs}
        if errors:
            rec["error"] = errors[0]
            print(f"  {name}: ERROR {errors[0]}", flush=True)
        else:
            med = {t: float(np.median([r["seconds"] for r in rs])) for t, rs in runs.items()}
            peak = {t: float(np.median([r["peak_mb"] for r in rs])) for t, rs in runs.items()}
            rec.update(median_seconds=med, median_peak_mb=peak, ratio=med["qpass"] / med["ort"])
            times = {t: ", ".join(f"{r['seconds']:.2f}" for r in rs) for t, rs in runs.items()}
            print(f"  {name}: qpass {med['qpass']:.2f} s (runs {times['qpass']}; peak +{peak['qpass']:.0f} MB) / "
                  f"{rec['ort_config']} {med['ort']:.2f} s (runs {times['ort']}; peak +{peak['ort']:.0f} MB) = "
                  f"{rec['ratio']:.2f}x", flush=True)
            if "qpass minmax" in med:  # the same observer on both sides
                rec["ratio_same_observer"] = med["qpass minmax"] / med["ort"]
                print(f"  {name}: qpass observer=minmax {med['qpass minmax']:.2f} s (runs {times['qpass minmax']}) / "
                      f"{rec['ort_config']} = {rec['ratio_same_observer']:.2f}x", flush=True)
        records.append(rec)
    for leftover in WORK.glob("*.data"):
        leftover.unlink()
    path = OUT / "bench_quantize_timing.json"
    path.write_text(json.dumps(jsonable({"qpass_commit": git_commit(), "repeats": repeats, "models": records,
                                         "total_seconds": time.perf_counter() - t_start}), indent=1))
    print(f"total {time.perf_counter() - t_start:.0f} s; wrote {path}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        child_main(sys.argv[2])
    elif len(sys.argv) >= 2 and sys.argv[1] == "--timing":
        timing_main(int(sys.argv[2]) if len(sys.argv) > 2 else 3)
    else:
        main()
