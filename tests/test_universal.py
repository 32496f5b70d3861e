"""A resume on another process count: which checkpoints allow it and why, and DeepSpeed's conversion beside the
checkpoint (the 2-process runs through it are in tests/test_distributed_resume.py)."""

from __future__ import annotations

import json
import logging
import os
import re

import pytest

from sc_tune import checkpoints, universal
from tests.conftest import ROOT


def _layout(world_size=2, deepspeed=True, rollout_ranks=(), snapshot_ranks=()):
    return {"world_size": world_size, "deepspeed": deepspeed, "peft": False, "rollout_ranks": list(rollout_ranks),
            "snapshot_ranks": list(snapshot_ranks)}


def test_a_deepspeed_checkpoint_without_per_rank_state_resumes_on_another_count_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="sc_tune.checkpoints"):
        checkpoints.check_world_size_change("checkpoint-2", _layout(), 1)  # a phase switch: nothing per rank
        checkpoints.check_world_size_change("checkpoint-3", _layout(snapshot_ranks=[0]), 4)  # ZeRO-2, a locator step
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 2 and "checkpoint-2 was saved by 2 processes and resumes on 1 (DeepSpeed's optimizer" in said[0]
    assert all("not bit-exact" in s and "other records" in s for s in said)
    assert universal.needs_conversion(_layout(), 1) and not universal.needs_conversion(_layout(), 2)
    assert not universal.needs_conversion(_layout(deepspeed=False), 1)  # DDP's optimizer.pt is whole on every rank


@pytest.mark.parametrize("layout, why, where", [
    (_layout(rollout_ranks=[0, 1], snapshot_ranks=[0]), "half-used describer rollout per rank",
     "at a phase switch or a locator step"),
    (_layout(snapshot_ranks=[0, 1]), "snapshot is sharded per rank (ZeRO-3, in the middle of a phase", "at a phase "
     r"switch \(an earlier"),
    (_layout(deepspeed=False, rollout_ranks=[0, 1], snapshot_ranks=[0]), "half-used",
     r"or a locator step \(an earlier checkpoint-N, by its path"),
])
def test_per_rank_state_stays_refused_naming_why_and_what_to_resume_from(layout, why, where):
    with pytest.raises(checkpoints.CheckpointError, match="saved by 2 processes and cannot resume on 1") as refused:
        checkpoints.check_world_size_change("checkpoint-4", layout, 1)
    assert why in str(refused.value) and "Resume with 2 processes, or from a checkpoint saved" in str(refused.value)
    assert re.search(where, str(refused.value)), str(refused.value)
    assert "DeepSpeed" not in str(refused.value)  # its optimizer shards are no longer a reason


def _fake_deepspeed_checkpoint(run):
    checkpoint = run / "checkpoint-2"
    (checkpoint / "global_step2").mkdir(parents=True)
    (checkpoint / "global_step2" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"shard 0")
    (checkpoint / "latest").write_text("global_step2")
    for name in ("trainer_state.json", "scheduler.pt", "rng_state_0.pth", "rng_state_1.pth", "model.safetensors",
                 checkpoints.MARKER_FILE):
        (checkpoint / name).write_text(name)
    return checkpoint


def _tree(folder):
    return {os.path.relpath(os.path.join(root, n), folder): open(os.path.join(root, n), "rb").read()
            for root, _, names in os.walk(folder) for n in names}


def test_a_conversion_that_fails_midway_leaves_the_checkpoint_as_it_was_and_the_next_one_replaces_its_remains(
        tmp_path, monkeypatch):
    checkpoint = _fake_deepspeed_checkpoint(tmp_path)
    before = _tree(checkpoint)
    monkeypatch.setattr(checkpoints, "read_layout", lambda path: _layout())

    def crashes_midway(input_folder, output_folder):
        os.makedirs(os.path.join(output_folder, "zero"))
        open(os.path.join(output_folder, "zero", "half.pt"), "w").close()
        raise OSError("No space left on device")

    monkeypatch.setattr(universal, "_ds_to_universal", crashes_midway)
    with pytest.raises(checkpoints.CheckpointError, match=r"checkpoint-2: DeepSpeed could not convert its ZeRO state "
                                                          r"for 1 processes \(OSError: No space left on device\). The "
                                                          r"checkpoint is unchanged: resume with the 2 processes"):
        universal.convert(str(checkpoint), str(tmp_path), 1)
    assert _tree(checkpoint) == before
    assert not (tmp_path / ".checkpoint-2.universal").exists()  # only a staging folder, which no resume takes
    assert checkpoints.complete_checkpoints(str(tmp_path)) == [str(checkpoint)]

    def converts(input_folder, output_folder):
        os.makedirs(os.path.join(output_folder, "zero"))
        open(os.path.join(output_folder, "zero", "optimizer_state.pt"), "w").close()
        with open(os.path.join(os.path.dirname(output_folder), "latest_universal"), "w") as f:
            f.write(os.path.basename(output_folder))

    monkeypatch.setattr(universal, "_ds_to_universal", converts)
    converted = universal.convert(str(checkpoint), str(tmp_path), 1)
    assert converted == str(tmp_path / ".checkpoint-2.universal") and _tree(checkpoint) == before
    assert sorted(_tree(converted)) == ["global_step2.universal/zero/optimizer_state.pt", "latest_universal",
                                        "rng_state_0.pth", "rng_state_1.pth", "scheduler.pt", "trainer_state.json"]
    assert not os.path.exists(converted + ".partial")  # the crashed conversion's remains are gone
    checkpoints.remove_stale_staging(str(tmp_path))  # the next save: a copy a resume left is removed too
    assert not os.path.exists(converted) and _tree(checkpoint) == before


