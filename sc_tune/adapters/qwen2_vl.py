"""Adapters for the transformers-native Qwen VL families: Qwen2-VL, Qwen2.5-VL and Qwen3-VL.

All three use the ChatML turn format and the same image placeholder
(``<|vision_start|><|image_pad|>...<|vision_end|>``); they differ in how a box is written:

- Qwen2-VL: ``<|box_start|>(x1,y1),(x2,y2)<|box_end|>`` on a 0..1000 grid, the caption framed by
  ``<|object_ref_start|>...<|object_ref_end|>`` as in its grounding data;
- Qwen2.5-VL: ``{"bbox_2d": [x1, y1, x2, y2]}`` in absolute pixels of the resized input;
- Qwen3-VL: the same JSON on a 0..1000 grid.
"""

from __future__ import annotations

import torch

from sc_tune.adapters.base import ImageInputs, ModelAdapter
from sc_tune.adapters.registry import Family, register
from sc_tune.box_codecs import JsonGridCodec, JsonPixelCodec, PairGridCodec
from sc_tune.models.tiny_configs import save_tiny_model

IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"


def _turn(user_text: str) -> str:
    return f"<|im_start|>user\n{user_text}<|im_end|>\n<|im_start|>assistant\n"


class _QwenChatVLAdapter(ModelAdapter):
    per_token_keys = ("mm_token_type_ids",)
    vision_prefix = "model.visual"
    vision_trainable_prefixes = ("model.visual.merger", "model.visual.deepstack_merger_list")
    lora_target_modules = r"model\.language_model\..*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"

    @classmethod
    def from_pretrained(cls, path, box_format="native"):
        from transformers import AutoImageProcessor, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
        return cls(tokenizer, AutoImageProcessor.from_pretrained(path), box_format)

    def __init__(self, tokenizer, image_processor, box_format="native"):
        super().__init__(tokenizer, box_format)
        self.image_processor = image_processor
        self.image_token_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
        self.merge_size = int(image_processor.merge_size)
        self.patch_size = int(image_processor.patch_size)

    @property
    def end_text(self) -> str:
        return "<|im_end|>"

    def prepare_image(self, image) -> ImageInputs:
        out = self.image_processor(images=[image.convert("RGB")], return_tensors="pt")
        grid_thw = out["image_grid_thw"]
        _, grid_h, grid_w = (int(v) for v in grid_thw[0])
        num_tokens = int(grid_thw.prod()) // (self.merge_size**2)
        frame = (grid_w * self.patch_size, grid_h * self.patch_size)
        return ImageInputs({"pixel_values": out["pixel_values"], "image_grid_thw": grid_thw}, num_tokens, frame)

    def encode_prompt(self, text, image):
        if text.count("<|image_pad|>") != 1:
            raise ValueError(f"a prompt must hold exactly one <|image_pad|> placeholder: {text!r}")
        expanded = text.replace("<|image_pad|>", "<|image_pad|>" * image.num_tokens)
        return self.tokenizer(expanded, add_special_tokens=False)["input_ids"]

    def image_batch(self, images, input_ids):
        return {
            "pixel_values": torch.cat([im.tensors["pixel_values"] for im in images], dim=0),
            "image_grid_thw": torch.cat([im.tensors["image_grid_thw"] for im in images], dim=0),
            "mm_token_type_ids": (input_ids == self.image_token_id).to(torch.int32),
        }


class Qwen2VLAdapter(_QwenChatVLAdapter):
    native_codec = PairGridCodec(scale=1000)

    def describer_prompt(self, box_norm, image):
        box = f"<|box_start|>{self.codec.format(box_norm, image.frame)}<|box_end|>"
        return _turn(f"{IMAGE_PLACEHOLDER}Describe the object in {box} in a few words.")

    def locator_prompt(self, caption, image):
        ref = f"<|object_ref_start|>{caption}<|object_ref_end|>"
        # The assistant turn is opened with the reference and <|box_start|>, Qwen2-VL's grounding answer
        # format, so the continuation is exactly the box.
        return _turn(f"{IMAGE_PLACEHOLDER}Find {ref}.") + f"{ref}<|box_start|>"

    def locator_target(self, box_norm, image):
        return f"{self.codec.format(box_norm, image.frame)}<|box_end|>{self.end_text}"


class _JsonBoxAdapter(_QwenChatVLAdapter):
    def describer_prompt(self, box_norm, image):
        return _turn(
            f"{IMAGE_PLACEHOLDER}Describe the object at {self.codec.format(box_norm, image.frame)} in a few words."
        )

    def locator_prompt(self, caption, image):
        return _turn(f"{IMAGE_PLACEHOLDER}Locate {caption}. {self.codec.request}")

    def locator_target(self, box_norm, image):
        return f"{self.codec.format(box_norm, image.frame)}{self.end_text}"


class Qwen25VLAdapter(_JsonBoxAdapter):
    native_codec = JsonPixelCodec()


class Qwen3VLAdapter(_JsonBoxAdapter):
    native_codec = JsonGridCodec(scale=1000)


def _auto_image_text_to_text():
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText


for _name, _model_types, _adapter in (
    ("Qwen2-VL", ("qwen2_vl",), Qwen2VLAdapter),
    ("Qwen2.5-VL", ("qwen2_5_vl",), Qwen25VLAdapter),
    ("Qwen3-VL", ("qwen3_vl",), Qwen3VLAdapter),
):
    register(Family(_name, _model_types, _adapter, _auto_image_text_to_text, save_tiny_model))
