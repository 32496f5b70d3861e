"""Adapter for GLM-4.1V / GLM-4.5V / GLM-4.6V (``glm4v``, ``glm4v_moe``, ``glm46v``), transformers-native.

Prompts are rendered by the checkpoint's chat template (``[gMASK]<sop><|user|>\n`` + the image block + text,
then ``<|assistant|>``), with ``enable_thinking=False``: the GLM-4.5V/4.6V templates then append ``/nothink``
to the user turn and open the answer with an empty ``<think></think>``.

- image: ``<|image|>`` repeated once per merged patch between ``<|begin_of_image|>`` and ``<|end_of_image|>``
  (``transformers/models/glm4v/processing_glm4v.py``); ``mm_token_type_ids`` is 1 on those tokens;
- box: relative coordinates on 0..1000 inside ``<|begin_of_box|>…<|end_of_box|>``. The zai-org/GLM-V README
  (Grounding) says the bracket style inside varies: ``[]``, ``[[]]``, ``()``, ``<>``; all four read here, a
  list of boxes reads as its first. The target writes ``[[x1, y1, x2, y2]]``, the style of the README's
  examples; the locator prompt names it.
- the answer ends when the model opens the next user turn: ``<|user|>`` (``<|endoftext|>`` and
  ``<|observation|>`` also stop generation, as the released generation configs list).

GLM-4.1V-Thinking is reasoning-only: its template has no switch (neither ``enable_thinking`` nor
``/nothink``), so it is refused by name (``ThinkingOnlyCheckpoint``); use GLM-4.5V/4.6V.
"""

from __future__ import annotations

from sc_tune.adapters.base import DocumentedAnswer, ThinkingOnlyCheckpoint
from sc_tune.adapters.patch_grid_chat import PatchGridChatAdapter
from sc_tune.adapters.registry import Family, auto_image_text_to_text, register
from sc_tune.box_codecs import BracketListCodec

GLM_V_README = "zai-org/GLM-V README, Grounding"
END_TOKENS = ("<|user|>", "<|endoftext|>", "<|observation|>")


class Glm4vAdapter(PatchGridChatAdapter):
    native_codec = BracketListCodec(1000, styles="[(<")
    documented_answers = tuple(
        DocumentedAnswer(f"<|begin_of_box|>{inner}<|end_of_box|>", (0.1, 0.2, 0.5, 0.6), GLM_V_README)
        for inner in ("[[100, 200, 500, 600]]", "[100,200,500,600]", "(100,200,500,600)", "<100, 200, 500, 600>")
    ) + (
        DocumentedAnswer("<|begin_of_box|>[[100, 200, 500, 600], [700, 700, 900, 900]]<|end_of_box|>",
                         (0.1, 0.2, 0.5, 0.6), GLM_V_README + ": a list of boxes, the first read"),
        DocumentedAnswer("<|begin_of_box|>(100, 200, 500, 600]<|end_of_box|>", None, "mismatched brackets"),
    )
    image_token = "<|image|>"
    static_decoding_verified = True  # M-RoPE positions advance by one per token on each axis
    # downsample (the 2x2 patch-merging convolution) and merger (the projector) connect the tower to the LM.
    vision_trainable_prefixes = ("model.visual.downsample", "model.visual.merger")
    # Dense layers fuse gate and up into gate_up_proj; MoE layers keep gate/up/down in their shared experts
    # and first dense layer (routed experts are fused 3-D parameters: --lora_target_experts, sc_tune.moe).
    lora_target_modules = (
        r"model\.language_model\..*\.(q_proj|k_proj|v_proj|o_proj|gate_up_proj|gate_proj|up_proj|down_proj)"
    )
    lora_expert_parameters = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")  # --lora_target_experts

    def check_chat_template(self, name):
        super().check_chat_template(name)
        template = self.tokenizer.chat_template
        if "enable_thinking" not in template and "nothink" not in template:
            raise ThinkingOnlyCheckpoint(
                f"{name}: its GLM chat template has no switch to turn reasoning off (GLM-4.1V-Thinking is a "
                "reasoning-only release); SC-Tune's 20-40-token answers cannot hold its reasoning. Use "
                "GLM-4.5V or GLM-4.6V, whose templates switch it off."
            )

    def _box(self, box_norm, image) -> str:
        return f"<|begin_of_box|>{self.codec.format(box_norm, image.frame)}<|end_of_box|>"

    def describer_prompt(self, box_norm, image):
        return self.render(f"Describe the object in {self._box(box_norm, image)} in a few words.")

    def locator_prompt(self, caption, image):
        return self.render(f"Locate {caption}. Answer with its box as [[x1, y1, x2, y2]] on 0 to 1000.")

    def locator_target(self, box_norm, image, caption=""):
        # The template renders an assistant answer as "\n" + content after the (empty) think block.
        return f"\n{self._box(box_norm, image)}{self.end_text}"

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
    )
)
