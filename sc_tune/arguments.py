"""Every SC-Tune knob, as dataclasses parsed by one ``HfArgumentParser`` (see ``finetune.py``).

``SCTuneConfig`` extends ``transformers.TrainingArguments``, so the method's constants land in the
``training_args.bin`` saved with every checkpoint. Defaults are the reference release's
(``../shared/docs/method.md`` §1.7) unless a field says otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments


class ArgumentError(ValueError):
    """A command-line value that would train the wrong way or crash mid-run; the message names the flag."""


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        default="Qwen-VL-Chat",
        metadata={"help": "Checkpoint folder (Qwen-VL-Chat, Qwen2-VL, Qwen2.5-VL or Qwen3-VL). Loaded from disk only."},
    )
    fix_vit: bool = field(
        default=True,
        metadata={"help": "Freeze the vision tower except its resampler/merger (the reference's default)."},
    )


@dataclass
class DataArguments:
    data_path: str = field(
        default="data/object365.json",
        metadata={
            "help": "Annotation JSON: a list of {'image': relative path, 'bbox': [x1,y1,x2,y2] in [0,1]} "
            "('image_id' is accepted for 'image')."
        },
    )
    image_folder: str = field(
        default="data/objects365",
        metadata={"help": "Folder the records' image paths are relative to.", "aliases": ["--train_data_path"]},
    )
    skip_bad_records: bool = field(
        default=False,
        metadata={
            "help": "Drop (and count, per reason, with their indices) records with a bad field or a missing, "
            "undecodable or wrongly sized image instead of stopping with an error."
        },
    )
    check_images: bool = field(
        default=True,
        metadata={
            "help": "Decode every record's image before step 0 (in parallel threads) and check its size against "
            "the family's processor; False skips the check (bad images then fail when drawn)."
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
        metadata={"help": "PEFT target_modules regex; default: the family's attention and MLP projections of the LM."},
    )


@dataclass
class SCTuneConfig(TrainingArguments):
    """TrainingArguments plus the describer/locator cycle. One Trainer step is one optimizer step:
    a describer rollout gives ``ppo_epochs`` steps, a locator batch gives one."""

    # ---- alternation
    caption_update_steps: int = field(
        default=200,
        metadata={"help": "Describer rollouts (batches) per describer phase; each gives ppo_epochs optimizer steps."},
    )
    bbox_update_steps: int = field(
        default=100,
        metadata={"help": "Locator batches (optimizer steps) per locator phase; 0 trains the describer only."},
    )
    caption_lr: float = field(default=5e-7, metadata={"help": "Constant learning rate of the describer phase."})
    bbox_lr: float = field(default=1e-6, metadata={"help": "Constant learning rate of the locator phase."})
    # ---- describer (PPO-style, critic-free)
    kl_coef: float = field(
        default=0.01, metadata={"help": "Fixed coefficient of the per-token KL penalty in the reward."}
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
            "help": "Skip the remaining PPO epochs of a rollout once KL(pre-update policy || policy) exceeds this."
        },
    )
    # ---- generation
    describer_top_k: int = field(default=100, metadata={"help": "Top-k of the describer's sampled caption."})
    describer_top_p: float = field(default=0.3, metadata={"help": "Top-p of the describer's sampled caption."})
    describer_temperature: float = field(
        default=1.0, metadata={"help": "Temperature of the describer's sampled caption."}
    )
    describer_max_new_tokens: int = field(default=30, metadata={"help": "Longest caption, in tokens."})
    describer_min_new_tokens: int = field(default=3, metadata={"help": "Shortest caption, in tokens."})
    locator_max_new_tokens: int = field(default=20, metadata={"help": "Longest locator answer, in tokens."})
    locator_min_new_tokens: int = field(default=3, metadata={"help": "Shortest locator answer, in tokens."})
    # ---- pictures
    log_rollouts_steps: int = field(
        default=0,
        metadata={
            "help": "Every N steps write a PNG grid of a few describer rollouts to output_dir/rollouts (0: never)."
        },
    )
    # ---- reference defaults for inherited fields
    max_steps: int = field(
        default=4000,
        metadata={
            "help": "Optimizer steps. The reference stopped after 2,400 batches = 8 cycles = 4,000 steps at the default phase lengths."
        },
    )
    adam_beta2: float = field(default=0.95, metadata={"help": "Adam beta2 (reference: 0.95)."})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay (reference: 0.1)."})
    logging_steps: float = field(default=1, metadata={"help": "Log every N steps."})
    save_steps: float = field(default=500, metadata={"help": "Checkpoint every N steps (500 = one default cycle)."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Must stay False: samples carry PIL images."})
    # ---- checkpoints and resume (sc_tune.checkpoints)
    resume_from_checkpoint: str | None = field(
        default=None,
        metadata={
            "help": "True (or true, 1): resume from the newest complete checkpoint-N in --output_dir, skipping "
            "broken ones with a warning; or the path of a checkpoint-N folder (an error if it is broken)."
        },
    )
    resume_allow_changes: str = field(
        default="",
        metadata={
            "help": "Comma-separated settings a resume may change from the checkpoint's (default: none). Recorded: "
            "model (e.g. a moved model folder), model_type, lora, schedule, kl_coef, clip_range, gamma, "
            "per_device_train_batch_size, gradient_accumulation_steps, seed, world_size, precision, deepspeed. "
            "world_size changes only at a phase switch without DeepSpeed."
        },
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Train into an --output_dir that holds another run: its checkpoint-N folders are deleted first "
            "(without this flag, and without --resume_from_checkpoint, such a folder is refused)."
        },
    )

    def __post_init__(self):
        # The phases own the learning rate; --learning_rate only seeds the optimizer's param groups.
        self.learning_rate = self.caption_lr
        self.lr_scheduler_type = "constant"
        self.warmup_steps = 0
        self._check_hyperparameters()
        super().__post_init__()
        if self.caption_update_steps == 0 and self.bbox_update_steps == 0:
            raise ValueError("caption_update_steps and bbox_update_steps cannot both be 0")
        if self.max_steps <= 0:
            raise ValueError("set --max_steps: SC-Tune streams its data and stops by step count")
        if self.remove_unused_columns:
            raise ValueError("--remove_unused_columns must be False: SC-Tune samples carry PIL images")

    def _check_hyperparameters(self) -> None:
        """Values that would train the wrong way silently (a negative LR ascends) or crash mid-run."""
        rules = [
            ("caption_lr", self.caption_lr > 0, "must be > 0"),
            ("bbox_lr", self.bbox_lr > 0, "must be > 0"),
            ("kl_coef", self.kl_coef >= 0, "must be >= 0"),
            ("clip_range", self.clip_range > 0, "must be > 0"),
            ("gamma", 0 <= self.gamma <= 1, "must be in [0, 1]"),
            ("ratio_threshold", self.ratio_threshold > 0, "must be > 0"),
            ("policy_kl_stop", self.policy_kl_stop > 0, "must be > 0"),
            ("gradient_accumulation_steps", self.gradient_accumulation_steps >= 1, "must be >= 1"),
            ("ppo_epochs", self.ppo_epochs >= 1, "must be >= 1"),
            ("caption_update_steps", self.caption_update_steps >= 0, "must be >= 0"),
            ("bbox_update_steps", self.bbox_update_steps >= 0, "must be >= 0"),
            ("per_device_train_batch_size", self.per_device_train_batch_size >= 1, "must be >= 1"),
        ]
        errors = [f"--{name} {getattr(self, name)!r} {rule}" for name, ok, rule in rules if not ok]
        if errors:
            raise ArgumentError("invalid arguments: " + "; ".join(errors))
