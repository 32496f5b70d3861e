"""SmolVLM / SmolVLM2 (``smolvlm``) and SmolVLM v1 (``idefics3``): a chat-template adapter, generic box codec.

Box convention: none found upstream (no grounding format is documented for SmolVLM), so this adapter uses
the generic codec ``[x1, y1, x2, y2]`` on 0..1000 (``sc_tune.box_codecs.GENERIC_CODEC``), requested in the
locator prompt.

Images follow the processor's layout: with ``do_image_splitting`` (the checkpoints' default) an image is
cut into a grid of crops plus a global view; the template's ``<image>`` becomes transformers' own prompt
string for that grid (``get_image_prompt_string``: ``<fake_token_around_image>``, ``<row_r_col_c>`` /
``<global-img>`` and ``image_seq_len`` ``<image>`` per crop). Crops are zero-padded across the batch (the
model drops all-zero crops). ``fix_vit`` freezes ``model.vision_model``; the connector stays trainable.
The ``<row_r_col_c>`` tokens are suppressed in generation with the other media tokens.
"""

from __future__ import annotations

import re

from sc_tune.adapters.base import find_submodule
from sc_tune.adapters.chat_template import TemplateImageInputs
from sc_tune.adapters.idefics2 import IdeficsLineAdapter
from sc_tune.adapters.registry import Family, auto_image_text_to_text, register
from sc_tune.adapters.stacked_tiles import stacked_tiles_trunk
from sc_tune.adapters.unpadded_positions import UnpaddedPositionsPromptCache


class SmolVLMAdapter(UnpaddedPositionsPromptCache, IdeficsLineAdapter):
    extra_media_tokens = re.compile(r"^<row_\d+_col_\d+>$")

    def __init__(self, tokenizer, image_processor, config, box_format: str = "native"):
        super().__init__(tokenizer, image_processor, config, box_format)
        vision = config.vision_config
        # As SmolVLMProcessor's image_seq_len: features per crop after the connector's pixel shuffle.
        self.image_seq_len = int((vision.image_size // vision.patch_size) ** 2 / config.scale_factor**2)
        # <global-img> is plain text in Idefics3's released tokenizer: not required to be a token.
        self.global_image_token = getattr(tokenizer, "global_image_token", None) or "<global-img>"

    def vision_trunk(self, model):
        # The crops and the global view are fixed-size tiles along dim 0 (all-zero padding crops dropped before the
        # tower), each encoded on its own; the connector reads last_hidden_state. The call carries each tile's
        # patch_attention_mask (from the pixels' padding mask): keyed and cut with its pixels.
        return stacked_tiles_trunk(find_submodule(model, self.vision_prefix), per_tile_kwargs=("patch_attention_mask",))

    def preprocess_image(self, image):
        from transformers.models.smolvlm.processing_smolvlm import get_image_prompt_string

        out = self.image_processor(images=[image], return_row_col_info=True, return_tensors="pt")
        rows, cols = int(out["rows"][0][0]), int(out["cols"][0][0])
        placeholder = get_image_prompt_string(
            rows, cols, self.image_seq_len, self.crop_token, self.image_token, self.global_image_token
        )
        num_tokens = self.image_seq_len * (rows * cols + 1 if rows or cols else 1)
        pixel_values = out["pixel_values"]  # (1, crops, 3, H, W)
        tensors = {"pixel_values": pixel_values, "pixel_attention_mask": out["pixel_attention_mask"]}
        return TemplateImageInputs(
            tensors, num_tokens, (int(pixel_values.shape[-1]), int(pixel_values.shape[-2])), placeholder
        )


# SmolVLM v1 checkpoints are the Idefics3 architecture (``model_type: idefics3``): the same prompt layout,
# tile tokens and module names.
register(
    Family("SmolVLM / SmolVLM2 / SmolVLM v1 (Idefics3)", ("smolvlm", "idefics3"), SmolVLMAdapter, auto_image_text_to_text)
)
