"""What is particular to the chat-template families (InternVL, Gemma 3 / 4, LLaVA-OneVision, LLaVA-1.5 / NeXT,
Mistral 3, Aya Vision, Granite 4 Vision, Llama 3.2 Vision, Idefics2, SmolVLM, Ovis2, MiniCPM-V).

The codec round trips, SC-Tune loop, export and evaluation of every family are covered by
tests/test_families.py; here: prompts through each family's chat template (InternVL's grounding format),
placeholder expansion that matches the features the model computes (tiles and crops of odd-sized images
included), tile padding across a batch, suppressed tokens, the chat template read from a processor's legacy
file, and the fix_vit / LoRA module sets.
"""

import json
import os
import re
import shutil

import pytest
import torch
from PIL import Image

from sc_tune.adapters import adapter_class
from sc_tune.modeling import freeze_vision_tower, load_model_and_adapter
from tests.conftest import SAMPLE_IMAGES
from tests.helpers import assert_processor_builds_the_same_inputs, two_colour_photo

TEMPLATE_TYPES = ["internvl", "gemma3", "gemma4", "llava_onevision", "llava", "llava_next", "mistral3", "aya_vision",
                  "granite4_vision", "mllama", "idefics2", "smolvlm", "idefics3", "ovis2", "minicpmv4_6", "minicpmv4_7"]
BOX = [0.1, 0.2, 0.5, 0.6]

# What each family's chat template makes of one user turn (image + text) and the opened answer.
TURNS = {
    "internvl": ("<|im_start|>user\n<IMG_CONTEXT>\n", "<|im_end|>\n<|im_start|>assistant\n"),
    "gemma3": ("<bos><start_of_turn>user\n<start_of_image>", "<end_of_turn>\n<start_of_turn>model\n"),
    "gemma4": ("<bos><|turn>user\n<|image|>", "<turn|>\n<|turn>model\n<|channel>thought\n<channel|>"),  # empty thought
    "llava_onevision": ("<|im_start|>user\n<image>\n", "<|im_end|>\n<|im_start|>assistant\n"),
    "llava": ("USER: <image>\n", " ASSISTANT:"),  # LLaVA-1.5's: no token closes the user's text
    # the template writes the BOS and its default system message (dated: see test_mistral3_prompts_...)
    "mistral3": ("<s>[SYSTEM_PROMPT]You are Mistral Small 3,", "[/INST]"),
    # Cohere's turn tokens; "<image>" is plain text its processor expands (its tokenizer prepends <BOS_TOKEN>)
    "aya_vision": ("<|START_OF_TURN_TOKEN|><|USER_TOKEN|><image>", "<|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|>"
                   "<|CHATBOT_TOKEN|>"),
    # Granite 4's role tags, the image first in the user's turn (its tokenizer prepends nothing)
    "granite4_vision": ("<|start_of_role|>user<|end_of_role|><image>",
                        "<|end_of_text|>\n<|start_of_role|>assistant<|end_of_role|>"),
    # Llama 3's header tags; the template writes the BOS (its tokenizer would prepend one: the processor adds none)
    "mllama": ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<|image|>",
               "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"),
    # no BOS in the template (its tokenizer prepends <s>), no space after "User:" before an image
    "idefics2": ("User:<image>", "<end_of_utterance>\nAssistant:"),
    "smolvlm": ("<|im_start|>User:<image>", "<end_of_utterance>\nAssistant:"),
    "idefics3": ("<|im_start|>User:<image>", "<end_of_utterance>\nAssistant:"),
    # the released template's default system turn; "<image>" is plain text its processor expands
    "ovis2": ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<image>\n",
              "<|im_end|>\n<|im_start|>assistant\n"),
    "minicpmv4_6": ("<|im_start|>user\n<|image_pad|>\n",
                    "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"),  # thinking off
}
TURNS["minicpmv4_7"] = TURNS["minicpmv4_6"]
TURNS["llava_next"] = ("[INST] <image>\n", " [/INST]")  # llava-v1.6-mistral-7b-hf's
# Media tokens (never generated) and box/reference tokens (never in captions) of each tiny tokenizer.
MEDIA = {
    "internvl": {"<img>", "</img>", "<IMG_CONTEXT>", "<video>"},
    "gemma3": {"<start_of_image>", "<end_of_image>", "<image_soft_token>"},
    "gemma4": {"<|image>", "<image|>", "<|image|>", "<|video|>", "<|audio>", "<audio|>", "<|audio|>"},
    "llava_onevision": {"<image>", "<video>"},
    "llava": {"<image>"},
    "llava_next": {"<image>"},
    "mistral3": {"[IMG]", "[IMG_BREAK]", "[IMG_END]"},
    "aya_vision": {"<|START_OF_IMG|>", "<|END_OF_IMG|>", "<|IMG_PATCH|>", "<|IMG_LINE_BREAK|>"},
    "granite4_vision": {"<image>"},
    "mllama": {"<|image|>"},
    "idefics2": {"<image>", "<fake_token_around_image>"},
    "smolvlm": {"<image>", "<fake_token_around_image>", "<global-img>"}
    | {f"<row_{r}_col_{c}>" for r in (1, 2) for c in (1, 2)},
}
MEDIA["idefics3"] = MEDIA["smolvlm"]
MEDIA["ovis2"] = {"<IMG_ATOM>", "<IMG_START>", "<IMG_GRID>", "<IMG_COL>", "<IMG_ROW>", "<IMG_END>"}
MEDIA["minicpmv4_6"] = MEDIA["minicpmv4_7"] = {"<|image_pad|>", "<|video_pad|>", "<image>", "</image>", "<slice>",
                                               "</slice>", "<image_id>", "</image_id>"}
BOX_TOKENS = {"internvl": {"<ref>", "</ref>", "<box>", "</box>"}}
# Module names: the projector that fix_vit must leave trainable (Ovis2: the tower's visual head and the visual
# embedding table).
PROJECTOR = {
    "internvl": "model.multi_modal_projector.",
    "gemma3": "model.multi_modal_projector.",
    "gemma4": "model.embed_vision.",
    "llava_onevision": "model.multi_modal_projector.",
    "llava": "model.multi_modal_projector.",
    "llava_next": ("model.multi_modal_projector.", "model.image_newline"),
    "mistral3": "model.multi_modal_projector.",  # its patch merger included
    "aya_vision": "model.multi_modal_projector.",  # the pixel shuffle's norm and SwiGLU MLP
    # the window Q-Former projectors (layer "deepstack" and spatial-offset ones) and the row newline
    "granite4_vision": ("model.layerwise_projectors.", "model.spatial_projectors.", "model.image_newline"),
    "mllama": "model.multi_modal_projector.",  # outside model.vision_model
    "idefics2": "model.connector.",  # the modality projection and the perceiver resampler
    "smolvlm": "model.connector.",
    "idefics3": "model.connector.",
    "ovis2": ("model.vision_tower.head_linear.", "model.vision_tower.head_norm.", "model.visual_embeddings_table."),
    "minicpmv4_6": "model.merger.",
    "minicpmv4_7": "model.merger.",
}


# ---------------------------------------------------------------- adapters on tiny models
def _odd_images():
    """A sample photo and a tall odd-sized one: different tile / crop grids and placeholder counts."""
    tall = Image.new("RGB", (37, 91), (10, 200, 30))
    return [Image.open(f"{SAMPLE_IMAGES}/images/003.png"), tall]


@pytest.fixture(scope="module", params=TEMPLATE_TYPES)
def family(request, tiny_checkpoint):
    path = tiny_checkpoint(request.param)
    model, adapter = load_model_and_adapter(path)
    return request.param, path, model.eval(), adapter


def test_prompts_go_through_the_family_chat_template(family):
    model_type, _, _, adapter = family
    image = adapter.prepare_image(_odd_images()[0])
    head, tail = TURNS[model_type]
    describer = adapter.describer_prompt(BOX, image)
    locator = adapter.locator_prompt("the red circle", image)
    assert describer.startswith(head) and describer.endswith(tail)
    assert locator.startswith(head)
    if model_type == "internvl":  # its documented grounding prompt; the answer repeats the reference
        assert describer.endswith(  # its documented region-captioning prompt
            "Please provide a short description for this region: <box>[[100, 200, 500, 600]]</box>" + tail)
        answer = "<ref>the dog</ref><box>[[10, 20, 30, 40]]</box><|im_end|>"
        assert adapter.parse_locator_output(answer, image) == pytest.approx([0.01, 0.02, 0.03, 0.04])
        single = adapter.parse_locator_output("<box>[10, 20, 30, 40]</box>", image)  # InternVL's eval reads it
        assert single == pytest.approx([0.01, 0.02, 0.03, 0.04])
        assert locator.endswith(
            "Please provide the bounding box coordinate of the region this sentence describes: "
            "<ref>the red circle</ref>" + tail
        )
        assert (adapter.locator_target(BOX, image, "the red circle")
                == "<ref>the red circle</ref><box>[[100, 200, 500, 600]]</box><|im_end|>")
    elif model_type in ("gemma3", "gemma4"):  # Gemini's y-first box_2d, fenced JSON
        assert '{"box_2d": [200, 100, 600, 500]}' in describer
        assert locator.endswith("Output its box_2d in JSON as [ymin, xmin, ymax, xmax] normalized to 0-1000." + tail)
        assert adapter.locator_target(BOX, image, "the dog") == (
            '```json\n[\n  {"box_2d": [200, 100, 600, 500], "label": "the dog"}\n]\n```' + adapter.end_text)
    else:  # generic codec, asked for in words
        assert "[100, 200, 500, 600]" in describer
        assert locator.endswith("Answer with its box as [x1, y1, x2, y2], integers from 0 to 1000." + tail)
        # After what the template writes between the generation prompt and an answer (LLaVA-1.5's, SmolVLM's
        # "ASSISTANT:" / "Assistant:" + " " on the tiny byte-level tokenizers; chat_template.answer_opening).
        opening = " " if model_type in ("llava", "llava_next", "smolvlm", "idefics3", "idefics2") else ""
        assert adapter.answer_opening == opening
        assert adapter.locator_target(BOX, image, "the dog") == opening + "[100, 200, 500, 600]" + adapter.end_text


