"""The preflight: before step 0, does the locator's answer parse at all?

SC-Tune's describer reward is the IoU of the box the locator writes. If the locator's answers do not parse
(a format the family's codec does not read, a token budget that cuts them, or a checkpoint that was never
trained to ground), every reward is 0, every advantage is 0, and the run trains on nothing while its loss
curves look normal. The preflight runs the step-0 cycle on a few training samples (the model describes each
box greedily, then locates its own caption greedily, as the snapshot does for the reward), and where the
records carry a ``caption`` it also grounds those (REC). It logs and prints the parse-failure rate and
Acc@0.5, and stops the run before step 0 when too many answers fail, with the likely cause and the fix.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from sc_tune.adapters.base import ImageInputs, ModelAdapter
from sc_tune.boxes import box_iou
from sc_tune.rollout import GenerationSettings, describe, fit_locator_budget, generate

logger = logging.getLogger(__name__)

WARM_START_DOC = "docs/grounding_warm_start.md"


class PreflightError(RuntimeError):
    """The locator's answers do not parse: training would get no reward signal."""


@dataclass
class RoleCheck:
    """How one set of locator answers read."""

    name: str  # "cycle" (the model's own captions) or "REC" (the records' captions)
    answers: list[str]
    boxes: list[list[float] | None]
    reasons: list[str | None]
    finished: list[bool]  # the answer ended with the family's end token within the budget
    ious: list[float]

    @property
    def parse_failure_rate(self) -> float:
        return sum(b is None for b in self.boxes) / max(len(self.boxes), 1)

    @property
    def acc50(self) -> float:
        return sum(iou >= 0.5 for iou in self.ious) / max(len(self.ious), 1)


@dataclass
class PreflightReport:
    checks: list[RoleCheck]
    budget: int
    grounding_prior: bool

    def summary(self) -> str:
        parts = [
            f"{c.name}: parse failures {sum(b is None for b in c.boxes)}/{len(c.boxes)} "
            f"({100 * c.parse_failure_rate:.0f} %), Acc@0.5 {100 * c.acc50:.1f} %"
            for c in self.checks
        ]
        return f"preflight on {len(self.checks[0].boxes)} samples, locator budget {self.budget} tokens: " + "; ".join(
            parts
        )

    def failure(self, max_parse_failures: float) -> str | None:
        """Why the run must stop, with the likely cause and the fix; ``None`` when the locator's answers parse."""
        worst = max(self.checks, key=lambda c: c.parse_failure_rate)
        if worst.parse_failure_rate <= max_parse_failures:
            return None
        failed = [i for i, b in enumerate(worst.boxes) if b is None]
        cut = [i for i in failed if not worst.finished[i]]
        example = worst.answers[failed[0]]
        causes = []
        if len(cut) > len(failed) / 2:
            causes.append(
                f"budget: {len(cut)} of the {len(failed)} failed answers were cut at the {self.budget}-token budget "
                f"before a box was complete (e.g. {example!r}); raise --locator_max_new_tokens, and check with "
                "`python -m sc_tune.families budget --model_name_or_path <your checkpoint>`"
            )
        if len(cut) < len(failed):
            reason = worst.reasons[next(i for i in failed if worst.finished[i])]
            causes.append(
                f"format: answers end without a box in the family's form (e.g. {example!r}: {reason}); check how "
                "it reads with `python -m sc_tune.families parse --model_type <type> --answer '<text>'`, or train "
                "the generic format with --box_format generic after a grounding warm start"
            )
        if not self.grounding_prior:
            causes.insert(0, "no grounding prior: this family's released checkpoints were not trained to write boxes")
        return (
            f"{self.summary()}. The {worst.name} answers of {100 * worst.parse_failure_rate:.0f} % of the samples do "
            f"not parse (limit --preflight_max_parse_failures {max_parse_failures:g}), so every describer reward "
            f"would be 0. Likely cause: {'; '.join(causes)}. Fix: start from a grounding warm start (SFT on REC data "
            f"with the locator's target; {WARM_START_DOC} says how). --skip_preflight trains anyway."
        )


def _check(name, adapter, images, texts, targets_B4, finished) -> RoleCheck:
    readings = [adapter.read_locator_output(t, im) for t, im in zip(texts, images)]
    boxes = [r.box for r in readings]
    ious = [
        float(box_iou(torch.tensor([b]), torch.tensor([t]))[0]) if b is not None else 0.0
        for b, t in zip(boxes, targets_B4)
    ]
    return RoleCheck(name, list(texts), boxes, [r.reason for r in readings], finished, ious)


@torch.no_grad()
def run_preflight(
    model,
    adapter: ModelAdapter,
    images: Sequence[ImageInputs],
    boxes_B4: Sequence[Sequence[float]],
    captions: Sequence[str] | None,
    describe_settings: GenerationSettings,
    locate_settings: GenerationSettings,
) -> PreflightReport:
    """The step-0 cycle on these samples (and REC on ``captions`` when given), greedy, with ``model`` unwrapped."""
    locate_settings = fit_locator_budget(adapter, images, locate_settings)
    _, described = describe(model, adapter, images, boxes_B4, describe_settings)
    checks = [_locate_check("cycle", model, adapter, images, described.texts, boxes_B4, locate_settings)]
    if captions is not None:
        checks.append(_locate_check("REC", model, adapter, images, captions, boxes_B4, locate_settings))
    return PreflightReport(checks, locate_settings.max_new_tokens, adapter.grounding_prior)


def _locate_check(name, model, adapter, images, captions, boxes_B4, settings) -> RoleCheck:
    batch = adapter.build_batch([adapter.locator_prompt(c, im) for c, im in zip(captions, images)], images)
    completions = generate(model, adapter, batch, settings, skip_special_tokens=False)
    end_ids = torch.tensor(adapter.end_token_ids)
    finished = [bool(torch.isin(row[mask.bool()], end_ids).any()) for row, mask in
                zip(completions.ids_BT.cpu(), completions.mask_BT.cpu())]
    return _check(name, adapter, images, completions.texts, [list(b) for b in boxes_B4], finished)
