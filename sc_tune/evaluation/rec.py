"""Referring expression comprehension (RefCOCO / RefCOCO+ / RefCOCOg) in Qwen-VL's evaluate_grounding format.

Each sample's sentence goes through the locator prompt (greedy); the parsed normalised box is mapped
back to the original image with the sample's ``width`` and ``height`` and compared with its pixel
``bbox``. Acc@0.5 counts IoU >= 0.5, as Qwen-VL does; unlike Qwen-VL's script no sample is dropped by
batching, and unparsable answers are counted (and score 0) instead of becoming an all-zero box silently.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sc_tune.boxes import denormalize_box
from sc_tune.evaluation.metrics import DEFAULT_THRESHOLDS, summarize_ious
from sc_tune.evaluation.progress import SampleLog
from sc_tune.evaluation.records import check_rec_samples, gt_box_issue, open_image
from sc_tune.evaluation.runner import LOCATE_EVAL, eval_mode, fit_locator_budget, locator_finished, run_sharded
from sc_tune.rewards import cycle_iou
from sc_tune.rollout import GenerationSettings, locate


def evaluate_rec(model, adapter, samples: Sequence[dict], image_root, batch_size: int = 8,
                 locate_settings: GenerationSettings = LOCATE_EVAL, distributed: bool | None = None,
                 fit_budget: bool = True, thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
                 progress: SampleLog | None = None) -> tuple[dict, list[dict]]:
    """(metrics, per-sample results) of grounding ``samples`` (``image``, ``sent``, pixel ``bbox``,
    ``width``, ``height``). Per-sample dicts: index, image, sent, bbox, pred_bbox (pixels of the original
    image, None = parse failure), iou, parsed, locator_text. ``distributed`` as in
    :func:`sc_tune.evaluation.self_consistency.evaluate_self_consistency`, and so are ``fit_budget`` and
    ``progress``.
    """
    samples = check_rec_samples(samples)

    def score_batch(indices):
        pils = [open_image(image_root, samples[i]["image"], i) for i in indices]
        images = [adapter.prepare_image(p) for p in pils]
        sentences = [samples[i]["sent"] for i in indices]
        settings = fit_locator_budget(adapter, images, locate_settings, sentences) if fit_budget else locate_settings
        boxes_norm, texts = locate(model, adapter, images, sentences, settings, fit_budget=False)
        pred_px = [denormalize_box(b, samples[i]["width"], samples[i]["height"]) if b is not None else None
                   for b, i in zip(boxes_norm, indices)]
        scores = cycle_iou(pred_px, torch.tensor([samples[i]["bbox"] for i in indices], dtype=torch.float32))
        ious, parsed = scores.reward_N.tolist(), scores.parsed_N.tolist()
        out = []
        for k, i in enumerate(indices):
            s = samples[i]
            out.append({"index": i, "image": s["image"], "sent": s["sent"], "bbox": s["bbox"],
                        "pred_bbox": pred_px[k], "iou": ious[k], "parsed": parsed[k],
                        "locator_text": texts[k], "locator_finished": locator_finished(adapter, texts[k]),
                        "locator_max_new_tokens": settings.max_new_tokens,
                        # A file whose width/height disagree with the image is suspicious (wrong image?).
                        "size_matches": pils[k].size == (round(s["width"]), round(s["height"])),
                        "gt_box_issue": gt_box_issue(s["bbox"], s["width"], s["height"])})
        return out

    with eval_mode(model):
        per_sample, ranks = run_sharded(len(samples), batch_size, score_batch, distributed, "rec", progress)
    metrics = summarize_ious([s["iou"] for s in per_sample], [s["parsed"] for s in per_sample], thresholds)
    metrics["num_records"] = len(samples)
    metrics["num_locator_unfinished"] = sum(1 for s in per_sample if not s["locator_finished"])
    metrics["locator_max_new_tokens"] = max((s["locator_max_new_tokens"] for s in per_sample), default=None)
    metrics["num_image_size_mismatches"] = sum(1 for s in per_sample if not s["size_matches"])
    # Ground-truth boxes outside the image, negative or of zero area still score (IoU), but are counted here.
    issues = [s["gt_box_issue"] for s in per_sample if s["gt_box_issue"]]
    metrics["num_gt_box_issues"] = len(issues)
    metrics["gt_box_issues"] = {reason: issues.count(reason) for reason in sorted(set(issues))}
    metrics["world_size"] = ranks.world_size
    return metrics, per_sample
