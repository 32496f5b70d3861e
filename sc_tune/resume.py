"""The run state a checkpoint holds beyond the Trainer's own files, its save and restore, and the strict checks.

The Trainer saves weights, optimizer, scheduler, RNG states and ``trainer_state.json``. SC-Tune adds to every
``checkpoint-N`` what a resumed run needs to continue exactly:

- ``sc_tune_state.json``: the next step and its place in the phase schedule, the run settings, the KL controller;
- ``snapshot_rank<r>.pt``: the snapshot's weights, unless step N starts a phase (it re-syncs then): a resume in
  the middle of a phase must take its pseudo-labels, KL reference and baseline from the same frozen weights;
- ``rollouts_rank<r>.pt``: the buffered rollout, when step N reuses one (between the PPO epochs of a rollout).

Where and how files are written, verified and renamed is ``sc_tune.checkpoints``' (never half a checkpoint).
Resuming, rank 0 finds the checkpoint, checks it and the run settings (a change must be listed in
``--resume_allow_changes``) and tells the other ranks; every rank restores its part at the first step.
"""

from __future__ import annotations

import hashlib
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from accelerate.utils import broadcast_object_list, wait_for_everyone
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from sc_tune import checkpoints, universal
from sc_tune.cycle import DescriberRollout, LocatorRollout
from sc_tune.data import images_digest, records_digest
from sc_tune.jsonio import write_json
from sc_tune.phases import PhaseSchedule
from sc_tune.snapshot import Snapshot, is_peft

logger = logging.getLogger(__name__)


# The method's settings a resume must keep (each changes what a step computes: the sampled captions, the reward and
# its baseline, the locator's answer form, the KL control); recorded since 2026-12-05.
METHOD_SETTINGS = ("describer_temperature", "describer_top_k", "describer_top_p", "describer_min_new_tokens",
                   "describer_max_new_tokens", "locator_max_new_tokens", "num_generations", "describer_baseline",
                   "scale_rewards_by_group_std", "reward", "ratio_threshold", "policy_kl_stop", "kl_controller",
                   "kl_target", "kl_horizon")
# Run settings that checkpoints of earlier versions do not record: compared only where the checkpoint holds them.
RECORDED_LATER = frozenset({"zero_stage", "data", "model_files", "box_format", "trainable_parameters", "lora_config",
                            "image_files", *METHOD_SETTINGS})
# The schedule's fields that place a step in the phases (a resume cannot move them), and the flags that set each.
SCHEDULE_FLAGS = {"describer_rollouts": "--describer_update_steps", "locator_steps": "--locator_update_steps",
                  "ppo_epochs": "--ppo_epochs", "describer_lr": "--describer_lr", "locator_lr": "--locator_lr"}
PHASE_POSITION = ("describer_rollouts", "locator_steps", "ppo_epochs")
# The model folder's files whose bytes a resume compares (weights: by size and sampled bytes; hashing them whole
# would take minutes).
MODEL_TEXT_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json",
                    "merges.txt", "tokenizer.model", "qwen.tiktoken", "special_tokens_map.json", "added_tokens.json",
                    "chat_template.jinja", "chat_template.json", "preprocessor_config.json", "processor_config.json",
                    "video_preprocessor_config.json")


WEIGHT_SAMPLES, WEIGHT_SAMPLE_BYTES = 16, 1 << 16


