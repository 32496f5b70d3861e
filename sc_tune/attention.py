"""Routing a model's attention through one of SC-Tune's implementations for a block of code.

transformers picks a layer's attention function by name from its config (``config._attn_implementation``) on every
forward. SC-Tune registers its own under a name of its own and sets that name on one config only while the block
runs: the vision tower's packed windows while its trunk encodes (``sc_tune.vision_cache``), the decode step's
grouped-query attention while a static decode step runs (``sc_tune.decoding``). Everything else runs as configured.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

from transformers import AttentionInterface
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
