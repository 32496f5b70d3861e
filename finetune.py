"""SC-Tune entry point: parse arguments, build model, data and trainer, train, export.

    torchrun --nproc_per_node 8 finetune.py --model_name_or_path Qwen-VL-Chat \
        --data_path data/object365.json --image_folder /data/objects365 --output_dir output_qwen \
        --bf16 True --deepspeed scripts/ds_config_zero2.json

`python finetune.py --help` lists every knob; scripts/finetune_ds.sh sets the reference's values.
"""

# ruff: noqa: E402 (the torchvision check runs before transformers is imported)
from __future__ import annotations

import functools
import logging
import sys

from sc_tune.environment import check_torchvision

check_torchvision()  # before transformers: a torchvision that does not load with this torch breaks its imports

import torch
from transformers import set_seed

from sc_tune.adapters.base import ThinkingCheckpointError
from sc_tune.arguments import ArgumentError, check_same_flags_on_every_rank
from sc_tune.checkpoints import (
    CheckpointError,
    OutputDirError,
    ReplaceOverwrittenRun,
    check_model_folder,
    check_output_dir,
    resume_when_there,
    save_failures_named,
)
from sc_tune.data import (AnnotationError, ReferringDataset, boxes_mostly_unseen, check_fills_a_step,
                          check_same_records_on_every_rank)
from sc_tune.export import export_trained
from sc_tune.help_layout import build_parser
from sc_tune.jsonio import JSONFileError
from sc_tune.modeling import (
    apply_lora,
    freeze_vision_tower,
    load_model_and_adapter,
    qlora_quantization_config,
    trainable_summary,
)
from sc_tune.preemption import SaveAndStopOnSignal, StoppedBySignal, exiting_on, parse_signals
from sc_tune.preflight import PreflightError
from sc_tune.process_exit import close_process_group, run_command
from sc_tune.reference_flags import refuse_unknown, take_reference_flags
from sc_tune.run_lock import RunLockError, hold
from sc_tune.trainer import SCTuneTrainer

logger = logging.getLogger("sc_tune")


def parse_args(argv: list[str] | None = None):
    """(model, data, LoRA, training arguments, notes): the reference's flags taken out first, unknown ones refused."""
    argv = list(sys.argv[1:] if argv is None else argv)
    argv, notes = take_reference_flags(argv)
    *parsed, remaining = build_parser().parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    refuse_unknown(remaining, "finetune.py")
    return (*parsed, notes)


def main(argv: list[str] | None = None) -> SCTuneTrainer:
    model_args, data_args, lora_args, args, notes = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.process_index == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for note in notes:
        logger.warning(note)
    if lora_args.q_lora and not lora_args.use_lora:
        raise ArgumentError("--q_lora needs --use_lora")
    stop_signals = parse_signals(args.save_on_signal)  # a bad name fails here, not after the model has loaded
    args.resume_from_checkpoint = resume_when_there(args.resume_from_checkpoint, args.output_dir)
    with exiting_on(stop_signals):  # until training: a stop signal ends the run with its lock released
        return _checked_and_locked(model_args, data_args, lora_args, args, stop_signals)


def _checked_and_locked(model_args, data_args, lora_args, args, stop_signals) -> SCTuneTrainer:
    # Nothing is deleted before every input has been checked: the refusals come first, the old run's checkpoints
    # (--overwrite_output_dir) go only once the model, the data, its images and the first step have worked.
    overwritten = check_output_dir(
        args.output_dir, model_args.model_name_or_path, args.resume_from_checkpoint, args.overwrite_output_dir,
    )
    check_model_folder(model_args.model_name_or_path)

    if args.deepspeed:
        # ZeRO-3 partitions weights while from_pretrained runs, so DeepSpeed's communication layer must be
        # up first (it reuses the process group accelerate may have made); gloo on CPU, nccl on GPU.
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")

    # Every node's own command, compared before anything is locked or loaded (a node with other steps hangs the run).
    check_same_flags_on_every_rank(model_args, data_args, lora_args, args)
    # One run per output folder (a lock file naming the run): a second run would delete the first's checkpoints.
    with hold(args.output_dir, args.process_index == 0, args.world_size, every_rank_writes=True):
        return _train(model_args, data_args, lora_args, args, overwritten, stop_signals)


