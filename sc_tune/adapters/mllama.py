"""Llama 3.2 Vision (``mllama``: Meta's Llama-3.2-11B / 90B-Vision(-Instruct), ``MllamaForConditionalGeneration``): a
chat-template adapter on a cross-attention model, generic box codec.

Box convention: none found (transformers' ``mllama`` doc, Meta's Llama 3.2 model card and its vision prompt format show
image questions, captions and OCR, no grounding prompt or box answer), so the adapter uses the generic codec
``[x1, y1, x2, y2]`` on 0..1000 (``sc_tune.box_codecs.GENERIC_CODEC``), requested in the locator prompt, and the
checkpoints need a grounding warm start (docs/grounding_warm_start.md).

Template: Llama 3's header tags, ``<|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\n`` + ``<|image|>`` +
text + ``<|eot_id|>``, the answer opened with ``<|start_header_id|>assistant<|end_header_id|>\\n\\n``; the turn's end
is read from the checkpoint's template (``chat_template.turn_end_token``: ``<|eot_id|>``, also the Instruct tokenizer's
EOS). The template writes the BOS, so none is added (``adds_special_tokens``), as ``MllamaProcessor`` tokenises it.

Images: not placeholder tokens. The text holds one ``<|image|>`` token; the image enters through the text model's
cross-attention layers, which read the vision model's features of every tile. ``MllamaImageProcessor`` (PIL backend)
resizes the photo into the best canvas of at most ``max_image_tiles`` tiles and pads it: ``pixel_values``
``(1, images, max_tiles, 3, H, W)`` (tiles past the canvas zero), ``aspect_ratio_ids`` ``(1, images)`` (the canvas's
index in the supported grids, from 1) and ``aspect_ratio_mask`` ``(1, images, max_tiles)`` (1 on the canvas's tiles).
What ``MllamaProcessor`` adds is the ``cross_attention_mask`` ``(B, W, images, max_tiles)``: a text column sees the
image's real tiles from the ``<|image|>`` column on (``get_cross_attention_token_mask`` with one image: to the end),
nothing before it (padding and the BOS), built here from the batch's ids (``cross_attention_mask``). Every column a
batch gains past its prompt (targets, completions) sees them too, as ``generate`` extends the mask by repeating its
last column. ``fix_vit`` freezes ``model.vision_model``; ``model.multi_modal_projector`` stays trainable; LoRA takes
the self- and cross-attention layers' projections of ``model.language_model`` alike.

Caches: static decoding runs (the cross-attention layers' cache holds the vision states, sized by transformers'
``MllamaForConditionalGeneration._prepare_static_cache``; the decode step's self-attention mask spans the text columns
only). Nothing resumes from a scoring pass's cache or moves cached prompt columns (each would need the cross-attention
layers' vision states carried over beside the text columns), and there is no vision cache (``vision_trunk``): each
answers so by name below, and those passes run in full, as a family without them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sc_tune.adapters.chat_template import ChatTemplateAdapter, TemplateImageInputs, processor_tile
from sc_tune.adapters.registry import Family, auto_image_text_to_text, register


class MllamaAdapter(ChatTemplateAdapter):
    image_marker = "<|image|>"
    image_token = "<|image|>"  # the one token the text holds: no placeholders to expand
    vision_prefix = "model.vision_model"
    static_decoding_verified = True
    grounding_prior = False  # no documented grounding: a grounding warm start first (docs/grounding_warm_start.md)

    def __init__(self, tokenizer, image_processor, config, box_format: str = "native"):
        super().__init__(tokenizer, image_processor, config, box_format)
        vision = config.vision_config
        tile = processor_tile(image_processor)
        # The tower's position embeddings are per patch of one image_size tile, and aspect_ratio_ids index the
        # supported grids of max_num_tiles: a processor that tiles otherwise fails inside the model, or reads wrong.
        if tile != (vision.image_size, vision.image_size) or image_processor.max_image_tiles != vision.max_num_tiles:
            raise ValueError(
                f"preprocessor_config.json: size {tile[0]}x{tile[1]} and max_image_tiles "
                f"{image_processor.max_image_tiles} are not the vision tower's vision_config.image_size "
                f"{vision.image_size} and max_num_tiles {vision.max_num_tiles} (config.json): each tile is the tower's "
                "input, and the aspect ratio ids index its supported tile grids"
            )

    def preprocess_image(self, image):
        out = self.image_processor(images=[[image]], return_tensors="pt")
        tensors = {key: out[key] for key in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask")}
        rows, columns = self.config.vision_config.supported_aspect_ratios[int(out["aspect_ratio_ids"][0, 0]) - 1]
        height, width = tensors["pixel_values"].shape[-2:]
        # The canvas of the image's tiles (the resized photo sits in its top left corner, padded to it); the generic
        # codec does not read it.
        frame = (int(columns * width), int(rows * height))
        return TemplateImageInputs(tensors, 1, frame, self.image_token)

    def image_batch(self, images: Sequence[TemplateImageInputs], input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        batch = super().image_batch(images, input_ids)
        batch["cross_attention_mask"] = self.cross_attention_mask(input_ids, batch["aspect_ratio_mask"])
        return batch

    def cross_attention_mask(self, input_ids_BW: torch.Tensor, aspect_ratio_mask_BIT: torch.Tensor) -> torch.Tensor:
        """``MllamaProcessor``'s mask for one image per row: each column from the row's ``<|image|>`` on sees the
        image's real tiles (``aspect_ratio_mask``), the columns before it (left padding, the BOS) none."""
        after_image_BW = (input_ids_BW == self.image_token_id).long().cumsum(dim=1) > 0
        return after_image_BW[:, :, None, None].long() * aspect_ratio_mask_BIT[:, None, :, :]

    def append_completion(self, batch, completion_ids_BT, completion_mask_BT):
        # The completion's columns see the image too: a teacher-forced pass must read it as generate did (its
        # _update_model_kwargs_for_generation repeats the mask's last column per new token).
        inputs = super().append_completion(batch, completion_ids_BT, completion_mask_BT)
        inputs["cross_attention_mask"] = self.cross_attention_mask(inputs["input_ids"], inputs["aspect_ratio_mask"])
        return inputs

    def resumes_from_scoring_cache(self, model, prompt_length, scored_length):
        """No: a cache cropped to the prompt (``keep_prompt_columns``) keeps the cross-attention layers' vision states
        uncropped, and a resumed ``generate`` would get no ``cross_attention_mask`` rows for the cached columns; the
        snapshot's greedy captions prefill their prompts again."""
        return False

    def moves_cached_prompt_columns(self, model, prompt_length):
        """No: moving prompt columns between batches would have to move each row's vision states in the cross-attention
        layers' cache as well; the locator prompts are prefilled in full."""
        return False

    def vision_trunk(self, model):
        """None: no vision cache. The vision model's tiles, aspect-ratio embeddings and global layers are not split
        into per-image blocks here; every pass runs the whole tower (correct, slower)."""
        return None


register(Family("Llama 3.2 Vision", ("mllama",), MllamaAdapter, auto_image_text_to_text))
