"""The locator's token path, per family: the model writes the ids of its family's own answer, and ``locate`` (as the
trainer calls it) decodes them, stops at the complete box and parses the box back.

A tiny random model never writes a box that parses, so without forcing, every defect between "the model wrote the
answer" and "the trainer got a box" (special tokens dropped in decoding, a codec's axes swapped, the stop one token
early or late) passes every test. ``tests.helpers.ScriptedLogits`` makes the model write given ids through either
decoding loop the trainer uses: transformers' ``generate`` and SC-Tune's static loop (``sc_tune.decoding``).
"""

from __future__ import annotations

import pytest
import torch

from sc_tune.adapters import supported_model_types
from sc_tune.arguments import SCTuneConfig
from sc_tune.decoding import Decoding
from sc_tune.modeling import load_model_and_adapter
from sc_tune.rollout import GenerationSettings, fit_locator_budget, locate
from tests.helpers import ScriptedLogits, two_colour_photo

# Two rows: captions of different lengths (left padding, and a label after the box that is long in one row), photos
# of odd sizes (pixel codecs round on the frames they are resized to), boxes whose x and y differ (a swapped axis
# shows) and whose written numbers differ in length (the rows complete their boxes at different steps, so a row
# that stopped must stay stopped while the other decodes).
CAPTIONS = ["the man in the white shirt on the left next to the small dog", "a cat"]
BOXES = [[0.2, 0.4, 0.5, 0.6], [0.03, 0.055, 0.85, 0.95]]
PHOTO_SIZES = [(97, 61), (45, 130)]


def trainer_locate_settings() -> GenerationSettings:
    """The locator's settings as the trainer's cycle makes them (``RolloutCycle.greedy_boxes``), at the defaults."""
    defaults = {name: SCTuneConfig.__dataclass_fields__[name].default
                for name in ("locator_max_new_tokens", "locator_min_new_tokens")}
    return GenerationSettings(defaults["locator_max_new_tokens"], defaults["locator_min_new_tokens"])


def tokens_to_box(adapter, script) -> int:
    """How many tokens of ``script`` the answer needs: up to the one that completes its box."""
    return next(k for k in range(1, len(script) + 1) if adapter.locator_answer_end(adapter.decode(script[:k])) is not None)


def decodings(model, adapter) -> dict[str, Decoding | None]:
    """The loops the trainer may decode with: transformers' generate, and SC-Tune's static one where the family has
    it (``--static_decoding``)."""
    loops = {"generate": None}
    if adapter.static_decoding_problem(model) is None:
        loops["static"] = Decoding()
    return loops


def tiny_model(tiny_checkpoint, model_type):
    model, adapter = load_model_and_adapter(tiny_checkpoint(model_type))
    text = model.config.get_text_config(decoder=True)
    if getattr(text, "sliding_window", None):
        # The tiny Gemmas' 64-token windows are shorter than their prompts (such a call decodes with a dynamic cache);
        # real windows cover a locator call. Widen them so the static cache runs (as tests/test_decoding.py does).
        text.sliding_window = 4096
    return model.eval(), adapter


@pytest.mark.parametrize("model_type", supported_model_types())
def test_the_familys_own_answer_written_by_the_model_is_located_back(model_type, tiny_checkpoint):
    model, adapter = tiny_model(tiny_checkpoint, model_type)
    images = [adapter.prepare_image(two_colour_photo(size)) for size in PHOTO_SIZES]
    targets = [adapter.locator_target(b, im, c) for b, im, c in zip(BOXES, images, CAPTIONS)]
    scripts = [adapter.encode_target(t) for t in targets]
    assert all(adapter.decode(s) == t for s, t in zip(scripts, targets)), "the answer's ids decode to the answer"
    up_to_box = [tokens_to_box(adapter, s) for s in scripts]
    assert up_to_box[0] != up_to_box[1], "the rows complete their boxes at different steps"
    # The box the text round trip reads (tests/test_families.py pins it to the box within the codec's rounding).
    expected = [adapter.parse_locator_output(t, im) for t, im in zip(targets, images)]
    for box, image, got in zip(BOXES, images, expected):
        step = 1.0 / min(adapter.codec.axis_scales(image.frame))
        assert got == pytest.approx(box, abs=step / 2 + 1e-9)
    settings = trainer_locate_settings()
    budget = fit_locator_budget(adapter, images, settings, CAPTIONS).max_new_tokens
    assert max(up_to_box) <= budget
    for name, decoding in decodings(model, adapter).items():
        with ScriptedLogits(model) as forcing:
            forcing.write(scripts)
            found, texts = locate(model, adapter, images, CAPTIONS, settings, decoding=decoding)  # as RolloutCycle
        assert found == expected, name
        # each row's text ends with the token that completes its box, nothing after it
        assert texts == [adapter.decode(s[:k]) for s, k in zip(scripts, up_to_box)], name
        for text in texts:  # where the answer says its box ends: within the text, and the box is whole there
            end = adapter.locator_answer_end(text)
            assert end <= len(text) and adapter.locator_answer_end(text[:end]) == end, (name, text, end)
        if decoding is None:
            assert forcing.forwards == max(up_to_box), name  # transformers' loop stopped at the last row's box
        else:
            # SC-Tune's loop checks no text per step: it runs to the end token (or the budget), then cuts each row
            assert forcing.forwards == min(max(map(len, scripts)), budget), name
