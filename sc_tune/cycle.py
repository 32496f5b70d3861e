"""The rollout stages of the describer -> locator cycle, and every cache decision they take.

A describer rollout runs four stages, in this order, each returning a dataclass:

1. ``sample_captions`` -> ``SampledCaptions``: the policy's K sampled captions per box (one generate call), and its
   greedy caption per box if the baseline is the policy's (``--describer_baseline policy_greedy``);
2. ``score_with_snapshot`` -> ``ScoredCaptions``: the snapshot's log-probs of the sampled captions (the KL term's
   reference), one teacher-forced pass that keeps its key/value cache where a later stage can resume from it;
3. ``snapshot_greedy_captions`` -> ``Completions``: the snapshot's greedy caption per box (the paper's baseline);
4. ``locate_with_snapshot`` -> ``LocatedCaptions``: the snapshot locates every sampled caption and every greedy one
   in one batched call, and the reward function scores each against the true box its caption was written for;

then the baseline and the terminal advantage (``sc_tune.baselines``) make a ``DescriberRollout``. A locator rollout
is one stage: the snapshot's greedy caption of each box, paired with the box's TRUE box, is the pseudo-label the
locator learns (``LocatorRollout``).

Cache decisions, all taken here:

- the vision cache (``--vision_cache``, ``sc_tune.vision_cache``): built over the policy and the snapshot when the
  family has a trunk split, active for a whole step (rollout, forward and backward), cleared when a step brings new
  images (a new rollout) or new snapshot weights (a phase switch);
- the scoring pass's prompt cache (``--snapshot_prompt_cache``, ``sc_tune.prompt_cache``): kept only where something
  resumes from it. The snapshot's greedy captions decode from it with the paper's baseline and K = 1 (the samples'
  prompts are then the boxes' prompts), where the family allows it; the locator prompts start from its image prefix
  where the family moves cached columns (Qwen-VL). That is why the snapshot scores before it writes or locates.

Every model call goes through one of four methods (``describe``, ``generate_captions``, ``locate``,
``locate_from_prefix``): a test or a benchmark wraps them, in a subclass passed as ``SCTuneTrainer(cycle=...)``, to
see what a stage asked for. The stages take any number of boxes and a rollout holds one row per sampled caption, so
a batch of a whole gradient-accumulation window can be rolled out at once and its rows cut into micro-batches; and
the generation methods take the model to run, so a check before step 0 can call them on the snapshot.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import torch
from trl.trainer.utils import selective_log_softmax

from sc_tune import rollout
from sc_tune.adapters.base import ModelAdapter, PromptBatch
from sc_tune.baselines import DescriberBaseline, describer_baseline, terminal_advantages
from sc_tune.phases import PhasePosition
from sc_tune.preflight import PreflightReport, run_preflight
from sc_tune.prompt_cache import ScoredPrompts, keep_prompt_columns
from sc_tune.rewards import RewardBatch, RewardFunction, get_reward
from sc_tune.rollout import Completions, GenerationSettings
from sc_tune.snapshot import Snapshot
from sc_tune.timing import StageClock
from sc_tune.vision_cache import VisionCache


# ---------------------------------------------------------------------------------------------- what a rollout holds
@dataclass
class DescriberRollout:
    """One describer batch: N = boxes x num_generations sampled captions (each box's samples adjacent)."""

    inputs: dict[str, torch.Tensor]  # prompt + sampled caption, for teacher-forced passes
    caption_ids_NT: torch.Tensor
    caption_mask_NT: torch.Tensor
    snapshot_logp_NT: torch.Tensor
    reward_N: torch.Tensor  # cycle reward of each sampled caption, located by the snapshot
    baseline_N: torch.Tensor  # what each reward is compared with (--describer_baseline)
    terminal_N: torch.Tensor  # reward - baseline (scaled by the box's reward std if asked): the KL-free advantage
    old_logp_NT: torch.Tensor | None = None  # pre-update policy, filled by the first PPO epoch
    advantages_NT: torch.Tensor | None = None
    kl_coef: float | None = None  # the KL coefficient its advantages used
    stopped: bool = False  # the policy-KL early stop fired: no more updates on this rollout
    skip_update: bool = False  # this step's loss must not update the weights (ratio guard or early stop)


@dataclass
class LocatorRollout:
    inputs: dict[str, torch.Tensor]  # locator prompt (snapshot's greedy caption) + the true box
    labels: torch.Tensor  # -100 except on the box tokens and the end token
    target_len: int
    skip_update: bool = False  # never set: every locator step updates


@dataclass
class RolloutResult:
    """A rollout, what to log about it (``<phase>/<name>``, averaged over ranks) and what to draw of it."""

    rollout: DescriberRollout | LocatorRollout
    metrics: dict[str, torch.Tensor | float]
    captions: list[str] = field(default_factory=list)  # one sampled caption per box (describer rollouts)
    located: list = field(default_factory=list)  # the box the snapshot located for it (None: no box parsed)


# ---------------------------------------------------------------------------------------------- stage results
@dataclass
class SampledCaptions:
    batch: PromptBatch  # describer prompts, each box repeated K times
    sampled: Completions  # N = B x K rows
    policy_greedy: Completions | None  # B rows: the policy's greedy caption (policy_greedy baseline only)


@dataclass
class ScoredCaptions:
    teacher_inputs: dict[str, torch.Tensor]  # prompt + sampled caption, on the device
    caption_ids_NT: torch.Tensor
    caption_mask_NT: torch.Tensor
    snapshot_logp_NT: torch.Tensor
    prompts: ScoredPrompts | None  # the pass's cache of the prompts (None: nothing resumes from it)
    greedy_resumes: bool  # the snapshot's greedy captions decode from ``prompts``


@dataclass
class LocatedCaptions:
    rewards: RewardBatch  # the sampled captions'
    greedy_rewards: RewardBatch | None  # the greedy captions' (B rows), if there are greedy captions
    boxes: list  # the snapshot's box for each sampled caption (None: no box parsed)
    from_prefix: bool  # the locator prompts resumed from the scored image prefix


@dataclass
class TokenLogprobs:
    logp_NT: torch.Tensor
    cache: object | None  # the pass's key/value cache, if asked for and kept


def caption_logprobs(model, inputs, caption_ids_NT, temperature: float, keep_cache: bool = False) -> TokenLogprobs:
    """log p(caption token | prefix) under the sampling distribution (logits / ``temperature``: the PPO ratio and the
    KL compare the distribution the captions were drawn from), from the logits of the last T+1 positions only.

    The key/value cache is kept only if asked, and only where the model keeps one (not under checkpointing in
    training)."""
    num_tokens = caption_ids_NT.shape[1]
    outputs = model(**inputs, logits_to_keep=num_tokens + 1, use_cache=keep_cache)
    logp_NT = selective_log_softmax(outputs.logits[:, :-1] / temperature, caption_ids_NT)
    return TokenLogprobs(logp_NT, outputs.cache if keep_cache else None)


def _unwrapped(module):
    return module


@dataclass
class RolloutModels:
    """The two models a rollout runs, as the trainer holds them."""

    policy: Callable[[], AbstractContextManager]  # yields the policy ready for generate (unwrapped, eval mode)
    snapshot: Snapshot  # generating() / scoring()
    unwrap: Callable = _unwrapped  # the module the adapter inspects, from the one snapshot.scoring() yields


class RolloutCycle:
    """Makes describer and locator rollouts. ``SCTuneTrainer`` builds one from its arguments, or takes one
    (``cycle=``), and ``attach``es its models to it."""

    def __init__(self, adapter: ModelAdapter, args, reward_fn: RewardFunction | None = None):
        self.adapter = adapter
        self.args = args
        self.reward_fn = reward_fn if reward_fn is not None else get_reward(args.reward)
        self.baseline = DescriberBaseline(args.describer_baseline)
        self.caption_sampling = GenerationSettings(
            max_new_tokens=args.describer_max_new_tokens,
            min_new_tokens=args.describer_min_new_tokens,
            do_sample=True,
            top_k=args.describer_top_k,
            top_p=args.describer_top_p,
            temperature=args.describer_temperature,
        )
        self.greedy_captions = GenerationSettings(args.describer_max_new_tokens, args.describer_min_new_tokens)
        self.greedy_boxes = GenerationSettings(args.locator_max_new_tokens, args.locator_min_new_tokens)
        self.stage_clock = StageClock()  # timing/<stage> seconds per step in the logs (the trainer's too)
        self.models: RolloutModels | None = None
        self.vision_cache: VisionCache | None = None

    def attach(self, models: RolloutModels, modules: list[torch.nn.Module]) -> None:
        """The models to run; ``modules`` (policy, snapshot copy) are where the vision cache wraps the tower."""
        self.models = models
        # The frozen vision trunk once per image per rollout (None: family fallback, fix_vit off, or disabled).
        self.vision_cache = VisionCache.for_model(self.adapter, modules) if self.args.vision_cache else None

    # ------------------------------------------------------------------ a step's caches
    def begin_step(self, position: PhasePosition) -> None:
        if self.vision_cache is not None and (position.needs_rollout or position.starts_phase):
            # New images, or new snapshot weights: the memo of the snapshot's frozen tower is stale.
            self.vision_cache.clear()

    def step_context(self) -> AbstractContextManager:
        """Around a whole step (rollout, forward, backward with any checkpoint recomputation): the vision cache."""
        return self.vision_cache.active() if self.vision_cache is not None else nullcontext()

    def pop_timings(self) -> dict[str, float]:
        if self.vision_cache is not None:  # the frozen trunk's runs, inside the stages (not additive)
            self.stage_clock.add("vision_encoding", self.vision_cache.pop_encode_seconds())
        return self.stage_clock.pop()

    # ------------------------------------------------------------------ the generation calls
    def describe(self, model, images, boxes, settings: GenerationSettings) -> tuple[PromptBatch, Completions]:
        return rollout.describe(model, self.adapter, images, boxes, settings)

    def generate_captions(self, model, batch: PromptBatch, settings: GenerationSettings, prompt_cache=None):
        """Captions of an already built describer prompt batch, decoding from ``prompt_cache`` if given."""
        return rollout.generate(model, self.adapter, batch, settings, skip_special_tokens=True,
                                prompt_cache=prompt_cache)

    def locate(self, model, images, captions):
        return rollout.locate(model, self.adapter, images, captions, self.greedy_boxes)

    def locate_from_prefix(self, model, images, captions, scored: ScoredPrompts, source_rows):
        return rollout.locate_from_prefix(model, self.adapter, images, captions, self.greedy_boxes, scored,
                                          source_rows)

    # ------------------------------------------------------------------ the describer rollout
    def prepare_images(self, inputs):
        return [self.adapter.prepare_image(image) for image in inputs["images"]]  # once per sample per step

    @torch.no_grad()
    def describer_rollout(self, inputs) -> RolloutResult:
        images = self.prepare_images(inputs)
        boxes_B4 = inputs["boxes"]
        k = self.args.num_generations
        sampled = self.sample_captions(images, boxes_B4)
        # The snapshot scores the samples before it writes its own greedy captions and locates: with K = 1 the
        # greedy decoding starts from the scoring pass's prompt cache, and locating reuses its image prefix.
        scored = self.score_with_snapshot(sampled)
        greedy = sampled.policy_greedy
        if self.baseline is DescriberBaseline.SNAPSHOT_GREEDY:
            greedy = self.snapshot_greedy_captions(images, boxes_B4, sampled.batch, scored)
        located = self.locate_with_snapshot(images, boxes_B4, sampled.sampled, greedy, scored)
        reward_N = located.rewards.reward_N
        greedy_reward_B = located.greedy_rewards.reward_N if located.greedy_rewards is not None else None
        baseline_N = describer_baseline(self.baseline, reward_N, k, greedy_reward_B)
        terminal_N = terminal_advantages(reward_N, baseline_N, k, self.args.scale_rewards_by_group_std)
        device = self.args.device
        made = DescriberRollout(
            scored.teacher_inputs,
            scored.caption_ids_NT,
            scored.caption_mask_NT,
            scored.snapshot_logp_NT,
            reward_N.to(device),
            baseline_N.to(device),
            terminal_N.to(device),
        )
        metrics = self._describer_metrics(located, baseline_N, scored)
        return RolloutResult(made, metrics, sampled.sampled.texts[::k], located.boxes[::k])

    def sample_captions(self, images, boxes_B4) -> SampledCaptions:
        """K sampled captions per box from the policy (one generate call), and its greedy caption if the baseline
        is the policy's."""
        k = self.args.num_generations
        rows_images = [image for image in images for _ in range(k)]
        rows_boxes = [box for box in boxes_B4.tolist() for _ in range(k)]
        greedy = None
        with self.models.policy() as policy:
            with self.stage_clock.stage("policy_sampling"):
                batch, sampled = self.describe(policy, rows_images, rows_boxes, self.caption_sampling)
            if self.baseline is DescriberBaseline.POLICY_GREEDY:
                with self.stage_clock.stage("policy_greedy"):
                    _, greedy = self.describe(policy, images, boxes_B4.tolist(), self.greedy_captions)
        return SampledCaptions(batch, sampled, greedy)

    def score_with_snapshot(self, sampled: SampledCaptions) -> ScoredCaptions:
        """Teacher-forced inputs of prompt + sampled caption and the snapshot's log-probs of the caption.

        With ``--snapshot_prompt_cache`` the pass also keeps its key/value cache of the prompts (all but their last
        column) where something can resume from it: the greedy captions with the paper's baseline and K = 1 (the
        samples' prompts are the boxes'), in a family that allows it; the locator prompts where the family moves
        cached columns (``sc_tune.prompt_cache``)."""
        batch, completions = sampled.batch, sampled.sampled
        device = self.args.device
        teacher = self.adapter.append_completion(batch, completions.ids_BT.cpu(), completions.mask_BT.cpu())
        teacher_inputs = {k: v.to(device) for k, v in teacher.items()}
        caption_ids_NT, caption_mask_NT = completions.ids_BT.to(device), completions.mask_BT.to(device)
        prompt_length, scored_length = batch.inputs["input_ids"].shape[1], teacher_inputs["input_ids"].shape[1]
        with self.models.snapshot.scoring() as snapshot, self.stage_clock.stage("snapshot_scoring"):
            model = self.models.unwrap(snapshot)
            greedy_resumes = (
                self.args.snapshot_prompt_cache
                and self.baseline is DescriberBaseline.SNAPSHOT_GREEDY
                and self.args.num_generations == 1
                and self.adapter.resumes_from_scoring_cache(model, prompt_length, scored_length)
            )
            locating_resumes = self.args.snapshot_prompt_cache and self.adapter.moves_cached_prompt_columns(
                model, scored_length
            )
            scores = caption_logprobs(snapshot, teacher_inputs, caption_ids_NT, self.args.describer_temperature,
                                      keep_cache=greedy_resumes or locating_resumes)
        prompts = None
        if scores.cache is not None:  # None also where the model keeps no cache (checkpointing in training mode)
            prompts = ScoredPrompts(batch, keep_prompt_columns(scores.cache, prompt_length), prompt_length - 1)
        return ScoredCaptions(teacher_inputs, caption_ids_NT, caption_mask_NT, scores.logp_NT, prompts,
                              greedy_resumes and prompts is not None)

    def snapshot_greedy_captions(self, images, boxes_B4, batch: PromptBatch, scored: ScoredCaptions) -> Completions:
        """The snapshot's greedy caption per box (the paper's baseline); ``batch`` is the samples' prompt batch."""
        with self.models.snapshot.generating() as snapshot, self.stage_clock.stage("snapshot_generation"):
            if self.args.num_generations == 1:  # one sample per box: the samples' prompts are the boxes' prompts
                cache = scored.prompts.cache if scored.greedy_resumes else None
                return self.generate_captions(snapshot, batch, self.greedy_captions, prompt_cache=cache)
            return self.describe(snapshot, images, boxes_B4.tolist(), self.greedy_captions)[1]

    def locate_with_snapshot(self, images, boxes_B4, sampled: Completions, greedy: Completions | None,
                             scored: ScoredCaptions) -> LocatedCaptions:
        """The snapshot locates every sampled caption and the greedy ones in one batched call; all are scored, each
        against the true box its caption was written for. With the scoring pass's cache the locator prompts
        resume from their image prefix."""
        k = self.args.num_generations
        rows_images = [image for image in images for _ in range(k)]
        texts = list(sampled.texts)
        located_images = list(rows_images)
        source_rows = list(range(len(rows_images)))  # the describer prompt batch row of each located caption
        if greedy is not None:
            texts += greedy.texts
            located_images += list(images)
            source_rows += [i * k for i in range(len(images))]
        with self.models.snapshot.generating() as snapshot, self.stage_clock.stage("locating"):
            found = None
            if scored.prompts is not None:
                found = self.locate_from_prefix(snapshot, located_images, texts, scored.prompts, source_rows)
            boxes, _ = found or self.locate(snapshot, located_images, texts)
        n = len(rows_images)
        rewards = self.reward_fn(boxes[:n], boxes_B4.repeat_interleave(k, dim=0), sampled.texts)
        greedy_rewards = None
        if greedy is not None:
            greedy_rewards = self.reward_fn(boxes[n:], boxes_B4, greedy.texts)
        return LocatedCaptions(rewards, greedy_rewards, boxes[:n], found is not None)

    def _describer_metrics(self, located: LocatedCaptions, baseline_N, scored: ScoredCaptions) -> dict:
        rewards, greedy_rewards = located.rewards, located.greedy_rewards
        reward_N = rewards.reward_N
        values = {
            "reward": reward_N.mean(),
            "baseline": baseline_N.mean(),
            "parse_failure": (~rewards.parsed_N).float().mean(),
            "caption_tokens": scored.caption_mask_NT.float().sum(1).mean().cpu(),
            "nonzero_advantage": ((reward_N - baseline_N).abs() > 1e-6).float().mean(),
        }
        if greedy_rewards is not None:
            values["greedy_reward"] = greedy_rewards.reward_N.mean()
            values["greedy_parse_failure"] = (~greedy_rewards.parsed_N).float().mean()
        if self.baseline is DescriberBaseline.SNAPSHOT_GREEDY:
            # 1: the snapshot's greedy captions were decoded from its scoring pass's cache (--snapshot_prompt_cache)
            values["prompt_cache"] = float(scored.greedy_resumes)
        # 1: the locator prompts resumed from the image prefix the scoring pass cached (--snapshot_prompt_cache)
        values["locating_prefix_cache"] = float(located.from_prefix)
        return values

    # ------------------------------------------------------------------ before step 0
    @torch.no_grad()
    def preflight(self, dataset, samples: int) -> PreflightReport:
        """The step-0 cycle (and REC on the records' captions, where every one has one) on the first ``samples``
        training samples, with the policy: does the locator's answer parse? (``sc_tune.preflight``)"""
        items = [dataset[i] for i in range(min(samples, len(dataset)))]
        records = getattr(dataset, "records", None)
        captions = [r.get("caption") for r in records[: len(items)]] if records is not None else None
        with self.models.policy() as policy:
            return run_preflight(
                policy, self.adapter, self.prepare_images({"images": [it["image"] for it in items]}),
                [list(it["bbox"]) for it in items], captions if captions and all(captions) else None,
                self.greedy_captions, self.greedy_boxes,
            )

    # ------------------------------------------------------------------ the locator rollout
    @torch.no_grad()
    def locator_rollout(self, inputs) -> RolloutResult:
        """Pseudo-labels: the snapshot's greedy caption of each box, paired with the true box."""
        images = self.prepare_images(inputs)
        boxes = inputs["boxes"].tolist()
        with self.models.snapshot.generating() as snapshot, self.stage_clock.stage("snapshot_generation"):
            _, captions = self.describe(snapshot, images, boxes, self.greedy_captions)
        # The pseudo-label: the snapshot's greedy caption and the TRUE box, in the family's answer form.
        targets = [self.adapter.locator_target(b, im, c) for b, im, c in zip(boxes, images, captions.texts)]
        pseudo = self.adapter.build_batch(
            [self.adapter.locator_prompt(c, im) for c, im in zip(captions.texts, images)], images, targets
        )
        device = self.args.device
        target_len = int((pseudo.labels != -100).sum(1).max())
        made = LocatorRollout({k: v.to(device) for k, v in pseudo.inputs.items()}, pseudo.labels.to(device), target_len)
        return RolloutResult(made, {"caption_tokens": captions.mask_BT.float().sum(1).mean().cpu()})
