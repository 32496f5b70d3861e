"""Adapter for Qwen-VL / Qwen-VL-Chat, the paper's model, on the native implementation in sc_tune.models.

Prompts are raw Qwen-VL grounding text, as in the reference release (no ChatML, no system prompt):

- describer: ``<img></img><ref>This</ref><box>(x1,y1),(x2,y2)</box> is`` -> caption, ``<|endoftext|>``;
- locator: ``<img></img><ref>CAPTION</ref><box>`` -> ``(x1,y1),(x2,y2)</box><|endoftext|>``.

Qwen-VL-Chat has no chat template file (a remote-code ``chat`` method builds ChatML turns); like the reference
release, SC-Tune prompts it with this raw grounding text, the form its grounding data used.

The tokenizer expands ``<img></img>`` to ``<img>`` + ``n_queries`` placeholders + ``</img>`` (the reference
put a dummy path there; the model overwrites those positions with image features either way). Pixels
travel separately as ``images`` ``(N, 3, S, S)``, prepared once per sample.
"""

from __future__ import annotations

import os

import torch

from sc_tune.adapters.base import (
    DocumentedAnswer,
    ImageInputs,
    ModelAdapter,
    ModelFolderError,
    find_submodule,
)
from sc_tune.adapters.registry import Family, register
from sc_tune.box_codecs import PairGridCodec
from sc_tune.jsonio import read_json
from sc_tune.models.qwen_vl.configuration import QWenConfig
from sc_tune.models.qwen_vl.image_processing import QWenVLImageProcessor
from sc_tune.models.qwen_vl.modeling import apply_rotary, ntk_alpha_for, rotary_cos_sin
from sc_tune.models.qwen_vl.tokenization import VOCAB_FILE, QWenTokenizer
from sc_tune.vision_cache import VisionTrunk

IMAGE_TAG = "<img></img>"
_README = "QwenLM/Qwen-VL README.md"
# Answers of the released Qwen-VL(-Chat), quoted from its README (read on the 0..999 grid, see sc_tune.box_codecs).
QWEN_VL_ANSWERS = (
    DocumentedAnswer("<ref>击掌</ref><box>(536,509),(588,602)</box>", (536 / 999, 509 / 999, 588 / 999, 602 / 999),
                     f"{_README}, Transformers quickstart (Qwen-VL-Chat)"),
    DocumentedAnswer('<ref>"击掌"</ref><box>(211,412),(577,891)</box>', (211 / 999, 412 / 999, 577 / 999, 891 / 999),
                     f"{_README}, ModelScope quickstart"),
    DocumentedAnswer("<ref>格子衬衫</ref><box>(588,499),(725,789)</box>", (588 / 999, 499 / 999, 725 / 999, 789 / 999),
                     f"{_README}, fine-tuning data example"),
    DocumentedAnswer("<ref> Woman</ref><box>(451,379),(731,806)</box> and<ref> her dog</ref><box>(219,424),(576,896)"
                     "</box> playing on the beach<|endoftext|>", None,
                     f"{_README}, Qwen-VL grounded caption: two boxes (refused)"),
)


