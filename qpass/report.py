"""The quantization report: per-layer SQNR (worst first), model-output SQNR, sizes, fused ops.

Per-layer SQNR compares each quantized layer's output in the quantized model with the same
value in the float model (the graph right before quantization), on calibration samples.
Rendered as a table (CLI), JSON, and a self-contained HTML page with an SVG bar chart.
"""

from __future__ import annotations

import dataclasses
import html
import json
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import onnx_ir as ir

from qpass.backends import onnxruntime as ort_backend
from qpass.verify import sqnr_from_sums

__all__ = ["QuantReport", "LayerError", "build_report"]

_LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclasses.dataclass
class LayerError:
    node: str
    op_type: str
    output: str
    sqnr_db: float


@dataclasses.dataclass
class QuantReport:
    layers: list[LayerError]
    output_sqnr_db: dict[str, float]
    float_bytes: int
    quantized_bytes: int
    fused: dict[str, Any]
    samples: int
    passes: list[dict] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        fin = lambda x: None if not np.isfinite(x) else round(float(x), 3)  # noqa: E731
        return {
            "output_sqnr_db": {k: fin(v) for k, v in self.output_sqnr_db.items()},
            "float_bytes": self.float_bytes,
            "quantized_bytes": self.quantized_bytes,
            "fused": self.fused,
            "samples": self.samples,
            "layers": [{**dataclasses.asdict(l), "sqnr_db": fin(l.sqnr_db)} for l in self.layers],
            "passes": self.passes,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_html(self, title: str = "qpass quantization report") -> str:
        rows = self.layers
        width, bar_h = 720, 18
        top = max([l.sqnr_db for l in rows if np.isfinite(l.sqnr_db)] + [1.0])
        bars = []
        for i, l in enumerate(rows):
            value = l.sqnr_db if np.isfinite(l.sqnr_db) else top
            w = max(1.0, (width - 260) * value / top)
            color = "#d9534f" if value < 20 else "#f0ad4e" if value < 30 else "#5cb85c"
            y = i * (bar_h + 4)
            bars.append(
                f'<text x="0" y="{y + 13}" font-size="12">{html.escape(l.node[:34])}</text>'
                f'<rect x="250" y="{y}" width="{w:.1f}" height="{bar_h}" fill="{color}"/>'
                f'<text x="{254 + w:.1f}" y="{y + 13}" font-size="12">{l.sqnr_db:.1f} dB</text>'
            )
        svg = f'<svg width="{width}" height="{len(rows) * (bar_h + 4) + 4}">{"".join(bars)}</svg>'
        outs = ", ".join(f"{html.escape(k)}: {v:.1f} dB" for k, v in self.output_sqnr_db.items())
        fused = html.escape(json.dumps(self.fused))
        return (
            f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<body style='font-family:sans-serif'><h1>{html.escape(title)}</h1>"
            f"<p>Model output SQNR: {outs}. Weights {self.float_bytes / 2**20:.2f} MiB float → "
            f"{self.quantized_bytes / 2**20:.2f} MiB quantized. Calibration samples compared: {self.samples}.</p>"
            f"<p>onnxruntime kernels: {fused}</p><h2>Per-layer SQNR, worst first</h2>{svg}</body>"
        )


def _quantized_layers(model: ir.Model) -> list[ir.Node]:
    layers = []
    for node in model.graph:
        if node.op_type in _LAYER_OPS and any(
            v is not None and v.producer() is not None and v.producer().op_type == "DequantizeLinear" for v in node.inputs
        ):
            layers.append(node)
    return layers


def build_report(
    float_model: ir.Model,
    quant_model: ir.Model,
    samples: Iterable[Mapping[str, np.ndarray]],
    *,
    max_samples: int = 8,
    census_model: ir.Model | None = None,
) -> QuantReport:
    """Compare ``quant_model`` with ``float_model`` layer by layer on up to ``max_samples`` feeds.
    The kernel census counts ``census_model`` (default ``quant_model``), e.g. its QOperator form."""
    layers = _quantized_layers(quant_model)
    float_names = {o.name for n in float_model.graph for o in n.outputs}
    names = [n.outputs[0].name for n in layers if n.outputs[0].name in float_names]
    model_outputs = [o.name for o in float_model.graph.outputs]
    # the float and the quantized model run side by side, each on half the cores: on small
    # models that beats one model at a time on all of them (OCR model 0.29 -> 0.19 s, detector
    # 1.0 -> 0.53 s on 2 cores). The models are serialized here, on this thread; the sessions
    # and the census's optimized session are built from the bytes on the workers meanwhile.
    half = ort_backend.half_the_cores()
    f_graph = ort_backend.session_bytes(float_model, names, drop_unused=True)
    q_graph = ort_backend.session_bytes(quant_model, names, drop_unused=True)
    c_graph = ort_backend.session_bytes(census_model if census_model is not None else quant_model, drop_unused=True)
    wanted = model_outputs + [n for n in names if n not in model_outputs]
    signal = dict.fromkeys(wanted, 0.0)
    noise = dict.fromkeys(wanted, 0.0)
    count = 0
    with ThreadPoolExecutor(2) as workers:
        census = workers.submit(ort_backend.fused_op_census_of_bytes, c_graph)
        f_future = workers.submit(ort_backend.session_from_bytes, *f_graph, threads=half)
        q_sess = ort_backend.session_from_bytes(*q_graph, threads=half)
        f_sess = f_future.result()
        inputs = {i.name for i in f_sess.get_inputs()}
        for feeds in samples:  # running sums: memory stays at one sample's activations
            if count >= max_samples:
                break
            feeds = {k: v for k, v in feeds.items() if k in inputs}
            float_run = workers.submit(ort_backend.run, f_sess, feeds, wanted)  # onnxruntime releases the GIL
            got = ort_backend.run(q_sess, feeds, wanted)
            ref = float_run.result()
            for k in wanted:
                signal[k], noise[k] = _add_sums(ref[k], got[k], signal[k], noise[k])
            count += 1
        fused = census.result()
    errors = [
        LayerError(n.name or n.outputs[0].name, n.op_type, n.outputs[0].name, sqnr_from_sums(signal[n.outputs[0].name], noise[n.outputs[0].name]))
        for n in layers
        if n.outputs[0].name in names
    ]
    errors.sort(key=lambda e: e.sqnr_db)
    out_sqnr = {k: sqnr_from_sums(signal[k], noise[k]) for k in model_outputs}
    return QuantReport(errors, out_sqnr, _used_nbytes(float_model), _used_nbytes(quant_model), fused, count)


def _add_sums(ref: np.ndarray, got: np.ndarray, signal: float, noise: float) -> tuple[float, float]:
    """Running sums of ref² and (ref - got)²: float32 dot products (one pass each, a third of
    the time of float64 copies) for float32 values, float64 otherwise."""
    dtype = np.float32 if ref.dtype == got.dtype == np.float32 else np.float64
    r = ref.astype(dtype, copy=False).ravel()
    d = np.subtract(r, got.astype(dtype, copy=False).ravel())
    return signal + float(np.dot(r, r)), noise + float(np.dot(d, d))


def _used_nbytes(model: ir.Model) -> int:
    """Bytes of the initializers the graph reads (rewritten-away originals do not count)."""
    return sum(
        v.const_value.nbytes for v in model.graph.initializers.values()
        if v.const_value is not None and (v.uses() or v.is_graph_output())
    )
