"""Adapters for the transformers-native Qwen VL families: Qwen2-VL, Qwen2.5-VL, Qwen3-VL(-MoE), Qwen3.5(-MoE).

All use the ChatML turn format and the same image placeholder
(``<|vision_start|><|image_pad|>...<|vision_end|>``); they differ in how a box is written:

- Qwen2-VL: ``<|box_start|>(x1,y1),(x2,y2)<|box_end|>`` on a 0..1000 grid, the caption framed by
  ``<|object_ref_start|>...<|object_ref_end|>`` as in its grounding data;
- Qwen2.5-VL: ``{"bbox_2d": [x1, y1, x2, y2]}`` in absolute pixels of the resized input;
- Qwen3-VL, Qwen3.5: the same JSON on a 0..1000 grid.
"""

from __future__ import annotations

import torch

from sc_tune.adapters.base import find_submodule
from sc_tune.adapters.patch_grid_chat import PatchGridChatAdapter
from sc_tune.adapters.registry import Family, auto_image_text_to_text, register
from sc_tune.box_codecs import JsonGridCodec, JsonPixelCodec, PairGridCodec
from sc_tune.models.tiny_configs import save_tiny_model
from sc_tune.vision_cache import VisionTrunk

IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"
_LM_PROJECTIONS = "q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj"


class _QwenChatVLAdapter(PatchGridChatAdapter):
    image_token = "<|image_pad|>"
    assistant_prefix = ""  # what the chat template writes at the start of every assistant turn
    vision_trainable_prefixes = ("model.visual.merger",)
    # M-RoPE positions advance by one per token on every axis; Qwen3.5's Gated DeltaNet layers keep a recurrent state
    # that a static cache updates in place.
    static_decoding_verified = True
    # MoE variants: the routed experts are fused 3-D parameters, not Linear modules, so LoRA reaches the
    # attention (and any shared expert) only.
    lora_target_modules = rf"model\.language_model\..*\.({_LM_PROJECTIONS})"

    def vision_trunk(self, model):
        # The merger reads the last block; Qwen3-VL's DeepStack mergers also read blocks
        # ``deepstack_visual_indexes``. Every block keeps each image's patches contiguous (Qwen2.5-VL's
        # window order is per image), so block outputs split per image like the pixel rows do.
        tower = find_submodule(model, self.vision_prefix)
        blocks = list(tower.blocks)
        read = {len(blocks) - 1, *getattr(tower, "deepstack_visual_indexes", ())}
        return VisionTrunk(
            tower,
            replayed=[blocks[i] for i in sorted(read)],
            skipped=[b for i, b in enumerate(blocks) if i not in read],
            image_pixels=_pixel_rows_per_image,
            # last_hidden_state (patch rows, window order within each image), pooler_output (the merged rows,
            # back in image order) and Qwen3-VL's deepstack_features all keep each image's rows together.
            output_rows_per_image=True,
        )

    def resumes_from_scoring_cache(self, model, prompt_length, scored_length):
        # transformers keeps the multimodal rope offset (``rope_deltas``) of the last prefill and continues from
        # it when generate starts on a cache; text after the prompt advances every position axis by one per
        # token, so the scoring pass's offset is the prompt's (tests/test_prompt_cache.py checks the logits).
        return True

    def resumed_decoding_inputs(self, inputs):
        # The first decoding step would run the tower on pixel_values and find no <|image_pad|> to put them in.
        return {k: v for k, v in inputs.items() if k != "pixel_values"}

    def turn(self, user_text: str) -> str:
        return f"<|im_start|>user\n{user_text}<|im_end|>\n<|im_start|>assistant\n{self.assistant_prefix}"

    @property
    def end_text(self) -> str:
        return "<|im_end|>"


def _pixel_rows_per_image(args, kwargs):
    """The tower is called as ``visual(pixel_values, grid_thw=...)``: patch rows, ``t*h*w`` per image."""
    pixels = args[0] if args else kwargs["hidden_states"]
    grid_thw = kwargs["grid_thw"] if "grid_thw" in kwargs else args[1]
    return list(torch.split(pixels, grid_thw.prod(-1).tolist()))


