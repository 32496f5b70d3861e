"""Which files of the input checkpoint folder every saved folder carries: the one home of that rule.

A released checkpoint keeps settings that no loaded object writes back: ``processor_config.json`` (SmolVLM's
``image_seq_len``, LLaVA-OneVision's ``num_image_tokens``, Gemma's processor settings),
``video_preprocessor_config.json``, a legacy ``chat_template.json``, ``special_tokens_map.json``, a model card.
Re-saving the tokenizer and image processor is not enough either: transformers 5 drops ``processor_class``
from ``preprocessor_config.json``, turns Qwen2.5-VL's ``min_pixels``/``max_pixels`` into ``size`` and rewrites
``tokenizer_config.json`` in its own layout. So every checkpoint-N folder, the final output folder and a
merged LoRA folder get, after the export has written its own files, a verbatim copy of each input file that is
not one of these:

- weights: ``*.safetensors``, ``*.bin``, ``*.pt``, ``*.pth``, ``*.ckpt``, ``*.gguf``, ``*.h5``, ``*.msgpack``,
  ``*.onnx``, ``*.npz`` and weight indexes (``*.index.json``): the export writes the trained ones;
- the model's own files, written from the trained model: ``config.json`` (dtype, ids of what was trained) and
  ``generation_config.json``; a LoRA adapter folder has none on purpose (the base's would make it look like a
  full model) and keeps ``adapter_config.json``, which is never carried either;
- records of the run that wrote the input (the input may be an earlier SC-Tune output or checkpoint):
  ``trainer_state.json``, ``sc_tune_state.json``, ``sc_tune_complete.json``, ``*_results.json``, DeepSpeed's
  ``latest`` and ``zero_to_fp32.py``;
- hidden files (``.gitattributes``) and sub-folders (checkpoints, ``lora_adapter/``, caches).

A carried file replaces the export's own re-serialised tokenizer or processor file of the same name: SC-Tune
never changes the tokenizer or the processor, so the input's file is what the family's own processor reads, and
the user's folder loads as it did before training. It never replaces a weight or a model file (never carried).
"""

from __future__ import annotations

import logging
import os
import shutil

logger = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (
    ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx", ".npz", ".index.json",
)  # fmt: skip
MODEL_FILES = frozenset({"config.json", "generation_config.json", "adapter_config.json"})
RUN_FILES = frozenset({
    "trainer_state.json", "sc_tune_state.json", "sc_tune_complete.json", "latest", "zero_to_fp32.py",
})  # fmt: skip


def is_weight_file(name: str) -> bool:
    return name.endswith(WEIGHT_SUFFIXES)


def is_carried(name: str) -> bool:
    """Whether an input file of this name is copied into saved folders (the module docstring's rule)."""
    return not (
        name.startswith(".")
        or is_weight_file(name)
        or name in MODEL_FILES
        or name in RUN_FILES
        or name.endswith("_results.json")
    )


def carried_files(source_dir: str) -> list[str]:
    """Names of the files of ``source_dir`` that saved folders carry, sorted."""
    return sorted(
        name for name in os.listdir(source_dir) if os.path.isfile(os.path.join(source_dir, name)) and is_carried(name)
    )


def carry_input_files(source_dir: str | None, output_dir: str) -> list[str]:
    """Copy the carried files of ``source_dir`` into ``output_dir`` (after the export wrote its own); returns
    their names. Nothing happens without a source, or when the two folders are the same."""
    if source_dir is None or not os.path.isdir(source_dir):
        return []
    if os.path.isdir(output_dir) and os.path.samefile(source_dir, output_dir):
        return []
    names = carried_files(source_dir)
    for name in names:
        shutil.copyfile(os.path.join(source_dir, name), os.path.join(output_dir, name))
    if names:
        logger.info("carried %d files of %s into %s: %s", len(names), source_dir, output_dir, ", ".join(names))
    return names
