"""Atomic, verified checkpoints and the run settings a resume must keep: the one home of checkpoint rules.

A checkpoint is written by every rank into a staging folder (``.checkpoint-N.partial/checkpoint-N``) that no
resume ever looks at. Once every rank is done, rank 0 checks that each file the layout needs is present and
loadable, writes ``sc_tune_complete.json`` (a manifest of every file's size and SHA-256) and only then renames
the folder to ``checkpoint-N``. Rotation (``--save_total_limit``) runs after that rename, so a kill at any
moment leaves the previous complete checkpoint in place.

The manifest costs one extra read of the checkpoint at save time and one at resume (hashed by parallel threads,
roughly 1 GB/s per core); the folders are assumed to be on a file system every rank sees.

Resuming re-checks the manifest (a truncated, zeroed or missing file is found before anything loads):
``--resume_from_checkpoint True`` skips a broken checkpoint with a warning naming the problem and takes the
previous complete one; an explicit path to a broken checkpoint is an error. The settings a resumed run must
share with the saved one (model, phase settings, batch size, seed, world size, precision) are recorded in
``sc_tune_state.json``; a change is an error unless ``--resume_allow_changes`` names it.

Checkpoint files hold tensors and plain data only (``torch.load(weights_only=True)``): the rollout buffer is
stored as ``{"kind": class name, "fields": {...}}``. DeepSpeed's own checkpoint engine unpickles its shards with
weights-only loading turned off, and whoever can rewrite a shard can rewrite the manifest, so hashes cannot make
that safe. Instead, while SC-Tune trains, DeepSpeed's loads go through :func:`load_tensors` too (weights-only, with
an allowlist of the few DeepSpeed classes its states hold: :func:`deepspeed_loads_without_pickle`), and a resume
refuses any pickled file holding other Python objects before anything loads. Either refusal names the file.

A checkpoint at or past ``--max_steps`` trains nothing: at it, the run is complete (its model is exported again,
the same model); past it, the resume is refused (:func:`check_resume_step`). A failed write names the file and, when
storage ran out, the disk or file-size limit (:func:`save_failures_named`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import hashlib
import json
import logging
import os
import pickle
import re
import shutil
import sys
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from sc_tune.jsonio import read_json

logger = logging.getLogger(__name__)

STATE_FILE = "sc_tune_state.json"
MARKER_FILE = "sc_tune_complete.json"
# A model export (sc_tune.export) is written into EXPORT_STAGING inside its folder, then swapped in; EXPORT_RECORD
# names its files and says whether the swap finished. Both live here because the model-folder checks read them.
EXPORT_STAGING = ".sc_tune_export.partial"
EXPORT_RECORD = "sc_tune_export.json"
_STEP_DIR = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
RESUME_TRUE = ("true", "1", "yes")
RESUME_FALSE = ("", "false", "0", "no", "none")


class CheckpointError(RuntimeError):
    """A checkpoint is incomplete, corrupt, or does not match the run resuming from it."""


class OutputDirError(ValueError):
    """--output_dir would overwrite the model folder or another run."""


# ---------------------------------------------------------------------------------------------- layout
def checkpoint_step(path: str) -> int | None:
    match = _STEP_DIR.match(os.path.basename(os.path.normpath(path)))
    return int(match.group(1)) if match else None


def staging_root(run_dir: str, step: int) -> str:
    """Where checkpoint ``step`` is written before it is complete (never matched by a resume)."""
    return os.path.join(run_dir, f".{PREFIX_CHECKPOINT_DIR}-{step}.partial")


def remove_stale_staging(run_dir: str) -> None:
    """Delete staging folders of saves (and conversions) that were killed, and converted copies of a checkpoint that
    a resume left (only one save runs at a time, and only before it a resume's conversion, so all are stale)."""
    if os.path.isdir(run_dir):
        for name in os.listdir(run_dir):
            if name.startswith(f".{PREFIX_CHECKPOINT_DIR}-") and name.endswith(".partial"):
                logger.warning("removing %s, left by a checkpoint save or conversion that did not finish", name)
                shutil.rmtree(os.path.join(run_dir, name), ignore_errors=True)
            elif name.startswith(f".{PREFIX_CHECKPOINT_DIR}-") and name.endswith(".universal"):
                # A checkpoint converted for a resume on another process count (sc_tune.universal), left by a run
                # that stopped before its first step deleted it: a copy, the checkpoint itself is where it was.
                logger.warning("removing %s, a converted copy left by a resume that did not start", name)
                shutil.rmtree(os.path.join(run_dir, name), ignore_errors=True)


def required_files(layout: dict) -> list[tuple[str, ...]]:
    """Files a resumable checkpoint must hold; each entry lists alternatives (any one suffices)."""
    world = layout["world_size"]
    required: list[tuple[str, ...]] = [("trainer_state.json",), (STATE_FILE,)]
    if layout["deepspeed"]:
        required.append(("latest",))  # DeepSpeed's tag file; its folder's files are covered by the manifest
    else:
        weights = ("adapter_model.safetensors", "adapter_model.bin") if layout["peft"] else (
            "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json"
        )
        required.append(weights)
        if not layout["peft"]:
            required.append(("config.json",))  # without it a resume would build a default-size model
        required.append(("optimizer.pt", "optimizer.bin"))
    required.append(("scheduler.pt",))
    required.extend([("rng_state.pth",)] if world == 1 else [(f"rng_state_{r}.pth",) for r in range(world)])
    required.extend((f"snapshot_rank{r}.pt",) for r in layout["snapshot_ranks"])
    required.extend((f"rollouts_rank{r}.pt",) for r in layout["rollout_ranks"])
    return required


def _loadable_problem(path: str) -> str | None:
    """Why ``path`` cannot be loaded (cheap structural checks, CRCs of torch's zip files), or None."""
    name = os.path.basename(path)
    try:
        if name.endswith(".json"):
            read_json(path)
        elif name.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, "pt") as f:
                f.keys()
        elif name.endswith((".pt", ".pth", ".bin")) and zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                bad = z.testzip()
            if bad is not None:
                return f"{name}: corrupt entry {bad}"
        elif name.endswith((".pt", ".pth")):
            return f"{name}: not a torch zip archive (truncated?)"
    except Exception as e:  # noqa: BLE001 - every reason a file cannot load is reported the same way
        return f"{name}: cannot be read ({type(e).__name__}: {e})"
    return None


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def _all_files(folder: str) -> list[str]:
    return sorted(
        os.path.relpath(os.path.join(root, name), folder)
        for root, _, names in os.walk(folder)
        for name in names
        if name != MARKER_FILE
    )


