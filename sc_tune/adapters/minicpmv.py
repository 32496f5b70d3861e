"""MiniCPM-V 4.6 / 4.7 (``minicpmv4_6``, ``minicpmv4_7``): chat-template adapters, generic box codec.

Box convention: none documented for 4.6 or 4.7 (searched 2026-12-05: the OpenBMB/MiniCPM-V and MiniCPM-o READMEs,
the OpenSQZ/MiniCPM-V-CookBook, the model cards, OpenBMB issues), so the native codec is the generic
``[x1, y1, x2, y2]`` on 0..1000 (``sc_tune.box_codecs.GENERIC_CODEC``), asked for in words, and
``grounding_prior = False``: a grounding warm start first (docs/grounding_warm_start.md). What was found, and why it
is not used: for MiniCPM-V 4.5 (another architecture: a resampler and a Qwen3 language model) an OpenBMB
maintainer answered that the model writes ``<box>x1 y1 x2 y2</box>`` on 0..1000 for "Please provide the bounding
box coordinate of the region this sentence describes: <ref>book</ref>" (OpenBMB/MiniCPM-V issue #982, 2025-08-29;
also OpenSQZ/MiniCPM-V-CookBook issue #39); the 4.6 model card lists RefCOCO among its benchmarks but shows no
answer, and VLMEvalKit's MiniCPM_V_4_6 (open-compass/VLMEvalKit vlmeval/vlm/minicpm_v.py) has no grounding prompt
(its RefCOCO scorer reads any four numbers). That the 4.5 form carries over to 4.6 / 4.7 is not documented.

Images (transformers 5.24 ``MiniCPMV4_6ImageProcessorPil``, shared by 4.7, and ``MiniCPMV4_6Processor`` /
``MiniCPMV4_7Processor``): the image processor resizes a thumbnail view (the ``source``) and, for a large image,
cuts a ``rows x cols`` grid of slices; every view is patchified NaViT-style along the last dimension of one
``pixel_values`` tensor ``(1, 3, patch, sum of patches)``, with ``target_sizes`` (patches high x wide, one row per
view). The chat template writes ``<|image_pad|>`` (the tokenizer's ``image_token``) for the image; the processor
replaces it with ``<image_id>0</image_id>`` (its default ``use_image_id``) + ``<image>`` + one ``<|image_pad|>`` per
feature of the thumbnail + ``</image>``, then the slices, ``<slice>`` + features + ``</slice>``, rows joined by a
newline. A view of ``h x w`` patches yields ``h * w / 16`` features (``downsample_mode`` "16x": the window merger
inside the tower, then the merger, each merge 2 x 2) or ``h * w / 4`` ("4x"). Batches concatenate every image's
views along that last dimension (``packed_keys``); the model encodes ``pixel_values[:1]``.

4.6 and 4.7 differ, for SC-Tune, in one input: 4.7's canvas M-RoPE lays the thumbnail and slices out on a 2-D canvas
found from ``mm_token_type_ids`` (1 on ``<|image_pad|>``; its processor returns them by default), and from the marker
ids in its config (``image_start_id``, ``slice_start_id``, ``newline_id``, ...). Its forward takes
``logits_to_keep``; 4.6's does not (it returns every position's logits, which ``sc_tune.cycle.last_logits`` cuts:
correct, but a 4.6 training pass holds the logits of the whole sequence).

Prompts: the checkpoint's chat template (``chat_template.jinja``): ChatML turns, the image as ``<|image_pad|>\\n``
before the text, no default system turn; with ``enable_thinking=False`` the answer opens with
``<think>\\n\\n</think>\\n\\n`` (the Qwen3.5 switch; modelscope/ms-swift swift/template/templates/minicpm.py,
``MiniCPMV4_6Template``, whose test checks its rendering against the released template). MiniCPM-V-4.6-Thinking
(same ``model_type``) is refused by name if its template opens ``<think>`` for every answer.

Modules (``model.vision_tower`` SigLIP2 with its window-attention ``vit_merger``, ``model.merger`` the MLP connector,
``model.language_model`` Qwen3.5 hybrid text model): ``fix_vit`` freezes the whole tower, window merger included;
the merger stays trainable. LoRA: the language model's attention and MLP projections and its Gated DeltaNet
projections, as Qwen3.5's.
"""

from __future__ import annotations

import re

from sc_tune.adapters.chat_template import ChatTemplateAdapter, TemplateImageInputs
from sc_tune.adapters.qwen2_vl import GATED_DELTANET_PROJECTIONS
from sc_tune.adapters.registry import Family, auto_image_text_to_text, register


