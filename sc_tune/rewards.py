"""The cycle reward: how well the locator, given the describer's caption, finds the true box again.

The paper's reward is the IoU of the re-grounded box with the true box. A locator answer that holds no
parseable box scores 0 *and* is counted (``RewardBatch.parsed_N``), so a broken prompt or box codec shows
up as a parse-failure rate instead of a silently low reward. The trainer's describer reward and the
evaluators' per-sample scores (self-consistency, REC) are both computed here, so "the reward went up" and
"the evaluation improved" measure the same thing.

``--reward`` picks the score of a parsed box (every choice lies in ``[0, 1]``, and a parse failure scores
0, the worst possible, so no choice can make not answering attractive):

- ``iou`` (default, the paper's): intersection over union;
- ``giou``: ``(GIoU + 1) / 2``; still ranks boxes that miss the target by how far they miss;
- ``iou_squared``: IoU², which favours near-exact boxes over loose ones;
- ``iou_threshold``: 1 when IoU >= 0.5 else 0, i.e. the Acc@0.5 hit the benchmark reports.

A reward is any callable ``(pred_boxes, target_N4, captions) -> RewardBatch``; ``SCTuneTrainer`` takes one
as ``reward_fn`` (a caption-aware reward, e.g. a length penalty, can use ``captions``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from sc_tune.boxes import box_giou, box_iou

Box = Sequence[float]

# The evaluation's Acc@0.5 threshold (Qwen-VL's evaluate_grounding counts IoU >= 0.5 as a hit).
HIT_THRESHOLD = 0.5


@dataclass
class RewardBatch:
    reward_N: torch.Tensor  # float32, one score per (caption, re-grounded box)
    parsed_N: torch.Tensor  # bool; False where the locator's text held no box (scored 0)

    @property
    def num_parse_failures(self) -> int:
        return int((~self.parsed_N).sum())


class RewardFunction(Protocol):
    def __call__(
        self, pred_boxes: Sequence[Box | None], target_N4: torch.Tensor, captions: Sequence[str] | None = None
    ) -> RewardBatch: ...


@dataclass(frozen=True)
class BoxReward:
    """A reward from the box alone: ``score(pred_N4, target_N4)`` on parsed boxes, 0 on parse failures.

    Boxes may be in any units as long as predictions and targets share them (normalised in training,
    pixels in REC)."""

    name: str
    score: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

    def __call__(
        self, pred_boxes: Sequence[Box | None], target_N4: torch.Tensor, captions: Sequence[str] | None = None
    ) -> RewardBatch:
        target_N4 = torch.as_tensor(target_N4, dtype=torch.float32).reshape(-1, 4)
        if len(pred_boxes) != len(target_N4):
            raise ValueError(f"{len(pred_boxes)} predicted boxes for {len(target_N4)} targets")
        parsed_N = torch.tensor([b is not None for b in pred_boxes], dtype=torch.bool)
        filled = [list(b) if b is not None else [0.0, 0.0, 0.0, 0.0] for b in pred_boxes]
        score_N = self.score(torch.tensor(filled, dtype=torch.float32).reshape(-1, 4), target_N4)
        return RewardBatch(torch.where(parsed_N, score_N.float(), torch.zeros_like(score_N.float())), parsed_N)


def _giou_unit(pred_N4: torch.Tensor, target_N4: torch.Tensor) -> torch.Tensor:
    return (box_giou(pred_N4, target_N4) + 1.0) / 2.0


def _iou_squared(pred_N4: torch.Tensor, target_N4: torch.Tensor) -> torch.Tensor:
    return box_iou(pred_N4, target_N4) ** 2


def _iou_hit(pred_N4: torch.Tensor, target_N4: torch.Tensor) -> torch.Tensor:
    return (box_iou(pred_N4, target_N4) >= HIT_THRESHOLD).float()


REWARDS: dict[str, BoxReward] = {
    "iou": BoxReward("iou", box_iou),
    "giou": BoxReward("giou", _giou_unit),
    "iou_squared": BoxReward("iou_squared", _iou_squared),
    "iou_threshold": BoxReward("iou_threshold", _iou_hit),
}

cycle_iou = REWARDS["iou"]  # the paper's reward and the evaluators' per-sample score


def get_reward(name: str) -> BoxReward:
    if name not in REWARDS:
        raise ValueError(f"unknown reward {name!r}; choose one of {', '.join(REWARDS)}")
    return REWARDS[name]
