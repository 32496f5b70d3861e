"""Adapters for the transformers-native Qwen VL families: Qwen2-VL, Qwen2.5-VL, Qwen3-VL(-MoE), Qwen3.5(-MoE),
Qwen3.8-Flash-Next (``qwen4_exp``, the Qwen4 preview).

Prompts go through the checkpoint's own chat template (``ModelAdapter.render``): the Qwen2-VL and Qwen2.5-VL
templates insert the default system turn ("You are a helpful assistant."), Qwen3-VL's does not, and Qwen3.5's
opens the answer with the empty reasoning block ``<think>\n\n</think>\n\n`` when thinking is off
(``enable_thinking=False``). The image is ``<|vision_start|><|image_pad|><|vision_end|>``, before the text.

Grounding prompt and answer (the locator's SFT target is the answer, labelled with the caption, so that a tuned
model keeps answering in its released format):

- Qwen2-VL: "Find <|object_ref_start|>CAPTION<|object_ref_end|>." ->
  ``<|object_ref_start|>CAPTION<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>`` on a 0..1000 grid
  (the reference, then the box, in the tokenizer's special tokens, as a user's report shows (below); the 0..1000
  grid is Qwen's: QwenLM/Qwen3-VL ``qwen-vl-finetune/tools/process_bbox.ipynb``, "Qwen2-VL using the relative
  coordinated with range 0-1000". No Qwen-own Qwen2-VL grounding prompt was found: the prompt is SC-Tune's);
- Qwen2.5-VL: "Locate CAPTION in this image and output the bbox coordinates in JSON format." (the grounding
  prompt of Qwen's fine-tuning README) -> the fenced JSON list
  ``\`\`\`json\n[\n\t{"bbox_2d": [x1, y1, x2, y2], "label": "CAPTION"}\n]\n\`\`\``` in absolute pixels of the
  *resized* model input;
- Qwen3-VL, Qwen3.5: the same prompt and answer on a 0..1000 grid.

What the released models write (``answer_examples``, each read back to its box, or refused with its reason, by the
tests and by ``python -m sc_tune.families parse``):

- Qwen2-VL: ``<|object_ref_start|>击掌<|object_ref_end|><|box_start|>(531,516),(581,596)<|box_end|><|im_end|>``
  (a user's report, QwenLM/Qwen3-VL issue #9: no Qwen-own example was found);
- Qwen2.5-VL, QwenLM/Qwen2.5-VL ``cookbooks/spatial_understanding.ipynb``: the fenced list, tab-indented,
  ``\t{"bbox_2d": [765, 394, 891, 550], "label": "top right brown cake"}`` ("Detect a specific object"); the same
  with pixel values above 1000 ("Reasoning capability"); one object per line with 4 spaces and a trailing comma
  ("Detect certain object": 12 boxes, refused); the plain text ``43,378,996,957 cakes`` a system prompt asked for
  (refused: no ``bbox_2d``);
- Qwen2.5-VL, ``qwen-vl-finetune/README.md`` "Grounding Example": ``{\n"bbox_2d": [135, 114, 1016, 672]\n}``;
- Qwen2.5-VL, ``cookbooks/ocr.ipynb`` (text spotting): 4/8 spaces, trailing commas, 39 boxes (refused);
- Qwen3-VL (and Qwen3.5), QwenLM/Qwen3-VL ``cookbooks/omni_recognition.ipynb``: the tab-indented list with other
  keys, ``\t{"bbox_2d": [0, 614, 224, 825], "name_zh": "米饭", "name_en": "Rice"},`` (its first of 7 entries);
  ``cookbooks/spatial_understanding.ipynb``: ``\t{"point_2d": [925, 618], "label": "point_1"}`` (refused: a point).

Pixel frames: the notebooks do not print the resized input's size, so the tests assume one that holds the
coordinates. Qwen3-VL's 0..1000 grid: ``cookbooks/2d_grounding.ipynb`` ("relative coordinates ranging from 0 to
1000") and a Qwen maintainer (issue #1427). Qwen3.5: no Qwen-own grounding example was found; a maintainer's answer
about its successor keeps "relative coordinates normalized to [0, 1000]" and we assume Qwen3-VL's answer shape.

Reasoning: Qwen3-VL-*-Thinking share ``model_type`` with the Instruct checkpoints; their template opens
``<think>`` for every answer, which ``ModelAdapter.thinking_only_reason`` detects (they are refused, naming the
checkpoint). Qwen3.5 is hybrid: thinking off through its template's switch.
"""