def test_only_an_optimizer_offloaded_to_nvme_counts_as_nvme():
    """The trainer hands RunState this reading of its DeepSpeed config (None without DeepSpeed)."""
    import copy

    from sc_tune.resume import optimizer_offloaded_to_nvme

    shipped = {}
    for stage in (2, 3):
        with open(os.path.join(ROOT, "scripts", f"ds_config_zero{stage}.json")) as f:
            shipped[stage] = json.load(f)
        assert not optimizer_offloaded_to_nvme(shipped[stage])
    assert not optimizer_offloaded_to_nvme(None)
    config = copy.deepcopy(shipped[3])
    config["zero_optimization"]["offload_optimizer"] = {"device": "nvme", "nvme_path": "/local_nvme"}
    assert optimizer_offloaded_to_nvme(config)
    config["zero_optimization"]["offload_optimizer"]["device"] = "cpu"
    assert not optimizer_offloaded_to_nvme(config)
    config["zero_optimization"]["offload_optimizer"] = None
    config["zero_optimization"]["offload_param"] = {"device": "nvme", "nvme_path": "/local_nvme"}
    assert not optimizer_offloaded_to_nvme(config)  # parameters on NVMe: the optimizer state is still in the checkpoint
    assert not optimizer_offloaded_to_nvme({"zero_optimization": None})


def test_an_optimizer_offloaded_to_nvme_is_refused_before_anything_is_converted(tmp_path, monkeypatch):
    """DeepSpeed restores an NVMe-offloaded optimizer from each rank's swap files and skips the universal load."""
    from types import SimpleNamespace

    from sc_tune.resume import RunState

    monkeypatch.setattr(checkpoints, "read_layout", lambda path: _layout())
    monkeypatch.setattr(universal, "convert", lambda *a: pytest.fail("converted"))
    run = RunState(SimpleNamespace(world_size=1, output_dir=str(tmp_path)), None, None, None, {}, zero3=False,
                   optimizer_on_nvme=True)
    with pytest.raises(checkpoints.CheckpointError, match="cannot resume on 1 with the optimizer offloaded to NVMe"):
        run._converted_if_resharded(str(tmp_path / "checkpoint-2"))
    run.optimizer_on_nvme = False
    monkeypatch.setattr(universal, "convert", lambda *a: "converted")
    assert run._converted_if_resharded(str(tmp_path / "checkpoint-2")) == "converted"
    run.args.world_size = 2
    assert run._converted_if_resharded(str(tmp_path / "checkpoint-2")) is None  # the same count: DeepSpeed's own load


def test_the_converted_copy_goes_once_loaded_and_the_checkpoint_stays(tmp_path):
    """After the first step every rank has loaded DeepSpeed's converted state: rank 0 deletes the copy (a 7B model's
    optimizer, twice the weights), never the checkpoint it was made from."""
    from types import SimpleNamespace

    from sc_tune.resume import RunState

    checkpoint, converted = tmp_path / "checkpoint-2", tmp_path / ".checkpoint-2.universal"
    for folder in (checkpoint, converted):
        folder.mkdir()
        (folder / "latest").write_text("global_step2")
    run = RunState(SimpleNamespace(world_size=1, process_index=0, output_dir=str(tmp_path)), None, None, None, {},
                   zero3=False)
    run.resume_dir, run.converted_dir = str(checkpoint), str(converted)
    run.drop_converted()
    assert not converted.exists() and (checkpoint / "latest").exists() and run.converted_dir is None
    run.drop_converted()  # nothing left to drop: a no-op
    assert (checkpoint / "latest").exists()
