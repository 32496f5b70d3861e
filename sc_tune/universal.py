"""A DeepSpeed checkpoint resumed on another number of processes, through DeepSpeed's universal checkpoints.

ZeRO saves its optimizer state (Adam's moments and step, and the fp32 master weights) as one flat partition per
rank, and DeepSpeed's ordinary load refuses another data-parallel size ("Automatic adjustment of ZeRO's optimizer
state partitioning with a new world size is not currently supported", ``DeepSpeedEngine._load_zero_checkpoint``).
Its own answer is the universal checkpoint: ``deepspeed.checkpoint.ds_to_universal`` rewrites the partitions as one
file per parameter and state (ZeRO-1/2 and ZeRO-3), and an engine whose config says ``checkpoint.load_universal``
cuts them into its own partitions on load, whatever the process count. Its "elastic" loading of the flat files is
not an alternative: the engine refuses a new size before it gets there, and ZeRO-3 removed it.

Here, at a resume on another process count, rank 0 converts the checkpoint's DeepSpeed folder beside it, inside the
run's output folder, and the Trainer loads that converted folder. The original checkpoint is read, never written:

- the conversion is written to ``.checkpoint-N.universal.partial`` and renamed to ``.checkpoint-N.universal`` once
  whole, so a crash leaves a stale staging folder (removed by the next save or conversion) and the original as it
  was; neither name is a ``checkpoint-N`` a resume or rotation would take;
- the converted folder holds the universal form plus copies of the Trainer's own small files (its state, scheduler
  and RNG files), which the Trainer reads from the folder it is given; the SC-Tune state (phase, snapshot, KL
  controller) is still read from the original;
- it is deleted once every rank has loaded it (the first step).

Under ZeRO-3, DeepSpeed 0.19.8's universal load leaves two things wrong that its ZeRO-1/2 load gets right, put back
after it by :func:`repair_zero3_load` (each param group's hyperparameters, one Adam step counter per group).

DeepSpeed reads the universal files with an unrestricted ``torch.load`` (any pickle runs): they are scanned for
pickled objects other than tensors, plain data and DeepSpeed's allowlisted classes before anything loads them (as
the original was).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import shutil

import torch

from sc_tune import checkpoints
from sc_tune.phases import innermost_optimizer

logger = logging.getLogger(__name__)

SUFFIX = ".universal"
# The Trainer's files a DeepSpeed resume reads from the folder it is given: trainer_state.json, scheduler.pt,
# rng_state*.pth. Every small top-level file is copied; not the weights (DeepSpeed loads its own folder), the
# manifest (of the original's files) or DeepSpeed's tag file (``latest_universal`` names the converted folder).
_NOT_COPIED_SUFFIXES = (".safetensors", ".bin", ".index.json")
_NOT_COPIED_NAMES = (checkpoints.MARKER_FILE, "latest")


def needs_conversion(layout: dict, world_size: int) -> bool:
    """Whether a resume on ``world_size`` processes must load the checkpoint's DeepSpeed state in universal form."""
    return bool(layout["deepspeed"]) and layout["world_size"] != world_size


def converted_folder(output_dir: str, checkpoint: str) -> str:
    """Where ``checkpoint``'s universal form is written: hidden in the run's output folder, never a checkpoint-N."""
    return os.path.join(output_dir, f".{os.path.basename(os.path.normpath(checkpoint))}{SUFFIX}")