def test_the_familys_processor_loads_the_tiny_folder_and_builds_the_adapters_inputs(family):
    """A tiny folder is written as a release is (the named special tokens the processor reads off the tokenizer,
    processor_config.json): the family's own AutoProcessor loads it (it failed on InternVL, Gemma 3 / 4 and
    LLaVA-OneVision: "no attribute boi_token", ...) and builds the adapter's inputs from its rendered prompt.
    AutoProcessor loads without torchvision here for Gemma 3, SmolVLM v1 and Ovis2; for InternVL, Gemma 4 and
    LLaVA-OneVision the family's class runs around the folder's parts (its video processor needs torchvision)."""
    from tests.helpers import assert_the_familys_processor_builds_the_adapters_inputs

    model_type, path, _, adapter = family
    if model_type.startswith("minicpmv"):
        pytest.skip("MiniCPM-V's processor reads its video processor's settings: the test below builds it with them")
    assert_the_familys_processor_builds_the_adapters_inputs(path, adapter)


@pytest.mark.parametrize("model_type", ["minicpmv4_6", "minicpmv4_7"])
def test_the_minicpmv_processor_builds_the_adapters_inputs_without_torchvision(model_type, tiny_checkpoint):
    """AutoProcessor cannot load MiniCPM-V here (the test above skips): its video processor needs torchvision, and
    the processor's constructor type-checks it. Its images never touch the video processor (only two of its
    settings are read), so the family's own processor class, built around the folder's tokenizer and image
    processor with a stand-in for those two settings, runs its own __call__: its placeholders (image id, thumbnail,
    slice rows), packed pixels, target sizes and (4.7) mm_token_type_ids must be the adapter's."""
    import types

    from tests.helpers import (assert_the_familys_processor_builds_the_adapters_inputs,
                               processor_around_the_folders_parts)

    path = tiny_checkpoint(model_type)
    adapter = adapter_class(model_type).from_pretrained(path)
    video = types.SimpleNamespace(slice_mode=False, downsample_mode=adapter.image_processor.downsample_mode)
    processor = processor_around_the_folders_parts(path, video_processor=video)
    assert type(processor).__name__ == {"minicpmv4_6": "MiniCPMV4_6Processor",
                                        "minicpmv4_7": "MiniCPMV4_7Processor"}[model_type]
    assert_the_familys_processor_builds_the_adapters_inputs(path, adapter, processor)


def _set_downsample_mode(folder, mode, files=("config.json", "preprocessor_config.json")):
    from sc_tune.jsonio import read_json, write_json

    for name in files:
        path = os.path.join(folder, name)
        write_json(path, {**read_json(path), "downsample_mode": mode})


