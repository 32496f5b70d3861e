import contextlib
import dataclasses
import io
import subprocess
import sys

import pytest
from transformers import TrainingArguments

from sc_tune.arguments import ArgumentError, DataArguments, LoraArguments, ModelArguments, SCTuneConfig
from sc_tune.help_layout import (CYCLE_GROUP, OTHER_GROUP, SET_BY_SC_TUNE_GROUP, TRAINER_GROUP, build_parser,
                                 help_group_of)
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def help_text() -> str:
    """What ``python finetune.py --help`` prints, from its ``cli`` in this process: a subprocess would spend ~10 s
    importing torch and transformers again (the process itself is tested below). The layout's width is fixed
    (``help_layout``); argparse names the program after ``sys.argv[0]``."""
    import finetune

    out = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(out), pytest.raises(SystemExit) as done:
        patch.setattr(sys, "argv", ["finetune.py", "--help"])
        finetune.cli(["--help"])
    assert done.value.code in (0, None)
    return out.getvalue()


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
    first_screen = help_text.splitlines()[:80]  # SC-Tune's groups, ahead of the ~120 inherited Trainer options
    head = "\n".join(first_screen)
    for f in sc_tune_fields():
        line = next((line for line in first_screen if line.split() and line.split()[0].rstrip(",") == f"--{f.name}"),
                    None)
        assert line is not None, f"--{f.name} is not in the first 80 lines of finetune.py --help"
    # Each knob shows its (reference) default, and the Trainer's own options come only after SC-Tune's.
    assert "(default: 200)" in head and "(default: 0.01)" in head and "(default: 5e-07)" in head
    assert "--per_device_train_batch_size" not in head
    lines = help_text.splitlines()
    assert lines.index(f"{TRAINER_GROUP}:") > max(i for i, line in enumerate(lines) if line.startswith("SC-Tune"))


def test_help_shows_each_flag_once_under_its_own_names_and_the_aliases_that_do_not_fit_in_its_text(help_text):
    """``help_layout.CompactHelpFormatter``: a flag and its alias side by side where they fit in 28 columns
    (``--describer_lr, --caption_lr`` is exactly 28), else the alias in the help text; a long flag with no alias gets
    no empty "Also:"; neither the dashed twins HfArgumentParser adds nor the ``--no_<flag>`` of a boolean."""
    lines = help_text.splitlines()
    assert "  --describer_lr, --caption_lr  Constant learning rate of the describer phase. (default: 5e-07)" in lines
    update_steps = next(line for line in lines if line.startswith("  --describer_update_steps "))
    assert update_steps.endswith("(default: 200) Also: --caption_update_steps.")
    assert lines[lines.index("  --preflight_max_parse_failures") + 1].split() == [
        "Stop", "before", "step", "0", "above", "this", "share", "of", "unparsed", "locator", "answers.", "(default:",
        "0.5)"]
    assert "Also: ." not in help_text and "--describer-lr" not in help_text and "--no_fix_vit" not in help_text
    # -h leads the Trainer's group, out of SC-Tune's first screen
    assert lines[lines.index(f"{TRAINER_GROUP}:") + 1].startswith("  -h, --help ")


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
                 "--describer_min_new_tokens", "--locator_max_new_tokens", "--image_max_pixels", "--image_min_pixels"):
        assert flag in finetune_flags
    with pytest.raises(ValueError, match="--image_min_pixels 9 is above --image_max_pixels 8"):
        evaluate.parse_args(["--task", "rec", "--model_name_or_path", "m", "--data_path", "a", "--output_dir", "o",
                             "--image_min_pixels", "9", "--image_max_pixels", "8"])
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


