"""Held-out evaluation of the shapes benchmark, on top of the project's evaluators.

- **cycle** (:func:`sc_tune.evaluation.self_consistency.evaluate_self_consistency`): the describer's greedy
  caption of the true box is grounded by the locator (greedy); mean IoU, Acc@0.5 and parse failures.
  Added here: Acc@0.5 on the *ambiguous* subset (objects whose terse caption fits another object too) and
  what the captions look like (share equal to the full caption, to the terse caption, or to either).
- **rec** (:func:`sc_tune.evaluation.rec.evaluate_rec`): the locator grounds the ground-truth full caption
  (``<split>_rec.jsonl``, Qwen-VL evaluate_grounding format); Acc@0.5 and parse failures.
"""

from __future__ import annotations

from pathlib import Path

from sc_tune.adapters.base import ModelAdapter
from sc_tune.evaluation.rec import evaluate_rec
from sc_tune.evaluation.self_consistency import evaluate_self_consistency
from sc_tune.jsonio import read_json, read_jsonl
from sc_tune.rollout import GenerationSettings

# The longest caption is 3 tokens; 8 (and the end token) leaves room for babble and keeps evaluation fast.
DESCRIBE = GenerationSettings(max_new_tokens=8)
# Raised to the family's widest documented answer up to its box (+ 8) by the evaluators; decoding stops at the box.
LOCATE = GenerationSettings(max_new_tokens=32)


def load_split(root: str | Path, split: str = "heldout", limit: int | None = None) -> tuple[list[dict], list[dict]]:
    root = Path(root)
    records = read_json(root / f"{split}.json")
    rec = read_jsonl(root / f"{split}_rec.jsonl")
    if len(rec) != len(records):
        raise ValueError(f"{root}/{split}_rec.jsonl has {len(rec)} lines for {len(records)} records in {split}.json")
    return records[:limit], rec[:limit]


def summarize_benchmark(records: list[dict], cycle_metrics: dict, cycle_rows: list[dict], rec_metrics: dict) -> dict:
    """The benchmark's numbers from the evaluators' outputs (rates in [0, 1])."""
    n = len(records)
    if n == 0 or len(cycle_rows) != n:
        raise ValueError(f"{len(cycle_rows)} cycle results for {n} records")
    hits = [row["iou"] >= 0.5 for row in cycle_rows]
    ambiguous = [i for i, r in enumerate(records) if r["ambiguous"]]
    captions = [row["caption"] for row in cycle_rows]
    return {
        "objects": n,
        "ambiguous_objects": len(ambiguous),
        "cycle_iou": cycle_metrics["mean_iou"],
        "cycle_acc50": cycle_metrics["acc@0.5"],
        "cycle_acc50_ambiguous": sum(hits[i] for i in ambiguous) / max(1, len(ambiguous)),
        "cycle_parse_fail": cycle_metrics["parse_failure_rate"],
        "rec_acc50": rec_metrics["acc@0.5"],
        "rec_iou": rec_metrics["mean_iou"],
        "rec_parse_fail": rec_metrics["parse_failure_rate"],
        "caption_full": sum(c == r["caption"] for c, r in zip(captions, records)) / n,
        "caption_terse": sum(c == r["terse"] for c, r in zip(captions, records)) / n,
        "caption_valid": sum(c in (r["caption"], r["terse"]) for c, r in zip(captions, records)) / n,
    }


def evaluate_benchmark(model, adapter: ModelAdapter, data_root: str | Path, split: str = "heldout",
                       limit: int | None = None, keep_rows: int = 0, batch_size: int = 64) -> dict:
    """Cycle and REC metrics on ``data_root/<split>``; ``rows`` holds the first ``keep_rows`` cycles for figures."""
    records, rec_samples = load_split(data_root, split, limit)
    cycle_metrics, cycle_rows = evaluate_self_consistency(model, adapter, records, str(data_root), batch_size,
                                                          DESCRIBE, LOCATE, distributed=False)
    rec_metrics, _ = evaluate_rec(model, adapter, rec_samples, str(data_root), batch_size, LOCATE, distributed=False)
    metrics = summarize_benchmark(records, cycle_metrics, cycle_rows, rec_metrics)
    metrics["rows"] = [{"image": str(Path(data_root) / row["image"]), "bbox": row["bbox"], "caption": row["caption"],
                        "pred": row["pred_bbox"], "iou": row["iou"], "ambiguous": record["ambiguous"]}
                       for row, record in list(zip(cycle_rows, records))[:keep_rows]]
    return metrics
