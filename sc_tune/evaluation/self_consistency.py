"""Self-consistency: caption each true box greedily, ground the caption greedily, score the IoU.

This is the training reward's computation (describe, then locate, as :func:`sc_tune.rollout.cycle`, scored by
:data:`sc_tune.rewards.cycle_iou`) with greedy decoding on both roles, so "self-consistency went up" means
exactly "the greedy cycle reward went up".
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sc_tune.evaluation.metrics import DEFAULT_THRESHOLDS, summarize_ious
from sc_tune.evaluation.progress import SampleLog
from sc_tune.evaluation.records import check_annotation_records, open_image
from sc_tune.evaluation.runner import (DESCRIBE_EVAL, LOCATE_EVAL, eval_mode, fit_locator_budget, locator_finished,
                                      run_sharded)
from sc_tune.rewards import cycle_iou
from sc_tune.rollout import Cycle, GenerationSettings, describe, fit_describer_budget, locate


def cycle(model, locator, adapter, images, true_boxes, describe_settings: GenerationSettings,
          locate_settings: GenerationSettings, fit_budget: bool) -> tuple[Cycle, GenerationSettings]:
    """One batch: greedy captions of the true boxes, then the locator on them; the locator's budget fitted to those
    captions where ``fit_budget`` (an answer form may repeat the caption before its box). Returns the cycle and the
    locator settings it ran with."""
    _, captions = describe(model, adapter, images, true_boxes, fit_describer_budget(adapter, describe_settings))
    settings = fit_locator_budget(adapter, images, locate_settings, captions.texts) if fit_budget else locate_settings
    boxes, texts = locate(locator, adapter, images, captions.texts, settings, fit_budget=False)
    return Cycle(None, captions, boxes, texts), settings


def evaluate_self_consistency(model, adapter, records: Sequence[dict], image_root, batch_size: int = 8,
                              describe_settings: GenerationSettings = DESCRIBE_EVAL,
                              locate_settings: GenerationSettings = LOCATE_EVAL, locator=None,
                              distributed: bool | None = None, fit_budget: bool = True,
                              thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
                              progress: SampleLog | None = None) -> tuple[dict, list[dict]]:
    """(metrics, per-sample results) of describer greedy -> locator greedy on annotation ``records``.

    ``records``: ``{"image": path relative to image_root, "bbox": normalised xyxy, optional "caption"}``.
    ``locator``: a different model for the locator role (default: ``model`` plays both).
    ``distributed``: None shards over an initialised process group, False evaluates everything here
    (use it when calling from one rank only). Every rank returns the same full results.
    ``fit_budget``: raise the locator's ``max_new_tokens`` to fit the family's longest box answer (see
    :func:`sc_tune.evaluation.runner.fit_locator_budget`); False uses ``locate_settings`` as given.
    Per-sample dicts: index, image, bbox, caption (generated), pred_bbox (normalised, None = parse
    failure), iou, parsed, locator_text, and reference_caption when the record had one.
    ``progress``: keep each scored batch on disk and resume the samples already there
    (:mod:`sc_tune.evaluation.progress`).
    """
    records = check_annotation_records(records)
    locator = model if locator is None else locator

    def score_batch(indices):
        images = [adapter.prepare_image(open_image(image_root, records[i]["image"], i)) for i in indices]
        true_boxes = [records[i]["bbox"] for i in indices]
        result, settings = cycle(model, locator, adapter, images, true_boxes, describe_settings, locate_settings,
                                 fit_budget)
        scores = cycle_iou(result.boxes, torch.tensor(true_boxes, dtype=torch.float32))  # the training reward
        ious, parsed = scores.reward_N.tolist(), scores.parsed_N.tolist()
        out = []
        for k, i in enumerate(indices):
            item = {"index": i, "image": records[i]["image"], "bbox": true_boxes[k],
                    "caption": result.captions.texts[k], "pred_bbox": result.boxes[k], "iou": ious[k],
                    "parsed": parsed[k], "locator_text": result.locator_texts[k],
                    "locator_finished": locator_finished(adapter, result.locator_texts[k]),
                    "locator_max_new_tokens": settings.max_new_tokens}
            if "caption" in records[i]:
                item["reference_caption"] = records[i]["caption"]
            out.append(item)
        return out

    with eval_mode(model, locator):
        per_sample, ranks = run_sharded(len(records), batch_size, score_batch, distributed, "self-consistency",
                                        progress)
    metrics = summarize_ious([s["iou"] for s in per_sample], [s["parsed"] for s in per_sample], thresholds)
    metrics["num_records"] = len(records)
    metrics["num_locator_unfinished"] = sum(1 for s in per_sample if not s["locator_finished"])
    metrics["locator_max_new_tokens"] = max((s["locator_max_new_tokens"] for s in per_sample), default=None)
    metrics["num_empty_captions"] = sum(1 for s in per_sample if not s["caption"].strip())
    metrics["world_size"] = ranks.world_size
    return metrics, per_sample
