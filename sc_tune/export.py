"""Writing the trained model as a plain checkpoint folder the family's own demos load.

Full fine-tuning: the Trainer's ``save_model`` (which gathers ZeRO-3 shards into 16-bit weights when
``stage3_gather_16bit_weights_on_model_save`` is on) plus the tokenizer/processor. LoRA: the adapter is
saved, then merged into a fresh copy of the base model on CPU (``merge_lora``, also a command). Families
that need more (Qwen-VL: its generation config and remote-code files) hook in through
``finalize_export``.
"""

from __future__ import annotations

import argparse
import logging
import os
from contextlib import contextmanager

import torch

from sc_tune.adapters import family_for
from sc_tune.modeling import load_model_and_adapter, read_model_type
from sc_tune.snapshot import SNAPSHOT_ADAPTER

logger = logging.getLogger(__name__)


def finalize_export(output_dir: str, source_dir: str) -> None:
    """Family-specific files next to the weights (the registry's hook; Qwen-VL: generation config, remote
    code, tokenizer)."""
    hook = family_for(read_model_type(source_dir)).finalize_export
    if hook is not None:
        hook(output_dir, source_dir)


@contextmanager
def model_config_as_loaded(model):
    """Undo what ``transformers.Trainer.__init__`` writes into the model's config for training only.

    It sets ``config.use_cache = args.use_cache`` (False), which every saved ``config.json`` would then carry
    into the user's chat demo. SC-Tune passes ``use_cache`` to each forward itself, so the config keeps the
    input's value (or its absence)."""
    config = getattr(model, "config", None)
    had = config is not None and "use_cache" in vars(config)
    before = vars(config).get("use_cache") if config is not None else None
    try:
        yield
    finally:
        if config is not None and had:
            config.use_cache = before
        elif config is not None:
            vars(config).pop("use_cache", None)


@contextmanager
def _without_zero3_init():
    """Load a model the plain way in one process even though a ZeRO-3 run set transformers' global config.

    Under ZeRO-3 ``from_pretrained`` partitions weights as it loads, a collective every rank must join: rank 0
    loading the base model for the merge while the others wait at a barrier hangs both.
    """
    from transformers.integrations import deepspeed as hf_deepspeed

    ref = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = ref


def merge_lora(base_dir: str, adapter_dir: str, output_dir: str, dtype: torch.dtype | str = "auto") -> torch.dtype:
    """Merge a saved LoRA adapter into its base model and write a full checkpoint folder.

    ``dtype="auto"`` keeps the dtype the base checkpoint was saved in; returns the dtype written."""
    from peft import PeftModel

    with _without_zero3_init():
        base, adapter = load_model_and_adapter(base_dir, dtype=dtype)
        merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    written = next(merged.parameters()).dtype
    logger.info("merged %s into %s -> %s (%s)", adapter_dir, base_dir, output_dir, written)
    merged.save_pretrained(output_dir)
    adapter.save_pretrained(output_dir)
    finalize_export(output_dir, base_dir)
    return written


def export_trained(trainer, output_dir: str, source_dir: str, use_lora: bool) -> str:
    """Save the trained policy (never the snapshot) to ``output_dir``; returns the loadable folder."""
    model = trainer.accelerator.unwrap_model(trainer.model_wrapped)
    if use_lora and SNAPSHOT_ADAPTER in getattr(model, "peft_config", {}):
        model.delete_adapter(SNAPSHOT_ADAPTER)
    adapter_dir = os.path.join(output_dir, "lora_adapter") if use_lora else output_dir
    trainer.save_model(adapter_dir)
    trainer.accelerator.wait_for_everyone()
    if trainer.is_world_process_zero():
        if use_lora:
            merge_lora(source_dir, adapter_dir, output_dir, dtype=next(model.parameters()).dtype)
        else:
            finalize_export(output_dir, source_dir)
    trainer.accelerator.wait_for_everyone()
    return output_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Merge a LoRA adapter saved by finetune.py into its base model.")
    parser.add_argument("--base", required=True, help="the base checkpoint folder the adapter was trained on")
    parser.add_argument("--adapter", required=True, help="folder with adapter_config.json (output_dir/lora_adapter)")
    parser.add_argument("--output", required=True, help="where to write the merged checkpoint")
    parser.add_argument(
        "--dtype",
        default=None,
        choices=["bfloat16", "float16", "float32"],
        help="dtype of the merged weights (default: the dtype the base checkpoint was saved in)",
    )
    args = parser.parse_args(argv)
    written = merge_lora(args.base, args.adapter, args.output, getattr(torch, args.dtype) if args.dtype else "auto")
    print(f"merged {args.adapter} into {args.base} -> {args.output} ({str(written).removeprefix('torch.')})")


if __name__ == "__main__":
    main()
