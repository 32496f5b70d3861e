"""Loading a checkpoint folder into (model, adapter), freezing the vision tower, and LoRA/QLoRA."""

from __future__ import annotations

import logging
import os

import torch

from sc_tune.adapters import Family, ModelAdapter, family_for, supported_model_types
from sc_tune.adapters.base import ModelFolderError
from sc_tune.arguments import ArgumentError
from sc_tune.checkpoints import CheckpointError
from sc_tune.jsonio import read_json
from sc_tune.moe import as_configured, expert_parameters

logger = logging.getLogger(__name__)


# The files ``from_pretrained`` reads the weights from, as transformers names them (one file, or an index of shards).
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def read_model_type(path: str) -> str:
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(
            f"{config_path} not found: download the checkpoint into {path} first (see Qwen-VL-Chat/README.md); "
            "SC-Tune never loads weights from a hub at run time"
        )
    config = read_json(config_path)
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if not isinstance(config, dict) or "model_type" not in config:
        raise CheckpointError(f"{config_path}: field 'model_type' is missing: SC-Tune picks the checkpoint's family "
                              f"by it (one of {', '.join(supported_model_types())})")
    if not isinstance(model_type, str):
        raise CheckpointError(f"{config_path}: field 'model_type' must be a string, got {model_type!r}")
    return model_type


def model_class(model_type: str):
    """The class ``from_pretrained`` loads for ``model_type`` (the registry's lazy import)."""
    return family_for(model_type).model_class()


def folder_family(path: str) -> Family:
    """The family serving the ``model_type`` of ``path``'s config.json; an unknown one is a CheckpointError naming
    it."""
    return served_family(read_model_type(path), path)


def served_family(model_type: str, path: str) -> Family:
    """The family serving ``model_type`` (the one ``path``'s config.json names); one no family serves is a
    CheckpointError naming that file, the model type and, where the survey of unserved families says, why."""
    try:
        return family_for(model_type)
    except ValueError as error:
        raise CheckpointError(f"{os.path.join(path, 'config.json')}: field 'model_type': {error}") from None


def missing_model_files(path: str, family: Family) -> list[str]:
    """What ``path`` lacks that loading ``family``'s checkpoint needs, besides its tokenizer (the adapter checks that):
    the weights, and for families that read it from the folder the image processor's settings
    (``preprocessor_config.json``, or ``processor_config.json`` with an ``image_processor`` block). Without these
    checks transformers ends in an error about a hub, though nothing is ever downloaded."""
    missing = []
    if not any(os.path.isfile(os.path.join(path, name)) for name in WEIGHT_FILES):
        missing.append(f"the weights (none of {', '.join(WEIGHT_FILES)})")
    if family.adapter.reads_image_processor_files:
        processor = os.path.join(path, "processor_config.json")
        nested = os.path.isfile(processor) and "image_processor" in (read_json(processor) or {})
        if not nested and not os.path.isfile(os.path.join(path, "preprocessor_config.json")):
            missing.append("the image processor's settings (no preprocessor_config.json, nor a processor_config.json "
                           "with an image_processor block)")
    return missing


def load_model_and_adapter(
    path: str, dtype: torch.dtype = torch.float32, quantization_config=None, box_format: str = "native",
    image_min_pixels: int | None = None, image_max_pixels: int | None = None, **kwargs
) -> tuple[torch.nn.Module, ModelAdapter]:
    """Load a checkpoint folder from disk (never from a hub) and the adapter of its family.

    ``box_format``: ``native`` (the family's own box convention) or ``generic`` (see ``sc_tune.box_codecs``).
    ``image_min_pixels`` / ``image_max_pixels``: the pixel budget of every resized image
    (``ModelAdapter.limit_image_pixels``; refused, before the weights load, by a family without one).

    A folder that cannot load (an unknown or missing ``model_type``, no weights, no image-processor settings, no
    usable tokenizer) is a :class:`CheckpointError` naming the folder and the file, before any weight loads."""
    family = folder_family(path)
    missing = missing_model_files(path, family)
    if missing:
        raise CheckpointError(f"{path} is not a complete {family.name} checkpoint folder: it lacks "
                              f"{'; and '.join(missing)}")
    try:
        adapter = family.adapter.from_pretrained(path, box_format=box_format)
    except ModelFolderError as error:
        raise CheckpointError(str(error)) from error
    if image_min_pixels is not None or image_max_pixels is not None:
        adapter.limit_image_pixels(image_min_pixels, image_max_pixels)
    model = family.model_class().from_pretrained(
        path, dtype=dtype, quantization_config=quantization_config, local_files_only=True, **kwargs
    )
    return model, adapter