def weight_fingerprint(path: str) -> str:
    """A weight file's size and a digest of 16 windows of 64 KiB spread evenly from its first byte to its last.

    Hashing a 15 GB model takes minutes at every resume; its size alone missed another model of the same
    architecture put at the same path (another base under LoRA: every size equal). Weights that differ differ
    nearly everywhere, so 1 MiB sampled across the file tells them apart; a copy of the same file matches."""
    size = os.path.getsize(path)
    digest = hashlib.sha256()
    last_start = max(size - WEIGHT_SAMPLE_BYTES, 0)
    with open(path, "rb") as f:
        for i in range(WEIGHT_SAMPLES):
            f.seek(last_start * i // (WEIGHT_SAMPLES - 1))
            digest.update(f.read(WEIGHT_SAMPLE_BYTES))
    return f"{size} bytes, sampled {digest.hexdigest()[:16]}"


def model_files(folder: str) -> dict | None:
    """The model folder's tokenizer, template, processor and config files (a digest each) and weight files (their
    ``weight_fingerprint``): a folder replaced or edited at the same path (another base under LoRA, another
    template) is not the model the checkpoint trained."""
    if not os.path.isdir(folder):
        return None
    files = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name in MODEL_TEXT_FILES and os.path.isfile(path):
            with open(path, "rb") as f:
                files[name] = hashlib.sha256(f.read()).hexdigest()[:16]
        elif name.endswith((".safetensors", ".bin")) and os.path.isfile(path):
            files[name] = weight_fingerprint(path)
    return files


def _as_recorded(saved_files: dict, current_files: dict) -> dict:
    """``current_files`` in the layout of a checkpoint that recorded weight files by their size alone (written by
    the version before ``weight_fingerprint``): its sizes are compared, the sampled bytes are unknown to it."""
    return {name: int(entry.split(" ", 1)[0]) if isinstance(saved_files.get(name), int) else entry
            for name, entry in current_files.items()}


def run_settings(args, model, schedule: PhaseSchedule, deepspeed: bool, adapter=None,
                 zero_stage: int | None = None, records: list[dict] | None = None,
                 model_folder: str | None = None) -> dict:
    """What a resumed run must share with the saved one (``--resume_allow_changes`` lists exceptions)."""
    config = getattr(model, "config", None)
    image_pixels = getattr(adapter, "image_pixel_limits", None)
    lora = getattr(model, "peft_config", {}).get("default") if is_peft(model) else None
    image_bytes = images_digest(records) if records is not None else None
    later = {
        # A resume that reads other records draws other batches from the same sampler indices.
        **({"data": {"records": len(records), "sha256": records_digest(records)}} if records is not None else {}),
        # The image files' bytes, read by the image check (not with --check_images False): another image under a
        # record's file name draws another sample.
        **({"image_files": {"images": len({r["image"] for r in records}), "sha256": image_bytes}}
           if image_bytes is not None else {}),
        **({"model_files": model_files(model_folder)} if model_folder and os.path.isdir(model_folder) else {}),
        **({"box_format": adapter.box_format} if adapter is not None else {}),
        # --fix_vit and the LoRA settings decide which parameters train (and the optimizer's groups).
        **({"trainable_parameters": sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters()
                                        if p.requires_grad)} if model is not None else {}),
        **({"lora_config": {"r": lora.r, "lora_alpha": lora.lora_alpha, "lora_dropout": lora.lora_dropout,
                            "target_modules": _plain(lora.target_modules),
                            "target_parameters": _plain(lora.target_parameters)}} if lora is not None else {}),
        **{name: getattr(args, name) for name in METHOD_SETTINGS if hasattr(args, name)},
    }
    return {
        "model": getattr(config, "_name_or_path", None),
        "model_type": getattr(config, "model_type", None),
        "lora": is_peft(model),
        "schedule": dict(schedule.__dict__),
        "kl_coef": args.kl_coef,
        "clip_range": args.clip_range,
        "gamma": args.gamma,
        "per_device_train_batch_size": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "seed": args.seed,
        "world_size": args.world_size,
        "precision": "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32",
        "deepspeed": deepspeed,
        # Under DeepSpeed, the ZeRO stage: its optimizer and snapshot shards are laid out per stage (DeepSpeed's own
        # load of another stage's files ends in a bare assertion). Compared only where the checkpoint has it.
        **({"zero_stage": zero_stage} if deepspeed and zero_stage is not None else {}),
        # Only when on, so that runs saved before the flag existed (off) still resume.
        **({"pseudo_label_min_iou": args.pseudo_label_min_iou} if args.pseudo_label_min_iou else {}),
        # The images' resolution sets what the policy sees (and Qwen2.5-VL's pixel boxes); only when set, as above.
        **({"image_pixels": list(image_pixels)} if image_pixels is not None else {}),
        **later,
    }


