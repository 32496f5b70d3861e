"""Ovis2 (``ovis2``: the transformers-format Ovis2-1B ... 34B, e.g. ``thisisiron/Ovis2-2B-hf``): a chat-template
adapter, generic box codec.

Box convention: none documented for Ovis2. Neither the Ovis2 model cards (huggingface.co/AIDC-AI/Ovis2-1B ... 34B)
nor the AIDC-AI/Ovis README of the Ovis2 release show a grounding prompt or answer (searched 2026-12-05). The form
``<ref>phrase</ref><box>(x1,y1),(x2,y2)</box>`` with coordinates relative to the image, 0..1 with three decimals, is
its successor's: the Ovis2.5 Technical Report (arXiv:2508.11737, appendix A.7, figure 15) shows "The
<ref>airplane</ref> is found within <box>(0.613,0.085),(0.632,0.107)</box> of the image.", and an Ovis maintainer
answers "相对坐标" (relative coordinates) for Ovis2.5 (ATH-MaaS/Ovis issue 119). Ovis2.5 is another model (a
native-resolution ViT, Qwen3; not this ``model_type``), and its grounding table (table 7) has no Ovis2 row, so the
form is not assumed here: this adapter uses the generic codec ``[x1, y1, x2, y2]`` on 0..1000
(``sc_tune.box_codecs.GENERIC_CODEC``), requested in the locator prompt, and Ovis2 has no grounding prior (a
grounding warm start first, docs/grounding_warm_start.md). The generic codec refuses Ovis2.5's answer (no
``[x1, y1, x2, y2]`` list) and its 0..1 numbers in a list (normalised: ambiguous on a 0..1000 grid).

Images (transformers 5.24 ``models/ovis2``): the chat template writes ``<image>\\n`` for an image, where
``<image>`` is plain text (the released tokenizer adds only ``<IMG_ATOM>``, ``<IMG_START>``, ``<IMG_GRID>``,
``<IMG_COL>``, ``<IMG_ROW>`` and ``<IMG_END>``: transformers' ``convert_ovis2_weights_to_hf.py``) that
``Ovis2Processor.replace_image_token`` expands to ``<IMG_START>``, one tile of ``<IMG_ATOM>`` (the whole image, or
its thumbnail when it is cut into tiles), ``<IMG_GRID>``, then each tile's atoms separated by ``<IMG_COL>`` /
``<IMG_ROW>``, and ``<IMG_END>``. The model puts one visual embedding on each ``<IMG_ATOM>`` (``image_token_id``) and
its learnt indicator embeddings on the five others (``visual_indicator_token_ids``). The tiles come from the
checkpoint's image processor (the release cuts into up to 12 tiles: ``crop_to_patches``), ``pixel_values`` one row
per tile, exactly as transformers' ``Ovis2Processor`` builds them. (Not corrected here: for a grid that is not square,
transformers 5.24's ``Ovis2ImageProcessorPil.crop_image_to_patches`` reads the covering grid, which is (rows, columns),
as (columns, rows), so a wide photo is resized onto a tall canvas of 2 rows x 1 column; the original Ovis2 code,
AIDC-AI/Ovis ``base_visual_tokenizer.py`` ``_partition``, crops 1 row x 2 columns of the photo itself.)

``fix_vit`` freezes the ViT of ``model.vision_tower`` and keeps its visual head (``head_linear``, ``head_norm``)
trainable, as Ovis's own training names the head apart from the backbone (AIDC-AI/Ovis
``ovis/train/train.py``: ``train_modules`` ``visual_tokenizer.head``, ``vte``); the visual embedding table
(``model.visual_embeddings_table``) lies outside the tower and stays trainable. LoRA: the Qwen2 projections of
``model.language_model``.
"""

from __future__ import annotations

import math

