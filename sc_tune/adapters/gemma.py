"""Gemma 3 and Gemma 4 (``gemma3``, ``gemma4``): chat-template adapters with Gemini's y-first ``box_2d`` codec.

Box convention: ``{"box_2d": [y1, x1, y2, x2], "label": ...}``, **y-first**, integers on 0..1000, answered as a
fenced JSON list (``sc_tune.box_codecs.JsonBoxCodec("box_2d", y_first=True)``).

- Gemma 3 documents no box output. Decision: Gemini's convention. The only statement from Google is its reply on
  the google/gemma-3-4b-it model page (discussion 38): the documentation "does not explicitly confirm" box output,
  but "Gemma 3 likely follows the same format as the Gemini models" (``[y_min, x_min, y_max, x_max]``, 0..1000).
  So a Gemma 3 box is read y-first, and Gemma 3 has no grounding prior (``grounding_prior = False``): a grounding
  warm start teaches the format before SC-Tune can reward anything.
- Gemma 4: Google's vision documentation lists object detection among Gemma 4's tasks (ai.google.dev, Gemma
  "Vision understanding"), but no Google answer example or box statement was found (searched 2026-12-04): the same
  Gemini convention is assumed, unverified. Its chat template opens the answer with an empty thought channel
  (``<|channel>thought\n<channel|>``, thinking off by default).

The table (``answer_examples``) holds the fenced layout SC-Tune trains, Gemini's cookbook answer (unfenced: its system
prompt forbids fences) and the forms refused as ambiguous.

An answer that cannot be read unambiguously is a parse failure, never a reordered box: a bare list (no key
says its axis order) and Qwen's x-first ``bbox_2d`` are refused with their reason.

Image placeholders (transformers 5.24 ``Gemma3Processor`` / ``Gemma4Processor``): the chat template writes
one marker per image, which becomes the begin-of-image token, one soft token per image feature and the
end-of-image token. Both models attend bidirectionally inside an image, marked by a per-token type input
(``token_type_ids`` for Gemma 3, ``mm_token_type_ids`` for Gemma 4) that grows with appended tokens.
Gemma 4's audio tokens are suppressed with the media tokens (its audio tower is unused here).
"""

from __future__ import annotations

import re

import torch

from sc_tune.adapters.base import DocumentedAnswer, find_submodule
from sc_tune.adapters.chat_template import ChatTemplateAdapter, TemplateImageInputs
from sc_tune.adapters.registry import Family, auto_image_text_to_text, register
from sc_tune.adapters.stacked_tiles import stacked_tiles_trunk
from sc_tune.adapters.unpadded_positions import UnpaddedPositionsPromptCache
from sc_tune.box_codecs import JsonBoxCodec
from sc_tune.vision_cache import VisionTrunk

# Gemini's documented detection request, for one phrase.
GEMMA_BOX_CODEC = JsonBoxCodec(
    "box_2d", scale=1000, y_first=True, indent="  ",
    request="Output its box_2d in JSON as [ymin, xmin, ymax, xmax] normalized to 0-1000.",
)
_GEMINI_SOURCE = "Gemini / Gemma box convention: box_2d [y_min, x_min, y_max, x_max], normalized to 0-1000"
_GEMINI_COOKBOOK = "google-gemini/cookbook quickstarts/Spatial_understanding.ipynb"
GEMMA_ANSWERS = (
    # The layout SC-Tune trains (not a quote): a fenced JSON list, 2-space indent. Gemini fences its JSON unless told
    # not to (the cookbook strips a ```json fence, and its system prompt says "Never return masks or code fencing").
    DocumentedAnswer('```json\n[\n  {"box_2d": [200, 100, 600, 500], "label": "the dog"}\n]\n```',
                     (0.1, 0.2, 0.5, 0.6), f"{_GEMINI_SOURCE}; SC-Tune's fenced layout of it"),
    DocumentedAnswer('[\n  {"box_2d": [393, 67, 574, 206], "label": "red sprinkle topping"},\n]',
                     (0.067, 0.393, 0.206, 0.574),
                     f"{_GEMINI_COOKBOOK}: its first box verbatim, in its list (unfenced, as its system prompt asks)"),
    DocumentedAnswer("[200, 100, 600, 500]", None, f"{_GEMINI_SOURCE}: a bare list does not say its axis order"),
    DocumentedAnswer('{"bbox_2d": [100, 200, 500, 600]}', None,
                     f"{_GEMINI_SOURCE}: Qwen's x-first bbox_2d is not this family's form"),
)


class _GemmaAdapter(ChatTemplateAdapter):
    native_codec = GEMMA_BOX_CODEC
    answer_examples = GEMMA_ANSWERS


