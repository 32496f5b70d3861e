"""North (``cohere_compass``: Cohere's North vision models, e.g. CohereLabs/North-Micro-Vision-Instruct,
``CohereCompassForConditionalGeneration``, transformers-native), generic box codec.

Model: Qwen3-VL's vision tower (``model.visual``: 16 px patches, 2 x 2 patch merger, DeepStack mergers feeding the
first text layers) before a Cohere2-style text model (``model.language_model``) whose rotary layers take Qwen3-VL's
interleaved multimodal positions (M-RoPE) and whose layers may be sliding-window or position-free (a layer type whose
``rope_parameters`` entry is null); the logits are scaled by ``logit_scale`` inside the model's forward.

Images: ``CohereCompassImageProcessorPil`` is Qwen2-VL's patch grid (``pixel_values`` + ``image_grid_thw``), and
``CohereCompassProcessor`` (Qwen3-VL's) replaces each ``<|IMAGE_PAD|>`` with ``grid.prod() // merge_size**2`` of them
and returns ``mm_token_type_ids`` (1 on image tokens) for the rope index: ``PatchGridChatAdapter``'s machinery. The
template writes ``<|VISION_START|><|IMAGE_PAD|><|VISION_END|>`` (transformers' processor tests). The processor's video
processor needs torchvision and is never built; prompts are rendered through the checkpoint's chat template.

Boxes: Cohere's model card names grounding among North's capabilities but no answer form was found from Cohere; a
third-party MLX app reports bare ``[x1, y1, x2, y2]`` arrays on a 0..1000 grid, which is not Cohere's documentation.
So the native codec is the generic one (``[x1, y1, x2, y2]`` on 0..1000, asked for in words) and
``grounding_prior`` is false: a grounding warm start first (docs/grounding_warm_start.md). The turn end is read from
the checkpoint's template (``turn_end_token``).

Caches: the vision cache replays Qwen3-VL's trunk (the tower is Qwen3-VL's). No resume from a scoring pass's cache and
no moved prompt columns: each answers so by name below (not verified for this family); those passes run in full, as
for a family without them.
"""

from __future__ import annotations

from sc_tune.adapters.patch_grid_chat import GenericTemplatePatchGridAdapter
from sc_tune.adapters.qwen2_vl import _QwenChatVLAdapter
from sc_tune.adapters.registry import Family, auto_image_text_to_text, register
from sc_tune.box_codecs import GENERIC_CODEC


class NorthAdapter(GenericTemplatePatchGridAdapter):
    native_codec = GENERIC_CODEC
    grounding_prior = False  # no documented grounding: a grounding warm start first (docs/grounding_warm_start.md)
    image_token = "<|IMAGE_PAD|>"  # CohereCompassProcessor's, whatever the tokenizer names
    # The patch merger and the DeepStack mergers project onto the text width: trainable under fix_vit.
    vision_trainable_prefixes = ("model.visual.merger", "model.visual.deepstack_merger_list")
    # M-RoPE positions advance by one per token on every axis after the prompt, as for Qwen3-VL; the sliding-window and
    # position-free layers decode from a static cache too (tests/test_decoding.py).
    static_decoding_verified = True

    # North's tower is Qwen3-VL's (CohereCompassVisionModel subclasses Qwen3VLVisionModel): the vision cache replays
    # its last block and DeepStack blocks as for Qwen3-VL (tests/test_vision_cache.py runs North's tiny tower too).
    vision_trunk = _QwenChatVLAdapter.vision_trunk

    def resumes_from_scoring_cache(self, model, prompt_length, scored_length):
        """No (not verified for this family): the snapshot's greedy captions prefill their prompts again. North's
        sliding-window layers would refuse it anyway: their cache keeps only the window's last columns."""
        return False

    def moves_cached_prompt_columns(self, model, prompt_length):
        """No (not verified for this family): the locator prompts are prefilled in full."""
        return False


register(Family("North", ("cohere_compass",), NorthAdapter, auto_image_text_to_text))
