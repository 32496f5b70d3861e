"""LLaVA-1.5 (``llava``) and LLaVA-NeXT (``llava_next``), the llava-hf checkpoints: chat-template adapters, generic
box codec.

Box convention: none documented (the LLaVA maintainer: boxes are "partially supported" in LLaVA-1.5's data mixture,
haotian-liu/LLaVA#333; the form is community analysis only), so these adapters use the generic codec
``[x1, y1, x2, y2]`` on 0..1000 (``sc_tune.box_codecs.GENERIC_CODEC``), requested in the locator prompt, and the
checkpoints need a grounding warm start (docs/grounding_warm_start.md).

Images: LLaVA-1.5 takes one view from the checkpoint's CLIP image processor (336 px in the releases: resized on the
short side, then center-cropped, as ``LlavaProcessor`` does: the long side's ends are never seen, while boxes stay
normalised to the whole photo; ``visible_region`` gives the crop, and a run counts the boxes mostly outside it); LLaVA-NeXT takes OneVision's "anyres" layout (a base
view plus the tiles of the best grid pinpoint, tiles zero-padded across the batch, sliced by ``image_sizes``). The
template's ``<image>`` is repeated once per feature: the CLIP tower's patches, plus its CLS feature unless
``vision_feature_select_strategy`` is "default" (the releases' setting, which drops it: 576 at 336 / 14), and for
NeXT the unpadded tiles and row newlines (``LlavaNextProcessor``'s own count). ``fix_vit`` freezes
``model.vision_tower``; the projector and NeXT's ``image_newline`` stay trainable.

The turn's end differs per checkpoint (``</s>`` for the Vicuna and Mistral ones, ``<|im_end|>`` for the 34B,
``<|eot_id|>`` for llama3-llava-next), so it is read from the checkpoint's chat template
(``chat_template.turn_end_token``: ``end_token`` left unset).
"""

from __future__ import annotations

from sc_tune.adapters.base import find_submodule
from sc_tune.adapters.chat_template import ChatTemplateAdapter, TemplateImageInputs
from sc_tune.adapters.llava_onevision import (
    anyres_image_inputs,
    borrowed_counter,
    check_select_strategy,
    extra_tower_features,
)
from sc_tune.adapters.registry import Family, auto_image_text_to_text, register
from sc_tune.adapters.stacked_tiles import feature_layers, stacked_tiles_trunk
from sc_tune.adapters.unpadded_positions import UnpaddedPositionsPromptCache

class _LlavaHfAdapter(UnpaddedPositionsPromptCache, ChatTemplateAdapter):
    image_marker = "<image>"
    image_token = "<image>"
    static_decoding_verified = True
    grounding_prior = False  # no documented grounding: a grounding warm start first (docs/grounding_warm_start.md)

    def __init__(self, tokenizer, image_processor, config, box_format: str = "native"):
        super().__init__(tokenizer, image_processor, config, box_format)
        self.cls_features = extra_tower_features(config)

    def vision_trunk(self, model):
        # The projector reads hidden_states[vision_feature_layer] (the releases': -2, before the last CLIP layer); the
        # CLIP tower encodes each view/tile on its own (sc_tune.adapters.stacked_tiles).
        return stacked_tiles_trunk(find_submodule(model, self.vision_prefix), self.read_hidden_states())

    def read_hidden_states(self) -> list[int]:
        """The tower's hidden states the projectors read."""
        return feature_layers(self.config)


class LlavaAdapter(_LlavaHfAdapter):
    """LLaVA-1.5: one view, ``(H / patch) * (W / patch)`` features (+ CLS unless dropped), as ``LlavaProcessor``."""

    def preprocess_image(self, image):
        pixel_values = self.image_processor(images=[image], return_tensors="pt")["pixel_values"]  # (1, 3, H, W)
        height, width = int(pixel_values.shape[-2]), int(pixel_values.shape[-1])
        patch = self.config.vision_config.patch_size
        num_tokens = (height // patch) * (width // patch) + self.cls_features
        if self.config.vision_feature_select_strategy == "default":  # the CLS feature is dropped
            num_tokens -= 1
        return TemplateImageInputs({"pixel_values": pixel_values}, num_tokens, (width, height),
                                   self.image_block(num_tokens))


    def visible_region(self, width, height):
        """The center crop's part of the photo: the short side resized to ``size["shortest_edge"]``, then
        ``crop_size`` cut from the middle (the releases' CLIP processor: the long side's ends are never seen). ``None``
        where the processor pads to a square first (``LlavaImageProcessor``'s ``do_pad``) or does not crop."""
        processor = self.image_processor
        if not getattr(processor, "do_center_crop", False) or getattr(processor, "do_pad", False):
            return None
        size, crop = processor.size, processor.crop_size
        if size.get("shortest_edge"):
            scale = size["shortest_edge"] / min(width, height)
            resized = (width * scale, height * scale)
        else:
            resized = (size["width"], size["height"])
        seen_x, seen_y = (min(1.0, round(crop[side] / length, 9)) for side, length in zip(("width", "height"), resized))
        if seen_x == 1.0 and seen_y == 1.0:
            return None
        return ((1 - seen_x) / 2, (1 - seen_y) / 2, (1 + seen_x) / 2, (1 + seen_y) / 2)


class LlavaNextAdapter(_LlavaHfAdapter):
    """LLaVA-NeXT: anyres tiles, counted by ``LlavaNextProcessor._get_number_of_features``.

    Granite 4 Vision (``sc_tune.adapters.granite4_vision``) is this layout with its own count: a subclass names its
    family (for the select-strategy refusal) and its processor's count in ``feature_counter``."""

    padded_keys = ("pixel_values",)
    family_label = "LLaVA-NeXT"

    def __init__(self, tokenizer, image_processor, config, box_format: str = "native"):
        super().__init__(tokenizer, image_processor, config, box_format)
        check_select_strategy(config, self.family_label)  # each tile's features must make a square patch grid
        self._features = self.feature_counter(image_processor, config)

    def feature_counter(self, image_processor, config):
        """transformers' own per-image feature count (``LlavaNextProcessor._get_number_of_features``), before the
        select strategy's drop."""
        from transformers.models.llava_next.processing_llava_next import LlavaNextProcessor

        return borrowed_counter(LlavaNextProcessor, image_processor, patch_size=config.vision_config.patch_size,
                                num_additional_image_tokens=self.cls_features)

    def preprocess_image(self, image):
        return anyres_image_inputs(self, image, self._features)


register(Family("LLaVA-1.5", ("llava",), LlavaAdapter, auto_image_text_to_text))
register(Family("LLaVA-NeXT", ("llava_next",), LlavaNextAdapter, auto_image_text_to_text))
