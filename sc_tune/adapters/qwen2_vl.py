"""Adapters for the transformers-native Qwen VL families: Qwen2-VL, Qwen2.5-VL, Qwen3-VL(-MoE), Qwen3.5(-MoE).

Every prompt is rendered by the checkpoint's own chat template (``ModelAdapter.render``: ChatML, the default
system turn that the Qwen2/2.5-VL templates insert, Qwen3.5's empty think block with ``enable_thinking=False``),
with the image item first. The families differ in how a box is written, and the locator's SFT target is
each family's own grounding answer, so a tuned checkpoint keeps answering as it was released:

- Qwen2-VL: ``<|object_ref_start|>ref<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>`` on a 0..1000
  grid, as its grounding data and README examples write it;
- Qwen2.5-VL: a fenced JSON list, ``[{"bbox_2d": [x1, y1, x2, y2], "label": ...}]``, in absolute pixels of the
  resized input (the Qwen2.5-VL "spatial understanding" cookbook);
- Qwen3-VL, Qwen3.5: the same fenced list on a 0..1000 grid (the Qwen3-VL "2d grounding" cookbook; Qwen3.5:
  the Qwen blog and a maintainer's answer, "relative ... [0, 1000]").

The locator prompt is the grounding request of Qwen's fine-tuning README ("Locate ... in this image and output
the bbox coordinates in JSON format."); the describer prompt is this project's wording with the box in the
family's own syntax.
"""

from __future__ import annotations

import torch

import json

from sc_tune.adapters.base import DocumentedAnswer, find_submodule
from sc_tune.adapters.patch_grid_chat import PatchGridChatAdapter
from sc_tune.adapters.registry import Family, auto_image_text_to_text, register
from sc_tune.box_codecs import JsonGridCodec, JsonPixelCodec, PairGridCodec
from sc_tune.vision_cache import VisionTrunk

QWEN3_COOKBOOK = "QwenLM/Qwen3-VL cookbooks/2d_grounding.ipynb (and the Qwen3-VL README)"
QWEN25_COOKBOOK = "QwenLM/Qwen2.5-VL cookbooks/spatial_understanding.ipynb (and the Qwen2.5-VL README)"
_LM_PROJECTIONS = "q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj"


class _QwenChatVLAdapter(PatchGridChatAdapter):
    image_token = "<|image_pad|>"
    vision_trainable_prefixes = ("model.visual.merger",)
    # M-RoPE positions advance by one per token on every axis; Qwen3.5's Gated DeltaNet layers keep a recurrent state
    # that a static cache updates in place.
    static_decoding_verified = True
    # MoE variants: the routed experts are fused 3-D parameters, not Linear modules: target_modules reaches the
    # attention (and any shared expert); --lora_target_experts adds the experts (sc_tune.moe).
    lora_target_modules = rf"model\.language_model\..*\.({_LM_PROJECTIONS})"
    lora_expert_parameters = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")  # --lora_target_experts

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
    documented_answers = (
        DocumentedAnswer(
            "<|object_ref_start|>the man<|object_ref_end|><|box_start|>(101,234),(567,890)<|box_end|>",
            (0.101, 0.234, 0.567, 0.89), "Qwen2-VL README / technical report: grounding answers",
        ),
        DocumentedAnswer("(101,234),(567,890)<|box_end|><|im_end|>", (0.101, 0.234, 0.567, 0.89),
                         "the same answer after the reference the locator prompt opens"),
        DocumentedAnswer("[101, 234, 567, 890]", None, "not Qwen2-VL's form: no (x1,y1),(x2,y2) corners"),
    )

    def describer_prompt(self, box_norm, image):
        box = f"<|box_start|>{self.codec.format(box_norm, image.frame)}<|box_end|>"
        return self.render(f"Describe the object in {box} in a few words.")

    def locator_prompt(self, caption, image):
        ref = f"<|object_ref_start|>{caption}<|object_ref_end|>"
        # The assistant turn is opened with the reference and <|box_start|>, Qwen2-VL's grounding answer
        # format, so the continuation is exactly the box.
        return self.render(f"Find {ref}.", answer_prefix=f"{ref}<|box_start|>")

    def locator_target(self, box_norm, image, caption=""):
        return f"{self.codec.format(box_norm, image.frame)}<|box_end|>{self.end_text}"


