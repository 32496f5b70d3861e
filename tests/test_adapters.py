"""Adapters and rollout plumbing on tiny models of each family: batches, labels, masks, generation."""

import re

import pytest
import torch
from PIL import Image
from transformers import LogitsProcessorList

from sc_tune.adapters import family_for, supported_model_types
from sc_tune.modeling import load_model_and_adapter
from sc_tune.rollout import (LOCATOR_BUDGET_MARGIN, GenerationSettings, completion_mask, fit_locator_budget, generate,
                             locate)
from tests.conftest import SAMPLE_IMAGES
from tests.helpers import ForceScript

FAMILIES = supported_model_types()


def test_completion_mask_keeps_the_first_end_token_only():
    ids = torch.tensor([[5, 6, 9, 7, 9], [9, 1, 1, 1, 1], [1, 2, 3, 4, 5]])
    assert completion_mask(ids, [9]).tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert completion_mask(ids, [9, 5]).tolist()[0] == [1, 0, 0, 0, 0]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tiny_checkpoint):
    model, adapter = load_model_and_adapter(tiny_checkpoint(request.param))
    image = adapter.prepare_image(Image.open(f"{SAMPLE_IMAGES}/images/003.png"))
    return model.eval(), adapter, image


def test_batch_is_left_padded_with_labels_on_targets_only(family):
    _, adapter, image = family
    box = [0.125, 0.25, 0.5, 0.75]
    prompts = [adapter.locator_prompt("the red circle", image), adapter.locator_prompt("a", image)]
    targets = [adapter.locator_target(box, image, "the red circle"), adapter.locator_target(box, image, "a")]
    batch = adapter.build_batch(prompts, [image, image], targets)
    ids, mask, labels = batch.inputs["input_ids"], batch.inputs["attention_mask"], batch.labels
    for row in range(2):
        target_ids = adapter.encode_target(targets[row])
        assert labels[row, -len(target_ids) :].tolist() == target_ids  # targets end every row
        assert (labels[row, : -len(target_ids)] == -100).all()
    assert mask[1, 0] == 0 and mask[0].all()  # the shorter prompt is padded on the left
    assert (ids[1][mask[1] == 0] == adapter.pad_token_id).all()
    assert adapter.end_token_ids[0] == target_ids[-1]  # the answer ends with the family's end token
    # the target text parses back to the box (within the family's grid)
    parsed = adapter.parse_locator_output(targets[0], image)
    assert parsed == pytest.approx(box, abs=1.0 / min(image.frame + (999,)))


def test_a_batch_whose_prompts_images_and_targets_do_not_pair_up_is_refused(family):
    # zip would pair them up to the shortest and drop the rest without a word: each mismatch alone is refused.
    _, adapter, image = family
    prompt, target = adapter.locator_prompt("a", image), adapter.locator_target([0.1, 0.1, 0.5, 0.5], image, "a")
    for prompts, images, targets, counts in (([prompt] * 2, [image], None, "2 prompts, 1 images and no targets"),
                                              ([prompt], [image], [target] * 2, "1 prompts, 1 images and 2 targets"),
                                              ([prompt] * 2, [image] * 2, [target], "2 prompts, 2 images and 1 targets")):
        with pytest.raises(ValueError, match=f"build_batch got {counts}; they must match one to one"):
            adapter.build_batch(prompts, images, targets)
    assert adapter.build_batch([prompt] * 2, [image] * 2, [target] * 2).labels.shape[0] == 2


