"""2-process runs on CPU (gloo) that stop and resume (on 2 processes, or on 1 after 2 and back), and ZeRO-3 + LoRA
through to the merged export."""

import json
import os
import shutil
import sys

import pytest
import torch

from sc_tune import checkpoints
from tests.conftest import ROOT
from tests.helpers import free_port, run_launch
from tests.test_checkpoints import cli_args, step_losses

pytestmark = pytest.mark.slow


def _torchrun(argv, port, processes=2):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
           "--master_port", str(port)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_EXTENSIONS_DIR": os.path.join(ROOT, ".torch_extensions")}
    result = run_launch([*cmd, os.path.join(ROOT, "finetune.py"), *argv], 600, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


def test_two_process_resume_from_a_mid_rollout_checkpoint_is_exact(tiny_checkpoint, tmp_path):
    import finetune

    model = tiny_checkpoint("qwen2_vl")
    full = tmp_path / "full"
    _torchrun(cli_args(model, full, "--max_steps", "6"), free_port())
    layout = checkpoints.read_layout(str(full / "checkpoint-4"))
    assert layout["rollout_ranks"] == [0, 1] and layout["world_size"] == 2  # mid-rollout, per-rank buffers
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-4", resumed / "checkpoint-4")
    run = _torchrun(cli_args(model, resumed, "--max_steps", "6", "--resume_from_checkpoint", "True"), free_port())
    # Restarted from scratch, the run would reach the same losses (deterministic on CPU): it must say it resumed.
    assert f"resuming from {resumed / 'checkpoint-4'}" in run.stderr
    expected, got = step_losses(full), step_losses(resumed)
    assert [got[s] for s in (5, 6)] == pytest.approx([expected[s] for s in (5, 6)], rel=1e-5, abs=1e-7)
    # One process cannot take over two processes' half-used rollouts: refused, never dropped.
    with pytest.raises(checkpoints.CheckpointError, match="saved by 2 processes and cannot resume on 1"):
        finetune.main(
            cli_args(model, tmp_path / "one_process", "--max_steps", "8", "--resume_from_checkpoint",
                     str(full / "checkpoint-4"), "--resume_allow_changes", "world_size")
        )
    with pytest.raises(checkpoints.CheckpointError, match="world_size: checkpoint 2, now 1"):
        finetune.main(cli_args(model, resumed, "--max_steps", "8", "--resume_from_checkpoint", "True"))


def test_zero3_lora_trains_resumes_and_exports_a_merged_model(tiny_checkpoint, tmp_path):
    from sc_tune.modeling import load_model_and_adapter

    model = tiny_checkpoint("qwen2_vl")
    out = tmp_path / "zero3_lora"
    zero3 = ["--deepspeed", os.path.join(ROOT, "scripts", "ds_config_zero3.json"), "--use_lora", "True"]
    extra = [*zero3, "--lora_r", "4", "--lora_alpha", "8"]
    _torchrun(cli_args(model, out, "--max_steps", "2", *extra), free_port())
    assert checkpoints.problems(str(out / "checkpoint-2")) == []
    run = _torchrun(cli_args(model, out, "--max_steps", "3", "--resume_from_checkpoint", "true", *extra), free_port())
    assert f"resuming from {out / 'checkpoint-2'}" in run.stderr  # a restart would log steps 1-3 as well
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert [h["step"] for h in history if "loss" in h] == [1, 2, 3]
    merged, _ = load_model_and_adapter(str(out))
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    assert (out / "lora_adapter" / "adapter_config.json").exists()


# A ZeRO-2 cycle: 1 describer rollout x 2 PPO epochs, then 2 locator steps (steps 1-2, 3-4, 5-6, 7-8); a checkpoint
# after every step.
ZERO2 = ["--deepspeed", os.path.join(ROOT, "scripts", "ds_config_zero2.json"), "--locator_update_steps", "2",
         "--save_steps", "1", "--max_steps", "8"]


@pytest.fixture(scope="module")
def zero2_run(tiny_checkpoint, tmp_path_factory):
    """(model, folder) of one uninterrupted 8-step ZeRO-2 run on 2 processes, its checkpoints resumed (copied) by
    the tests below: one launch shared instead of one each."""
    model = tiny_checkpoint("qwen2_vl")
    full = tmp_path_factory.mktemp("zero2_full")
    _torchrun(cli_args(model, full, *ZERO2), free_port())
    return model, full


def test_zero2_resume_is_exact_through_the_weights_only_loader_and_a_crafted_shard_is_refused(zero2_run, tmp_path):
    """Issue 19, 1: DeepSpeed's shards load weights-only (its allowlisted classes) and resume exactly (from the end
    of a locator phase: a describer rollout, sampled, and a locator phase follow); a shard that would run code, with
    a manifest rewritten to match it, stops the resume on every rank, naming the file."""
    model, full = zero2_run
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-4", resumed / "checkpoint-4")
    run = _torchrun(cli_args(model, resumed, "--resume_from_checkpoint", "True", *ZERO2), free_port())
    assert f"resuming from {resumed / 'checkpoint-4'}" in run.stderr  # not a restart reaching the same losses
    expected, got = step_losses(full), step_losses(resumed)
    assert [got[s] for s in (5, 6, 7, 8)] == pytest.approx([expected[s] for s in (5, 6, 7, 8)], rel=1e-5, abs=1e-7)

    crafted = tmp_path / "crafted"
    staged = tmp_path / "staged" / "checkpoint-4"
    shutil.copytree(full / "checkpoint-4", staged)
    layout = checkpoints.read_layout(str(staged))
    os.remove(staged / checkpoints.MARKER_FILE)
    marker = tmp_path / "pwned"
    shard = staged / "global_step4" / "mp_rank_00_model_states.pt"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    import torch

    torch.save({"module": Exploit()}, shard)
    crafted.mkdir()
    checkpoints.commit(str(staged), str(crafted / "checkpoint-4"), layout)  # sizes and hashes match the crafted shard
    argv = cli_args(model, crafted, "--resume_from_checkpoint", str(crafted / "checkpoint-4"), *ZERO2)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           os.path.join(ROOT, "finetune.py"), *argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_EXTENSIONS_DIR": os.path.join(ROOT, ".torch_extensions")}
    result = run_launch(cmd, 600, cwd=ROOT, env=env)
    assert result.returncode != 0
    # Both ranks stop, with the same message. Counted in the whole stream, not per line: the two ranks write to one
    # stderr at once, and one rank's message can land on the other's line.
    refusal = "global_step4/mp_rank_00_model_states.pt: holds Python objects that could run code"
    assert result.stderr.count("finetune.py: error: cannot resume from") == 2, result.stderr[-4000:]
    assert result.stderr.count(refusal) == 2, result.stderr[-4000:]
    assert not marker.exists()


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def _tree(folder):
    return {os.path.relpath(os.path.join(root, n), folder): open(os.path.join(root, n), "rb").read()
            for root, _, names in os.walk(folder) for n in names}


def _resume_elsewhere(model, run, checkpoint, processes, zero2, accumulation):
    """``checkpoint`` copied into a new ``run`` folder and resumed there on ``processes`` processes, with the
    gradient accumulation that keeps the global batch (4 records a step); checks that the copy, its original, is
    unchanged and the converted copy gone."""
    run.mkdir()
    shutil.copytree(checkpoint, run / checkpoint.name)
    before = _tree(run / checkpoint.name)
    result = _torchrun(cli_args(model, run, *zero2, "--gradient_accumulation_steps", str(accumulation),
                                "--resume_from_checkpoint", "True",
                                "--resume_allow_changes", "world_size,gradient_accumulation_steps"),
                       free_port(), processes)
    assert f"resuming from {run / checkpoint.name} (DeepSpeed's state loaded from " in result.stderr
    assert f"was saved by {3 - processes} processes and resumes on {processes} (DeepSpeed's" in result.stderr
    assert "not bit-exact" in result.stderr
    assert _tree(run / checkpoint.name) == before and checkpoints.problems(str(run / checkpoint.name)) == []
    assert not [name for name in os.listdir(run) if name.startswith(".")]  # the converted copy was deleted


def test_zero2_resumes_on_another_process_count_with_its_weights_and_adam_state(zero2_run, tmp_path):
    """A ZeRO-2 run preempted on 2 processes resumes on 1 from a phase switch (checkpoint-6), and that run's
    checkpoint in the middle of the locator phase (checkpoint-7) resumes on 2 again: DeepSpeed's universal checkpoint
    re-cuts the optimizer's partitions. With the global batch kept, the locator steps (which sample nothing) continue
    exactly: the losses and the final weights equal the uninterrupted run's. At a phase switch Adam's moments are
    zeroed by design, so there the weights are what is checked (universal loading restores them from the optimizer's
    fp32 partitions; the switch comes after two locator steps, which moved them); at checkpoint-7 step 8's update
    divides by the loaded moments and counts the loaded Adam step (fresh moments move each weight by about the
    learning rate instead)."""
    model, full = zero2_run
    expected = step_losses(full)
    assert checkpoints.read_layout(str(full / "checkpoint-6"))["rollout_ranks"] == []

    one = tmp_path / "one"  # 2 -> 1 processes, at the phase switch
    _resume_elsewhere(model, one, full / "checkpoint-6", 1, ZERO2, accumulation=2)
    assert [step_losses(one)[s] for s in (7, 8)] == pytest.approx([expected[s] for s in (7, 8)], rel=1e-6)
    for name, tensor in _weights(full).items():
        torch.testing.assert_close(_weights(one)[name], tensor, rtol=0, atol=1e-6, msg=name)

    two = tmp_path / "two"  # 1 -> 2 processes, in the middle of the locator phase
    _resume_elsewhere(model, two, one / "checkpoint-7", 2, ZERO2, accumulation=1)
    assert step_losses(two)[8] == pytest.approx(expected[8], rel=1e-6)
    for name, tensor in _weights(full).items():
        torch.testing.assert_close(_weights(two)[name], tensor, rtol=0, atol=1e-6, msg=name)


def test_zero3_resumes_on_one_process_from_a_phase_switch_as_the_uninterrupted_run(tiny_checkpoint, tmp_path):
    """ZeRO-3, 2 processes -> 1 at a phase switch (in the middle of a phase its snapshot is sharded: refused). Step 7's
    update equals the uninterrupted run's, which needs each param group's own hyperparameters and Adam step back
    after DeepSpeed's ZeRO-3 universal load (``universal.repair_zero3_load``: without it the final weights differ
    by 2e-4 to 7e-4)."""
    model = tiny_checkpoint("qwen2_vl")
    zero3 = ["--deepspeed", os.path.join(ROOT, "scripts", "ds_config_zero3.json"), "--locator_update_steps", "2",
             "--save_steps", "6", "--max_steps", "7"]
    full = tmp_path / "full"
    _torchrun(cli_args(model, full, *zero3), free_port())
    one = tmp_path / "one"
    _resume_elsewhere(model, one, full / "checkpoint-6", 1, zero3, accumulation=2)
    assert step_losses(one)[7] == pytest.approx(step_losses(full)[7], rel=1e-6)
    for name, tensor in _weights(full).items():
        torch.testing.assert_close(_weights(one)[name], tensor, rtol=0, atol=1e-6, msg=name)
