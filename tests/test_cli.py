import dataclasses
import subprocess
import sys

import pytest
from transformers import TrainingArguments

from sc_tune.arguments import DataArguments, LoraArguments, ModelArguments, SCTuneConfig
from sc_tune.help_layout import (CYCLE_GROUP, OTHER_GROUP, SET_BY_SC_TUNE_GROUP, TRAINER_GROUP, build_parser,
                                 help_group_of)
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def help_text() -> str:
    result = subprocess.run([sys.executable, "finetune.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def sc_tune_fields() -> list[dataclasses.Field]:
    """The knobs SC-Tune adds: its three argument dataclasses and the fields SCTuneConfig declares itself."""
    base = {f.name for f in dataclasses.fields(TrainingArguments)}
    ours = [f for cls in (ModelArguments, DataArguments, LoraArguments) for f in dataclasses.fields(cls)]
    return ours + [f for f in dataclasses.fields(SCTuneConfig) if f.name not in base]


def test_help_documents_every_sc_tune_knob(help_text):
    overridden = {"max_steps", "adam_beta2", "weight_decay", "save_steps", "learning_rate", "lr_scheduler_type",
                  "warmup_steps"}
    fields = sc_tune_fields() + [f for f in dataclasses.fields(SCTuneConfig) if f.name in overridden]
    assert len(fields) >= 36
    for f in fields:
        assert f.metadata.get("help"), f"{f.name} has no help text"
        assert f"--{f.name}" in help_text, f"--{f.name} missing from finetune.py --help"


def test_help_leads_with_the_sc_tune_knobs_and_their_defaults(help_text):
    first_screen = help_text.splitlines()[:75]  # SC-Tune's groups, ahead of the ~120 inherited Trainer options
    head = "\n".join(first_screen)
    for f in sc_tune_fields():
        line = next((line for line in first_screen if line.split() and line.split()[0].rstrip(",") == f"--{f.name}"),
                    None)
        assert line is not None, f"--{f.name} is not in the first 75 lines of finetune.py --help"
    # Each knob shows its (reference) default, and the Trainer's own options come only after SC-Tune's.
    assert "(default: 200)" in head and "(default: 0.01)" in head and "(default: 5e-07)" in head
    assert "--per_device_train_batch_size" not in head
    lines = help_text.splitlines()
    assert lines.index(f"{TRAINER_GROUP}:") > max(i for i, line in enumerate(lines) if line.startswith("SC-Tune"))


def test_help_groups_follow_where_a_field_is_declared():
    assert help_group_of("describer_lr", ["--describer_lr"]) == CYCLE_GROUP
    # a renamed field keeps its group through the old name, kept as an alias
    assert help_group_of("describer_lr", ["--describer_lr", "--caption_lr"]) == CYCLE_GROUP
    assert help_group_of("log_rollouts_steps", ["--log_rollouts_steps"]) == OTHER_GROUP  # declared, not listed
    assert help_group_of("weight_decay", ["--weight_decay"]) == SET_BY_SC_TUNE_GROUP  # inherited, re-declared
    assert help_group_of("adam_beta1", ["--adam_beta1"]) == TRAINER_GROUP  # inherited as is


@pytest.mark.parametrize("flag, value, hint", [
    ("--learning_rate", "1e-4", "--describer_lr"),
    ("--lr_scheduler_type", "cosine", "constant LR"),
    ("--warmup_steps", "100", "no warmup"),
    ("--lr_scheduler_kwargs", '{"num_cycles": 2}', "no scheduler arguments"),
])
def test_trainer_flags_that_sc_tune_sets_are_refused(tmp_path, flag, value, hint):
    with pytest.raises(ValueError, match=hint) as error:
        build_parser().parse_args_into_dataclasses(["--output_dir", str(tmp_path), flag, value])
    assert flag in str(error.value)


def test_sc_tune_sets_the_lr_knobs_itself(tmp_path):
    *_, args = build_parser().parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--describer_lr", "3e-6", "--lr_scheduler_type", "constant",
         "--warmup_steps", "0"]
    )
    assert (args.learning_rate, args.lr_scheduler_type, args.warmup_steps) == (3e-6, "constant", 0)
    # re-creating the config from its own fields (what dataclasses.replace does) is not a user override
    assert dataclasses.replace(args, locator_lr=2e-6).learning_rate == 3e-6


def test_evaluate_takes_finetune_flag_names_and_the_earlier_spellings():
    import evaluate

    new = evaluate.parse_args(["--task", "rec", "--model_name_or_path", "m", "--data_path", "a.jsonl", "b.jsonl",
                               "--image_folder", "imgs", "--output_dir", "o", "--per_device_eval_batch_size", "2",
                               "--no_fit_locator_budget", "--no_meteor"])
    old = evaluate.parse_args(["rec", "--model", "m", "--data", "a.jsonl", "b.jsonl", "--image-root", "imgs",
                               "--output-dir", "o", "--batch-size", "2", "--no-fit-locator-budget", "--no-meteor"])
    assert new == old
    assert (new.model_name_or_path, new.data_path, new.image_folder, new.per_device_eval_batch_size) == (
        "m", ["a.jsonl", "b.jsonl"], "imgs", 2)
    assert not new.fit_locator_budget and not new.meteor
    # the flags that mean the same as finetune.py's are spelled the same
    finetune_flags = {o for a in build_parser()._actions for o in a.option_strings}
    for flag in ("--model_name_or_path", "--data_path", "--image_folder", "--output_dir", "--describer_max_new_tokens",
                 "--describer_min_new_tokens", "--locator_max_new_tokens"):
        assert flag in finetune_flags
    with pytest.raises(ValueError, match="takes one --data_path file"):
        evaluate.parse_args(["--task", "self-consistency", "--model_name_or_path", "m", "--data_path", "a", "b",
                             "--output_dir", "o"])


def test_the_reference_flag_names_are_aliases(tmp_path):
    """--caption_update_steps / --bbox_update_steps / --caption_lr / --bbox_lr (the reference's names) still work."""
    *_, args = build_parser().parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--caption_update_steps", "7", "--bbox_update_steps", "3",
         "--caption_lr", "2e-6", "--bbox_lr", "4e-6", "--use_cpu", "True", "--skip_preflight", "True"])
    assert (args.describer_update_steps, args.locator_update_steps) == (7, 3)
    assert (args.describer_lr, args.locator_lr) == (2e-6, 4e-6)