class QwenVLAdapter(ModelAdapter):
    native_codec = PairGridCodec(scale=999)
    answer_examples = QWEN_VL_ANSWERS
    vision_prefix = "transformer.visual"
    vision_trainable_prefixes = ("transformer.visual.attn_pool",)
    lora_target_modules = r"transformer\.h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.w1|mlp\.w2)"
    # The native model takes a static cache (positions from its length, on device) and a decode step's 4-D mask.
    static_decoding_verified = True
    reads_image_processor_files = False  # its image processor is built from config.json's visual block

    def vision_trunk(self, model):
        # The resampler (attn_pool, trainable) reads the ViT's block stack; the patch conv, ln_pre, ln_post
        # and proj around it are cheap and simply run in every pass.
        tower = find_submodule(model, self.vision_prefix)
        return VisionTrunk(
            tower,
            replayed=[tower.transformer],
            skipped=[],
            image_pixels=lambda args, kwargs: list(args[0].split(1)),
            output_rows_per_image=True,  # (N_images, n_queries, width)
            # visual(images): the images are the call's only argument
            images_call=lambda args, kwargs, indices: ((args[0][indices], *args[1:]), kwargs) if not kwargs else None,
        )

    def resumes_from_scoring_cache(self, model, prompt_length, scored_length):
        # Rotary positions are column indices, so the prompt's keys are those of a prompt-only prefill, except
        # under dynamic NTK, whose scaling is fixed by the first pass's total length (and by train/eval mode):
        # reuse only where no scaling applies to either, i.e. the scored sequence fits the trained context.
        config = model.config
        return not config.use_dynamic_ntk or ntk_alpha_for(scored_length, config.seq_length) == 1.0

    def moves_cached_prompt_columns(self, model, prompt_length):
        # Keys carry RoPE at their column index; rotations compose, so a key moves by rotating it by the shift,
        # and the model takes per-row position_offsets. Dynamic NTK would tie the keys to each batch's length.
        config = model.config
        return not config.use_dynamic_ntk or ntk_alpha_for(prompt_length, config.seq_length) == 1.0

    def move_cached_keys(self, model, keys_BHCD, shift_B):
        config = model.config
        cos, sin = rotary_cos_sin(shift_B.to(keys_BHCD.device)[:, None], config.kv_channels, config.rotary_emb_base,
                                  ntk_alpha=1.0)
        return apply_rotary(keys_BHCD, cos, sin)

    def resumed_positions(self, model, input_ids_BW, attention_mask_BW, images, tail_offsets_B=None):
        # Positions are column indices: a moved prefix already sits at columns 0..P-1, and the model shifts each row's
        # later columns by its offset, closing the padding gap before its tail. In the cache's own layout the
        # columns are the positions.
        return {} if tail_offsets_B is None else {"position_offsets": tail_offsets_B}

    @classmethod
    def from_pretrained(cls, path: str, box_format: str = "native") -> QwenVLAdapter:
        config_path = os.path.join(path, "config.json")
        if not os.path.isfile(config_path):
            raise FileNotFoundError(f"{config_path} not found: not a Qwen-VL checkpoint folder")
        config = QWenConfig(**{k: v for k, v in read_json(config_path).items() if k not in ("auto_map",)})
        vocab_file = os.path.join(path, VOCAB_FILE)
        if not os.path.isfile(vocab_file):
            raise ModelFolderError(f"{path} has no {VOCAB_FILE}: Qwen-VL's tokenizer reads its BPE ranks from it; "
                                   "copy the checkpoint's tokenizer files into the folder")
        try:
            tokenizer = QWenTokenizer.from_pretrained(path, image_token_span=config.image_queries)
        except (OSError, ValueError) as error:  # a malformed line of qwen.tiktoken (named with its line number)
            raise ModelFolderError(f"{path}: {VOCAB_FILE} cannot be read: {error}") from error
        return cls(tokenizer, QWenVLImageProcessor.from_config(config), box_format)

    def __init__(self, tokenizer: QWenTokenizer, image_processor: QWenVLImageProcessor, box_format: str = "native"):
        super().__init__(tokenizer, box_format)
        self.image_processor = image_processor
        self.img_start_id = tokenizer.convert_tokens_to_ids("<img>")

    @property
    def end_text(self) -> str:
        return "<|endoftext|>"

    def special_tokens(self) -> dict[str, int]:
        return dict(self.tokenizer.special_tokens)  # the tiktoken tokenizer keeps its specials outside the vocab

    def describer_prompt(self, box_norm, image):
        return f"{IMAGE_TAG}<ref>This</ref><box>{self.codec.format(box_norm, image.frame)}</box> is"

    def locator_prompt(self, caption, image):
        return f"{IMAGE_TAG}<ref>{caption}</ref><box>"

    def thinking_only_reason(self):
        return None  # no reasoning mode, no chat template

    def locator_answer(self, box_norm, image, caption):
        # The prompt has opened the box (the reference release's raw grounding text); the answer closes it.
        return f"{self.codec.format(box_norm, image.frame)}</box>"

    def prepare_image(self, image) -> ImageInputs:
        pixels_13HW = self.image_processor(image)
        size = self.image_processor.image_size
        return ImageInputs({"images": pixels_13HW}, self.tokenizer.image_token_span, (size, size))

    def encode_prompt(self, text, image):
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if ids.count(self.img_start_id) != 1:
            raise ValueError(f"a Qwen-VL prompt must hold exactly one <img>...</img> span: {text!r}")
        return ids

    def image_batch(self, images, input_ids):
        return {"images": torch.cat([im.tensors["images"] for im in images], dim=0)}


def _model_class():
    from sc_tune.models.qwen_vl import QWenLMHeadModel

    return QWenLMHeadModel


def _finalize_export(output_dir: str, source_dir: str) -> None:
    from sc_tune.models.qwen_vl.export import finalize_export

    finalize_export(output_dir, source_dir)


register(Family("Qwen-VL / Qwen-VL-Chat", ("qwen",), QwenVLAdapter, _model_class, _finalize_export))
