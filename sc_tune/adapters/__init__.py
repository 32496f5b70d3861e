"""Model adapters, looked up by the checkpoint's ``config.model_type``."""

from __future__ import annotations

from sc_tune.adapters.base import ImageInputs, ModelAdapter, PromptBatch
from sc_tune.adapters.qwen2_vl import Qwen2VLAdapter, Qwen3VLAdapter, Qwen25VLAdapter
from sc_tune.adapters.qwen_vl import QwenVLAdapter

ADAPTERS: dict[str, type[ModelAdapter]] = {
    "qwen": QwenVLAdapter,
    "qwen2_vl": Qwen2VLAdapter,
    "qwen2_5_vl": Qwen25VLAdapter,
    "qwen3_vl": Qwen3VLAdapter,
}


def adapter_class(model_type: str) -> type[ModelAdapter]:
    try:
        return ADAPTERS[model_type]
    except KeyError:
        raise ValueError(
            f"no SC-Tune adapter for model_type {model_type!r}; supported: {', '.join(sorted(ADAPTERS))}"
        ) from None


__all__ = ["ADAPTERS", "ImageInputs", "ModelAdapter", "PromptBatch", "adapter_class"]