from __future__ import annotations

import torch

from sc_tune.adapters.base import DocumentedAnswer, find_submodule, language_model_lora_targets
from sc_tune.adapters.patch_grid_chat import PatchGridChatAdapter, patch_grid_vision_trunk
from sc_tune.adapters.registry import Family, auto_image_text_to_text, register
from sc_tune.attention import WINDOW_LAYER_KINDS, text_layer_caches
from sc_tune.box_codecs import JsonBoxCodec, PairGridCodec
from sc_tune.vision_cache import VisionTrunk

GROUNDING_PROMPT = "Locate {} in this image and output the bbox coordinates in JSON format."
# The Gated DeltaNet (linear attention) layers' projections of a Qwen3.5 text model (also MiniCPM-V 4.6 / 4.7's).
GATED_DELTANET_PROJECTIONS = "in_proj_qkv|in_proj_z|out_proj"


_COOKBOOK = "QwenLM/Qwen2.5-VL cookbooks/spatial_understanding.ipynb"
QWEN2_VL_ANSWERS = (
    DocumentedAnswer("<|object_ref_start|>击掌<|object_ref_end|><|box_start|>(531,516),(581,596)<|box_end|><|im_end|>",
                     (0.531, 0.516, 0.581, 0.596), "a user's report of Qwen2-VL's answer, QwenLM/Qwen3-VL issue #9"),
)
QWEN2_5_VL_ANSWERS = (
    DocumentedAnswer('```json\n[\n\t{"bbox_2d": [765, 394, 891, 550], "label": "top right brown cake"}\n]\n```',
                     (765 / 1288, 394 / 728, 891 / 1288, 550 / 728),
                     f"{_COOKBOOK}, 2. Detect a specific object (a 1288x728 input assumed)", frame=(1288, 728)),
    DocumentedAnswer('```json\n[\n\t{"bbox_2d": [1098, 1304, 1576, 1900], "label": "shadow of the paper fox"}\n]\n```',
                     (1098 / 2016, 1304 / 2016, 1576 / 2016, 1900 / 2016),
                     f"{_COOKBOOK}, 4. Reasoning capability (a 2016x2016 input assumed)", frame=(2016, 2016)),
    DocumentedAnswer('```json\n[\n    {"bbox_2d": [139, 768, 315, 954], "label": "small cake"},\n'
                     '    {"bbox_2d": [139, 768, 315, 954], "label": "small cake"},\n]\n```', None,
                     f"{_COOKBOOK}, 1. Detect certain object: its 4-space layout (first line twice; 12 boxes): "
                     "more than one box is refused", frame=(1288, 1288)),
    DocumentedAnswer("43,378,996,957 cakes", None,
                     f"{_COOKBOOK}, cell 8: the plain-text form a system prompt asked for (no bbox_2d: refused)",
                     frame=(1288, 1288)),
    DocumentedAnswer('{\n"bbox_2d": [135, 114, 1016, 672]\n}', (135 / 1092, 114 / 728, 1016 / 1092, 672 / 728),
                     "QwenLM/Qwen2.5-VL qwen-vl-finetune/README.md, Grounding Example (a 1092x728 input assumed)",
                     frame=(1092, 728)),
    DocumentedAnswer(
        '```json\n[\n    {\n        "bbox_2d": [125, 169, 754, 208], "text_content": "UNIHAKKA INTERNATIONAL SDN BHD",'
        '\n    },\n    {\n        "bbox_2d": [325, 210, 549, 238], "text_content": "01 Jun 2018 18:41",'
        '\n    },\n]\n```',
        None,
        "QwenLM/Qwen2.5-VL cookbooks/ocr.ipynb (2025-01-29), text spotting, Qwen2.5-VL-7B: its first two objects "
        "verbatim (4/8 spaces, trailing commas), the list closed as the answer closes its 39; more than one box is "
        "refused",
        frame=(868, 1400),
    ),
)
QWEN3_VL_ANSWERS = (
    DocumentedAnswer('```json\n[\n\t{"bbox_2d": [0, 614, 224, 825], "name_zh": "米饭", "name_en": "Rice"},\n]\n```',
                     (0.0, 0.614, 0.224, 0.825), "QwenLM/Qwen3-VL cookbooks/omni_recognition.ipynb cell 6 "
                     "(its pre-release Qwen3-VL-235B-A22B-Instruct): its first entry verbatim, in its list"),
    DocumentedAnswer('```json\n[\n\t{"point_2d": [925, 618], "label": "point_1"}\n]\n```', None,
                     "QwenLM/Qwen3-VL cookbooks/spatial_understanding.ipynb cell 11: a point, not a box (refused)"),
)


