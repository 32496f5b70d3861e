"""Model adapters and the family registry, looked up by the checkpoint's ``config.model_type``.

Importing this package registers every family: each family module below calls ``registry.register``.
"""

from __future__ import annotations

from sc_tune.adapters import (  # noqa: F401  (imported to register their families)
    aya_vision,
    cohere_compass,
    exaone4_5,
    gemma,
    glm4v,
    granite4_vision,
    idefics2,
    internvl,
    llava,
    llava_onevision,
    minicpmv,
    mistral3,
    mllama,
    ovis2,
    qwen2_vl,
    qwen_vl,
    smolvlm,
    video_llama_3,
)
from sc_tune.adapters.base import ImageInputs, ModelAdapter, PromptBatch
from sc_tune.adapters.registry import Family, adapter_class, families, family_for, register, supported_model_types

__all__ = [
    "Family",
    "ImageInputs",
    "ModelAdapter",
    "PromptBatch",
    "adapter_class",
    "families",
    "family_for",
    "register",
    "supported_model_types",
]
