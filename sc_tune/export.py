"""Writing the trained model as a plain checkpoint folder the family's own demos load.

Full fine-tuning: the Trainer's ``save_model`` (which gathers ZeRO-3 shards into 16-bit weights when
``stage3_gather_16bit_weights_on_model_save`` is on) plus the tokenizer/processor. LoRA: the adapter is
saved, then merged into a fresh copy of the base model on CPU (``merge_lora``, also a command). Then the input
folder's other files are carried over, verbatim (``carry_source_files``, also into every checkpoint-N): released
processor settings often live only in ``processor_config.json`` (SmolVLM's ``image_seq_len``, LLaVA-OneVision's
``num_image_tokens``, Gemma 4's), ``video_preprocessor_config.json`` or ``chat_template.json``, and a folder
without them loads in the family's processor with other settings. The input's ``config.json`` replaces the one
transformers 5 re-serialised (``carry_source_config``: the released layout, only its dtype set to the weights').
Families that need more (Qwen-VL: its generation config and remote-code files) hook in through
``finalize_export``.

Staged: every export is written whole into ``.sc_tune_export.partial`` inside its folder and only then swapped in
(``commit_export``), with a record of its files (``sc_tune_export.json``). Written in place, a kill during the
minutes a 7B export takes would leave half a model, or, over an earlier export of the same size, new shards beside
old ones under one index: a folder that loads without an error. Now a kill while writing leaves the earlier export
whole, and the model-folder check (``checkpoints.export_problems``) names what happened in either case.
"""

from __future__ import annotations

import argparse
import fnmatch
import logging
import os
import shutil
from contextlib import contextmanager

import torch

from sc_tune.adapters import family_for
from sc_tune.checkpoints import EXPORT_RECORD, EXPORT_STAGING, is_or_inside
from sc_tune.jsonio import read_json, write_json
from sc_tune.modeling import load_model_and_adapter, read_model_type
from sc_tune.moe import as_configured
from sc_tune.snapshot import SNAPSHOT_ADAPTER

logger = logging.getLogger(__name__)


# Never carried: weights (the export writes the trained ones); the model's own files, written from the trained
# model (an adapter folder has none on purpose: the base's config.json would make it look like a full model; a full
# export's config.json is the input's again, by carry_source_config, with the weights' dtype); and
# the records of a run (an input folder may be an SC-Tune output or checkpoint-N). Everything else at the input
# folder's top level is carried.
NOT_CARRIED = (
    "*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.gguf", "*.h5", "*.msgpack", "*.onnx", "*.npz",
    "*.index.json", "config.json", "generation_config.json", "adapter_config.json",
    "trainer_state.json", "*_results.json", "sc_tune_*.json", "sc_tune_run.lock*", "rng_state*", "latest", "zero_to_fp32.py",
    ".*",
)  # fmt: skip


def carry_source_files(output_dir: str, source_dir: str | None) -> list[str]:
    """Copy every top-level file of ``source_dir`` but those ``NOT_CARRIED`` into ``output_dir``; returns the names.

    A carried file replaces the tokenizer or processor file the export re-serialised under the same name. SC-Tune
    never changes the tokenizer or the processor, and transformers' re-serialisation is not the release's file:
    it drops ``processor_class`` and Qwen2.5-VL's ``min_pixels``/``max_pixels`` from ``preprocessor_config.json``
    (transformers 4.57 then reads max_pixels 1,003,520 instead of the released 12,845,056), and writes
    ``tokenizer_config.json`` in a 5.x layout that transformers 4.57 cannot load (Qwen3-VL's: "'list' object has
    no attribute 'keys'"). Contents only (not the source's read-only permission bits): a later save must be able
    to overwrite them."""
    if not source_dir or not os.path.isdir(source_dir):
        return []
    if os.path.isdir(output_dir) and os.path.samefile(source_dir, output_dir):
        return []
    copied = []
    for name in sorted(os.listdir(source_dir)):
        source = os.path.join(source_dir, name)
        if not os.path.isfile(source) or any(fnmatch.fnmatch(name, p) for p in NOT_CARRIED):
            continue
        shutil.copyfile(source, os.path.join(output_dir, name))
        copied.append(name)
    if copied:
        logger.info("carried %s from %s into %s", ", ".join(copied), source_dir, output_dir)
    return copied


