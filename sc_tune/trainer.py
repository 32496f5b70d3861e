"""SCTuneTrainer: the describer -> locator cycle on ``transformers.Trainer``, in TRL's GRPOTrainer pattern.

Each Trainer step is one optimizer step, through the Trainer's own loop (clipping, DeepSpeed, logging and
checkpointing stay upstream). A step, top-down:

1. ``training_step`` -> ``_prepare_inputs``: at a step's first micro-batch ``_begin_step`` applies the phase schedule
   (``sc_tune.phases``, a pure function of the step): at a phase switch it resets the Adam moments and re-syncs the
   snapshot, and it sets the phase's LR. Then the step's rollout: a describer rollout (K sampled captions per box,
   scored by the snapshot's locator) or a locator rollout (pseudo-labels), made by ``self.cycle``
   (``sc_tune.cycle.RolloutCycle``, which also takes every cache decision) and buffered;
2. ``compute_loss``: the clipped PPO loss for the describer, the cross-entropy on the pseudo-label box for the locator;
3. the backward, unless the update is skipped.

Where the method departs from textbook PPO:

- two roles of one model take turns, in phases; the locator's phase is supervised (cross-entropy on pseudo-labels:
  the snapshot's greedy caption paired with the true box), only the describer's is reinforcement learning;
- the reward comes from the model itself: the snapshot locates the sampled caption, the reward is the IoU (or
  ``--reward``) of that box with the true box. There is no value function: the advantage is the reward minus a
  baseline (the paper's: the snapshot's greedy caption's reward; ``sc_tune.baselines``), minus a per-token KL
  suffix (``sc_tune.ppo``);
- the KL reference and the baseline's author is a frozen snapshot of the weights at the start of the phase, not the
  initial model: it is re-synced at every phase switch, together with a reset of the Adam moments;
- one rollout serves ``ppo_epochs`` consecutive optimizer steps (``RolloutSampler`` hands the same batch back), and
  the old log-probs are the first epoch's forward, kept for the later epochs: no separate no-grad pass;
- an update can be skipped for real (no backward, so no optimizer step, no Adam moment decay, no weight decay) when
  the ratio guard or the policy-KL early stop fires; the reference zeroed the loss and still stepped. The decision is
  taken on values averaged over ranks, so every rank agrees.

Checkpoints also hold the snapshot and, mid-rollout, the buffered rollout, so a resumed run continues exactly
(``sc_tune.resume``).
"""

from __future__ import annotations

import functools
import logging
import os
from collections import defaultdict
from contextlib import contextmanager

import torch
from accelerate.utils import DistributedType
from transformers import Trainer

from sc_tune.checkpoints import deepspeed_loads_without_pickle
from sc_tune.cycle import (
    DescriberRollout,
    LocatorRollout,
    RolloutCycle,
    RolloutModels,
    caption_logprobs,
    last_logits,
    sampling_seed,
)
from sc_tune.data import RolloutSampler, collate_referring
from sc_tune.export import carry_source_files, model_config_as_loaded
from sc_tune.kl_control import make_kl_controller
from sc_tune.moe import router_aux_coefficient
from sc_tune.preemption import parse_signals, workers_ignoring
from sc_tune.preflight import PreflightError, decide
from sc_tune.phases import Phase, PhaseLR, PhaseSchedule, reset_optimizer_moments, set_learning_rate
from sc_tune.ppo import describer_advantages, masked_mean, per_token_kl, ppo_clip_loss
from sc_tune.resume import (
    RunState,
    load_weights_strictly,
    optimizer_offloaded_to_nvme,
    run_settings,
    staged_checkpoint,
)
from sc_tune.rewards import RewardFunction
from sc_tune.snapshot import eval_mode, is_peft, make_snapshot, unwrapped_for_generation, zero3_enabled
from sc_tune.timing import timed_stage
from sc_tune.universal import load_universal_checkpoints, repair_zero3_load

logger = logging.getLogger(__name__)


