"""What is particular to the 1-D-position patch-grid families, EXAONE 4.5 and HyperCLOVA X SEED Vision v2
(sc_tune.adapters.exaone4_5) and VideoLLaMA3 (sc_tune.adapters.video_llama_3): Qwen2-VL-style image processors and
placeholders without mm_token_type_ids (VideoLLaMA3 with image_merge_sizes), 1-D positions the models count
themselves, the turn end read from the chat template. Their codec round trips, SC-Tune runs, export and evaluation
are in tests/test_families.py, static decoding in tests/test_decoding.py."""

from __future__ import annotations

import pytest
import torch

from sc_tune.adapters import adapter_class
from tests.helpers import assert_patch_grid_processor_matches, processor_around_the_folders_parts, two_colour_photo

TYPES = ["exaone4_5", "hyperclovax_vision_v2", "video_llama_3"]
PROCESSORS = {"exaone4_5": "Exaone4_5_Processor", "hyperclovax_vision_v2": "HyperCLOVAXVisionV2Processor",
              "video_llama_3": "VideoLlama3Processor"}
BOX = [0.1, 0.2, 0.5, 0.6]


@pytest.mark.parametrize("model_type", TYPES)
def test_the_familys_processor_builds_the_adapters_inputs_on_square_wide_and_tall_photos(model_type, tiny_checkpoint):
    """transformers' own processor class (Exaone4_5_Processor, HyperCLOVAXVisionV2Processor, VideoLlama3Processor)
    around the folder's tokenizer and image processor (its video processor needs torchvision and an image never
    reaches it: tests/helpers.py, processor_around_the_folders_parts) on the adapter's rendered prompts: the same input
    ids (image token and its count), the same pixels and grid (VideoLLaMA3: and merge sizes), no other key (no
    mm_token_type_ids); with the pixel budget lowered too."""
    path = tiny_checkpoint(model_type)
    adapter = adapter_class(model_type).from_pretrained(path)
    processor = processor_around_the_folders_parts(path)
    assert type(processor).__name__ == PROCESSORS[model_type]
    assert processor.image_token == adapter.image_token
    keys = ["attention_mask", "input_ids", *adapter.image_keys]
    grids = assert_patch_grid_processor_matches(adapter, processor, keys)
    assert grids[None, (60, 60)] == [1, 4, 4]


@pytest.mark.parametrize("model_type", TYPES)
def test_positions_are_the_models_own_and_padding_changes_no_row(model_type, tiny_checkpoint):
    """The adapter passes no positions (the models count 1-D positions from the cache length themselves, and drop any
    generate builds): two prompts of different lengths left-padded in one batch give each row the logits it has
    alone, and the forward equals one given the model's own positions (column indices) explicitly."""
    from sc_tune.modeling import load_model_and_adapter

    model, adapter = load_model_and_adapter(tiny_checkpoint(model_type))
    images = [adapter.prepare_image(two_colour_photo(size)) for size in ((60, 60), (300, 40))]
    prompts = [adapter.describer_prompt(BOX, images[0]), adapter.locator_prompt("the dog on the left", images[1])]
    batch = adapter.build_batch(prompts, images)
    assert "position_ids" not in batch.inputs and not adapter.per_token_keys
    with torch.no_grad():
        together = model(**batch.inputs).logits[:, -1]
        width = batch.input_ids.shape[1]
        explicit = model(**batch.inputs, position_ids=torch.arange(width)[None].expand(2, -1)).logits[:, -1]
        torch.testing.assert_close(explicit, together)
        for row in range(2):
            alone = model(**adapter.build_batch([prompts[row]], [images[row]]).inputs).logits[0, -1]
            torch.testing.assert_close(together[row], alone, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("model_type, end, eos", [("exaone4_5", "<|endofturn|>", "<|endofturn|>"),
                                                   ("hyperclovax_vision_v2", "<|im_end|>", "<|im_end|>")])
def test_the_locator_target_ends_with_the_turn_end_the_template_writes(model_type, end, eos, tiny_checkpoint):
    """The target after the locator prompt is the generic box and the token the checkpoint's template writes after an
    answer (read from it), where generation stops; the prompt opens the answer as the template does (EXAONE 4.5:
    vLLM's example prompt; HyperCLOVA X: the empty reasoning block)."""
    adapter = adapter_class(model_type).from_pretrained(tiny_checkpoint(model_type))
    image = adapter.prepare_image(two_colour_photo((60, 60)))
    prompt, target = adapter.locator_prompt("the dog", image), adapter.locator_target(BOX, image, "the dog")
    assert target == f"[100, 200, 500, 600]{end}" and adapter.end_token == end and adapter.tokenizer.eos_token == eos
    assert adapter.end_token_ids == [adapter.tokenizer.convert_tokens_to_ids(end)]
    user_text = "Locate the dog. Answer with its box as [x1, y1, x2, y2], integers from 0 to 1000."
    turns = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": user_text}]},
             {"role": "assistant", "content": [{"type": "text", "text": "[100, 200, 500, 600]"}]}]
    rendered = adapter.tokenizer.apply_chat_template(turns, tokenize=False)
    if model_type == "exaone4_5":
        assert rendered.startswith(prompt + target) and prompt.endswith("<|endofturn|>\n<|assistant|>\n")
    else:  # the history turn carries no reasoning block; the generation prompt opens an empty one
        assert rendered.replace("<|im_start|>assistant\n", "<|im_start|>assistant\n<think>\n\n</think>\n\n").startswith(
            prompt + target)
    assert adapter.parse_locator_output(target, image) == pytest.approx(BOX)


