"""The ``--help`` layout of ``finetune.py``: :func:`build_parser`, its groups and the compact formatter.

SC-Tune's own knobs are printed first, in the groups below, then the Trainer options it inherits (about 200),
so that the first screen of ``finetune.py --help`` is SC-Tune's. ``evaluate.py`` shares the formatter.
"""

from __future__ import annotations

import argparse
import dataclasses

from transformers import HfArgumentParser, TrainingArguments

from sc_tune.arguments import DataArguments, LoraArguments, ModelArguments, SCTuneConfig

# A field is matched by any of its flags, so it stays in its group when renamed with the old name kept
# as an alias.
# A field SCTuneConfig declares that no group names lands in "SC-Tune: other knobs", still ahead of the
# Trainer options; an inherited field that SCTuneConfig re-declares lands in "Trainer options SC-Tune sets".
CYCLE_GROUP = "SC-Tune: cycle and phases"
PPO_GROUP = "SC-Tune: describer update (PPO-style)"
BASELINE_GROUP = "SC-Tune: describer baseline and KL controller (beyond the paper)"
GENERATION_GROUP = "SC-Tune: generation (describer captions, locator boxes)"
MODEL_DATA_GROUP = "SC-Tune: model and data"
LORA_GROUP = "SC-Tune: LoRA / QLoRA"
OTHER_GROUP = "SC-Tune: other knobs"
SET_BY_SC_TUNE_GROUP = "Trainer options SC-Tune sets (reference defaults, or refused because the phases own them)"
TRAINER_GROUP = "Trainer options (inherited from transformers.TrainingArguments)"

HELP_GROUPS = {
    CYCLE_GROUP: ("describer_update_steps", "locator_update_steps", "describer_lr", "locator_lr", "max_steps",
                  "pseudo_label_min_iou"),
    PPO_GROUP: ("reward", "kl_coef", "ppo_epochs", "clip_range", "gamma", "ratio_threshold", "policy_kl_stop"),
    BASELINE_GROUP: ("describer_baseline", "num_generations", "scale_rewards_by_group_std", "kl_controller",
                     "kl_target", "kl_horizon"),
    GENERATION_GROUP: ("describer_top_k", "describer_top_p", "describer_temperature", "describer_max_new_tokens",
                       "describer_min_new_tokens", "locator_max_new_tokens", "locator_min_new_tokens"),
}
DATACLASS_GROUPS = {ModelArguments: MODEL_DATA_GROUP, DataArguments: MODEL_DATA_GROUP, LoraArguments: LORA_GROUP}
GROUP_ORDER = (CYCLE_GROUP, PPO_GROUP, BASELINE_GROUP, GENERATION_GROUP, MODEL_DATA_GROUP, LORA_GROUP, OTHER_GROUP,
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
