"""InternVL3 / InternVL3.5 in the transformers format (``internvl``: the ``-hf`` checkpoints).

Box convention: ``<ref>phrase</ref><box>[[x1, y1, x2, y2]]</box>`` with integers on a 0..1000 grid
(``sc_tune.box_codecs.BracketListCodec``; the ``<box>`` tags belong to the prompts and targets here). Source: the OpenGVLab model cards and the grounding evaluations
built on them; the referring prompt is InternVL's documented one, "Please provide the bounding box
coordinate of the region this sentence describes: <ref>…</ref>", and the answer repeats the reference
before the box. The describer prompt ("Please provide a short description for this region: <box>…</box>")
is this project's wording in InternVL's box syntax; InternVL's own region-caption prompt was not verified.

Images: the chat template writes ``<IMG_CONTEXT>`` per image; as ``InternVLProcessor`` does, it becomes
``<img>`` + ``image_seq_length`` ``<IMG_CONTEXT>`` per tile + ``</img>``, with the processor's default
dynamic tiling (``crop_to_patches``; ``max_patches`` from the checkpoint's ``preprocessor_config.json``).
``fix_vit`` freezes ``model.vision_tower``; the MLP projector stays trainable.

With ``--box_format generic`` the prompts are the generic ones of ``ChatTemplateAdapter``.
"""

from __future__ import annotations

from sc_tune.adapters.base import DocumentedAnswer
from sc_tune.adapters.chat_template import ChatTemplateAdapter, TemplateImageInputs
from sc_tune.adapters.registry import Family, auto_image_text_to_text, register
from sc_tune.box_codecs import BracketListCodec

REFERRING_PROMPT = "Please provide the bounding box coordinate of the region this sentence describes: "
REGION_PROMPT = "Please provide a short description for this region: "


class InternVLAdapter(ChatTemplateAdapter):
    native_codec = BracketListCodec(1000)
    documented_answers = (
        DocumentedAnswer("<ref>the man</ref><box>[[100, 200, 500, 600]]</box>", (0.1, 0.2, 0.5, 0.6),
                         "OpenGVLab InternVL3 / InternVL3.5 model cards: grounding"),
        DocumentedAnswer("<box>[[100, 200, 500, 600]]</box>", (0.1, 0.2, 0.5, 0.6),
                         "the same answer after the reference the locator prompt opens"),
        DocumentedAnswer("<box>[[100, 200, 500, 1200]]</box>", None, "beyond the 0..1000 grid"),
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

    def describer_prompt(self, box_norm, image):
        if not self.native:
            return super().describer_prompt(box_norm, image)
        return self.render(REGION_PROMPT + self._box(box_norm, image))

    def locator_prompt(self, caption, image):
        if not self.native:
            return super().locator_prompt(caption, image)
        reference = f"<ref>{self.plain_text(caption)}</ref>"
        # The answer opens with the reference, as InternVL's grounding answers do: the continuation is the box.
        return self.render(REFERRING_PROMPT + reference, answer_prefix=reference)

    def locator_target(self, box_norm, image, caption=""):
        if not self.native:
            return super().locator_target(box_norm, image, caption)
        return f"{self._box(box_norm, image)}{self.end_text}"

    def _box(self, box_norm, image) -> str:
        return f"<box>{self.codec.format(box_norm, image.frame)}</box>"

    def preprocess_image(self, image):
        out = self.image_processor(images=[image], crop_to_patches=True, return_tensors="pt")
        pixel_values = out["pixel_values"]  # (tiles, 3, H, W): the tiles, then a thumbnail when tiled
        num_tokens = int(out["num_patches"][0]) * self.tile_tokens
        placeholder = self.image_block(num_tokens)
        frame = (int(pixel_values.shape[-1]), int(pixel_values.shape[-2]))
        return TemplateImageInputs({"pixel_values": pixel_values}, num_tokens, frame, placeholder)


register(
    Family("InternVL3 / 3.5 (-hf)", ("internvl",), InternVLAdapter, auto_image_text_to_text)
)
