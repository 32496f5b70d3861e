"""The preflight: before step 0, does the locator's answer parse at all?

SC-Tune's describer reward is the IoU of the box the locator writes. If the locator's answers do not parse
(a format the family's codec does not read, a token budget that cuts them, or a checkpoint that was never
trained to ground), every reward is 0, every advantage is 0, and the run trains on nothing while its loss
curves look normal. The preflight runs the step-0 cycle on a few training samples (the model describes each
box greedily, then locates its own caption greedily, as the snapshot does for the reward), and where the
records carry a ``caption`` (or a ``category`` in words) it also grounds those (REC). It logs and prints the
parse-failure rate and Acc@0.5, and stops the run before step 0 when too many answers fail
(``--preflight_max_parse_failures``) or when they parse but miss (Acc@0.5 below ``--preflight_min_accuracy`` in
every check: boxes that ignore the text give rewards near 0 too), with the likely cause and the fix.

Causes: an answer cut at the token budget is generated again with ``BUDGET_PROBE_FACTOR`` times the tokens; only
if most failed answers then parse is the budget named (a model that rambles until the budget is not a budget
problem). Samples are spread evenly over the training data. Every rank measures the same samples, but rank 0's
decision is the one every rank acts on (``decide``): greedy decoding on different devices may differ in a last
bit, and one rank stopping while another trains on would hang the others at their next collective.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from sc_tune.adapters.base import ImageInputs, ModelAdapter
from sc_tune.boxes import box_iou
from sc_tune.rollout import GenerationSettings, describe, fit_locator_budget, generate

logger = logging.getLogger(__name__)

WARM_START_DOC = "docs/grounding_warm_start.md"
BUDGET_PROBE_FACTOR = 4  # answers cut at the budget are generated again with this many times the tokens


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
    # Of the answers cut at the budget: which parse when generated again with BUDGET_PROBE_FACTOR x the tokens,
    # and the most tokens such an answer used.
    parse_with_more: list[int] = field(default_factory=list)
    tokens_needed: int = 0
    lengths: list[int] = field(default_factory=list)  # tokens each answer used
    texts: list[str] = field(default_factory=list)  # what was grounded (the cycle: the model's own captions)

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

    def failure(self, max_parse_failures: float, min_accuracy: float = 0.0) -> str | None:
        """Why the run must stop, with the likely cause and the fix; ``None`` when the locator can ground."""
        fix = (f"Fix: start from a grounding warm start (SFT on REC data with the locator's target; {WARM_START_DOC} "
               "says how). --skip_preflight trains anyway.")  # fmt: skip
        worst = max(self.checks, key=lambda c: c.parse_failure_rate)
        if worst.parse_failure_rate <= max_parse_failures:
            best = max(self.checks, key=lambda c: c.acc50)
            if best.acc50 >= min_accuracy:
                return None
            prior = "" if self.grounding_prior else " (this family's released checkpoints were not trained to ground)"
            return (
                f"{self.summary()}. The answers parse, but Acc@0.5 is {100 * best.acc50:.1f} % at best (limit "
                f"--preflight_min_accuracy {min_accuracy:g}): the boxes do not follow the text, so every describer "
                f"reward would be near 0. Likely cause: no grounding prior{prior}. {fix}"
            )
        failed = [i for i, b in enumerate(worst.boxes) if b is None]
        cut = [i for i in failed if not worst.finished[i]]
        example = worst.answers[failed[0]]
        causes = []
        # The records' own captions ground and the model's do not: the locator can write boxes, its captions are
        # what derails it (a caption minimum above what the model writes forces words it never learned to end on).
        grounds_given = [c for c in self.checks if c is not worst and c.parse_failure_rate <= max_parse_failures]
        if worst.name == "cycle" and grounds_given and len(worst.parse_with_more) <= len(failed) / 2:
            caption = f"{worst.texts[failed[0]]!r} -> " if worst.texts else ""
            causes.append(
                f"the model's captions derail its locator, while the records' own captions ground ("
                f"{grounds_given[0].name}: {100 * grounds_given[0].parse_failure_rate:.0f} % parse failures; e.g. "
                f"{caption}{example!r})"
            )
            fix = ("Fix: look at the captions and the caption settings (--describer_min_new_tokens forces at least "
                   "that many tokens, --describer_max_new_tokens cuts them). --skip_preflight trains anyway.")
        elif len(worst.parse_with_more) > len(failed) / 2:
            causes.append(
                f"budget: {len(cut)} of the {len(failed)} failed answers were cut at the {self.budget}-token budget "
                f"before a box was complete (e.g. {example!r}); with {BUDGET_PROBE_FACTOR}x the tokens "
                f"{len(worst.parse_with_more)} of them parse, the longest using {worst.tokens_needed} tokens: set "
                f"--locator_max_new_tokens {worst.tokens_needed} or more, and check with "
                "`python -m sc_tune.families budget --model_name_or_path <your checkpoint>`"
            )
        else:
            unfinished = "" if len(cut) < len(failed) else f" (they ran to the {self.budget}-token budget)"
            reasons = [worst.reasons[i] for i in failed if worst.reasons[i]]
            causes.append(
                f"format: the answers hold no box in the family's form{unfinished} (e.g. {example!r}"
                f"{': ' + reasons[0] if reasons else ''}); check how it reads with `python -m sc_tune.families parse "
                "--model_type <type> --answer '<text>'`, or train the generic format with --box_format generic after "
                "a grounding warm start"
            )
        if not self.grounding_prior:
            causes.insert(0, "no grounding prior: this family's released checkpoints were not trained to write boxes")
        return (
            f"{self.summary()}. The {worst.name} answers of {100 * worst.parse_failure_rate:.0f} % of the samples do "
            f"not parse (limit --preflight_max_parse_failures {max_parse_failures:g}), so every describer reward "
            f"would be 0. Likely cause: {'; '.join(causes)}. {fix}"
        )


def spread_indices(size: int, count: int) -> list[int]:
    """``count`` indices spread evenly over ``range(size)`` (all of them when ``count >= size``)."""
    if count >= size:
        return list(range(size))
    return sorted({i * size // count for i in range(count)})


def referring_text(record: dict) -> str | None:
    """A record's referring expression: its ``caption``, else a ``category`` in words (Objects365's is an id)."""
    for key in ("caption", "category"):
        value = record.get(key)
        if isinstance(value, str) and value.strip():
            return value.strip()
    return None


def decide(report: PreflightReport, args, world_size: int) -> str | None:
    """Rank 0's verdict (``PreflightReport.failure``), on every rank: all stop together or none does."""
    failure = report.failure(args.preflight_max_parse_failures, args.preflight_min_accuracy)
    if world_size > 1:
        from accelerate.utils import broadcast_object_list

        failure = broadcast_object_list([failure], from_process=0)[0]
    return failure


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