@pytest.mark.parametrize("size, patch, scale", [(512, 16, 4), (364, 14, 2), (384, 14, 3)])
def test_smolvlm_counts_per_crop_the_features_its_connector_makes(tiny_checkpoint, size, patch, scale):
    """At the released geometries (SmolVLM-256M / 500M: 512 px crops of 16 px patches, pixel shuffle 4; Idefics3-8B:
    364, 14, 2; SmolVLM2-2.2B: 384, 14, 3), a crop's image tokens are as many as transformers' connector makes of its
    patches (the tiny tower's geometry cannot tell ``** 2`` from ``* 2``)."""
    from transformers import SmolVLMConfig
    from transformers.models.smolvlm.modeling_smolvlm import SmolVLMConnector

    adapter = adapter_class("smolvlm").from_pretrained(tiny_checkpoint("smolvlm"))
    config = SmolVLMConfig(vision_config={"image_size": size, "patch_size": patch, "hidden_size": 8,
                                          "num_attention_heads": 2},
                           text_config={"hidden_size": 8, "num_attention_heads": 2, "num_key_value_heads": 2},
                           scale_factor=scale)
    features = SmolVLMConnector(config)(torch.zeros(1, (size // patch) ** 2, 8)).shape[1]
    assert type(adapter)(adapter.tokenizer, adapter.image_processor, config).image_seq_len == features


def test_smolvlm_counts_an_unsplit_image_as_one_crop_as_its_model(tiny_checkpoint):
    model, adapter = load_model_and_adapter(tiny_checkpoint("smolvlm"))
    adapter.image_processor.do_image_splitting = False  # the global view alone
    image = adapter.prepare_image(Image.new("RGB", (97, 61), (200, 30, 30)))
    assert image.num_tokens == adapter.image_seq_len
    batch = adapter.build_batch([adapter.describer_prompt(BOX, image)], [image])
    with torch.no_grad():
        model.eval()(**batch.inputs)  # raises where the image tokens are not the features


def test_llava_onevision_counts_a_view_as_the_patches_its_released_tower_makes(tiny_checkpoint):
    """At the released geometry (transformers' LlavaOnevisionConfig defaults: SigLIP, 384 px views of 14 px patches),
    a view is as many features as SigLIP's embeddings make patches, 729 (the tiny tower's 2 x 2 patches cannot tell
    ``side ** 2`` from ``side * 2``)."""
    from transformers import LlavaOnevisionConfig
    from transformers.models.siglip.modeling_siglip import SiglipVisionEmbeddings

    from sc_tune.adapters.llava_onevision import _feature_counter

    adapter = adapter_class("llava_onevision").from_pretrained(tiny_checkpoint("llava_onevision"))
    config = LlavaOnevisionConfig()
    vision = config.vision_config
    vision.hidden_size = 8  # a small embedding: only its patch count is read
    patches = SiglipVisionEmbeddings(vision).num_patches
    assert _feature_counter(adapter.image_processor, config, 0).num_image_tokens == patches == 729


@pytest.mark.parametrize("image_size, patch_size, stride", [(224, 14, 1), (448, 14, 2)])
def test_ovis2_counts_a_tile_as_its_processor_at_the_released_geometries(image_size, patch_size, stride):
    """transformers' Ovis2Config defaults (224 px, 14 px patches, stride 1) and the Ovis2 releases' (448, 14, 2): 256
    tokens a tile, Ovis2Processor's default image_seq_length (the tiny tower cannot tell ``** 2`` from ``* 2``)."""
    import inspect
    import types

    from transformers.models.ovis2.processing_ovis2 import Ovis2Processor

    from sc_tune.adapters.ovis2 import tile_tokens

    default = inspect.signature(Ovis2Processor.__init__).parameters["image_seq_length"].default
    vision = types.SimpleNamespace(image_size=image_size, patch_size=patch_size, hidden_stride=stride)
    assert tile_tokens(vision) == default == 256


@pytest.mark.parametrize("text", ["User:<image>Locate", "User:<image> Locate", "User:<image>\nLocate",
                                  "User:<image><end_of_utterance>", "User:<image>"])
def test_idefics2_spaces_the_image_from_the_text_after_it_as_its_processor(tiny_checkpoint, text):
    """Idefics2Processor puts a space after the closing <fake_token_around_image> only before a character that is
    neither whitespace nor "<" (a word glued to the image): the same ids from the adapter, whatever follows."""
    from transformers import AutoProcessor

    path = tiny_checkpoint("idefics2")
    adapter = adapter_class("idefics2").from_pretrained(path)
    photo = Image.new("RGB", (97, 61), (200, 30, 30))
    theirs = AutoProcessor.from_pretrained(path)(text=[text], images=[[photo]], return_tensors="pt")["input_ids"]
    assert adapter.build_batch([text], [adapter.prepare_image(photo)]).inputs["input_ids"].tolist() == theirs.tolist()


# The tile each family's tower sees, (width, height), from its image processor's settings.
TILE_FRAMES = {
    "aya_vision": lambda p: (p.size["width"], p.size["height"]),
    "ovis2": lambda p: (p.size["width"], p.size["height"]),
    "llava_onevision": lambda p: (p.size["width"], p.size["height"]),
    "granite4_vision": lambda p: (p.crop_size["width"], p.crop_size["height"]),
    "smolvlm": lambda p: (p.max_image_size["longest_edge"],) * 2,
    # the 5:1 photo resized, its short side no shorter than shortest_edge; the whole photo without the padding
    "idefics2": lambda p: (p.size["longest_edge"], max(p.size["shortest_edge"], p.size["longest_edge"] * 60 // 300)),
}


@pytest.mark.parametrize("model_type", list(TILE_FRAMES))
def test_a_tiled_familys_frame_is_the_tile_its_tower_sees_width_first(tiny_checkpoint, model_type):
    """``families budget`` reports the frame as ``model_input_frame``: the pixels' last two sides, width first, never
    the tile or channel count (a 5:1 photo: Idefics2 keeps its aspect ratio, the others tile it)."""
    adapter = adapter_class(model_type).from_pretrained(tiny_checkpoint(model_type))
    image = adapter.prepare_image(Image.new("RGB", (300, 60)))
    assert image.frame == TILE_FRAMES[model_type](adapter.image_processor)


def test_minicpmvs_frame_is_its_first_view_the_whole_photo(tiny_checkpoint):
    """The frame (``model_input_frame``) is the first view, the whole photo resized, width first; the slices that
    follow are square on the tiny processor, the whole view of a 5:1 photo is not."""
    adapter = adapter_class("minicpmv4_6").from_pretrained(tiny_checkpoint("minicpmv4_6"))
    image = adapter.prepare_image(Image.new("RGB", (300, 60)))
    sides = image.tensors["target_sizes"].tolist()
    assert len(sides) > 1 and sides[1][0] == sides[1][1]  # sliced, into square slices
    width, height = image.frame
    assert width > height and width % adapter.image_processor.patch_size == 0


@pytest.mark.parametrize("model_type", ["minicpmv4_6", "minicpmv4_7"])
def test_minicpmv_without_the_window_merger_counts_the_tokens_its_model_computes(model_type, tiny_checkpoint, tmp_path):
    """MiniCPM-V's "4x" mode skips the tower's window merger: a feature per 2 x 2 patches instead of 4 x 4, and the
    adapter counts as many image tokens as the model computes (it raises otherwise). A processor and a model config
    that disagree are refused, naming both."""
    folder = str(tmp_path / model_type)
    shutil.copytree(tiny_checkpoint(model_type), folder)
    _set_downsample_mode(folder, "4x")
    model, adapter = load_model_and_adapter(folder)
    image = adapter.prepare_image(Image.new("RGB", (97, 61), (200, 30, 30)))
    batch = adapter.build_batch([adapter.describer_prompt(BOX, image)], [image])
    with torch.no_grad():
        model.eval()(**batch.inputs)
    _set_downsample_mode(folder, "16x", files=("config.json",))
    with pytest.raises(ValueError, match="the image processor's downsample_mode '4x' is not the model config's '16x'"):
        adapter_class(model_type).from_pretrained(folder)


def test_internvls_frame_is_its_tile_and_a_released_tile_is_256_tokens(tiny_checkpoint):
    """The frame (``families budget``'s ``model_input_frame``) is the tile the tower sees, width first; at the released
    geometry (448 px tiles of 14 px patches, pixel shuffle 0.5: transformers' InternVLConfig defaults) a tile is
    InternVLProcessor's default image_seq_length, 256 tokens (the tiny tower's 2 x 2 patches cannot tell
    ``side ** 2`` from ``side * 2``)."""
    import inspect

    from transformers import InternVLConfig
    from transformers.models.internvl.processing_internvl import InternVLProcessor

    adapter = adapter_class("internvl").from_pretrained(tiny_checkpoint("internvl"))
    tile = adapter.image_processor.size
    assert adapter.prepare_image(Image.new("RGB", (97, 61))).frame == (tile["width"], tile["height"])
    released = type(adapter)(adapter.tokenizer, adapter.image_processor, InternVLConfig())
    default = inspect.signature(InternVLProcessor.__init__).parameters["image_seq_length"].default
    assert released.tile_tokens == default == 256


def test_internvl_generic_box_format_uses_the_generic_prompts(tiny_checkpoint):
    adapter = adapter_class("internvl").from_pretrained(tiny_checkpoint("internvl"), box_format="generic")
    image = adapter.prepare_image(_odd_images()[0])
    assert "<ref>" not in adapter.locator_prompt("the dog", image)
    assert adapter.locator_target(BOX, image, "the dog") == "[100, 200, 500, 600]<|im_end|>"
    assert adapter.parse_locator_output("[100, 200, 500, 600]", image) == pytest.approx(BOX)


def test_placeholders_match_the_features_the_model_computes(family):
    """Two odd-sized images in one batch: each row holds as many placeholder tokens as its image yields
    features (the models raise otherwise), tiles/crops padded across the batch change nothing, and the
    per-token image type marks exactly the placeholders."""
    model_type, _, model, adapter = family
    images = [adapter.prepare_image(im) for im in _odd_images()]
    if model_type == "mllama":  # one <|image|> whatever the photo; the cross-attention layers read its tiles
        assert [int(im.tensors["aspect_ratio_mask"].sum()) for im in images] == [4, 3]
    elif model_type == "idefics2":  # the perceiver's 3 latents per crop whatever its size, 4 quarters + the whole photo
        assert [im.num_tokens for im in images] == [15, 15]
    elif model_type not in ("gemma3", "llava"):  # they take every image at one size; the others follow its shape
        assert images[0].num_tokens != images[1].num_tokens
    prompts = [adapter.locator_prompt("the red circle", im) for im in images]
    batch = adapter.build_batch(prompts, images)
    ids = batch.inputs["input_ids"]
    for row, image in enumerate(images):
        assert (ids[row] == adapter.image_token_id).sum() == image.num_tokens
    if adapter.image_type_key:
        assert torch.equal(batch.inputs[adapter.image_type_key], (ids == adapter.image_token_id).long())
    for key in adapter.padded_keys:  # each image in place, zero-padded past its own tiles (Mistral 3: pixels)
        shapes = [im.tensors[key].shape[1:] for im in images]
        assert batch.inputs[key].shape[1:] == tuple(map(max, zip(*shapes)))
        assert any(shape != shapes[0] for shape in shapes)
        for row, (image, shape) in enumerate(zip(images, shapes)):
            own = (row, *(slice(0, n) for n in shape))
            assert torch.equal(batch.inputs[key][own], image.tensors[key][0])
            padding = batch.inputs[key][row].clone()
            padding[own[1:]] = 0
            assert not padding.any()
    with torch.no_grad():
        batched = model(**batch.inputs).logits
        long = int(batch.inputs["attention_mask"].sum(1).argmax())  # the unpadded row: same positions alone
        alone = model(**adapter.build_batch([prompts[long]], [images[long]]).inputs).logits
    assert torch.allclose(batched[long], alone[0], atol=1e-4)


def test_a_caption_spelling_special_tokens_stays_plain_text(family):
    _, _, _, adapter = family
    image = adapter.prepare_image(_odd_images()[0])
    # Spelled whole, and split around another (one removal joins the pieces into a marker again).
    marker = adapter.image_marker
    caption = f"the {adapter.image_token}{marker}{marker[:3]}{adapter.end_token}{marker[3:]} dog{adapter.end_token}"
    batch = adapter.build_batch([adapter.locator_prompt(caption, image)], [image])
    assert (batch.input_ids == adapter.image_token_id).sum() == image.num_tokens
    assert "the  dog" in adapter.tokenizer.decode(batch.input_ids[0])


def test_a_wrong_placeholder_count_fails_at_batch_building(family):
    _, _, _, adapter = family
    image = adapter.prepare_image(_odd_images()[0])
    image.num_tokens += 1
    with pytest.raises(ValueError, match="image features"):
        adapter.build_batch([adapter.describer_prompt(BOX, image)], [image])


def test_suppressed_tokens_cover_media_always_and_box_tokens_in_captions(family):
    model_type, _, _, adapter = family
    names = adapter.tokenizer.convert_ids_to_tokens
    assert set(names(adapter.suppressed_token_ids(describer=False))) == MEDIA[model_type]
    assert set(names(adapter.suppressed_token_ids(describer=True))) == MEDIA[model_type] | BOX_TOKENS.get(
        model_type, set()
    )
    assert not set(adapter.end_token_ids) & set(adapter.suppressed_token_ids(describer=True))


def test_fix_vit_freezes_the_vision_tower_and_keeps_the_projector(family):
    model_type, path, _, adapter = family
    model, _ = load_model_and_adapter(path)
    assert freeze_vision_tower(model, adapter) > 0
    params = dict(model.named_parameters())
    tower = [n for n in params if n.startswith(adapter.vision_prefix + ".") and not n.startswith(PROJECTOR[model_type])]
    projector = [n for n in params if n.startswith(PROJECTOR[model_type])]
    assert tower and projector
    assert not any(params[n].requires_grad for n in tower)
    assert all(params[n].requires_grad for n in projector)
    assert all(p.requires_grad for n, p in params.items() if n not in tower)


def test_lora_targets_are_the_language_model_projections_only(family):
    _, _, model, adapter = family
    matched = [n for n, _ in model.named_modules() if re.fullmatch(adapter.lora_target_modules, n)]
    # 7 per layer (q/k/v/o, gate/up/down); a Gated DeltaNet layer (MiniCPM-V's Qwen3.5 text model): 3 + 3.
    layer_types = getattr(model.config.get_text_config(), "layer_types", None) or []
    text_layers = model.config.get_text_config().num_hidden_layers
    assert len(matched) == 7 * text_layers - layer_types.count("linear_attention")
    assert all(n.startswith(adapter.language_model_prefix + ".") for n in matched)
    assert all(isinstance(model.get_submodule(n), torch.nn.Linear) for n in matched)


def test_chat_template_is_read_from_a_processor_legacy_file(family, tmp_path):
    model_type, path, _, adapter = family
    legacy = tmp_path / model_type
    shutil.copytree(path, legacy)
    for name in ("chat_template.jinja", "chat_template.json"):  # SmolVLM v1 keeps only the legacy file
        if (legacy / name).exists():
            os.remove(legacy / name)
    processor_config = legacy / "processor_config.json"  # Idefics2 keeps it there
    if processor_config.exists():
        settings = json.loads(processor_config.read_text())
        processor_config.write_text(json.dumps({k: v for k, v in settings.items() if k != "chat_template"}))
    with pytest.raises(ValueError, match="chat template"):
        adapter_class(model_type).from_pretrained(str(legacy))
    with open(legacy / "chat_template.json", "w") as f:
        json.dump({"chat_template": adapter.tokenizer.chat_template}, f)
    reloaded = adapter_class(model_type).from_pretrained(str(legacy))
    image = adapter.prepare_image(_odd_images()[1])
    assert reloaded.describer_prompt(BOX, image) == adapter.describer_prompt(BOX, image)


def test_a_tokenizer_without_the_family_tokens_is_refused(family):
    _, _, _, adapter = family
    renamed = type("Renamed", (type(adapter),), {"image_end": "<no_such_token>"})
    with pytest.raises(ValueError, match="no_such_token"):
        renamed(adapter.tokenizer, adapter.image_processor, adapter.config)


# ---------------------------------------------------------------- LLaVA-1.5 / LLaVA-NeXT
# Stand-ins for the llava-hf templates' turn ends (the releases' own files were not at hand): what each writes after
# an assistant answer decides the token that ends a turn.
LLAVA_TURN_TEMPLATES = {
    # LLaVA-1.5 / the Vicuna NeXTs: nothing after the answer; the model ends it with its EOS.
    "</s>": "{% for m in messages %}{{ m['role'].upper() + ': ' }}{% for c in m['content'] %}"
            "{% if c['type'] == 'text' %}{{ c['text'] + ' ' }}{% endif %}{% endfor %}{% endfor %}",
    # llava-v1.6-34b-hf: ChatML.
    "<|im_end|>": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}"
                  "{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}",
    # llama3-llava-next-8b-hf: Llama 3 headers; its tokenizer's EOS (<|end_of_text|> here) is not the turn's end.
    "<|eot_id|>": "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
                  "{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] | trim }}{% endif %}"
                  "{% endfor %}<|eot_id|>{% endfor %}",
}


def _llava_parts(tiny_checkpoint, model_type):
    """(folder, tokenizer, image processor, config) of the tiny ``model_type``; a fresh tokenizer and config that
    a test may change."""
    from transformers import AutoConfig

    path = tiny_checkpoint(model_type)
    adapter = adapter_class(model_type).from_pretrained(path)
    return path, adapter.tokenizer, adapter.image_processor, AutoConfig.from_pretrained(path)


@pytest.mark.parametrize("end", list(LLAVA_TURN_TEMPLATES))
@pytest.mark.parametrize("model_type", ["llava", "llava_next"])
def test_llava_turn_end_is_read_from_the_checkpoints_template(tiny_checkpoint, model_type, end):
    _, tokenizer, image_processor, config = _llava_parts(tiny_checkpoint, model_type)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<|start_header_id|>",
                                                                "<|end_header_id|>", "<|eot_id|>"]})
    tokenizer.add_special_tokens({"eos_token": "</s>" if end == "</s>" else "<|end_of_text|>"})
    tokenizer.chat_template = LLAVA_TURN_TEMPLATES[end]
    adapter = adapter_class(model_type).from_parts(tokenizer, image_processor, config)
    assert adapter.end_token == end
    assert adapter.end_token_ids[0] == tokenizer.convert_tokens_to_ids(end)
    assert tokenizer.eos_token_id in adapter.end_token_ids  # generation also stops on the EOS where it differs
    image = adapter.prepare_image(_odd_images()[0])
    assert adapter.locator_target(BOX, image, "the dog") == "[100, 200, 500, 600]" + end


def test_a_tokenizer_without_a_pad_token_pads_with_the_turns_end(tiny_checkpoint):
    """Some releases define no pad token; pads are masked, so the turn's end token stands in (never a missing id)."""
    _, tokenizer, image_processor, config = _llava_parts(tiny_checkpoint, "llava")
    tokenizer.pad_token = None
    adapter = adapter_class("llava").from_parts(tokenizer, image_processor, config)
    assert tokenizer.pad_token_id is None and adapter.pad_token_id == adapter.end_token_ids[0]
    image = adapter.prepare_image(_odd_images()[0])
    prompts = [adapter.locator_prompt("the dog", image), adapter.locator_prompt("the dog on the left", image)]
    input_ids = adapter.build_batch(prompts, [image, image]).inputs["input_ids"]
    assert input_ids[0, 0] == adapter.end_token_ids[0]  # the shorter prompt, padded on the left


def test_the_turn_end_is_the_first_whole_special_token_after_the_answer(tiny_checkpoint):
    """Phi-3's form: ``<|end|>`` closes the turn and ``<|endoftext|>`` follows it. Of the special tokens the template
    writes after an answer the first closes the turn, and of those starting there the longest (the whole token, not a
    special token that is its prefix)."""
    from sc_tune.adapters.chat_template import turn_end_token

    _, tokenizer, _, _ = _llava_parts(tiny_checkpoint, "llava")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|end", "<|end|>", "<|endoftext|>"]})
    tokenizer.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>\n{% for c in m['content'] %}"
                               "{{ c['text'] }}{% endfor %}<|end|>\n<|endoftext|>{% endfor %}")
    assert turn_end_token(tokenizer) == "<|end|>"


