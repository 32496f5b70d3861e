"""Shared machinery of the chat VLMs whose image processor cuts a picture into a patch grid (``image_grid_thw``).

Qwen2-VL, Qwen2.5-VL, Qwen3-VL(-MoE), Qwen3.5(-MoE) and GLM-4.1V/4.5V/4.6V all preprocess an image into
``pixel_values`` + ``image_grid_thw``, stand one placeholder token in the text for every merged patch
(``grid_t * grid_h * grid_w / merge_size**2``) and want ``mm_token_type_ids`` (1 on image tokens) so that
their 3-D rotary positions (M-RoPE) know where the image is. Prompts go through the checkpoint's chat template
(``ModelAdapter.render``); subclasses say which token is the image placeholder and how a box is written.
EXAONE 4.5, HyperCLOVA X SEED Vision v2 and VideoLLaMA3 share the grid and the placeholder count but not the
M-RoPE: they set ``per_token_keys = ()`` (no ``mm_token_type_ids``), and VideoLLaMA3 adds the processor's
``image_merge_sizes`` to ``image_keys``. Those three and North (Qwen3-VL's grid and M-RoPE, Cohere's turns) prompt in
words and read the turn end from the checkpoint's template (``GenericTemplatePatchGridAdapter``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from sc_tune.adapters.base import ImageInputs, ModelAdapter, language_model_lora_targets, load_chat_tokenizer
from sc_tune.adapters.chat_template import GenericTemplateTurns, answer_opening, turn_end_token
from sc_tune.vision_cache import VisionTrunk

DEFAULT_IMAGE_TOKEN = "<|image_pad|>"  # the processors' placeholder where the tokenizer names no image_token


def processor_image_token(tokenizer) -> str:
    """The image token the 1-D-position patch-grid processors expand (``Exaone4_5_Processor``,
    ``HyperCLOVAXVisionV2Processor``, ``VideoLlama3Processor``): the tokenizer's ``image_token`` where it has one,
    else ``<|image_pad|>``."""
    return tokenizer.image_token if hasattr(tokenizer, "image_token") else DEFAULT_IMAGE_TOKEN


# Tower arguments that say nothing about the images: a call with only these besides the pixels and the per-image
# arguments can be cut to some of its images. Anything else (precomputed cu_seqlens or positions of the whole call)
# keeps it whole.
_IMAGE_FREE_KWARGS = {"return_dict", "use_cache", "output_hidden_states", "output_attentions"}


@dataclass(frozen=True)
class PatchGridTowerCall:
    """How a patch-grid tower is called: its flattened patch rows first (``t * h * w`` rows per image, the images one
    after another), then arguments holding one row per image (``grid_thw``; VideoLLaMA3's ``merge_sizes``), each by
    position or by name."""

    # The tower's forward parameters in order: the pixel rows', then the per-image ones.
    names: tuple[str, ...] = ("hidden_states", "grid_thw")

    def _values(self, args, kwargs) -> list[torch.Tensor]:
        return [args[i] if i < len(args) else kwargs[name] for i, name in enumerate(self.names)]

    def pixels_per_image(self, args, kwargs) -> list[torch.Tensor]:
        pixels, grid_thw = self._values(args, kwargs)[:2]
        return list(torch.split(pixels, grid_thw.prod(-1).tolist()))

    def with_images(self, args, kwargs, indices):
        """The call for the images at ``indices`` only, or None where it carries more than images and free flags."""
        if len(args) > len(self.names) or set(kwargs) - set(self.names) - _IMAGE_FREE_KWARGS:
            return None
        per_image = self.pixels_per_image(args, kwargs)
        per_image_arguments = self._values(args, kwargs)[1:]
        chosen = torch.tensor(indices, device=per_image_arguments[0].device)
        rest = {key: value for key, value in kwargs.items() if key in _IMAGE_FREE_KWARGS}
        cut = {name: value.index_select(0, chosen.to(value.device))
               for name, value in zip(self.names[1:], per_image_arguments)}
        return (torch.cat([per_image[i] for i in indices]),), {**rest, **cut}


def patch_grid_vision_trunk(tower: nn.Module, blocks: Sequence[nn.Module], replayed: Sequence[nn.Module],
                            call: PatchGridTowerCall = PatchGridTowerCall()) -> VisionTrunk:
    """The frozen trunk of a patch-grid tower for ``sc_tune.vision_cache``: ``replayed`` are the modules whose outputs
    the trainable tail reads (a last block, a post-layernorm), the other ``blocks`` are skipped when replaying.

    What the family vouches for by calling this (read off its transformers modeling code): every block attends
    within one image at a time (``cu_seqlens``; a window reordering stays within each image), so every trunk
    module's output holds each image's rows contiguously in batch order, as many as its pixel rows; every tensor
    of the tower's output holds each image's rows together in proportion to its pixel rows; the attention takes
    packed windows where a flash implementation is configured (``packed_attention_config``)."""
    replayed_ids = {id(module) for module in replayed}
    return VisionTrunk(
        tower,
        replayed=list(replayed),
        skipped=[block for block in blocks if id(block) not in replayed_ids],
        image_pixels=call.pixels_per_image,
        output_rows_per_image=True,
        images_call=call.with_images,
        packed_attention_config=tower.config,
    )


class PatchGridChatAdapter(ModelAdapter):
    per_token_keys = ("mm_token_type_ids",)
    vision_prefix = "model.visual"

    image_token: str  # the placeholder repeated once per merged patch, e.g. "<|image_pad|>"
    # The image processor's outputs the model takes, one row (or block of rows) per image, concatenated per batch.
    image_keys: tuple[str, ...] = ("pixel_values", "image_grid_thw")
    # Whether the processor's size bounds count an image's frames too: GLM-4.1V's bound frames x height x width, an
    # image being ``temporal_patch_size`` frames; Qwen's bound height x width.
    size_bounds_count_frames: bool = False

    @classmethod
    def from_pretrained(cls, path, box_format="native"):
        from transformers import AutoImageProcessor

        adapter = cls(load_chat_tokenizer(path), AutoImageProcessor.from_pretrained(path), box_format)
        adapter.check_not_thinking_only(path)
        return adapter

    @classmethod
    def from_parts(cls, tokenizer, image_processor, config):
        return cls(tokenizer, image_processor)

    def __init__(self, tokenizer, image_processor, box_format="native"):
        super().__init__(tokenizer, box_format)
        self.image_processor = image_processor
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.merge_size = int(image_processor.merge_size)
        self.patch_size = int(image_processor.patch_size)
        self._size_bounds = None  # the processor's size bounds for --image_min/max_pixels; None: its own

    def limit_image_pixels(self, min_pixels, max_pixels):
        # The processor resizes each image to a multiple of one merged patch per side with its area (width x height)
        # within [shortest_edge, longest_edge] (transformers' smart_resize): the pixel budget Qwen's documentation
        # sets as min_pixels / max_pixels. One image token is one merged patch.
        from sc_tune.arguments import ArgumentError

        token_pixels = (self.patch_size * self.merge_size) ** 2
        for name, value in (("--image_min_pixels", min_pixels), ("--image_max_pixels", max_pixels)):
            if value is not None and value < token_pixels:
                raise ArgumentError(f"{name} {value} is below one image token of {type(self).__name__} "
                                    f"({self.patch_size * self.merge_size} x {self.patch_size * self.merge_size} = "
                                    f"{token_pixels} pixels)")
        frames = int(self.image_processor.temporal_patch_size) if self.size_bounds_count_frames else 1
        size = self.image_processor.size
        low = size["shortest_edge"] if min_pixels is None else min_pixels * frames
        high = size["longest_edge"] if max_pixels is None else max_pixels * frames
        if low > high:
            raise ArgumentError(f"--image_min_pixels {low // frames} is above --image_max_pixels {high // frames} "
                                "(with the checkpoint's own bound for the one not given)")
        self._size_bounds = {"shortest_edge": low, "longest_edge": high}
        self.image_pixel_limits = (min_pixels, max_pixels)

    def prepare_image(self, image) -> ImageInputs:
        bounds = {"size": self._size_bounds} if self._size_bounds is not None else {}
        out = self.image_processor(images=[image.convert("RGB")], return_tensors="pt", **bounds)
        grid_thw = out["image_grid_thw"]
        _, grid_h, grid_w = (int(v) for v in grid_thw[0])
        num_tokens = int(grid_thw.prod()) // (self.merge_size**2)
        frame = (grid_w * self.patch_size, grid_h * self.patch_size)
        return ImageInputs({key: out[key] for key in self.image_keys}, num_tokens, frame)

    def encode_prompt(self, text, image):
        if text.count(self.image_token) != 1:
            raise ValueError(f"a prompt must hold exactly one {self.image_token} placeholder: {text!r}")
        expanded = text.replace(self.image_token, self.image_token * image.num_tokens)
        return self.tokenizer(expanded, add_special_tokens=False)["input_ids"]

    def image_batch(self, images, input_ids):
        batch = {key: torch.cat([im.tensors[key] for im in images], dim=0) for key in self.image_keys}
        if "mm_token_type_ids" in self.per_token_keys:  # M-RoPE families: where the image tokens are
            batch["mm_token_type_ids"] = (input_ids == self.image_token_id).to(torch.int32)
        return batch


class GenericTemplatePatchGridAdapter(GenericTemplateTurns, PatchGridChatAdapter):
    """A patch-grid family without a grounding form of its own, or one that asks in words where it has one: prompts
    in words (``GenericTemplateTurns``' unless a family has its own), the turn end read from the checkpoint's
    template, LoRA on the text model's projections (EXAONE 4.5, HyperCLOVA X SEED Vision v2, VideoLLaMA3, North)."""

    lora_target_modules = language_model_lora_targets("model.language_model")

    def __init__(self, tokenizer, image_processor, box_format="native"):
        super().__init__(tokenizer, image_processor, box_format)
        self.end_token = turn_end_token(tokenizer)
        self.answer_opening = answer_opening(tokenizer)


class OneDPositionPatchGridAdapter(GenericTemplatePatchGridAdapter):
    """A patch-grid family whose processor expands ``processor_image_token`` and whose text model counts 1-D positions
    itself (EXAONE 4.5, HyperCLOVA X SEED Vision v2, VideoLLaMA3): no ``mm_token_type_ids``, no positions passed."""

    per_token_keys = ()  # no mm_token_type_ids: 1-D positions the model counts itself
    # Their text layers decode from a static cache, positions advancing one per token from the cached length
    # (tests/test_decoding.py).
    static_decoding_verified = True

    def __init__(self, tokenizer, image_processor, box_format="native"):
        self.image_token = processor_image_token(tokenizer)
        super().__init__(tokenizer, image_processor, box_format)
