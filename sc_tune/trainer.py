"""SCTuneTrainer: the describer -> locator cycle on ``transformers.Trainer``, in TRL's GRPOTrainer pattern.

Each Trainer step is one optimizer step, through the Trainer's own loop (clipping, DeepSpeed, logging and
checkpointing stay upstream). What this class adds:

- ``_prepare_inputs`` turns a batch of (image, box) into a *rollout* and buffers it. A describer rollout is
  reused for ``ppo_epochs`` consecutive steps (``RolloutSampler`` hands the same batch back); a locator
  rollout serves one step. The phase of a step comes from ``PhaseSchedule``, a pure function of the step.
- A describer rollout runs in named stages: ``_sample_captions`` (the policy's K samples per box, through
  ``rollout.describe``, and its greedy caption if the baseline is the policy's), ``_score_with_snapshot`` (the
  snapshot's log-probs for the KL term), ``_snapshot_greedy_captions`` (the paper's baseline caption, decoded
  from the scoring pass's prompt cache where the family allows it), ``_locate_with_snapshot`` (one batched
  ``rollout.locate`` call, started from the image prefix that pass cached where the family allows it, see
  ``sc_tune.prompt_cache``; scored by the reward function of ``sc_tune.rewards``), then the baseline and
  terminal advantage (``sc_tune.baselines``).
- ``compute_loss`` dispatches on the rollout's type: the clipped PPO loss for the describer, the
  cross-entropy on the pseudo-label box for the locator.
- ``training_step`` can skip an update for real (no backward, so no optimizer step, no Adam moment
  decay, no weight decay) when the ratio guard or the policy-KL early stop fires; the reference zeroed
  the loss and still stepped. The decision (``rollout.skip_update``) is taken on values averaged over ranks,
  so every rank agrees.
- At a phase switch ``_begin_step`` resets the Adam moments and re-syncs the snapshot (see
  ``sc_tune.phases``); checkpoints also store the snapshot and, mid-rollout, the buffered rollout, so a
  resumed run continues exactly.
"""

from __future__ import annotations

import functools
import logging
import os
from collections import defaultdict
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from accelerate.utils import DistributedType, broadcast_object_list
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl.models.utils import unwrap_model_for_generation
from trl.trainer.utils import selective_log_softmax

from sc_tune import checkpoints
from sc_tune.adapters.base import ModelAdapter, PromptBatch
from sc_tune.baselines import DescriberBaseline, describer_baseline, terminal_advantages
from sc_tune.data import RolloutSampler, collate_referring
from sc_tune.export import carry_source_files
from sc_tune.jsonio import write_json
from sc_tune.kl_control import make_kl_controller
from sc_tune.moe import router_aux_coefficient
from sc_tune.preflight import PreflightError, run_preflight
from sc_tune.phases import Phase, PhaseLR, PhaseSchedule, reset_optimizer_moments, set_learning_rate
from sc_tune.ppo import describer_advantages, masked_mean, per_token_kl, ppo_clip_loss
from sc_tune.prompt_cache import ScoredPrompts, keep_prompt_columns
from sc_tune.rewards import RewardBatch, RewardFunction, get_reward
from sc_tune.arguments import ArgumentError
from sc_tune.decoding import choose_decoding
from sc_tune.rollout import (
    Completions,
    GenerationSettings,
    describe,
    describe_with_greedy,
    generate,
    locate,
    locate_from_prefix,
)
from sc_tune.snapshot import (
    POLICY_ADAPTER,
    SNAPSHOT_ADAPTER,
    AdapterSnapshot,
    FullSnapshot,
    eval_mode,
    row_adapters,
)
from sc_tune.timing import StageClock, timed_stage
from sc_tune.vision_cache import VisionCache

logger = logging.getLogger(__name__)


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
    inputs: dict[str, torch.Tensor]  # locator prompt (snapshot's caption) + ground-truth box
    labels: torch.Tensor  # -100 except on the box tokens and the end token
    target_len: int
    skip_update: bool = False  # never set: every locator step updates


@dataclass
class SampledCaptions:
    """The rollout's first stage: the policy's K samples per box and, if the baseline needs one, a greedy caption."""

    batch: PromptBatch  # describer prompts, each box repeated K times
    sampled: Completions  # N = B x K rows
    greedy: Completions | None  # B rows: the snapshot's or the policy's greedy caption