class _JsonBoxAdapter(_QwenChatVLAdapter):
    """The fenced JSON-list answer of Qwen2.5-VL, Qwen3-VL and Qwen3.5."""

    def describer_prompt(self, box_norm, image):
        return self.render(f"Describe the object at {self.codec.format(box_norm, image.frame)} in a few words.")

    def locator_prompt(self, caption, image):
        if not self.native:  # --box_format generic: the format is asked for in words
            return self.render(f"Locate {caption}. {self.codec.request}")
        return self.render(f"Locate {caption} in this image and output the bbox coordinates in JSON format.")

    def locator_target(self, box_norm, image, caption=""):
        if not self.native:
            return f"{self.codec.format(box_norm, image.frame)}{self.end_text}"
        box = self.codec.format(box_norm, image.frame)[1:-1]  # '"bbox_2d": [...]' without the braces
        label = json.dumps(caption, ensure_ascii=False)
        return f'```json\n[\n\t{{{box}, "label": {label}}}\n]\n```{self.end_text}'


class Qwen25VLAdapter(_JsonBoxAdapter):
    native_codec = JsonPixelCodec()

    @classmethod
    def default_frame(cls, image_size):
        # The released preprocessor_config.json: 14 px patches merged 2 x 2 (factor 28), 3,136 to 12,845,056 pixels.
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        width, height = image_size
        resized_height, resized_width = smart_resize(height, width, factor=28, min_pixels=3136, max_pixels=12845056)
        return resized_width, resized_height
    documented_answers = (
        DocumentedAnswer(
            '```json\n[\n\t{"bbox_2d": [135, 114, 1016, 672], "label": "chair"}\n]\n```',
            (135 / 1288, 114 / 812, 1016 / 1288, 672 / 812), QWEN25_COOKBOOK, frame=(1288, 812),
        ),
        DocumentedAnswer('[{"bbox_2d": [135, 114, 1016, 672], "label": "chair"}]',
                         (135 / 1288, 114 / 812, 1016 / 1288, 672 / 812), QWEN25_COOKBOOK + ", unfenced",
                         frame=(1288, 812)),
        DocumentedAnswer('{"bbox_2d": [135.5, 114, 1016, 672]}', (135.5 / 1288, 114 / 812, 1016 / 1288, 672 / 812),
                         "a bare object with a decimal pixel", frame=(1288, 812)),
        DocumentedAnswer('[{"box_2d": [114, 135, 672, 1016], "label": "chair"}]', None,
                         "Gemini/Gemma's y-first key: refused, never transposed", frame=(1288, 812)),
        DocumentedAnswer('{"bbox_2d": [135, 114, 1300, 672]}', None, "x beyond the resized frame's width",
                         frame=(1288, 812)),
    )


_GRID_ANSWERS = (
    DocumentedAnswer('```json\n[\n\t{"bbox_2d": [98, 221, 512, 1000], "label": "the dog"}\n]\n```',
                     (0.098, 0.221, 0.512, 1.0), QWEN3_COOKBOOK),
    DocumentedAnswer(
        '```json\n[\n  {"bbox_2d": [98, 221, 512, 1000], "label": "dog"},\n  {"bbox_2d": [600, 10, 990, 500], '
        '"label": "cat"}\n]\n```', (0.098, 0.221, 0.512, 1.0), QWEN3_COOKBOOK + ": several objects, the first read",
    ),
    DocumentedAnswer('{"bbox_2d": [98, 221, 512, 1001]}', None, "beyond the 0..1000 grid"),
)


class Qwen3VLAdapter(_JsonBoxAdapter):
    native_codec = JsonGridCodec(scale=1000)
    documented_answers = _GRID_ANSWERS
    vision_trainable_prefixes = ("model.visual.merger", "model.visual.deepstack_merger_list")


class Qwen35Adapter(_JsonBoxAdapter):
    """Qwen3.5 / 3.6 / 3.8: vision folded into the main model, boxes as Qwen3-VL (JSON ``bbox_2d``, 0..1000).

    The Qwen3.5 checkpoints think by default; their chat template, rendered with ``enable_thinking=False``,
    opens the assistant turn with an empty reasoning block, so the answer is the caption or the box directly. The box
    convention (relative 0..1000) is the Qwen blog's and a Qwen maintainer's statement, not a chat-template
    fact. The vision tower has no DeepStack mergers: ``fix_vit`` keeps only ``model.visual.merger``.
    The text model is hybrid: Gated DeltaNet (linear attention) layers whose projections
    (``in_proj_qkv``, ``in_proj_z``, ``out_proj``) LoRA also targets, between full-attention layers.
    """

    native_codec = JsonGridCodec(scale=1000)
    documented_answers = _GRID_ANSWERS
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
    register(Family(_name, _model_types, _adapter, auto_image_text_to_text))