def _locate_check(name, model, adapter, images, captions, boxes_B4, settings, probe: bool = True) -> RoleCheck:
    batch = adapter.build_batch([adapter.locator_prompt(c, im) for c, im in zip(captions, images)], images)
    completions = generate(model, adapter, batch, settings, skip_special_tokens=False)
    end_ids = torch.tensor(adapter.end_token_ids)
    finished = [bool(torch.isin(row[mask.bool()], end_ids).any()) for row, mask in
                zip(completions.ids_BT.cpu(), completions.mask_BT.cpu())]
    check = _check(name, adapter, images, completions.texts, [list(b) for b in boxes_B4], finished)
    check.lengths = [int(n) for n in completions.mask_BT.sum(1)]
    check.texts = list(captions)
    cut = [i for i, (box, done) in enumerate(zip(check.boxes, finished)) if box is None and not done]
    if probe and cut:  # would they parse with more tokens? (then the budget, not the format, is the cause)
        more = dataclasses.replace(settings, max_new_tokens=BUDGET_PROBE_FACTOR * settings.max_new_tokens)
        longer = _locate_check(name, model, adapter, [images[i] for i in cut], [captions[i] for i in cut],
                               [boxes_B4[i] for i in cut], more, probe=False)  # fmt: skip
        check.parse_with_more = [i for i, box in zip(cut, longer.boxes) if box is not None]
        check.tokens_needed = max((longer.lengths[k] for k, box in enumerate(longer.boxes) if box is not None),
                                  default=0)  # fmt: skip
    return check