def _plain(value):
    """A LoRA config field as JSON holds it (PEFT keeps target names as a set or a regex string)."""
    return sorted(value) if isinstance(value, (set, list, tuple)) else value


def optimizer_offloaded_to_nvme(deepspeed_config: dict | None) -> bool:
    """Whether a DeepSpeed config (None: no DeepSpeed) offloads the optimizer state to NVMe (ZeRO-Infinity)."""
    if deepspeed_config is None:
        return False
    zero = deepspeed_config.get("zero_optimization") or {}
    return (zero.get("offload_optimizer") or {}).get("device") == "nvme"


class RunState:
    """The SC-Tune state of a run: the phase schedule, the KL controller, the snapshot and the rollout buffer."""

    def __init__(self, args, schedule: PhaseSchedule, kl_controller, snapshot: Snapshot, settings: dict,
                 zero3: bool, optimizer_on_nvme: bool = False):
        self.args = args
        self.schedule = schedule
        self.kl_controller = kl_controller
        self.snapshot = snapshot
        self.settings = settings
        self.zero3 = zero3  # parameters (the snapshot's too) are sharded: every rank saves its own part
        self.optimizer_on_nvme = optimizer_on_nvme  # ZeRO-Infinity: the optimizer state lives in per-rank swap files
        self.rollouts: dict[int, DescriberRollout | LocatorRollout] = {}  # this step's, by micro-batch
        self.resume_dir: str | None = None  # restored at the first step of train()
        self.converted_dir: str | None = None  # its DeepSpeed state converted for another process count

    def save(self, checkpoint: str, next_step: int) -> dict:
        """Phase position, run settings, the snapshot (unless the next step re-syncs it) and a mid-rollout buffer.
        Returns the layout: which per-rank files the checkpoint must hold."""
        position = self.schedule.at(next_step)
        rank, world = self.args.process_index, self.args.world_size
        layout = {
            "world_size": world,
            "deepspeed": self.settings["deepspeed"],
            "peft": self.settings["lora"],
            "snapshot_ranks": [] if position.starts_phase else list(range(world)) if self.zero3 else [0],
            "rollout_ranks": [] if position.needs_rollout else list(range(world)),
        }
        os.makedirs(checkpoint, exist_ok=True)
        if rank == 0:
            write_json(
                os.path.join(checkpoint, checkpoints.STATE_FILE),
                {
                    "next_step": next_step,
                    "phase": position.phase.value,
                    "step_in_phase": position.step_in_phase,
                    "ppo_epoch": position.ppo_epoch,
                    "schedule": self.schedule.__dict__,
                    "settings": self.settings,
                    "kl_controller": self.kl_controller.state_dict(),
                },
            )
        if rank in layout["snapshot_ranks"]:
            tensors = {k: v.detach().cpu().clone() for k, v in self.snapshot.named_local_tensors().items()}
            torch.save(tensors, os.path.join(checkpoint, f"snapshot_rank{rank}.pt"))
        if rank in layout["rollout_ranks"]:
            checkpoints.save_rollouts(self.rollouts, os.path.join(checkpoint, f"rollouts_rank{rank}.pt"))
        return layout

    def restore(self, checkpoint: str, step: int) -> None:
        """At the first step of a resumed run: the KL controller, and the snapshot and rollout buffer if saved."""
        saved = checkpoints.read_state(checkpoint)
        # Only what places the step in the phases must match (check_settings refused any other change that was not
        # allowed; a learning rate may change with --resume_allow_changes schedule).
        moved = [f for f in PHASE_POSITION if saved["schedule"].get(f) != self.schedule.__dict__[f]]
        if moved:
            raise ValueError(
                f"{checkpoint}: trained with phase schedule {saved['schedule']}, "
                f"now {self.schedule.__dict__}; resume with the same phase settings"
            )
        if saved["next_step"] != step:
            raise ValueError(f"{checkpoint}: saved before step {saved['next_step']}, resuming at {step}")
        self.kl_controller.load_state_dict(saved["kl_controller"])
        position = self.schedule.at(step)
        rank = self.args.process_index
        if not position.starts_phase:
            path = os.path.join(checkpoint, f"snapshot_rank{rank if self.zero3 else 0}.pt")
            # Read to the CPU: the snapshot copies into its own tensors, and "cpu:0" (CPU DDP) is no map_location.
            self.snapshot.load_local_tensors(checkpoints.load_tensors(path))
        if not position.needs_rollout:
            path = os.path.join(checkpoint, f"rollouts_rank{rank}.pt")
            self.rollouts = checkpoints.load_rollouts(path, [DescriberRollout, LocatorRollout], self.args.device)

    # ------------------------------------------------------------------ before training: which checkpoint, if any
    def find_resume(self, resume_from_checkpoint, is_main: bool) -> str | None:
        """``resume_from_checkpoint``: True (or "true"/"1") for the newest complete checkpoint, or a path. Rank 0
        checks the checkpoint (hashing every file once) and the settings, converts a DeepSpeed checkpoint saved by
        another number of processes (``sc_tune.universal``), and tells the others what it found. Returns the folder
        the Trainer loads: the checkpoint, or its converted copy (``self.converted_dir``)."""
        if is_main:
            try:
                found = (checkpoints.resolve_resume(resume_from_checkpoint, self.args.output_dir), None, None)
                if found[0] is not None:
                    self.check_settings(found[0])
                    found = (found[0], None, self._converted_if_resharded(found[0]))
            except checkpoints.CheckpointError as e:
                found = (None, str(e), None)
        else:
            found = (None, None, None)
        if self.args.world_size > 1:
            found = broadcast_object_list(list(found), from_process=0)
        resume, error, converted = found
        if error is not None:
            raise checkpoints.CheckpointError(error)
        if resume is not None:
            logger.info("resuming from %s%s", resume,
                        f" (DeepSpeed's state loaded from {converted})" if converted else "")
        self.resume_dir, self.converted_dir = resume, converted
        return converted or resume

    def _converted_if_resharded(self, checkpoint: str) -> str | None:
        """Rank 0: the universal copy of a DeepSpeed checkpoint saved by another number of processes, else None."""
        layout = checkpoints.read_layout(checkpoint)
        if not universal.needs_conversion(layout, self.args.world_size):
            return None
        if self.optimizer_on_nvme:
            # DeepSpeed loads an NVMe-offloaded optimizer from each rank's swap files and skips the universal load
            # (DeepSpeedEngine.load_checkpoint): nothing would re-cut its state.
            raise checkpoints.CheckpointError(
                f"{checkpoint} was saved by {layout['world_size']} processes and cannot resume on "
                f"{self.args.world_size} with the optimizer offloaded to NVMe (DeepSpeed restores it from each "
                f"rank's swap files, and does not load universal checkpoints then). Resume with "
                f"{layout['world_size']} processes, or with a DeepSpeed config whose offload_optimizer device is "
                "cpu or none"
            )
        return universal.convert(checkpoint, self.args.output_dir, self.args.world_size)

    def drop_converted(self) -> None:
        """Once every rank has loaded it (the first step): the converted copy goes, the checkpoint stays."""
        if self.converted_dir is None:
            return
        wait_for_everyone()
        if self.args.process_index == 0:
            universal.remove(self.converted_dir)
        self.converted_dir = None

    def check_settings(self, checkpoint: str) -> None:
        allowed = {k.strip() for k in (self.args.resume_allow_changes or "").split(",") if k.strip()}
        if "data" in allowed:
            allowed.add("image_files")  # other data is other records and other images alike
        saved = checkpoints.read_state(checkpoint).get("settings", {})
        unknown = sorted(allowed - saved.keys() - self.settings.keys())
        if unknown:  # a typo would otherwise allow nothing, silently
            raise checkpoints.CheckpointError(
                f"--resume_allow_changes {','.join(unknown)}: no such run setting; the recorded ones are "
                f"{', '.join(sorted(saved.keys() | self.settings.keys()))}"
            )
        # Settings recorded since a checkpoint was written are unknown for it, not changed.
        current = {k: v for k, v in self.settings.items() if k in saved or k not in RECORDED_LATER}
        if saved.get("model") and current.get("model") and \
                os.path.realpath(saved["model"]) == os.path.realpath(current["model"]):
            current["model"] = saved["model"]  # the same folder spelled another way (a trailing slash, a link)
        if "image_files" in saved and "image_files" not in current:
            # This run did not read the images (--check_images False): unknown, not changed.
            logger.warning("%s: the image files are not compared with the checkpoint's: --check_images False",
                           checkpoint)
            saved = {k: v for k, v in saved.items() if k != "image_files"}
        if isinstance(saved.get("model_files"), dict) and isinstance(current.get("model_files"), dict):
            current["model_files"] = _as_recorded(saved["model_files"], current["model_files"])
        old, new = saved.get("schedule") or {}, current.get("schedule") or {}
        moved = [f for f in PHASE_POSITION if f in old and old.get(f) != new.get(f)]
        if moved and "schedule" in allowed:
            raise checkpoints.CheckpointError(
                f"{checkpoint}: {', '.join(SCHEDULE_FLAGS[f] for f in moved)} cannot change on resume (they place "
                "every step in the describer and locator phases); of the schedule only the learning rates may"
            )
        errors = checkpoints.settings_mismatches(checkpoint, saved, current, allowed, SCHEDULE_FLAGS)
        if errors:
            raise checkpoints.CheckpointError(
                f"{checkpoint} was saved with other settings: {'; '.join(errors)}. Resume with the same settings, "
                "or list the legitimate changes by the names before their colons in --resume_allow_changes "
                "(e.g. data,seed)"
            )
        checkpoints.check_world_size_change(checkpoint, checkpoints.read_layout(checkpoint), self.args.world_size)
        checkpoints.check_resume_step(checkpoint, self.args.max_steps)