@pytest.mark.parametrize("template_writes_bos", [False, True])
def test_llava_prompts_start_with_one_bos_as_the_processor_tokenises_them(tiny_checkpoint, template_writes_bos):
    """The llava-hf templates write no BOS and their Llama / Mistral tokenizers prepend <s>: the processor's
    apply_chat_template adds the tokenizer's special tokens unless the rendered prompt starts with the BOS. The model
    always saw <s> first; a template that writes it (Mistral's own) must not get a second."""
    _, tokenizer, image_processor, config = _llava_parts(tiny_checkpoint, "llava_next")
    if template_writes_bos:
        tokenizer.chat_template = "{{ bos_token }}" + tokenizer.chat_template
    adapter = adapter_class("llava_next").from_parts(tokenizer, image_processor, config)
    image = adapter.prepare_image(_odd_images()[0])
    for prompt in (adapter.describer_prompt(BOX, image), adapter.locator_prompt("the dog", image)):
        ids = adapter.build_batch([prompt], [image]).inputs["input_ids"][0].tolist()
        assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1, ids[:4]


def test_llava_refuses_a_template_without_an_answer_or_an_end(tiny_checkpoint):
    _, tokenizer, image_processor, config = _llava_parts(tiny_checkpoint, "llava")
    tokenizer.chat_template = "{% for m in messages %}{% if m['role'] == 'user' %}{{ 'USER: ' }}{% endif %}{% endfor %}"
    with pytest.raises(ValueError, match="does not render an assistant answer"):
        adapter_class("llava").from_parts(tokenizer, image_processor, config)
    tokenizer.chat_template = LLAVA_TURN_TEMPLATES["</s>"]
    tokenizer.eos_token = None
    with pytest.raises(ValueError, match="no eos_token"):
        adapter_class("llava").from_parts(tokenizer, image_processor, config)


@pytest.mark.parametrize("strategy, features", [("default", 4), ("full", 5)])
def test_llava_counts_the_cls_feature_unless_the_strategy_drops_it(tiny_checkpoint, strategy, features):
    """The tiny tower sees 2 x 2 patches of 14 px plus CLIP's CLS feature; "default" (the releases') drops the CLS,
    "full" keeps it: the placeholders must match what the model then computes (it raises otherwise)."""
    from transformers import AutoModelForImageTextToText

    path, tokenizer, image_processor, config = _llava_parts(tiny_checkpoint, "llava")
    config.vision_feature_select_strategy = strategy
    adapter = adapter_class("llava").from_parts(tokenizer, image_processor, config)
    image = adapter.prepare_image(_odd_images()[1])
    assert image.num_tokens == features
    model = AutoModelForImageTextToText.from_pretrained(path, config=config).eval()
    batch = adapter.build_batch([adapter.describer_prompt(BOX, image)], [image])
    with torch.no_grad():
        model(**batch.inputs)


def test_llava_counts_the_training_boxes_its_center_crop_cuts_away(tiny_checkpoint, tmp_path):
    """LLaVA-1.5's CLIP processor center-crops: a 2:1 photo shows the model its middle half only, while boxes stay
    normalised to the whole photo. A run counts the boxes mostly outside (finetune.py warns); none for a square
    photo, for a processor that pads to a square first, or for LLaVA-NeXT (its base view is the whole photo)."""
    from sc_tune.data import boxes_mostly_unseen

    _, tokenizer, image_processor, config = _llava_parts(tiny_checkpoint, "llava")
    adapter = adapter_class("llava").from_parts(tokenizer, image_processor, config)
    assert adapter.visible_region(200, 100) == pytest.approx((0.25, 0.0, 0.75, 1.0))
    assert adapter.visible_region(50, 50) is None
    Image.new("RGB", (200, 100)).save(tmp_path / "wide.png")
    Image.new("RGB", (100, 100)).save(tmp_path / "square.png")
    Image.new("RGB", (100, 200)).save(tmp_path / "tall.png")  # the crop keeps its middle rows: y 0.25..0.75
    assert adapter.visible_region(100, 200) == pytest.approx((0.0, 0.25, 1.0, 0.75))
    left, middle, half_in = [0.0, 0.1, 0.2, 0.9], [0.4, 0.1, 0.6, 0.9], [0.2, 0.1, 0.3, 0.9]
    top, mostly_in = [0.1, 0.0, 0.9, 0.2], [0.1, 0.2, 0.9, 0.4]  # 0 and 3/4 of their height inside
    records = [{"image": "wide.png", "bbox": b} for b in (left, middle, half_in)] + [
        {"image": "square.png", "bbox": left}] + [{"image": "tall.png", "bbox": b} for b in (top, mostly_in)]
    assert boxes_mostly_unseen(records, str(tmp_path), adapter.visible_region) == 2
    image_processor.do_pad = True  # LlavaImageProcessor's pad to a square (the original LLaVA-1.5's "pad")
    assert boxes_mostly_unseen(records, str(tmp_path), adapter.visible_region) == 0
    _, tokenizer, image_processor, config = _llava_parts(tiny_checkpoint, "llava_next")
    next_adapter = adapter_class("llava_next").from_parts(tokenizer, image_processor, config)
    assert boxes_mostly_unseen(records, str(tmp_path), next_adapter.visible_region) == 0


class _StopAfterTheDataset(Exception):
    pass


