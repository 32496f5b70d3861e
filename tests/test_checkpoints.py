"""Atomic, verified checkpoints and resume through finetune.main's command line (sc_tune.checkpoints)."""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import shutil
import time

import pytest
import torch

from sc_tune import checkpoints
from tests.conftest import SAMPLE_DATA, SAMPLE_IMAGES, WARM_START
from tests.helpers import run_launch


def cli_args(model: str, output_dir, *extra: str) -> list[str]:
    """A few-second CLI run: cycle = 1 describer rollout x 2 PPO epochs + 1 locator step."""
    return [
        *("--model_name_or_path", model, "--data_path", SAMPLE_DATA, "--image_folder", SAMPLE_IMAGES),
        *("--output_dir", str(output_dir), "--describer_update_steps", "1", "--locator_update_steps", "1"),
        *("--per_device_train_batch_size", "2", "--use_cpu", "True", "--describer_max_new_tokens", "4"),
        *("--skip_preflight", "True"),
        *("--locator_max_new_tokens", "6", "--report_to", "none", "--disable_tqdm", "True"),
        *("--describer_lr", "1e-3", "--locator_lr", "1e-3", "--save_strategy", "steps", "--save_steps", "2"),
        *("--dataloader_num_workers", "0", *extra),
    ]


def step_losses(output_dir) -> dict[int, float]:
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    return {h["step"]: h["loss"] for h in history if "loss" in h}


@pytest.fixture(scope="module")
def runs(tiny_checkpoint, tmp_path_factory):
    """An uninterrupted 6-step run, and a 4-step run that left checkpoint-2 and checkpoint-4."""
    import finetune

    model = tiny_checkpoint("qwen2_vl")
    full = tmp_path_factory.mktemp("full")
    finetune.main(cli_args(model, full, "--max_steps", "6"))
    first = tmp_path_factory.mktemp("first")
    finetune.main(cli_args(model, first, "--max_steps", "4"))
    return model, step_losses(full), first


