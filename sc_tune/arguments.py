"""Every SC-Tune knob, as dataclasses parsed by one ``HfArgumentParser`` (:func:`build_parser`).

``SCTuneConfig`` extends ``transformers.TrainingArguments``, so the method's constants land in the
``training_args.bin`` saved with every checkpoint. Defaults are the reference release's
(``docs/method.md``, "Defaults") unless a field says otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field

from transformers import HfArgumentParser, TrainingArguments


class ArgumentError(ValueError):
    """A command-line value that would train the wrong way or crash mid-run; the message names the flag."""


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
    reward: str = field(
        default="iou",
        metadata={
            "help": "Cycle reward of a re-grounded box (sc_tune/rewards.py): iou (the paper's) | giou ((GIoU+1)/2) | "
            "iou_squared | iou_threshold (1 if IoU >= 0.5). A parse failure scores 0 and is counted."
        },
    )
    describer_baseline: str = field(
        default="snapshot_greedy",
        metadata={
            "help": "What a sampled caption's reward is compared with (sc_tune/baselines.py): snapshot_greedy (the "
            "paper's: the snapshot's greedy caption, located by the snapshot) | policy_greedy (ReMax/SCST: the "
            "current policy's greedy caption, located by the snapshot) | group_mean (RLOO: mean reward of the "
            "box's other num_generations-1 samples) | none (raw reward)."
        },
    )
    num_generations: int = field(
        default=1,
        metadata={
            "help": "Sampled captions per box (K), drawn in one generate call; a describer micro-batch has "
            "per_device_train_batch_size x K rows. group_mean needs K >= 2."
        },
    )
    scale_rewards_by_group_std: bool = field(
        default=False,
        metadata={"help": "Divide reward - baseline by the std of the box's K sampled rewards (GRPO); K >= 2."},
    )
    kl_coef: float = field(
        default=0.01,
        metadata={"help": "Coefficient of the per-token KL penalty in the reward (the adaptive controller's start)."},
    )
    kl_controller: str = field(
        default="fixed",
        metadata={
            "help": "fixed (the reference) | adaptive (Ziegler et al. 2019: coef *= 1 + clip(KL/kl_target - 1, "
            "-0.2, 0.2) * captions/kl_horizon after each rollout). The coefficient is logged as describer/kl_coef."
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
    # ---- inherited fields that SC-Tune sets itself: the phases own the learning rate (a constant LR per
    # phase, Adam moments reset at each switch). They default to None so that a value the user typed can be
    # told apart from the default, and is refused instead of being silently replaced (issue 11).
    learning_rate: float | None = field(
        default=None, metadata={"help": "Not used: set --caption_lr / --bbox_lr (any other value is an error)."}
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
        # Refuse, rather than silently override, the Trainer's LR knobs. A value equal to what SC-Tune sets is
        # accepted, so that re-creating the config from its own fields (e.g. dataclasses.replace) still works.
        refused = {
            "learning_rate": (self.learning_rate not in (None, self.caption_lr),
                              "the learning rate is set per phase: use --caption_lr and --bbox_lr"),
            "lr_scheduler_type": (self.lr_scheduler_type not in (None, "constant"),
                                  "each phase runs at a constant LR (--caption_lr / --bbox_lr)"),
            "lr_scheduler_kwargs": (self.lr_scheduler_kwargs not in (None, {}, ""),
                                    "SC-Tune's phase LR takes no scheduler arguments"),
            "warmup_steps": (self.warmup_steps not in (None, 0),
                             "each phase starts at its full LR; there is no warmup"),
        }
        for name, (is_set, why) in refused.items():
            if is_set:
                raise ArgumentError(f"--{name} {getattr(self, name)!r} is not used by SC-Tune: {why}")
        self.learning_rate = self.caption_lr  # only seeds the optimizer's param groups; the phases set the LR
        self.lr_scheduler_type = "constant"
        self.lr_scheduler_kwargs = {}
        self.warmup_steps = 0
        self._check_hyperparameters()
        super().__post_init__()
        if self.caption_update_steps == 0 and self.bbox_update_steps == 0:
            raise ArgumentError("caption_update_steps and bbox_update_steps cannot both be 0")
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
        if self.max_steps <= 0:
            raise ArgumentError("set --max_steps: SC-Tune streams its data and stops by step count")
        if self.remove_unused_columns:
            raise ArgumentError("--remove_unused_columns must be False: SC-Tune samples carry PIL images")

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


# ---------------------------------------------------------------------------------------------- --help layout
# SC-Tune's own knobs are printed first, in these groups, then the Trainer options it inherits. A field is
# matched by any of its flags, so it stays in its group when renamed with the old name kept as an alias.
# A field SCTuneConfig declares that no group names lands in "SC-Tune: other knobs", still ahead of the
# Trainer options; an inherited field that SCTuneConfig re-declares lands in "Trainer options SC-Tune sets".
CYCLE_GROUP = "SC-Tune: cycle and phases"
PPO_GROUP = "SC-Tune: describer update (PPO-style)"
GENERATION_GROUP = "SC-Tune: generation (describer captions, locator boxes)"
MODEL_DATA_GROUP = "SC-Tune: model and data"
LORA_GROUP = "SC-Tune: LoRA / QLoRA"
OTHER_GROUP = "SC-Tune: other knobs"
SET_BY_SC_TUNE_GROUP = "Trainer options SC-Tune sets (reference defaults, or refused because the phases own them)"
TRAINER_GROUP = "Trainer options (inherited from transformers.TrainingArguments)"

HELP_GROUPS = {
    CYCLE_GROUP: ("caption_update_steps", "bbox_update_steps", "caption_lr", "bbox_lr", "max_steps"),
    PPO_GROUP: ("reward", "kl_coef", "ppo_epochs", "clip_range", "gamma", "ratio_threshold", "policy_kl_stop"),
    GENERATION_GROUP: ("describer_top_k", "describer_top_p", "describer_temperature", "describer_max_new_tokens",
                       "describer_min_new_tokens", "locator_max_new_tokens", "locator_min_new_tokens"),
}
DATACLASS_GROUPS = {ModelArguments: MODEL_DATA_GROUP, DataArguments: MODEL_DATA_GROUP, LoraArguments: LORA_GROUP}
GROUP_ORDER = (CYCLE_GROUP, PPO_GROUP, GENERATION_GROUP, MODEL_DATA_GROUP, LORA_GROUP, OTHER_GROUP,
               SET_BY_SC_TUNE_GROUP, TRAINER_GROUP)


def _own_field_names(cls) -> set[str]:
    """Fields ``cls`` declares in its own body (not inherited)."""
    return set(cls.__dict__.get("__annotations__", {}))


def help_group_of(dest: str, option_strings: list[str]) -> str:
    """The --help group of one parsed option (``dest`` is its dataclass field)."""
    for cls, group in DATACLASS_GROUPS.items():
        if dest in {f.name for f in dataclasses.fields(cls)}:
            return group
    names = {option.lstrip("-") for option in option_strings} | {dest}
    for group, members in HELP_GROUPS.items():
        if names & set(members):
            return group
    if dest in _own_field_names(SCTuneConfig):
        trainer_fields = {f.name for f in dataclasses.fields(TrainingArguments)}
        return SET_BY_SC_TUNE_GROUP if dest in trainer_fields else OTHER_GROUP
    return TRAINER_GROUP


class CompactHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """One line per flag where possible, so that SC-Tune's knobs fit on the first screen of --help: the flag's
    name without its dashed twin or metavar (aliases that do not fit beside it go into the help text), help
    text from column 32 of 140, and no entry for the ``--no_<flag>`` twins of boolean flags."""

    NAME_WIDTH = 28

    def __init__(self, prog):
        super().__init__(prog, max_help_position=32, width=140)

    @staticmethod
    def _names(action) -> list[str]:
        # HfArgumentParser adds "--a-b" for every "--a_b"; keep the underscore spelling and real aliases.
        return [o for o in action.option_strings
                if "-" not in o[2:] or "--" + o[2:].replace("-", "_") not in action.option_strings]

    def _format_action_invocation(self, action):
        if not action.option_strings:
            return super()._format_action_invocation(action)
        names = self._names(action)
        return ", ".join(names) if len(", ".join(names)) <= self.NAME_WIDTH else names[0]

    def _get_help_string(self, action):
        text = super()._get_help_string(action)
        names = self._names(action) if action.option_strings else []
        if len(", ".join(names)) > self.NAME_WIDTH and len(names) > 1:
            text += " Also: " + ", ".join(names[1:]) + "."
        return text

    def add_argument(self, action):
        if not isinstance(action, argparse._StoreFalseAction):  # "--no_fix_vit" is "--fix_vit False"
            super().add_argument(action)


def build_parser() -> HfArgumentParser:
    """The one parser of ``finetune.py``: SC-Tune's groups first, each flag with its default, then the Trainer's."""
    parser = HfArgumentParser(
        (ModelArguments, DataArguments, LoraArguments, SCTuneConfig),
        usage="%(prog)s [SC-Tune options] [Trainer options]",  # argparse's own usage line lists all ~200 flags
        description="SC-Tune (describer <-> locator self-consistency). Defaults: the reference's (docs/method.md).",
        formatter_class=CompactHelpFormatter,
    )
    groups = {title: parser.add_argument_group(title) for title in GROUP_ORDER}
    options = parser._optionals  # HfArgumentParser puts every field there (no _argument_group_name)
    for action in list(options._group_actions):
        options._group_actions.remove(action)
        if isinstance(action, argparse._HelpAction):
            groups[TRAINER_GROUP]._group_actions.insert(0, action)
            continue
        groups[help_group_of(action.dest, action.option_strings)]._group_actions.append(action)
    # argparse prints groups in this list's order; -h moved to the Trainer group to keep the first screen SC-Tune's.
    parser._action_groups = list(groups.values())
    return parser
