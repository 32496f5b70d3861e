"""Box metrics of an evaluation: mean IoU, Acc@threshold and the parse-failure count, from per-sample boxes.

Per-sample IoU is the cycle reward of :mod:`sc_tune.rewards` (the same function the training reward uses).
A prediction that did not parse (``None``) scores IoU 0 *and* is counted, so a broken prompt or codec shows
up as a high ``parse_failure_rate`` instead of a silently low accuracy.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sc_tune.rewards import cycle_iou

# Qwen-VL's evaluate_grounding counts a hit when IoU >= 0.5; the comparison is inclusive here too.
DEFAULT_THRESHOLDS = (0.5,)


def per_sample_ious(pred_boxes: Sequence[Sequence[float] | None], target_boxes: Sequence[Sequence[float]]) -> list[float]:
    """IoU of each prediction with its target (any units, the same for both); ``None`` scores 0."""
    if len(pred_boxes) != len(target_boxes):
        raise ValueError(f"{len(pred_boxes)} predicted boxes for {len(target_boxes)} targets")
    if not pred_boxes:
        return []
    return cycle_iou(pred_boxes, torch.tensor([list(t) for t in target_boxes], dtype=torch.float32)).reward_N.tolist()


def accuracy_key(threshold: float) -> str:
    return f"acc@{threshold:g}"


def summarize_ious(ious: Sequence[float], parsed: Sequence[bool],
                   thresholds: Sequence[float] = DEFAULT_THRESHOLDS) -> dict:
    """Counts, mean IoU (all samples, failures as 0), mean IoU over parsed samples, Acc@t, parse failures.

    Every rate is over *all* samples; an empty evaluation reports ``None`` rates, never 0.
    """
    if len(ious) != len(parsed):
        raise ValueError(f"{len(ious)} IoUs for {len(parsed)} parse flags")
    count = len(ious)
    num_parsed = sum(bool(p) for p in parsed)
    failures = count - num_parsed

    def rate(numerator: float, denominator: int) -> float | None:
        return numerator / denominator if denominator else None

    summary = {
        "num_samples": count,
        "num_parsed": num_parsed,
        "num_parse_failures": failures,
        "parse_failure_rate": rate(failures, count),
        "mean_iou": rate(sum(ious), count),
        "mean_iou_parsed": rate(sum(i for i, p in zip(ious, parsed) if p), num_parsed),
    }
    for t in thresholds:
        summary[accuracy_key(t)] = rate(sum(1 for i in ious if i >= t), count)
    return summary


def box_metrics(pred_boxes: Sequence[Sequence[float] | None], target_boxes: Sequence[Sequence[float]],
                thresholds: Sequence[float] = DEFAULT_THRESHOLDS) -> dict:
    """:func:`summarize_ious` of the IoUs of ``pred_boxes`` (``None`` = parse failure) against targets."""
    return summarize_ious(per_sample_ious(pred_boxes, target_boxes), [b is not None for b in pred_boxes],
                          thresholds)
