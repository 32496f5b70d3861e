"""SC-Tune entry point: parse arguments, build model, data and trainer, train, export.

    torchrun --nproc_per_node 8 finetune.py --model_name_or_path Qwen-VL-Chat \
        --data_path data/object365.json --image_folder /data/objects365 --output_dir output_qwen \
        --bf16 True --deepspeed scripts/ds_config_zero2.json

`python finetune.py --help` lists every knob; scripts/finetune_ds.sh sets the reference's values.
"""

from __future__ import annotations

import logging

import torch
from transformers import set_seed

from sc_tune.checkpoints import check_output_dir, resume_requested
from sc_tune.data import ReferringDataset
from sc_tune.export import export_trained
from sc_tune.help_layout import build_parser
from sc_tune.modeling import (
    apply_lora,
    freeze_vision_tower,
    load_model_and_adapter,
    qlora_quantization_config,
    trainable_summary,
)
from sc_tune.trainer import SCTuneTrainer

logger = logging.getLogger("sc_tune")


def main(argv: list[str] | None = None) -> SCTuneTrainer:
    model_args, data_args, lora_args, args = build_parser().parse_args_into_dataclasses(args=argv)
    logging.basicConfig(
        level=logging.INFO if args.process_index == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )

    check_output_dir(
        args.output_dir,
        model_args.model_name_or_path,
        resume_requested(args.resume_from_checkpoint),
        args.overwrite_output_dir,
        delete=args.process_index == 0,
    )

    if args.deepspeed:
        # ZeRO-3 partitions weights while from_pretrained runs, so DeepSpeed's communication layer must be
        # up first (it reuses the process group accelerate may have made); gloo on CPU, nccl on GPU.
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")

    # Load in half precision only where fp32 master weights live elsewhere: DeepSpeed keeps them in its
    # optimizer, and LoRA trains fp32 adapters on a frozen base. A plain run keeps fp32 weights and lets
    # --bf16 autocast the compute; Adam steps of 5e-7 would vanish in bf16 weights.
    half = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else None
    dtype = half if half is not None and (args.deepspeed or lora_args.use_lora) else torch.float32
    quantization = qlora_quantization_config(dtype) if lora_args.q_lora else None
    if lora_args.q_lora and not lora_args.use_lora:
        raise ValueError("--q_lora needs --use_lora")
    set_seed(args.seed)  # before any random initialisation (LoRA's A matrices): a seed gives one run
    model, adapter = load_model_and_adapter(
        model_args.model_name_or_path, dtype=dtype, quantization_config=quantization, box_format=model_args.box_format
    )
    if model_args.fix_vit:
        freeze_vision_tower(model, adapter)
    if lora_args.use_lora:
        model = apply_lora(model, adapter, lora_args, args.gradient_checkpointing)
    logger.info(trainable_summary(model, adapter))

    dataset = ReferringDataset.from_file(
        data_args.data_path,
        data_args.image_folder,
        data_args.skip_bad_records,
        check=data_args.check_images,
        size_problem=adapter.image_size_problem,
    )
    logger.info("%d referring samples from %s", len(dataset), data_args.data_path)
    trainer = SCTuneTrainer(
        model=model, args=args, adapter=adapter, train_dataset=dataset, source_dir=model_args.model_name_or_path
    )
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    trainer.save_state()
    export_trained(trainer, args.output_dir, model_args.model_name_or_path, lora_args.use_lora)
    return trainer


if __name__ == "__main__":
    from sc_tune.arguments import ArgumentError
    from sc_tune.checkpoints import CheckpointError, OutputDirError
    from sc_tune.data import AnnotationError
    from sc_tune.jsonio import JSONFileError
    from sc_tune.preflight import PreflightError

    try:
        main()
    except (ArgumentError, AnnotationError, CheckpointError, JSONFileError, OutputDirError, PreflightError) as e:
        # Bad input, not a bug: the message names the file, record or flag; a traceback would bury it.
        raise SystemExit(f"finetune.py: error: {e}") from None