# ---------------------------------------------------------------------------------------------- issue 19, items 6, 9, 10
@pytest.mark.parametrize("argv, message", [
    (["--describer_lr", "inf", "--locator_lr", "inf"], "--describer_lr inf must be a finite number; --locator_lr inf"),
    (["--kl_coef", "inf"], "--kl_coef inf must be a finite number"),
    (["--kl_coef", "nan"], "--kl_coef nan must be a finite number"),
    (["--clip_range=-inf"], "--clip_range -inf must be a finite number"),
    (["--ratio_threshold", "nan"], "--ratio_threshold nan must be a finite number"),
    (["--policy_kl_stop=-inf"], "--policy_kl_stop -inf must be a finite number"),
    (["--describer_temperature", "0"], "--describer_temperature 0.0 must be > 0"),
    (["--describer_top_p", "1.5"], r"--describer_top_p 1.5 must be in \(0, 1\]"),
    (["--adam_beta2", "1"], r"--adam_beta2 1.0 must be in \[0, 1\)"),
    (["--max_grad_norm", "nan"], "--max_grad_norm nan must be a finite number"),
    (["--describer_min_new_tokens", "40"],
     r"--describer_min_new_tokens 40 must be in \[0, --describer_max_new_tokens 30\]"),
    (["--locator_min_new_tokens", "9", "--locator_max_new_tokens", "8"], "--locator_min_new_tokens 9 must be in"),
    (["--lora_dropout", "1.0"], r"--lora_dropout 1.0 must be in \[0, 1\)"),
    (["--lora_alpha", "0"], "--lora_alpha 0 must be a finite number > 0"),
    (["--image_max_pixels", "0"], "--image_max_pixels 0 must be >= 1"),
    (["--image_min_pixels", "401408", "--image_max_pixels", "200704"],
     "--image_min_pixels 401408 is above --image_max_pixels 200704"),
    # accepted until the first save, which SC-Tune's checkpoint verification then refused: save_steps of work lost
    (["--save_only_model", "True"], "--save_only_model is not supported: SC-Tune's checkpoints hold the optimizer"),
    (["--save_on_each_node", "True"], "--save_on_each_node is not supported: every node must see one shared"),
    (["--ignore_data_skip", "True"], "--ignore_data_skip is not supported: a resume continues the data stream"),
])
def test_values_that_would_train_wrongly_are_refused_naming_the_flag(tmp_path, argv, message):
    import finetune

    with pytest.raises(ValueError, match=message):
        finetune.parse_args(["--output_dir", str(tmp_path), "--use_cpu", "True", *argv])


def test_an_infinite_guard_means_never(tmp_path):
    """+inf turns a guard off (scripts/bench_step.py and gpu_check.py use it): never skip, never stop, never clip."""
    import finetune

    *_, args, _ = finetune.parse_args(["--output_dir", str(tmp_path), "--use_cpu", "True", "--ratio_threshold", "inf",
                                       "--policy_kl_stop", "inf", "--max_grad_norm", "inf"])
    assert args.ratio_threshold == args.policy_kl_stop == args.max_grad_norm == float("inf")


def test_the_reference_launch_flags_are_accepted_with_their_meaning(tmp_path):
    import finetune

    *_, args, notes = finetune.parse_args(["--output_dir", str(tmp_path), "--use_cpu", "True", "--model_max_length",
                                           "384", "--warmup_ratio", "0.0", "--evaluation_strategy=no"])
    assert args.warmup_steps == 0 and args.eval_strategy == "no"
    assert any("--model_max_length 384 has no effect" in n for n in notes) and len(notes) == 3


def test_the_reference_flags_are_taken_out_in_every_spelling_and_the_rest_kept_in_order():
    """``--flag=value`` takes one word, ``--flag value`` two, dashes stand for underscores, and whatever follows is
    kept for the parser; 1 is the smallest length accepted."""
    from sc_tune.reference_flags import take_reference_flags

    rest, notes = take_reference_flags(["--evaluation_strategy=No ", "--seed", "3", "--model-max-length", "1",
                                        "--warmup_ratio=0", "--bf16", "--model_max_length=5", "extra"])
    assert rest == ["--seed", "3", "--bf16", "extra"]
    assert notes[1].startswith("--model_max_length 1 has no effect") and notes[3].startswith("--model_max_length 5 ")
    assert notes[0].startswith("--evaluation_strategy no accepted") and notes[2] == "--warmup_ratio 0 accepted " \
        "(SC-Tune has no warmup)"