def _has_window_layers(model) -> bool:
    """Whether the text model has sliding-window layers (a Qwen2 checkpoint with ``use_sliding_window``; the released
    ones have it off). Their cache keeps only the window's last columns, so a prompt's cache can be neither cropped
    back to the prompt nor cut to its image prefix: such a model prefills its prompts in full (always exact)."""
    return any(kind in WINDOW_LAYER_KINDS for kind, _ in text_layer_caches(model.config))


class _QwenChatVLAdapter(PatchGridChatAdapter):
    image_token = "<|image_pad|>"
    vision_trainable_prefixes = ("model.visual.merger",)
    # M-RoPE positions advance by one per token on every axis; Qwen3.5's Gated DeltaNet layers keep a recurrent state
    # that a static cache updates in place.
    static_decoding_verified = True
    # MoE variants: the routed experts are fused 3-D parameters, not Linear modules: target_modules reaches the
    # attention (and any shared expert); --lora_target_experts adds the experts (sc_tune.moe).
    lora_target_modules = language_model_lora_targets("model.language_model")
    lora_expert_parameters = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")  # --lora_target_experts

    def vision_trunk(self, model):
        return qwen_vision_trunk(find_submodule(model, self.vision_prefix))

    def resumes_from_scoring_cache(self, model, prompt_length, scored_length):
        # transformers keeps the multimodal rope offset (``rope_deltas``) of the last prefill and continues from
        # it when generate starts on a cache; text after the prompt advances every position axis by one per
        # token, so the scoring pass's offset is the prompt's (tests/test_prompt_cache.py checks the logits).
        return not _has_window_layers(model)

    def resumed_decoding_inputs(self, inputs):
        # The first decoding step would run the tower on pixel_values and find no <|image_pad|> to put them in.
        return {k: v for k, v in inputs.items() if k != "pixel_values"}

    def moves_cached_prompt_columns(self, model, prompt_length):
        # M-RoPE positions are counted over each row's unpadded tokens (transformers' get_rope_index skips masked
        # columns), so a prompt's cached keys carry the same rotations in any batch that holds the same prompt
        # start: they move between batches as they are. The locator batch then needs its own positions (see
        # resumed_positions): the rope offset transformers keeps from the last prefill is another batch's.
        return not _has_window_layers(model)

    def move_cached_keys(self, model, keys_BHCD, shift_B):
        return keys_BHCD

    def resumed_positions(self, model, input_ids_BW, attention_mask_BW, images, tail_offsets_B=None):
        # The model's own rope index over the whole laid-out batch, padding (and the gap between a moved prefix and
        # its tail) masked out: exactly the positions of each row's unpadded prompt. Given explicitly, so that neither
        # generate nor a forward reuses the rope offset transformers keeps from the last prefill (another batch's)
        # or needs the pixels; decoding steps continue from the last column's positions.
        rope = next(m for m in model.modules() if hasattr(type(m), "get_rope_index"))
        positions_3BW, _ = rope.get_rope_index(
            input_ids_BW,
            (input_ids_BW == self.image_token_id).to(torch.int32),
            image_grid_thw=torch.cat([image.tensors["image_grid_thw"] for image in images]).to(input_ids_BW.device),
            attention_mask=attention_mask_BW,
        )
        return {"position_ids": positions_3BW}

    def _native(self) -> bool:
        return self.codec is self.native_codec

    def describer_prompt(self, box_norm, image):
        return self.render(f"Describe the object at {self.codec.format(box_norm, image.frame)} in a few words.")

    def locator_prompt(self, caption, image):
        caption = self.plain_text(caption)
        if not self._native():
            return self.render(f"Locate {caption}. {self.codec.request}")
        return self.render(GROUNDING_PROMPT.format(caption))

    @property
    def end_text(self) -> str:
        return "<|im_end|>"


