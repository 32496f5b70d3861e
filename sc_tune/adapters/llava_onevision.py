"""LLaVA-OneVision (``llava_onevision``, the llava-hf checkpoints): a chat-template adapter, generic box codec.

Box convention: not documented upstream (LLaVA-VL/LLaVA-NeXT's documentation gives no grounding or box format;
the same question about the later LLaVA-OneVision-2, its issue 39, was left unanswered), so this adapter uses the
generic codec ``[x1, y1, x2, y2]`` on 0..1000 (``sc_tune.box_codecs.GENERIC_CODEC``), requested in the locator
prompt.

Images follow the processor's "anyres" layout: a base view plus the tiles of the best grid pinpoint, sent
as ``pixel_values`` (tiles zero-padded across the batch; the model slices each image's tiles by
``image_sizes``), and the template's ``<image>`` is repeated once per feature (base, unpadded tiles and
row newlines). ``fix_vit`` freezes ``model.vision_tower``; the projector and ``image_newline`` stay trainable.
"""

from __future__ import annotations

from sc_tune.adapters.chat_template import ChatTemplateAdapter, TemplateImageInputs
from sc_tune.adapters.registry import Family, auto_image_text_to_text, register


class LlavaOnevisionAdapter(ChatTemplateAdapter):
    image_marker = "<image>"
    image_token = "<image>"
    end_token = "<|im_end|>"
    padded_keys = ("pixel_values",)
    static_decoding_verified = True
    grounding_prior = False  # no documented grounding: a grounding warm start first (docs/grounding_warm_start.md)

    def __init__(self, tokenizer, image_processor, config, box_format: str = "native"):
        super().__init__(tokenizer, image_processor, config, box_format)
        self._features = _feature_counter(image_processor, config)

    def preprocess_image(self, image):
        return anyres_image_inputs(self, image, self._features)


def anyres_image_inputs(adapter: ChatTemplateAdapter, image, counter) -> TemplateImageInputs:
    """One image in the "anyres" layout (LLaVA-OneVision, LLaVA-NeXT): the image processor's base view and tiles,
    ``image_sizes``, and the feature count of ``counter`` (the family processor's ``_get_number_of_features``)."""
    out = adapter.image_processor(images=[image], return_tensors="pt")
    pixel_values = out["pixel_values"]  # (1, tiles, 3, H, W)
    orig_height, orig_width = (int(v) for v in out["image_sizes"][0])
    height, width = int(pixel_values.shape[-2]), int(pixel_values.shape[-1])
    num_tokens = counter._get_number_of_features(orig_height, orig_width, height, width)
    if adapter.config.vision_feature_select_strategy == "default":  # the CLS feature is dropped
        num_tokens -= 1
    tensors = {"pixel_values": pixel_values, "image_sizes": out["image_sizes"]}
    return TemplateImageInputs(tensors, num_tokens, (width, height), adapter.image_block(num_tokens))


def _feature_counter(image_processor, config):
    """transformers' own per-image feature count (``LlavaOnevisionProcessor._get_number_of_features``).

    Why not the processor itself: its constructor requires a video processor, which needs torchvision. The
    count only reads the three attributes set here, so the method is borrowed rather than re-derived."""
    from transformers.models.llava_onevision.processing_llava_onevision import LlavaOnevisionProcessor

    counter = object.__new__(LlavaOnevisionProcessor)
    counter.image_processor = image_processor
    vision = config.vision_config
    counter.num_image_tokens = (vision.image_size // vision.patch_size) ** 2
    counter.vision_aspect_ratio = config.vision_aspect_ratio
    return counter


register(
    Family(
        "LLaVA-OneVision",
        ("llava_onevision",),
        LlavaOnevisionAdapter,
        auto_image_text_to_text,
    )
)