def test_generation_pads_after_the_end_and_teacher_forcing_lines_up(family):
    model, adapter, image = family
    batch = adapter.build_batch([adapter.describer_prompt([0.1, 0.1, 0.6, 0.6], image)] * 2, [image, image])
    torch.manual_seed(0)
    out = generate(
        model,
        adapter,
        batch,
        GenerationSettings(max_new_tokens=6, do_sample=True, top_k=50, top_p=1.0),
        skip_special_tokens=True,
    )
    assert out.ids_BT.shape[0] == 2 and out.ids_BT.shape[1] <= 6
    assert (out.ids_BT[out.mask_BT == 0] == adapter.pad_token_id).all()
    assert (out.ids_BT < len(adapter.tokenizer)).all()  # only ids the tokenizer can decode
    inputs = adapter.append_completion(batch, out.ids_BT, out.mask_BT)
    assert inputs["input_ids"].shape[1] == batch.inputs["input_ids"].shape[1] + out.ids_BT.shape[1]
    for key in adapter.per_token_keys:
        assert inputs[key].shape == inputs["input_ids"].shape
    with torch.no_grad():
        logits = model(**inputs).logits
    assert torch.isfinite(logits).all()


def test_locator_budget_fits_the_longest_box_and_failures_are_none(family):
    model, adapter, image = family
    fitted = fit_locator_budget(adapter, [image], GenerationSettings(max_new_tokens=5), ["the red circle"])
    widest = adapter.locator_target([1.0, 1.0, 1.0, 1.0], image, "the red circle")
    up_to_box = widest[: adapter.locator_answer_end(widest)]  # generation stops where the box is complete
    assert fitted.max_new_tokens >= len(adapter.encode_target(up_to_box)) + LOCATOR_BUDGET_MARGIN
    assert fit_locator_budget(adapter, [image], GenerationSettings(max_new_tokens=500)).max_new_tokens == 500
    boxes, texts = locate(model, adapter, [image], ["the red circle"], GenerationSettings(max_new_tokens=3))
    assert len(texts) == 1 and (boxes[0] is None or len(boxes[0]) == 4)  # a random model: usually None


def test_locator_decoding_stops_at_the_complete_box_so_a_long_label_costs_no_steps(tiny_checkpoint, monkeypatch):
    model, adapter = load_model_and_adapter(tiny_checkpoint("qwen3_vl"))
    model.eval()
    image = adapter.prepare_image(Image.open(f"{SAMPLE_IMAGES}/images/003.png"))
    captions = ["the man in the white shirt on the left next to the small dog", "a cat"]
    boxes = [[0.1, 0.2, 0.5, 0.6], [0.25, 0.5, 0.75, 1.0]]
    targets = [adapter.locator_target(b, image, c) for b, c in zip(boxes, captions)]
    scripts = [adapter.encode_target(t) for t in targets]
    # the token that completes each row's box (it may carry more text, e.g. '],')
    up_to_box = [next(k for k in range(1, len(s) + 1) if adapter.locator_answer_end(adapter.decode(s[:k])) is not None)
                 for s in scripts]
    assert up_to_box[0] < len(scripts[0]) - 10  # the first row's label after its box is long
    prompts = [adapter.locator_prompt(c, image) for c in captions]
    width = adapter.build_batch(prompts, [image, image]).input_ids.shape[1]
    plain_kwargs = adapter.generation_kwargs
    monkeypatch.setattr(adapter, "generation_kwargs", lambda describer=True: {
        **plain_kwargs(describer), "logits_processor": LogitsProcessorList([ForceScript(scripts, width)])})
    steps = []
    hook = model.register_forward_hook(lambda *args: steps.append(1))
    found, texts = locate(model, adapter, [image, image], captions, GenerationSettings(max_new_tokens=200), False)
    assert found == [pytest.approx(b, abs=1e-3) for b in boxes]
    assert texts == [adapter.decode(s[:k]) for s, k in zip(scripts, up_to_box)]  # each row ends at its box
    assert len(steps) == max(up_to_box)  # decoding stopped once the last row's box was complete
    steps.clear()
    batch = adapter.build_batch(prompts, [image, image])
    full = generate(model, adapter, batch, GenerationSettings(max_new_tokens=200), skip_special_tokens=False)
    hook.remove()
    assert full.texts == targets and len(steps) == max(map(len, scripts))  # without the stop: every label token