def test_video_llama_3_locator_target_is_the_notebooks_answer_and_the_turn_end_the_template_writes(tiny_checkpoint):
    """VideoLLaMA3's target after its grounding request is the answer DAMO-NLP-SG's notebook prints (the reference,
    then [[x1, y1, x2, y2]] on 0..1000) and the <|im_end|> its template writes after an answer; the prompt is the
    template's own rendering of the notebook's question; --box_format generic asks for and writes the generic box."""
    path = tiny_checkpoint("video_llama_3")
    adapter = adapter_class("video_llama_3").from_pretrained(path)
    image = adapter.prepare_image(two_colour_photo((60, 60)))
    prompt, target = adapter.locator_prompt("the dog", image), adapter.locator_target(BOX, image, "the dog")
    assert target == "<ref>the dog</ref>[[100, 200, 500, 600]]<|im_end|>" and adapter.end_token == "<|im_end|>"
    assert adapter.end_token_ids == [adapter.tokenizer.convert_tokens_to_ids("<|im_end|>")]
    question = "Where is the dog? Answer in [[x0,y0,x1,y1]] format."
    turns = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
             {"role": "assistant", "content": [{"type": "text", "text": target.removesuffix("<|im_end|>")}]}]
    rendered = adapter.tokenizer.apply_chat_template(turns, tokenize=False)
    assert rendered.startswith(prompt + target) and prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")
    # the referring form: one list, not the answer's nested one
    assert "Describe the object at [100, 200, 500, 600] in a few words." in adapter.describer_prompt(BOX, image)
    assert adapter.parse_locator_output(target, image) == pytest.approx(BOX)
    generic = adapter_class("video_llama_3").from_pretrained(path, box_format="generic")
    assert generic.locator_target(BOX, image, "the dog") == "[100, 200, 500, 600]<|im_end|>"
    assert generic.locator_prompt("the dog", image).endswith(
        "Locate the dog. Answer with its box as [x1, y1, x2, y2], integers from 0 to 1000.<|im_end|>\n"
        "<|im_start|>assistant\n")


def test_video_llama_3_prompt_caches_are_refused_by_name(tiny_checkpoint):
    """No scoring-cache resume, no moved prompt columns (not verified for this family): those passes run in full. The
    vision cache applies under fix_vit only (tests/test_vision_cache.py checks that it is exact)."""
    from sc_tune.modeling import freeze_vision_tower, load_model_and_adapter
    from sc_tune.vision_cache import VisionCache

    model, adapter = load_model_and_adapter(tiny_checkpoint("video_llama_3"))
    assert not adapter.resumes_from_scoring_cache(model, 40, 50)
    assert not adapter.moves_cached_prompt_columns(model, 50)
    assert VisionCache.for_model(adapter, [model]) is None, "a trainable tower is never cached"
    freeze_vision_tower(model, adapter)
    assert VisionCache.for_model(adapter, [model]) is not None