def qwen_vision_trunk(tower) -> VisionTrunk:
    """The trunk of a Qwen2-VL-style tower (Qwen2/2.5/3-VL, Qwen3.5, and the Qwen2.5-VL-like towers of North, EXAONE
    4.5 and HyperCLOVA X), called as ``visual(pixel_values, grid_thw=...)``: the merger reads the last block;
    Qwen3-VL's DeepStack mergers also read blocks ``deepstack_visual_indexes``. Every block keeps each image's patches
    contiguous (Qwen2.5-VL's window order is per image), so block outputs split per image like the pixel rows do;
    last_hidden_state (patch rows, window order within each image), pooler_output (the merged rows, back in image
    order) and Qwen3-VL's deepstack_features all keep each image's rows together."""
    blocks = list(tower.blocks)
    read = {len(blocks) - 1, *getattr(tower, "deepstack_visual_indexes", ())}
    return patch_grid_vision_trunk(tower, blocks, [blocks[i] for i in sorted(read)])


class Qwen2VLAdapter(_QwenChatVLAdapter):
    native_codec = PairGridCodec(1000, "<|box_start|>", "<|box_end|>")
    answer_examples = QWEN2_VL_ANSWERS

    def describer_prompt(self, box_norm, image):
        return self.render(f"Describe the object in {self.codec.format(box_norm, image.frame)} in a few words.")

    def locator_prompt(self, caption, image):
        if not self._native():
            return super().locator_prompt(caption, image)
        return self.render(f"Find {self._reference(self.plain_text(caption))}.")

    def answer_prefix(self, caption):
        # Qwen2-VL's grounding answer repeats the reference before its box.
        return self._reference(caption) if self._native() else ""

    @staticmethod
    def _reference(caption: str) -> str:
        return f"<|object_ref_start|>{caption}<|object_ref_end|>"


class Qwen25VLAdapter(_QwenChatVLAdapter):
    native_codec = JsonBoxCodec("bbox_2d", scale=None)
    answer_examples = QWEN2_5_VL_ANSWERS


class Qwen3VLAdapter(_QwenChatVLAdapter):
    native_codec = JsonBoxCodec("bbox_2d", scale=1000)
    vision_trainable_prefixes = ("model.visual.merger", "model.visual.deepstack_merger_list")
    answer_examples = QWEN3_VL_ANSWERS


class Qwen35Adapter(_QwenChatVLAdapter):
    """Qwen3.5 / 3.6 / 3.8: vision folded into the main model, boxes as Qwen3-VL (JSON ``bbox_2d``, 0..1000).

    The Qwen3.5 checkpoints think by default; their chat template's switch (``enable_thinking=False``) opens the
    answer with the empty reasoning block ``<think>\n\n</think>\n\n``, so the answer is the caption or the box
    directly. The box convention (relative 0..1000) is a Qwen maintainer's statement ("grounding coordinates should
    still be relative coordinates normalized to [0, 1000]", QwenLM/Qwen3.8-Flash-Next issue #4), not a chat-template
    fact. The vision tower has no DeepStack mergers: ``fix_vit`` keeps only ``model.visual.merger``.
    The text model is hybrid: Gated DeltaNet (linear attention) layers whose projections
    (``in_proj_qkv``, ``in_proj_z``, ``out_proj``) LoRA also targets, between full-attention layers.
    """

    native_codec = JsonBoxCodec("bbox_2d", scale=1000)
    answer_examples = QWEN3_VL_ANSWERS  # assumed: no Qwen-own Qwen3.5 grounding example was found
    lora_target_modules = language_model_lora_targets("model.language_model", GATED_DELTANET_PROJECTIONS)

    def resumes_from_scoring_cache(self, model, prompt_length, scored_length):
        # The Gated DeltaNet layers cache a recurrent state, not per-column keys: the state after prompt +
        # caption cannot be cropped back to the prompt's, nor cut to the image prefix.
        return False

    def moves_cached_prompt_columns(self, model, prompt_length):
        return False