def convert(checkpoint: str, output_dir: str, world_size: int) -> str:
    """Rank 0: ``checkpoint``'s DeepSpeed state in universal form, with the Trainer's files, in a new folder of
    ``output_dir``; returns that folder (for ``--resume_from_checkpoint``)."""
    target = converted_folder(output_dir, checkpoint)
    staging = target + ".partial"
    for stale in (staging, target):  # a conversion that crashed, or one loaded by a run that crashed before step 1
        shutil.rmtree(stale, ignore_errors=True)
    tag = _deepspeed_tag(checkpoint)
    os.makedirs(staging)
    with contextlib.redirect_stdout(io.StringIO()) as said:  # the converter prints its progress
        try:
            _ds_to_universal(os.path.join(checkpoint, tag), os.path.join(staging, f"{tag}{SUFFIX}"))
        except Exception as e:
            raise checkpoints.CheckpointError(
                f"{checkpoint}: DeepSpeed could not convert its ZeRO state for {world_size} processes "
                f"({type(e).__name__}: {e}). The checkpoint is unchanged: resume with the "
                f"{checkpoints.read_layout(checkpoint)['world_size']} processes that saved it"
            ) from e
    logger.debug("ds_to_universal: %s", said.getvalue())
    _copy_trainer_files(checkpoint, staging)
    unsafe = checkpoints.pickle_problems(staging)
    if unsafe:
        raise checkpoints.CheckpointError(f"{staging}: the converted checkpoint is refused: {'; '.join(unsafe)}")
    os.replace(staging, target)
    return target


def _deepspeed_tag(checkpoint: str) -> str:
    """The DeepSpeed folder of ``checkpoint`` (``global_stepN``), as its ``latest`` file names it."""
    with open(os.path.join(checkpoint, "latest")) as f:
        return f.read().strip()


def _ds_to_universal(input_folder: str, output_folder: str) -> None:
    """DeepSpeed's own converter, as its command line runs it (one process: no worker pool inside a training
    process). ``inject_missing_state``: a transformers model carries no Megatron-style tensor-parallel patterns, and
    the converter wants their (empty) record. It writes ``latest_universal`` beside ``output_folder``."""
    from deepspeed.checkpoint import ds_to_universal

    ds_to_universal.main(argparse.Namespace(
        input_folder=input_folder, output_folder=output_folder, num_extract_workers=1, num_merge_workers=1,
        keep_temp_folder=False, strict=True, inject_missing_state=True,
    ))


def _copy_trainer_files(checkpoint: str, folder: str) -> None:
    """Copies (not links: nothing may write through to the original) of the checkpoint's small top-level files."""
    for name in os.listdir(checkpoint):
        path = os.path.join(checkpoint, name)
        if os.path.isfile(path) and not name.endswith(_NOT_COPIED_SUFFIXES) and name not in _NOT_COPIED_NAMES:
            shutil.copy2(path, os.path.join(folder, name))


def load_universal_checkpoints(deepspeed_plugin) -> None:
    """The DeepSpeed config's ``checkpoint.load_universal``, before the engine is built from it (accelerate builds
    it at the start of training): the engine then reads ``latest_universal`` and the per-parameter files."""
    config = deepspeed_plugin.deepspeed_config
    config.setdefault("checkpoint", {})["load_universal"] = True


def repair_zero3_load(optimizer, converted: str) -> None:
    """After DeepSpeed 0.19.8's ZeRO-3 universal load, each param group as it was saved, as its ZeRO-1/2 load leaves
    them. The ZeRO-3 load (``DeepSpeedZeroOptimizer_Stage3.load_hp_checkpoint_state_from_checkpoint_dir_stage3``,
    stage3.py 3664-3690) gives every group the hyperparameters of the checkpoint's group 0 (the no-decay group of
    biases and norms then decays), and one Adam step tensor to every group (each group's Adam step then advances
    the one counter: the second group's bias correction runs a step ahead)."""
    inner = innermost_optimizer(optimizer)
    saved = checkpoints.load_tensors(os.path.join(converted, _universal_tag(converted), "zero", "optimizer_state.pt"))
    for group, saved_group in zip(inner.param_groups, saved["param_groups"], strict=True):
        group.update({key: value for key, value in saved_group.items() if key != "params"})
    for state in inner.state.values():
        if isinstance(state.get("step"), torch.Tensor):
            state["step"] = state["step"].clone()


def _universal_tag(converted: str) -> str:
    with open(os.path.join(converted, "latest_universal")) as f:
        return f.read().strip()


def remove(folder: str) -> None:
    shutil.rmtree(folder, ignore_errors=True)
