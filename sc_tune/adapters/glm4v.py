"""Adapter for GLM-4.1V / GLM-4.5V / GLM-4.6V (``glm4v``, ``glm4v_moe``, ``glm46v``), transformers-native.

Prompts go through the checkpoint's chat template (``ModelAdapter.render``) with thinking off: the GLM-4.5V /
4.6V templates then append ``/nothink`` to the user turn and open the answer with an empty ``<think></think>``.
One user turn, the image first::

    [gMASK]<sop><|user|>\\n<|begin_of_image|><|image|><|end_of_image|>TEXT/nothink<|assistant|>\\n<think></think>\\n

- image: ``<|image|>`` repeated once per merged patch between ``<|begin_of_image|>`` and ``<|end_of_image|>``
  (``transformers/models/glm4v/processing_glm4v.py``); ``mm_token_type_ids`` is 1 on those tokens;
- locator prompt: "Please pinpoint the bounding box [[x1,y1,x2,y2], …] in the image as per the given description.
  CAPTION" (the GLM-V README's grounding prompt that names the output style);
- answer (the locator's SFT target): ``<|begin_of_box|>[[x1, y1, x2, y2]]<|end_of_box|>``, relative
  coordinates on 0..1000 (README: "each value is normalized by the image width (for x) or height (for y) and
  scaled by 1000"; zai-org's GLM-V grounding skill: ``x=round(x_pixel/W*1000)``);
- the answer ends when the model opens the next user turn: ``<|user|>`` (with ``<|endoftext|>`` and
  ``<|observation|>`` also stopping generation, as the released generation configs list).

What the released models write (``answer_examples``; source: zai-org/GLM-V README, "Grounding": "In the
response, the special tokens <|begin_of_box|> and <|end_of_box|> are used to mark the image bounding box in the
answer. The bracket style may vary ([], [[]], (), <>, etc.), but the meaning is the same"). Every style reads
to the same box (``sc_tune.box_codecs.BracketGridCodec``); anything between the box tokens that is not four
numbers per box is a parse failure with its reason.

Reasoning: GLM-4.5V / 4.6V are hybrid (the template's ``enable_thinking`` switch). GLM-4.1V-9B-Thinking is
reasoning-only: its template (checked against the official ``chat_template.jinja``) has no switch and every
answer starts with ``<think>``; such a checkpoint is refused, naming it (``thinking_only_reason``).
"""

from __future__ import annotations

from sc_tune.adapters.base import DocumentedAnswer, find_submodule
from sc_tune.adapters.patch_grid_chat import PatchGridChatAdapter, patch_grid_vision_trunk
from sc_tune.adapters.registry import Family, auto_image_text_to_text, register
from sc_tune.box_codecs import BracketGridCodec

END_TOKENS = ("<|user|>", "<|endoftext|>", "<|observation|>")
BOX_OPEN, BOX_CLOSE = "<|begin_of_box|>", "<|end_of_box|>"
GROUNDING_PROMPT = "Please pinpoint the bounding box [[x1,y1,x2,y2], …] in the image as per the given description. {}"
_README = "zai-org/GLM-V README.md, Grounding: the bracket style may vary ([], [[]], (), <>, etc.)"


class Glm4vAdapter(PatchGridChatAdapter):
    native_codec = BracketGridCodec(1000, BOX_OPEN, BOX_CLOSE)
    image_token = "<|image|>"
    static_decoding_verified = True  # M-RoPE positions advance by one per token on each axis
    size_bounds_count_frames = True  # transformers' GLM-4V smart_resize bounds frames x height x width
    # downsample (the 2x2 patch-merging convolution) and merger (the projector) connect the tower to the LM.
    vision_trainable_prefixes = ("model.visual.downsample", "model.visual.merger")
    # Dense layers fuse gate and up into gate_up_proj; MoE layers keep gate/up/down in their shared experts
    # and first dense layer (routed experts are fused 3-D parameters: --lora_target_experts, sc_tune.moe).
    lora_target_modules = (
        r"model\.language_model\..*\.(q_proj|k_proj|v_proj|o_proj|gate_up_proj|gate_proj|up_proj|down_proj)"
    )
    lora_expert_parameters = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")  # --lora_target_experts
    answer_examples = tuple(
        DocumentedAnswer(f"{BOX_OPEN}{inner}{BOX_CLOSE}", (0.1, 0.2, 0.5, 0.6), f"{_README}: {style}")
        for style, inner in (
            ("[[]]", "[[100, 200, 500, 600]]"),
            ("[]", "[100,200,500,600]"),
            ("()", "(100, 200, 500, 600)"),
            ("<>", "<100,200,500,600>"),
        )
    ) + (
        DocumentedAnswer(f"{BOX_OPEN}[[100, 200, 500, 600], [300, 300, 400, 400]]{BOX_CLOSE}", None,
                         f"{_README}: a list of two boxes (one phrase names one object: refused)"),
        DocumentedAnswer("[[100, 200, 500, 600]]", None,
                         f"{_README}: coordinates without the box tokens that mark the answer's box (refused)"),
    )

    def vision_trunk(self, model):
        # transformers' Glm4vVisionModel (GLM-4.5V's Glm4vMoeVisionModel and GLM-4.6V's tower are the same code): patch
        # embedding, blocks attending within each image (cu_seqlens, no window reordering), then post_layernorm, whose
        # output the trainable downsample (2 x 2 convolution over each merge unit) and merger read. So the
        # post-layernorm is replayed and every block skipped; the embeddings before them are cheap and run each time.
        # last_hidden_state (downsampled) and pooler_output (merged) hold a quarter of each image's patch rows.
        tower = find_submodule(model, self.vision_prefix)
        return patch_grid_vision_trunk(tower, tower.blocks, [tower.post_layernorm])

    def thinking_only_reason(self):
        # GLM-4.5V / 4.6V templates carry the enable_thinking switch; GLM-4.1V-9B-Thinking's has none (its answers
        # always reason first, and its generation prompt stops at "<|assistant|>\n", so the default check, which
        # looks for an opened <think>, cannot see it).
        if "enable_thinking" not in (self.tokenizer.chat_template or ""):
            return "its chat template has no enable_thinking switch: GLM-4.1V-Thinking always reasons first"
        return super().thinking_only_reason()

    def describer_prompt(self, box_norm, image):
        return self.render(f"Describe the object in {self.codec.format(box_norm, image.frame)} in a few words.")

    def locator_prompt(self, caption, image):
        caption = self.plain_text(caption)
        if self.codec is not self.native_codec:
            return self.render(f"Locate {caption}. {self.codec.request}")
        return self.render(GROUNDING_PROMPT.format(caption))

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