def carry_source_config(output_dir: str, source_dir: str) -> None:
    """The input's ``config.json`` in place of the one ``save_pretrained`` wrote, with the written weights' dtype.

    Why: SC-Tune never changes the architecture, and transformers 5 writes the config in its own layout, which
    transformers 4.57 (what Qwen3-VL's model card asks for, and what many serving stacks still run) misreads: a
    Qwen2.5-VL export then loaded without ``tie_word_embeddings``' value (a random ``lm_head``), without
    ``mrope_section``, and failed in its first forward. The released layout loads in both. Only the dtype key(s) the
    input has are set to what was written (``torch_dtype``, transformers 4's name, or ``dtype``)."""
    source, saved = os.path.join(source_dir, "config.json"), os.path.join(output_dir, "config.json")
    if not (os.path.isfile(source) and os.path.isfile(saved)) or os.path.samefile(source, saved):
        return
    saved_config, config = read_json(saved), read_json(source)
    written = saved_config.get("dtype") or saved_config.get("torch_dtype")
    dtype_keys = [key for key in ("torch_dtype", "dtype") if key in config] or ["dtype"]
    changed = {key: written for key in dtype_keys if written is not None and config.get(key) != written}
    # A quantised input written back in full precision (the merge loads the base unquantised): not quantised now.
    dequantised = "quantization_config" in config and "quantization_config" not in saved_config
    if not changed and not dequantised:
        shutil.copyfile(source, saved)  # the released file, byte for byte
        return
    config.update(changed)
    if dequantised:
        del config["quantization_config"]
    write_json(saved, config)


def finalize_export(output_dir: str, source_dir: str, files_carried: bool = False) -> None:
    """The input's config (with the written dtype) and other non-weight files, then the family-specific files next
    to the weights (the registry's hook; Qwen-VL: generation config, remote code, tokenizer). ``files_carried``: the
    save that wrote the weights has carried the other files already (``SCTuneTrainer._save``), so they are neither
    copied nor logged a second time."""
    if not files_carried:
        carry_source_files(output_dir, source_dir)
    carry_source_config(output_dir, source_dir)
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


# What an earlier export without a record (SC-Tune before staged exports) left that the new export would not replace
# by name: its weights, found as transformers' own save finds stale shards.
UNRECORDED_EXPORT_WEIGHTS = ("model*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin",
                             "pytorch_model.bin.index.json", "adapter_model.*", "adapter_config.json", "lora_adapter")
_REPLACED = ".sc_tune_export.replaced"


def export_staging(output_dir: str) -> str:
    """The empty folder an export into ``output_dir`` is written in (call on the saving process only). A folder
    left there by an export that was cut short goes: it is incomplete, and this export writes it again."""
    staging = os.path.join(output_dir, EXPORT_STAGING)
    if os.path.isdir(staging):
        logger.warning("removing %s, left by an export that did not finish", staging)
        shutil.rmtree(staging)
    os.makedirs(staging)
    return staging


def _earlier_export(output_dir: str, new: list[str]) -> list[str]:
    """The top-level names of the export ``output_dir`` holds now, and of anything the new one would replace."""
    names = set(os.listdir(output_dir)) - {EXPORT_STAGING, EXPORT_RECORD, _REPLACED}
    try:
        recorded = set(read_json(os.path.join(output_dir, EXPORT_RECORD))["files"])
    except (OSError, ValueError, KeyError, TypeError):
        recorded = {n for n in names if any(fnmatch.fnmatch(n, p) for p in UNRECORDED_EXPORT_WEIGHTS)}
    return sorted(names & (recorded | set(new)))