def _train(model_args, data_args, lora_args, args, overwritten: list[str], stop_signals) -> SCTuneTrainer:
    # Load in half precision only where fp32 master weights live elsewhere: DeepSpeed keeps them in its
    # optimizer, and LoRA trains fp32 adapters on a frozen base. A plain run keeps fp32 weights and lets
    # --bf16 autocast the compute; Adam steps of 5e-7 would vanish in bf16 weights.
    half = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else None
    dtype = half if half is not None and (args.deepspeed or lora_args.use_lora) else torch.float32
    quantization = qlora_quantization_config(dtype) if lora_args.q_lora else None
    # The records before the model: too few for one step fails here, not after the weights have loaded.
    records = ReferringDataset.read_records(data_args.data_path, data_args.image_folder, data_args.skip_bad_records,
                                            data_args.check_images)
    skipping = data_args.skip_bad_records
    fills_a_step = functools.partial(check_fills_a_step, source=data_args.data_path,
                                     per_device_batch=args.per_device_train_batch_size,
                                     grad_accum=args.gradient_accumulation_steps, world_size=args.world_size)
    fills_a_step(len(records), skipped="bad records" if skipping else None)
    set_seed(args.seed)  # before any random initialisation (LoRA's A matrices): a seed gives one run
    model, adapter = load_model_and_adapter(
        model_args.model_name_or_path, dtype=dtype, quantization_config=quantization, box_format=model_args.box_format,
        image_min_pixels=model_args.image_min_pixels, image_max_pixels=model_args.image_max_pixels,
    )
    if model_args.fix_vit:
        freeze_vision_tower(model, adapter)
    if lora_args.use_lora:
        model = apply_lora(model, adapter, lora_args, args.gradient_checkpointing)
    logger.info(trainable_summary(model, adapter))

    dataset = ReferringDataset.from_records(
        records,
        data_args.image_folder,
        data_args.data_path,
        data_args.skip_bad_records,
        check=data_args.check_images,
        size_problem=adapter.image_size_problem,
    )
    del records  # the dataset holds its own (checked) copies: one list for the whole run, not two
    fills_a_step(len(dataset), skipped="bad records and unusable images" if skipping else None)
    unseen = boxes_mostly_unseen(dataset.records, data_args.image_folder, adapter.visible_region)
    if unseen:  # LLaVA-1.5's center crop: the describer is asked about, and the locator rewarded for, unseen objects
        logger.warning("%d of %d training boxes lie mostly outside the part of their image the model sees (its image "
                       "processor crops the long side: %s); boxes stay normalised to the whole image",
                       unseen, len(dataset), type(adapter.image_processor).__name__)
    check_same_records_on_every_rank(dataset)
    logger.info("%d referring samples from %s", len(dataset), data_args.data_path)
    trainer = SCTuneTrainer(
        model=model, args=args, adapter=adapter, train_dataset=dataset, source_dir=model_args.model_name_or_path
    )
    # The old run's checkpoints (--overwrite_output_dir) go at the end of the first step: after the preflight and
    # the first rollout have worked, before the first save (which must not sit beside the old run's).
    trainer.add_callback(ReplaceOverwrittenRun(overwritten, args.process_index == 0))
    # A scheduler's stop signal (--save_on_signal) saves a checkpoint at the end of the step in progress.
    stop = SaveAndStopOnSignal(stop_signals, trainer.accelerator.gather, trainer.accelerator.device)
    trainer.add_callback(stop)
    with stop.listening():
        trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    trainer.save_state()
    if stop.stopped_by is not None:
        # One line per node, from its local rank 0: each node's script reads its own launch's log for it (exit status
        # 128 + n, scripts/env.sh); from global rank 0 alone, every other node's script exited 1, as if it failed.
        raise StoppedBySignal(stop, args.output_dir, reports=args.local_process_index == 0)
    with save_failures_named(args.output_dir, "the trained model"):
        export_trained(trainer, args.output_dir, model_args.model_name_or_path, lora_args.use_lora)
    return trainer


# Bad input, not a bug: each of these names the file, record or flag; a traceback would bury it.
INPUT_ERRORS = (ArgumentError, AnnotationError, CheckpointError, JSONFileError, OutputDirError, PreflightError,
                RunLockError, ThinkingCheckpointError, FileNotFoundError)


def cli(argv: list[str] | None = None) -> None:
    """The command: input errors in one line; a run stopped on a signal (after its checkpoint) exits with that
    signal's status."""
    try:
        main(argv)
    except INPUT_ERRORS as e:
        raise SystemExit(f"finetune.py: error: {e}") from None
    except StoppedBySignal as e:
        if e.reports:
            print(f"finetune.py: {e}", file=sys.stderr)
        close_process_group()
        raise SystemExit(e.exit_code) from None
    close_process_group()


if __name__ == "__main__":
    run_command(cli)  # in a launch, an exit that no gloo thread can abort (sc_tune.process_exit)
