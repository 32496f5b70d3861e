"""Held-out evaluation of the shapes benchmark: self-consistency cycles and REC grounding.

Both use :mod:`sc_tune.rollout` (the same generation code as the trainer) with greedy decoding:

- **cycle**: describer caption of the true box -> locator box -> IoU with the true box. Reported as mean
  IoU, Acc@0.5 (also on the *ambiguous* subset, objects whose terse caption fits another object too),
  and the parse-failure rate; plus what the captions look like (share that are the full caption, the
  terse caption, or either of the two).
- **rec**: the locator grounds the ground-truth full caption (``sent`` of the REC JSONL file, boxes in
  pixels as Qwen-VL's ``evaluate_grounding``); Acc@0.5 and parse failures.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from sc_tune.adapters.base import ModelAdapter
from sc_tune.boxes import iou_or_zero, normalize_box
from sc_tune.rollout import GenerationSettings, describe, locate

CAPTION_TOKENS = 8  # the longest caption is 4 tokens with its end token; room for babble
BOX_TOKENS = 32  # Qwen3-VL's JSON box on the 0..1000 grid is 26 tokens with its end token


def load_heldout(root: str | Path, adapter: ModelAdapter, split: str = "heldout", limit: int | None = None) -> list[dict]:
    """Objects of ``root/<split>.json`` joined with the REC file, each image preprocessed once."""
    root = Path(root)
    records = json.loads((root / f"{split}.json").read_text())
    rec_lines = [json.loads(line) for line in (root / f"{split}_rec.jsonl").read_text().splitlines() if line.strip()]
    if len(rec_lines) != len(records):
        raise ValueError(f"{root}/{split}_rec.jsonl has {len(rec_lines)} lines for {len(records)} records in {split}.json")
    if limit is not None:
        records, rec_lines = records[:limit], rec_lines[:limit]
    cache: dict[str, object] = {}
    objects = []
    for i, (record, rec) in enumerate(zip(records, rec_lines)):
        if record["image"] != rec["image"]:
            raise ValueError(f"{root}/{split}_rec.jsonl line {i + 1}: image {rec['image']!r} != {record['image']!r}")
        if record["image"] not in cache:
            with Image.open(root / record["image"]) as image:
                cache[record["image"]] = adapter.prepare_image(image.convert("RGB"))
        objects.append({"image": cache[record["image"]], "image_path": str(root / record["image"]),
                        "bbox": record["bbox"], "caption": record["caption"], "terse": record["terse"],
                        "ambiguous": record["ambiguous"], "sent": rec["sent"],
                        "rec_bbox": normalize_box(rec["bbox"], rec["width"], rec["height"])})
    return objects


@torch.no_grad()
def evaluate_benchmark(model, adapter: ModelAdapter, objects: Sequence[dict], batch_size: int = 64,
                       keep_rows: int = 0) -> dict:
    """Cycle and REC metrics over ``objects`` (see the module docstring); ``rows`` holds the first
    ``keep_rows`` cycles (caption, predicted box) for figures."""
    was_training = model.training
    model.eval()
    greedy_caption = GenerationSettings(max_new_tokens=CAPTION_TOKENS)
    greedy_box = GenerationSettings(max_new_tokens=BOX_TOKENS)
    cycle_iou, rec_iou, cycle_parsed, rec_parsed, captions, cycle_boxes = [], [], [], [], [], []
    for start in range(0, len(objects), batch_size):
        chunk = objects[start : start + batch_size]
        images = [o["image"] for o in chunk]
        _, described = describe(model, adapter, images, [o["bbox"] for o in chunk], greedy_caption)
        boxes, _ = locate(model, adapter, images, described.texts, greedy_box)
        cycle_iou += iou_or_zero(boxes, torch.tensor([o["bbox"] for o in chunk])).tolist()
        cycle_parsed += [b is not None for b in boxes]
        captions += described.texts
        cycle_boxes += boxes
        rec_boxes, _ = locate(model, adapter, images, [o["sent"] for o in chunk], greedy_box)
        rec_iou += iou_or_zero(rec_boxes, torch.tensor([o["rec_bbox"] for o in chunk])).tolist()
        rec_parsed += [b is not None for b in rec_boxes]
    if was_training:
        model.train()
    n = len(objects)
    ambiguous = [i for i, o in enumerate(objects) if o["ambiguous"]]
    hits = [iou >= 0.5 for iou in cycle_iou]
    metrics = {
        "objects": n,
        "ambiguous_objects": len(ambiguous),
        "cycle_iou": sum(cycle_iou) / n,
        "cycle_acc50": sum(hits) / n,
        "cycle_acc50_ambiguous": sum(hits[i] for i in ambiguous) / max(1, len(ambiguous)),
        "cycle_parse_fail": 1 - sum(cycle_parsed) / n,
        "rec_acc50": sum(iou >= 0.5 for iou in rec_iou) / n,
        "rec_iou": sum(rec_iou) / n,
        "rec_parse_fail": 1 - sum(rec_parsed) / n,
        "caption_full": sum(c == o["caption"] for c, o in zip(captions, objects)) / n,
        "caption_terse": sum(c == o["terse"] for c, o in zip(captions, objects)) / n,
        "caption_valid": sum(c in (o["caption"], o["terse"]) for c, o in zip(captions, objects)) / n,
    }
    metrics["rows"] = [{"image": o["image_path"], "bbox": o["bbox"], "caption": c, "pred": b, "iou": iou,
                        "ambiguous": o["ambiguous"]}
                       for o, c, b, iou in list(zip(objects, captions, cycle_boxes, cycle_iou))[:keep_rows]]
    return metrics


def format_metrics(metrics: dict) -> str:
    keys = ("cycle_iou", "cycle_acc50", "cycle_acc50_ambiguous", "cycle_parse_fail", "rec_acc50", "caption_full",
            "caption_terse")
    return " ".join(f"{k}={100 * metrics[k]:.1f}" for k in keys)
