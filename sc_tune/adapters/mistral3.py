"""Mistral 3 (``mistral3``: Mistral Small 3.1 / 3.2 Instruct, the ``Mistral3ForConditionalGeneration`` conversions):
a chat-template adapter, generic box codec.

Box convention: none documented (Mistral's model cards and vision docs describe image understanding, OCR and
document parsing, not a grounding answer form), so the adapter uses the generic codec ``[x1, y1, x2, y2]`` on
0..1000 (``sc_tune.box_codecs.GENERIC_CODEC``), requested in the locator prompt, and the checkpoints need a
grounding warm start (docs/grounding_warm_start.md).

Template: the releases' template writes the BOS itself, then a system turn (the template's default system message,
with today's date from ``strftime_now``, unless a system message is given), ``[INST]`` + ``[IMG]`` + text +
``[/INST]``, and after an answer the EOS (``</s>``, read from the template as for llava-hf). The adapter renders
what the processor renders but for the date: it gives the template its own default message, dated ``PROMPT_DATE``
(``Mistral3Adapter.render``).

Images: the Pixtral image processor (PIL backend; ``PixtralProcessor`` itself needs torchvision) resizes the long
side to at most ``size["longest_edge"]`` and each side up to a multiple of ``patch_size * spatial_merge_size``
(28 px in the releases), as the processor asks it to. The template's ``[IMG]`` becomes one ``[IMG]`` per merged
patch, an ``[IMG_BREAK]`` after each row and ``[IMG_END]`` in place of the last break (``PixtralProcessor
.replace_image_token``); only the ``[IMG]`` tokens take features. Across a batch the pixels are zero-padded on the
bottom and right to the largest image, as the processor pads; ``image_sizes`` (height, width) tells the tower each
image's own extent. ``fix_vit`` freezes ``model.vision_tower``; ``model.multi_modal_projector`` (its norm, patch
merger and MLP) stays trainable.
"""

from __future__ import annotations

import datetime
import logging
import re

from sc_tune.adapters.chat_template import ChatTemplateAdapter, TemplateImageInputs
from sc_tune.adapters.registry import Family, auto_image_text_to_text, register
from sc_tune.adapters.unpadded_positions import UnpaddedPositionsPromptCache

logger = logging.getLogger(__name__)

# The date the prompts' system message carries (Mistral Small 3.1's release; any fixed date would do). Dated today, as
# the template does by itself, a run's prompts changed at midnight (within a rollout, a cached prompt prefix was no
# longer its prompts'), a resume on another day was not exact, and an evaluation resumed on another day scored its
# rows under other prompts than the first day's.
PROMPT_DATE = "2025-03-17"
_SYSTEM_TURN = re.compile(r"\[SYSTEM_PROMPT\](.*?)\[/SYSTEM_PROMPT\]", re.S)


def pixtral_image_block(rows: int, cols: int, token: str, row_break: str, end: str) -> str:
    """One image's placeholders as ``PixtralProcessor.replace_image_token`` lays them out: ``cols`` tokens and a
    break per row, the last break replaced by the end token."""
    return (rows * (token * cols + row_break))[: -len(row_break)] + end


class Mistral3Adapter(UnpaddedPositionsPromptCache, ChatTemplateAdapter):
    image_marker = "[IMG]"
    image_token = "[IMG]"
    image_break = "[IMG_BREAK]"
    image_end = "[IMG_END]"
    padded_keys = ("pixel_values",)  # (1, 3, H, W) per image, padded bottom-right to the batch's largest
    static_decoding_verified = True
    grounding_prior = False  # no documented grounding: a grounding warm start first (docs/grounding_warm_start.md)
    pins_template_date = True  # render(): the default system message dated PROMPT_DATE (it warns where it cannot)

    def __init__(self, tokenizer, image_processor, config, box_format: str = "native"):
        super().__init__(tokenizer, image_processor, config, box_format)
        self.token_ids(self.image_break)
        # What PixtralProcessor passes its image processor: the merged patch, so that each side is a whole number
        # of the patch merger's spatial_merge_size x spatial_merge_size blocks.
        self.merged_patch = config.vision_config.patch_size * config.spatial_merge_size
        self.system_message = self._fixed_date_system_message()

    def vision_trunk(self, model):
        """None: no vision cache. The Pixtral tower takes images of different sizes in one call, as one sequence of all
        their patches (batch 1) under a block-diagonal mask; an image's rows run along dim 1, not dim 0, and the call
        cannot be cut per image by its pixel rows (each image is zero-padded to the batch's largest, then cropped by
        ``image_sizes``). Every pass runs the whole tower (correct, slower)."""
        return None

    def _fixed_date_system_message(self) -> str | None:
        """The template's default system message with ``PROMPT_DATE`` for today's date; ``None`` (the template's own
        rendering, dated today, with a warning) where the template writes no dated default message, or renders a given
        one otherwise than its default."""
        before = datetime.date.today()
        default = super().render("q")
        days = {f"{day:%Y-%m-%d}" for day in (before, datetime.date.today())}  # a render across midnight
        found = _SYSTEM_TURN.search(default)
        if found is None or not any(day in found.group(1) for day in days):
            return None
        fixed = default
        for day in days:
            fixed = fixed.replace(day, PROMPT_DATE)
        message = _SYSTEM_TURN.search(fixed).group(1)
        if super().render("q", system=message) != fixed:
            logger.warning("mistral3: the chat template renders a given system message otherwise than its default "
                           "one; prompts carry today's date (a run that crosses midnight changes them)")
            return None
        return message

    def render(self, user_text: str, system: str | None = None) -> str:
        """The processor's rendering, its default system message dated ``PROMPT_DATE`` instead of today."""
        return super().render(user_text, self.system_message if system is None else system)

    def preprocess_image(self, image):
        out = self.image_processor(images=[image], patch_size=self.merged_patch, return_tensors="pt")
        height, width = (int(v) for v in out["image_sizes"][0])
        rows, cols = height // self.merged_patch, width // self.merged_patch
        block = pixtral_image_block(rows, cols, self.image_token, self.image_break, self.image_end)
        tensors = {"pixel_values": out["pixel_values"], "image_sizes": out["image_sizes"]}
        return TemplateImageInputs(tensors, rows * cols, (width, height), block)


register(Family("Mistral 3 (Mistral Small 3.1 / 3.2)", ("mistral3",), Mistral3Adapter, auto_image_text_to_text))
