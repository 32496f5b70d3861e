"""What is particular to North (``cohere_compass``, sc_tune.adapters.cohere_compass): Qwen3-VL's patch grid and M-RoPE
(mm_token_type_ids) before a Cohere2-style text model, prompts through the chat template on the generic codec, Cohere's
two-token answer end. Its codec round trips, SC-Tune runs, export and evaluation are in tests/test_families.py, static
decoding in tests/test_decoding.py."""

from __future__ import annotations

import pytest
import torch

from sc_tune.adapters import adapter_class
from tests.helpers import assert_patch_grid_processor_matches, processor_around_the_folders_parts, two_colour_photo

BOX = [0.1, 0.2, 0.5, 0.6]


def test_the_north_processor_builds_the_adapters_inputs_on_square_wide_and_tall_photos(tiny_checkpoint):
    """transformers' CohereCompassProcessor around the folder's tokenizer and image processor (its video processor
    needs torchvision and an image never reaches it: tests/helpers.py, processor_around_the_folders_parts) on the
    adapter's rendered prompts: the same input ids (<|IMAGE_PAD|> and its count), pixels, grid and mm_token_type_ids,
    no other key; with the pixel budget lowered too."""
    path = tiny_checkpoint("cohere_compass")
    adapter = adapter_class("cohere_compass").from_pretrained(path)
    processor = processor_around_the_folders_parts(path)
    assert type(processor).__name__ == "CohereCompassProcessor"
    assert processor.image_token == adapter.image_token
    keys = ["attention_mask", "input_ids", "mm_token_type_ids", *adapter.image_keys]
    grids = assert_patch_grid_processor_matches(adapter, processor, keys)
    assert grids[None, (60, 60)] == [1, 2, 2]  # 56 x 56 pixels in the tiny folder: 64 x 64 rounded down to 32


def test_north_left_padding_changes_no_rows_logits(tiny_checkpoint):
    """Two prompts of different lengths, left-padded in one batch with their mm_token_type_ids, give each row the
    logits it has alone: the model's rope index places each row's image where it is."""
    from sc_tune.modeling import load_model_and_adapter

    model, adapter = load_model_and_adapter(tiny_checkpoint("cohere_compass"))
    images = [adapter.prepare_image(two_colour_photo(size)) for size in ((60, 60), (300, 40))]
    prompts = [adapter.describer_prompt(BOX, images[0]), adapter.locator_prompt("the dog on the left", images[1])]
    batch = adapter.build_batch(prompts, images)
    assert batch.inputs["mm_token_type_ids"].sum() == sum(image.num_tokens for image in images)
    with torch.no_grad():
        together = model(**batch.inputs).logits[:, -1]
        for row in range(2):
            alone = model(**adapter.build_batch([prompts[row]], [images[row]]).inputs).logits[0, -1]
            torch.testing.assert_close(together[row], alone, atol=1e-4, rtol=1e-4)


def test_the_north_locator_target_ends_with_the_answer_end_the_template_writes(tiny_checkpoint):
    """The target after the locator prompt is the generic box closed by <|END_RESPONSE|>, the first token the template
    writes after an answer (read from it), where generation stops; <|END_OF_TURN_TOKEN|> (the EOS) also stops it and is
    never trained on. The prompt is the template's generation prompt, its BOS written by the template."""
    adapter = adapter_class("cohere_compass").from_pretrained(tiny_checkpoint("cohere_compass"))
    image = adapter.prepare_image(two_colour_photo((60, 60)))
    prompt, target = adapter.locator_prompt("the dog", image), adapter.locator_target(BOX, image, "the dog")
    assert target == "[100, 200, 500, 600]<|END_RESPONSE|>" and adapter.end_token == "<|END_RESPONSE|>"
    eos = adapter.tokenizer.eos_token
    assert eos == "<|END_OF_TURN_TOKEN|>"
    assert adapter.end_token_ids == adapter.tokenizer.convert_tokens_to_ids(["<|END_RESPONSE|>", eos])
    user_text = "Locate the dog. Answer with its box as [x1, y1, x2, y2], integers from 0 to 1000."
    turns = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": user_text}]},
             {"role": "assistant", "content": [{"type": "text", "text": "[100, 200, 500, 600]"}]}]
    assert adapter.tokenizer.apply_chat_template(turns, tokenize=False) == prompt + target + eos
    assert prompt.startswith("<BOS_TOKEN><|START_OF_TURN_TOKEN|><|USER_TOKEN|><|VISION_START|><|IMAGE_PAD|>")
    assert adapter.parse_locator_output(target, image) == pytest.approx(BOX)


def test_north_prompt_caches_are_refused_by_name_and_its_vision_cache_is_qwen3_vls(tiny_checkpoint):
    """No scoring-cache resume, no moved prompt columns (not verified for this family): those passes run in full.
    The vision cache replays Qwen3-VL's trunk (tests/test_vision_cache.py checks it exact on North's tower). Under
    fix_vit the patch merger and the DeepStack mergers stay trainable."""
    from sc_tune.modeling import freeze_vision_tower, load_model_and_adapter
    from sc_tune.vision_cache import VisionCache

    model, adapter = load_model_and_adapter(tiny_checkpoint("cohere_compass"))
    assert not adapter.resumes_from_scoring_cache(model, 40, 50)
    assert not adapter.moves_cached_prompt_columns(model, 50)
    assert VisionCache.for_model(adapter, [model]) is None  # the cache needs fix_vit, as for every family
    freeze_vision_tower(model, adapter)
    assert VisionCache.for_model(adapter, [model]) is not None
    names = [name for name, _ in model.named_parameters()]
    for prefix in adapter.vision_trainable_prefixes:
        assert any(name.startswith(prefix + ".") for name in names), prefix