@pytest.mark.parametrize("model_type, warned", [("llava", True), ("llava_next", False)])
def test_finetune_warns_of_training_boxes_the_crop_cuts_away_with_their_count(tiny_checkpoint, tmp_path, caplog,
                                                                               monkeypatch, model_type, warned):
    """finetune.py's own run, up to its dataset (stopped at the records check that follows the warning): LLaVA-1.5's
    center crop of a 2:1 photo cuts away one of the three boxes on it, logged with the count of all four records;
    LLaVA-NeXT sees the whole photo, and nothing is logged."""
    import finetune

    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (200, 100)).save(images / "wide.png")
    Image.new("RGB", (100, 100)).save(images / "square.png")
    boxes = ([0.0, 0.1, 0.2, 0.9], [0.4, 0.1, 0.6, 0.9], [0.2, 0.1, 0.3, 0.9])
    records = [{"image": "wide.png", "bbox": b} for b in boxes] + [{"image": "square.png", "bbox": boxes[0]}]
    (tmp_path / "records.json").write_text(json.dumps(records), encoding="utf-8")

    def stop(dataset):
        raise _StopAfterTheDataset(len(dataset))

    monkeypatch.setattr(finetune, "check_same_records_on_every_rank", stop)
    with caplog.at_level("WARNING", logger="sc_tune"), pytest.raises(_StopAfterTheDataset):
        finetune.main(["--model_name_or_path", tiny_checkpoint(model_type), "--image_folder", str(images),
                       "--data_path", str(tmp_path / "records.json"), "--output_dir", str(tmp_path / "out"),
                       "--use_cpu", "True", "--per_device_train_batch_size", "2", "--report_to", "none"])
    lines = [r.getMessage() for r in caplog.records if "lie mostly outside" in r.getMessage()]
    assert len(lines) == warned, caplog.text
    if warned:
        assert re.fullmatch(r"1 of 4 training boxes lie mostly outside the part of their image the model sees \(its "
                            r"image processor crops the long side: CLIPImageProcessor\w*\); boxes stay normalised to "
                            r"the whole image", lines[0]), lines[0]


@pytest.mark.parametrize("model_type", ["llava_next", "llava_onevision", "granite4_vision"])
@pytest.mark.parametrize("tower, strategy", [("clip_vision_model", "full"), ("siglip_vision_model", "default")])
def test_anyres_llava_refuses_a_strategy_that_leaves_no_square_patch_grid(tiny_checkpoint, model_type, tower, strategy):
    """LlavaNextModel and LlavaOnevisionModel lay each view's features out as a square grid: CLIP's CLS must be
    dropped ("default") and SigLIP has none to drop ("full"). Otherwise the first forward fails inside the model
    (NeXT: a reshape error; OneVision: "The number of patches is not consistent with the image size"); the adapter
    refuses the config by its fields, at load."""
    _, tokenizer, image_processor, config = _llava_parts(tiny_checkpoint, model_type)
    config.vision_config.model_type, config.vision_feature_select_strategy = tower, strategy
    with pytest.raises(ValueError, match=f"vision_feature_select_strategy '{strategy}' with vision_config.model_type"):
        adapter_class(model_type).from_parts(tokenizer, image_processor, config)


@pytest.mark.parametrize("tower, strategy, features", [("siglip_vision_model", "full", 14),
                                                        ("clip_vision_model", "default", 14)])
def test_llava_onevision_counts_the_two_strategies_its_model_arranges(tiny_checkpoint, tower, strategy, features):
    """The two combinations the model lays out (SigLIP + "full", the releases'; CLIP + "default") are served, and
    the placeholders match what the model computes: the base view's 2 x 2 patches, the unpadded tiles and the row
    newlines of a 61 x 37 photo, CLIP's CLS dropped (the model raises on a count one short or one over)."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    path, tokenizer, image_processor, config = _llava_parts(tiny_checkpoint, "llava_onevision")
    config.vision_config = AutoConfig.for_model(**dict(config.vision_config.to_dict(), model_type=tower))
    config.vision_feature_select_strategy = strategy
    adapter = adapter_class("llava_onevision").from_parts(tokenizer, image_processor, config)
    image = adapter.prepare_image(Image.new("RGB", (61, 37), "red"))
    assert image.num_tokens == features
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(config).eval()
    batch = adapter.build_batch([adapter.describer_prompt(BOX, image)], [image])
    with torch.no_grad():
        model(**batch.inputs)


@pytest.mark.parametrize("model_type", ["llava", "llava_next", "llava_onevision", "granite4_vision"])
def test_llava_refuses_a_vision_tower_it_cannot_count_naming_the_field(tiny_checkpoint, model_type):
    _, tokenizer, image_processor, config = _llava_parts(tiny_checkpoint, model_type)
    config.vision_config.model_type = "pixtral"
    with pytest.raises(ValueError, match=r"config\.json: vision_config\.model_type 'pixtral'"):
        adapter_class(model_type).from_parts(tokenizer, image_processor, config)


# ---------------------------------------------------------------- Mistral 3
def test_mistral3_lays_out_one_img_per_merged_patch_a_break_per_row_and_an_end(tiny_checkpoint):
    """A tall 37 x 91 photo: its long side to 84 px (the tiny longest_edge), the short one up to a whole merged patch
    (28 px: 14 px patches merged 2 x 2): 3 rows of 2 [IMG], an [IMG_BREAK] after each row but the last, which ends
    with [IMG_END] (PixtralProcessor.replace_image_token). image_sizes is (height, width), as the tower crops by it."""
    adapter = adapter_class("mistral3").from_pretrained(tiny_checkpoint("mistral3"))
    image = adapter.prepare_image(_odd_images()[1])
    assert image.placeholder == "[IMG][IMG][IMG_BREAK]" * 2 + "[IMG][IMG][IMG_END]"
    assert image.num_tokens == 6 and image.frame == (56, 84)
    assert image.tensors["image_sizes"].tolist() == [[84, 56]]
    assert image.tensors["pixel_values"].shape == (1, 3, 84, 56)


def test_mistral3_prompts_start_with_the_one_bos_the_template_writes_and_its_dated_system_message(tiny_checkpoint):
    """The release's template writes <s> itself and its tokenizer prepends <s> too: the processor's
    apply_chat_template then adds no special tokens, and neither may the adapter (the model saw one <s>). With no
    system message given, the template writes its default one, dated today (strftime_now); the adapter gives it that
    message dated PROMPT_DATE, so that the prompts are the same every day (a run across midnight, a resume or an
    evaluation resumed on another day): rendered "today" and "on another day", they are equal, and but for the date
    they are the processor's."""
    import datetime
    import types

    from transformers.utils import chat_template_utils

    from sc_tune.adapters import mistral3

    prompts = []
    for day in (datetime.date(2031, 1, 1), datetime.date(2031, 1, 2)):  # "another day": every clock says so
        class Clock(datetime.datetime):
            @classmethod
            def now(cls, tz=None):
                return datetime.datetime.combine(day, datetime.time(12))

        class Calendar(datetime.date):
            @classmethod
            def today(cls):
                return day

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(chat_template_utils, "datetime", Clock)  # the template's strftime_now
            patch.setattr(mistral3, "datetime", types.SimpleNamespace(date=Calendar))
            adapter = adapter_class("mistral3").from_pretrained(tiny_checkpoint("mistral3"))
            image = adapter.prepare_image(_odd_images()[0])
            prompts.append(adapter.describer_prompt(BOX, image))
            processor_rendering = adapter.tokenizer.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "q"}]}], tokenize=False,
                add_generation_prompt=True)
            assert f"The current date is {day:%Y-%m-%d}." in processor_rendering
            assert processor_rendering.replace(f"{day:%Y-%m-%d}", mistral3.PROMPT_DATE) == adapter.render("q")
    assert prompts[0] == prompts[1] and f"The current date is {mistral3.PROMPT_DATE}." in prompts[0]

    adapter = adapter_class("mistral3").from_pretrained(tiny_checkpoint("mistral3"))
    tokenizer = adapter.tokenizer
    assert tokenizer("x")["input_ids"][0] == tokenizer.bos_token_id  # the tokenizer prepends it
    image = adapter.prepare_image(_odd_images()[0])
    for prompt in (adapter.describer_prompt(BOX, image), adapter.locator_prompt("the dog", image)):
        ids = adapter.build_batch([prompt], [image]).inputs["input_ids"][0].tolist()
        assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1, ids[:4]
        assert f"The current date is {mistral3.PROMPT_DATE}." in prompt
        assert prompt.count("[SYSTEM_PROMPT]") == 1 and "[/SYSTEM_PROMPT][INST][IMG]" in prompt


def test_mistral3_keeps_todays_date_with_a_warning_where_a_given_system_message_renders_otherwise(tiny_checkpoint,
                                                                                                    caplog):
    """The fixed date goes in as a given system message; a template that renders a given one otherwise than its
    default would change more than the date: the adapter then keeps the template's own rendering and says so."""
    adapter = adapter_class("mistral3").from_pretrained(tiny_checkpoint("mistral3"))
    assert adapter.system_message is not None
    adapter.tokenizer.chat_template = adapter.tokenizer.chat_template.replace(
        "{%- set system_message = messages[0]['content'][0]['text'] %}",
        "{%- set system_message = 'Given: ' + messages[0]['content'][0]['text'] %}")
    with caplog.at_level("WARNING", logger="sc_tune.adapters.mistral3"):
        assert adapter._fixed_date_system_message() is None
    assert "renders a given system message otherwise than its default" in caplog.text
    # A template with no default system turn, or an undated one, leaves the template's rendering as it is, unwarned.
    caplog.clear()
    template = adapter_class("mistral3").from_pretrained(tiny_checkpoint("mistral3")).tokenizer.chat_template
    for changed in (template.replace("{{- '[SYSTEM_PROMPT]' + system_message + '[/SYSTEM_PROMPT]' }}", ""),
                    template.replace('" + today + "', "2024-01-01")):
        assert changed != template
        adapter.tokenizer.chat_template = changed
        with caplog.at_level("WARNING"):
            assert adapter._fixed_date_system_message() is None
    assert not caplog.records


def test_mistral3_pins_its_templates_date_so_loading_it_warns_of_none(tiny_checkpoint, caplog):
    with caplog.at_level("WARNING"):
        adapter = adapter_class("mistral3").from_pretrained(tiny_checkpoint("mistral3"))
    assert "strftime_now" in adapter.tokenizer.chat_template and adapter.system_message is not None
    assert "writes today's date" not in caplog.text


