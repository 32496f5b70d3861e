"""Gemma 3 and Gemma 4 (``gemma3``, ``gemma4``): chat-template adapters.

Boxes:
- Gemma 4 documents object detection (Gemma docs, "capabilities / vision"): a JSON list of
  ``{"box_2d": [y1, x1, y2, x2], "label": ...}`` on a 0..1000 grid, **y first**, Google's convention across
  Gemini and Gemma. The locator asks for and trains on exactly that form; an answer with four bare numbers
  (no key, so no axis order) is a parse failure, never guessed to be x-first.
- Gemma 3 documents no box output (a question on the google/gemma-3-4b-it model page, discussion 38, went
  unanswered; a Google reply there only guesses Gemini's convention). It has no grounding prior: it uses the
  generic codec ``[x1, y1, x2, y2]`` on 0..1000, asked for in words, and needs a grounding warm start before
  SC-Tune (``grounding_prior = False``: the preflight says so). A ``"box_2d"`` answer it may still write is
  read y-first, by its key (``sc_tune.box_codecs.GenericCodec``).

Image placeholders (transformers 5.24 ``Gemma3Processor`` / ``Gemma4Processor``): the chat template writes
one marker per image, which becomes the begin-of-image token, one soft token per image feature and the
end-of-image token. Both models attend bidirectionally inside an image, marked by a per-token type input
(``token_type_ids`` for Gemma 3, ``mm_token_type_ids`` for Gemma 4) that grows with appended tokens.
Gemma 4's audio tokens are suppressed with the media tokens (its audio tower is unused here).
"""

from __future__ import annotations

import json
import re

from sc_tune.adapters.base import DocumentedAnswer
from sc_tune.adapters.chat_template import ChatTemplateAdapter, TemplateImageInputs
from sc_tune.adapters.registry import Family, auto_image_text_to_text, register
from sc_tune.box_codecs import JsonBoxCodec

GEMMA_VISION_DOCS = "ai.google.dev Gemma docs, capabilities/vision (object detection)"


class Gemma3Adapter(ChatTemplateAdapter):
    """Gemma 3: ``<start_of_image>`` in the template -> ``\\n\\n<start_of_image>`` + ``mm_tokens_per_image``
    ``<image_soft_token>`` + ``<end_of_image>\\n\\n``; a fixed-size SigLIP view (pan-and-scan off, the
    processor's default). ``fix_vit`` freezes ``model.vision_tower``; the projector stays trainable."""

    image_marker = "<start_of_image>"
    image_token = "<image_soft_token>"
    image_start = "<start_of_image>"
    image_end = "<end_of_image>"
    end_token = "<end_of_turn>"
    # Sliding-window layers decode statically where the window covers the call (sc_tune.decoding.static_cache_fits).
    static_decoding_verified = True
    image_type_key = "token_type_ids"
    grounding_prior = False
    documented_answers = (
        DocumentedAnswer("[100, 200, 500, 600]", (0.1, 0.2, 0.5, 0.6), "the generic form the locator prompt asks for"),
        DocumentedAnswer('```json\n[{"box_2d": [200, 100, 600, 500], "label": "cat"}]\n```', (0.1, 0.2, 0.5, 0.6),
                         GEMMA_VISION_DOCS + ": Google's y-first key, read by its key"),
    )

    def preprocess_image(self, image):
        out = self.image_processor(images=[image], do_pan_and_scan=False, return_tensors="pt")
        pixel_values = out["pixel_values"]
        num_tokens = int(self.config.mm_tokens_per_image)
        placeholder = f"\n\n{self.image_block(num_tokens)}\n\n"
        frame = (int(pixel_values.shape[-1]), int(pixel_values.shape[-2]))
        return TemplateImageInputs({"pixel_values": pixel_values}, num_tokens, frame, placeholder)


class Gemma4Adapter(ChatTemplateAdapter):
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
    extra_media_tokens = re.compile(r"audio", re.IGNORECASE)
    native_codec = JsonBoxCodec("box_2d", "yxyx", 1000)
    documented_answers = (
        DocumentedAnswer('```json\n[\n  {"box_2d": [200, 100, 600, 500], "label": "cat"}\n]\n```', (0.1, 0.2, 0.5, 0.6),
                         GEMMA_VISION_DOCS),
        DocumentedAnswer('[{"box_2d": [200, 100, 600, 500], "label": "cat"}, {"box_2d": [0, 0, 10, 10], "label": "x"}]',
                         (0.1, 0.2, 0.5, 0.6), GEMMA_VISION_DOCS + ": several objects, the first read"),
        DocumentedAnswer("[200, 100, 600, 500]", None, "four bare numbers: no key, so no axis order"),
        DocumentedAnswer('{"bbox_2d": [100, 200, 500, 600]}', None, "Qwen's x-first key is not Gemma 4's"),
    )

    def locator_prompt(self, caption, image):
        if not self.native:
            return super().locator_prompt(caption, image)
        return self.render(f"Detect {self.plain_text(caption)}. Output its box_2d in JSON.")

    def locator_target(self, box_norm, image, caption=""):
        if not self.native:
            return super().locator_target(box_norm, image, caption)
        box = self.codec.format(box_norm, image.frame)[1:-1]
        return f'```json\n[\n  {{{box}, "label": {json.dumps(caption, ensure_ascii=False)}}}\n]\n```{self.end_text}'

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


register(Family("Gemma 3", ("gemma3",), Gemma3Adapter, auto_image_text_to_text))
register(Family("Gemma 4", ("gemma4",), Gemma4Adapter, auto_image_text_to_text))