def test_a_reasoning_only_template_is_refused_by_name(tiny_checkpoint, tmp_path):
    # A Qwen3-VL-*-Thinking release shares model_type with Instruct; only its template, which opens <think> after
    # the assistant turn, tells them apart. The stand-in of that template on an otherwise loadable folder.
    import json
    import shutil

    from sc_tune.adapters import adapter_class
    from sc_tune.adapters.base import ThinkingCheckpointError
    from sc_tune.tiny.chat_templates import QWEN3_VL_THINKING_TEMPLATE

    folder = tmp_path / "thinking"
    shutil.copytree(tiny_checkpoint("qwen3_vl"), folder)
    adapter_class("qwen3_vl").from_pretrained(str(folder))  # the instruct stand-in loads
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "chat_template.jinja").write_text(QWEN3_VL_THINKING_TEMPLATE)
    with pytest.raises(ThinkingCheckpointError, match=str(folder)):
        adapter_class("qwen3_vl").from_pretrained(str(folder))


@pytest.mark.parametrize("model_type", ["qwen2_5_vl", "llava_onevision"])
def test_prompts_use_the_template_the_familys_processor_renders(model_type, tiny_checkpoint, tmp_path):
    """A folder with the processor's chat_template.json and another template for the tokenizer
    (chat_template.jinja): the family's processor, which the chat demo renders through, takes chat_template.json,
    and so must SC-Tune, or it would tune prompts the demo never shows."""
    import json
    import shutil

    from PIL import Image
    from transformers import ProcessorMixin

    from sc_tune.adapters import adapter_class

    folder = tmp_path / "two_templates"
    shutil.copytree(tiny_checkpoint(model_type), folder)
    tokenizer_side = (folder / "chat_template.jinja").read_text()
    processor_side = "{{- 'THE PROCESSOR TEMPLATE ' -}}" + tokenizer_side
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": processor_side}))
    # What the demo's processor loads (its settings, read without building the torchvision video processor).
    assert ProcessorMixin.get_processor_dict(str(folder))[0]["chat_template"] == processor_side
    adapter = adapter_class(model_type).from_pretrained(str(folder))
    assert adapter.tokenizer.chat_template == processor_side
    image = adapter.prepare_image(Image.new("RGB", (64, 48)))
    assert adapter.describer_prompt([0.1, 0.2, 0.5, 0.6], image).startswith("THE PROCESSOR TEMPLATE ")


# The families whose processor resizes to a pixel budget (sc_tune.adapters.patch_grid_chat), and two that have none.
PIXEL_BUDGET_TYPES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_5", "qwen4_exp", "glm4v", "glm46v", "exaone4_5",
                      "hyperclovax_vision_v2", "video_llama_3", "cohere_compass"]


@pytest.mark.parametrize("model_type", PIXEL_BUDGET_TYPES)
def test_an_image_pixel_budget_bounds_every_resized_image(tiny_checkpoint, model_type):
    """``--image_max_pixels`` / ``--image_min_pixels``: a 1920x1080 photo is resized to at most the budget (and not
    far below it: the processor keeps the aspect ratio on a grid of merged patches), a small one to at least the
    minimum, and the prompt holds one placeholder per merged patch. GLM's processor bounds frames x height x width
    (an image is 2 frames): its budget is counted the same way as Qwen's all the same."""
    _, adapter = load_model_and_adapter(tiny_checkpoint(model_type))
    token_pixels = (adapter.patch_size * adapter.merge_size) ** 2
    budget = 448 * 448
    adapter.limit_image_pixels(None, budget)
    photo = adapter.prepare_image(Image.new("RGB", (1920, 1080)))
    width, height = photo.frame
    assert 0.9 * budget <= width * height <= budget, photo.frame
    assert photo.num_tokens == width * height // token_pixels and width > height
    adapter.limit_image_pixels(4 * budget, 16 * budget)
    small = adapter.prepare_image(Image.new("RGB", (64, 48)))
    assert 4 * budget <= small.frame[0] * small.frame[1] <= 1.2 * 4 * budget, small.frame
    assert adapter.image_pixel_limits == (4 * budget, 16 * budget)
    batch = adapter.build_batch([adapter.describer_prompt([0.1, 0.2, 0.5, 0.6], photo)], [photo])
    assert int((batch.inputs["input_ids"] == adapter.image_token_id).sum()) == photo.num_tokens


