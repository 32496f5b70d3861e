"""Adapter for GLM-4.1V / GLM-4.5V / GLM-4.6V (``glm4v``, ``glm4v_moe``, ``glm46v``), transformers-native.

Prompt (one user turn, GLM's chat format)::

    [gMASK]<sop><|user|>\n<|begin_of_image|><|image|><|end_of_image|>TEXT<|assistant|>\n<think></think>\n

- image: ``<|image|>`` repeated once per merged patch between ``<|begin_of_image|>`` and ``<|end_of_image|>``
  (read from ``transformers/models/glm4v/processing_glm4v.py``: ``image_token``, ``replace_image_token`` and
  the frame layout of ``replace_frame_token_id``); ``mm_token_type_ids`` is 1 on those tokens, as the
  processor's ``create_mm_token_type_ids`` makes it for images;
- box: ``<|begin_of_box|>[[x1, y1, x2, y2]]<|end_of_box|>``, relative coordinates on 0..1000
  (``round(x_pixel / W * 1000)``);
- the answer ends when the model opens the next user turn: ``<|user|>`` (with ``<|endoftext|>`` and
  ``<|observation|>`` also stopping generation, as the released generation configs list).

Uncertain, and the sources: the installed transformers holds no GLM chat template (it ships with each
checkpoint), so the turn layout above is the GLM-4 chat format as the GLM-V repository's examples show it.
The relative 0..1000 convention is stated by zai-org's GLM-V grounding skill ("x=round(x_pixel/W*1000)");
the box tokens and the double brackets inside them are how GLM-4.5V answers grounding prompts in the GLM-V
examples, not a documented contract. GLM-4.1V-Thinking always reasons first; the empty ``<think></think>``
block (GLM-4.5V's template with thinking switched off) asks for the answer directly. SC-Tune's locator
phase trains the model on exactly these targets, so a mismatch costs warm-up, not correctness.
"""

from __future__ import annotations

from sc_tune.adapters.patch_grid_chat import PatchGridChatAdapter
from sc_tune.adapters.registry import Family, auto_image_text_to_text, register
from sc_tune.box_codecs import NestedListGridCodec
from sc_tune.models.tiny_configs import save_tiny_model

IMAGE_PLACEHOLDER = "<|begin_of_image|><|image|><|end_of_image|>"
END_TOKENS = ("<|user|>", "<|endoftext|>", "<|observation|>")


class Glm4vAdapter(PatchGridChatAdapter):
    native_codec = NestedListGridCodec(1000)
    image_token = "<|image|>"
    static_decoding_verified = True  # M-RoPE positions advance by one per token on each axis
    # downsample (the 2x2 patch-merging convolution) and merger (the projector) connect the tower to the LM.
    vision_trainable_prefixes = ("model.visual.downsample", "model.visual.merger")
    # Dense layers fuse gate and up into gate_up_proj; MoE layers keep gate/up/down in their shared experts
    # and first dense layer (routed experts are fused 3-D parameters LoRA does not reach).
    lora_target_modules = (
        r"model\.language_model\..*\.(q_proj|k_proj|v_proj|o_proj|gate_up_proj|gate_proj|up_proj|down_proj)"
    )

    def turn(self, user_text: str) -> str:
        return f"[gMASK]<sop><|user|>\n{user_text}<|assistant|>\n<think></think>\n"

    def _box(self, box_norm, image) -> str:
        return f"<|begin_of_box|>{self.codec.format(box_norm, image.frame)}<|end_of_box|>"

    def describer_prompt(self, box_norm, image):
        return self.turn(f"{IMAGE_PLACEHOLDER}Describe the object in {self._box(box_norm, image)} in a few words.")

    def locator_prompt(self, caption, image):
        return self.turn(f"{IMAGE_PLACEHOLDER}Locate {caption}. {self.codec.request}")

    def locator_target(self, box_norm, image):
        return f"{self._box(box_norm, image)}{self.end_text}"

    @property
    def end_text(self) -> str:
        return END_TOKENS[0]

    @property
    def end_token_ids(self) -> list[int]:
        vocab = self.special_tokens()
        return [vocab[t] for t in END_TOKENS if t in vocab]


register(
    Family(
        "GLM-4.1V / 4.5V / 4.6V",
        ("glm4v", "glm4v_moe", "glm46v"),
        Glm4vAdapter,
        auto_image_text_to_text,
        save_tiny_model,
    )
)
