"""The roles' token paths, per family: the model writes the ids of its family's own answer, and ``locate`` (as the
trainer calls it; and ``locate_from_prefix``, where the family shares the describer's image prefix) decodes them,
stops at the complete box and parses the box back; ``describe`` decodes a caption to its text.

A tiny random model never writes a box that parses, so without forcing, every defect between "the model wrote the
answer" and "the trainer got a box" (special tokens dropped in decoding, a codec's axes swapped, the stop one token
early or late) passes every test. ``tests.helpers.ScriptedLogits`` makes the model write given ids through either
decoding loop the trainer uses: transformers' ``generate`` and SC-Tune's static loop (``sc_tune.decoding``), where the
family has it. The same checks run on the released tokenizers in tests/test_real_checkpoints.py.
"""

from __future__ import annotations

import pytest

from sc_tune.adapters import supported_model_types
from sc_tune.modeling import load_model_and_adapter
from tests.helpers import (FORCED_CAPTIONS, assert_forced_captions_are_described_back,
                           assert_forced_locator_answers_are_located_back)

# Families without SC-Tune's static loop: their locator decodes with transformers' generate only.
NO_STATIC_LOOP = {"qwen4_exp"}
# Families whose trainer locates from the image prefix the describer pass cached (``locate_from_prefix``).
# (The Qwen families by their own positions; the 1-D rotary families with full attention only, through
# sc_tune.adapters.unpadded_positions.)
SHARES_PREFIX = {"qwen", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "llava", "llava_next", "llava_onevision",
                 "internvl", "mistral3", "smolvlm", "idefics3", "ovis2"}


def tiny_model(tiny_checkpoint, model_type):
    model, adapter = load_model_and_adapter(tiny_checkpoint(model_type))
    text = model.config.get_text_config(decoder=True)
    if getattr(text, "sliding_window", None):
        # The tiny Gemmas' 64-token windows are shorter than their prompts (such a call decodes with a dynamic cache);
        # real windows cover a locator call. Widen them so the static cache runs (as tests/test_decoding.py does).
        text.sliding_window = 4096
    return model.eval(), adapter


@pytest.mark.parametrize("model_type", supported_model_types())
def test_the_familys_own_answers_written_by_the_model_are_read_back(model_type, tiny_checkpoint):
    model, adapter = tiny_model(tiny_checkpoint, model_type)
    ran = assert_forced_locator_answers_are_located_back(model, adapter)
    loops = ["generate"] if model_type in NO_STATIC_LOOP else ["generate", "static"]
    ways = ["locate", "prefix"] if model_type in SHARES_PREFIX else ["locate"]
    assert ran == [f"{way}/{loop}" for loop in loops for way in ways]
    assert_forced_captions_are_described_back(model, adapter, FORCED_CAPTIONS)