# The Qwen2-VL-style families whose processor writes M-RoPE's mm_token_type_ids; EXAONE 4.5, HyperCLOVA X,
# VideoLLaMA3 (tests/test_exaone4_5.py) and North (tests/test_cohere_compass.py) are checked beside their quirks.
QWEN_GRID_TYPES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe", "qwen4_exp", "glm4v",
                   "glm4v_moe", "glm46v"]


@pytest.mark.parametrize("model_type", QWEN_GRID_TYPES)
def test_the_familys_processor_builds_the_adapters_inputs_on_square_wide_and_tall_photos(tiny_checkpoint, model_type):
    """transformers' own processor class of the family (Qwen2VLProcessor ... Glm46VProcessor, what the chat demo runs)
    around the tiny folder's tokenizer and image processor (its video processor needs torchvision and an image never
    reaches it: tests/helpers.py, processor_around_the_folders_parts), given the adapter's rendered prompts: the same
    input ids (the image token repeated once per merged patch), pixels, grid and mm_token_type_ids, no other key; with
    the pixel budget lowered too."""
    from tests.helpers import assert_patch_grid_processor_matches, processor_around_the_folders_parts

    from sc_tune.adapters import adapter_class

    path = tiny_checkpoint(model_type)
    adapter = adapter_class(model_type).from_pretrained(path)
    processor = processor_around_the_folders_parts(path)
    assert processor.image_token == adapter.image_token
    keys = ["attention_mask", "input_ids", *adapter.per_token_keys, *adapter.image_keys]
    assert "mm_token_type_ids" in keys
    # GLM-4V's processor bounds frames x height x width, and an image is two frames (its temporal patch).
    frames = 2 if model_type.startswith("glm") else 1
    assert_patch_grid_processor_matches(adapter, processor, keys, frames_per_image=frames)


@pytest.mark.parametrize("model_type", ["qwen", "gemma3"])
def test_a_family_without_a_pixel_budget_refuses_one_by_name(tiny_checkpoint, model_type):
    from sc_tune.arguments import ArgumentError

    with pytest.raises(ArgumentError, match="no pixel budget") as refused:
        load_model_and_adapter(tiny_checkpoint(model_type), image_max_pixels=200704)
    # The families that take one are named from the registry: every one tested above, no other.
    named = str(refused.value).split("dynamic-resolution families: ")[1].split("); this family")[0].split(", ")
    assert {family_for(t).name for t in PIXEL_BUDGET_TYPES} == set(named)


def test_a_pixel_budget_below_one_image_token_is_refused(tiny_checkpoint):
    from sc_tune.arguments import ArgumentError

    _, adapter = load_model_and_adapter(tiny_checkpoint("qwen2_5_vl"))
    side = adapter.patch_size * adapter.merge_size  # one image token: a merged patch
    below = f"--image_max_pixels 700 is below one image token of {type(adapter).__name__} ({side} x {side} = {side**2}"
    with pytest.raises(ArgumentError, match=re.escape(below + " pixels)")):
        adapter.limit_image_pixels(None, 700)
    with pytest.raises(ArgumentError, match=re.escape("--image_min_pixels 802816 is above --image_max_pixels 3136 (")):
        adapter.limit_image_pixels(4 * 448 * 448, None)  # the tiny checkpoint's own maximum is 3,136
    assert adapter.image_pixel_limits is None
    adapter.limit_image_pixels(4 * side**2, 4 * side**2)  # equal bounds: one size, allowed
    assert adapter.image_pixel_limits == (4 * side**2, 4 * side**2)