class Qwen4ExpAdapter(Qwen35Adapter):
    """Qwen3.8-Flash-Next (``qwen4_exp``, "an early preview of the architecture used in Qwen4",
    QwenLM/Qwen3.8-Flash-Next README): Qwen3.5-MoE's vision tower, image placeholder, processor (transformers' auto
    mappings: Qwen3VLProcessor, Qwen2VLImageProcessor, Qwen3_5Tokenizer) and parameter names, so everything SC-Tune
    reads is Qwen3.5's; what transformers' ``models/qwen4_exp`` adds is inside the text model:

    - Qwen Sparse Attention: the full-attention layers are ``indexed_attention`` layers whose indexer keeps, per query,
      the top ``indexer_budget`` tokens of mean-pooled key blocks (a hard top-k mask: no gradient of SC-Tune's losses
      reaches the indexer's weights). No fixed-shape decode step exists for them (``static_decoding_problem``), so
      ``--static_decoding auto`` decodes with transformers' ``generate`` and ``true`` is refused, naming the layers and
      why;
    - Gated Residual: ``hc_count`` residual streams mixed before and injected after each block
      (``attn_hyper_connection``, ``mlp_hyper_connection``, ``hyper_connection_mixer``);
    - Per-Layer Embedding: a hashed token n-gram table added before the layers of ``ple_layer_ids``; it reads the token
      ids (pads read as the end token, so padding changes nothing) and keeps the last ids in the cache.

    LoRA targets what it targets on Qwen3.5 (attention, Gated DeltaNet projections, shared expert); the gated
    residuals, the n-gram table and the indexer stay frozen under LoRA. MoE: every layer routes (512 experts, 10 per
    token, one gated shared expert; ``router_aux_loss_coef`` 0.001 by default), the fused experts as Qwen3.5-MoE's.
    The box convention is a Qwen maintainer's answer for this very model: "In most cases, grounding coordinates should
    still be relative coordinates normalized to [0, 1000]" (QwenLM/Qwen3.8-Flash-Next issue #4); no Qwen-own example
    answer was found, so the answer shape is Qwen3-VL's JSON list (assumed, as for Qwen3.5). The released chat
    template is Qwen3.8-27B's, with Qwen3.5's thinking switch (``enable_thinking``): the Qwen3.5 stand-in renders the
    same prompts (``tests/test_real_checkpoints.py``).
    """

    def static_decoding_problem(self, model):
        # transformers 5.24 has a static cache layer for them (StaticIndexedLayer), but not a step of fixed shapes:
        # the reason is given with the refusal, so that nobody opts in on the strength of the cache layer alone.
        text = model.config.get_text_config(decoder=True)
        if "indexed_attention" in (getattr(text, "layer_types", None) or []):
            return (f"{type(self).__name__}: no static decode step for ['indexed_attention'] layers: transformers' "
                    "Qwen4ExpTextQSAIndexer picks each query's key blocks with torch.nonzero in a Python loop over "
                    "rows and queries (a host read per row, shapes that depend on the mask), and Qwen4ExpTextModel "
                    "grows the cache's indexer_position_ids by a torch.cat every step: no step a CUDA graph can replay")
        return super().static_decoding_problem(model)


# One entry per family; a family serves its dense and MoE checkpoints alike (same prompts, codec, vision).
for _name, _model_types, _adapter in (
    ("Qwen2-VL", ("qwen2_vl",), Qwen2VLAdapter),
    ("Qwen2.5-VL", ("qwen2_5_vl",), Qwen25VLAdapter),
    ("Qwen3-VL / Qwen3-VL-MoE", ("qwen3_vl", "qwen3_vl_moe"), Qwen3VLAdapter),
    ("Qwen3.5 / 3.6 / 3.8", ("qwen3_5", "qwen3_5_moe"), Qwen35Adapter),
    ("Qwen3.8-Flash-Next (Qwen4 preview)", ("qwen4_exp",), Qwen4ExpAdapter),
):
    register(Family(_name, _model_types, _adapter, auto_image_text_to_text))