class SCTuneTrainer(Trainer):
    def __init__(
        self,
        model,
        args,
        adapter,
        train_dataset,
        callbacks=None,
        reward_fn: RewardFunction | None = None,
        cycle: RolloutCycle | None = None,
        source_dir: str | None = None,
    ):
        with model_config_as_loaded(model):  # saved config.json files keep the input's settings
            super().__init__(
                model=model, args=args, train_dataset=train_dataset, data_collator=collate_referring,
                callbacks=callbacks,
            )
        if cycle is not None and reward_fn is not None:
            raise ValueError("pass reward_fn to the RolloutCycle given as cycle=, not to the trainer")
        self.adapter = adapter
        self.source_dir = source_dir  # the input checkpoint: its other non-weight files go into every saved folder
        self.schedule = PhaseSchedule.from_args(args)
        self.kl_controller = make_kl_controller(args)
        self.snapshot = make_snapshot(self)
        self.cycle = cycle if cycle is not None else RolloutCycle(adapter, args, reward_fn)
        snapshot_module = getattr(self.snapshot, "module", model)
        zero3 = self.is_deepspeed_enabled and zero3_enabled(self.accelerator)
        self.cycle.attach(
            RolloutModels(self._policy_for_generation, self.snapshot, self.accelerator.unwrap_model, zero3),
            [model, snapshot_module],
        )
        self.stage_clock = self.cycle.stage_clock  # the cycle's stages and this trainer's forward and backward
        plugin = self.accelerator.state.deepspeed_plugin if self.is_deepspeed_enabled else None
        zero_stage = plugin.zero_stage if plugin else None
        settings = run_settings(args, model, self.schedule, self.is_deepspeed_enabled, adapter, zero_stage,
                                records=getattr(train_dataset, "records", None), model_folder=source_dir)
        self.run = RunState(args, self.schedule, self.kl_controller, self.snapshot, settings, zero3,
                            optimizer_on_nvme=optimizer_offloaded_to_nvme(plugin.deepspeed_config if plugin else None))
        # MoE under full fine-tuning: the router's load-balancing term joins every loss (sc_tune.moe).
        self.router_aux_coef = router_aux_coefficient(model, args.moe_aux_loss, args.moe_aux_loss_coef, is_peft(model))
        self._router_aux = None
        self._step_begun = -1
        self._micro = 0
        self._window: list | None = None  # the step's micro-batches, as the Trainer's loop fetched them
        self._grads_pending = False
        self._metrics: dict[str, list[float]] = defaultdict(list)
        self._phases: list[str] = []  # phase name of each step since the last log
        self._staging_root: str | None = None  # set while a checkpoint is written (see _get_output_dir)

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

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        # The Trainer fetches a step's micro-batches before its first one: a rollout may cover several of them.
        batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        self._window = batches
        return batches, num_items

    # ------------------------------------------------------------------ a step
    def training_step(self, model, inputs, num_items_in_batch=None):
        with self.cycle.step_context():  # the vision cache, for the rollout, the forward and the backward
            loss = self._training_step(model, inputs)
        for key, seconds in self.cycle.pop_timings().items():
            self._log_local(key, seconds)
        return loss

    def _training_step(self, model, inputs):
        model.train()
        rollout = self._prepare_inputs(inputs)
        with self.compute_loss_context_manager():
            loss = self.compute_loss(model, rollout)
        loss = loss / self.current_gradient_accumulation_steps
        if rollout.skip_update and not self._grads_pending:
            # No backward: the optimizer step that follows finds no gradients and moves nothing.
            return loss.detach()
        # Earlier micro-batches of this step left gradients: a skipped one runs a zero-weighted backward, which keeps
        # DDP's all-reduce and DeepSpeed's accumulation boundary in step while adding nothing. What it returns (the
        # Trainer's logged loss) is its loss all the same, as for a skipped micro-batch without a backward.
        backward_loss = loss * 0.0 if rollout.skip_update else loss
        kwargs = {"scale_wrt_gas": False} if self.accelerator.distributed_type == DistributedType.DEEPSPEED else {}
        with self.stage_clock.stage("backward"):
            self.accelerator.backward(backward_loss, **kwargs)
        self._grads_pending = True
        return loss.detach()

    def _prepare_inputs(self, inputs):
        step = self.state.global_step
        if step != self._step_begun:
            self._begin_step(step)
            self._step_begun = step
        else:
            self._micro += 1
        position = self.schedule.at(step)
        if position.needs_rollout and self._micro not in self.run.rollouts:
            self._roll_out(position.phase, inputs)
        if self._micro == 0:
            self._phases.append(position.phase.value)
        return self.run.rollouts[self._micro]

    def _begin_step(self, step: int) -> None:
        """Once per optimizer step, before its first micro-batch."""
        if self.run.resume_dir is not None:
            if self.run.converted_dir is not None and self.run.zero3:
                repair_zero3_load(self.optimizer, self.run.converted_dir)
            self.run.restore(self.run.resume_dir, step)
            self.run.resume_dir = None
            self.run.drop_converted()  # every rank has loaded the Trainer's and DeepSpeed's states by now
        elif step == 0 and not self.args.skip_preflight:
            self._preflight()
        position = self.schedule.at(step)
        if position.starts_phase:
            # Also at step 0 and when resuming exactly at a switch; mid-phase resumes load the snapshot instead.
            reset_optimizer_moments(self.optimizer)
            self.snapshot.sync_from_policy()
        set_learning_rate(self.optimizer, self.schedule.lr_at(step))
        if position.needs_rollout:
            self.run.rollouts = {}
        self.cycle.begin_step(position)
        self._micro = 0
        self._grads_pending = False

    def _preflight(self) -> None:
        """Before step 0: stop the run if the locator's answers do not parse (``sc_tune.preflight``)."""
        report = self.cycle.preflight(self.train_dataset, self.args.preflight_samples)
        if self.is_world_process_zero():
            logger.info(report.summary())
            print(report.summary(), flush=True)
        failure = decide(report, self.args, self.args.world_size)  # rank 0's verdict, on every rank
        if failure is not None:
            raise PreflightError(failure)

    def _roll_out(self, phase: Phase, inputs) -> None:
        """The rollouts of this micro-batch and the next ones of its generation chunk (``--generation_batch_size``
        boxes), one buffered per micro-batch; each samples with its own seed (``sc_tune.cycle.sampling_seed``)."""
        batches = [inputs]
        chunk = self.args.generation_batch_size // self.args.per_device_train_batch_size
        if chunk > 1:
            window = self._window or []
            if self._micro >= len(window) or window[self._micro] is not inputs:
                raise RuntimeError("--generation_batch_size spans micro-batches: the step's micro-batches come from "
                                   "the Trainer's training loop (get_batch_samples); this one is not among them")
            batches = window[self._micro : self._micro + chunk]
        step, rank = self.state.global_step, self.args.process_index
        seeds = [sampling_seed(self.args.seed, step, self._micro + i, rank) for i in range(len(batches))]
        made = self.cycle.rollouts(phase is Phase.DESCRIBER, batches, seeds)
        if phase is Phase.DESCRIBER:
            self._maybe_save_rollout_picture(inputs, made[0].captions, made[0].located)
        for offset, result in enumerate(made):
            self._log_mean_over_ranks(phase.value, result.metrics)
            self.run.rollouts[self._micro + offset] = result.rollout

    @contextmanager
    def _policy_for_generation(self):
        with unwrapped_for_generation(
            self.model_wrapped, self.accelerator, gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs
        ) as m, eval_mode(m):
            yield m

    # ------------------------------------------------------------------ losses
    @timed_stage("forward")
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        forward = functools.partial(self._trained_forward, model)
        if isinstance(inputs, DescriberRollout):
            return self._with_router_aux(self._describer_loss(forward, inputs))
        return self._with_router_aux(self._locator_loss(forward, inputs))

    def _trained_forward(self, model, **kwargs):
        """The loss's forward; with a router load-balancing term it also returns the router logits."""
        if not self.router_aux_coef:
            return model(**kwargs)
        outputs = model(**kwargs, output_router_logits=True)
        self._router_aux = outputs.aux_loss
        return outputs

    def _with_router_aux(self, loss):
        aux, self._router_aux = self._router_aux, None
        if aux is None:
            return loss
        self._log_mean_over_ranks("moe", {"aux_loss": aux.detach()})
        return loss + self.router_aux_coef * aux

    def _describer_loss(self, model, rollout: DescriberRollout):
        args = self.args
        logp_NT = caption_logprobs(model, rollout.inputs, rollout.caption_ids_NT, args.describer_temperature).logp_NT
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
        # Left padding puts every target at the end of its row, so the last target_len+1 logits suffice: the
        # logit at position t predicts the token at t+1.
        keep = rollout.target_len + 1
        logits = last_logits(model(**rollout.inputs, logits_to_keep=keep, use_cache=False), keep)[:, :-1].float()
        labels = rollout.labels[:, -rollout.target_len :]
        answer = labels != -100
        # Summed over the answer tokens, then divided by their count, not a mean: with --pseudo_label_min_iou a
        # micro-batch may keep no row, and then its loss is 0 (a mean over no token is NaN).
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum"
        ) / answer.sum().clamp(min=1)
        token_acc = ((logits.argmax(-1) == labels) & answer).sum() / answer.sum().clamp(min=1)
        self._log_mean_over_ranks("locator", {"loss": loss.detach(), "token_acc": token_acc})
        return loss

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

    # ------------------------------------------------------------------ checkpoints and resuming (sc_tune.resume)
    def train(self, resume_from_checkpoint=None, **kwargs):
        """``resume_from_checkpoint``: True (or "true"/"1") for the newest complete checkpoint, or a path."""
        resume = self.run.find_resume(resume_from_checkpoint, self.is_world_process_zero())
        if self.run.converted_dir is not None:  # saved by another number of processes: DeepSpeed's universal form
            load_universal_checkpoints(self.accelerator.state.deepspeed_plugin)
        with deepspeed_loads_without_pickle():  # DeepSpeed's own loader would unpickle anything
            trained = super().train(resume_from_checkpoint=resume, **kwargs)
        self.run.drop_converted()  # resumed at --max_steps: no step dropped it
        return trained

    def get_train_dataloader(self):
        loader = super().get_train_dataloader()
        # A scheduler's stop signal reaches the data workers too; they ignore it, and the training process saves a
        # checkpoint and stops them (sc_tune.preemption). accelerate's loader wraps the DataLoader that starts them.
        workers_loader = getattr(loader, "base_dataloader", loader)
        workers_loader.worker_init_fn = workers_ignoring(parse_signals(self.args.save_on_signal),
                                                         workers_loader.worker_init_fn)
        return loader

    def _run_epoch(self, *args, **kwargs):
        if self.state.global_step >= self.state.max_steps:  # resumed at --max_steps: complete, nothing to train
            self.control.should_training_stop = True
            return
        return super()._run_epoch(*args, **kwargs)

    def _save(self, output_dir=None, state_dict=None):
        super()._save(output_dir, state_dict)
        # transformers calls _save on every rank and writes the weights only where should_save; the tokenizer and
        # carried files likewise, or every process of every node rewrites them at once on the shared file system.
        if self.args.should_save:
            self.adapter.save_pretrained(output_dir or self.args.output_dir)
            carry_source_files(output_dir or self.args.output_dir, self.source_dir)

    def _init_training_state(self, max_steps, num_update_steps_per_epoch, num_train_epochs, resume_from_checkpoint,
                             trial):
        trained = super()._init_training_state(max_steps, num_update_steps_per_epoch, num_train_epochs,
                                               resume_from_checkpoint, trial)
        # A resume takes save/logging steps from the checkpoint's trainer_state.json: a user who lowers --save_steps
        # to save more often before a preemption would silently keep the old interval. This run's flags hold.
        self.state.compute_steps(self.args, max_steps)
        return trained

    def _get_output_dir(self, trial):
        # While a checkpoint is staged, the Trainer writes checkpoint-N under the staging root and rotates there
        # (it finds only the new folder): nothing half-written where a resume looks.
        return self._staging_root or super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial):
        """The Trainer's files and the run state, staged, verified, marked complete, renamed, then rotation."""
        step = self.state.global_step
        with staged_checkpoint(self._get_output_dir(trial), step, self.accelerator, self.is_world_process_zero(),
                               self.args.save_total_limit, lambda: {self.state.best_model_checkpoint}) as staged:
            self._staging_root = staged.root
            try:
                super()._save_checkpoint(model, trial)
            finally:
                self._staging_root = None
            staged.layout = self.run.save(staged.folder, step)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        model = model if model is not None else self.model
        if self.is_deepspeed_enabled or is_peft(model):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_weights_strictly(model, resume_from_checkpoint)