@dataclass
class StagedCheckpoint:
    root: str  # where the Trainer writes checkpoint-N (and rotates: it finds only the new folder there)
    folder: str  # root/checkpoint-N
    layout: dict | None = None  # which per-rank files it must hold (RunState.save's answer)


@contextmanager
def staged_checkpoint(run_dir: str, step: int, accelerator, is_main: bool, save_total_limit, protected):
    """Everything written inside goes to a staging folder; on leaving, rank 0 verifies it, marks it complete, renames
    it to ``run_dir/checkpoint-<step>`` and rotates (``protected()``: folders rotation must keep, e.g. the best).
    A write that fails, inside or here, is reported naming the file and the storage cause (disk full, quota,
    file-size limit)."""
    name = f"{PREFIX_CHECKPOINT_DIR}-{step}"
    with checkpoints.save_failures_named(run_dir, name):
        root = checkpoints.staging_root(run_dir, step)
        if is_main:
            checkpoints.remove_stale_staging(run_dir)
        accelerator.wait_for_everyone()
        staged = StagedCheckpoint(root, os.path.join(root, name))
        yield staged
        accelerator.wait_for_everyone()
        if is_main:
            final = checkpoints.commit(staged.folder, os.path.join(run_dir, name), staged.layout)
            checkpoints.rotate(run_dir, save_total_limit, {final, *protected()})
        accelerator.wait_for_everyone()


def load_weights_strictly(model, checkpoint: str) -> None:
    """The checkpoint's weights into ``model``, every parameter found.

    transformers 5 saves some families (Qwen2-VL, ...) under their original key names and the Trainer's plain
    load_state_dict(strict=False) then restores nothing, silently. Going through from_pretrained applies the key
    conversion."""
    saved = (
        type(model)
        .from_pretrained(checkpoint, dtype=next(model.parameters()).dtype, local_files_only=True)
        .state_dict()
    )
    own = model.state_dict()
    missing = own.keys() - saved.keys()
    if missing:
        raise ValueError(f"{checkpoint}: checkpoint lacks {sorted(missing)[:5]}")
    with torch.no_grad():
        for name, tensor in own.items():
            tensor.copy_(saved[name])
