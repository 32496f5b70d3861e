"""SCTuneTrainer: the describer -> locator cycle on ``transformers.Trainer``, in TRL's GRPOTrainer pattern.

Each Trainer step is one optimizer step, through the Trainer's own loop (clipping, DeepSpeed, logging and
checkpointing stay upstream). What this class adds:

- ``_prepare_inputs`` turns a batch of (image, box) into a *rollout* and buffers it. A describer rollout is
  reused for ``ppo_epochs`` consecutive steps (``RolloutSampler`` hands the same batch back); a locator
  rollout serves one step. The phase of a step comes from ``PhaseSchedule``, a pure function of the step.
- ``compute_loss`` dispatches on the rollout's type: the clipped PPO loss for the describer, the
  cross-entropy on the pseudo-label box for the locator.
- ``training_step`` can skip an update for real (no backward, so no optimizer step, no Adam moment
  decay, no weight decay) when the ratio guard or the policy-KL early stop fires; the reference zeroed
  the loss and still stepped. The decision is averaged over ranks so that every rank agrees.
- At a phase switch ``_begin_step`` resets the Adam moments and re-syncs the snapshot (see
  ``sc_tune.phases``); checkpoints also store the snapshot and, mid-rollout, the buffered rollout, so a
  resumed run continues exactly.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from accelerate.utils import DistributedType
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint
from trl.models.utils import unwrap_model_for_generation
from trl.trainer.utils import selective_log_softmax

from sc_tune.adapters.base import ModelAdapter
from sc_tune.boxes import iou_or_zero
from sc_tune.data import RolloutSampler, collate_referring
from sc_tune.phases import Phase, PhaseLR, PhaseSchedule, reset_optimizer_moments, set_learning_rate
from sc_tune.ppo import describer_advantages, masked_mean, ppo_clip_loss
from sc_tune.rollout import GenerationSettings, generate, locate
from sc_tune.snapshot import AdapterSnapshot, FullSnapshot
from sc_tune.timing import StageClock, timed_stage
from sc_tune.vision_cache import VisionCache

STATE_FILE = "sc_tune_state.json"


@dataclass
class DescriberRollout:
    inputs: dict[str, torch.Tensor]  # prompt + sampled caption, for teacher-forced passes
    caption_ids_BT: torch.Tensor
    caption_mask_BT: torch.Tensor
    snapshot_logp_BT: torch.Tensor
    reward_B: torch.Tensor  # IoU of the sampled caption, located by the snapshot
    baseline_B: torch.Tensor  # IoU of the snapshot's greedy caption, located by the snapshot
    old_logp_BT: torch.Tensor | None = None  # pre-update policy, filled by the first PPO epoch
    advantages_BT: torch.Tensor | None = None
    stopped: bool = False  # the policy-KL early stop fired: no more updates on this rollout


@dataclass
class LocatorRollout:
    inputs: dict[str, torch.Tensor]  # locator prompt (snapshot's caption) + ground-truth box
    labels: torch.Tensor  # -100 except on the box tokens and the end token
    target_len: int


class SCTuneTrainer(Trainer):
    def __init__(self, model, args, adapter: ModelAdapter, train_dataset, callbacks=None):
        super().__init__(
            model=model, args=args, train_dataset=train_dataset, data_collator=collate_referring, callbacks=callbacks
        )
        self.adapter = adapter
        self.schedule = PhaseSchedule.from_args(args)
        self.sample_captions = GenerationSettings(
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
        self._rollouts: dict[int, DescriberRollout | LocatorRollout] = {}
        # The frozen vision trunk once per image per rollout (None: family fallback, fix_vit off, or disabled).
        snapshot_model = getattr(self.snapshot, "module", model)
        self.vision_cache = VisionCache.for_model(adapter, [model, snapshot_model]) if args.vision_cache else None
        self.stage_clock = StageClock()  # timing/<stage> seconds per step in the logs
        self._step_begun = -1
        self._micro = 0
        self._grads_pending = False
        self._metrics: dict[str, list[float]] = defaultdict(list)
        self._resume_dir: str | None = None

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
        position = self.schedule.at(step)
        if position.starts_phase:
            # Also at step 0 and when resuming exactly at a switch; mid-phase resumes load the snapshot instead.
            reset_optimizer_moments(self.optimizer)
            self.snapshot.sync_from_policy()
        set_learning_rate(self.optimizer, self.schedule.lr_at(step))
        if position.needs_rollout:
            self._rollouts = {}
            if self.vision_cache is not None:
                self.vision_cache.clear()
        self._micro = 0
        self._grads_pending = False

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
        self._log_metric("phase", 0.0 if position.phase is Phase.DESCRIBER else 1.0)
        return self._rollouts[self._micro]

    # ------------------------------------------------------------------ rollouts
    @contextmanager
    def _policy_for_generation(self):
        with unwrap_model_for_generation(
            self.model_wrapped, self.accelerator, gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs
        ) as m:
            m.eval()
            try:
                yield m
            finally:
                m.train()

    def _prepare_images(self, inputs):
        return [self.adapter.prepare_image(image) for image in inputs["images"]]  # once per sample per step

    @torch.no_grad()
    def _describer_rollout(self, inputs) -> DescriberRollout:
        images = self._prepare_images(inputs)
        boxes_B4 = inputs["boxes"]
        batch = self.adapter.build_batch(
            [self.adapter.describer_prompt(b, im) for b, im in zip(boxes_B4.tolist(), images)], images
        )
        with self._policy_for_generation() as policy, self.stage_clock.stage("policy_sampling"):
            sampled = generate(policy, self.adapter, batch, self.sample_captions, skip_special_tokens=True)
        with self.snapshot.generating() as snapshot:
            with self.stage_clock.stage("snapshot_generation"):
                greedy = generate(snapshot, self.adapter, batch, self.greedy_captions, skip_special_tokens=True)
            # Both captions are located in one batched call: rows 0..B-1 sampled, B..2B-1 the baseline.
            with self.stage_clock.stage("locating"):
                located, _ = locate(
                    snapshot, self.adapter, images + images, sampled.texts + greedy.texts, self.greedy_boxes
                )
        n = len(images)
        reward_B = iou_or_zero(located[:n], boxes_B4)
        baseline_B = iou_or_zero(located[n:], boxes_B4)
        device = self.args.device
        teacher_inputs = {
            k: v.to(device)
            for k, v in self.adapter.append_completion(batch, sampled.ids_BT.cpu(), sampled.mask_BT.cpu()).items()
        }
        caption_ids_BT, caption_mask_BT = sampled.ids_BT.to(device), sampled.mask_BT.to(device)
        with self.snapshot.scoring() as snapshot, self.stage_clock.stage("snapshot_scoring"):
            snapshot_logp_BT = self._caption_logprobs(snapshot, teacher_inputs, caption_ids_BT)
        parse_fail = torch.tensor([b is None for b in located[:n]], dtype=torch.float32)
        self._log_metrics(
            "describer",
            {
                "reward_iou": reward_B.mean(),
                "baseline_iou": baseline_B.mean(),
                "reward_acc50": (reward_B >= 0.5).float().mean(),
                "baseline_acc50": (baseline_B >= 0.5).float().mean(),
                "parse_failure": parse_fail.mean(),
                "baseline_parse_failure": torch.tensor([b is None for b in located[n:]], dtype=torch.float32).mean(),
                "caption_tokens": caption_mask_BT.float().sum(1).mean().cpu(),
                "nonzero_advantage": ((reward_B - baseline_B).abs() > 1e-6).float().mean(),
            },
        )
        self._maybe_save_rollout_picture(inputs, sampled.texts, located[:n])
        return DescriberRollout(
            teacher_inputs,
            caption_ids_BT,
            caption_mask_BT,
            snapshot_logp_BT,
            reward_B.to(device),
            baseline_B.to(device),
        )

    @torch.no_grad()
    def _locator_rollout(self, inputs) -> LocatorRollout:
        images = self._prepare_images(inputs)
        boxes = inputs["boxes"].tolist()
        batch = self.adapter.build_batch([self.adapter.describer_prompt(b, im) for b, im in zip(boxes, images)], images)
        with self.snapshot.generating() as snapshot, self.stage_clock.stage("snapshot_generation"):
            captions = generate(snapshot, self.adapter, batch, self.greedy_captions, skip_special_tokens=True)
        targets = [self.adapter.locator_target(b, im) for b, im in zip(boxes, images)]
        pseudo = self.adapter.build_batch(
            [self.adapter.locator_prompt(c, im) for c, im in zip(captions.texts, images)], images, targets
        )
        device = self.args.device
        self._log_metrics("locator", {"caption_tokens": captions.mask_BT.float().sum(1).mean().cpu()})
        target_len = int((pseudo.labels != -100).sum(1).max())
        return LocatorRollout({k: v.to(device) for k, v in pseudo.inputs.items()}, pseudo.labels.to(device), target_len)

    def _caption_logprobs(self, model, inputs, caption_ids_BT):
        """log p(caption token | prefix), from logits of the last T+1 positions only."""
        num_tokens = caption_ids_BT.shape[1]
        logits = model(**inputs, logits_to_keep=num_tokens + 1, use_cache=False).logits[:, :-1]
        return selective_log_softmax(logits / self.args.describer_temperature, caption_ids_BT)

    # ------------------------------------------------------------------ losses
    @timed_stage("forward")
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if isinstance(inputs, DescriberRollout):
            return self._describer_loss(model, inputs)
        return self._locator_loss(model, inputs)

    def _describer_loss(self, model, rollout: DescriberRollout):
        args = self.args
        logp_BT = self._caption_logprobs(model, rollout.inputs, rollout.caption_ids_BT)
        mask_BT = rollout.caption_mask_BT
        first_epoch = rollout.old_logp_BT is None
        if first_epoch:
            # Before any update on this rollout the current weights *are* the pre-update policy, so its
            # log-probs come from this forward: no separate no-grad pass.
            rollout.old_logp_BT = logp_BT.detach()
            kl_BT = (rollout.old_logp_BT - rollout.snapshot_logp_BT) * mask_BT
            rollout.advantages_BT = describer_advantages(
                rollout.reward_B, rollout.baseline_B, kl_BT, mask_BT, args.kl_coef, args.gamma
            )
            self._log_metrics(
                "describer",
                {
                    "kl": masked_mean(kl_BT, mask_BT),
                    "kl_coef": torch.tensor(args.kl_coef),
                    "advantage": masked_mean(rollout.advantages_BT, mask_BT),
                },
            )
        loss, stats = ppo_clip_loss(logp_BT, rollout.old_logp_BT, rollout.advantages_BT, mask_BT, args.clip_range)
        ratio, policy_kl = self.accelerator.reduce(
            torch.stack([stats.ratio, stats.policy_kl]).detach(), "mean"
        ).tolist()
        if not first_epoch and policy_kl > args.policy_kl_stop:
            rollout.stopped = True
        skip = rollout.stopped or ratio > args.ratio_threshold
        self._log_metrics(
            "describer",
            {
                "clip_frac": stats.clip_frac,
                "ratio": torch.tensor(ratio),
                "policy_kl": torch.tensor(policy_kl),
                "skipped": torch.tensor(float(skip)),
                "loss": loss.detach(),
            },
        )
        self._skip_this_update = skip
        return loss

    def _locator_loss(self, model, rollout: LocatorRollout):
        # Left padding puts every target at the end of its row, so the last target_len+1 logits suffice.
        keep = rollout.target_len + 1
        logits = model(**rollout.inputs, logits_to_keep=keep, use_cache=False).logits[:, :-1].float()
        labels = rollout.labels[:, -rollout.target_len :]
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100
        )
        answer = labels != -100
        token_acc = ((logits.argmax(-1) == labels) & answer).sum() / answer.sum().clamp(min=1)
        self._log_metrics("locator", {"loss": loss.detach(), "token_acc": token_acc})
        self._skip_this_update = False
        return loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        # The whole step (rollout, forward, backward with any checkpoint recomputation) sees the vision cache.
        with self.vision_cache.active() if self.vision_cache is not None else nullcontext():
            loss = self._training_step(model, inputs, num_items_in_batch)
        if self.vision_cache is not None:  # the frozen trunk's runs, inside the stages above (not additive)
            self.stage_clock.add("vision_encoding", self.vision_cache.pop_encode_seconds())
        for key, seconds in self.stage_clock.pop().items():
            self._log_metric(key, seconds)
        return loss

    def _training_step(self, model, inputs, num_items_in_batch=None):
        model.train()
        rollout = self._prepare_inputs(inputs)
        with self.compute_loss_context_manager():
            loss = self.compute_loss(model, rollout)
        loss = loss / self.current_gradient_accumulation_steps
        if self._skip_this_update and not self._grads_pending:
            # No backward: the optimizer step that follows finds no gradients and moves nothing.
            return loss.detach()
        if self._skip_this_update:
            # Earlier micro-batches of this step left gradients: a zero-weighted backward keeps DDP's
            # all-reduce and DeepSpeed's accumulation boundary in step while adding nothing.
            loss = loss * 0.0
        kwargs = {"scale_wrt_gas": False} if self.accelerator.distributed_type == DistributedType.DEEPSPEED else {}
        with self.stage_clock.stage("backward"):
            self.accelerator.backward(loss, **kwargs)
        self._grads_pending = True
        return loss.detach()

    # ------------------------------------------------------------------ logging
    def _log_metric(self, key: str, value: float) -> None:
        self._metrics[key].append(float(value))

    def _log_metrics(self, prefix: str, values: dict[str, torch.Tensor]) -> None:
        names = list(values)
        stacked = torch.stack([torch.as_tensor(values[k], dtype=torch.float32).reshape(()).cpu() for k in names])
        reduced = self.accelerator.reduce(stacked.to(self.args.device), "mean").tolist()
        for name, value in zip(names, reduced):
            self._metrics[f"{prefix}/{name}"].append(value)

    def log(self, logs, start_time=None):
        if "learning_rate" in logs:  # the LR the logged step used (the Trainer reads the scheduler's, one step late)
            logs["learning_rate"] = self.schedule.lr_at(self.state.global_step - 1)
        logs = {**logs, **{k: sum(v) / len(v) for k, v in self._metrics.items() if v}}
        self._metrics.clear()
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

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        checkpoint = os.path.join(self._get_output_dir(trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        self._save_sc_state(checkpoint)

    def _save_sc_state(self, checkpoint: str) -> None:
        """Phase position, the snapshot (unless the next step re-syncs it) and a mid-rollout buffer."""
        next_step = self.state.global_step
        position = self.schedule.at(next_step)
        rank = self.args.process_index
        zero3 = getattr(self.snapshot, "zero3", False) or (self.is_deepspeed_enabled and _zero3(self))
        os.makedirs(checkpoint, exist_ok=True)
        if self.is_world_process_zero():
            with open(os.path.join(checkpoint, STATE_FILE), "w") as f:
                json.dump(
                    {
                        "next_step": next_step,
                        "phase": position.phase.value,
                        "step_in_phase": position.step_in_phase,
                        "ppo_epoch": position.ppo_epoch,
                        "schedule": self.schedule.__dict__,
                    },
                    f,
                    indent=2,
                )
        if not position.starts_phase and (zero3 or rank == 0):
            tensors = {k: v.detach().cpu().clone() for k, v in self.snapshot.named_local_tensors().items()}
            torch.save(tensors, os.path.join(checkpoint, f"snapshot_rank{rank if zero3 else 0}.pt"))
        if not position.needs_rollout:
            torch.save(self._rollouts, os.path.join(checkpoint, f"rollouts_rank{rank}.pt"))

    def train(self, resume_from_checkpoint=None, **kwargs):
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"no checkpoint found in {self.args.output_dir} to resume from")
        self._resume_dir = resume_from_checkpoint or None
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

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
        with open(os.path.join(checkpoint, STATE_FILE)) as f:
            saved = json.load(f)
        if saved["schedule"] != self.schedule.__dict__:
            raise ValueError(
                f"{checkpoint}: trained with phase schedule {saved['schedule']}, "
                f"now {self.schedule.__dict__}; resume with the same phase settings"
            )
        if saved["next_step"] != step:
            raise ValueError(f"{checkpoint}: saved before step {saved['next_step']}, resuming at {step}")
        position = self.schedule.at(step)
        rank = self.args.process_index
        zero3 = getattr(self.snapshot, "zero3", False) or (self.is_deepspeed_enabled and _zero3(self))
        if not position.starts_phase:
            path = os.path.join(checkpoint, f"snapshot_rank{rank if zero3 else 0}.pt")
            self.snapshot.load_local_tensors(torch.load(path, map_location=self.args.device))
        if not position.needs_rollout:
            self._rollouts = torch.load(
                os.path.join(checkpoint, f"rollouts_rank{rank}.pt"), map_location=self.args.device, weights_only=False
            )


def _is_peft(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def _zero3(trainer) -> bool:
    plugin = trainer.accelerator.state.deepspeed_plugin
    return plugin is not None and plugin.zero_stage == 3