@pytest.mark.parametrize("argv, message", [
    (["--warmup_ratio", "0.03"], "--warmup_ratio 0.03 is not used by SC-Tune: each phase starts at its full"),
    (["--evaluation_strategy", "steps"], "--evaluation_strategy 'steps' is not used by SC-Tune"),
    (["--model_max_length", "big"], "--model_max_length 'big' must be a positive integer"),
    (["--model_max_length"], "--model_max_length needs a value"),
    (["--model_max_length", "0"], "--model_max_length '0' must be a positive integer"),
    (["--model_max_length=-384"], "--model_max_length '-384' must be a positive integer"),
    (["--warmup_ratio", "none"], r"--warmup_ratio 'none' must be a number \(and 0"),
    (["--warmup-ratio=-0.1"], "--warmup_ratio -0.1 is not used by SC-Tune"),
    (["--not_a_flag", "3"], r"unknown argument\(s\): --not_a_flag 3"),
])
def test_refused_and_unknown_flags_end_in_a_message_not_a_traceback(tmp_path, argv, message):
    import finetune

    with pytest.raises(ArgumentError, match=message):
        finetune.parse_args(["--output_dir", str(tmp_path), "--use_cpu", "True", *argv])


def test_the_command_line_prints_the_message_and_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, "finetune.py", "--output_dir", str(tmp_path), "--warmup_ratio", "0.1"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("finetune.py: error: --warmup_ratio 0.1 is not used")


def test_nodes_started_with_other_flags_are_refused_before_the_model_loads(tmp_path, monkeypatch):
    """Every node runs its own command. Two nodes emulated on one machine (2026-12-05): node 1 with MAX_STEPS=7 where
    node 0 had 5 waited in a collective node 0 never reached, a hang until --ddp_timeout (30 minutes); node 1 with
    another LOCATOR_LR trained to the end with it, silently. The processes compare their flags first, naming each
    one that differs; paths, which another node may mount elsewhere, are compared by what they hold instead."""
    import shutil

    import torch.distributed as dist

    import finetune
    from sc_tune.arguments import check_same_flags_on_every_rank

    zero2, zero3 = f"{ROOT}/scripts/ds_config_zero2.json", f"{ROOT}/scripts/ds_config_zero3.json"
    copied = str(shutil.copy(zero2, tmp_path / "zero2_elsewhere.json"))

    def node(*argv, output="out"):
        return finetune.parse_args(["--output_dir", str(tmp_path / output), "--use_cpu", "True", "--max_steps", "5",
                                    *argv])[:4]

    def check(node0, node1):  # as rank 0 sees it: its own flags, then those node 1 contributes from node-b
        contributed = []
        with monkeypatch.context() as two_processes:  # after parsing: transformers' own set-up must not see them
            two_processes.setattr(dist, "is_initialized", lambda: True)
            two_processes.setattr(dist, "get_world_size", lambda: 2)
            two_processes.setattr(dist, "all_gather_object", lambda out, mine: (contributed.append(mine),
                                                                                out.__setitem__(slice(None), [mine] * 2)))
            check_same_flags_on_every_rank(*node1)
            two_processes.setattr(dist, "all_gather_object", lambda out, mine: out.__setitem__(
                slice(None), [mine, ("node-b", contributed[0][1])]))
            check_same_flags_on_every_rank(*node0)

    # the same command, with paths spelled or mounted otherwise and per-node loading and logging: fine
    check(node("--deepspeed", zero2, "--data_path", "a.json", "--resume_from_checkpoint", "out/checkpoint-4"),
          node("--deepspeed", copied, "--data_path", "/mnt/a.json", "--resume_from_checkpoint",
               str(tmp_path / "out" / "checkpoint-4"), "--dataloader_num_workers", "2", "--hub_token", "secret",
               output="elsewhere"))
    for node1, message in [
        (node("--max_steps", "7"), r"different settings: --max_steps: 5 on rank 0 on \S+; 7 on rank 1 on node-b\. "),
        (node("--locator_lr", "1e-2"), "--locator_lr: 1e-06 on rank 0 on .*; 0.01 on rank 1 on node-b"),
        (node("--save_steps", "2", "--logging_steps", "3"), "--logging_steps: .* [|] --save_steps: "),
        (node("--deepspeed", zero3), "--deepspeed: "),  # the config's content: another ZeRO stage
        (node("--resume_from_checkpoint", "True"), "--resume_from_checkpoint: None on rank 0 .*'True' on rank 1"),
        (node("--save_on_signal", "none"), "--save_on_signal: "),  # the stop's agreement is a collective
    ]:
        with pytest.raises(ArgumentError, match=message) as refused:
            check(node("--deepspeed", zero2) if "--deepspeed" in message else node(), node1)
        assert "secret" not in str(refused.value)