@pytest.fixture
def steps_trained(monkeypatch) -> list[int]:
    """The steps (1-based) each ``training_step`` call of this test trains. A run started over from scratch reaches
    the same losses as a resumed one (training is deterministic on CPU): only this tells a resume from a restart."""
    from sc_tune.trainer import SCTuneTrainer

    trained: list[int] = []
    original = SCTuneTrainer.training_step

    def recording(self, *args, **kwargs):
        trained.append(self.state.global_step + 1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(SCTuneTrainer, "training_step", recording)
    return trained


def copy_run(first, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(first, out)
    return out


def test_resume_true_on_the_command_line_continues_exactly(runs, tmp_path, steps_trained):
    import finetune

    model, full, first = runs
    assert {"checkpoint-2", "checkpoint-4"} <= set(os.listdir(first))
    assert not [n for n in os.listdir(first) if n.endswith(".partial")]
    assert checkpoints.problems(str(first / "checkpoint-4")) == []
    out = copy_run(first, tmp_path)
    trainer = finetune.main(cli_args(model, out, "--max_steps", "6", "--resume_from_checkpoint", "True"))
    assert trainer.state.global_step == 6 and sorted(set(steps_trained)) == [5, 6]
    resumed = step_losses(out)
    assert [resumed[s] for s in (5, 6)] == pytest.approx([full[s] for s in (5, 6)], rel=1e-5, abs=1e-7)


def test_auto_resume_skips_a_broken_newest_checkpoint_and_explicit_path_refuses(runs, tmp_path, caplog, steps_trained):
    import finetune

    model, full, first = runs
    out = copy_run(first, tmp_path)
    os.remove(out / "checkpoint-4" / "optimizer.pt")
    with pytest.raises(checkpoints.CheckpointError, match=r"checkpoint-4.*missing optimizer\.pt"):
        finetune.main(cli_args(model, out, "--max_steps", "6", "--resume_from_checkpoint", str(out / "checkpoint-4")))
    with caplog.at_level(logging.WARNING):
        finetune.main(cli_args(model, out, "--max_steps", "6", "--resume_from_checkpoint", "true"))
    assert any("skipping" in r.message and "optimizer.pt" in r.message for r in caplog.records)
    assert sorted(set(steps_trained)) == [3, 4, 5, 6]  # from checkpoint-2
    resumed = step_losses(out)
    assert [resumed[s] for s in (3, 4, 5, 6)] == pytest.approx([full[s] for s in (3, 4, 5, 6)], rel=1e-5, abs=1e-7)


def _zero_block(path):
    data = bytearray(path.read_bytes())
    data[-64:] = bytes(64)
    path.write_bytes(data)


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


BREAKAGES = {
    "optimizer.pt missing": (lambda c: os.remove(c / "optimizer.pt"), "missing optimizer.pt"),
    "scheduler.pt missing": (lambda c: os.remove(c / "scheduler.pt"), "missing scheduler.pt"),
    "rng state missing": (lambda c: os.remove(c / "rng_state.pth"), "missing rng_state.pth"),
    "sc-tune state missing": (lambda c: os.remove(c / "sc_tune_state.json"), "missing sc_tune_state.json"),
    "snapshot missing": (lambda c: os.remove(c / "snapshot_rank0.pt"), "missing snapshot_rank0.pt"),
    "rollouts missing": (lambda c: os.remove(c / "rollouts_rank0.pt"), "missing rollouts_rank0.pt"),
    "config.json missing": (lambda c: os.remove(c / "config.json"), "missing config.json"),
    # No layout requires it; the manifest names it (as it names each DeepSpeed shard of a ZeRO checkpoint).
    "a file only the manifest names missing": (lambda c: os.remove(c / "tokenizer.json"), "missing tokenizer.json"),
    "weights truncated": (lambda c: _truncate(c / "model.safetensors"), "model.safetensors"),
    "weights block zeroed": (lambda c: _zero_block(c / "model.safetensors"), "model.safetensors: content changed"),
    "optimizer truncated": (lambda c: _truncate(c / "optimizer.pt"), "optimizer.pt"),
    "rollouts tampered": (lambda c: _zero_block(c / "rollouts_rank0.pt"), "rollouts_rank0.pt"),
    "marker missing (killed mid-save)": (lambda c: os.remove(c / checkpoints.MARKER_FILE), "sc_tune_complete.json"),
}


@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_every_broken_checkpoint_is_named_and_skipped(runs, tmp_path, caplog, breakage):
    _, _, first = runs
    out = copy_run(first, tmp_path)
    damage, expected = BREAKAGES[breakage]
    damage(out / "checkpoint-4")
    found = checkpoints.problems(str(out / "checkpoint-4"))
    assert any(expected in p for p in found), found
    with pytest.raises(checkpoints.CheckpointError, match="cannot resume from"):
        checkpoints.resolve_resume(str(out / "checkpoint-4"), str(out))
    with caplog.at_level(logging.WARNING):
        assert checkpoints.resolve_resume("1", str(out)) == str(out / "checkpoint-2")
    assert any(expected in r.message for r in caplog.records)


def test_no_complete_checkpoint_is_a_clear_error(runs, tmp_path):
    _, _, first = runs
    out = copy_run(first, tmp_path)
    for name in ("checkpoint-2", "checkpoint-4"):
        os.remove(out / name / "scheduler.pt")
    with pytest.raises(checkpoints.CheckpointError, match="no complete checkpoint"):
        checkpoints.resolve_resume(True, str(out))
    with pytest.raises(checkpoints.CheckpointError, match="no checkpoint-N folder"):
        checkpoints.resolve_resume("True", str(tmp_path / "empty"))
    assert checkpoints.resolve_resume("False", str(out)) is None


@pytest.mark.parametrize(
    "change, message",
    [
        (["--seed", "7"], "seed: checkpoint 42, now 7"),
        (["--per_device_train_batch_size", "1"], "per_device_train_batch_size: checkpoint 2, now 1"),
        (["--locator_update_steps", "2"], r"schedule: locator_steps \(--locator_update_steps\) checkpoint 1, now 2"),
        # the method's settings (recorded since 2026-12-05): each changed what a step computes, silently
        (["--describer_temperature", "0.5"], "describer_temperature: checkpoint 1.0, now 0.5"),
        (["--box_format", "generic"], "box_format: checkpoint 'native', now 'generic'"),
        (["--reward", "giou"], "reward: checkpoint 'iou', now 'giou'"),
        (["--fix_vit", "False"], "trainable_parameters: checkpoint "),
        (["--resume_allow_changes", "sead"], "--resume_allow_changes sead: no such run setting"),
        (["--kl_coef", "0.5"], "kl_coef: checkpoint 0.01, now 0.5"),
        (["--pseudo_label_min_iou", "0.5"], "pseudo_label_min_iou: checkpoint None, now 0.5"),
        (["--image_max_pixels", "3136"], r"image_pixels: checkpoint None, now \[None, 3136\]"),
    ],
)
def test_resume_refuses_changed_settings(runs, tmp_path, change, message):
    import finetune

    model, _, first = runs
    out = copy_run(first, tmp_path)
    argv = cli_args(model, out, "--max_steps", "5", "--resume_from_checkpoint", "True", *change)
    with pytest.raises(checkpoints.CheckpointError, match=message):
        finetune.main(argv)


def test_resume_refuses_other_data_or_another_model_at_the_same_path(runs, tmp_path):
    """The records and the model folder's files are run settings: an annotation file edited in place (one box) drew
    other batches from the same sampler indices, and a template or base model replaced in place trained on; both
    resumed silently. The same folder spelled another way (a trailing slash) is the same model."""
    import finetune

    model, _, first = runs
    data = tmp_path / "annotations.json"
    records = json.loads(open(SAMPLE_DATA).read())
    records[3]["bbox"] = [0.1, 0.1, 0.4, 0.4]
    data.write_text(json.dumps(records))
    out = copy_run(first, tmp_path)
    argv = cli_args(model, out, "--max_steps", "5", "--resume_from_checkpoint", "True", "--data_path", str(data))
    with pytest.raises(checkpoints.CheckpointError, match=r"data: sha256 checkpoint '[0-9a-f]+', now '[0-9a-f]+'"):
        finetune.main(argv)
    assert finetune.main([*argv, "--resume_allow_changes", "data"]).state.global_step == 5

    edited = tmp_path / "model"
    shutil.copytree(model, edited)
    out = copy_run(first, tmp_path / "again")
    argv = cli_args(str(edited) + "/", out, "--max_steps", "5", "--resume_from_checkpoint", "True",
                    "--resume_allow_changes", "model")  # the checkpoint names the original folder
    with open(edited / "chat_template.jinja", "a") as f:
        f.write("{#- an edit #}")
    with pytest.raises(checkpoints.CheckpointError, match=r"model_files: chat_template.jinja checkpoint '[0-9a-f]+'"):
        finetune.main(argv)
    shutil.copyfile(os.path.join(model, "chat_template.jinja"), edited / "chat_template.jinja")
    assert finetune.main(argv).state.global_step == 5  # the same files again

    # Another model of the same architecture at the same path: every weight file has the size it had.
    from safetensors.torch import load_file, save_file

    weights = edited / "model.safetensors"
    size = weights.stat().st_size
    save_file({name: tensor + 0.01 for name, tensor in load_file(weights).items()}, weights, metadata={"format": "pt"})
    assert weights.stat().st_size == size
    out = copy_run(first, tmp_path / "other_weights")
    argv = cli_args(str(edited), out, "--max_steps", "5", "--resume_from_checkpoint", "True",
                    "--resume_allow_changes", "model")
    with pytest.raises(checkpoints.CheckpointError, match=rf"model_files: model.safetensors checkpoint "
                                                          rf"'{size} bytes, sampled [0-9a-f]+', now '{size} bytes"):
        finetune.main(argv)

    out = copy_run(first, tmp_path / "slash")
    argv = cli_args(model + "/", out, "--max_steps", "5", "--resume_from_checkpoint", "True")
    assert finetune.main(argv).state.global_step == 5


def test_resume_auto_starts_a_run_where_there_is_no_checkpoint_and_continues_it_where_there_is(runs, tmp_path,
                                                                                             steps_trained):
    """One command for every start of a job a scheduler requeues: True fails on the first start (no checkpoint),
    none refuses the second (the folder holds a run)."""
    import finetune

    model, full, first = runs
    out = tmp_path / "fresh"
    assert finetune.main(cli_args(model, out, "--max_steps", "2", "--resume_from_checkpoint", "auto")
                         ).state.global_step == 2
    assert step_losses(out)[2] == pytest.approx(full[2], rel=1e-5, abs=1e-7)  # a new run, as without the flag
    out = copy_run(first, tmp_path)
    steps_trained.clear()
    trainer = finetune.main(cli_args(model, out, "--max_steps", "5", "--resume_from_checkpoint", "auto"))
    assert trainer.state.global_step == 5 and sorted(set(steps_trained)) == [5]
    assert step_losses(out)[5] == pytest.approx(full[5], rel=1e-5, abs=1e-7)  # continued from checkpoint-4


def test_resume_refuses_another_image_under_a_records_file_name(runs, tmp_path):
    """The records name their images; another file under the same name (a re-encoded or re-downloaded image folder)
    drew other samples from the same records and resumed silently. The image check's digest of the bytes is a run
    setting (image_files); the same bytes in another folder resume."""
    import finetune

    model, _, first = runs
    images = tmp_path / "images"
    shutil.copytree(SAMPLE_IMAGES, images)
    out = copy_run(first, tmp_path)
    argv = cli_args(model, out, "--max_steps", "5", "--resume_from_checkpoint", "True", "--image_folder", str(images))
    name = json.loads(open(SAMPLE_DATA).read())[0]["image"]
    original = (images / name).read_bytes()
    from PIL import Image

    with Image.open(images / name) as opened:
        opened.convert("RGB").rotate(90, expand=True).save(images / name)  # the same name and format, other pixels
    with pytest.raises(checkpoints.CheckpointError, match=r"image_files: sha256 checkpoint '[0-9a-f]+', now"):
        finetune.main(argv)
    (images / name).write_bytes(original)
    assert finetune.main(argv).state.global_step == 5  # the same bytes in another folder

    with Image.open(images / name) as opened:
        opened.convert("RGB").rotate(90, expand=True).save(images / name)
    out = copy_run(first, tmp_path / "allowed")  # other data: other records and other images alike
    argv = cli_args(model, out, "--max_steps", "5", "--resume_from_checkpoint", "True", "--image_folder", str(images),
                    "--resume_allow_changes", "data")
    assert finetune.main(argv).state.global_step == 5

    out = copy_run(first, tmp_path / "unchecked")  # no image check, no digest: not compared
    argv = cli_args(model, out, "--max_steps", "5", "--resume_from_checkpoint", "True", "--check_images", "False")
    assert finetune.main(argv).state.global_step == 5


def test_a_learning_rate_may_change_with_the_schedule_allowed_and_the_phases_may_not(runs, tmp_path):
    """--resume_allow_changes schedule was accepted, then every run died at its first step in the restore, which
    compared the whole schedule: a learning rate can now change; a phase length is refused by its flag, at once."""
    import finetune

    model, _, first = runs
    out = copy_run(first, tmp_path)
    argv = cli_args(model, out, "--max_steps", "5", "--resume_from_checkpoint", "True", "--resume_allow_changes",
                    "schedule")
    with pytest.raises(checkpoints.CheckpointError, match="--ppo_epochs cannot change on resume"):
        finetune.main([*argv, "--ppo_epochs", "1"])
    trainer = finetune.main([*argv, "--locator_lr", "5e-4"])
    assert trainer.state.global_step == 5


def test_an_older_checkpoint_of_the_same_folder_is_refused_while_later_ones_are_there(runs, tmp_path):
    """Resuming checkpoint-2 into the folder that holds checkpoint-4 started a branch beside the old timeline: a later
    --resume_from_checkpoint True took checkpoint-4 (or rotation deleted the branch). Refused, deleting nothing; into
    another output folder it resumes."""
    import finetune

    model, _, first = runs
    out = copy_run(first, tmp_path)
    argv = cli_args(model, out, "--max_steps", "3", "--resume_from_checkpoint", str(out / "checkpoint-2"))
    with pytest.raises(checkpoints.CheckpointError, match=r"holds later checkpoints of the run \(checkpoint-4\)"):
        finetune.main(argv)
    assert {"checkpoint-2", "checkpoint-4"} <= set(os.listdir(out))
    other = cli_args(model, tmp_path / "branch", "--max_steps", "3", "--resume_from_checkpoint",
                     str(out / "checkpoint-2"))
    assert finetune.main(other).state.global_step == 3


def test_a_checkpoint_from_elsewhere_is_not_resumed_into_a_folder_holding_another_run(runs, tmp_path):
    """Resuming a checkpoint of another folder skipped the output-folder check: the resumed run saved beside the
    folder's own run, whose checkpoints its rotation deleted and whose newest a later --resume_from_checkpoint True
    took. Refused like a fresh start, deleting nothing; --overwrite_output_dir replaces the old run."""
    import finetune

    model, _, first = runs
    other_run = copy_run(first, tmp_path / "other")
    before = _tree_digest(other_run)
    argv = cli_args(model, other_run, "--max_steps", "3", "--resume_from_checkpoint", str(first / "checkpoint-2"))
    with pytest.raises(checkpoints.OutputDirError, match=r"holds another run \(checkpoint-2, checkpoint-4.*is not one "
                       r"of its checkpoints"):
        finetune.main(argv)
    assert _tree_digest(other_run) == before
    trainer = finetune.main([*argv, "--overwrite_output_dir", "True"])
    assert trainer.state.global_step == 3
    assert "checkpoint-4" not in os.listdir(other_run)


def test_a_resume_saves_at_its_own_save_steps(runs, tmp_path):
    """The Trainer took save_steps from the checkpoint's trainer_state.json: a resume with a lower --save_steps (to
    lose less to a preemption) kept saving at the old interval, silently."""
    import finetune

    model, _, first = runs
    out = copy_run(first, tmp_path)
    argv = cli_args(model, out, "--max_steps", "6", "--resume_from_checkpoint", "True", "--save_steps", "1",
                    "--save_total_limit", "10")
    assert finetune.main(argv).state.save_steps == 1
    assert {"checkpoint-5", "checkpoint-6"} <= set(os.listdir(out))


def test_allowed_change_resumes(runs, tmp_path):
    import finetune

    model, _, first = runs
    out = copy_run(first, tmp_path)
    argv = cli_args(model, out, "--max_steps", "5", "--resume_from_checkpoint", "True", "--seed", "7")
    trainer = finetune.main([*argv, "--resume_allow_changes", "seed"])
    assert trainer.state.global_step == 5


def _write_loadable(path, name: str) -> None:
    """A file named ``name`` that passes the save's structural check (parses, loads, or is a torch zip)."""
    if name.endswith(".json") or name == "latest":
        path.write_text("{}" if name.endswith(".json") else "global_step2")
    elif name.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file({"w": torch.zeros(2)}, str(path))
    else:
        torch.save({"step": 2}, path)


# Layouts the trainer writes, and the files a resume from each needs (one of each set of alternatives suffices).
LAYOUTS = [
    ({"world_size": 1, "deepspeed": False, "peft": False, "snapshot_ranks": [0], "rollout_ranks": [0]},
     ["trainer_state.json", checkpoints.STATE_FILE, "model.safetensors", "config.json", "optimizer.pt", "scheduler.pt",
      "rng_state.pth", "snapshot_rank0.pt", "rollouts_rank0.pt"]),
    ({"world_size": 1, "deepspeed": False, "peft": True, "snapshot_ranks": [], "rollout_ranks": []},
     ["trainer_state.json", checkpoints.STATE_FILE, "adapter_model.safetensors", "optimizer.pt", "scheduler.pt",
      "rng_state.pth"]),
    ({"world_size": 2, "deepspeed": True, "peft": False, "snapshot_ranks": [0, 1], "rollout_ranks": [0, 1]},
     ["trainer_state.json", checkpoints.STATE_FILE, "latest", "scheduler.pt", "rng_state_0.pth", "rng_state_1.pth",
      "snapshot_rank0.pt", "snapshot_rank1.pt", "rollouts_rank0.pt", "rollouts_rank1.pt"]),
]


@pytest.mark.parametrize("layout, needed", LAYOUTS, ids=["full", "lora", "zero3-2-ranks"])
def test_a_save_missing_a_file_its_layout_needs_is_never_committed(tmp_path, layout, needed):
    """Rank 0 commits a staged checkpoint only when every file a resume of its layout reads is there: a save cut short
    on one rank, or a file another rank never wrote, leaves the previous checkpoint the newest complete one."""
    for missing in [None, *needed]:
        staged = tmp_path / f"without_{missing}" / ".checkpoint-2.partial" / "checkpoint-2"
        staged.mkdir(parents=True)
        for name in needed:
            if name != missing:
                _write_loadable(staged / name, name)
        final = tmp_path / f"without_{missing}" / "checkpoint-2"
        if missing is None:
            checkpoints.commit(str(staged), str(final), layout)
            assert checkpoints.problems(str(final)) == []
            continue
        with pytest.raises(checkpoints.CheckpointError, match=rf"incomplete: missing {missing}( |$)"):
            checkpoints.commit(str(staged), str(final), layout)
        assert not final.exists() and staged.exists()


def test_setting_changes_name_the_entries_that_changed_and_a_whole_setting_that_came_or_went(caplog):
    saved = {"seed": 1, "schedule": {"ppo_epochs": 2, "locator_lr": 1e-5}, "data": {"records": "a"}}
    current = {"seed": 1, "schedule": {"ppo_epochs": 1, "locator_lr": 1e-5}, "data": None, "world_size": 2}
    errors = checkpoints.settings_mismatches("checkpoint-4", saved, current, set(), {"ppo_epochs": "--ppo_epochs"})
    assert errors == ["data: checkpoint {'records': 'a'}, now None",
                      "schedule: ppo_epochs (--ppo_epochs) checkpoint 2, now 1",
                      "world_size: checkpoint None, now 2"]
    with caplog.at_level(logging.WARNING, logger="sc_tune.checkpoints"):
        assert checkpoints.settings_mismatches("checkpoint-4", saved, current, {"data", "schedule"}) == [
            "world_size: checkpoint None, now 2"]
    assert "checkpoint-4: schedule changed: ppo_epochs checkpoint 2, now 1 (allowed by" in caplog.text


def test_a_save_removes_only_the_staging_left_by_killed_saves(tmp_path):
    """Before a save writes, staging folders of killed saves and converted copies of a resume go; nothing else in the
    output folder does: not the checkpoints, an export being staged, or an evaluation's scored rows written there."""
    left = [".checkpoint-6.partial", ".checkpoint-4.universal"]
    kept = ["checkpoint-4", checkpoints.EXPORT_STAGING, "self_consistency_samples.partial", ".checkpoint-notes",
            "checkpoint-6.partial", ".cache"]
    for name in left + kept:
        (tmp_path / name).mkdir()
        (tmp_path / name / "rank0.jsonl").write_text("{}")
    checkpoints.remove_stale_staging(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == sorted(kept)


def test_rollout_buffer_is_plain_data_and_a_crafted_pickle_does_not_run(tmp_path):
    from sc_tune.cycle import DescriberRollout, LocatorRollout

    rollout = LocatorRollout({"input_ids": torch.arange(6).reshape(2, 3)}, torch.full((2, 3), -100), 2)
    path = tmp_path / "rollouts_rank0.pt"
    checkpoints.save_rollouts({0: rollout}, str(path))
    loaded = checkpoints.load_rollouts(str(path), [DescriberRollout, LocatorRollout], "cpu:0")
    assert torch.equal(loaded[0].inputs["input_ids"], rollout.inputs["input_ids"]) and loaded[0].target_len == 2
    # A describer rollout before its first PPO epoch: its old log-probs, advantages and KL coefficient still None.
    unused = DescriberRollout({"input_ids": torch.ones(2, 3, dtype=torch.long)}, *(torch.zeros(2, 1),) * 3,
                              *(torch.tensor([0.5, 0.25]),) * 3)
    checkpoints.save_rollouts({1: unused}, str(path))
    loaded = checkpoints.load_rollouts(str(path), [DescriberRollout, LocatorRollout], "cpu")[1]
    assert loaded.old_logp_NT is None and loaded.kl_coef is None and torch.equal(loaded.reward_N, unused.reward_N)
    with pytest.raises(TypeError, match="cannot store object in a checkpoint"):
        checkpoints.save_rollouts({1: dataclasses.replace(unused, kl_coef=object())}, str(path))

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    torch.save({"0": Exploit()}, path)
    # Refused with an error that names the file and the object (not torch's bare UnpicklingError).
    with pytest.raises(checkpoints.CheckpointError, match=rf"{path}: refused to load.*posix\.system"):
        checkpoints.load_rollouts(str(path), [DescriberRollout, LocatorRollout], "cpu")
    assert not (tmp_path / "pwned").exists()


def test_no_unsafe_torch_load_in_the_package():
    root = os.path.dirname(checkpoints.__file__)
    for folder, _, names in os.walk(root):
        for name in names:
            if name.endswith(".py"):
                assert "weights_only=False" not in open(os.path.join(folder, name)).read(), name


def _tree_digest(folder) -> dict[str, bytes]:
    return {p: open(os.path.join(r, p), "rb").read() for r, _, names in os.walk(folder) for p in names}


@pytest.mark.parametrize("inside", ["", "sub"])
def test_output_dir_at_or_inside_the_model_folder_is_refused(tiny_checkpoint, inside):
    import finetune

    model = tiny_checkpoint("qwen2_vl")
    before = _tree_digest(model)
    target = os.path.join(model, inside) if inside else model
    with pytest.raises(ValueError, match="model folder"):
        finetune.main(cli_args(model, target, "--max_steps", "2"))
    assert _tree_digest(model) == before


def test_output_dir_of_another_run_is_refused_unless_resuming_or_overwriting(runs, tmp_path):
    model, _, first = runs
    out = copy_run(first, tmp_path)
    with pytest.raises(ValueError, match=r"holds another run \(checkpoint-2, checkpoint-4"):
        checkpoints.check_output_dir(str(out), model, None, overwrite=False)
    for its_own in ("True", True, str(out / "checkpoint-2")):
        assert checkpoints.check_output_dir(str(out), model, its_own, overwrite=False) == []
    assert (out / "checkpoint-4").exists()
    # The check deletes nothing: it names what --overwrite_output_dir will replace once every input is checked.
    doomed = checkpoints.check_output_dir(str(out), model, None, overwrite=True)
    assert sorted(os.path.basename(p) for p in doomed) == ["checkpoint-2", "checkpoint-4"]
    assert (out / "checkpoint-4").exists()
    checkpoints.clear_output_dir(doomed)
    assert not [n for n in os.listdir(out) if n.startswith("checkpoint-")]


def test_rotation_keeps_the_new_checkpoint_and_deletes_broken_ones_first(runs, tmp_path):
    _, _, first = runs
    out = copy_run(first, tmp_path)
    shutil.copytree(out / "checkpoint-2", out / "checkpoint-9")
    os.remove(out / "checkpoint-9" / checkpoints.MARKER_FILE)  # an abandoned, incomplete folder
    checkpoints.rotate(str(out), 2, {str(out / "checkpoint-2")})
    assert sorted(n for n in os.listdir(out) if n.startswith("checkpoint-")) == ["checkpoint-2", "checkpoint-4"]
    checkpoints.rotate(str(out), 1, {str(out / "checkpoint-2")})
    assert sorted(n for n in os.listdir(out) if n.startswith("checkpoint-")) == ["checkpoint-2"]


def test_rotation_keeps_the_newest_complete_checkpoints(runs, tmp_path):
    """--save_total_limit 2 after checkpoint-8 is saved: checkpoint-6 stays beside it; the oldest go."""
    _, _, first = runs
    out = copy_run(first, tmp_path)
    for step in (6, 8):
        shutil.copytree(out / "checkpoint-4", out / f"checkpoint-{step}")
    checkpoints.rotate(str(out), 2, {str(out / "checkpoint-8")})
    assert sorted(n for n in os.listdir(out) if n.startswith("checkpoint-")) == ["checkpoint-6", "checkpoint-8"]


@pytest.mark.parametrize(
    "flag, value",
    [
        ("describer_lr", 0.0),
        ("locator_lr", -0.01),
        ("kl_coef", -1.0),
        ("clip_range", -0.2),
        ("gamma", 2.0),
        ("gamma", -0.1),
        ("ratio_threshold", -1.0),
        ("policy_kl_stop", 0.0),
        ("gradient_accumulation_steps", 0),
        ("describer_update_steps", -1),
        ("locator_update_steps", -3),
        ("ppo_epochs", 0),
        ("kl_coef", float("nan")),
    ],
)
def test_bad_hyperparameters_are_named(tmp_path, flag, value):
    from sc_tune.arguments import SCTuneConfig

    with pytest.raises(ValueError, match=rf"--{flag} {value!r} must"):
        SCTuneConfig(output_dir=str(tmp_path), use_cpu=True, **{flag: value})


# ---------------------------------------------------------------------------------------------- fault injection
def _killed_run(model, out, fault: str | None, *extra):
    """Run finetune.py in a real process that is SIGKILLed (by itself at ``fault``, or from here)."""
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import ROOT

    argv = cli_args(model, out, "--max_steps", "6", "--save_total_limit", "1", *extra)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FAULT": fault or ""}
    if fault:
        driver = [sys.executable, os.path.join(ROOT, "tests", "fault_driver.py")]
        result = run_launch([*driver, *argv], 300, cwd=ROOT, env=env)
        assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
        return
    process = subprocess.Popen([sys.executable, os.path.join(ROOT, "finetune.py"), *argv], cwd=ROOT, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (out / "checkpoint-4").exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)  # from outside, whenever checkpoint-4 has just appeared
    process.wait()


FAULTS = {
    # fault -> the checkpoint a resume must use (save_steps 2, save_total_limit 1)
    "mid_save:4": "checkpoint-2",
    "mid_commit:4": "checkpoint-2",
    "before_rotate:4": "checkpoint-4",
    "mid_step:5": "checkpoint-4",
    "mid_save:6": "checkpoint-4",  # killed while saving the last checkpoint
    None: "checkpoint-4",  # external kill -9 right after checkpoint-4 appeared
}


@pytest.mark.slow
@pytest.mark.parametrize("fault", list(FAULTS))
def test_kill_9_then_resume_true_continues_exactly_from_the_last_complete_checkpoint(runs, tmp_path, fault,
                                                                                     steps_trained):
    import finetune

    model, full, _ = runs
    out = tmp_path / "run"
    _killed_run(model, out, fault)
    expected = FAULTS[fault]
    assert checkpoints.problems(str(out / expected)) == []
    assert checkpoints.resolve_resume(True, str(out)) == str(out / expected)
    trainer = finetune.main(
        cli_args(model, out, "--max_steps", "6", "--save_total_limit", "1", "--resume_from_checkpoint", "True")
    )
    assert trainer.state.global_step == 6
    start = int(expected.split("-")[1])
    resumed = step_losses(out)
    steps = list(range(start + 1, 7))
    assert sorted(set(steps_trained)) == steps
    assert [resumed[s] for s in steps] == pytest.approx([full[s] for s in steps], rel=1e-5, abs=1e-7)
    assert not [n for n in os.listdir(out) if n.endswith(".partial")]  # the killed save's leftovers are gone


def test_lora_runs_are_bit_reproducible_for_a_seed(tiny_checkpoint, tmp_path):
    """The seed is set before LoRA initialises its adapters: two identical commands give identical losses."""
    import finetune

    model = tiny_checkpoint("qwen2_vl")
    lora = ["--use_lora", "True", "--lora_r", "4", "--lora_alpha", "8", "--save_strategy", "no", "--max_steps", "3"]
    torch.manual_seed(123)  # whatever state the process is in must not matter
    first = finetune.main(cli_args(model, tmp_path / "a", *lora))
    torch.manual_seed(456)
    second = finetune.main(cli_args(model, tmp_path / "b", *lora))
    assert step_losses(tmp_path / "a") == step_losses(tmp_path / "b")
    adapters = lambda t: {n: p for n, p in t.model.named_parameters() if "lora_" in n}  # noqa: E731
    assert adapters(first).keys() == adapters(second).keys()
    assert all(torch.equal(p, adapters(second)[n]) for n, p in adapters(first).items())


def test_a_lora_run_resumed_at_its_first_checkpoint_continues_exactly(tmp_path, steps_trained):
    """One process under LoRA: the Trainer's PEFT load restores the adapters (the strict full-weight load is for
    full fine-tuning only), and checkpoint-1 falls between the describer's two PPO epochs, so the resumed step finds
    its rollout buffer, snapshot and learning rate only if its first micro-batch begins a step."""
    import finetune
    from sc_tune.synthetic.shapes import write_split

    # The warm start's locator writes boxes that parse, so the describer's rewards differ and its losses are not 0.
    write_split(tmp_path / "shapes", "train", 8, seed=5)
    lora = [
        *("--data_path", str(tmp_path / "shapes" / "train.json"), "--image_folder", str(tmp_path / "shapes")),
        *("--describer_max_new_tokens", "8", "--describer_top_k", "0", "--locator_max_new_tokens", "32"),
        *("--describer_top_p", "1.0", "--locator_min_new_tokens", "3"),
        *("--use_lora", "True", "--lora_r", "4", "--lora_alpha", "8", "--save_steps", "1"),
    ]
    finetune.main(cli_args(WARM_START, tmp_path / "full", *lora, "--max_steps", "4"))
    out = tmp_path / "run"
    finetune.main(cli_args(WARM_START, out, *lora, "--max_steps", "1"))
    assert sorted(n for n in os.listdir(out) if n.startswith("checkpoint-")) == ["checkpoint-1"]
    steps_trained.clear()
    trainer = finetune.main(cli_args(WARM_START, out, *lora, "--max_steps", "4", "--resume_from_checkpoint", "True"))
    assert trainer.state.global_step == 4 and sorted(set(steps_trained)) == [2, 3, 4]
    full, resumed = step_losses(tmp_path / "full"), step_losses(out)
    assert [resumed[s] for s in (2, 3, 4)] == pytest.approx([full[s] for s in (2, 3, 4)], rel=1e-5, abs=1e-7)
    assert all(abs(full[s]) > 1e-3 for s in (1, 2, 4))  # describer losses that a lost rollout or adapter would change


# ---------------------------------------------------------------------------------------------- issue 19
def _weights(path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.mark.slow
def test_resume_after_a_kill_during_the_final_export_trains_nothing_and_exports_the_same_model(runs, tmp_path):
    """Issue 19, 3a: killed while writing the final model, then resumed: no step 7 of 6, the checkpoint's model."""
    import finetune

    model, full, _ = runs
    out = tmp_path / "run"
    _killed_run(model, out, "mid_export:0")
    # The export was written into its staging folder, never swapped in: no model in the output folder, and the
    # model-folder check (finetune.py, evaluate.py) says so and how to redo it.
    assert (out / checkpoints.EXPORT_STAGING / "model.safetensors").exists()
    assert not (out / "model.safetensors").exists()
    with pytest.raises(checkpoints.CheckpointError, match=r"did not finish .*no complete export is here.*"
                                                          r"to write the export again from checkpoint-6$"):
        checkpoints.check_model_folder(str(out))
    trained = step_losses(out)
    assert max(trained) == 6
    trainer = finetune.main(
        cli_args(model, out, "--max_steps", "6", "--save_total_limit", "1", "--resume_from_checkpoint", "True")
    )
    assert trainer.state.global_step == 6
    assert step_losses(out) == trained  # no step was trained
    exported, saved = _weights(out / "model.safetensors"), _weights(out / "checkpoint-6" / "model.safetensors")
    assert exported.keys() == saved.keys() and all(torch.equal(exported[k], saved[k]) for k in saved)
    assert not (out / checkpoints.EXPORT_STAGING).exists()
    checkpoints.check_model_folder(str(out))


def test_resume_past_max_steps_is_refused_and_changes_nothing(runs, tmp_path):
    """Issue 19, 3b: --max_steps 3 resumed from checkpoint-4 (by path or by True) trains no step 5."""
    import finetune

    model, _, first = runs
    out = copy_run(first, tmp_path)
    before = _tree_digest(out)
    for resume in (str(out / "checkpoint-4"), "True"):
        with pytest.raises(checkpoints.CheckpointError, match=r"checkpoint-4 was saved after step 4, past --max_steps 3"):
            finetune.main(cli_args(model, out, "--max_steps", "3", "--resume_from_checkpoint", resume))
    assert _tree_digest(out) == before


def test_resume_at_max_steps_trains_nothing_and_reexports_the_checkpoint(runs, tmp_path, caplog):
    import finetune

    model, _, first = runs
    out = copy_run(first, tmp_path)
    trained = step_losses(out)
    with caplog.at_level(logging.WARNING, logger="sc_tune.checkpoints"):
        trainer = finetune.main(cli_args(model, out, "--max_steps", "4", "--resume_from_checkpoint", "True"))
    assert trainer.state.global_step == 4 and step_losses(out) == trained
    assert f"{out / 'checkpoint-4'} is at --max_steps 4: the run is complete; no step is trained" in caplog.text
    exported, saved = _weights(out / "model.safetensors"), _weights(out / "checkpoint-4" / "model.safetensors")
    assert all(torch.equal(exported[k], saved[k]) for k in saved)


def test_overwrite_never_deletes_the_model_being_loaded(runs, tmp_path):
    """Issue 19, 2a: --model_name_or_path OUT/checkpoint-4 --output_dir OUT --overwrite_output_dir True."""
    import finetune

    model, _, first = runs
    out = copy_run(first, tmp_path)
    before = _tree_digest(out)
    with pytest.raises(checkpoints.OutputDirError, match=r"checkpoint-4, which --overwrite_output_dir would delete"):
        finetune.main(cli_args(str(out / "checkpoint-4"), out, "--max_steps", "2", "--overwrite_output_dir", "True"))
    assert _tree_digest(out) == before


@pytest.mark.parametrize("typo", ["--data_path", "--image_folder", "--model_name_or_path"])
def test_overwrite_with_a_bad_input_deletes_nothing(runs, tmp_path, typo):
    """Issue 19, 2b: a typo in an input stops the run before the old run's checkpoints are touched."""
    import finetune

    model, _, first = runs
    out = copy_run(first, tmp_path)
    before = _tree_digest(out)
    argv = cli_args(model, out, "--max_steps", "2", "--overwrite_output_dir", "True")
    argv[argv.index(typo) + 1] += "_typo"
    with pytest.raises((FileNotFoundError, ValueError, OSError)):
        finetune.main(argv)
    assert _tree_digest(out) == before


def test_overwrite_replaces_the_old_run_only_once_a_step_has_worked(runs, tmp_path, monkeypatch):
    import finetune
    from sc_tune.trainer import SCTuneTrainer

    model, _, first = runs
    out = copy_run(first, tmp_path)
    argv = cli_args(model, out, "--max_steps", "2", "--overwrite_output_dir", "True")

    def failing_step(self, *args, **kwargs):
        raise RuntimeError("the first step failed")

    with monkeypatch.context() as patch:
        patch.setattr(SCTuneTrainer, "training_step", failing_step)
        with pytest.raises(RuntimeError, match="the first step failed"):
            finetune.main(argv)
    assert {"checkpoint-2", "checkpoint-4"} <= set(os.listdir(out))  # the old run is intact
    finetune.main(argv)
    assert sorted(n for n in os.listdir(out) if n.startswith("checkpoint-")) == ["checkpoint-2"]  # only the new run's
    assert checkpoints.problems(str(out / "checkpoint-2")) == []


def test_truncated_model_weights_name_the_file(tiny_checkpoint, tmp_path):
    """Issue 19, 9a: a truncated model.safetensors in --model_name_or_path."""
    import finetune

    model = tmp_path / "model"
    shutil.copytree(tiny_checkpoint("qwen2_vl"), model)
    _truncate(model / "model.safetensors")
    with pytest.raises(checkpoints.CheckpointError, match=r"--model_name_or_path .*model\.safetensors.*truncated"):
        finetune.main(cli_args(str(model), tmp_path / "out", "--max_steps", "2"))


def test_a_sharded_model_missing_a_shard_its_index_names_is_refused_naming_it(tmp_path):
    from safetensors.torch import save_file

    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    save_file({"a": torch.zeros(2)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    missing = r"model\.safetensors\.index\.json names model-00002-of-00002\.safetensors, which is missing$"
    with pytest.raises(checkpoints.CheckpointError, match=rf"--model_name_or_path .*: {missing}"):
        checkpoints.check_model_folder(str(tmp_path))
    save_file({"b": torch.zeros(2)}, str(tmp_path / "model-00002-of-00002.safetensors"))
    checkpoints.check_model_folder(str(tmp_path))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(list(index)))
    with pytest.raises(checkpoints.CheckpointError, match=r"model\.safetensors\.index\.json: cannot be read"):
        checkpoints.check_model_folder(str(tmp_path))


def test_a_first_export_cut_short_leaves_no_model_and_says_so(tmp_path):
    """Killed while the first export into a folder was staged: no record of an earlier export, no model here."""
    (tmp_path / checkpoints.EXPORT_STAGING).mkdir()
    assert checkpoints.export_problems(str(tmp_path)) == [
        f"an export into this folder did not finish ({checkpoints.EXPORT_STAGING} is left): no complete export is here"]


def _crafted_pickle(path, marker):
    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"module": Exploit()}, path)


def test_a_pickled_file_that_would_run_code_is_refused_even_with_a_rewritten_manifest(runs, tmp_path, caplog):
    """Issue 19, 1: the manifest is no defence (whoever rewrites a file can rewrite it): the content is checked."""
    _, _, first = runs
    out = copy_run(first, tmp_path)
    marker = tmp_path / "pwned"
    for checkpoint, name in (("checkpoint-4", "rollouts_rank0.pt"), ("checkpoint-4", "global_step4/mp_rank_00.pt")):
        target = out / checkpoint / name
        target.parent.mkdir(exist_ok=True)
        _crafted_pickle(target, marker)
        layout = checkpoints.read_layout(str(out / checkpoint))
        os.remove(out / checkpoint / checkpoints.MARKER_FILE)
        staged = tmp_path / "staged" / checkpoint
        shutil.move(out / checkpoint, staged)
        checkpoints.commit(str(staged), str(out / checkpoint), layout)  # a manifest that matches the crafted file
        found = checkpoints.problems(str(out / checkpoint))
        assert any(name in p and "could run code" in p and "posix.system" in p for p in found), found
        with pytest.raises(checkpoints.CheckpointError, match=rf"cannot resume from .*{name}"):
            checkpoints.resolve_resume(str(out / checkpoint), str(out))
        with caplog.at_level(logging.WARNING):
            assert checkpoints.resolve_resume("True", str(out)) == str(out / "checkpoint-2")
    assert not marker.exists()


def test_deepspeed_checkpoint_engine_loads_weights_only_while_sc_tune_trains(tmp_path):
    """Issue 19, 1: DeepSpeed's engine unpickles anything; inside the context it refuses code and names the file,
    and still loads what its ZeRO states hold (its loss scaler, stage enum and fragment addresses)."""
    import deepspeed  # noqa: F401 (the allowlist covers DeepSpeed's classes only in a DeepSpeed run)
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    genuine, crafted, marker = tmp_path / "optim_states.pt", tmp_path / "mp_rank_00_model_states.pt", tmp_path / "pwned"
    state = {"optimizer_state_dict": {"loss_scaler": LossScaler(1.0), "zero_stage": ZeroStageEnum.gradients,
                                      "param_slice_mappings": [{"w": fragment_address(numel=4, start=0)}],
                                      "single_partition_of_fp32_groups": [torch.ones(4)]}, "ds_version": "0.19.8"}
    torch.save(state, genuine)
    _crafted_pickle(crafted, marker)
    engine = TorchCheckpointEngine()
    original = TorchCheckpointEngine.load
    with checkpoints.deepspeed_loads_without_pickle():
        loaded = engine.load(str(genuine), map_location="cpu")
        assert loaded["optimizer_state_dict"]["zero_stage"] is ZeroStageEnum.gradients
        assert torch.equal(loaded["optimizer_state_dict"]["single_partition_of_fp32_groups"][0], torch.ones(4))
        with pytest.raises(checkpoints.CheckpointError, match=rf"{crafted}: refused to load.*posix\.system"):
            engine.load(str(crafted), map_location=lambda storage, location: storage)
    assert TorchCheckpointEngine.load is original  # restored afterwards
    assert not marker.exists()


def test_the_trainer_trains_with_deepspeeds_loads_weights_only(tiny_checkpoint, tmp_path):
    """The context above is in force while SCTuneTrainer.train runs (seen from a Trainer callback): DeepSpeed loads
    its states inside the Trainer's loop, before the first step."""
    import deepspeed  # noqa: F401 (as in a DeepSpeed run: the engine is imported)
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from transformers import TrainerCallback

    from tests.helpers import make_trainer

    seen = []

    class Watch(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            seen.append(TorchCheckpointEngine.load)

    original = TorchCheckpointEngine.load
    trainer = make_trainer(tiny_checkpoint("qwen2_vl"), str(tmp_path), max_steps=1)
    trainer.add_callback(Watch())
    trainer.train()
    assert len(seen) == 1 and seen[0] is not original and seen[0].__wrapped__ is original
    assert TorchCheckpointEngine.load is original


def test_save_failures_name_the_file_and_the_storage_cause(tmp_path):

    folder = tmp_path / "run"
    folder.mkdir()
    for code, cause in ((errno.ENOSPC, "the disk is full"), (errno.EFBIG, "file-size limit"),
                        (errno.EDQUOT, "quota")):
        with pytest.raises(checkpoints.CheckpointError) as info:
            with checkpoints.save_failures_named(str(folder), "checkpoint-8"):
                (folder / "optimizer.pt").write_bytes(b"x" * 10)
                raise OSError(code, os.strerror(code))
        message = str(info.value)
        assert "saving checkpoint-8 failed while writing" in message and "optimizer.pt" in message
        assert f"out of storage: {cause}" in message or cause in message
    with pytest.raises(KeyError):  # not a storage failure: a bug keeps its own type and traceback
        with checkpoints.save_failures_named(str(folder), "checkpoint-8"):
            raise KeyError("bug")


def test_a_save_failure_known_only_by_its_text_is_named_and_a_bug_keeps_its_traceback(tmp_path, monkeypatch):
    """torch.save and safetensors raise RuntimeError (no errno): storage is recognised by the message alone; any other
    RuntimeError is a bug and must come out as itself, not as a claim that storage ran out."""
    import resource

    folder = tmp_path / "run"
    folder.mkdir()
    with monkeypatch.context() as patched:  # a file-size limit, hit by a file that is not the newest one here
        patched.setattr(resource, "getrlimit", lambda which: (1_000_000, resource.RLIM_INFINITY))
        with pytest.raises(checkpoints.CheckpointError, match=r"file-size limit \(ulimit -f\) of 1000000 bytes"):
            with checkpoints.save_failures_named(str(folder), "checkpoint-8"):
                (folder / "rng_state.pth").write_bytes(b"x" * 10)
                raise RuntimeError("PytorchStreamWriter failed writing file data/3: File too large")
    for text, cause in (("PytorchStreamWriter failed writing file data/0: Disk quota exceeded", "quota is exceeded"),
                        ("[enforce fail at inline_container.cc:603] . unexpected pos: No space left on device",
                         "the disk is full")):
        with pytest.raises(checkpoints.CheckpointError, match=rf"checkpoint-8 failed .*out of storage: .*{cause}"):
            with checkpoints.save_failures_named(str(folder), "checkpoint-8"):
                raise RuntimeError(text)
    # torch.save's writer fails with a RuntimeError while the OSError that says why is being handled
    with pytest.raises(checkpoints.CheckpointError, match=r"out of storage: the disk quota is exceeded"):
        with checkpoints.save_failures_named(str(folder), "checkpoint-8"):
            try:
                raise OSError(errno.EDQUOT, "write failed")
            except OSError:
                raise RuntimeError("PytorchStreamWriter failed writing file data/0")  # noqa: B904 - as torch does
    # safetensors' writer raises its own error type (neither OSError nor RuntimeError), the OS error in its text
    SafetensorError = type("SafetensorError", (Exception,), {})
    with pytest.raises(checkpoints.CheckpointError, match=r"while writing \S*model\.safetensors .*the disk is full"):
        with checkpoints.save_failures_named(str(folder), "the model"):
            (folder / "model.safetensors").write_bytes(b"x" * 10)
            raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No '
                                  'space left on device" })')
    # An OSError that is not about storage (a folder made read-only) is still named, with its own reason.
    with pytest.raises(checkpoints.CheckpointError, match=r"checkpoint-8 failed while writing .*PermissionError"):
        with checkpoints.save_failures_named(str(folder), "checkpoint-8"):
            (folder / "scheduler.pt").write_bytes(b"x")
            raise PermissionError(errno.EACCES, "Permission denied")
    with pytest.raises(RuntimeError, match="^expected a tensor, got a list$") as info:
        with checkpoints.save_failures_named(str(folder), "checkpoint-8"):
            raise RuntimeError("expected a tensor, got a list")
    assert type(info.value) is RuntimeError


def test_the_file_named_is_the_one_that_hit_the_limit_even_when_a_smaller_file_looks_newer(tmp_path, monkeypatch):
    """File times tick coarsely: a small file written in the same tick (or a little later) is not the culprit."""
    import resource

    limit = 1_000_000
    monkeypatch.setattr(resource, "getrlimit", lambda which: (limit, resource.RLIM_INFINITY))
    folder = tmp_path / "run"
    folder.mkdir()
    now = time.time()
    for name, size, at in (("optimizer.pt", limit - 100, now), ("rng_state.pth", 10, now + 0.002)):
        (folder / name).write_bytes(b"x" * size)
        os.utime(folder / name, (at, at))
    with pytest.raises(checkpoints.CheckpointError, match=r"while writing \S*optimizer\.pt .*file-size limit"):
        with checkpoints.save_failures_named(str(folder), "checkpoint-2"):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 967936 vs 967828")
    monkeypatch.undo()
    for name in ("optimizer.pt", "rng_state.pth"):  # the same tick, no limit: the bigger file was in progress
        os.utime(folder / name, (now, now))
    with pytest.raises(checkpoints.CheckpointError, match=r"while writing \S*optimizer\.pt"):
        with checkpoints.save_failures_named(str(folder), "checkpoint-2"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.slow
def test_a_schedulers_sigterm_saves_the_step_in_progress_and_the_run_resumes_exactly(runs, tmp_path, steps_trained):
    """SIGTERM to the run's process group inside step 3 (after its batch was fetched): the step ends, checkpoint-3 is
    saved and verified, nothing is exported, the exit status is the signal's, the last line names the checkpoint; a
    resume continues to the uninterrupted run's losses (--save_steps 2 would have lost step 3). The data workers'
    part is tested through torchrun (tests/test_distributed.py): here no batch is fetched after the signal."""
    import sys

    import finetune
    from tests.conftest import ROOT

    model, full, _ = runs
    out = tmp_path / "run"
    argv = cli_args(model, out, "--max_steps", "6", "--dataloader_num_workers", "2")
    result = run_launch([sys.executable, os.path.join(ROOT, "tests", "fault_driver.py"), *argv], 300, cwd=ROOT,
                        env={**os.environ, "OMP_NUM_THREADS": "1", "FAULT": "term_group:3"})
    assert result.returncode == 128 + 15, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"finetune.py: stopped by SIGTERM after step 3, which is saved as {out}/checkpoint-3; the model is not exported "
        "(the run is not finished). Continue with the same command and --resume_from_checkpoint True")
    assert checkpoints.problems(str(out / "checkpoint-3")) == []
    assert not (out / "model.safetensors").exists() and not (out / "sc_tune_run.lock").exists()
    trainer = finetune.main(cli_args(model, out, "--max_steps", "6", "--resume_from_checkpoint", "True"))
    assert trainer.state.global_step == 6 and sorted(set(steps_trained)) == [4, 5, 6]
    resumed = step_losses(out)
    assert [resumed[s] for s in (4, 5, 6)] == pytest.approx([full[s] for s in (4, 5, 6)], rel=1e-5, abs=1e-7)


@pytest.mark.slow
@pytest.mark.parametrize("fault, code", [("term_loading:0", 143), ("term_group:6", 0)])
def test_a_sigterm_outside_training_or_in_its_last_step_loses_nothing(runs, tmp_path, fault, code):
    """While the model loads: the process ends at once with SIGTERM's status and its run lock released (a requeued
    job on another host would find the lock and stop). In the last step: the run finishes, checkpoint and export."""
    import sys

    from tests.conftest import ROOT

    model, _, _ = runs
    out = tmp_path / "run"
    argv = cli_args(model, out, "--max_steps", "6")
    result = run_launch([sys.executable, os.path.join(ROOT, "tests", "fault_driver.py"), *argv], 300, cwd=ROOT,
                        env={**os.environ, "OMP_NUM_THREADS": "1", "FAULT": fault})
    assert result.returncode == code, result.stderr[-3000:]
    assert not (out / "sc_tune_run.lock").exists()
    if code:
        assert "SIGTERM outside training: stopping (no step to save)" in result.stderr
        assert not [name for name in os.listdir(out) if name.startswith("checkpoint-")]
    else:
        assert "SIGTERM in the last step: saving checkpoint-6, then the export" in result.stderr
        assert checkpoints.problems(str(out / "checkpoint-6")) == [] and (out / "model.safetensors").exists()


@pytest.mark.slow
def test_a_file_size_limit_hit_during_a_save_names_the_file_and_keeps_the_last_checkpoint(runs, tmp_path):
    """Issue 19, 9e: `ulimit -f` below the optimizer's size: a clear error, not torch's 'unexpected pos'."""
    import resource
    import sys

    from tests.conftest import ROOT

    model, _, _ = runs
    out = tmp_path / "run"
    limit = 1_000_000  # above model.safetensors (0.8 MB), below optimizer.pt (1.2 MB) of the tiny model

    def limited():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    argv = cli_args(model, out, "--max_steps", "2")
    result = run_launch([sys.executable, os.path.join(ROOT, "finetune.py"), *argv], 300, cwd=ROOT, preexec_fn=limited,
                        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("finetune.py: error: saving checkpoint-2 failed while writing"), result.stderr[-2000:]
    assert "optimizer.pt" in last and f"file-size limit (ulimit -f) of {limit} bytes" in last
    assert not (out / "checkpoint-2").exists()  # the half-written save never became a checkpoint


def test_a_resume_under_another_zero_stage_is_refused_naming_both(tmp_path, monkeypatch):
    """ZeRO-2 and ZeRO-3 lay out their optimizer and snapshot shards differently; DeepSpeed's own load of the other
    stage's files ends in a bare ``assert len(self.ckpt_list) > 0``. The stage is a run setting, compared where the
    checkpoint records it (checkpoints saved before it was recorded resume as before)."""
    from types import SimpleNamespace

    from sc_tune.jsonio import write_json
    from sc_tune.resume import RunState, run_settings

    monkeypatch.setattr(checkpoints, "check_world_size_change", lambda *a: None)
    monkeypatch.setattr(checkpoints, "read_layout", lambda checkpoint: {})
    monkeypatch.setattr(checkpoints, "check_resume_step", lambda *a: None)
    args = SimpleNamespace(kl_coef=0.01, clip_range=0.2, gamma=1.0, per_device_train_batch_size=2,
                           gradient_accumulation_steps=1, seed=0, world_size=1, bf16=False, fp16=False,
                           pseudo_label_min_iou=0.0, resume_allow_changes="", max_steps=10)
    schedule = SimpleNamespace(describer_update_steps=1)
    zero2, zero3 = (run_settings(args, None, schedule, True, zero_stage=stage) for stage in (2, 3))
    assert zero2["zero_stage"] == 2 and "zero_stage" not in run_settings(args, None, schedule, False, zero_stage=2)

    def resume(saved, now):
        checkpoint = tmp_path / "checkpoint-2"
        checkpoint.mkdir(exist_ok=True)
        write_json(checkpoint / checkpoints.STATE_FILE, {"settings": saved})
        run = RunState.__new__(RunState)
        run.args, run.settings = args, now
        run.check_settings(str(checkpoint))

    with pytest.raises(checkpoints.CheckpointError, match="zero_stage: checkpoint 2, now 3"):
        resume(zero2, zero3)
    resume(zero2, zero2)
    resume({k: v for k, v in zero2.items() if k != "zero_stage"}, zero3)  # saved before the stage was recorded


def test_weights_recorded_by_size_alone_are_compared_by_size(tmp_path, monkeypatch):
    """Checkpoints written before weight files were fingerprinted recorded their sizes: they resume on a folder whose
    weights have those sizes, and are refused on one whose sizes differ; a fingerprint tells same-size files apart."""
    from types import SimpleNamespace

    from sc_tune.jsonio import write_json
    from sc_tune.resume import RunState, model_files, weight_fingerprint

    monkeypatch.setattr(checkpoints, "check_world_size_change", lambda *a: None)
    monkeypatch.setattr(checkpoints, "read_layout", lambda checkpoint: {})
    monkeypatch.setattr(checkpoints, "check_resume_step", lambda *a: None)
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(bytes(range(256)) * 4096)
    now = {"model_files": model_files(str(folder))}
    assert now["model_files"]["model.safetensors"].startswith("1048576 bytes, sampled ")
    other = tmp_path / "other.safetensors"
    other.write_bytes(bytes(range(255, -1, -1)) * 4096)
    assert weight_fingerprint(str(other)) != now["model_files"]["model.safetensors"]

    def resume(saved):
        checkpoint = tmp_path / "checkpoint-2"
        checkpoint.mkdir(exist_ok=True)
        write_json(checkpoint / checkpoints.STATE_FILE, {"settings": saved})
        run = RunState.__new__(RunState)
        run.args, run.settings = SimpleNamespace(resume_allow_changes="", world_size=1, max_steps=10), now
        run.check_settings(str(checkpoint))

    resume({"model_files": {**now["model_files"], "model.safetensors": 1048576}})
    with pytest.raises(checkpoints.CheckpointError, match="model_files: model.safetensors checkpoint 1048575, now "
                                                          "1048576"):
        resume({"model_files": {**now["model_files"], "model.safetensors": 1048575}})


def test_a_weight_fingerprint_reads_windows_from_the_first_byte_to_the_last(tmp_path):
    """16 windows of 64 KiB spread evenly over the file: a change in the first or the last byte, or at a window in
    the middle, is seen; a byte between windows is not (what keeps a resume from hashing a 15 GB model whole)."""
    from sc_tune.resume import WEIGHT_SAMPLE_BYTES, WEIGHT_SAMPLES, weight_fingerprint

    size = 64 * WEIGHT_SAMPLE_BYTES
    original = bytes(range(256)) * (size // 256)
    path = tmp_path / "model.safetensors"
    path.write_bytes(original)
    before = weight_fingerprint(str(path))
    stride = (size - WEIGHT_SAMPLE_BYTES) // (WEIGHT_SAMPLES - 1)
    for position, seen in ((0, True), (size - 1, True), (7 * stride + 5, True), (WEIGHT_SAMPLE_BYTES + 1, False)):
        changed = bytearray(original)
        changed[position] ^= 0xFF
        path.write_bytes(bytes(changed))
        assert (weight_fingerprint(str(path)) != before) == seen, position
    path.write_bytes(original[:-1])
    assert weight_fingerprint(str(path)).startswith(f"{size - 1} bytes, sampled ")


def test_the_model_files_a_resume_compares_are_its_weights_config_tokenizer_and_template(tmp_path):
    """A model card edited, or a folder of notes added, beside the weights is not another model."""
    from sc_tune.resume import model_files

    for name in ("model.safetensors", "config.json", "tokenizer.json", "chat_template.jinja", "README.md",
                 "notes.txt"):
        (tmp_path / name).write_text(name)
    (tmp_path / "old.safetensors").mkdir()  # a folder, whatever its name
    assert sorted(model_files(str(tmp_path))) == ["chat_template.jinja", "config.json", "model.safetensors",
                                                  "tokenizer.json"]


def test_an_export_cut_short_says_how_to_redo_it(tiny_checkpoint, tmp_path):
    """A kill while the final export wrote model.safetensors leaves the run's checkpoints whole; the error for the
    output folder says that a resume writes the export again, from the newest one."""
    out = tmp_path / "run"
    shutil.copytree(tiny_checkpoint("qwen2_vl"), out)
    _truncate(out / "model.safetensors")
    with pytest.raises(checkpoints.CheckpointError) as plain:
        checkpoints.check_model_folder(str(out))
    assert "truncated" in str(plain.value) and "--resume_from_checkpoint" not in str(plain.value)
    for step in (2, 10, 4):
        (out / f"checkpoint-{step}").mkdir()
    with pytest.raises(checkpoints.CheckpointError, match=r"truncated.*rerun its training command with "
                                                          r"--resume_from_checkpoint True to write the export again "
                                                          r"from checkpoint-10$"):
        checkpoints.check_model_folder(str(out))
