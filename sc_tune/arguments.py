"""Every SC-Tune knob, as dataclasses parsed by one ``HfArgumentParser`` (see ``finetune.py``).

``SCTuneConfig`` extends ``transformers.TrainingArguments``, so the method's constants land in the
``training_args.bin`` saved with every checkpoint. Defaults are the reference release's
(``../shared/docs/method.md`` §1.7) unless a field says otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        default="Qwen-VL-Chat",
        metadata={"help": "Checkpoint folder of any supported family (README's family table). Loaded from disk only."},
    )
    box_format: str = field(
        default="native",
        metadata={
            "help": "Box text: 'native' (the family's own convention) or 'generic' ([x1, y1, x2, y2] on 0..1000). "
            "Evaluate with the same choice.",
            "choices": ["native", "generic"],
        },
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
            "help": "Drop (and count) records with a bad field or a missing image instead of stopping with an error."
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
    # ---- speed
    vision_cache: bool = field(
        default=True,
        metadata={
            "help": "With fix_vit, run the frozen vision blocks once per image per rollout and reuse their output in "
            "every pass (the trainable merger/resampler still runs each time). No effect for families without a "
            "trunk split (see ModelAdapter.vision_trunk) or with fix_vit off."
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

    def __post_init__(self):
        # The phases own the learning rate; --learning_rate only seeds the optimizer's param groups.
        self.learning_rate = self.caption_lr
        self.lr_scheduler_type = "constant"
        self.warmup_steps = 0
        super().__post_init__()
        if self.caption_update_steps < 0 or self.bbox_update_steps < 0:
            raise ValueError("caption_update_steps and bbox_update_steps must be >= 0")
        if self.caption_update_steps == 0 and self.bbox_update_steps == 0:
            raise ValueError("caption_update_steps and bbox_update_steps cannot both be 0")
        if self.ppo_epochs < 1:
            raise ValueError("ppo_epochs must be >= 1")
        if self.max_steps <= 0:
            raise ValueError("set --max_steps: SC-Tune streams its data and stops by step count")
        if self.remove_unused_columns:
            raise ValueError("--remove_unused_columns must be False: SC-Tune samples carry PIL images")