class Qwen2VLAdapter(_QwenChatVLAdapter):
    native_codec = PairGridCodec(scale=1000)

    def describer_prompt(self, box_norm, image):
        box = f"<|box_start|>{self.codec.format(box_norm, image.frame)}<|box_end|>"
        return self.turn(f"{IMAGE_PLACEHOLDER}Describe the object in {box} in a few words.")

    def locator_prompt(self, caption, image):
        ref = f"<|object_ref_start|>{caption}<|object_ref_end|>"
        # The assistant turn is opened with the reference and <|box_start|>, Qwen2-VL's grounding answer
        # format, so the continuation is exactly the box.
        return self.turn(f"{IMAGE_PLACEHOLDER}Find {ref}.") + f"{ref}<|box_start|>"

    def locator_target(self, box_norm, image):
        return f"{self.codec.format(box_norm, image.frame)}<|box_end|>{self.end_text}"


class _JsonBoxAdapter(_QwenChatVLAdapter):
    def describer_prompt(self, box_norm, image):
        return self.turn(
            f"{IMAGE_PLACEHOLDER}Describe the object at {self.codec.format(box_norm, image.frame)} in a few words."
        )

    def locator_prompt(self, caption, image):
        return self.turn(f"{IMAGE_PLACEHOLDER}Locate {caption}. {self.codec.request}")

    def locator_target(self, box_norm, image):
        return f"{self.codec.format(box_norm, image.frame)}{self.end_text}"


class Qwen25VLAdapter(_JsonBoxAdapter):
    native_codec = JsonPixelCodec()


class Qwen3VLAdapter(_JsonBoxAdapter):
    native_codec = JsonGridCodec(scale=1000)
    vision_trainable_prefixes = ("model.visual.merger", "model.visual.deepstack_merger_list")


class Qwen35Adapter(_JsonBoxAdapter):
    """Qwen3.5 / 3.6 / 3.8: vision folded into the main model, boxes as Qwen3-VL (JSON ``bbox_2d``, 0..1000).

    Uncertain, and why: the Qwen3.5 checkpoints think by default. We open every assistant turn with the
    empty reasoning block ``<think>\\n\\n</think>\\n\\n`` that the Qwen3 chat templates write when thinking is
    switched off (``enable_thinking=False``), so the answer is the caption or the box directly. The box
    convention (relative 0..1000) is the Qwen blog's and a Qwen maintainer's statement, not a chat-template
    fact. The vision tower has no DeepStack mergers: ``fix_vit`` keeps only ``model.visual.merger``.
    The text model is hybrid: Gated DeltaNet (linear attention) layers whose projections
    (``in_proj_qkv``, ``in_proj_z``, ``out_proj``) LoRA also targets, between full-attention layers.
    """

    native_codec = JsonGridCodec(scale=1000)
    assistant_prefix = "<think>\n\n</think>\n\n"
    lora_target_modules = rf"model\.language_model\..*\.({_LM_PROJECTIONS}|in_proj_qkv|in_proj_z|out_proj)"

    def resumes_from_scoring_cache(self, model, prompt_length, scored_length):
        # The Gated DeltaNet layers cache a recurrent state, not per-column keys: the state after prompt +
        # caption cannot be cropped back to the prompt's.
        return False


# One entry per family; a family serves its dense and MoE checkpoints alike (same prompts, codec, vision).
for _name, _model_types, _adapter in (
    ("Qwen2-VL", ("qwen2_vl",), Qwen2VLAdapter),
    ("Qwen2.5-VL", ("qwen2_5_vl",), Qwen25VLAdapter),
    ("Qwen3-VL / Qwen3-VL-MoE", ("qwen3_vl", "qwen3_vl_moe"), Qwen3VLAdapter),
    ("Qwen3.5 / 3.6 / 3.8", ("qwen3_5", "qwen3_5_moe"), Qwen35Adapter),
):
    register(Family(_name, _model_types, _adapter, auto_image_text_to_text, save_tiny_model))
