"""Adapters for EXAONE 4.5 (``exaone4_5``, LG AI Research) and HyperCLOVA X SEED Vision v2
(``hyperclovax_vision_v2``, NAVER: HyperCLOVAX-SEED-Think-32B), transformers-native.

Both are a Qwen2.5-VL-style vision tower (EXAONE 4.5's with grouped-query attention and 2-D rotary positions) in
front of a 1-D-rotary text model (EXAONE 4.0; HyperCLOVA X), and transformers 5.24 processes both with Qwen2-VL's
image processor: ``Exaone4_5_Processor`` (``HyperCLOVAXVisionV2Processor`` is its subclass) replaces each image
token with ``image_grid_thw.prod() // merge_size**2`` of them. That is ``PatchGridChatAdapter``'s image and
placeholder machinery, shared here; what differs from the Qwen families:

- the image token is the tokenizer's ``image_token`` where it names one, else ``<|image_pad|>`` (the processor's
  rule); the chat template writes what surrounds it (EXAONE 4.5: ``<vision>`` ... ``</vision>``);
- no ``mm_token_type_ids``: the processors return none (``return_mm_token_type_ids`` is removed) and the models
  have no multimodal rope index: positions are 1-D, ``arange(sequence) + cached length``, which both models compute
  themselves in every forward and decoding step (``prepare_inputs_for_generation`` drops the position ids generate
  builds). SC-Tune passes none: the positions are the model's own (column indices, padding included; rotary
  attention depends on differences only);
- the turn's end token is read from the checkpoint's chat template (``turn_end_token``: EXAONE's ``<|endofturn|>``,
  HyperCLOVA X's ``<|im_end|>``), the tokenizer's EOS also stopping where it differs.

Boxes: neither vendor documents a grounding answer form (transformers' model docs, docstrings and tests show image
descriptions only), so the native codec is the generic one and ``grounding_prior`` is false: a grounding warm start
first (docs/grounding_warm_start.md). Reasoning: both are hybrid. EXAONE 4.5 thinks by default and its template's
``enable_thinking=False`` (which ``render`` passes) turns it off; HyperCLOVA X's generation prompt writes an empty
``<think>\\n\\n</think>`` block unless ``thinking=True`` is passed (transformers' model doc).
"""

from __future__ import annotations

from sc_tune.adapters.base import find_submodule
from sc_tune.adapters.patch_grid_chat import OneDPositionPatchGridAdapter
from sc_tune.adapters.qwen2_vl import qwen_vision_trunk
from sc_tune.adapters.registry import Family, auto_image_text_to_text, register
from sc_tune.adapters.unpadded_positions import scoring_cache_crops, without_images
from sc_tune.box_codecs import GENERIC_CODEC

class Exaone45Adapter(OneDPositionPatchGridAdapter):
    """EXAONE 4.0's sliding-window (rotary) and global layers, HyperCLOVA X's full-attention ones: both decode from a
    static cache (``OneDPositionPatchGridAdapter.static_decoding_verified``)."""

    native_codec = GENERIC_CODEC
    grounding_prior = False  # no documented grounding: a grounding warm start first (docs/grounding_warm_start.md)
    vision_prefix = "model.visual"
    vision_trainable_prefixes = ("model.visual.merger",)  # the patch merger projects onto the text width

    def vision_trunk(self, model):
        # transformers' Exaone4_5_VisionModel is Qwen2.5-VL's tower with grouped-query attention (window attention
        # within each image, the merger reading the last block, called as visual(pixels, grid_thw=...));
        # HyperCLOVA X's tower is Qwen2.5-VL's own (Qwen2_5_VisionTransformerPretrainedModel).
        return qwen_vision_trunk(find_submodule(model, self.vision_prefix))

    def resumes_from_scoring_cache(self, model, prompt_length, scored_length):
        """Yes, where the window layers still hold the whole scored sequence. Unlike the other 1-D rotary families
        (``sc_tune.adapters.unpadded_positions``), this model's ``generate`` drops every ``position_ids``
        (``prepare_inputs_for_generation`` sets them to ``None``, so does HyperCLOVA X SEED Vision v2's), and the text
        model counts columns, padding included, from the cache's length: the scoring pass and ``generate`` count
        alike, and the greedy captions resume from the scoring cache with no positions of their own."""
        return scoring_cache_crops(model, scored_length)

    def resumed_decoding_inputs(self, inputs):
        return without_images(self, inputs)

    def moves_cached_prompt_columns(self, model, prompt_length):
        """No: positions are the columns, and ``generate`` drops any ``position_ids`` it is given, so a locator batch
        laid out as moved prefix, padding gap and tail cannot be read at its rows' own positions (that would need
        per-row offsets inside the model, as Qwen-VL's). The locator prompts are prefilled in full."""
        return False


class HyperClovaXVisionV2Adapter(Exaone45Adapter):
    """The tower is ``model.vision_model`` (Qwen2.5-VL's, its patch merger inside); a linear ``model.projector`` after
    it maps onto the text width and stays trainable under ``fix_vit`` (it is outside the tower)."""

    vision_prefix = "model.vision_model"
    vision_trainable_prefixes = ("model.vision_model.merger",)


register(Family("EXAONE 4.5", ("exaone4_5",), Exaone45Adapter, auto_image_text_to_text))
register(Family("HyperCLOVA X SEED Vision v2", ("hyperclovax_vision_v2",), HyperClovaXVisionV2Adapter,
                auto_image_text_to_text))