class SCTuneTrainer(Trainer):
    def __init__(
        self,
        model,
        args,
        adapter: ModelAdapter,
        train_dataset,
        callbacks=None,
        reward_fn: RewardFunction | None = None,
        source_dir: str | None = None,
    ):
        super().__init__(
            model=model, args=args, train_dataset=train_dataset, data_collator=collate_referring, callbacks=callbacks
        )
        self.adapter = adapter
        self.source_dir = source_dir  # the input checkpoint: its processor files go into every saved folder
        self.schedule = PhaseSchedule.from_args(args)
        self.reward_fn = reward_fn if reward_fn is not None else get_reward(args.reward)
        self.baseline = DescriberBaseline(args.describer_baseline)
        self.kl_controller = make_kl_controller(args)
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
        if _is_peft(model):
            self.snapshot = AdapterSnapshot(self)
        else:
            self.snapshot = FullSnapshot(
                model, self.accelerator, self.is_deepspeed_enabled and _zero3(self), self.args.device
            )
        # How rollouts decode (sc_tune.decoding; None: transformers' generate), and which greedy captions decode in
        # the policy's sampling loop (None, "policy" or "snapshot").
        sharded = self.is_deepspeed_enabled and _zero3(self)
        self.decoding = choose_decoding(args.static_decoding, adapter, model, args.device, sharded)
        self.fused_greedy = self._fused_greedy(args.fused_decoding)
        # MoE under full fine-tuning: the router's load-balancing term joins every loss (sc_tune.moe).
        self.router_aux_coef = router_aux_coefficient(
            model, args.moe_aux_loss, args.moe_aux_loss_coef, lora=_is_peft(model)
        )
        self._rollouts: dict[int, DescriberRollout | LocatorRollout] = {}
        # The frozen vision trunk once per image per rollout (None: family fallback, fix_vit off, or disabled).
        snapshot_model = getattr(self.snapshot, "module", model)
        self.vision_cache = VisionCache.for_model(adapter, [model, snapshot_model]) if args.vision_cache else None
        self.stage_clock = StageClock()  # timing/<stage> seconds per step in the logs
        self._step_begun = -1
        self._micro = 0
        self._grads_pending = False
        self._metrics: dict[str, list[float]] = defaultdict(list)
        self._phases: list[str] = []  # phase name of each step since the last log
        self._resume_dir: str | None = None

    def _fused_greedy(self, mode: str) -> str | None:
        """Whose greedy captions decode in the policy's sampling loop: the policy's own (``policy_greedy``), the LoRA
        snapshot's (another adapter on the same base weights, ``sc_tune.snapshot.row_adapters``), or none. ``auto``
        fuses wherever decoding is static (one step at B·K + B rows costs about one at B·K rows when it reads the
        weights once); on transformers' loop the snapshot's greedy captions resume from its scoring pass instead."""
        if mode == "false" or (mode == "auto" and self.decoding is None):
            return None
        if self.baseline is DescriberBaseline.POLICY_GREEDY:
            return "policy"
        if self.baseline is DescriberBaseline.SNAPSHOT_GREEDY and isinstance(self.snapshot, AdapterSnapshot):
            return "snapshot"
        if mode == "true":
            raise ArgumentError(
                "--fused_decoding true needs greedy captions that share the policy's weights: --describer_baseline "
                "policy_greedy, or snapshot_greedy with --use_lora (the snapshot is then an adapter)"
            )
        return None

    # ------------------------------------------------------------------ data and schedule plumbing
    def _get_train_sampler(self, train_dataset=None):
        step_batch = self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps
        return RolloutSampler(len(self.train_dataset), step_batch * self.args.world_size, self.schedule, self.args.seed)

    def create_scheduler(self, num_training_steps, optimizer=None):
        if self.lr_scheduler is None:
            # Schedulers are stepped at the end of a step, before global_step moves on: report the next step's LR.
            self.lr_scheduler = PhaseLR(
                optimizer or self.optimizer, lambda: self.schedule.lr_at(self.state.global_step + 1)
            )
        return self.lr_scheduler

    def floating_point_ops(self, inputs):
        return 0  # batches are PIL images and boxes; the Trainer's token-based estimate does not apply

    def _begin_step(self, step: int) -> None:
        """Once per optimizer step, before its first micro-batch."""
        if self._resume_dir is not None:
            self._restore_sc_state(self._resume_dir, step)
            self._resume_dir = None
        elif step == 0 and not self.args.skip_preflight:
            self._preflight()
        position = self.schedule.at(step)
        if position.starts_phase:
            # Also at step 0 and when resuming exactly at a switch; mid-phase resumes load the snapshot instead.
            reset_optimizer_moments(self.optimizer)
            self.snapshot.sync_from_policy()
        set_learning_rate(self.optimizer, self.schedule.lr_at(step))
        if position.needs_rollout:
            self._rollouts = {}
        if self.vision_cache is not None and (position.needs_rollout or position.starts_phase):
            # New images, or new snapshot weights: the memo of the snapshot's frozen tower is stale.
            self.vision_cache.clear()
        self._micro = 0
        self._grads_pending = False

    def _preflight(self) -> None:
        """Before step 0: stop the run if the locator's answers do not parse (``sc_tune.preflight``)."""
        dataset = self.train_dataset
        count = min(self.args.preflight_samples, len(dataset))
        items = [dataset[i] for i in range(count)]
        records = getattr(dataset, "records", None)
        captions = [r.get("caption") for r in records[:count]] if records is not None else None
        with self._policy_for_generation() as policy:
            report = run_preflight(
                policy, self.adapter, self._prepare_images({"images": [it["image"] for it in items]}),
                [list(it["bbox"]) for it in items], captions if captions and all(captions) else None,
                self.greedy_captions, self.greedy_boxes,
            )
        if self.is_world_process_zero():
            logger.info(report.summary())
            print(report.summary(), flush=True)
        failure = report.failure(self.args.preflight_max_parse_failures)
        if failure is not None:  # every rank decided the same: the same samples, greedy decoding
            raise PreflightError(failure)

    def _prepare_inputs(self, inputs):
        step = self.state.global_step
        if step != self._step_begun:
            self._begin_step(step)
            self._step_begun = step
        else:
            self._micro += 1
        position = self.schedule.at(step)
        if position.needs_rollout:
            make = self._describer_rollout if position.phase is Phase.DESCRIBER else self._locator_rollout
            self._rollouts[self._micro] = make(inputs)
        if self._micro == 0:
            self._phases.append(position.phase.value)
        return self._rollouts[self._micro]

    # ------------------------------------------------------------------ rollouts
    @contextmanager
    def _policy_for_generation(self):
        with unwrap_model_for_generation(
            self.model_wrapped, self.accelerator, gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs
        ) as m, eval_mode(m):
            yield m

    def _prepare_images(self, inputs):
        return [self.adapter.prepare_image(image) for image in inputs["images"]]  # once per sample per step

    @torch.no_grad()
    def _describer_rollout(self, inputs) -> DescriberRollout:
        images = self._prepare_images(inputs)
        boxes_B4 = inputs["boxes"]
        batch, sampled, greedy = self._sample_captions(images, boxes_B4)
        # The snapshot scores the samples before it writes its own greedy captions and locates: with K = 1 the
        # greedy decoding starts from the scoring pass's prompt cache, and locating reuses its image prefix.
        # (Fused decoding wrote the snapshot's greedy captions with the samples already.)
        greedy_pending = self.baseline is DescriberBaseline.SNAPSHOT_GREEDY and greedy is None
        teacher_inputs, caption_ids_NT, caption_mask_NT, snapshot_logp_NT, scored, greedy_resumes = (
            self._score_with_snapshot(batch, sampled, greedy_pending)
        )
        if greedy_pending:
            greedy = self._snapshot_greedy_captions(images, boxes_B4, batch, scored if greedy_resumes else None)
        captions = SampledCaptions(batch, sampled, greedy)
        rewards, greedy_rewards, located, located_from_prefix = self._locate_with_snapshot(
            images, boxes_B4, captions, scored
        )
        k = self.args.num_generations
        baseline_N = describer_baseline(
            self.baseline, rewards.reward_N, k, greedy_rewards.reward_N if greedy_rewards is not None else None
        )
        terminal_N = terminal_advantages(rewards.reward_N, baseline_N, k, self.args.scale_rewards_by_group_std)
        self._log_rollout(rewards, greedy_rewards, baseline_N, caption_mask_NT, greedy_resumes, located_from_prefix)
        self._maybe_save_rollout_picture(inputs, captions.sampled.texts[::k], located[::k])
        device = self.args.device
        return DescriberRollout(
            teacher_inputs,
            caption_ids_NT,
            caption_mask_NT,
            snapshot_logp_NT,
            rewards.reward_N.to(device),
            baseline_N.to(device),
            terminal_N.to(device),
        )

    def _sample_captions(self, images, boxes_B4) -> tuple[PromptBatch, Completions, Completions | None]:
        """K sampled captions per box from the policy (one generate call), and its greedy caption if the
        baseline is the policy's. Returns (prompt batch, samples, policy greedy captions or None)."""
        k = self.args.num_generations
        rows_images = [image for image in images for _ in range(k)]
        rows_boxes = [box for box in boxes_B4.tolist() for _ in range(k)]
        greedy = None
        with self._policy_for_generation() as policy:
            if self.fused_greedy is not None:
                # One loop: rows 0..N sample with the policy, rows N..N+B decode the greedy captions (the snapshot's
                # adapter on its rows, or the policy's own weights).
                n = len(rows_images)
                blocks = [(POLICY_ADAPTER, 0, n), (SNAPSHOT_ADAPTER, n, n + len(images))]
                mixing = row_adapters(policy, blocks) if self.fused_greedy == "snapshot" else nullcontext()
                with mixing, self.stage_clock.stage("policy_sampling"):
                    batch, sampled, greedy = describe_with_greedy(
                        policy, self.adapter, rows_images, rows_boxes, images, boxes_B4.tolist(),
                        self.caption_sampling, self.greedy_captions, self.decoding,
                    )
                return batch, sampled, greedy
            with self.stage_clock.stage("policy_sampling"):
                batch, sampled = describe(policy, self.adapter, rows_images, rows_boxes, self.caption_sampling,
                                          self.decoding)
            if self.baseline is DescriberBaseline.POLICY_GREEDY:
                with self.stage_clock.stage("policy_greedy"):
                    _, greedy = describe(policy, self.adapter, images, boxes_B4.tolist(), self.greedy_captions,
                                         self.decoding)
        return batch, sampled, greedy

    def _snapshot_greedy_captions(self, images, boxes_B4, batch: PromptBatch, scored: ScoredPrompts | None):
        """The snapshot's greedy caption per box (the paper's baseline); ``batch`` is the samples' prompt batch,
        ``scored`` the scoring pass's cache of it (``None``: prefill the prompts again)."""
        with self.snapshot.generating() as snapshot, self.stage_clock.stage("snapshot_generation"):
            if self.args.num_generations == 1:  # one sample per box: the samples' prompts are the boxes' prompts
                return generate(
                    snapshot, self.adapter, batch, self.greedy_captions, skip_special_tokens=True,
                    prompt_cache=scored.cache if scored is not None else None, decoding=self.decoding,
                )
            return describe(snapshot, self.adapter, images, boxes_B4.tolist(), self.greedy_captions, self.decoding)[1]

    def _locate_with_snapshot(self, images, boxes_B4, captions: SampledCaptions, scored: ScoredPrompts | None):
        """The snapshot locates every sampled caption and the greedy one in one batched call; all are scored.
        With ``scored`` (its cache of the describer prompts) the locator prompts resume from their image prefix.

        Returns (sampled captions' RewardBatch, greedy caption's RewardBatch or None, sampled boxes, whether the
        prefix was reused)."""
        k = self.args.num_generations
        rows_images = [image for image in images for _ in range(k)]
        texts = list(captions.sampled.texts)
        located_images = list(rows_images)
        source_rows = list(range(len(rows_images)))  # the describer prompt batch row of each located caption
        if captions.greedy is not None:
            texts += captions.greedy.texts
            located_images += list(images)
            source_rows += [i * k for i in range(len(images))]
        with self.snapshot.generating() as snapshot, self.stage_clock.stage("locating"):
            found = None
            if scored is not None:
                found = locate_from_prefix(snapshot, self.adapter, located_images, texts, self.greedy_boxes, scored,
                                           source_rows, self.decoding)
            located, _ = found or locate(snapshot, self.adapter, located_images, texts, self.greedy_boxes,
                                         decoding=self.decoding)
        n = len(rows_images)
        rewards = self.reward_fn(located[:n], boxes_B4.repeat_interleave(k, dim=0), captions.sampled.texts)
        greedy_rewards = None
        if captions.greedy is not None:
            greedy_rewards = self.reward_fn(located[n:], boxes_B4, captions.greedy.texts)
        return rewards, greedy_rewards, located[:n], found is not None

    def _score_with_snapshot(self, batch: PromptBatch, sampled: Completions, greedy_pending: bool = True):
        """Teacher-forced inputs of prompt + sampled caption and the snapshot's log-probs of the caption.

        With ``--snapshot_prompt_cache`` it also returns the pass's key/value cache of the prompts (all but their
        last column) where something can resume from it, else ``None``, and whether the greedy captions can:
        the paper's baseline with K = 1 (the samples' prompts are the boxes'), in a family that allows it, unless
        they are decoded already (``greedy_pending`` False: fused decoding). The
        locator prompts can where the family moves cached columns (``sc_tune.prompt_cache``)."""
        device = self.args.device
        teacher = self.adapter.append_completion(batch, sampled.ids_BT.cpu(), sampled.mask_BT.cpu())
        teacher_inputs = {k: v.to(device) for k, v in teacher.items()}
        caption_ids_NT, caption_mask_NT = sampled.ids_BT.to(device), sampled.mask_BT.to(device)
        prompt_length, scored_length = batch.inputs["input_ids"].shape[1], teacher_inputs["input_ids"].shape[1]
        with self.snapshot.scoring() as snapshot, self.stage_clock.stage("snapshot_scoring"):
            model = self.accelerator.unwrap_model(snapshot)
            greedy_resumes = (
                self.args.snapshot_prompt_cache
                and greedy_pending
                and self.baseline is DescriberBaseline.SNAPSHOT_GREEDY
                and self.args.num_generations == 1
                and self.adapter.resumes_from_scoring_cache(model, prompt_length, scored_length)
            )
            locating_resumes = self.args.snapshot_prompt_cache and self.adapter.moves_cached_prompt_columns(
                model, scored_length
            )
            snapshot_logp_NT, cache = self._caption_logprobs(
                snapshot, teacher_inputs, caption_ids_NT, keep_cache=greedy_resumes or locating_resumes
            )
        scored = None
        if cache is not None:  # None also where the model keeps no cache (checkpointing in training mode)
            scored = ScoredPrompts(batch, keep_prompt_columns(cache, prompt_length), prompt_length - 1)
        greedy_resumes = greedy_resumes and scored is not None
        return teacher_inputs, caption_ids_NT, caption_mask_NT, snapshot_logp_NT, scored, greedy_resumes

    def _log_rollout(
        self, rewards: RewardBatch, greedy_rewards: RewardBatch | None, baseline_N, caption_mask_NT,
        used_prompt_cache: bool, located_from_prefix: bool,
    ):
        reward_N = rewards.reward_N
        values = {
            "reward": reward_N.mean(),
            "baseline": baseline_N.mean(),
            "parse_failure": (~rewards.parsed_N).float().mean(),
            "caption_tokens": caption_mask_NT.float().sum(1).mean().cpu(),
            "nonzero_advantage": ((reward_N - baseline_N).abs() > 1e-6).float().mean(),
        }
        if greedy_rewards is not None:
            values["greedy_reward"] = greedy_rewards.reward_N.mean()
            values["greedy_parse_failure"] = (~greedy_rewards.parsed_N).float().mean()
        if self.baseline is DescriberBaseline.SNAPSHOT_GREEDY:
            # 1: the snapshot's greedy captions were decoded from its scoring pass's cache (--snapshot_prompt_cache)
            values["prompt_cache"] = float(used_prompt_cache)
        # 1: the locator prompts resumed from the image prefix the scoring pass cached (--snapshot_prompt_cache)
        values["locating_prefix_cache"] = float(located_from_prefix)
        # 1: the greedy captions decoded in the policy's sampling loop (--fused_decoding)
        values["fused_decoding"] = float(self.fused_greedy is not None and greedy_rewards is not None)
        self._log_mean_over_ranks("describer", values)

    @torch.no_grad()
    def _locator_rollout(self, inputs) -> LocatorRollout:
        images = self._prepare_images(inputs)
        boxes = inputs["boxes"].tolist()
        with self.snapshot.generating() as snapshot, self.stage_clock.stage("snapshot_generation"):
            _, captions = describe(snapshot, self.adapter, images, boxes, self.greedy_captions, self.decoding)
        # The pseudo-label: the snapshot's greedy caption and the TRUE box, in the family's answer form.
        targets = [self.adapter.locator_target(b, im, c) for b, im, c in zip(boxes, images, captions.texts)]
        pseudo = self.adapter.build_batch(
            [self.adapter.locator_prompt(c, im) for c, im in zip(captions.texts, images)], images, targets
        )
        device = self.args.device
        self._log_mean_over_ranks("locator", {"caption_tokens": captions.mask_BT.float().sum(1).mean().cpu()})
        target_len = int((pseudo.labels != -100).sum(1).max())
        return LocatorRollout({k: v.to(device) for k, v in pseudo.inputs.items()}, pseudo.labels.to(device), target_len)

    def _trained_forward(self, model, **kwargs):
        """A forward whose loss updates the weights: with a router load-balancing term it also returns the router
        logits, and the term joins the loss (``_with_router_aux``)."""
        if self.router_aux_coef:
            outputs = model(**kwargs, output_router_logits=True)
            self._router_aux = outputs.aux_loss
            return outputs
        return model(**kwargs)

    def _with_router_aux(self, loss):
        aux, self._router_aux = getattr(self, "_router_aux", None), None
        if aux is None:
            return loss
        self._log_mean_over_ranks("moe", {"aux_loss": aux.detach()})
        return loss + self.router_aux_coef * aux

    def _caption_logprobs(self, model, inputs, caption_ids_BT, keep_cache: bool = False, trained: bool = False):
        """(log p(caption token | prefix), key/value cache or ``None``), from logits of the last T+1 positions only.

        The cache is kept only if asked, and only where the model keeps one (not under checkpointing in training).
        ``trained``: the loss's own forward (``_trained_forward``)."""
        num_tokens = caption_ids_BT.shape[1]
        forward = functools.partial(self._trained_forward, model) if trained else model
        outputs = forward(**inputs, logits_to_keep=num_tokens + 1, use_cache=keep_cache)
        logp_BT = selective_log_softmax(outputs.logits[:, :-1] / self.args.describer_temperature, caption_ids_BT)
        return logp_BT, outputs.cache if keep_cache else None

    # ------------------------------------------------------------------ losses
    @timed_stage("forward")
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if isinstance(inputs, DescriberRollout):
            return self._with_router_aux(self._describer_loss(model, inputs))
        return self._with_router_aux(self._locator_loss(model, inputs))

    def _describer_loss(self, model, rollout: DescriberRollout):
        args = self.args
        logp_NT, _ = self._caption_logprobs(model, rollout.inputs, rollout.caption_ids_NT, trained=True)
        mask_NT = rollout.caption_mask_NT
        first_epoch = rollout.old_logp_NT is None
        if first_epoch:
            # Before any update on this rollout the current weights *are* the pre-update policy, so its
            # log-probs come from this forward: no separate no-grad pass.
            rollout.old_logp_NT = logp_NT.detach()
            self._set_advantages(rollout)
        loss, stats = ppo_clip_loss(logp_NT, rollout.old_logp_NT, rollout.advantages_NT, mask_NT, args.clip_range)
        ratio, policy_kl = self.accelerator.reduce(
            torch.stack([stats.ratio, stats.policy_kl]).detach(), "mean"
        ).tolist()
        if not first_epoch and policy_kl > args.policy_kl_stop:
            rollout.stopped = True
        # Reduced over ranks above, so every rank takes the same decision.
        rollout.skip_update = rollout.stopped or ratio > args.ratio_threshold
        self._log_mean_over_ranks(
            "describer",
            {
                "clip_frac": stats.clip_frac,
                "ratio": torch.tensor(ratio),
                "policy_kl": torch.tensor(policy_kl),
                "skipped": torch.tensor(float(rollout.skip_update)),
                "loss": loss.detach(),
            },
        )
        self._log_local("describer/kl_coef", rollout.kl_coef)
        return loss

    def _set_advantages(self, rollout: DescriberRollout) -> None:
        """Per-token advantages from the terminal advantage and the KL to the snapshot; then the KL controller
        sees the KL this rollout measured (so the coefficient it sets applies from the next rollout)."""
        mask_NT = rollout.caption_mask_NT
        kl_NT = per_token_kl(rollout.old_logp_NT, rollout.snapshot_logp_NT, mask_NT)
        rollout.kl_coef = self.kl_controller.value
        rollout.advantages_NT = describer_advantages(
            rollout.terminal_N, kl_NT, mask_NT, rollout.kl_coef, self.args.gamma
        )
        caption_kl = kl_NT.sum(dim=1).mean()
        kl, caption_kl, advantage = self.accelerator.reduce(
            torch.stack([masked_mean(kl_NT, mask_NT), caption_kl, masked_mean(rollout.advantages_NT, mask_NT)]),
            "mean",
        ).tolist()
        self.kl_controller.update(caption_kl, len(mask_NT) * self.args.world_size)
        for name, value in (("kl", kl), ("caption_kl", caption_kl), ("advantage", advantage)):
            self._log_local(f"describer/{name}", value)  # already the mean over ranks

    def _locator_loss(self, model, rollout: LocatorRollout):
        # Left padding puts every target at the end of its row, so the last target_len+1 logits suffice.
        keep = rollout.target_len + 1
        outputs = self._trained_forward(model, **rollout.inputs, logits_to_keep=keep, use_cache=False)
        logits = outputs.logits[:, :-1].float()
        labels = rollout.labels[:, -rollout.target_len :]
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100
        )
        answer = labels != -100
        token_acc = ((logits.argmax(-1) == labels) & answer).sum() / answer.sum().clamp(min=1)
        self._log_mean_over_ranks("locator", {"loss": loss.detach(), "token_acc": token_acc})
        return loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        # The whole step (rollout, forward, backward with any checkpoint recomputation) sees the vision cache.
        with self.vision_cache.active() if self.vision_cache is not None else nullcontext():
            loss = self._training_step(model, inputs, num_items_in_batch)
        if self.vision_cache is not None:  # the frozen trunk's runs, inside the stages above (not additive)
            self.stage_clock.add("vision_encoding", self.vision_cache.pop_encode_seconds())
        for key, seconds in self.stage_clock.pop().items():
            self._log_local(key, seconds)
        return loss

    def _training_step(self, model, inputs, num_items_in_batch=None):
        model.train()
        rollout = self._prepare_inputs(inputs)
        with self.compute_loss_context_manager():
            loss = self.compute_loss(model, rollout)
        loss = loss / self.current_gradient_accumulation_steps
        if rollout.skip_update and not self._grads_pending:
            # No backward: the optimizer step that follows finds no gradients and moves nothing.
            return loss.detach()
        if rollout.skip_update:
            # Earlier micro-batches of this step left gradients: a zero-weighted backward keeps DDP's
            # all-reduce and DeepSpeed's accumulation boundary in step while adding nothing.
            loss = loss * 0.0
        kwargs = {"scale_wrt_gas": False} if self.accelerator.distributed_type == DistributedType.DEEPSPEED else {}
        with self.stage_clock.stage("backward"):
            self.accelerator.backward(loss, **kwargs)
        self._grads_pending = True
        return loss.detach()

    # ------------------------------------------------------------------ logging
    def _log_local(self, key: str, value: float) -> None:
        """Record a value as this rank has it (no reduction: it must already agree across ranks)."""
        self._metrics[key].append(float(value))

    def _log_mean_over_ranks(self, prefix: str, values: dict[str, torch.Tensor]) -> None:
        """Record ``prefix/name`` for each value, averaged over ranks (a collective: every rank must call it)."""
        names = list(values)
        stacked = torch.stack([torch.as_tensor(values[k], dtype=torch.float32).reshape(()).cpu() for k in names])
        reduced = self.accelerator.reduce(stacked.to(self.args.device), "mean").tolist()
        for name, value in zip(names, reduced):
            self._metrics[f"{prefix}/{name}"].append(value)

    def log(self, logs, start_time=None):
        if "learning_rate" in logs:  # the LR the logged step used (the Trainer reads the scheduler's, one step late)
            logs["learning_rate"] = self.schedule.lr_at(self.state.global_step - 1)
        logs = {**logs, **{k: sum(v) / len(v) for k, v in self._metrics.items() if v}}
        if self._phases:
            # The phase as a name (a text entry in TensorBoard/W&B, a column in the printed logs), and as a
            # number that averages meaningfully over a logging window: the share of describer steps in it.
            logs["phase"] = "+".join(dict.fromkeys(self._phases))
            logs["phase/describer"] = sum(p == Phase.DESCRIBER.value for p in self._phases) / len(self._phases)
        self._metrics.clear()
        self._phases.clear()
        super().log(logs, start_time)

    def _maybe_save_rollout_picture(self, inputs, captions, boxes) -> None:
        every = self.args.log_rollouts_steps
        if not every or self.state.global_step % every or not self.is_world_process_zero():
            return
        from sc_tune.visualize import save_cycle_grid

        path = os.path.join(self.args.output_dir, "rollouts", f"step{self.state.global_step:07d}.png")
        save_cycle_grid(path, inputs["images"][:8], inputs["boxes"][:8].tolist(), captions[:8], boxes[:8])

    # ------------------------------------------------------------------ checkpoints
    def _save(self, output_dir=None, state_dict=None):
        super()._save(output_dir, state_dict)
        self.adapter.save_pretrained(output_dir or self.args.output_dir)
        carry_source_files(output_dir or self.args.output_dir, self.source_dir)

    def _save_checkpoint(self, model, trial):
        """Write the checkpoint to a staging folder, verify it, mark it complete, rename it, then rotate."""
        run_dir = self._get_output_dir(trial)
        step = self.state.global_step
        staging = checkpoints.staging_root(run_dir, step)
        if self.is_world_process_zero():
            checkpoints.remove_stale_staging(run_dir)
        self.accelerator.wait_for_everyone()
        # The Trainer writes checkpoint-N under _get_output_dir and rotates there: pointed at the staging root
        # it writes nothing where a resume looks and its rotation finds only the new folder.
        self._get_output_dir = lambda trial: staging
        try:
            super()._save_checkpoint(model, trial)
        finally:
            del self._get_output_dir
        staged = os.path.join(staging, f"{PREFIX_CHECKPOINT_DIR}-{step}")
        layout = self._save_sc_state(staged)
        self.accelerator.wait_for_everyone()
        if self.is_world_process_zero():
            final = checkpoints.commit(staged, os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{step}"), layout)
            best = self.state.best_model_checkpoint
            checkpoints.rotate(run_dir, self.args.save_total_limit, {final, best})
        self.accelerator.wait_for_everyone()

    def _run_settings(self) -> dict:
        """What a resumed run must share with the saved one (``--resume_allow_changes`` lists exceptions)."""
        args = self.args
        config = getattr(self.model, "config", None)
        return {
            "model": getattr(config, "_name_or_path", None),
            "model_type": getattr(config, "model_type", None),
            "lora": _is_peft(self.model),
            "schedule": dict(self.schedule.__dict__),
            "kl_coef": args.kl_coef,
            "clip_range": args.clip_range,
            "gamma": args.gamma,
            "per_device_train_batch_size": args.per_device_train_batch_size,
            "gradient_accumulation_steps": args.gradient_accumulation_steps,
            "seed": args.seed,
            "world_size": args.world_size,
            "precision": "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32",
            "deepspeed": self.is_deepspeed_enabled,
        }

    def _save_sc_state(self, checkpoint: str) -> dict:
        """Phase position, run settings, the snapshot (unless the next step re-syncs it) and a mid-rollout
        buffer. Returns the layout: which per-rank files the checkpoint must hold."""
        next_step = self.state.global_step
        position = self.schedule.at(next_step)
        rank, world = self.args.process_index, self.args.world_size
        zero3 = getattr(self.snapshot, "zero3", False) or (self.is_deepspeed_enabled and _zero3(self))
        layout = {
            "world_size": world,
            "deepspeed": self.is_deepspeed_enabled,
            "peft": _is_peft(self.model),
            "snapshot_ranks": [] if position.starts_phase else list(range(world)) if zero3 else [0],
            "rollout_ranks": [] if position.needs_rollout else list(range(world)),
        }
        os.makedirs(checkpoint, exist_ok=True)
        if self.is_world_process_zero():
            write_json(
                os.path.join(checkpoint, checkpoints.STATE_FILE),
                {
                    "next_step": next_step,
                    "phase": position.phase.value,
                    "step_in_phase": position.step_in_phase,
                    "ppo_epoch": position.ppo_epoch,
                    "schedule": self.schedule.__dict__,
                    "settings": self._run_settings(),
                    "kl_controller": self.kl_controller.state_dict(),
                },
            )
        if rank in layout["snapshot_ranks"]:
            tensors = {k: v.detach().cpu().clone() for k, v in self.snapshot.named_local_tensors().items()}
            torch.save(tensors, os.path.join(checkpoint, f"snapshot_rank{rank}.pt"))
        if rank in layout["rollout_ranks"]:
            checkpoints.save_rollouts(self._rollouts, os.path.join(checkpoint, f"rollouts_rank{rank}.pt"))
        return layout

    def train(self, resume_from_checkpoint=None, **kwargs):
        """``resume_from_checkpoint``: True (or "true"/"1") for the newest complete checkpoint, or a path."""
        # Rank 0 checks the checkpoint (hashing every file once) and tells the others what it found.
        if self.is_world_process_zero():
            try:
                found = (checkpoints.resolve_resume(resume_from_checkpoint, self.args.output_dir), None)
                if found[0] is not None:
                    self._check_resume_settings(found[0])
            except checkpoints.CheckpointError as e:
                found = (None, str(e))
        else:
            found = (None, None)
        if self.args.world_size > 1:
            found = broadcast_object_list(list(found), from_process=0)
        resume, error = found
        if error is not None:
            raise checkpoints.CheckpointError(error)
        if resume is not None:
            logger.info("resuming from %s", resume)
        self._resume_dir = resume
        return super().train(resume_from_checkpoint=resume, **kwargs)

    def _check_resume_settings(self, checkpoint: str) -> None:
        allowed = {k.strip() for k in (self.args.resume_allow_changes or "").split(",") if k.strip()}
        saved = checkpoints.read_state(checkpoint).get("settings", {})
        errors = checkpoints.settings_mismatches(checkpoint, saved, self._run_settings(), allowed)
        if errors:
            raise checkpoints.CheckpointError(
                f"{checkpoint} was saved with other settings: {'; '.join(errors)}. Resume with the same settings, "
                "or list the legitimate changes in --resume_allow_changes (e.g. model,seed)"
            )
        checkpoints.check_world_size_change(checkpoint, checkpoints.read_layout(checkpoint), self.args.world_size)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        model = model if model is not None else self.model
        if self.is_deepspeed_enabled or _is_peft(model):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        # transformers 5 saves some families (Qwen2-VL, ...) under their original key names and the
        # Trainer's plain load_state_dict(strict=False) then restores nothing, silently. Going through
        # from_pretrained applies the key conversion; every parameter must be found.
        saved = (
            type(model)
            .from_pretrained(resume_from_checkpoint, dtype=next(model.parameters()).dtype, local_files_only=True)
            .state_dict()
        )
        own = model.state_dict()
        missing = own.keys() - saved.keys()
        if missing:
            raise ValueError(f"{resume_from_checkpoint}: checkpoint lacks {sorted(missing)[:5]}")
        with torch.no_grad():
            for name, tensor in own.items():
                tensor.copy_(saved[name])

    def _restore_sc_state(self, checkpoint: str, step: int) -> None:
        saved = checkpoints.read_state(checkpoint)
        if saved["schedule"] != self.schedule.__dict__:
            raise ValueError(
                f"{checkpoint}: trained with phase schedule {saved['schedule']}, "
                f"now {self.schedule.__dict__}; resume with the same phase settings"
            )
        if saved["next_step"] != step:
            raise ValueError(f"{checkpoint}: saved before step {saved['next_step']}, resuming at {step}")
        self.kl_controller.load_state_dict(saved["kl_controller"])
        position = self.schedule.at(step)
        rank = self.args.process_index
        zero3 = getattr(self.snapshot, "zero3", False) or (self.is_deepspeed_enabled and _zero3(self))
        if not position.starts_phase:
            path = os.path.join(checkpoint, f"snapshot_rank{rank if zero3 else 0}.pt")
            # Read to the CPU: the snapshot copies into its own tensors, and "cpu:0" (CPU DDP) is no map_location.
            self.snapshot.load_local_tensors(torch.load(path, map_location="cpu", weights_only=True))
        if not position.needs_rollout:
            path = os.path.join(checkpoint, f"rollouts_rank{rank}.pt")
            self._rollouts = checkpoints.load_rollouts(path, [DescriberRollout, LocatorRollout], self.args.device)


def _is_peft(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def _zero3(trainer) -> bool:
    plugin = trainer.accelerator.state.deepspeed_plugin
    return plugin is not None and plugin.zero_stage == 3
