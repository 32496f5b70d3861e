"""InternVL3 / InternVL3.5 in the transformers format (``internvl``: the ``-hf`` checkpoints).

Box convention: ``<ref>phrase</ref><box>[[x1, y1, x2, y2]]</box>`` with integers on a 0..1000 grid
(``sc_tune.box_codecs.NestedListGridCodec`` between ``<box>`` and ``</box>``). Sources (``answer_examples``): the
referring prompt and the 0..1000 grid of InternVL's own RefCOCO evaluation
(``internvl_chat/eval/refcoco/evaluate_grounding.py``: "Please provide the bounding box coordinate of the region
this sentence describes: <ref>{}</ref>", answers read with ``\[*\[(.*?),(.*?),(.*?),(.*?)\]\]*`` and divided by
1000, so single brackets and answers without the box tags read too); InternVL's chat-data documentation
(internvl.readthedocs.io, "Chat Data Format": "we normalize each coordinate box to the range [0, 1000]" and "We
organize the model's responses in the following format: <ref>class name</ref><box>[[x1, y1, x2, y2], ...]</box>",
with a RefCOCO answer ``<ref>the lady with the blue shirt</ref><box>[[243, 469, 558, 746]]</box>``); and ms-swift's
documentation of InternVL2.5's grounding text (third-party). The answer repeats the reference before the box: the
locator's SFT target is that whole answer,
``<ref>CAPTION</ref><box>[[x1, y1, x2, y2]]</box><|im_end|>``. The describer prompt ("Please provide a short
description for this region: <box>…</box>") is this project's wording in InternVL's box syntax; InternVL's own
region-caption prompt was not verified.

Images: the chat template writes ``<IMG_CONTEXT>`` per image; as ``InternVLProcessor`` does, it becomes
``<img>`` + ``image_seq_length`` ``<IMG_CONTEXT>`` per tile + ``</img>``, with the processor's default
dynamic tiling (``crop_to_patches``; ``max_patches`` from the checkpoint's ``preprocessor_config.json``).
``fix_vit`` freezes ``model.vision_tower``; the MLP projector stays trainable.

With ``--box_format generic`` the prompts are the generic ones of ``ChatTemplateAdapter``.
"""

from __future__ import annotations

from sc_tune.adapters.base import DocumentedAnswer, find_submodule
from sc_tune.adapters.chat_template import ChatTemplateAdapter, TemplateImageInputs
from sc_tune.adapters.registry import Family, auto_image_text_to_text, register
from sc_tune.adapters.stacked_tiles import feature_layers, stacked_tiles_trunk
from sc_tune.adapters.unpadded_positions import UnpaddedPositionsPromptCache
from sc_tune.box_codecs import NestedListGridCodec

REFERRING_PROMPT = "Please provide the bounding box coordinate of the region this sentence describes: "
REGION_PROMPT = "Please provide a short description for this region: "


class InternVLAdapter(UnpaddedPositionsPromptCache, ChatTemplateAdapter):
    native_codec = NestedListGridCodec(1000, "<box>", "</box>")
    answer_examples = (
        DocumentedAnswer("<ref>the lady with the blue shirt</ref><box>[[243, 469, 558, 746]]</box>",
                         (0.243, 0.469, 0.558, 0.746),
                         "InternVL documentation (internvl.readthedocs.io, Chat Data Format; its source is the "
                         "czczup/InternVL-doc repository): its RefCOCO example answer"),
        DocumentedAnswer("<ref>羊</ref><box>[[101, 201, 150, 266]]</box>", (0.101, 0.201, 0.150, 0.266),
                         "ms-swift docs (third-party), quoted in modelscope/ms-swift issue #5008: InternVL2.5's "
                         "grounding text"),
        DocumentedAnswer("[[101, 201, 150, 266]]", (0.101, 0.201, 0.150, 0.266),
                         "OpenGVLab/InternVL internvl_chat/eval/refcoco/evaluate_grounding.py: its parser "
                         r"\[*\[(.*?),(.*?),(.*?),(.*?)\]\]* reads the list with or without the box tags, / 1000"),
        DocumentedAnswer("<box>[101, 201, 150, 266]</box>", (0.101, 0.201, 0.150, 0.266),
                         "the same parser: single brackets read alike"),
        DocumentedAnswer("<box>[[101, 201, 150, 266]]</box><box>[[300, 300, 400, 400]]</box>", None,
                         "two boxes for one phrase (refused)"),
    )
    image_marker = "<IMG_CONTEXT>"
    image_token = "<IMG_CONTEXT>"
    image_start = "<img>"
    image_end = "</img>"
    end_token = "<|im_end|>"
    static_decoding_verified = True

    def __init__(self, tokenizer, image_processor, config, box_format: str = "native"):
        super().__init__(tokenizer, image_processor, config, box_format)
        vision = config.vision_config
        patches_per_side = vision.image_size[0] // vision.patch_size[0]
        # As InternVLProcessor's image_seq_length: features per tile after the pixel shuffle.
        self.tile_tokens = int(patches_per_side**2 * config.downsample_ratio**2)

    def _native(self) -> bool:
        return self.codec is self.native_codec

    def describer_prompt(self, box_norm, image):
        if not self._native():
            return super().describer_prompt(box_norm, image)
        return self.render(REGION_PROMPT + self.codec.format(box_norm, image.frame))

    def locator_prompt(self, caption, image):
        if not self._native():
            return super().locator_prompt(caption, image)
        return self.render(REFERRING_PROMPT + f"<ref>{self.plain_text(caption)}</ref>")

    def answer_prefix(self, caption):
        # InternVL's grounding answer repeats the reference before its box.
        return f"<ref>{caption}</ref>" if self._native() else ""

    def preprocess_image(self, image):
        out = self.image_processor(images=[image], crop_to_patches=True, return_tensors="pt")
        pixel_values = out["pixel_values"]  # (tiles, 3, H, W): the tiles, then a thumbnail when tiled
        num_tokens = int(out["num_patches"][0]) * self.tile_tokens
        placeholder = self.image_block(num_tokens)
        frame = (int(pixel_values.shape[-1]), int(pixel_values.shape[-2]))
        return TemplateImageInputs({"pixel_values": pixel_values}, num_tokens, frame, placeholder)

    def vision_trunk(self, model):
        # The projector reads last_hidden_state where vision_feature_layer is -1 (the releases'), else that layer's
        # hidden state, of every 448 px tile and the thumbnail, each encoded on its own
        # (sc_tune.adapters.stacked_tiles).
        return stacked_tiles_trunk(find_submodule(model, self.vision_prefix), feature_layers(self.config))


register(
    Family("InternVL3 / 3.5 (-hf)", ("internvl",), InternVLAdapter, auto_image_text_to_text)
)
