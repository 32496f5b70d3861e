"""Granite 4 Vision (``granite4_vision``: IBM's granite-4.0-3b-vision, granite-vision-4.1-4b,
``Granite4VisionForConditionalGeneration``): a chat-template adapter on LLaVA-NeXT's anyres layout, generic box
codec.

Box convention: none found (transformers' ``granite4_vision`` doc and the Granite Vision model cards describe chart,
table and key-value extraction with task tags, image description and question answering; no grounding prompt or
box answer), so the adapter uses the generic codec ``[x1, y1, x2, y2]`` on 0..1000
(``sc_tune.box_codecs.GENERIC_CODEC``), requested in the locator prompt, and the checkpoints need a grounding warm
start (docs/grounding_warm_start.md).

Template: Granite 4's role tags, ``<|start_of_role|>user<|end_of_role|>`` + ``<image>`` + text + ``<|end_of_text|>``,
the answer opened with ``<|start_of_role|>assistant<|end_of_role|>``; the turn's end is read from the checkpoint's
template (``chat_template.turn_end_token``: ``<|end_of_text|>``, also the tokenizer's EOS).

Images: LLaVA-NeXT's (``LlavaNextAdapter``): the image processor's base view and anyres tiles, ``image_sizes``, one
``<image>`` per feature. The count is ``Granite4VisionProcessor``'s own: its window Q-Former projectors turn each
view's ``n x n`` patches into ``(n * downsample_rate)^2`` features (the releases' "4/8": 24 x 24 SigLIP patches of
16 px at 384 px -> 144 per view), then the unpadded tiles and a newline per row, as LLaVA-NeXT. Every projector
(the layer "deepstack" ones and the four spatial-offset ones) writes that many features into the same positions, at
its own text layer. ``fix_vit`` freezes ``model.vision_tower``; ``model.layerwise_projectors``,
``model.spatial_projectors`` and ``model.image_newline`` stay trainable.
"""

from __future__ import annotations

from fractions import Fraction

from sc_tune.adapters.llava import LlavaNextAdapter
from sc_tune.adapters.llava_onevision import borrowed_counter
from sc_tune.adapters.registry import Family, auto_image_text_to_text, register


class Granite4VisionAdapter(LlavaNextAdapter):
    family_label = "Granite 4 Vision"

    def __init__(self, tokenizer, image_processor, config, box_format: str = "native"):
        check_downsample_rate(config)
        super().__init__(tokenizer, image_processor, config, box_format)

    def read_hidden_states(self):
        # Its layerwise ("deepstack") projectors read one SigLIP layer each, the spatial projectors another
        # (Granite4VisionModel.get_image_features); vision_feature_layer is not read.
        layerwise = [vision_layer for vision_layer, _ in self.config.deepstack_layer_map]
        return [*layerwise, self.config.spatial_vision_layer]

    def feature_counter(self, image_processor, config):
        """``Granite4VisionProcessor._get_number_of_features``, at the model config's ``downsample_rate``."""
        from transformers.models.granite4_vision.processing_granite4_vision import Granite4VisionProcessor

        return borrowed_counter(Granite4VisionProcessor, image_processor, patch_size=config.vision_config.patch_size,
                                num_additional_image_tokens=self.cls_features, downsample_rate=config.downsample_rate)

    def resumes_from_scoring_cache(self, model, prompt_length, scored_length):
        """No, unlike LLaVA-NeXT: Granite 4 Vision's text model (transformers 5.24) starts no key/value cache in a
        forward that is given none, so the scoring pass leaves nothing to resume from; the greedy captions prefill
        their prompts again."""
        return False

    def moves_cached_prompt_columns(self, model, prompt_length):
        """No: the scoring pass keeps no cache to move (see ``resumes_from_scoring_cache``), and locating from the
        cache of ``generate``'s prefill (the pseudo-label filter's path) is not verified with the image features it
        adds to the text layers' hidden states; the locator prompts are prefilled in full."""
        return False


def check_downsample_rate(config) -> None:
    """A ``downsample_rate`` the projectors can lay out, else a ``ValueError`` naming the config.json fields.

    ``Granite4VisionWindowQFormerDownsampler`` cuts a view's ``n x n`` patches into windows of the rate's denominator
    (``n`` must be a multiple of it), and its spatial-offset projectors keep one patch of each 2 x 2 (the rate must
    be 1/2: "4/8" in the releases). Otherwise the model fails at its first forward, inside a view or reshape."""
    rate = config.downsample_rate
    vision = config.vision_config
    side = vision.image_size // vision.patch_size
    if rate is None or "/" not in str(rate):
        raise ValueError(f"config.json: downsample_rate {rate!r}: Granite 4 Vision's projectors need a fraction "
                         "'query/window' (the releases': '4/8')")
    window = int(str(rate).split("/")[1])
    if Fraction(rate) != Fraction(1, 2) or side % window:
        raise ValueError(f"config.json: downsample_rate {rate!r} with vision_config.image_size {vision.image_size} / "
                         f"patch_size {vision.patch_size} ({side} patches a side): Granite 4 Vision's spatial "
                         "projectors keep one patch of each 2 x 2 (a rate of 1/2) in windows that must tile the side")


register(Family("Granite 4 Vision", ("granite4_vision",), Granite4VisionAdapter, auto_image_text_to_text))