def _hash_files(folder: str, files: list[str]) -> dict[str, str]:
    # hashlib releases the GIL on large buffers: threads hash a multi-file checkpoint in parallel.
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return dict(zip(files, pool.map(lambda rel: _sha256(os.path.join(folder, rel)), files)))


def layout_problems(folder: str, layout: dict) -> list[str]:
    problems = []
    for alternatives in required_files(layout):
        if not any(os.path.isfile(os.path.join(folder, name)) for name in alternatives):
            problems.append(f"missing {' or '.join(alternatives)}")
    for rel in _all_files(folder):
        problem = _loadable_problem(os.path.join(folder, rel))
        if problem:
            problems.append(problem)
    return problems


def commit(staged: str, final: str, layout: dict) -> str:
    """Verify a fully written staging checkpoint, mark it complete and rename it to ``final``."""
    problems = layout_problems(staged, layout)
    if problems:
        raise CheckpointError(f"checkpoint written to {staged} is incomplete: {'; '.join(problems)}")
    files = _all_files(staged)
    hashes = _hash_files(staged, files)
    manifest = {rel: {"bytes": os.path.getsize(os.path.join(staged, rel)), "sha256": hashes[rel]} for rel in files}
    marker_tmp = os.path.join(staged, MARKER_FILE + ".tmp")
    with open(marker_tmp, "w") as f:
        json.dump({"layout": layout, "files": manifest}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(marker_tmp, os.path.join(staged, MARKER_FILE))
    if os.path.exists(final):
        # Re-saving a step (a resume from an earlier checkpoint): the old folder goes only once the new one is in.
        old = final + ".replaced"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(staged, final)
        shutil.rmtree(old)
    else:
        os.replace(staged, final)
    shutil.rmtree(os.path.dirname(staged), ignore_errors=True)
    return final


def problems(checkpoint: str) -> list[str]:
    """Why ``checkpoint`` cannot be resumed from (empty when it is complete and intact)."""
    if not os.path.isdir(checkpoint):
        return [f"{checkpoint} is not a folder"]
    marker = os.path.join(checkpoint, MARKER_FILE)
    if not os.path.isfile(marker):
        return [f"no {MARKER_FILE} (the save did not finish, or it predates verified checkpoints)"]
    try:
        saved = read_json(marker)
        layout, manifest = saved["layout"], saved["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return [f"{MARKER_FILE} is unreadable ({e})"]
    found = layout_problems(checkpoint, layout)
    present = [rel for rel in manifest if os.path.isfile(os.path.join(checkpoint, rel))]
    found += [f"missing {rel}" for rel in manifest if rel not in present and not any(rel in p for p in found)]
    sized = [rel for rel in present if os.path.getsize(os.path.join(checkpoint, rel)) == manifest[rel]["bytes"]]
    found += [
        f"{rel}: {os.path.getsize(os.path.join(checkpoint, rel))} bytes, {manifest[rel]['bytes']} when saved"
        for rel in present
        if rel not in sized
    ]
    hashes = _hash_files(checkpoint, sized)
    changed = [rel for rel in sized if hashes[rel] != manifest[rel]["sha256"]]
    found += [f"{rel}: content changed since it was saved (SHA-256 differs)" for rel in changed]
    # Independent of the manifest (which an attacker can rewrite): no file a resume unpickles may hold objects
    # beyond tensors, plain data and the allowlisted DeepSpeed/numpy classes.
    found += pickle_problems(checkpoint)
    return found


def complete_checkpoints(output_dir: str) -> list[str]:
    """``checkpoint-N`` folders of ``output_dir``, newest first (complete or not)."""
    if not os.path.isdir(output_dir):
        return []
    found = [(checkpoint_step(name), name) for name in os.listdir(output_dir)]
    return [os.path.join(output_dir, name) for step, name in sorted(f for f in found if f[0] is not None)[::-1]]


def resume_when_there(value, output_dir: str):
    """``--resume_from_checkpoint auto``: ``"True"`` where ``output_dir`` holds a checkpoint-N folder, None where it
    holds none, so that one command serves every start of a job a scheduler requeues (the first starts the run,
    the others continue it). Any other value as it is."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "True" if complete_checkpoints(output_dir) else None
    return value


def resume_requested(value) -> bool:
    return not (value is None or value is False or (isinstance(value, str) and value.strip().lower() in RESUME_FALSE))


def resumes_newest(value) -> bool:
    """``True`` (or "true"/"1"/"yes"): the newest complete checkpoint of the output folder, not a path."""
    return value is True or (isinstance(value, str) and value.strip().lower() in RESUME_TRUE)


def resolve_resume(value, output_dir: str) -> str | None:
    """The checkpoint to resume from: ``True``/"true"/"1" means the newest complete one in ``output_dir``."""
    if not resume_requested(value):
        return None
    if resumes_newest(value):
        candidates = complete_checkpoints(output_dir)
        for checkpoint in candidates:
            found = problems(checkpoint)
            if not found:
                return checkpoint
            logger.warning("skipping %s: %s", checkpoint, "; ".join(found))
        if candidates:
            raise CheckpointError(f"no complete checkpoint in {output_dir}: every checkpoint-N is broken (see above)")
        raise CheckpointError(
            f"--resume_from_checkpoint True: no checkpoint-N folder in --output_dir {output_dir} to resume from"
        )
    checkpoint = str(value)
    found = problems(checkpoint)
    if found:
        raise CheckpointError(f"cannot resume from {checkpoint}: {'; '.join(found)}")
    # An older checkpoint of this output folder starts a new branch: the old timeline's later checkpoints would stay
    # beside it, and a later --resume_from_checkpoint True would take the newest of them, dropping the branch.
    step = checkpoint_step(checkpoint)
    if step is not None and os.path.isdir(output_dir) and is_or_inside(checkpoint, output_dir):
        later = [p for p in complete_checkpoints(output_dir) if (checkpoint_step(p) or 0) > step]
        if later:
            raise CheckpointError(
                f"cannot resume from {checkpoint}: --output_dir {output_dir} holds later checkpoints of the run "
                f"({', '.join(os.path.basename(p) for p in sorted(later, key=checkpoint_step))}), which a later "
                "--resume_from_checkpoint True would take over this branch; move them out of the folder (nothing "
                "is deleted here), or resume into another --output_dir"
            )
    return checkpoint


def rotate(run_dir: str, save_total_limit: int | None, protected: set[str]) -> None:
    """Delete old checkpoints beyond the limit, broken ones first; ``protected`` (the new one, the best) stay."""
    if not save_total_limit or save_total_limit <= 0:
        return
    keep = {os.path.normpath(p) for p in protected if p}
    existing = [os.path.normpath(p) for p in complete_checkpoints(run_dir)]
    others = [p for p in existing if p not in keep]
    # Broken checkpoints go first, then the oldest: rotation never removes the newest complete checkpoint.
    others.sort(key=lambda p: (not os.path.isfile(os.path.join(p, MARKER_FILE)), -checkpoint_step(p)))
    allowed_others = max(save_total_limit - len([p for p in existing if p in keep]), 0)
    for path in others[allowed_others:]:
        logger.info("deleting %s (--save_total_limit %d)", path, save_total_limit)
        shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- run settings
def settings_mismatches(checkpoint: str, saved: dict, current: dict, allowed: set[str],
                        flags: dict[str, str] | None = None) -> list[str]:
    """Errors for settings that changed since ``checkpoint`` was saved, unless listed in ``allowed``. A setting that
    is a dict (the schedule, the model's files, the data) names only the entries that changed (``flags``: the
    command-line flag of an entry, where it has one)."""
    errors = []
    for key in sorted(saved.keys() | current.keys()):
        old, new = saved.get(key), current.get(key)
        if old == new:
            continue
        change = f"checkpoint {old!r}, now {new!r}"
        if isinstance(old, dict) and isinstance(new, dict):
            change = ", ".join(
                f"{part}{f' ({flags[part]})' if flags and part in flags else ''} checkpoint {old.get(part)!r}, "
                f"now {new.get(part)!r}" for part in sorted(old.keys() | new.keys()) if old.get(part) != new.get(part)
            )
        if key in allowed:
            logger.warning("%s: %s changed: %s (allowed by --resume_allow_changes)", checkpoint, key, change)
            continue
        errors.append(f"{key}: {change}")
    return errors


def check_world_size_change(checkpoint: str, layout: dict, world_size: int) -> None:
    """A different process count resumes only where the checkpoint holds no per-rank state a new rank could not take
    over (rollouts, a sharded snapshot); DeepSpeed's optimizer shards are re-cut by DeepSpeed (``sc_tune.universal``).
    Such a resume continues the step count, the phases, the weights and the optimizer, not the exact run."""
    if layout["world_size"] == world_size:
        return
    reasons = []
    if layout["rollout_ranks"]:
        reasons.append("it holds a half-used describer rollout per rank (the remaining PPO epochs reuse each rank's "
                       "own sampled captions, which another process count cannot deal out again)")
    if len(layout["snapshot_ranks"]) > 1:
        reasons.append("its snapshot is sharded per rank (ZeRO-3, in the middle of a phase: the frozen copy the "
                       "phase's rewards and KL come from is saved as each rank's partition)")
    if reasons:
        # Where a checkpoint holds neither: at a phase switch (no rollout, the snapshot re-synced), and under plain
        # DDP or ZeRO-2 also at a locator step or a rollout's first epoch (one unsharded snapshot file).
        where = "at a phase switch" if len(layout["snapshot_ranks"]) > 1 else "at a phase switch or a locator step"
        raise CheckpointError(
            f"{checkpoint} was saved by {layout['world_size']} processes and cannot resume on {world_size}: "
            f"{'; '.join(reasons)}. Resume with {layout['world_size']} processes, or from a checkpoint saved {where} "
            "(an earlier checkpoint-N, by its path, once the later ones are moved out of the output folder)"
        )
    logger.warning(
        "%s was saved by %d processes and resumes on %d%s: the step count, phases, weights and optimizer state "
        "continue, but the run is not bit-exact to the uninterrupted one: describer rollouts sample other captions "
        "(each rank and micro-batch seeds its own), the saved per-rank RNG states do not fit the new ranks, and unless "
        "per-device batch x gradient accumulation x processes is unchanged the steps draw other records (the data "
        "stream is dealt out by the global batch)",
        checkpoint, layout["world_size"], world_size,
        " (DeepSpeed's optimizer shards converted to its universal checkpoint)" if layout["deepspeed"] else "",
    )


def read_state(checkpoint: str) -> dict:
    return read_json(os.path.join(checkpoint, STATE_FILE))


def read_layout(checkpoint: str) -> dict:
    return read_json(os.path.join(checkpoint, MARKER_FILE))["layout"]


# ---------------------------------------------------------------------------------------------- rollout buffer
def _plain(value):
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store {type(value).__name__} in a checkpoint (tensors and plain data only)")


def _to_device(value, device):
    if isinstance(value, torch.Tensor):
        return value if device.type == "cpu" else value.to(device)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_device(v, device) for v in value]
    return value


def save_rollouts(rollouts: dict, path: str) -> None:
    """The buffered rollouts (dataclasses of tensors and plain values) as tensors + plain data."""
    plain = {
        str(micro): {
            "kind": type(r).__name__,
            "fields": {f.name: _plain(getattr(r, f.name)) for f in dataclasses.fields(r)},
        }
        for micro, r in rollouts.items()
    }
    torch.save(plain, path)


def load_rollouts(path: str, classes: list[type], device) -> dict:
    by_name = {cls.__name__: cls for cls in classes}
    # Tensors are read to the CPU first: a device such as "cpu:0" (CPU DDP) is not a valid map_location.
    plain = load_tensors(path)
    device = torch.device(device)
    rollouts = {}
    for micro, entry in plain.items():
        if entry["kind"] not in by_name:
            raise CheckpointError(f"{path}: unknown rollout kind {entry['kind']!r}")
        rollouts[int(micro)] = by_name[entry["kind"]](**_to_device(entry["fields"], device))
    return rollouts


# ---------------------------------------------------------------------------------------------- output folder
def _holds_a_run(folder: str) -> list[str]:
    if not os.path.isdir(folder):
        return []
    names = os.listdir(folder)
    found = [n for n in names if checkpoint_step(n) is not None]
    found += [n for n in ("trainer_state.json", "config.json", "model.safetensors", "lora_adapter") if n in names]
    return sorted(found)


def is_or_inside(path: str, folder: str) -> bool:
    """Whether ``path`` is ``folder`` or lies inside it, links resolved (writing there would overwrite it)."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_output_dir(output_dir: str, model_dir: str, resume_from, overwrite: bool) -> list[str]:
    """Refuse an --output_dir that would overwrite the model being trained or mix two runs' checkpoints.

    ``resume_from`` is ``--resume_from_checkpoint``. Only a resume of the folder's own run (``True``, or a checkpoint
    inside it) may write beside its checkpoints: a checkpoint from elsewhere starts a run of its own there, which
    rotation would make room for by deleting the other run's checkpoints, and whose ``True`` resume could take theirs.

    Deletes nothing: returns the checkpoint folders that ``--overwrite_output_dir`` will replace, for
    :func:`clear_output_dir` to delete once every input has been checked (the model loaded, the data read)."""
    if is_or_inside(output_dir, model_dir):
        raise OutputDirError(
            f"--output_dir {output_dir} is (inside) the model folder --model_name_or_path {model_dir}: "
            "training would overwrite the base weights; choose another folder"
        )
    found = _holds_a_run(output_dir)
    if not found or _resumes_its_own_run(resume_from, output_dir):
        return []
    if not overwrite:
        if resume_requested(resume_from):
            raise OutputDirError(
                f"--output_dir {output_dir} holds another run ({', '.join(found[:5])}), and --resume_from_checkpoint "
                f"{resume_from} is not one of its checkpoints: the resumed run would write its checkpoints beside "
                "that run's (rotation deleting theirs, a later --resume_from_checkpoint True perhaps taking theirs). "
                "Resume into another --output_dir, or pass --overwrite_output_dir True to replace that run"
            )
        raise OutputDirError(
            f"--output_dir {output_dir} holds another run ({', '.join(found[:5])}): pass --resume_from_checkpoint "
            "True to continue it, --overwrite_output_dir True to replace it, or choose another folder"
        )
    doomed = [os.path.join(output_dir, name) for name in found if checkpoint_step(name) is not None]
    for path in doomed:
        if is_or_inside(model_dir, path):
            raise OutputDirError(
                f"--model_name_or_path {model_dir} is inside {path}, which --overwrite_output_dir would delete: "
                f"copy the model out of --output_dir {output_dir} first, or choose another --output_dir"
            )
    return doomed


def _resumes_its_own_run(resume_from, output_dir: str) -> bool:
    if not resume_requested(resume_from):
        return False
    return resumes_newest(resume_from) or is_or_inside(str(resume_from), output_dir)


def clear_output_dir(doomed: list[str]) -> None:
    """Delete the previous run's checkpoints (``--overwrite_output_dir``), after every input has been checked."""
    for path in doomed:
        logger.warning("--overwrite_output_dir: deleting %s", path)
        shutil.rmtree(path, ignore_errors=not os.path.exists(path))


class ReplaceOverwrittenRun(TrainerCallback):
    """Deletes the checkpoints ``--overwrite_output_dir`` replaces at the end of the first step: after the model,
    the data, the preflight and one real step have worked, and before the first save (a new checkpoint-N must not
    sit beside the old run's, which ``--resume_from_checkpoint True`` would mistake for this run's). Main process."""

    def __init__(self, doomed: list[str], is_main: bool):
        self.doomed = list(doomed) if is_main else []

    def on_step_end(self, args, state, control, **kwargs):
        clear_output_dir(self.doomed)
        self.doomed = []


# ---------------------------------------------------------------------------------------------- resume at max_steps
def check_resume_step(checkpoint: str, max_steps: int) -> None:
    """Refuse a ``checkpoint`` past ``max_steps``: training cannot go back, and its weights are not a
    ``max_steps``-step model (the Trainer would train one more step and export it). One saved at ``max_steps`` ends
    the run: nothing is trained, its model is the result (said in the log)."""
    step = read_state(checkpoint)["next_step"]
    if step > max_steps:
        raise CheckpointError(
            f"{checkpoint} was saved after step {step}, past --max_steps {max_steps}: there is nothing to train and "
            f"its weights are not a {max_steps}-step model. Resume with --max_steps >= {step}, or resume from a "
            f"checkpoint-N with N <= {max_steps} (by its path) into a new --output_dir"
        )
    if step == max_steps:
        logger.warning(
            "%s is at --max_steps %d: the run is complete; no step is trained and its model is exported again",
            checkpoint, max_steps,
        )


# ---------------------------------------------------------------------------------------------- loading without pickle
# Files a resume unpickles (torch.load); training_args.bin is written for the record and never loaded by a resume.
PICKLED_SUFFIXES = (".pt", ".pth", ".bin")
NEVER_LOADED = ("training_args.bin",)
# Classes DeepSpeed's ZeRO states pickle besides tensors and plain data (its optimizer's loss scaler, its stage enum,
# the bf16 optimizer's fragment addresses), and the numpy ones of the Trainer's RNG state files.
_ALLOWED_CLASSES = (
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


def _allowed_classes() -> list:
    import importlib

    import numpy as np

    core = getattr(np, "_core", None) or np.core  # numpy 2 pickles numpy._core.multiarray._reconstruct
    allowed = [np.ndarray, np.dtype, type(np.dtype(np.uint32)), core.multiarray._reconstruct]
    if "deepspeed" in sys.modules:  # only a DeepSpeed run can need (or load) its classes
        for name in _ALLOWED_CLASSES:
            module, _, attribute = name.rpartition(".")
            with contextlib.suppress(ImportError, AttributeError):
                allowed.append(getattr(importlib.import_module(module), attribute))
    return allowed


def _refused(path: str, error: Exception) -> CheckpointError:
    found = re.search(r"GLOBAL ([\w.]+)", str(error))
    what = f" ({found.group(1)})" if found else ""
    return CheckpointError(
        f"{path}: refused to load: it holds Python objects other than tensors and plain data{what}, which could run "
        "code when unpickled; a genuine checkpoint never does. Do not resume from files of unknown origin"
    )


def load_tensors(path: str, map_location="cpu"):
    """``torch.load(weights_only=True)`` (tensors, plain data, allowlisted classes); a refusal names the file."""
    with torch.serialization.safe_globals(_allowed_classes()):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as e:
            raise _refused(path, e) from None


@contextlib.contextmanager
def deepspeed_loads_without_pickle():
    """For the body, DeepSpeed's checkpoint engine loads through :func:`load_tensors` (its own ``load`` unpickles
    anything: weights-only loading off). Restored afterwards; a no-op when DeepSpeed is not imported."""
    if "deepspeed" not in sys.modules:
        yield
        return
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    original = TorchCheckpointEngine.load

    @functools.wraps(original)
    def load(self, path, map_location=None):
        return load_tensors(path, map_location)

    TorchCheckpointEngine.load = load
    try:
        yield
    finally:
        TorchCheckpointEngine.load = original


def pickle_problems(folder: str) -> list[str]:
    """Pickled files under ``folder`` that a resume would load and that hold objects a weights-only load refuses."""
    found = []
    with torch.serialization.safe_globals(_allowed_classes()):
        for rel in _all_files(folder):
            path = os.path.join(folder, rel)
            if not rel.endswith(PICKLED_SUFFIXES) or os.path.basename(rel) in NEVER_LOADED:
                continue
            if not zipfile.is_zipfile(path):
                continue  # not torch's zip format: the structural check reports .pt/.pth, weights loads refuse .bin
            try:
                unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
            except Exception as e:  # noqa: BLE001 - a pickle that cannot even be scanned is not loadable either
                found.append(f"{rel}: cannot be checked ({type(e).__name__}: {e})")
                continue
            if unsafe:
                found.append(f"{rel}: holds Python objects that could run code when unpickled ({', '.join(unsafe[:3])})"
                             "; refused")
    return found


# ---------------------------------------------------------------------------------------------- model folders
def model_folder_problems(folder: str) -> list[str]:
    """Weight files of a model folder that cannot load (truncated, corrupt, a shard the index names is missing)."""
    problems_found = []
    if not os.path.isdir(folder):
        return []  # modeling names a missing folder (and where to download the checkpoint)
    names = sorted(os.listdir(folder))
    problems_found += export_problems(folder)
    for name in names:
        path = os.path.join(folder, name)
        if name.endswith(".safetensors"):
            problem = _loadable_problem(path)
            if problem:
                problems_found.append(f"{problem} (truncated or corrupt: download or copy it again)")
        elif name.endswith(".index.json"):
            try:
                shards = set(read_json(path).get("weight_map", {}).values())
            except (ValueError, AttributeError) as e:
                problems_found.append(f"{name}: cannot be read ({e})")
                continue
            problems_found += [f"{name} names {s}, which is missing" for s in sorted(shards) if s not in names]
    return problems_found


def export_problems(folder: str) -> list[str]:
    """Why ``folder``'s model is not the last export written into it: one was cut short while it was written (its
    staging folder is left, and the weights here, if any, are an earlier export's) or while it replaced the earlier
    one (the record says the swap did not finish: a mix of the two)."""
    record = None
    if os.path.isfile(os.path.join(folder, EXPORT_RECORD)):
        try:
            record = read_json(os.path.join(folder, EXPORT_RECORD))
            complete = record.get("complete") is True
        except (OSError, ValueError, AttributeError) as e:
            return [f"{EXPORT_RECORD} cannot be read ({e})"]
    found = []
    if os.path.isdir(os.path.join(folder, EXPORT_STAGING)):
        held = (f"the model files here are the earlier export's ({_export_origin(record)}); delete {EXPORT_STAGING} "
                "to use them anyway" if record is not None and complete else "no complete export is here")
        found.append(f"an export into this folder did not finish ({EXPORT_STAGING} is left): {held}")
    if record is not None and not complete:
        found.append(f"an export was cut short while it replaced the earlier one ({EXPORT_RECORD} says "
                     "incomplete): its files are a mix of the two")
    return found


def _export_origin(record: dict) -> str:
    step = record.get("step")
    return f"step {step}" if step is not None else f"merged from {record.get('adapter', 'an adapter')}"


def check_model_folder(folder: str, flag: str = "--model_name_or_path") -> None:
    found = model_folder_problems(folder)
    if found:
        # A training run's output folder whose export was cut short (a kill while the model was written): its
        # newest checkpoint redoes the export.
        saved = complete_checkpoints(folder) if os.path.isdir(folder) else []
        redo = (f". This is a training run's output folder: rerun its training command with --resume_from_checkpoint "
                f"True to write the export again from {os.path.basename(saved[0])}") if saved else ""
        raise CheckpointError(f"{flag} {folder}: {'; '.join(found)}{redo}")


# ---------------------------------------------------------------------------------------------- failed writes
_STORAGE_ERRNOS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
                   errno.EFBIG: "the file-size limit was reached (file too large)"}


def _failed_file(folder: str, since: float) -> str | None:
    """The file a failed save was writing: under a file-size limit the one that reached it, else the newest. File
    times tick coarsely (a few ms), so files written together can share one: the bigger is the one in progress."""
    import resource

    written = []
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with contextlib.suppress(OSError):
                info = os.stat(path)
                if info.st_mtime >= since - 1.0:
                    written.append((info.st_mtime, info.st_size, path))
    if not written:
        return None
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    at_limit = [w for w in written if limit != resource.RLIM_INFINITY and w[1] >= limit - (1 << 16)]
    return max(at_limit or written)[2]


def _storage_cause(error: BaseException, folder: str, written: str | None) -> str | None:
    """Why a write failed, where storage ran out (errno, free space, the ulimit -f file-size limit); else None."""
    chain, seen = [], error
    while seen is not None and len(chain) < 5:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    for e in chain:
        if isinstance(e, OSError) and e.errno in _STORAGE_ERRNOS:
            return _STORAGE_ERRNOS[e.errno]
    text = " ".join(str(e) for e in chain)
    import resource

    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    size = os.path.getsize(written) if written and os.path.exists(written) else 0
    if limit != resource.RLIM_INFINITY and (size >= limit - (1 << 16) or "File too large" in text):
        return f"the file-size limit (ulimit -f) of {limit} bytes was reached (file too large)"
    with contextlib.suppress(OSError):
        free = shutil.disk_usage(folder).free
        if free < (64 << 20) or "No space left" in text:
            return f"the disk is full ({free} bytes free)"
    if "Disk quota" in text:
        return "the disk quota is exceeded"
    return None


@contextlib.contextmanager
def save_failures_named(folder: str, what: str):
    """A failed write inside the body becomes a :class:`CheckpointError` naming the file being written and, where
    storage ran out, the cause: disk full, quota or file-size limit. Other errors pass through unchanged."""
    started = time.time()
    try:
        yield
    except CheckpointError:
        raise
    except Exception as e:  # torch.save raises RuntimeError, safetensors its own error, Python OSError
        if not isinstance(e, (OSError, RuntimeError)) and type(e).__name__ != "SafetensorError":
            raise
        written = _failed_file(folder, started)
        cause = _storage_cause(e, folder, written)
        if cause is None and not isinstance(e, OSError):
            raise  # not a storage failure: a bug keeps its traceback
        size = os.path.getsize(written) if written and os.path.exists(written) else 0
        where = f"while writing {written} ({size} bytes written)" if written else f"in {folder}"
        reason = f"out of storage: {cause}" if cause else f"{type(e).__name__}: {e}"
        raise CheckpointError(
            f"saving {what} failed {where}: {reason}. The complete checkpoints already in {folder} are kept; free "
            "space (or raise the limit), then resume with --resume_from_checkpoint True"
        ) from e
