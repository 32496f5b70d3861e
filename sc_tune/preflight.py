"""Preflight: before step 0 the locator answers a few training samples, and a run whose locator cannot ground stops.

Why: the describer's reward is the IoU of the box the locator writes for its caption. A locator whose answers do
not parse (a format the codec does not read, or answers cut at the token budget) or whose boxes ignore the text
(a family without a grounding prior, such as Gemma 3, LLaVA-OneVision or SmolVLM) gives every caption the
reward 0: every advantage is 0, and a run of thousands of steps teaches the locator a box syntax at best.

What it measures (``--preflight_samples`` records, spread evenly over the training data; every rank runs the
same ones, since ZeRO-3 gathers the weights on all ranks for generation):

- REC where a record carries a referring text (``caption``, else a text ``category``): the locator grounds it;
- otherwise the cycle, as in training: the model's greedy caption of the box, then the locator grounds that;
- the parse-failure rate of the locator's answers, and Acc@0.5 (IoU >= 0.5 with the record's box; an answer
  that does not parse is a miss).

Rank 0 decides and tells the others, so every rank stops together (``PreflightError``). The run stops when the
parse-failure rate exceeds ``--preflight_max_parse_failures`` or Acc@0.5 is below ``--preflight_min_accuracy``;
the message names the likely cause and its fix (docs/grounding_warm_start.md):

- budget: most failed answers used the whole token budget without an end token and parse when generated again
  with ``BUDGET_PROBE_FACTOR`` times the budget (the budget and the tokens the answers needed are quoted);
- no grounding prior: the family's adapter says it has none (``ModelAdapter.grounding_prior``), or answers
  parse but Acc@0.5 is near 0;
- format: answers that end but do not parse (one is quoted).

``--skip_preflight`` runs no preflight; a resumed run (step > 0) runs none either.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import asdict, dataclass, field

import torch
from transformers import TrainerCallback

from sc_tune.adapters.base import ModelAdapter
from sc_tune.boxes import box_iou
from sc_tune.rollout import GenerationSettings, describe, locate_completions

logger = logging.getLogger(__name__)

WARM_START_DOC = "docs/grounding_warm_start.md"
BUDGET_PROBE_FACTOR = 4  # answers cut at the budget are generated again with this many times the tokens


class PreflightError(RuntimeError):
    """The locator cannot ground before step 0; the message names the likely cause and the fix."""


@dataclass
class PreflightReport:
    samples: int = 0
    rec_samples: int = 0  # grounded the record's own referring text
    rec_hits: int = 0
    cycle_samples: int = 0  # grounded the model's own caption of the box
    cycle_hits: int = 0
    parse_failures: int = 0
    cut_at_budget: int = 0  # failures that used the whole budget without an end token
    cut_parse_with_more: int = 0  # of those, answers that parse with BUDGET_PROBE_FACTOR times the budget
    tokens_needed: int = 0  # the most tokens such an answer used
    budget: int = 0  # the locator's max_new_tokens (after fitting the family's widest box)
    failed_answers: list[str] = field(default_factory=list)  # a few unparsed answers, as written
    failed_lengths: list[int] = field(default_factory=list)  # their token counts
    grounding_prior: bool = True  # what the family's adapter says

    def add(self, hit: bool, parsed: bool, rec: bool, cut: bool, answer: str, tokens: int) -> None:
        """Count one located sample (``rec``: it grounded the record's own text, else the model's caption)."""
        self.samples += 1
        if rec:
            self.rec_samples += 1
            self.rec_hits += hit
        else:
            self.cycle_samples += 1
            self.cycle_hits += hit
        if not parsed:
            self.parse_failures += 1
            self.cut_at_budget += cut
            if len(self.failed_answers) < 3:
                self.failed_answers.append(answer)
                self.failed_lengths.append(tokens)

    @property
    def parse_failure_rate(self) -> float:
        return self.parse_failures / max(self.samples, 1)

    @property
    def accuracy(self) -> float:
        return (self.rec_hits + self.cycle_hits) / max(self.samples, 1)

    def summary(self) -> str:
        parts = [f"preflight on {self.samples} samples: parse failures {self.parse_failure_rate:.1%} "
                 f"({self.parse_failures}, {self.cut_at_budget} cut at the {self.budget}-token budget)"]  # fmt: skip
        if self.rec_samples:
            parts.append(f"REC Acc@0.5 {self.rec_hits / self.rec_samples:.1%} ({self.rec_hits}/{self.rec_samples})")
        if self.cycle_samples:
            parts.append(
                f"cycle Acc@0.5 {self.cycle_hits / self.cycle_samples:.1%} ({self.cycle_hits}/{self.cycle_samples}, "
                "no referring text in the records: the model's own captions)"
            )
        return "; ".join(parts)


def referring_text(record: dict) -> str | None:
    """A record's referring expression: its ``caption``, else a text ``category`` (Objects365's is an id)."""
    for key in ("caption", "category"):
        value = record.get(key)
        if isinstance(value, str) and value.strip():
            return value.strip()
    return None


def spread_indices(size: int, count: int) -> list[int]:
    """``count`` indices spread evenly over ``range(size)`` (all of them when ``count >= size``)."""
    if count >= size:
        return list(range(size))
    return sorted({i * size // count for i in range(count)})


@torch.no_grad()
def run_preflight(
    model,
    adapter: ModelAdapter,
    dataset,
    num_samples: int,
    caption_settings: GenerationSettings,
    box_settings: GenerationSettings,
    batch_size: int,
) -> PreflightReport:
    """Locate ``num_samples`` records of ``dataset`` (a ``ReferringDataset``) with ``model`` (unwrapped, eval)."""
    report = PreflightReport(grounding_prior=adapter.grounding_prior)
    indices = spread_indices(len(dataset), num_samples)
    for start in range(0, len(indices), batch_size):
        chunk = indices[start : start + batch_size]
        samples = [dataset[i] for i in chunk]
        images = [adapter.prepare_image(s["image"]) for s in samples]
        boxes = [list(s["bbox"]) for s in samples]
        texts = [referring_text(dataset.records[i]) for i in chunk]
        need_caption = [j for j, t in enumerate(texts) if t is None]
        if need_caption:
            _, captions = describe(model, adapter, [images[j] for j in need_caption],
                                   [boxes[j] for j in need_caption], caption_settings)  # fmt: skip
            for j, caption in zip(need_caption, captions.texts):
                texts[j] = caption
        located, completions, settings = locate_completions(model, adapter, images, texts, box_settings)
        report.budget = max(report.budget, settings.max_new_tokens)
        cut = _cut_at_budget(completions, adapter, settings)
        failed_cut = [j for j, box in enumerate(located) if box is None and cut[j]]
        if failed_cut:  # would they parse with more tokens? (then the budget, not the format, is the cause)
            more = dataclasses.replace(settings, max_new_tokens=BUDGET_PROBE_FACTOR * settings.max_new_tokens)
            rescued, longer, _ = locate_completions(model, adapter, [images[j] for j in failed_cut],
                                                    [texts[j] for j in failed_cut], more, fit_budget=False)  # fmt: skip
            for k, box in enumerate(rescued):
                if box is not None:
                    report.cut_parse_with_more += 1
                    report.tokens_needed = max(report.tokens_needed, int(longer.mask_BT[k].sum()))
        for j, box in enumerate(located):
            hit = box is not None and float(box_iou(torch.tensor([box]), torch.tensor([boxes[j]]))[0]) >= 0.5
            report.add(hit, parsed=box is not None, rec=j not in need_caption, cut=cut[j],
                       answer=completions.texts[j], tokens=int(completions.mask_BT[j].sum()))  # fmt: skip
    return report


def _cut_at_budget(completions, adapter: ModelAdapter, settings: GenerationSettings) -> list[bool]:
    """Per answer: it used the whole token budget without writing an end token."""
    end_ids = torch.tensor(adapter.end_token_ids, device=completions.ids_BT.device)
    ended_B = (torch.isin(completions.ids_BT, end_ids) & completions.mask_BT.bool()).any(1)
    return [bool(not e and n >= settings.max_new_tokens) for e, n in zip(ended_B, completions.mask_BT.sum(1))]


def stop_message(report: PreflightReport, max_parse_failures: float, min_accuracy: float) -> str | None:
    """Why the run must stop (likely cause and fix), or ``None`` when the locator can ground."""
    too_many_failures = report.parse_failure_rate > max_parse_failures
    if not too_many_failures and report.accuracy >= min_accuracy:
        return None
    anyway = "--skip_preflight True trains anyway."
    fix = (f"Fix: start from a grounding warm start (SFT on referring data with the locator's target; {WARM_START_DOC} "
           f"says how with this repository's tools). {anyway}")  # fmt: skip
    if too_many_failures:
        head = (f"preflight: {report.parse_failures} of {report.samples} locator answers did not parse "
                f"({report.parse_failure_rate:.0%} > --preflight_max_parse_failures {max_parse_failures:g}), so "
                "SC-Tune's rewards would be 0.")  # fmt: skip
        quote = repr(report.failed_answers[0]) if report.failed_answers else "''"
        if report.cut_parse_with_more * 2 > report.parse_failures:
            cause = (f"Likely cause: budget: {report.cut_at_budget} answers used the whole {report.budget}-token "
                     f"budget without an end token (e.g. {quote}); given {BUDGET_PROBE_FACTOR}x the budget, "
                     f"{report.cut_parse_with_more} of them parse, the longest using {report.tokens_needed} tokens. "
                     f"Fix: --locator_max_new_tokens {report.tokens_needed} or more.")  # fmt: skip
            return f"{head} {cause} {anyway}"
        if not report.grounding_prior:
            cause = (f"Likely cause: no grounding prior: this family's released checkpoints were not trained to "
                     f"answer with a box (e.g. {quote}).")  # fmt: skip
        else:
            cause = (f"Likely cause: format: the answers end but are not the box text this family's codec reads "
                     f"(e.g. {quote}); check --box_format (native or generic) against what the checkpoint writes.")  # fmt: skip
        return f"{head} {cause} {fix}"
    cause = "no grounding prior" + ("" if report.grounding_prior else " (the family's adapter says it has none)")
    return (f"preflight: the locator's boxes parse but Acc@0.5 is {report.accuracy:.0%} "
            f"(< --preflight_min_accuracy {min_accuracy:g}): its boxes do not follow the text. Likely cause: "
            f"{cause}. {fix}")  # fmt: skip


class PreflightCallback(TrainerCallback):
    """Runs the preflight at train begin (after DeepSpeed and DDP wrap the model), on every rank."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step > 0:  # resumed: the run already passed its preflight
            return
        trainer = self.trainer
        with trainer._policy_for_generation() as model:
            report = run_preflight(
                model, trainer.adapter, trainer.train_dataset, args.preflight_samples, trainer.greedy_captions,
                trainer.greedy_boxes, args.per_device_train_batch_size,
            )  # fmt: skip
        report = _from_rank_zero(report, args.world_size)
        message = stop_message(report, args.preflight_max_parse_failures, args.preflight_min_accuracy)
        if trainer.is_world_process_zero():
            logger.info("%s", report.summary())
            print(report.summary(), flush=True)
            if message:
                logger.error("%s", message)
        if message:
            raise PreflightError(message)


def _from_rank_zero(report: PreflightReport, world_size: int) -> PreflightReport:
    """Rank 0's report on every rank (each measured the same samples; rank 0's decides)."""
    if world_size == 1:
        return report
    from accelerate.utils import broadcast_object_list

    return PreflightReport(**broadcast_object_list([asdict(report)], from_process=0)[0])