def num_elements(param: torch.Tensor) -> int:
    """Element count, also for a ZeRO-3 partitioned parameter (whose local ``numel()`` is 0)."""
    return getattr(param, "ds_numel", param.numel())


def freeze_vision_tower(model: torch.nn.Module, adapter: ModelAdapter) -> int:
    """``fix_vit``: freeze the vision tower except its resampler/merger. Returns the number frozen."""
    if not adapter.vision_prefix:
        raise ValueError(f"{type(adapter).__name__} does not name its vision tower")
    frozen = 0
    for name, param in model.named_parameters():
        in_tower = name.startswith(adapter.vision_prefix + ".")
        if in_tower and not any(name.startswith(p + ".") for p in adapter.vision_trainable_prefixes):
            param.requires_grad_(False)
            frozen += num_elements(param)
    if frozen == 0:
        raise ValueError(f"fix_vit froze nothing: no parameter starts with {adapter.vision_prefix!r}")
    return frozen


def trainable_summary(model: torch.nn.Module, adapter: ModelAdapter) -> str:
    """What will train, by part: LoRA adapters, the vision resampler/merger, the rest of the vision tower and
    the language model (everything else), with the parts that stay frozen named too.

    Why by part: under LoRA, PEFT freezes every base weight, the resampler/merger included, so "fix_vit keeps
    the merger trainable" holds for full fine-tuning only; the log must say which case a run is in."""
    parts = {"LoRA adapters": 0, "vision resampler/merger": 0, "vision tower": 0, "language model": 0}
    present = dict.fromkeys(parts, 0)
    for name, param in model.named_parameters():
        name = name.removeprefix("base_model.model.")  # PEFT's wrapper
        if "lora_" in name:
            part = "LoRA adapters"
        elif any(name.startswith(p + ".") for p in adapter.vision_trainable_prefixes):
            part = "vision resampler/merger"
        elif adapter.vision_prefix and name.startswith(adapter.vision_prefix + "."):
            part = "vision tower"
        else:
            part = "language model"
        present[part] += num_elements(param)
        if param.requires_grad:
            parts[part] += num_elements(param)
    trainable = sum(parts.values())
    total = sum(present.values())
    trained = ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in parts.items() if v)
    frozen = ", ".join(k for k in parts if present[k] and not parts[k])
    return (
        f"trainable parameters: {trainable / 1e6:.2f}M of {total / 1e6:.2f}M ({trained or 'none'}); "
        f"frozen: {frozen or 'nothing'}"
    )


def apply_lora(model: torch.nn.Module, adapter: ModelAdapter, lora_args, gradient_checkpointing: bool):
    """Wrap ``model`` in PEFT LoRA on the family's LM projections, and with ``--lora_target_experts`` on its routed
    experts (QLoRA: model loaded in 4 bit)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if lora_args.q_lora:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    experts = None
    if lora_args.lora_target_experts:
        experts = expert_parameters(model, adapter.lora_expert_parameters)
        if not experts:
            raise ArgumentError(  # a flag that cannot apply: finetune.py prints it, without a traceback
                f"--lora_target_experts: {type(model).__name__} has no routed-expert parameters "
                f"{list(adapter.lora_expert_parameters) or '(this family names none)'}: it is not a MoE model"
            )
        if lora_args.lora_dropout:  # PEFT's parameter wrapper cannot drop out x inside the fused expert matmul
            raise ArgumentError(f"--lora_target_experts needs --lora_dropout 0 (got {lora_args.lora_dropout:g})")
    config = LoraConfig(
        r=lora_args.lora_r,
        lora_alpha=lora_args.lora_alpha,
        lora_dropout=lora_args.lora_dropout,
        target_modules=lora_args.lora_target_modules or adapter.lora_target_modules,
        target_parameters=experts,  # the fused 3-D routed experts (sc_tune.moe)
        bias="none",
        task_type="CAUSAL_LM",
    )
    with as_configured():  # LoRA exactly on the modules and parameters named above (sc_tune.moe)
        model = get_peft_model(model, config)
    if gradient_checkpointing:
        model.enable_input_require_grads()  # checkpointed blocks need an input that requires grad
    return model


def qlora_quantization_config(dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_use_double_quant=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=dtype,
    )