def test_a_tokenizer_without_the_familys_special_tokens_is_refused_by_name(tiny_checkpoint):
    """Without the token, the marker or placeholder would be split into ordinary pieces and the prompt would lose its
    image without an error. A marker that is plain text (Aya Vision's, Ovis2's: the processor replaces it before
    tokenising) is not looked up."""
    _, tokenizer, image_processor, config = _llava_parts(tiny_checkpoint, "gemma3")

    class OtherMarker(adapter_class("gemma3")):
        image_marker = "<start_of_picture>"

    class OtherPlaceholder(adapter_class("gemma3")):
        image_token = "<picture_soft_token>"

    class PlainTextMarker(OtherMarker):
        image_marker_is_token = False

    for family, missing in ((OtherMarker, "<start_of_picture>"), (OtherPlaceholder, "<picture_soft_token>")):
        with pytest.raises(ValueError, match=re.escape(f"{family.__name__}: the tokenizer lacks the family's special "
                                                       f"tokens ['{missing}']")):
            family.from_parts(tokenizer, image_processor, config)
    adapter = PlainTextMarker.from_parts(tokenizer, image_processor, config)
    assert adapter.image_token_id == tokenizer.convert_tokens_to_ids("<image_soft_token>")


def test_a_template_that_dates_its_prompts_is_named_unless_the_adapter_pins_the_date(tiny_checkpoint, caplog):
    """A checkpoint whose template writes today's date (strftime_now) gets prompts that change at midnight: the
    adapter says so, unless it renders the date fixed (Mistral 3)."""
    _, tokenizer, image_processor, config = _llava_parts(tiny_checkpoint, "llava")
    with caplog.at_level("WARNING", logger="sc_tune.adapters.chat_template"):
        caplog.clear()  # (what building the parts logged)
        adapter_class("llava").from_parts(tokenizer, image_processor, config)
        assert "today's date" not in caplog.text  # the released template writes none
        tokenizer.chat_template = "{{- strftime_now('%Y-%m-%d') }}" + tokenizer.chat_template
        adapter_class("llava").from_parts(tokenizer, image_processor, config)
        assert "LlavaAdapter: the chat template writes today's date (strftime_now)" in caplog.text
        caplog.clear()
        adapter_class("mistral3").from_pretrained(tiny_checkpoint("mistral3"))
    assert "today's date" not in caplog.text


def test_the_pixtral_processor_builds_the_mistral3_adapters_inputs_without_torchvision(tiny_checkpoint, monkeypatch):
    """AutoProcessor cannot load Mistral 3 here (the family loop's processor test skips): processing_pixtral imports
    one function from the torchvision image processor module. That function is the PIL module's own
    (image_processing_pil_pixtral.get_resize_output_image_size, "adapted from" it), so with it standing in for the
    module, the family's own PixtralProcessor (the folder's processor_config.json settings) runs its own __call__
    on the adapter's rendered prompts: its [IMG] / [IMG_BREAK] / [IMG_END] rows, pixels and image_sizes must be the
    adapter's, for a wide and a tall photo."""
    import importlib
    import sys
    import types

    from transformers.models.pixtral import image_processing_pil_pixtral

    from tests.helpers import assert_the_familys_processor_builds_the_adapters_inputs

    stand_in = types.ModuleType("transformers.models.pixtral.image_processing_pixtral")
    stand_in.get_resize_output_image_size = image_processing_pil_pixtral.get_resize_output_image_size
    monkeypatch.setitem(sys.modules, stand_in.__name__, stand_in)
    monkeypatch.delitem(sys.modules, "transformers.models.pixtral.processing_pixtral", raising=False)
    processing = importlib.import_module("transformers.models.pixtral.processing_pixtral")
    monkeypatch.delitem(sys.modules, processing.__name__)  # the next import sees the real module again

    path = tiny_checkpoint("mistral3")
    adapter = adapter_class("mistral3").from_pretrained(path)
    with open(os.path.join(path, "processor_config.json")) as f:
        settings = {k: v for k, v in json.load(f).items() if k != "processor_class"}
    processor = processing.PixtralProcessor(image_processor=adapter.image_processor, tokenizer=adapter.tokenizer,
                                            **settings)
    assert_the_familys_processor_builds_the_adapters_inputs(path, adapter, processor)


# ---------------------------------------------------------------- Aya Vision
def test_aya_vision_lays_out_tiles_then_the_thumbnail_between_the_image_tokens(tiny_checkpoint):
    """A tall 37 x 91 photo: the 1 x 3 grid of 28 px tiles (closest to its aspect ratio within the tiny max_patches 3),
    then the thumbnail, 4 <|IMG_PATCH|> each (4 x 4 patches of 7 px, pixel-shuffled 2 x 2), each tile after its
    TILE_i, the thumbnail after TILE_GLOBAL, all between <|START_OF_IMG|> and <|END_OF_IMG|>
    (AyaVisionProcessor.replace_image_token); a photo of one tile has no thumbnail."""
    adapter = adapter_class("aya_vision").from_pretrained(tiny_checkpoint("aya_vision"))
    image = adapter.prepare_image(_odd_images()[1])
    patches = "<|IMG_PATCH|>" * 4
    assert image.placeholder == ("<|START_OF_IMG|>" + "".join(f"TILE_{i}{patches}" for i in (1, 2, 3))
                                 + f"TILE_GLOBAL{patches}<|END_OF_IMG|>")
    assert image.num_tokens == 16 and image.tensors["pixel_values"].shape == (4, 3, 28, 28)
    square = adapter.prepare_image(Image.new("RGB", (50, 50)))
    assert square.placeholder == f"<|START_OF_IMG|>TILE_GLOBAL{patches}<|END_OF_IMG|>" and square.num_tokens == 4


def test_the_aya_vision_processor_builds_the_adapters_inputs_on_wide_tall_and_square_photos(tiny_checkpoint):
    """transformers' own AyaVisionProcessor (AutoProcessor of the tiny folder, its processor_config.json) on the
    adapter's rendered prompts: the same input ids (its TILE_i / TILE_GLOBAL blocks, the <|IMG_PATCH|> count) and the
    same pixels (tiles and thumbnail, in its order), for photos of 1 x 1, 2 x 1, 3 x 1, 1 x 2 and 1 x 3 tile grids. The
    processor tiles whatever the image processor's own crop_to_patches says (its default is True): so does the
    adapter."""
    from transformers import AutoProcessor

    path = tiny_checkpoint("aya_vision")
    adapter = adapter_class("aya_vision").from_pretrained(path)
    processor = AutoProcessor.from_pretrained(path)
    assert type(processor).__name__ == "AyaVisionProcessor"
    adapter.image_processor.crop_to_patches = processor.image_processor.crop_to_patches = False
    tiles = {}
    for size in ((60, 60), (120, 61), (300, 20), (45, 100), (9, 200)):
        photo = two_colour_photo(size)
        image = adapter.prepare_image(photo)
        assert_processor_builds_the_same_inputs(adapter, processor, adapter.locator_prompt("the dog", image), image,
                                                photo, ["attention_mask", "input_ids", "pixel_values"])
        assert image.num_tokens == (processor._get_num_multimodal_tokens([size[::-1]]).num_image_tokens[0]
                                    - 3 - (image.tensors["pixel_values"].shape[0] - 1))
        tiles[size] = image.tensors["pixel_values"].shape[0]
    assert tiles == {(60, 60): 1, (120, 61): 3, (300, 20): 4, (45, 100): 3, (9, 200): 4}


def test_aya_vision_refuses_a_tile_size_or_strategy_the_model_cannot_take(tiny_checkpoint):
    from transformers import AutoConfig

    path = tiny_checkpoint("aya_vision")
    adapter = adapter_class("aya_vision").from_pretrained(path)
    config = AutoConfig.from_pretrained(path)
    config.vision_feature_select_strategy = "default"
    with pytest.raises(ValueError, match="vision_feature_select_strategy 'default'"):
        adapter_class("aya_vision").from_parts(adapter.tokenizer, adapter.image_processor, config)
    config = AutoConfig.from_pretrained(path)
    config.vision_config.image_size = 56
    with pytest.raises(ValueError, match="is not the vision tower's vision_config.image_size 56"):
        adapter_class("aya_vision").from_parts(adapter.tokenizer, adapter.image_processor, config)


# ---------------------------------------------------------------- Granite 4 Vision
@pytest.mark.parametrize("tower, strategy", [("siglip_vision_model", "full"), ("clip_vision_model", "default")])
def test_the_granite4_vision_processor_builds_the_adapters_inputs_on_square_wide_and_tall_photos(tiny_checkpoint, tower,
                                                                                                  strategy):
    """transformers' own Granite4VisionProcessor (the tiny folder's processor_config.json: patch size, strategy, CLS
    count, downsample rate) on the adapter's rendered prompts: the same input ids (one <image> per Q-Former feature of
    the base view, the unpadded tiles and their row newlines), pixels and image sizes for square, wide and tall photos
    of 1 x 1, 1 x 2, 2 x 1 and 2 x 2 tile grids; with the releases' SigLIP + "full" and with a CLIP tower whose CLS
    "default" drops before the projectors. The model takes the CLIP batch (it raises on a wrong count)."""
    from transformers import AutoConfig, AutoModelForImageTextToText, Granite4VisionProcessor

    path, tokenizer, image_processor, config = _llava_parts(tiny_checkpoint, "granite4_vision")
    config.vision_config = AutoConfig.for_model(**dict(config.vision_config.to_dict(), model_type=tower))
    config.vision_feature_select_strategy = strategy
    adapter = adapter_class("granite4_vision").from_parts(tokenizer, image_processor, config)
    settings = json.load(open(os.path.join(path, "processor_config.json")))
    settings.update(vision_feature_select_strategy=strategy, num_additional_image_tokens=int(tower == "clip_vision_model"))
    settings.pop("processor_class")
    processor = Granite4VisionProcessor(image_processor=image_processor, tokenizer=tokenizer, **settings)
    counts, photos = {}, []
    for size in ((50, 50), (120, 45), (45, 120), (9, 200), (70, 66)):
        photo = two_colour_photo(size)
        image = adapter.prepare_image(photo)
        assert_processor_builds_the_same_inputs(adapter, processor, adapter.locator_prompt("the dog", image), image,
                                                photo, ["attention_mask", "image_sizes", "input_ids", "pixel_values"])
        assert image.num_tokens == processor._get_num_multimodal_tokens([size[::-1]]).num_image_tokens[0]
        counts[size] = (image.tensors["pixel_values"].shape[1] - 1, image.num_tokens)
        photos.append(image)
    # (tiles besides the base view, <image> tokens): 2 x 2 Q-Former features per view, the tiles' grid unpadded to the
    # photo's aspect ratio (as the processor rounds it), a newline per row; a 50 px square takes the 2 x 2 grid.
    assert counts == {(50, 50): (4, 24), (120, 45): (2, 14), (45, 120): (2, 16), (9, 200): (2, 8), (70, 66): (4, 24)}
    if tower == "clip_vision_model":
        torch.manual_seed(0)
        model = AutoModelForImageTextToText.from_config(config).eval()
        batch = adapter.build_batch([adapter.describer_prompt(BOX, im) for im in photos[:2]], photos[:2])
        with torch.no_grad():
            model(**batch.inputs)