def commit_export(output_dir: str, **origin) -> list[str]:
    """Swap the export written in ``output_dir``'s staging folder in for the one there; returns its file names.

    The record says "incomplete" from before the earlier export's files are moved aside until the last of the new
    ones is in, so a kill in between (renames: milliseconds, against the minutes of writing) leaves a folder the
    model-folder check refuses. ``origin`` (the step, or the merged adapter) goes into the record."""
    staging = os.path.join(output_dir, EXPORT_STAGING)
    new = sorted(os.listdir(staging))
    earlier = _earlier_export(output_dir, new)
    record = os.path.join(output_dir, EXPORT_RECORD)
    write_json(record, {"complete": False, "files": new, **origin})
    replaced = os.path.join(output_dir, _REPLACED)
    shutil.rmtree(replaced, ignore_errors=True)  # an earlier swap's, cut short: superseded by this export
    os.makedirs(replaced)
    for name in earlier:
        os.replace(os.path.join(output_dir, name), os.path.join(replaced, name))
    for name in new:
        os.replace(os.path.join(staging, name), os.path.join(output_dir, name))
    write_json(record, {"complete": True, "files": new, **origin})
    shutil.rmtree(replaced)
    os.rmdir(staging)
    logger.info("exported %d files into %s%s", len(new), output_dir,
                f" (replacing {len(earlier)} of the earlier export's)" if earlier else "")
    return new


def merge_lora(base_dir: str, adapter_dir: str, output_dir: str, dtype: torch.dtype | str = "auto") -> torch.dtype:
    """Merge a saved LoRA adapter into its base model and write a full checkpoint folder.

    ``dtype="auto"`` keeps the dtype the base checkpoint was saved in; returns the dtype written."""
    from peft import PeftModel

    with _without_zero3_init():
        base, adapter = load_model_and_adapter(base_dir, dtype=dtype)
        with as_configured():  # the adapter on the modules it was trained on (sc_tune.moe)
            merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    written = next(merged.parameters()).dtype
    logger.info("merged %s into %s -> %s (%s)", adapter_dir, base_dir, output_dir, written)
    merged.save_pretrained(output_dir)
    adapter.save_pretrained(output_dir)
    finalize_export(output_dir, base_dir)
    return written


def export_trained(trainer, output_dir: str, source_dir: str, use_lora: bool) -> str:
    """Save the trained policy (never the snapshot) to ``output_dir``, staged; returns the loadable folder."""
    model = trainer.accelerator.unwrap_model(trainer.model_wrapped)
    if use_lora and SNAPSHOT_ADAPTER in getattr(model, "peft_config", {}):
        model.delete_adapter(SNAPSHOT_ADAPTER)
    staging = os.path.join(output_dir, EXPORT_STAGING)
    if trainer.is_world_process_zero():
        export_staging(output_dir)
    trainer.accelerator.wait_for_everyone()  # every rank writes its part of a ZeRO-3 gather into the new folder
    adapter_dir = os.path.join(staging, "lora_adapter") if use_lora else staging
    trainer.save_model(adapter_dir)
    trainer.accelerator.wait_for_everyone()
    if trainer.is_world_process_zero():
        if use_lora:
            merge_lora(source_dir, adapter_dir, staging, dtype=next(model.parameters()).dtype)
        else:  # save_model's _save (SCTuneTrainer's) carried the input's files after the tokenizer, on this process
            finalize_export(staging, source_dir, files_carried=True)
        commit_export(output_dir, step=trainer.state.global_step)
    trainer.accelerator.wait_for_everyone()
    return output_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sc_tune.export",
                                     description="Merge a LoRA adapter saved by finetune.py into its base model.")
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
    for flag, folder in (("--base", args.base), ("--adapter", args.adapter)):
        # The merge writes weights, config and tokenizer files into --output: never over the user's inputs.
        if is_or_inside(args.output, folder):
            parser.error(f"--output {args.output} is (inside) the {flag} folder {folder}: the merge "
                         "would overwrite it; choose another folder")
    os.makedirs(args.output, exist_ok=True)
    written = merge_lora(args.base, args.adapter, export_staging(args.output),
                         getattr(torch, args.dtype) if args.dtype else "auto")
    commit_export(args.output, adapter=os.path.abspath(args.adapter))
    print(f"merged {args.adapter} into {args.base} -> {args.output} ({str(written).removeprefix('torch.')})")


if __name__ == "__main__":
    main()
