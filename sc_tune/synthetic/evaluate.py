"""Held-out evaluation of the shapes benchmark, on top of the project's evaluators.

- **cycle** (:func:`sc_tune.evaluation.self_consistency.evaluate_self_consistency`): the describer's greedy
  caption of the true box is grounded by the locator (greedy); mean IoU, Acc@0.5 and parse failures.
  Added here: Acc@0.5 on the *ambiguous* subset (objects whose terse caption fits another object too) and
  what the captions look like (share equal to the full caption, to the terse caption, or to either).
- **rec** (:func:`sc_tune.evaluation.rec.evaluate_rec`): the locator grounds the ground-truth full caption
  (``<split>_rec.jsonl``, Qwen-VL evaluate_grounding format); Acc@0.5 and parse failures.
- **truthfulness**: the share of captions that name a colour or a shape the object does not have (a wrong
  attribute), overall and on crowded scenes (``CROWDED_MIN_OBJECTS`` or more objects in the image). The cycle
  cannot see it: a wrong colour that still leads the locator to the right box scores as a success.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from sc_tune.adapters.base import ModelAdapter
from sc_tune.evaluation.rec import evaluate_rec
from sc_tune.evaluation.self_consistency import evaluate_self_consistency
from sc_tune.jsonio import read_json, read_jsonl
from sc_tune.rollout import GenerationSettings
from sc_tune.synthetic.shapes import COLOURS, KINDS

# The longest caption is 3 tokens; 8 (and the end token) leaves room for babble and keeps evaluation fast.
DESCRIBE = GenerationSettings(max_new_tokens=8)
# Raised to the family's widest documented answer up to its box (+ 8) by the evaluators; decoding stops at the box.
LOCATE = GenerationSettings(max_new_tokens=32)


# A scene is crowded when its image holds at least this many objects: the held-out split's largest scenes (2-4
# objects), where a describer has the most same-shape or same-colour neighbours to confuse.
CROWDED_MIN_OBJECTS = 4


def named_attributes(caption: str) -> tuple[set[str], set[str]]:
    """(colours, shapes) a caption names: its words (lower case, letters only) that are a colour or a shape.

    ``"the red circle7]}"`` -> ({"red"}, {"circle"}); ``"the"`` -> (set(), set()) (says nothing, so nothing false)."""
    words = set(re.findall(r"[a-z]+", caption.lower()))
    return words & set(COLOURS), words & set(KINDS)


def object_attributes(record: dict, index: int) -> tuple[str, str]:
    """The (colour, shape) of a held-out object, read from its full caption ``record["caption"]``."""
    colours, kinds = named_attributes(record["caption"])
    if len(colours) != 1 or len(kinds) != 1:
        raise ValueError(f"record {index}: field 'caption' {record['caption']!r} does not name exactly one colour "
                         f"and one shape, so the object's attributes are unknown")
    return colours.pop(), kinds.pop()


def wrong_attributes(caption: str, colour: str, kind: str) -> tuple[bool, bool]:
    """(names a colour other than ``colour``, names a shape other than ``kind``) for one generated caption."""
    colours, kinds = named_attributes(caption)
    return bool(colours - {colour}), bool(kinds - {kind})


def truthfulness(records: list[dict], captions: list[str]) -> dict:
    """Wrong-attribute rates of ``captions`` (one per record, in order), overall and on crowded scenes.

    A scene's size is ``record["scene_objects"]`` (``load_split`` counts it on the whole split, so a ``limit`` that
    cuts a scene does not shrink it), else the number of ``records`` with the same image."""
    if len(records) != len(captions):
        raise ValueError(f"{len(captions)} captions for {len(records)} records")
    counted = Counter(r["image"] for r in records)
    objects_in_image = [r.get("scene_objects", counted[r["image"]]) for r in records]
    wrong_colour, wrong_shape, crowded = [], [], []
    for i, (record, caption) in enumerate(zip(records, captions)):
        colour_wrong, shape_wrong = wrong_attributes(caption, *object_attributes(record, i))
        wrong_colour.append(colour_wrong)
        wrong_shape.append(shape_wrong)
        crowded.append(objects_in_image[i] >= CROWDED_MIN_OBJECTS)
    wrong = [c or s for c, s in zip(wrong_colour, wrong_shape)]
    n, n_crowded = len(records), sum(crowded)
    return {
        "wrong_attribute": sum(wrong) / max(1, n),
        "wrong_colour": sum(wrong_colour) / max(1, n),
        "wrong_shape": sum(wrong_shape) / max(1, n),
        "crowded_min_objects": CROWDED_MIN_OBJECTS,
        "crowded_objects": n_crowded,
        # None, not 0, when the split has no crowded scene: no rate was measured.
        "wrong_attribute_crowded": (sum(w for w, c in zip(wrong, crowded) if c) / n_crowded) if n_crowded else None,
    }


def load_split(root: str | Path, split: str = "heldout", limit: int | None = None) -> tuple[list[dict], list[dict]]:
    root = Path(root)
    records = read_json(root / f"{split}.json")
    rec = read_jsonl(root / f"{split}_rec.jsonl")
    if len(rec) != len(records):
        raise ValueError(f"{root}/{split}_rec.jsonl has {len(rec)} lines for {len(records)} records in {split}.json")
    scene_objects = Counter(r["image"] for r in records)
    records = [dict(r, scene_objects=scene_objects[r["image"]]) for r in records]
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
        **truthfulness(records, captions),
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