class Gemma3Adapter(UnpaddedPositionsPromptCache, _GemmaAdapter):
    """Gemma 3: ``<start_of_image>`` in the template -> ``\\n\\n<start_of_image>`` + ``mm_tokens_per_image``
    ``<image_soft_token>`` + ``<end_of_image>\\n\\n``; a fixed-size SigLIP view (pan-and-scan off, the
    processor's default). ``fix_vit`` freezes ``model.vision_tower``; the projector stays trainable."""

    grounding_prior = False  # no documented box output (see the module docstring)
    image_marker = "<start_of_image>"
    image_token = "<image_soft_token>"
    image_start = "<start_of_image>"
    image_end = "<end_of_image>"
    end_token = "<end_of_turn>"
    # Sliding-window layers decode statically where the window covers the call (sc_tune.decoding.static_cache_fits).
    static_decoding_verified = True
    image_type_key = "token_type_ids"
    # Prompt caches (UnpaddedPositionsPromptCache): the greedy captions resume from the scoring cache while the scored
    # sequence fits the sliding window (1,024 in the releases), whose layers then still hold every column; the
    # bidirectional attention inside an image (token_type_ids) stays within the prompt's image span, so no prompt
    # column's keys depend on the caption. Prompt columns never move: the window layers count columns.

    def preprocess_image(self, image):
        out = self.image_processor(images=[image], do_pan_and_scan=False, return_tensors="pt")
        pixel_values = out["pixel_values"]
        num_tokens = int(self.config.mm_tokens_per_image)
        placeholder = f"\n\n{self.image_block(num_tokens)}\n\n"
        frame = (int(pixel_values.shape[-1]), int(pixel_values.shape[-2]))
        return TemplateImageInputs({"pixel_values": pixel_values}, num_tokens, frame, placeholder)

    def vision_trunk(self, model):
        # The projector reads last_hidden_state (after SigLIP's post_layernorm) of one fixed-size view per image.
        return stacked_tiles_trunk(find_submodule(model, self.vision_prefix))


def _gemma4_images_call(args, kwargs, indices):
    """Gemma 4's tower call over the images ``indices`` only: their pixel rows and their patch positions."""
    if args or set(kwargs) - {"pixel_values", "pixel_position_ids"}:
        return None
    return args, {key: kwargs[key][indices] for key in ("pixel_values", "pixel_position_ids")}


class Gemma4Adapter(_GemmaAdapter):
    """Gemma 4: ``<|image|>`` in the template -> ``<|image>`` + one ``<|image|>`` per soft token (the image
    processor's aspect-preserving count) + ``<image|>``. ``fix_vit`` freezes ``model.vision_tower``; the
    ``model.embed_vision`` projection stays trainable."""

    image_marker = "<|image|>"
    image_token = "<|image|>"
    image_start = "<|image>"
    image_end = "<image|>"
    end_token = "<turn|>"
    static_decoding_verified = True  # as Gemma 3
    image_type_key = "mm_token_type_ids"
    # The released template writes a system message as `messages[0]['content'] | trim`: a list of parts would be
    # written as its Python text (google/gemma-4-31B-it chat_template.jinja).
    system_as_string = True
    # The MoE release (26B-A4B): routed experts beside every layer's dense MLP, fused 3-D parameters that plain LoRA
    # does not reach; --lora_target_experts adds them (sc_tune.moe). Its router has no load-balancing loss.
    lora_expert_parameters = ("experts.gate_up_proj", "experts.down_proj")
    extra_media_tokens = re.compile(r"audio", re.IGNORECASE)

    def preprocess_image(self, image):
        out = self.image_processor(images=[image], return_tensors="pt")
        num_tokens = int(out["num_soft_tokens_per_image"][0])
        placeholder = self.image_block(num_tokens)
        # Patch positions (x, y), -1 on padding: the resized frame is the covered patch grid.
        positions = out["image_position_ids"][0]
        positions = positions[(positions >= 0).all(dim=-1)]
        patch = int(self.image_processor.patch_size)
        frame = (int(positions[:, 0].max() + 1) * patch, int(positions[:, 1].max() + 1) * patch)
        tensors = {"pixel_values": out["pixel_values"], "image_position_ids": out["image_position_ids"]}
        return TemplateImageInputs(tensors, num_tokens, frame, placeholder)

    def resumes_from_scoring_cache(self, model, prompt_length, scored_length):
        """No (not verified): Gemma 4's last layers can reuse earlier layers' key/value caches
        (``num_kv_shared_layers``) and its layers read per-layer inputs of the token ids; no test shows a cropped
        scoring cache exact. The greedy captions prefill their prompts again."""
        return False

    def moves_cached_prompt_columns(self, model, prompt_length):
        """No: its sliding-window layers count columns (see Gemma 3), and the shared caches are not verified either."""
        return False

    def vision_trunk(self, model):
        # Each image is one row of pixel_values (images, max_patches, patch_dim), padded by the image processor to a
        # fixed max_patches whatever the batch, with its patch positions (-1: padding) in pixel_position_ids: every
        # encoder layer's output keeps an image's patches in its own row. The pooler, the standardisation and
        # embed_vision (outside the tower) read the last layer's output, so that layer is recorded and replayed.
        # The tower's own output drops padding patches (an image's row count follows its aspect ratio, not its pixel
        # rows), so it is not memoised whole (output_rows_per_image stays False): the pooler runs in every pass.
        tower = find_submodule(model, self.vision_prefix)
        layers = list(tower.encoder.layers)
        return VisionTrunk(
            tower,
            replayed=layers[-1:],
            skipped=layers[:-1],
            # The positions belong to the image: the same patches at other positions (another aspect ratio of a
            # plain image) encode otherwise, so the cache's key and comparison cover both. In float32, which holds
            # every position exactly (bfloat16 would round those above 256 together).
            image_pixels=lambda args, kwargs: list(torch.cat(
                [kwargs["pixel_values"].float(), kwargs["pixel_position_ids"].float()], -1).split(1)),
            images_call=_gemma4_images_call,
        )


register(Family("Gemma 3", ("gemma3",), Gemma3Adapter, auto_image_text_to_text))
register(Family("Gemma 4", ("gemma4",), Gemma4Adapter, auto_image_text_to_text))
