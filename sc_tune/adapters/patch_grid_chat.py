"""Shared machinery of the chat VLMs whose image processor cuts a picture into a patch grid (``image_grid_thw``).

Qwen2-VL, Qwen2.5-VL, Qwen3-VL(-MoE), Qwen3.5(-MoE) and GLM-4.1V/4.5V/4.6V all preprocess an image into
``pixel_values`` + ``image_grid_thw``, stand one placeholder token in the text for every merged patch
(``grid_t * grid_h * grid_w / merge_size**2``) and want ``mm_token_type_ids`` (1 on image tokens) so that
their 3-D rotary positions (M-RoPE) know where the image is. Subclasses say how a chat turn is written, which
token is the image placeholder and how a box is written.
"""

from __future__ import annotations

import torch

from sc_tune.adapters.base import ImageInputs, ModelAdapter, load_chat_tokenizer


class PatchGridChatAdapter(ModelAdapter):
    per_token_keys = ("mm_token_type_ids",)
    vision_prefix = "model.visual"

    image_token: str  # the placeholder repeated once per merged patch, e.g. "<|image_pad|>"

    @classmethod
    def from_pretrained(cls, path, box_format="native"):
        from transformers import AutoImageProcessor

        adapter = cls(load_chat_tokenizer(path), AutoImageProcessor.from_pretrained(path), box_format)
        adapter.check_chat_template(path)
        return adapter

    def __init__(self, tokenizer, image_processor, box_format="native"):
        super().__init__(tokenizer, box_format)
        self.image_processor = image_processor
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.merge_size = int(image_processor.merge_size)
        self.patch_size = int(image_processor.patch_size)

    def prepare_image(self, image) -> ImageInputs:
        out = self.image_processor(images=[image.convert("RGB")], return_tensors="pt")
        grid_thw = out["image_grid_thw"]
        _, grid_h, grid_w = (int(v) for v in grid_thw[0])
        num_tokens = int(grid_thw.prod()) // (self.merge_size**2)
        frame = (grid_w * self.patch_size, grid_h * self.patch_size)
        return ImageInputs({"pixel_values": out["pixel_values"], "image_grid_thw": grid_thw}, num_tokens, frame)

    def encode_prompt(self, text, image):
        if text.count(self.image_token) != 1:
            raise ValueError(f"a prompt must hold exactly one {self.image_token} placeholder: {text!r}")
        expanded = text.replace(self.image_token, self.image_token * image.num_tokens)
        return self.tokenizer(expanded, add_special_tokens=False)["input_ids"]

    def image_batch(self, images, input_ids):
        return {
            "pixel_values": torch.cat([im.tensors["pixel_values"] for im in images], dim=0),
            "image_grid_thw": torch.cat([im.tensors["image_grid_thw"] for im in images], dim=0),
            "mm_token_type_ids": (input_ids == self.image_token_id).to(torch.int32),
        }
