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
locator learns (``LocatorRollout``). With ``--pseudo_label_min_iou`` the snapshot also locates its own captions, and
a pseudo-label whose caption it grounds elsewhere is left out of the loss: such a caption is ambiguous or names what
the object is not (a wrong colour), and learning to map it to the true box teaches the locator to ignore the words
that contradict the picture, which would let the describer write them unpunished.

Cache decisions, all taken here:

- the vision cache (``--vision_cache``, ``sc_tune.vision_cache``): built over the policy and the snapshot when the
  family has a trunk split, active for a whole step (rollout, forward and backward), cleared when a step brings new
  images (a new rollout) or new snapshot weights (a phase switch);
- the scoring pass's prompt cache (``--snapshot_prompt_cache``, ``sc_tune.prompt_cache``): kept only where something
  resumes from it. The snapshot's greedy captions decode from it with the paper's baseline and K = 1 (the samples'
  prompts are then the boxes' prompts), where the family allows it; the locator prompts start from its image prefix
  where the family moves cached columns (Qwen-VL, Qwen2-VL, Qwen2.5-VL, Qwen3-VL). That is why the snapshot scores
  before it writes or locates;
- the fused loop's cache of the snapshot's prompts (same flag): where fused decoding writes the LoRA snapshot's
  greedy captions with K = 1 and one micro-batch, its greedy rows prefill the very prompts the scoring pass reads
  next; the loop keeps their cache and the scoring pass reads only the captions from it;
- the pseudo-label filter's locating (``--pseudo_label_min_iou``, same flag): the snapshot's greedy-caption call
  keeps its prompts' cache, and the captions are located from their image prefix.

How rollouts decode, also decided here (``sc_tune.decoding``): ``--static_decoding`` (a static key/value cache,
decode steps replayed as CUDA graphs; ``--decoding_compile_backend`` compiles the step before it is captured), and
``--fused_decoding``: where the greedy captions share the policy's base weights (the policy's own, or the LoRA
snapshot's adapter, ``sc_tune.snapshot.row_adapters``), they decode in the policy's sampling loop, and the snapshot's
greedy captions then skip the scoring pass's prompt cache.

A rollout of several micro-batches at once (``--generation_batch_size``, ``describer_rollouts`` and
``locator_rollouts`` take a list): every generate call covers all of them, and everything after is per micro-batch
(its own prompt batch, so its own padding; its slice of the completions; the snapshot's scoring pass, rewards and
baseline), so each micro-batch's rollout, and with it the loss, equals a rollout of that micro-batch alone. The
sampling noise is drawn per micro-batch from a seed of (``--seed``, step, micro-batch, rank) (``sampling_seed``):
alone, from the global generator forked and seeded (transformers' own ``generate`` draws from it); together, from a
generator per micro-batch's block of rows (``sc_tune.decoding.SampledRows``). Only the prompt cache is given up
over a chunk: the scoring passes are per micro-batch, so the chunk's greedy captions and locating prefill afresh.

Every model call goes through one of five methods (``describe``, ``describe_with_greedy``, ``generate_captions``,
``locate``, ``locate_from_prefix``): a test or a benchmark wraps them, in a subclass passed as
``SCTuneTrainer(cycle=...)``, to see what a stage asked for; and they take the model to run, so a check before
step 0 can call them on the snapshot.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
from trl.trainer.utils import selective_log_softmax

from sc_tune import rollout
from sc_tune.adapters.base import ModelAdapter, PromptBatch
from sc_tune.arguments import ArgumentError
from sc_tune.baselines import DescriberBaseline, describer_baseline, terminal_advantages
from sc_tune.decoding import Decoding, SampledRows, choose_decoding
from sc_tune.phases import PhasePosition
from sc_tune.preflight import PreflightReport, referring_text, run_preflight, spread_indices
from sc_tune.prompt_cache import ScoredPrompts, keep_prompt_columns, scoring_inputs, uncached_inputs
from sc_tune.rewards import RewardBatch, RewardFunction, cycle_iou, get_reward
from sc_tune.rollout import Completions, GenerationSettings, describer_budget
from sc_tune.snapshot import POLICY_ADAPTER, SNAPSHOT_ADAPTER, AdapterSnapshot, Snapshot, row_adapters
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
    greedy: Completions | None  # B rows: the policy's greedy captions (policy_greedy baseline), or the snapshot's
    # where fused decoding wrote them in the sampling loop (snapshot_greedy: None until its own stage otherwise)


@dataclass
class ScoredCaptions:
    teacher_inputs: dict[str, torch.Tensor]  # prompt + sampled caption, on the device
    caption_ids_NT: torch.Tensor
    caption_mask_NT: torch.Tensor
    snapshot_logp_NT: torch.Tensor
    prompts: ScoredPrompts | None  # the pass's cache of the prompts (None: nothing resumes from it)
    greedy_resumes: bool  # the snapshot's greedy captions decode from ``prompts``
    from_fused_prompts: bool  # the pass started from the fused loop's cache of the snapshot's prompts


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


def caption_logprobs(model, inputs, caption_ids_NT, temperature: float, keep_cache: bool = False,
                     prompt_cache=None) -> TokenLogprobs:
    """log p(caption token | prefix) under the sampling distribution (logits / ``temperature``: the PPO ratio and the
    KL compare the distribution the captions were drawn from), from the logits of the last T+1 positions only.

    ``prompt_cache``: the key/value cache of the prompts' earlier columns, ``inputs`` then the rest
    (``sc_tune.prompt_cache.uncached_inputs``). The key/value cache is kept only if asked, and only where the model
    keeps one (not under checkpointing in training)."""
    num_tokens = caption_ids_NT.shape[1]
    if prompt_cache is not None:
        # use_cache: a model that keeps no cache without it would also ignore the one it is given (Qwen-VL).
        outputs = model(**inputs, cache=prompt_cache, logits_to_keep=num_tokens + 1, use_cache=True)
    else:
        outputs = model(**inputs, logits_to_keep=num_tokens + 1, use_cache=keep_cache)
    logp_NT = selective_log_softmax(last_logits(outputs, num_tokens + 1)[:, :-1] / temperature, caption_ids_NT)
    return TokenLogprobs(logp_NT, outputs.cache if keep_cache else None)


def last_logits(outputs, keep: int) -> torch.Tensor:
    """The logits of the last ``keep`` positions of a forward asked for only those (``logits_to_keep=keep``). A model
    whose forward has no ``logits_to_keep`` argument ignores it and returns every position's; cut here, they are the
    same logits."""
    return outputs.logits[:, -keep:]


@dataclass
class RolloutModels:
    """The two models a rollout runs, as the trainer holds them."""

    policy: Callable[[], AbstractContextManager]  # yields the policy ready for generate (unwrapped, eval mode)
    snapshot: Snapshot  # generating() / scoring()
    unwrap: Callable  # the module the adapter inspects, from the one snapshot.scoring() yields
    sharded: bool  # ZeRO-3: parameters are gathered inside every forward (no CUDA graphs)


def sampling_seed(seed: int, step: int, micro_batch: int, rank: int) -> int:
    """The seed of one micro-batch's sampling noise: the same whichever micro-batches share its generate call."""
    digest = hashlib.sha256(f"{seed}:{step}:{micro_batch}:{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # a non-negative 63-bit seed


@contextmanager
def seeded_global_rng(seed: int, device):
    """The global generator (CPU, and the device's on CUDA) seeded with ``seed``, its state restored afterwards."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    index = (device.index if device.index is not None else torch.cuda.current_device()) if cuda else None
    with torch.random.fork_rng(devices=[index] if cuda else []):
        torch.random.default_generator.manual_seed(seed)
        if cuda:
            torch.cuda.default_generators[index].manual_seed(seed)
        yield


def _concat(lists):
    return [item for part in lists for item in part]


def _offsets(sizes: Sequence[int]) -> list[tuple[int, int]]:
    spans, start = [], 0
    for size in sizes:
        spans.append((start, start + size))
        start += size
    return spans


class RolloutCycle:
    """Makes describer and locator rollouts. ``SCTuneTrainer`` builds one from its arguments, or takes one
    (``cycle=``), and ``attach``es its models to it."""

    def __init__(self, adapter: ModelAdapter, args, reward_fn: RewardFunction | None = None):
        self.adapter = adapter
        self.args = args
        self.reward_fn = reward_fn if reward_fn is not None else get_reward(args.reward)
        self.baseline = DescriberBaseline(args.describer_baseline)
        # --describer_max_new_tokens is the caption's length; the answer form adds its end token
        # (rollout.describer_budget).
        caption_tokens = describer_budget(adapter, args.describer_max_new_tokens)
        self.caption_sampling = GenerationSettings(
            max_new_tokens=caption_tokens,
            min_new_tokens=args.describer_min_new_tokens,
            do_sample=True,
            top_k=args.describer_top_k,
            top_p=args.describer_top_p,
            temperature=args.describer_temperature,
        )
        self.greedy_captions = GenerationSettings(caption_tokens, args.describer_min_new_tokens)
        self.greedy_boxes = GenerationSettings(args.locator_max_new_tokens, args.locator_min_new_tokens)
        self.stage_clock = StageClock()  # timing/<stage> seconds per step in the logs (the trainer's too)
        self.models: RolloutModels | None = None
        self.vision_cache: VisionCache | None = None
        self.decoding: Decoding | None = None  # how generate calls decode (None: transformers' own loop)
        self.fused_greedy: str | None = None  # whose greedy captions decode in the sampling loop: "policy", "snapshot"

    def attach(self, models: RolloutModels, modules: list[torch.nn.Module]) -> None:
        """The models to run; ``modules`` (policy, snapshot copy) are where the vision cache wraps the tower."""
        self.models = models
        # The frozen vision trunk once per image per rollout (None: family fallback, fix_vit off, or disabled).
        self.vision_cache = VisionCache.for_model(self.adapter, modules) if self.args.vision_cache else None
        self.decoding = choose_decoding(self.args.static_decoding, self.adapter, modules[0], self.args.device,
                                        models.sharded, self.args.decoding_compile_backend)
        self.fused_greedy = self.fused_greedy_for(self.args.fused_decoding)

    def fused_greedy_for(self, mode: str) -> str | None:
        """Whose greedy captions decode in the policy's sampling loop: the policy's own (``policy_greedy``), the LoRA
        snapshot's (another adapter on the same base weights), or none. ``auto`` fuses wherever decoding is static
        (one step at B*K + B rows costs about one at B*K rows when it reads the weights once); on transformers' loop
        the snapshot's greedy captions resume from its scoring pass instead."""
        if mode == "false" or (mode == "auto" and self.decoding is None):
            return None
        if self.baseline is DescriberBaseline.POLICY_GREEDY:
            return "policy"
        if self.baseline is DescriberBaseline.SNAPSHOT_GREEDY and isinstance(self.models.snapshot, AdapterSnapshot):
            return "snapshot"
        if mode == "true":
            raise ArgumentError(
                "--fused_decoding true needs greedy captions that share the policy's weights: --describer_baseline "
                "policy_greedy, or snapshot_greedy with --use_lora (the snapshot is then an adapter)"
            )
        return None

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
    def describe(self, model, images, boxes, settings: GenerationSettings,
                 sampled_rows: Sequence[SampledRows] | None = None, keep_prompts: bool = False
                 ) -> tuple[PromptBatch, Completions]:
        return rollout.describe(model, self.adapter, images, boxes, settings, self.decoding, sampled_rows,
                                keep_prompts)

    def describe_with_greedy(self, model, images, boxes, greedy_images, greedy_boxes,
                             sampled_rows: Sequence[SampledRows] | None, keep_greedy_prompts: bool):
        """The sampled captions and the greedy ones in one loop (``rollout.describe_with_greedy``)."""
        return rollout.describe_with_greedy(model, self.adapter, images, boxes, greedy_images, greedy_boxes,
                                            self.caption_sampling, self.greedy_captions, self.decoding, sampled_rows,
                                            keep_greedy_prompts)

    def generate_captions(self, model, batch: PromptBatch, settings: GenerationSettings, prompt_cache=None):
        """Captions of an already built describer prompt batch, decoding from ``prompt_cache`` if given."""
        return rollout.generate(model, self.adapter, batch, settings, skip_special_tokens=True,
                                prompt_cache=prompt_cache, decoding=self.decoding)

    def locate(self, model, images, captions):
        return rollout.locate(model, self.adapter, images, captions, self.greedy_boxes, decoding=self.decoding)

    def locate_from_prefix(self, model, images, captions, scored: ScoredPrompts, source_rows):
        return rollout.locate_from_prefix(model, self.adapter, images, captions, self.greedy_boxes, scored,
                                          source_rows, self.decoding)

    # ------------------------------------------------------------------ the describer rollout
    def prepare_images(self, inputs):
        return [self.adapter.prepare_image(image) for image in inputs["images"]]  # once per sample per step

    @torch.no_grad()
    def describer_rollout(self, inputs, seed: int | None = None) -> RolloutResult:
        """One micro-batch's describer rollout (``seed``: its sampling noise, else the global generator's)."""
        return self.describer_rollouts([inputs], None if seed is None else [seed])[0]

    @torch.no_grad()
    def describer_rollouts(self, batches: Sequence[dict], seeds: Sequence[int] | None = None) -> list[RolloutResult]:
        """A describer rollout per micro-batch in ``batches``, their generate calls shared (see the module's
        docstring); ``seeds``: each micro-batch's sampling seed (``sampling_seed``)."""
        images = [self.prepare_images(inputs) for inputs in batches]
        boxes = [inputs["boxes"] for inputs in batches]
        k = self.args.num_generations
        sampled = self.sample_captions(images, boxes, seeds)
        # The snapshot scores the samples before it writes its own greedy captions and locates: with K = 1 the
        # greedy decoding starts from the scoring pass's prompt cache, and locating reuses its image prefix (one
        # micro-batch only: a chunk's later calls span several scoring passes).
        scored = [self.score_with_snapshot(part, keep_prompts=len(batches) == 1) for part in sampled]
        greedy = [part.greedy for part in sampled]
        if self.baseline is DescriberBaseline.SNAPSHOT_GREEDY and sampled[0].greedy is None:
            greedy = self.snapshot_greedy_captions(images, boxes, sampled, scored)
        located = self.locate_with_snapshot(images, boxes, [part.sampled for part in sampled], greedy, scored)
        results = []
        for part, score, where in zip(sampled, scored, located):
            reward_N = where.rewards.reward_N
            greedy_reward_B = where.greedy_rewards.reward_N if where.greedy_rewards is not None else None
            baseline_N = describer_baseline(self.baseline, reward_N, k, greedy_reward_B)
            terminal_N = terminal_advantages(reward_N, baseline_N, k, self.args.scale_rewards_by_group_std)
            device = self.args.device
            made = DescriberRollout(
                score.teacher_inputs,
                score.caption_ids_NT,
                score.caption_mask_NT,
                score.snapshot_logp_NT,
                reward_N.to(device),
                baseline_N.to(device),
                terminal_N.to(device),
            )
            metrics = self._describer_metrics(where, baseline_N, score, part.greedy is not None)
            results.append(RolloutResult(made, metrics, part.sampled.texts[::k], where.boxes[::k]))
        return results

    def _sampling_noise(self, sizes: Sequence[int], seeds: Sequence[int] | None):
        """The sampled row blocks of one call over micro-batches of ``sizes`` rows, and the context to sample in."""
        if seeds is None:
            return None, nullcontext()
        if len(sizes) == 1:  # alone: the global generator (transformers' generate and a CUDA graph take it as is)
            return None, seeded_global_rng(seeds[0], self.args.device)
        blocks = []
        for (start, end), seed in zip(_offsets(sizes), seeds):
            generator = torch.Generator(device=self.args.device).manual_seed(seed)
            blocks.append(SampledRows(start, end, generator))
        return blocks, nullcontext()

    def sample_captions(self, images: list[list], boxes: list[torch.Tensor], seeds=None) -> list[SampledCaptions]:
        """K sampled captions per box from the policy, and the greedy captions written with the policy's weights:
        the policy's own (``policy_greedy``), or the LoRA snapshot's where fused. Per micro-batch of ``images`` and
        ``boxes``, from one call over all of them."""
        k = self.args.num_generations
        rows_images = [image for part in images for image in part for _ in range(k)]
        rows_boxes = [box for part in boxes for box in part.tolist() for _ in range(k)]
        all_images, all_boxes = _concat(images), _concat([part.tolist() for part in boxes])
        sample_spans = _offsets([len(part) * k for part in images])
        box_spans = _offsets([len(part) for part in images])
        blocks, noise = self._sampling_noise([end - start for start, end in sample_spans], seeds)
        greedy = None
        with self.models.policy() as policy, noise:
            if self.fused_greedy is not None:
                # One loop: the sampled rows with the policy, then the greedy rows (the snapshot's adapter on its
                # rows, or the policy's own weights).
                n = len(rows_images)
                mixing = nullcontext()
                if self.fused_greedy == "snapshot":
                    mixing = row_adapters(policy, [(POLICY_ADAPTER, 0, n), (SNAPSHOT_ADAPTER, n, n + len(all_images))])
                # The snapshot's greedy rows prefill the very prompts its scoring pass reads next (one sample per
                # box, one micro-batch): that pass starts from their cache and reads only the captions.
                keep = (self.fused_greedy == "snapshot" and k == 1 and len(images) == 1
                        and self.args.snapshot_prompt_cache)
                with mixing, self.stage_clock.stage("policy_sampling"):
                    batch, sampled, greedy = self.describe_with_greedy(policy, rows_images, rows_boxes, all_images,
                                                                       all_boxes, blocks, keep_greedy_prompts=keep)
            else:
                with self.stage_clock.stage("policy_sampling"):
                    batch, sampled = self.describe(policy, rows_images, rows_boxes, self.caption_sampling, blocks)
                if self.baseline is DescriberBaseline.POLICY_GREEDY:
                    with self.stage_clock.stage("policy_greedy"):
                        _, greedy = self.describe(policy, all_images, all_boxes, self.greedy_captions)
        if len(images) == 1:
            return [SampledCaptions(batch, sampled, greedy)]
        parts = []
        for (start, end), (first, last), part_images, part_boxes in zip(sample_spans, box_spans, images, boxes):
            # Each micro-batch's own prompt batch: its padding is that of a rollout of it alone.
            prompts = [self.adapter.describer_prompt(box, image)
                       for box, image in zip(rows_boxes[start:end], rows_images[start:end])]
            part_batch = self.adapter.build_batch(prompts, rows_images[start:end])
            parts.append(SampledCaptions(part_batch, sampled.rows(start, end),
                                         greedy.rows(first, last) if greedy is not None else None))
        return parts

    def score_with_snapshot(self, sampled: SampledCaptions, keep_prompts: bool) -> ScoredCaptions:
        """Teacher-forced inputs of prompt + sampled caption and the snapshot's log-probs of the caption.

        With ``--snapshot_prompt_cache`` (and ``keep_prompts``) the pass also keeps its key/value cache of the prompts
        (all but their last column) where something can resume from it: the greedy captions with the paper's
        baseline and K = 1 (the samples' prompts are the boxes'), in a family that allows it, unless fused decoding
        wrote them already; the locator prompts where the family moves cached columns (``sc_tune.prompt_cache``).
        Where fused decoding wrote the snapshot's greedy captions and kept their prompts' cache
        (``sample_captions``), the pass starts from it and reads only the captions."""
        batch, completions = sampled.batch, sampled.sampled
        device = self.args.device
        teacher = self.adapter.append_completion(batch, completions.ids_BT.cpu(), completions.mask_BT.cpu())
        teacher_inputs = {k: v.to(device) for k, v in teacher.items()}
        caption_ids_NT, caption_mask_NT = completions.ids_BT.to(device), completions.mask_BT.to(device)
        prompt_length, scored_length = batch.inputs["input_ids"].shape[1], teacher_inputs["input_ids"].shape[1]
        keep = self.args.snapshot_prompt_cache and keep_prompts
        fused_cache = sampled.greedy.prompt_cache if sampled.greedy is not None else None
        if fused_cache is not None and fused_cache.get_seq_length() != prompt_length - 1:
            raise ValueError(f"score_with_snapshot: the fused loop kept {fused_cache.get_seq_length()} prompt columns; "
                             f"the sampled captions' prompts have {prompt_length - 1} before their last")
        with self.models.snapshot.scoring() as snapshot, self.stage_clock.stage("snapshot_scoring"):
            model = self.models.unwrap(snapshot)
            # Every teacher-forced pass over these rows (this one, and the policy's in the update: rollout.inputs)
            # reads them at the positions generate sampled them at. A 1-D rotary family's generate counts unpadded
            # tokens and a plain forward counts columns: equal in exact arithmetic, not in bf16, so the snapshot's
            # log-probs, the policy's and any cache kept here would otherwise drift apart by the row's padding.
            teacher_inputs = scoring_inputs(model, self.adapter, teacher_inputs)
            greedy_resumes = (
                keep
                and self.baseline is DescriberBaseline.SNAPSHOT_GREEDY
                and sampled.greedy is None
                and self.args.num_generations == 1
                and self.adapter.resumes_from_scoring_cache(model, prompt_length, scored_length)
            )
            locating_resumes = keep and self.adapter.moves_cached_prompt_columns(model, scored_length)
            inputs = teacher_inputs
            if fused_cache is not None:
                inputs = uncached_inputs(model, self.adapter, teacher_inputs, batch.images, prompt_length - 1)
            scores = caption_logprobs(snapshot, inputs, caption_ids_NT, self.args.describer_temperature,
                                      keep_cache=greedy_resumes or locating_resumes, prompt_cache=fused_cache)
        prompts = None
        if scores.cache is not None:  # None also where the model keeps no cache (checkpointing in training mode)
            prompts = ScoredPrompts(batch, keep_prompt_columns(scores.cache, prompt_length), prompt_length - 1)
        return ScoredCaptions(teacher_inputs, caption_ids_NT, caption_mask_NT, scores.logp_NT, prompts,
                              greedy_resumes and prompts is not None, fused_cache is not None)

    def snapshot_greedy_captions(self, images: list[list], boxes: list[torch.Tensor], sampled: list[SampledCaptions],
                                 scored: list[ScoredCaptions]) -> list[Completions]:
        """The snapshot's greedy caption per box (the paper's baseline), per micro-batch, from one call."""
        with self.models.snapshot.generating() as snapshot, self.stage_clock.stage("snapshot_generation"):
            if len(images) == 1 and self.args.num_generations == 1:
                # One sample per box: the samples' prompts are the boxes' prompts (and the scoring pass cached them).
                cache = scored[0].prompts.cache if scored[0].greedy_resumes else None
                return [self.generate_captions(snapshot, sampled[0].batch, self.greedy_captions, prompt_cache=cache)]
            _, greedy = self.describe(snapshot, _concat(images), _concat([part.tolist() for part in boxes]),
                                      self.greedy_captions)
        return [greedy.rows(start, end) for start, end in _offsets([len(part) for part in images])]

    def locate_with_snapshot(self, images: list[list], boxes: list[torch.Tensor], sampled: list[Completions],
                             greedy: list[Completions | None], scored: list[ScoredCaptions]) -> list[LocatedCaptions]:
        """The snapshot locates every sampled caption and the greedy ones in one batched call; all are scored, each
        against the true box its caption was written for. With the scoring pass's cache (one micro-batch) the
        locator prompts resume from their image prefix. Per micro-batch: its sampled captions' rows, then its
        greedy captions'."""
        k = self.args.num_generations
        texts, located_images, source_rows, sizes = [], [], [], []
        for part_images, part_sampled, part_greedy in zip(images, sampled, greedy):
            texts += part_sampled.texts
            located_images += [image for image in part_images for _ in range(k)]
            source_rows += list(range(len(part_images) * k))  # the describer prompt batch row of each caption
            if part_greedy is not None:
                texts += part_greedy.texts
                located_images += list(part_images)
                source_rows += [i * k for i in range(len(part_images))]
            sizes.append(len(part_sampled.texts) + (len(part_greedy.texts) if part_greedy is not None else 0))
        with self.models.snapshot.generating() as snapshot, self.stage_clock.stage("locating"):
            found = None
            if len(images) == 1 and scored[0].prompts is not None:
                found = self.locate_from_prefix(snapshot, located_images, texts, scored[0].prompts, source_rows)
            located, _ = found or self.locate(snapshot, located_images, texts)
        results = []
        for (start, _), part_boxes_B4, part_sampled, part_greedy in zip(_offsets(sizes), boxes, sampled, greedy):
            n = len(part_sampled.texts)
            rewards = self.reward_fn(located[start : start + n], part_boxes_B4.repeat_interleave(k, dim=0),
                                     part_sampled.texts)
            greedy_rewards = None
            if part_greedy is not None:
                greedy_rewards = self.reward_fn(located[start + n : start + n + len(part_greedy.texts)], part_boxes_B4,
                                                part_greedy.texts)
            results.append(LocatedCaptions(rewards, greedy_rewards, located[start : start + n], found is not None))
        return results

    def _describer_metrics(self, located: LocatedCaptions, baseline_N, scored: ScoredCaptions, fused: bool) -> dict:
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
        # 1: the scoring pass read only the captions, from the fused loop's cache of the snapshot's prompts
        values["scoring_prompt_cache"] = float(scored.from_fused_prompts)
        # 1: the greedy captions decoded in the policy's sampling loop (--fused_decoding)
        values["fused_decoding"] = float(fused and self.fused_greedy is not None)
        return values

    # ------------------------------------------------------------------ before step 0
    @torch.no_grad()
    def preflight(self, dataset, samples: int) -> PreflightReport:
        """The step-0 cycle (and REC on the records' captions or categories, where every one has one) on ``samples``
        training samples spread over the data, with the policy: does the locator's answer parse? (``sc_tune.preflight``)"""
        indices = spread_indices(len(dataset), samples)
        items = [dataset[i] for i in indices]
        records = getattr(dataset, "records", None)
        captions = [referring_text(records[i]) for i in indices] if records is not None else None
        with self.models.policy() as policy:
            return run_preflight(
                policy, self.adapter, self.prepare_images({"images": [it["image"] for it in items]}),
                [list(it["bbox"]) for it in items], captions if captions and all(captions) else None,
                self.greedy_captions, self.greedy_boxes,
            )

    # ------------------------------------------------------------------ the locator rollout
    @torch.no_grad()
    def locator_rollout(self, inputs) -> RolloutResult:
        return self.locator_rollouts([inputs])[0]

    @torch.no_grad()
    def locator_rollouts(self, batches: Sequence[dict], seeds=None) -> list[RolloutResult]:
        """Pseudo-labels: the snapshot's greedy caption of each box, paired with the true box; per micro-batch in
        ``batches``, the captions from one call (greedy: ``seeds`` are not used)."""
        images = [self.prepare_images(inputs) for inputs in batches]
        boxes = [inputs["boxes"].tolist() for inputs in batches]
        min_iou = self.args.pseudo_label_min_iou
        from_prefix = False
        with self.models.snapshot.generating() as snapshot:
            with self.stage_clock.stage("snapshot_generation"):
                # With the filter, the captions' own prompts keep their cache: locating starts from its image prefix.
                batch, all_captions = self.describe(snapshot, _concat(images), _concat(boxes), self.greedy_captions,
                                                    keep_prompts=min_iou > 0 and self.args.snapshot_prompt_cache)
            if min_iou > 0:
                with self.stage_clock.stage("pseudo_label_locating"):
                    found = None
                    if all_captions.prompt_cache is not None:
                        scored = ScoredPrompts(batch, all_captions.prompt_cache, batch.inputs["input_ids"].shape[1] - 1)
                        found = self.locate_from_prefix(snapshot, _concat(images), all_captions.texts, scored,
                                                        list(range(len(all_captions.texts))))
                    from_prefix = found is not None
                    found, _ = found or self.locate(snapshot, _concat(images), all_captions.texts)
                # IoU whatever --reward is (a parse failure: 0, left out)
                agreement_N = cycle_iou(found, torch.tensor(_concat(boxes), dtype=torch.float32)).reward_N
        results = []
        device = self.args.device
        for (start, end), part_images, part_boxes in zip(_offsets([len(part) for part in images]), images, boxes):
            captions = all_captions.rows(start, end)
            # The pseudo-label: the snapshot's greedy caption and the TRUE box, in the family's answer form.
            targets = [self.adapter.locator_target(b, im, c)
                       for b, im, c in zip(part_boxes, part_images, captions.texts)]
            pseudo = self.adapter.build_batch(
                [self.adapter.locator_prompt(c, im) for c, im in zip(captions.texts, part_images)], part_images, targets
            )
            labels = pseudo.labels
            target_len = int((labels != -100).sum(1).max())  # of every row, kept or not: the loss's span
            metrics = {"caption_tokens": captions.mask_BT.float().sum(1).mean().cpu()}
            if min_iou > 0:
                kept_B = agreement_N[start:end] >= min_iou
                labels = labels.masked_fill(~kept_B[:, None], -100)  # a left-out row adds no loss
                metrics["pseudo_labels_kept"] = kept_B.float().mean()
                # 1: the snapshot located its captions from their prompts' image prefix (--snapshot_prompt_cache)
                metrics["pseudo_label_prefix_cache"] = float(from_prefix)
            made = LocatorRollout({k: v.to(device) for k, v in pseudo.inputs.items()}, labels.to(device), target_len)
            results.append(RolloutResult(made, metrics))
        return results

    def rollouts(self, describer: bool, batches: Sequence[dict], seeds: Sequence[int] | None = None):
        """The rollouts of ``batches`` (micro-batches rolled out together) in a describer or a locator step."""
        if describer:
            return self.describer_rollouts(batches, seeds)
        return self.locator_rollouts(batches, seeds)