from sc_tune.adapters.base import find_submodule
from sc_tune.adapters.chat_template import ChatTemplateAdapter, TemplateImageInputs
from sc_tune.adapters.registry import Family, auto_image_text_to_text, register
from sc_tune.adapters.stacked_tiles import stacked_tiles_trunk
from sc_tune.adapters.unpadded_positions import UnpaddedPositionsPromptCache

# The visual indicators between and around the tiles, besides IMG_START / IMG_END (the model embeds each its own way).
TILE_SEPARATORS = ("<IMG_GRID>", "<IMG_COL>", "<IMG_ROW>")


class Ovis2Adapter(UnpaddedPositionsPromptCache, ChatTemplateAdapter):
    image_marker = "<image>"
    image_marker_is_token = False
    image_token = "<IMG_ATOM>"
    image_start = "<IMG_START>"
    image_end = "<IMG_END>"
    end_token = "<|im_end|>"
    grounding_prior = False  # no documented grounding: a grounding warm start first (docs/grounding_warm_start.md)
    vision_trainable_prefixes = ("model.vision_tower.head_linear", "model.vision_tower.head_norm")
    # A Qwen2 text model under 1-D positions, which generate hands every step (the unpadded count, see
    # UnpaddedPositionsPromptCache); the visual embeddings and indicator tokens are placed at the prefill only.
    static_decoding_verified = True

    def __init__(self, tokenizer, image_processor, config, box_format: str = "native"):
        super().__init__(tokenizer, image_processor, config, box_format)
        self.token_ids(*TILE_SEPARATORS)
        self.tile_tokens = tile_tokens(config.vision_config)
        self._placeholders = _placeholder_writer(image_processor, tokenizer, self.tile_tokens)

    def vision_trunk(self, model):
        # The tiles (and the whole-image view) are stacked along dim 0 and encoded each on its own by the AIMv2-style
        # transformer; the visual head (head_linear, head_norm: the trainable tail) reads its last layer, after the
        # RMS norm. Its "gumbel_argmax" tokenize function draws noise in every call: then the frozen tower's output is
        # no function of the pixels and is not memoised whole (the releases' "softmax" is).
        deterministic = model.config.vision_config.tokenize_function != "gumbel_argmax"
        return stacked_tiles_trunk(find_submodule(model, self.vision_prefix), memoise_output=deterministic)

    def preprocess_image(self, image):
        out = self.image_processor(images=[image], return_tensors="pt")
        pixel_values = out["pixel_values"]  # (tiles, 3, H, W): the thumbnail, then the tiles when cut
        placeholder = self._placeholders.replace_image_token(out, 0)
        num_tokens = int(pixel_values.shape[0]) * self.tile_tokens
        frame = (int(pixel_values.shape[-1]), int(pixel_values.shape[-2]))
        return TemplateImageInputs({"pixel_values": pixel_values}, num_tokens, frame, placeholder)


def tile_tokens(vision) -> int:
    """``<IMG_ATOM>`` tokens per tile: its patches, merged ``hidden_stride`` x ``hidden_stride`` (the vision tower pads
    the patch grid up to a multiple of the stride). 256 in the releases: 448 px tiles, 14 px patches, stride 2."""
    image_size = vision.image_size if isinstance(vision.image_size, int) else vision.image_size[0]
    patch_size = vision.patch_size if isinstance(vision.patch_size, int) else vision.patch_size[0]
    return math.ceil(image_size // patch_size / vision.hidden_stride) ** 2


def _placeholder_writer(image_processor, tokenizer, tile_tokens: int):
    """transformers' own ``Ovis2Processor``, for its ``replace_image_token`` (the tile grid's placeholder text). It needs
    no video processor, so it is built here without torchvision; it is not used to tokenise."""
    from transformers.models.ovis2.processing_ovis2 import Ovis2Processor

    return Ovis2Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_length=tile_tokens)


register(Family("Ovis2", ("ovis2",), Ovis2Adapter, auto_image_text_to_text))