class MiniCPMV46Adapter(ChatTemplateAdapter):
    image_marker = "<|image_pad|>"
    image_token = "<|image_pad|>"
    image_start = "<image>"
    image_end = "</image>"
    end_token = "<|im_end|>"
    grounding_prior = False  # no documented grounding for 4.6 / 4.7 (see the module docstring)
    packed_keys = ("pixel_values",)
    lora_extra_projections = (GATED_DELTANET_PROJECTIONS,)
    # The slice markers are media tokens whose names the base class's patterns miss.
    extra_media_tokens = re.compile(r"^</?slice>$")

    def __init__(self, tokenizer, image_processor, config, box_format: str = "native"):
        super().__init__(tokenizer, image_processor, config, box_format)
        # The processor counts placeholders with its downsample mode, the model merges with its config's: where they
        # differ, every image would fail inside the model with "features and tokens do not match".
        modes = (image_processor.downsample_mode, config.downsample_mode)
        if modes[0] != modes[1]:
            raise ValueError(f"{type(self).__name__}: the image processor's downsample_mode {modes[0]!r} is not the "
                             f"model config's {modes[1]!r} (preprocessor_config.json against config.json)")
        self.token_ids("<slice>", "</slice>", "<image_id>", "</image_id>")
        self._placeholders = _placeholder_builder(image_processor, tokenizer)

    def preprocess_image(self, image):
        out = self.image_processor(images=[image], return_tensors="pt")
        placeholder = self._placeholders(out)
        # Counted from the views' patch grids, not read off the placeholder: encode_prompt then checks the two agree.
        divisor = patches_per_feature(self.image_processor)
        num_tokens = sum(int(h) * int(w) // divisor for h, w in out["target_sizes"].tolist())
        height, width = (int(side) * int(self.image_processor.patch_size) for side in out["target_sizes"][0])
        tensors = {"pixel_values": out["pixel_values"], "target_sizes": out["target_sizes"]}
        return TemplateImageInputs(tensors, num_tokens, (width, height), placeholder)

    def resumes_from_scoring_cache(self, model, prompt_length, scored_length):
        """No: the text model is Qwen3.5's, whose Gated DeltaNet (linear attention) layers cache a recurrent state,
        not per-column keys: the state after prompt + caption cannot be cropped back to the prompt's (as Qwen3.5's own
        adapter says). The greedy captions prefill their prompts again."""
        return False

    def moves_cached_prompt_columns(self, model, prompt_length):
        """No: a recurrent state cannot be cut to the image prefix either; the locator prompts are prefilled in full."""
        return False


class MiniCPMV47Adapter(MiniCPMV46Adapter):
    # The canvas M-RoPE finds each view's tokens from mm_token_type_ids (1 on <|image_pad|>), in every forward.
    image_type_key = "mm_token_type_ids"


def patches_per_feature(image_processor) -> int:
    """Patches merged into one image feature: "16x" merges 2 x 2 twice (the tower's window merger, then the merger),
    "4x" once."""
    return 4 if image_processor.downsample_mode == "4x" else 16


def _placeholder_builder(image_processor, tokenizer):
    """One image's placeholder text, from the image processor's output, as the family's processor writes it: its own
    ``replace_image_token`` (thumbnail, then the slice rows), behind the local image id ``<image_id>0</image_id>``
    where ``use_image_id`` is on (one image per prompt: id 0, as its ``_prepend_local_ids`` numbers them).

    Why not the processor itself: its constructor requires a video processor, which needs torchvision. The
    placeholder only reads the attributes set here, so the method is borrowed rather than re-derived."""
    from transformers.models.minicpmv4_6.processing_minicpmv4_6 import MiniCPMV4_6Processor

    writer = object.__new__(MiniCPMV4_6Processor)
    writer.slice_mode = image_processor.slice_mode
    names = ("image_token", "image_start_token", "image_end_token", "slice_start_token", "slice_end_token",
             "image_id_start_token", "image_id_end_token")
    missing = [name for name in names if getattr(tokenizer, name, None) is None]
    if missing:  # the released tokenizer_config.json names them; the family's processor reads them off the tokenizer
        raise ValueError(f"the tokenizer does not name the MiniCPM-V special tokens {missing} (tokenizer_config.json)")
    for name in names:
        setattr(writer, name, getattr(tokenizer, name))
    divisor = patches_per_feature(image_processor)
    image_id = (f"{writer.image_id_start_token}0{writer.image_id_end_token}"
                if image_processor.use_image_id else "")
    return lambda out: image_id + writer.replace_image_token(out, image_idx=0, image_token_divisor=divisor)


register(Family("MiniCPM-V 4.6", ("minicpmv4_6",), MiniCPMV46Adapter, auto_image_text_to_text))
register(Family("MiniCPM-V 4.7", ("minicpmv4_7",), MiniCPMV47Adapter, auto_image_text_to_text))
