"""Gemma 3 and Gemma 4 (``gemma3``, ``gemma4``): chat-template adapters with the generic box codec.

Box convention: none documented upstream. Google documents no box output format for Gemma 3 or 4 (a
question on the google/gemma-3-4b-it model page, discussion 38, went without an answer; Gemini's
``[ymin, xmin, ymax, xmax]`` on 0..1000 is a different model's convention), so these adapters use the
generic codec ``[x1, y1, x2, y2]`` on 0..1000 (``sc_tune.box_codecs.GENERIC_CODEC``) and ask for it in the
locator prompt; SC-Tune's locator phase teaches it from the pseudo-labels.

Image placeholders (transformers 5.24 ``Gemma3Processor`` / ``Gemma4Processor``): the chat template writes
one marker per image, which becomes the begin-of-image token, one soft token per image feature and the
end-of-image token. Both models attend bidirectionally inside an image, marked by a per-token type input
(``token_type_ids`` for Gemma 3, ``mm_token_type_ids`` for Gemma 4) that grows with appended tokens.
Gemma 4's audio tokens are suppressed with the media tokens (its audio tower is unused here).
"""

from __future__ import annotations

import re

from sc_tune.adapters.chat_template import ChatTemplateAdapter, TemplateImageInputs, save_tiny_template_model
from sc_tune.adapters.registry import Family, auto_image_text_to_text, register


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


register(Family("Gemma 3", ("gemma3",), Gemma3Adapter, auto_image_text_to_text, save_tiny_template_model))
register(Family("Gemma 4", ("gemma4",), Gemma4Adapter, auto_image_text_to_text, save_tiny_template_model))