@pytest.mark.parametrize("rate, match", [(None, "downsample_rate None"), ("1/4", "downsample_rate '1/4'"),
                                         ("3/6", "downsample_rate '3/6'"),
                                         ("0.5", "downsample_rate '0.5': Granite 4 Vision's projectors need a fraction")])
def test_granite4_vision_refuses_a_downsample_rate_its_projectors_cannot_lay_out(tiny_checkpoint, rate, match):
    """The spatial-offset projectors keep one patch of each 2 x 2 (a rate of 1/2) and the windows must tile the
    view's 4 patches a side (a 6-patch window does not): refused by the config.json field at load, where the model
    would fail inside its first forward."""
    _, tokenizer, image_processor, config = _llava_parts(tiny_checkpoint, "granite4_vision")
    config.downsample_rate = rate
    with pytest.raises(ValueError, match=match):
        adapter_class("granite4_vision").from_parts(tokenizer, image_processor, config)


# ---------------------------------------------------------------- Llama 3.2 Vision (mllama)
MLLAMA_KEYS = ["aspect_ratio_ids", "aspect_ratio_mask", "attention_mask", "cross_attention_mask", "input_ids",
               "pixel_values"]


def test_the_mllama_processor_builds_the_adapters_inputs_on_square_wide_and_tall_photos(tiny_checkpoint):
    """transformers' own MllamaProcessor (AutoProcessor of the tiny folder) on the adapter's rendered prompts: the same
    input ids (one <|image|>, the template's BOS and no second), pixels of the padded tiles, aspect-ratio ids and mask,
    and cross-attention mask (the image's tiles seen from the <|image|> column on) for photos of 2 x 2, 3 x 1, 1 x 3,
    1 x 4 and 1 x 1 tile canvases (columns x rows), one at a time and as one left-padded batch (the mask follows each
    row's padding)."""
    from transformers import AutoProcessor, MllamaProcessor

    path = tiny_checkpoint("mllama")
    adapter = adapter_class("mllama").from_pretrained(path)
    processor = AutoProcessor.from_pretrained(path)
    assert type(processor) is MllamaProcessor
    photos, images, prompts, canvases = [], [], [], {}
    for size in ((50, 50), (120, 45), (45, 120), (9, 200), (20, 20)):
        photo = two_colour_photo(size)
        image = adapter.prepare_image(photo)
        prompt = adapter.locator_prompt("the dog", image)
        assert_processor_builds_the_same_inputs(adapter, processor, prompt, image, photo, MLLAMA_KEYS,
                                                add_special_tokens=False)
        canvases[size] = (image.frame, int(image.tensors["aspect_ratio_mask"].sum()))
        photos.append(photo), images.append(image), prompts.append(prompt)
    assert canvases == {(50, 50): ((56, 56), 4), (120, 45): ((84, 28), 3), (45, 120): ((28, 84), 3),
                        (9, 200): ((28, 112), 4), (20, 20): ((28, 28), 1)}
    prompts[1] = adapter.describer_prompt(BOX, images[1])  # rows of other lengths: left padding
    ours = adapter.build_batch(prompts, images).inputs
    theirs = processor(text=prompts, images=[[photo] for photo in photos], padding=True, add_special_tokens=False,
                       return_tensors="pt")
    assert sorted(ours) == sorted(theirs) and not ours["attention_mask"].all()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key


def test_mllama_teacher_forcing_reads_the_image_as_generate_did(tiny_checkpoint):
    """The scoring pass over prompt + completion (append_completion) gives every completion token the logits generate
    gave it: the completion's columns see the image's tiles (generate repeats the cross-attention mask's last column
    per new token), on two left-padded rows of other tile counts."""
    model, adapter = load_model_and_adapter(tiny_checkpoint("mllama"))
    model.eval()
    images = [adapter.prepare_image(two_colour_photo(size)) for size in ((50, 50), (120, 45))]
    batch = adapter.build_batch([adapter.describer_prompt(BOX, images[0]), adapter.locator_prompt("a", images[1])],
                                images)
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(**batch.inputs, max_new_tokens=5, min_new_tokens=5, do_sample=True, top_k=50,
                             pad_token_id=adapter.pad_token_id, return_dict_in_generate=True, output_logits=True)
        width = batch.input_ids.shape[1]
        completion_BT = out.sequences[:, width:]
        inputs = adapter.append_completion(batch, completion_BT, torch.ones_like(completion_BT))
        logits = model(**inputs).logits[:, width - 1 : -1]
    assert torch.equal(inputs["cross_attention_mask"][:, width:], batch.inputs["cross_attention_mask"][:, -1:].expand(
        -1, completion_BT.shape[1], -1, -1))
    torch.testing.assert_close(logits, torch.stack(out.logits, dim=1), rtol=0, atol=1e-5)


def test_mllama_prompt_and_vision_caches_are_refused_by_name(tiny_checkpoint):
    """Its cross-attention layers cache the vision states, not prompt columns: the adapter resumes from no scoring
    cache, moves no cached columns and names no vision trunk (those passes run in full), and generate refuses to keep
    or resume from a prompt cache on it."""
    from transformers.cache_utils import DynamicCache

    from sc_tune.rollout import GenerationSettings, generate
    from sc_tune.vision_cache import VisionCache

    model, adapter = load_model_and_adapter(tiny_checkpoint("mllama"))
    assert not adapter.resumes_from_scoring_cache(model, 40, 50)
    assert not adapter.moves_cached_prompt_columns(model, 50)
    assert adapter.vision_trunk(model) is None and VisionCache.for_model(adapter, [model]) is None
    image = adapter.prepare_image(two_colour_photo((50, 50)))
    batch = adapter.build_batch([adapter.describer_prompt(BOX, image)], [image])
    settings = GenerationSettings(max_new_tokens=2)
    for cached in ({"keep_prompt_rows": (0, 1)}, {"prompt_cache": DynamicCache()}):
        with pytest.raises(ValueError, match=r"MllamaForConditionalGeneration's cross-attention layers \[1\]"):
            generate(model, adapter, batch, settings, True, **cached)


def test_mllama_refuses_a_tile_the_tower_does_not_take(tiny_checkpoint):
    from transformers import AutoConfig

    path = tiny_checkpoint("mllama")
    adapter = adapter_class("mllama").from_pretrained(path)
    for field, value in (("image_size", 56), ("max_num_tiles", 2)):
        config = AutoConfig.from_pretrained(path)
        setattr(config.vision_config, field, value)
        with pytest.raises(ValueError, match=f"are not the vision tower's .*{value}"):
            adapter_class("mllama").from_parts(adapter.tokenizer, adapter.image_processor, config)


# ---------------------------------------------------------------- Idefics2
IDEFICS2_KEYS = ["attention_mask", "input_ids", "pixel_attention_mask", "pixel_values"]


@pytest.mark.parametrize("splitting", [True, False])
def test_the_idefics2_processor_builds_the_adapters_inputs_on_square_wide_and_tall_photos(tiny_checkpoint, splitting):
    """transformers' own Idefics2Processor (AutoProcessor of the tiny folder) on the adapter's rendered prompts: the
    same input ids (the <s> its tokenizer prepends, <fake_token_around_image> around each crop's 3 latents, 5 crops with
    image splitting and 1 without, the space it puts between the image and the text glued to it), pixels and pixel
    attention mask (odd-sized crops padded, partial patches masked), for square, wide and tall photos, one at a time and
    as one left-padded batch (crops of other sizes padded to the batch's largest)."""
    from transformers import AutoProcessor, Idefics2Processor

    path = tiny_checkpoint("idefics2")
    processor, adapter = AutoProcessor.from_pretrained(path), adapter_class("idefics2").from_pretrained(path)
    assert type(processor) is Idefics2Processor
    processor.image_processor.do_image_splitting = adapter.image_processor.do_image_splitting = splitting
    photos, images, prompts = [], [], []
    for size in ((50, 50), (120, 45), (45, 120)):
        photo = two_colour_photo(size)
        image = adapter.prepare_image(photo)
        prompt = adapter.locator_prompt("the dog", image)
        assert_processor_builds_the_same_inputs(adapter, processor, prompt, image, photo, IDEFICS2_KEYS)
        assert image.tensors["pixel_values"].shape[1] == (5 if splitting else 1)
        photos.append(photo), images.append(image), prompts.append(prompt)
    prompts[1] = adapter.describer_prompt(BOX, images[1])  # rows of other lengths: left padding
    batch = adapter.build_batch(prompts, images).inputs
    theirs = processor(text=prompts, images=[[photo] for photo in photos], padding=True, return_tensors="pt")
    assert sorted(batch) == sorted(theirs) and not batch["attention_mask"].all()
    assert not batch["pixel_attention_mask"].all()  # crops padded to the batch's largest
    for key in batch:
        assert torch.equal(batch[key], theirs[key]), key


