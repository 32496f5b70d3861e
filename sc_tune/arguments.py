"""Every SC-Tune knob, as dataclasses parsed by one ``HfArgumentParser`` (``sc_tune.help_layout.build_parser``).

``SCTuneConfig`` extends ``transformers.TrainingArguments``, so the method's constants land in the
``training_args.bin`` saved with every checkpoint. Defaults are the reference release's
(``docs/method.md``, "Defaults") unless a field says otherwise.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import socket
from dataclasses import dataclass, field

from transformers import TrainingArguments


class ArgumentError(ValueError):
    """A command-line value that would train the wrong way or crash mid-run; the message names the flag."""


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        default="Qwen-VL-Chat",
        metadata={"help": "Checkpoint folder of any supported family (README's table); read from disk only."},
    )
    box_format: str = field(
        default="native",
        metadata={
            "help": "native (the family's) | generic ([x1, y1, x2, y2] on 0..1000); evaluate with the same.",
            "choices": ["native", "generic"],
        },
    )
    fix_vit: bool = field(
        default=True,
        metadata={"help": "Freeze the vision tower except its resampler/merger (the reference's default)."},
    )
    # Unset, a checkpoint's own bound can be large: Qwen2.5-VL's 12,845,056 leaves a 1920x1080 photo ~2,700 tokens.
    image_max_pixels: int | None = field(
        default=None,
        metadata={"help": "Qwen2/2.5/3-VL, Qwen3.5, Qwen3.8-Flash-Next, GLM, EXAONE 4.5, HyperCLOVA X Vision v2: "
                          "images resized to at most this many pixels (200704: 448 x 448)."},
    )
    image_min_pixels: int | None = field(
        default=None, metadata={"help": "The same families: at least this many pixels (unset: the checkpoint's)."}
    )

    def __post_init__(self):
        check_image_pixels(self.image_min_pixels, self.image_max_pixels)


def check_image_pixels(min_pixels: int | None, max_pixels: int | None) -> None:
    """``--image_min_pixels`` / ``--image_max_pixels`` (finetune.py and evaluate.py): each >= 1, min <= max."""
    for name, value in (("image_min_pixels", min_pixels), ("image_max_pixels", max_pixels)):
        if value is not None and value < 1:
            raise ArgumentError(f"--{name} {value} must be >= 1 (leave it out for the checkpoint's own bound)")
    if None not in (min_pixels, max_pixels) and min_pixels > max_pixels:
        raise ArgumentError(f"--image_min_pixels {min_pixels} is above --image_max_pixels {max_pixels}")


@dataclass
class DataArguments:
    data_path: str = field(
        default="data/object365.json",
        metadata={
            "help": "JSON list of {'image': relative path, 'bbox': [x1, y1, x2, y2] in [0, 1]}."
        },
    )
    image_folder: str = field(
        default="data/objects365",
        metadata={"help": "Folder the records' image paths are relative to.", "aliases": ["--train_data_path"]},
    )
    skip_bad_records: bool = field(
        default=False,
        metadata={
            "help": "Skip (and count per reason) bad records and unreadable images instead of failing."
        },
    )
    check_images: bool = field(
        default=True,
        metadata={
            "help": "Decode and size-check every image before step 0 (False: bad ones fail when drawn)."
        },
    )


@dataclass
class LoraArguments:
    use_lora: bool = field(default=False, metadata={"help": "Train LoRA adapters instead of the full language model."})
    q_lora: bool = field(
        default=False, metadata={"help": "QLoRA: load the base model in 4 bit (bitsandbytes, CUDA only)."}
    )
    lora_r: int = field(default=64, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_target_modules: str | None = field(
        default=None,
        metadata={"help": "PEFT target_modules regex (None: the family's LM attention and MLP projections)."},
    )
    lora_target_experts: bool = field(
        default=False,
        metadata={"help": "MoE models: LoRA on the routed experts too (fused 3-D weights, PEFT target_parameters)."},
    )

    def __post_init__(self):
        errors = []
        if self.lora_r < 1:
            errors.append(f"--lora_r {self.lora_r!r} must be >= 1")
        if not (math.isfinite(self.lora_alpha) and self.lora_alpha > 0):
            errors.append(f"--lora_alpha {self.lora_alpha!r} must be a finite number > 0")
        if not (math.isfinite(self.lora_dropout) and 0 <= self.lora_dropout < 1):
            errors.append(f"--lora_dropout {self.lora_dropout!r} must be in [0, 1)")
        if errors:
            raise ArgumentError("invalid arguments: " + "; ".join(errors))


@dataclass
class SCTuneConfig(TrainingArguments):
    """TrainingArguments plus the describer/locator cycle. One Trainer step is one optimizer step:
    a describer rollout gives ``ppo_epochs`` steps, a locator batch gives one."""

    # ---- alternation
    # The reference's names (caption_* / bbox_*) stay accepted as aliases.
    describer_update_steps: int = field(
        default=200,
        metadata={
            "help": "Describer rollouts per phase (ppo_epochs steps each).",
            "aliases": ["--caption_update_steps"],
        },
    )
    locator_update_steps: int = field(
        default=100,
        metadata={
            "help": "Locator steps per locator phase (0: describer only).",
            "aliases": ["--bbox_update_steps"],
        },
    )
    describer_lr: float = field(
        default=5e-7,
        metadata={"help": "Constant learning rate of the describer phase.", "aliases": ["--caption_lr"]},
    )
    locator_lr: float = field(
        default=1e-6, metadata={"help": "Constant learning rate of the locator phase.", "aliases": ["--bbox_lr"]}
    )
    # ---- describer (PPO-style, critic-free)
    reward: str = field(
        default="iou",
        metadata={
            "help": "Cycle reward: iou (paper) | giou ((GIoU+1)/2) | iou_squared | iou_threshold; no box scores 0."
        },
    )
    describer_baseline: str = field(
        default="snapshot_greedy",
        metadata={
            "help": "snapshot_greedy (paper) | policy_greedy (ReMax) | group_mean (RLOO) | none."
        },
    )
    num_generations: int = field(
        default=1,
        metadata={
            "help": "Sampled captions per box (K, one generate call; batch x K rows); group_mean needs K >= 2."
        },
    )
    scale_rewards_by_group_std: bool = field(
        default=False,
        metadata={"help": "Divide reward - baseline by the std of the box's K rewards (GRPO); K >= 2."},
    )
    kl_coef: float = field(
        default=0.01,
        metadata={"help": "Per-token KL penalty coefficient (the adaptive controller's start)."},
    )
    kl_controller: str = field(
        default="fixed",
        metadata={
            "help": "fixed (reference) | adaptive (proportional, toward --kl_target; Ziegler et al. 2019)."
        },
    )
    kl_target: float = field(
        default=6.0, metadata={"help": "Adaptive KL: target KL per sampled caption, in nats (Ziegler et al.: 6)."}
    )
    kl_horizon: float = field(
        default=10000.0, metadata={"help": "Adaptive KL: horizon in sampled captions (Ziegler et al.: 10000)."}
    )
    ppo_epochs: int = field(default=2, metadata={"help": "Optimizer steps on each describer rollout."})
    clip_range: float = field(default=0.2, metadata={"help": "PPO ratio clip epsilon."})
    gamma: float = field(default=1.0, metadata={"help": "Discount of the per-token rewards (the reference fixes 1)."})
    ratio_threshold: float = field(
        default=10.0, metadata={"help": "Skip the update (no optimizer step) when the mean policy ratio exceeds this."}
    )
    policy_kl_stop: float = field(
        default=1.5,
        metadata={
            "help": "Skip a rollout's remaining PPO epochs once KL(old policy || policy) exceeds this."
        },
    )
    # ---- speed
    vision_cache: bool = field(
        default=True,
        metadata={
            # The policy's trainable merger/resampler runs in each pass with gradients (a wholly frozen tower,
            # the snapshot's, is memoised whole); families without a trunk split
            # (ModelAdapter.vision_trunk is None) and --fix_vit False run the whole tower each time.
            "help": "With fix_vit: the frozen vision blocks run once per image per rollout (docs/performance.md)."
        },
    )
    snapshot_prompt_cache: bool = field(
        default=True,
        metadata={
            # Greedy captions: only with the snapshot-greedy baseline, K = 1, and a family whose adapter allows it
            # (ModelAdapter.resumes_from_scoring_cache). Locating: a family whose adapter moves cached columns
            # (ModelAdapter.moves_cached_prompt_columns: Qwen-VL, Qwen2/2.5/3-VL and the full-attention 1-D rotary
            # families, docs/performance.md). Elsewhere the prompts are prefilled again.
            "help": "Greedy captions and locating reuse the snapshot's scoring-pass cache (docs/performance.md)."
        },
    )
    static_decoding: str = field(
        default="auto",
        metadata={
            # sc_tune.decoding: transformers' StaticCache, fixed-shape decode steps, CUDA graphs on CUDA; a family
            # opts in (ModelAdapter.static_decoding_problem). auto: on CUDA where the family can; true: must.
            "help": "auto | true | false: rollouts decode from a static cache, steps replayed as CUDA graphs.",
            "choices": ["auto", "true", "false"],
        },
    )
    decoding_compile_backend: str | None = field(
        default=None,
        metadata={
            # sc_tune.decoding: the decode step's forward through torch.compile before it is captured (inductor fuses
            # the small elementwise kernels a captured eager step replays one by one). Needs static decoding and a
            # model that is not sharded; tokens equal the eager step's (tests/test_decoding.py, aot_eager on CPU).
            "help": "Decode steps via torch.compile (inductor).",
        },
    )
    fused_decoding: str = field(
        default="auto",
        metadata={
            # One loop for the policy's sampled captions and the greedy ones (the LoRA snapshot's, per-row adapters, or
            # the policy's own); the snapshot's greedy captions then skip the prompt cache. auto: with static decoding.
            "help": "auto | true | false: sampled and greedy captions decode in one loop (LoRA snapshot, policy_greedy).",
            "choices": ["auto", "true", "false"],
        },
    )
    generation_batch_size: int | None = field(
        default=None,
        metadata={
            # TRL's name. A multiple of the micro-batch dividing the accumulation window (sc_tune.cycle): each
            # micro-batch's rollout, and loss, is the one it would have alone; the generate calls get larger.
            "help": "Boxes per device rolled out in one generate call (default: the micro-batch), up to "
            "per_device_train_batch_size x gradient_accumulation_steps.",
        },
    )
    # ---- generation
    moe_aux_loss: bool = field(
        default=True,
        metadata={"help": "MoE, full fine-tuning: add the router's load-balancing loss to SC-Tune's losses."},
    )
    moe_aux_loss_coef: float | None = field(
        default=None, metadata={"help": "Its weight (default: the model config's router_aux_loss_coef)."}
    )
    skip_preflight: bool = field(
        default=False, metadata={"help": "Train even if the locator's answers do not parse before step 0."}
    )
    preflight_samples: int = field(default=16, metadata={"help": "Training samples the preflight answers."})
    preflight_max_parse_failures: float = field(
        default=0.5, metadata={"help": "Stop before step 0 above this share of unparsed locator answers."}
    )
    preflight_min_accuracy: float = field(
        default=0.05, metadata={"help": "Stop before step 0 if the answers parse but Acc@0.5 is below this."}
    )
    describer_top_k: int = field(default=100, metadata={"help": "Top-k of the describer's sampled caption."})
    describer_top_p: float = field(default=0.3, metadata={"help": "Top-p of the describer's sampled caption."})
    describer_temperature: float = field(
        default=1.0, metadata={"help": "Temperature of the describer's sampled caption."}
    )
    describer_max_new_tokens: int = field(
        default=30, metadata={"help": "Longest caption, in tokens (the end token comes on top)."}
    )
    describer_min_new_tokens: int = field(default=3, metadata={"help": "Shortest caption, in tokens."})
    locator_max_new_tokens: int = field(
        default=20, metadata={"help": "Locator budget, in tokens; raised to fit the family's widest answer, + 8."}
    )
    locator_min_new_tokens: int = field(default=3, metadata={"help": "Shortest locator answer, in tokens."})
    pseudo_label_min_iou: float = field(
        default=0.0,
        metadata={"help": "Locator phase: train only on pseudo-labels the snapshot grounds back at IoU >= this (0: all)."},
    )
    # ---- pictures
    log_rollouts_steps: int = field(
        default=0,
        metadata={
            "help": "Every N steps a PNG grid of describer rollouts in output_dir/rollouts (0: never)."
        },
    )
    # ---- reference defaults for inherited fields
    max_steps: int = field(
        default=4000,
        metadata={
            "help": "Optimizer steps (the reference's 2,400 batches = 8 cycles = 4,000 steps)."
        },
    )
    adam_beta2: float = field(default=0.95, metadata={"help": "Adam beta2 (reference: 0.95)."})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay (reference: 0.1)."})
    logging_steps: float = field(default=1, metadata={"help": "Log every N steps."})
    save_steps: float = field(default=500, metadata={"help": "Checkpoint every N steps (500 = one default cycle)."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Must stay False: samples carry PIL images."})
    # ---- inherited fields that SC-Tune sets itself: the phases own the learning rate (a constant LR per
    # phase, Adam moments reset at each switch). They default to None so that a value the user typed can be
    # told apart from the default, and is refused instead of being silently replaced (issue 11).
    learning_rate: float | None = field(
        default=None, metadata={"help": "Not used: set --describer_lr / --locator_lr (any other value is an error)."}
    )
    lr_scheduler_type: str | None = field(
        default=None,
        metadata={"help": "Not used: each phase runs at a constant LR (only 'constant' is accepted)."},
    )
    lr_scheduler_kwargs: dict | str | None = field(
        default=None, metadata={"help": "Not used: SC-Tune's phase LR has no scheduler arguments (must stay unset)."}
    )
    warmup_steps: float | None = field(
        default=None,
        metadata={"help": "Not used: each phase starts at its full LR (only 0 is accepted)."},
    )
    # ---- checkpoints and resume (sc_tune.checkpoints)
    resume_from_checkpoint: str | None = field(
        default=None,
        metadata={
            "help": "True (or true, 1): resume from the newest complete checkpoint-N in --output_dir, skipping "
            "broken ones with a warning; auto: the same where there is a checkpoint-N, a new run where there is "
            "none (a requeued job); or the path of a checkpoint-N folder (an error if it is broken)."
        },
    )
    resume_allow_changes: str = field(
        default="",
        metadata={
            # The recorded settings: sc_tune.resume.run_settings (docs/usage.md lists them).
            "help": "Settings a resume may change, comma-separated, named as a refusal names them (e.g. seed,data)."
        },
    )
    save_on_signal: str = field(
        default="SIGTERM,SIGUSR1",
        metadata={
            # sc_tune.preemption: a scheduler's stop signal costs one step, not the steps since the last save.
            "help": "Signals that save the step in progress and stop the run, unexported (none: off)."
        },
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Replace the run in --output_dir (deleting its checkpoints) instead of refusing."
        },
    )

    def __post_init__(self):
        # Refuse, rather than silently override, the Trainer's LR knobs. A value equal to what SC-Tune sets is
        # accepted, so that re-creating the config from its own fields (e.g. dataclasses.replace) still works.
        refused = {
            "learning_rate": (self.learning_rate not in (None, self.describer_lr),
                              "the learning rate is set per phase: use --describer_lr and --locator_lr"),
            "lr_scheduler_type": (self.lr_scheduler_type not in (None, "constant"),
                                  "each phase runs at a constant LR (--describer_lr / --locator_lr)"),
            "lr_scheduler_kwargs": (self.lr_scheduler_kwargs not in (None, {}, ""),
                                    "SC-Tune's phase LR takes no scheduler arguments"),
            "warmup_steps": (self.warmup_steps not in (None, 0),
                             "each phase starts at its full LR; there is no warmup"),
        }
        for name, (is_set, why) in refused.items():
            if is_set:
                raise ArgumentError(f"--{name} {getattr(self, name)!r} is not used by SC-Tune: {why}")
        self.learning_rate = self.describer_lr  # only seeds the optimizer's param groups; the phases set the LR
        self.lr_scheduler_type = "constant"
        self.lr_scheduler_kwargs = {}
        self.warmup_steps = 0
        self._check_hyperparameters()
        super().__post_init__()
        if self.describer_update_steps == 0 and self.locator_update_steps == 0:
            raise ArgumentError("describer_update_steps and locator_update_steps cannot both be 0")
        from sc_tune.baselines import DescriberBaseline
        from sc_tune.kl_control import KL_CONTROLLERS
        from sc_tune.rewards import REWARDS

        if self.reward not in REWARDS:
            raise ArgumentError(f"--reward must be one of {', '.join(REWARDS)}, got {self.reward!r}")
        choices = [b.value for b in DescriberBaseline]
        if self.describer_baseline not in choices:
            raise ArgumentError(
                f"--describer_baseline must be one of {', '.join(choices)}, got {self.describer_baseline!r}"
            )
        if self.num_generations < 1:
            raise ArgumentError("--num_generations must be >= 1")
        if self.num_generations < 2 and (self.describer_baseline == "group_mean" or self.scale_rewards_by_group_std):
            raise ArgumentError(
                "--describer_baseline group_mean and --scale_rewards_by_group_std need --num_generations >= 2"
            )
        if self.kl_controller not in KL_CONTROLLERS:
            raise ArgumentError(f"--kl_controller must be one of {', '.join(KL_CONTROLLERS)}, got {self.kl_controller!r}")
        for name in ("static_decoding", "fused_decoding"):
            value = str(getattr(self, name)).lower()
            if value not in ("auto", "true", "false"):
                raise ArgumentError(f"--{name} must be auto, true or false, got {getattr(self, name)!r}")
            setattr(self, name, value)
        if self.decoding_compile_backend in ("", "none", "None"):
            self.decoding_compile_backend = None
        if self.decoding_compile_backend is not None and self.static_decoding == "false":
            raise ArgumentError("--decoding_compile_backend compiles the static decoding step: it needs "
                                "--static_decoding auto or true, got false")
        micro = self.per_device_train_batch_size
        window = micro * self.gradient_accumulation_steps
        if self.generation_batch_size is None:
            self.generation_batch_size = micro
        gen = self.generation_batch_size
        if gen < 1 or gen % micro or window % gen:
            raise ArgumentError(
                f"--generation_batch_size {self.generation_batch_size} must be a multiple of "
                f"--per_device_train_batch_size ({micro}) that divides per_device_train_batch_size x "
                f"gradient_accumulation_steps ({window})"
            )
        if self.max_steps <= 0:
            raise ArgumentError("set --max_steps: SC-Tune streams its data and stops by step count")
        if self.remove_unused_columns:
            raise ArgumentError("--remove_unused_columns must be False: SC-Tune samples carry PIL images")
        if self.save_only_model:
            # A checkpoint without them cannot resume exactly, and SC-Tune verifies every checkpoint it writes: the
            # first save would stop the run, after save_steps of training. The final export is the model alone.
            raise ArgumentError("--save_only_model is not supported: SC-Tune's checkpoints hold the optimizer, "
                                "scheduler and RNG states so that a run resumes exactly; the output folder's export "
                                "is already the model alone (raise --save_steps to save less often)")
        if self.ignore_data_skip:
            # The Trainer would restart the data stream at its first batch: a resume would no longer be exact.
            raise ArgumentError("--ignore_data_skip is not supported: a resume continues the data stream exactly "
                                "where the checkpoint left it")
        if self.save_on_each_node:
            # Each node's first process would stage, verify and rename the same checkpoint-N: SC-Tune's checkpoints are
            # written by every rank into one folder on a file system all nodes share, and committed by rank 0.
            raise ArgumentError("--save_on_each_node is not supported: every node must see one shared --output_dir, "
                                "where rank 0 commits each checkpoint")

    def _check_hyperparameters(self) -> None:
        """Values that would train the wrong way silently (a negative LR ascends, an infinite one writes
        non-finite weights) or crash mid-run. Every float knob must be finite first (``inf > 0`` is true), except
        +inf for a guard (turning it off)."""
        floats = ("describer_lr", "locator_lr", "pseudo_label_min_iou", "kl_coef", "kl_target", "kl_horizon", "clip_range", "gamma",
                  "ratio_threshold", "policy_kl_stop", "describer_top_p", "describer_temperature", "weight_decay",
                  "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm")
        # Guards whose +inf has a meaning, "never": never skip an update, never stop the epochs, never clip.
        guards = ("ratio_threshold", "policy_kl_stop", "max_grad_norm")
        not_finite = {name for name in floats
                      if not math.isfinite(getattr(self, name)) and not (name in guards and getattr(self, name) > 0)}
        rules = [
            ("describer_lr", self.describer_lr > 0, "must be > 0"),
            ("locator_lr", self.locator_lr > 0, "must be > 0"),
            ("kl_coef", self.kl_coef >= 0, "must be >= 0"),
            ("kl_target", self.kl_target > 0, "must be > 0"),
            ("kl_horizon", self.kl_horizon > 0, "must be > 0"),
            ("clip_range", self.clip_range > 0, "must be > 0"),
            ("gamma", 0 <= self.gamma <= 1, "must be in [0, 1]"),
            ("ratio_threshold", self.ratio_threshold > 0, "must be > 0"),
            ("policy_kl_stop", self.policy_kl_stop > 0, "must be > 0"),
            ("describer_top_p", 0 < self.describer_top_p <= 1, "must be in (0, 1]"),
            ("describer_top_k", self.describer_top_k >= 0, "must be >= 0 (0: no top-k filter)"),
            ("describer_temperature", self.describer_temperature > 0, "must be > 0"),
            ("weight_decay", self.weight_decay >= 0, "must be >= 0"),
            ("adam_beta1", 0 <= self.adam_beta1 < 1, "must be in [0, 1)"),
            ("adam_beta2", 0 <= self.adam_beta2 < 1, "must be in [0, 1)"),
            ("adam_epsilon", self.adam_epsilon > 0, "must be > 0"),
            ("gradient_accumulation_steps", self.gradient_accumulation_steps >= 1, "must be >= 1"),
            ("ppo_epochs", self.ppo_epochs >= 1, "must be >= 1"),
            ("describer_update_steps", self.describer_update_steps >= 0, "must be >= 0"),
            ("locator_update_steps", self.locator_update_steps >= 0, "must be >= 0"),
            ("per_device_train_batch_size", self.per_device_train_batch_size >= 1, "must be >= 1"),
            ("preflight_samples", self.preflight_samples >= 1, "must be >= 1"),
            ("preflight_max_parse_failures", 0 <= self.preflight_max_parse_failures <= 1, "must be in [0, 1]"),
            ("preflight_min_accuracy", 0 <= self.preflight_min_accuracy <= 1, "must be in [0, 1]"),
            ("moe_aux_loss_coef", self.moe_aux_loss_coef is None or self.moe_aux_loss_coef >= 0, "must be >= 0"),
            ("describer_max_new_tokens", self.describer_max_new_tokens >= 1, "must be >= 1"),
            ("locator_max_new_tokens", self.locator_max_new_tokens >= 1, "must be >= 1"),
            ("describer_min_new_tokens", 0 <= self.describer_min_new_tokens <= self.describer_max_new_tokens,
             f"must be in [0, --describer_max_new_tokens {self.describer_max_new_tokens}]"),
            ("pseudo_label_min_iou", 0 <= self.pseudo_label_min_iou <= 1, "must be in [0, 1]"),
            ("locator_min_new_tokens", 0 <= self.locator_min_new_tokens <= self.locator_max_new_tokens,
             f"must be in [0, --locator_max_new_tokens {self.locator_max_new_tokens}]"),
        ]
        errors = [f"--{name} {getattr(self, name)!r} must be a finite number" for name in floats if name in not_finite]
        errors += [f"--{name} {getattr(self, name)!r} {rule}" for name, ok, rule in rules
                   if not ok and name not in not_finite]
        if errors:
            raise ArgumentError("invalid arguments: " + "; ".join(errors))


# Flags that may differ between nodes and are compared otherwise or not at all: paths, which another node may mount or
# spell differently (what the output folder, records and images hold is compared: run_lock.hold,
# data.check_same_records_on_every_rank; the DeepSpeed config by its content, below), and what shapes only this
# process's loading, logging and progress bar. hub_token is a secret: never gathered, never printed.
PER_NODE_FLAGS = frozenset({
    "model_name_or_path", "data_path", "image_folder", "output_dir", "deepspeed", "resume_from_checkpoint",
    "local_rank", "dataloader_num_workers", "dataloader_pin_memory", "dataloader_persistent_workers",
    "dataloader_prefetch_factor", "disable_tqdm", "log_level", "log_level_replica", "report_to", "hub_token",
})


def _node_independent(parsed) -> dict[str, str]:
    """Every flag's value (``repr``) but ``PER_NODE_FLAGS``, the DeepSpeed config's content and which checkpoint a
    resume names, from the parsed argument dataclasses."""
    values = {f.name: repr(getattr(arguments, f.name)) for arguments in parsed for f in dataclasses.fields(arguments)
              if f.name not in PER_NODE_FLAGS}
    args = parsed[-1]
    config = getattr(args, "deepspeed", None)
    if isinstance(config, str) and os.path.isfile(config):
        with open(config) as f:
            config = json.load(f)
    values["deepspeed"] = json.dumps(config, sort_keys=True)
    resume = getattr(args, "resume_from_checkpoint", None)
    values["resume_from_checkpoint"] = repr(os.path.basename(os.path.normpath(resume)) if isinstance(resume, str)
                                            else resume)
    return values


def check_same_flags_on_every_rank(*parsed) -> None:
    """Refuse processes started with other flags (a collective; every process raises the same error).

    Each node runs its own command: a node with another MAX_STEPS, SAVE_STEPS or logging interval waits in a
    collective the others never reach (a hang until --ddp_timeout, 30 minutes, two emulated nodes on one machine
    2026-12-05), and one with another learning rate trains its replica with it, silently (DDP averages gradients,
    each optimizer applies its own rate). Checked before the model loads; an ArgumentError naming each flag and its
    values."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    views: list = [None] * dist.get_world_size()
    dist.all_gather_object(views, (socket.gethostname(), _node_independent(parsed)))
    names = sorted({name for _, values in views for name in values}
                   - {name for name in views[0][1] if all(values.get(name) == views[0][1][name] for _, values in views)})
    if not names:
        return
    shown = []
    for name in names[:5]:
        by_value: dict = {}
        for rank, (host, values) in enumerate(views):
            by_value.setdefault(values.get(name, "unset"), []).append(f"{rank} on {host}")
        shown.append(f"--{name}: " + "; ".join(f"{value} on rank {', '.join(ranks)}" for value, ranks in by_value.items()))
    more = f" (and {len(names) - 5} more)" if len(names) > 5 else ""
    raise ArgumentError(
        f"the processes were started with different settings: {' | '.join(shown)}{more}. Every node must run the "
        "same command (scripts/finetune_ds.sh: the same variables and EXTRA_ARGS on each; only NODE_RANK differs); "
        "a node with other steps waits in a collective the others never reach, one with another learning rate "
        "trains its copy of the model with it"
    )
