"""Aya Vision (``aya_vision``: Cohere's Aya Vision 8B / 32B, ``AyaVisionForConditionalGeneration``): a chat-template
adapter, generic box codec.

Box convention: none found (transformers' ``aya_vision`` docs and vLLM's example show image questions and captions,
no grounding prompt or box answer; the model cards were not at hand), so the adapter uses the generic codec
``[x1, y1, x2, y2]`` on 0..1000 (``sc_tune.box_codecs.GENERIC_CODEC``), requested in the locator prompt, and the
checkpoints need a grounding warm start (docs/grounding_warm_start.md).

Template: Cohere's turn tokens, ``<|START_OF_TURN_TOKEN|><|USER_TOKEN|>`` + ``<image>`` + text +
``<|END_OF_TURN_TOKEN|>``, the answer opened with ``<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>`` (vLLM's Aya Vision
example prompt; its tokenizer prepends ``<BOS_TOKEN>``). The turn's end is read from the checkpoint's template
(``chat_template.turn_end_token``: ``<|END_OF_TURN_TOKEN|>``, also the tokenizer's EOS). The template's ``<image>`` is
plain text that ``AyaVisionProcessor`` replaces before tokenising.

Images: the GOT-OCR2 image processor (PIL backend) with ``crop_to_patches=True``, which ``AyaVisionProcessor`` passes
whatever the image processor's own setting: the tiles of the grid closest to the photo's aspect ratio (at most
``max_patches``), then a thumbnail of the whole photo when there is more than one tile. The template's ``<image>``
becomes ``<|START_OF_IMG|>``, ``TILE_i`` and the tile's ``<|IMG_PATCH|>`` tokens per tile, ``TILE_GLOBAL`` and the
thumbnail's, ``<|END_OF_IMG|>`` (``AyaVisionProcessor.replace_image_token``); only ``<|IMG_PATCH|>`` takes features:
``(image_size / (patch_size * downsample_factor))^2`` per tile (169 in the releases: 364 px, 14 px patches, a 2 x 2
pixel shuffle). The tiles of a batch are concatenated along the first dimension, as the processor does.
``fix_vit`` freezes ``model.vision_tower`` (SigLIP); ``model.multi_modal_projector`` (the pixel shuffle's norm and
its SwiGLU MLP) stays trainable.
"""

from __future__ import annotations

import re

from sc_tune.adapters.base import find_submodule
from sc_tune.adapters.chat_template import ChatTemplateAdapter, TemplateImageInputs, processor_tile
from sc_tune.adapters.registry import Family, auto_image_text_to_text, register
from sc_tune.adapters.stacked_tiles import feature_layers, stacked_tiles_trunk
from sc_tune.adapters.unpadded_positions import UnpaddedPositionsPromptCache


class AyaVisionAdapter(UnpaddedPositionsPromptCache, ChatTemplateAdapter):
    image_marker = "<image>"
    image_marker_is_token = False  # plain text AyaVisionProcessor replaces before tokenising
    image_token = "<|IMG_PATCH|>"
    image_start = "<|START_OF_IMG|>"
    image_end = "<|END_OF_IMG|>"
    tile_token = "TILE"  # "TILE_1", "TILE_2", ... before each tile's patches
    tile_global_token = "TILE_GLOBAL"  # before the thumbnail's (or the one view's)
    # Tile markers a tokenizer may hold as tokens of their own: never generated either.
    extra_media_tokens = re.compile(r"^TILE(_GLOBAL|_\d+)?$")
    static_decoding_verified = True
    grounding_prior = False  # no documented grounding: a grounding warm start first (docs/grounding_warm_start.md)

    def __init__(self, tokenizer, image_processor, config, box_format: str = "native"):
        super().__init__(tokenizer, image_processor, config, box_format)
        vision = config.vision_config
        # SigLIP emits no CLS feature: the projector's pixel shuffle needs the square patch grid whole ("full").
        if config.vision_feature_select_strategy != "full":
            raise ValueError(f"config.json: vision_feature_select_strategy {config.vision_feature_select_strategy!r}: "
                             "Aya Vision's pixel shuffle takes the tower's whole square patch grid ('full')")
        tile = processor_tile(image_processor)
        if tile != (vision.image_size, vision.image_size):
            raise ValueError(f"preprocessor_config.json: size {tile[0]}x{tile[1]} is not the vision tower's "
                             f"vision_config.image_size {vision.image_size} (config.json): each tile is the tower's "
                             "input")
        per_side = vision.image_size // (vision.patch_size * config.downsample_factor)
        self.tile_tokens = per_side * per_side

    def preprocess_image(self, image):
        out = self.image_processor(images=[image], crop_to_patches=True, return_tensors="pt")
        pixel_values = out["pixel_values"]  # (tiles, 3, H, W): the tiles, then the thumbnail when tiled
        tiles = int(out["num_patches"][0])
        patches = self.image_token * self.tile_tokens
        block = "".join(f"{self.tile_token}_{i}{patches}" for i in range(1, tiles))
        placeholder = f"{self.image_start}{block}{self.tile_global_token}{patches}{self.image_end}"
        frame = (int(pixel_values.shape[-1]), int(pixel_values.shape[-2]))
        return TemplateImageInputs({"pixel_values": pixel_values}, tiles * self.tile_tokens, frame, placeholder)

    def vision_trunk(self, model):
        # The projector reads hidden_states[vision_feature_layer] (the releases': -1) of every tile and the thumbnail,
        # each encoded on its own (sc_tune.adapters.stacked_tiles).
        return stacked_tiles_trunk(find_submodule(model, self.vision_prefix), feature_layers(self.config))


register(Family("Aya Vision", ("aya_vision",), AyaVisionAdapter, auto_image_text_to_text))