def test_idefics2_prompt_and_vision_caches_are_refused_by_name(tiny_checkpoint):
    """The scoring-cache resume only while the scored sequence fits the Mistral window (4,096 here, as the release's);
    no moved prompt columns (window layers), no vision trunk (a crop's tower rows follow the batch's padding): those
    passes run in full."""
    from sc_tune.vision_cache import VisionCache

    model, adapter = load_model_and_adapter(tiny_checkpoint("idefics2"))
    assert adapter.resumes_from_scoring_cache(model, 40, 50)
    assert not adapter.resumes_from_scoring_cache(model, 4000, 4096)
    assert not adapter.moves_cached_prompt_columns(model, 50)
    assert adapter.vision_trunk(model) is None and VisionCache.for_model(adapter, [model]) is None


@pytest.mark.parametrize("model_type, end_token, eos_token, after_turn", [
    ("aya_vision", "<|END_OF_TURN_TOKEN|>", "<|END_OF_TURN_TOKEN|>", ""),
    # the template's newline between turns: never trained on
    ("granite4_vision", "<|end_of_text|>", "<|end_of_text|>", "\n"),
    ("mllama", "<|eot_id|>", "<|eot_id|>", ""),
    # "Assistant: " before a written answer: the target writes that space itself on the tiny byte-level tokenizers
    # (chat_template.answer_opening); </s> also stops (the releases' generation_config.json)
    ("idefics2", "<end_of_utterance>", "</s>", "\n"),
    ("smolvlm", "<end_of_utterance>", "<end_of_utterance>", "\n"),
    ("idefics3", "<end_of_utterance>", "<end_of_utterance>", "\n"),
])
def test_the_locator_trains_on_the_answer_turn_the_template_writes(tiny_checkpoint, model_type, end_token, eos_token,
                                                                   after_turn):
    """The locator's target after its prompt is the assistant turn the checkpoint's template renders for that answer:
    what the template writes before an answer, the box, then the turn's end (read from the template), where
    generation stops, as on the tokenizer's EOS. Granite's prompt starts with the template's first tag, no BOS (its
    tokenizer prepends none). In tokens too: the target's ids are those the answer has in the rendered turn."""
    adapter = adapter_class(model_type).from_pretrained(tiny_checkpoint(model_type))
    image = adapter.prepare_image(_odd_images()[0])
    prompt, target = adapter.locator_prompt("the dog", image), adapter.locator_target(BOX, image, "the dog")
    user_text = "Locate the dog. Answer with its box as [x1, y1, x2, y2], integers from 0 to 1000."
    turns = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": user_text}]},
             {"role": "assistant", "content": [{"type": "text", "text": "[100, 200, 500, 600]"}]}]
    rendered = adapter.tokenizer.apply_chat_template(turns, tokenize=False)
    assert rendered == prompt + target + after_turn
    in_place, before = (adapter.tokenizer(t, add_special_tokens=False)["input_ids"] for t in (prompt + target, prompt))
    assert in_place[:len(before)] == before and in_place[len(before):] == adapter.encode_target(target)
    assert adapter.end_token == end_token and adapter.tokenizer.eos_token == eos_token
    assert adapter.end_token_ids == list(dict.fromkeys(adapter.tokenizer.convert_tokens_to_ids([end_token, eos_token])))


@pytest.mark.parametrize("pre_tokenizer, opening", [("byte_level", " "), ("metaspace", "")])
def test_the_answer_opening_is_written_only_where_the_tokenizer_does_not_write_it(pre_tokenizer, opening):
    """SmolVLM's / Idefics2's / LLaVA-1.5's template writes "Assistant:" + " " + answer. A byte-level tokenizer
    (SmolVLM's releases) tokenises that space into the answer's first token ("Ġ["), so a target tokenised alone must write it;
    a Llama-style tokenizer (Idefics2's, LLaVA-1.5's releases) prefixes "▁" to any text, so the answer alone already
    tokenises as in place, and writing the space too would add a token the released model never saw."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from sc_tune.adapters.chat_template import answer_opening

    byte_level = pre_tokenizer == "byte_level"
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = (pre_tokenizers.ByteLevel(add_prefix_space=False) if byte_level
                               else pre_tokenizers.Metaspace(prepend_scheme="first"))
    tokenizer.decoder = decoders.ByteLevel() if byte_level else decoders.Metaspace()
    alphabet = pre_tokenizers.ByteLevel.alphabet() if byte_level else []
    tokenizer.train_from_iterator(["User: q Assistant: [1, 2, 3] the dog [100, 200]"] * 5, trainers.BpeTrainer(
        vocab_size=200, special_tokens=["<unk>", "<end_of_utterance>", "<s>"], initial_alphabet=alphabet))
    # As the released tokenizers do, a BOS before any text given whole (answer_opening compares the texts' own tokens)
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[
        ("<s>", tokenizer.token_to_id("<s>"))])
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>")
    wrapped.chat_template = ("{% for m in messages %}{{ m['role'] | capitalize }}:{% if m['role'] == 'assistant' %} "
                             "{% endif %}{% for c in m['content'] %}{{ c['text'] }}{% endfor %}<end_of_utterance>\n"
                             "{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}")
    assert answer_opening(wrapped) == opening
    ids = lambda text: wrapped(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    prompt = "User:q<end_of_utterance>\nAssistant:"
    assert ids(prompt + " [1, 2]")[len(ids(prompt)):] == ids(opening + "[1, 2]")


def test_gemma4_writes_a_given_system_message_as_its_text(tiny_checkpoint):
    # Gemma 4's released template (google/gemma-4-31B-it chat_template.jinja, which the tiny stand-in reproduces here)
    # writes a system message as `messages[0]['content'] | trim`: given as a list of parts, as the other families
    # take it, the system turn would hold the list's Python text ("[{'type': 'text', ...}]").
    adapter = adapter_class("gemma4").from_pretrained(tiny_checkpoint("gemma4"))
    assert adapter.render("Locate it.", system="Be brief.") == (
        "<bos><|turn>system\nBe brief.<turn|>\n<|turn>user\n<|image|>Locate it.<turn|>\n"
        "<|turn>model\n<|channel>thought\n<channel|>")
    # Without one, no system turn (the release writes one only for a system message, tools or thinking).
    assert adapter.render("Locate it.").startswith("<bos><|turn>user\n<|image|>")


@pytest.mark.parametrize("size", [(320, 160), (160, 320), (200, 200)])
def test_gemmas_frame_is_the_image_its_tower_sees(tiny_checkpoint, size):
    """``frame``, the model's view of the image that pixel boxes are read against and ``families budget`` reports:
    Gemma 3's fixed square (the image processor's size, whatever the photo), Gemma 4's aspect-preserving patch grid,
    whose patches pool, ``pooling_kernel_size`` squared to a soft token, into the image's placeholder count."""
    gemma3 = adapter_class("gemma3").from_pretrained(tiny_checkpoint("gemma3"))
    side = gemma3.image_processor.size
    assert gemma3.prepare_image(Image.new("RGB", size)).frame == (side["width"], side["height"])
    gemma3.image_processor.size = {"height": side["height"], "width": 2 * side["width"]}  # released: square; not assumed
    assert gemma3.prepare_image(Image.new("RGB", size)).frame == (2 * side["width"], side["height"])
    gemma4 = adapter_class("gemma4").from_pretrained(tiny_checkpoint("gemma4"))
    image = gemma4.prepare_image(Image.new("RGB", size))
    patch, pool = gemma4.image_processor.patch_size, gemma4.image_processor.pooling_kernel_size
    (width, height), (photo_width, photo_height) = image.frame, size
    assert width % (patch * pool) == 0 and height % (patch * pool) == 0, image.frame
    assert (width // patch) * (height // patch) == image.num_tokens * pool * pool, image.frame
    assert abs(width / height - photo_width / photo_height) <= 0.25 * photo_width / photo_height, image.frame


def test_gemma4s_tower_call_is_cut_to_some_images_only_when_given_pixels_and_positions_by_keyword():
    """The vision cache cuts a Gemma 4 tower call to the images it has not encoded; a call it cannot read (positional
    arguments, another keyword) is left whole."""
    from sc_tune.adapters.gemma import _gemma4_images_call

    pixels, positions = torch.arange(60.0).view(3, 4, 5), torch.arange(24).view(3, 4, 2)  # one image per row
    assert _gemma4_images_call((pixels,), {"pixel_position_ids": positions}, [1]) is None
    assert _gemma4_images_call((), {"pixel_values": pixels, "pixel_position_ids": positions, "x": 1}, [1]) is None
    args, kept = _gemma4_images_call((), {"pixel_values": pixels, "pixel_position_ids": positions}, [2, 0])
    assert args == () and set(kept) == {"pixel_values", "pixel_position_ids"}
    assert torch.equal(kept["pixel_values"], pixels[[2, 0]]) and torch.equal(kept["pixel_position_ids"],
                                                                               positions[[2, 0]])


def test_qwen2_vl_asks_for_its_reference_form_and_the_other_qwens_for_the_cookbooks_json(tiny_checkpoint):
    """Qwen2-VL's grounding prompt names the caption between its reference tokens, the form its answer repeats before
    the box (a user's report of Qwen2-VL's answer); Qwen2.5-VL onwards, the fine-tuning README's JSON request."""
    prompts = {}
    for model_type in ("qwen2_vl", "qwen2_5_vl"):
        adapter = adapter_class(model_type).from_pretrained(tiny_checkpoint(model_type))
        image = adapter.prepare_image(Image.new("RGB", (64, 48)))
        prompts[model_type] = adapter.locator_prompt("the red circle", image)
    assert "<|vision_end|>Find <|object_ref_start|>the red circle<|object_ref_end|>.<|im_end|>" in prompts["qwen2_vl"]
    assert ("<|vision_end|>Locate the red circle in this image and output the bbox coordinates in JSON format."
            "<|im_end|>") in prompts["qwen2_5_vl"]
