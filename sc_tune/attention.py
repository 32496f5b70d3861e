"""Routing a model's attention through one of SC-Tune's implementations for a block of code.

transformers picks a layer's attention function by name from its config (``config._attn_implementation``) on every
forward. SC-Tune registers its own under a name of its own and sets that name on one config only while the block
runs: the vision tower's packed windows while its trunk encodes (``sc_tune.vision_cache``), the decode step's
grouped-query attention while a static decode step runs (``sc_tune.decoding``). Everything else runs as configured.

Also here: which attention, and so which cache, each text layer has (``text_layer_caches``), for the static decoding
loop and the prompt-cache checks alike.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

from transformers import AttentionInterface
from transformers.cache_utils import get_layer_types_and_kwargs
from transformers.masking_utils import AttentionMaskInterface


@contextmanager
def attention_routed(config, name: str, function: Callable, applies: Callable[[str], bool], mask_function=None):
    """``config``'s attention set to ``function`` (registered as ``name``; its masks made by ``mask_function`` where
    given) for the block, where ``applies`` to the configured implementation; nothing where it does not, or where
    ``config`` is None or names none."""
    current = getattr(config, "_attn_implementation", None) if config is not None else None
    if current is None or not applies(current):
        yield
        return
    AttentionInterface.register(name, function)
    if mask_function is not None:
        AttentionMaskInterface.register(name, mask_function)
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = current


# The cache kinds of layers that attend to a window of the last columns only (Gemma's, Mistral's, Qwen2's sliding
# attention; Llama 4's chunked attention): their cache keeps the window, not the whole prompt.
WINDOW_LAYER_KINDS = ("sliding_attention", "chunked_attention")


def text_layer_caches(config) -> list[tuple[str, int | None]]:
    """``(kind, window)`` of each text layer's cache, read as transformers' caches read them
    (``get_layer_types_and_kwargs``): a config with a ``sliding_window`` and no ``layer_types`` (Mistral's text models:
    Idefics2, LLaVA-NeXT-Mistral) makes every layer a window layer."""
    kinds, layer_kwargs = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
    return [(kind, kwargs.get("sliding_window")) for kind, kwargs in zip(kinds, layer_kwargs)]
