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
stored as ``{"kind": class name, "fields": {...}}``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import zipfile
from concurrent.futures import ThreadPoolExecutor

import torch
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from sc_tune.jsonio import read_json

logger = logging.getLogger(__name__)

STATE_FILE = "sc_tune_state.json"
MARKER_FILE = "sc_tune_complete.json"
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
    """Delete staging folders of saves that were killed (only one save runs at a time, so all are stale)."""
    if os.path.isdir(run_dir):
        for name in os.listdir(run_dir):
            if name.startswith(f".{PREFIX_CHECKPOINT_DIR}-") and name.endswith(".partial"):
                logger.warning("removing %s, left by a checkpoint save that did not finish", name)
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
    return found


def complete_checkpoints(output_dir: str) -> list[str]:
    """``checkpoint-N`` folders of ``output_dir``, newest first (complete or not)."""
    if not os.path.isdir(output_dir):
        return []
    found = [(checkpoint_step(name), name) for name in os.listdir(output_dir)]
    return [os.path.join(output_dir, name) for step, name in sorted(f for f in found if f[0] is not None)[::-1]]


def resume_requested(value) -> bool:
    return not (value is None or value is False or (isinstance(value, str) and value.strip().lower() in RESUME_FALSE))


def resolve_resume(value, output_dir: str) -> str | None:
    """The checkpoint to resume from: ``True``/"true"/"1" means the newest complete one in ``output_dir``."""
    if not resume_requested(value):
        return None
    if value is True or (isinstance(value, str) and value.strip().lower() in RESUME_TRUE):
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
def settings_mismatches(checkpoint: str, saved: dict, current: dict, allowed: set[str]) -> list[str]:
    """Errors for settings that changed since ``checkpoint`` was saved, unless listed in ``allowed``."""
    errors = []
    for key in sorted(saved.keys() | current.keys()):
        old, new = saved.get(key), current.get(key)
        if old == new:
            continue
        if key in allowed:
            logger.warning(
                "%s: %s changed from %r to %r (allowed by --resume_allow_changes)", checkpoint, key, old, new
            )
            continue
        errors.append(f"{key}: checkpoint {old!r}, now {new!r}")
    return errors


def check_world_size_change(checkpoint: str, layout: dict, world_size: int) -> None:
    """A different process count can only resume where no per-rank state (rollouts, shards) is needed."""
    if layout["world_size"] == world_size:
        return
    reasons = []
    if layout["rollout_ranks"]:
        reasons.append("it holds a half-used describer rollout per rank")
    if len(layout["snapshot_ranks"]) > 1:
        reasons.append("its snapshot is sharded per rank (ZeRO-3)")
    if layout["deepspeed"]:
        reasons.append("DeepSpeed's optimizer shards are per rank")
    if reasons:
        raise CheckpointError(
            f"{checkpoint} was saved by {layout['world_size']} processes and cannot resume on {world_size}: "
            f"{'; '.join(reasons)}. Resume with {layout['world_size']} processes, or from a checkpoint saved at a "
            "phase switch without DeepSpeed"
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
    plain = torch.load(path, map_location="cpu", weights_only=True)
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


def check_output_dir(output_dir: str, model_dir: str, resuming: bool, overwrite: bool, delete: bool = True) -> None:
    """Refuse an --output_dir that would overwrite the model being trained or mix two runs' checkpoints."""
    out, model = os.path.realpath(output_dir), os.path.realpath(model_dir)
    if out == model or out.startswith(model + os.sep):
        raise OutputDirError(
            f"--output_dir {output_dir} is (inside) the model folder --model_name_or_path {model_dir}: "
            "training would overwrite the base weights; choose another folder"
        )
    found = _holds_a_run(output_dir)
    if not found or resuming:
        return
    if not overwrite:
        raise OutputDirError(
            f"--output_dir {output_dir} holds another run ({', '.join(found[:5])}): pass --resume_from_checkpoint "
            "True to continue it, --overwrite_output_dir True to replace it, or choose another folder"
        )
    for name in found if delete else []:
        if checkpoint_step(name) is not None:
            logger.warning("--overwrite_output_dir: deleting %s", os.path.join(output_dir, name))
            shutil.rmtree(os.path.join(output_dir, name))
