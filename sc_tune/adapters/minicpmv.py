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

Vision cache (``vision_trunk``; 4.7's tower is 4.6's, class for class): the unit is a *view* (a thumbnail or a
slice), not an image. The tower (``MiniCPMV4_6VisionModel.forward(pixel_values, target_sizes, use_vit_merger)``,
transformers 5.24) encodes each view on its own: the patch embedding is a convolution of stride ``patch``, the
position ids come from each view's ``target_sizes`` row, the encoder layers attend within each view (``cu_seqlens``
from ``target_sizes``), the window merger's 2 x 2 windows are laid out per view (``get_vision_window_index`` over
each view's grid) and merge four consecutive tokens of one window, and the layers after it attend within each
downsampled view. Its output, ``last_hidden_state`` ``(1, tokens, width)``, holds each view's rows contiguously along
dim 1: ``h * w / 4`` of them ("16x", the window merger on) or ``h * w`` ("4x"), in proportion to its ``h * w``
patches either way. The merger that reads them is outside the tower and the whole tower is frozen by ``fix_vit``,
so the tower's whole output is memoised per view; a call that repeats views or holds cached ones runs the tower on
its new views only and replays the recorded ``post_layernorm`` output (the embeddings, the encoder layers and the
window merger pass their input through, which the replayed norm ignores). A view's key is its patches and its
``(h, w)`` and window-merger switch (the same pixels on another grid, or merged otherwise, encode otherwise).
"""

from __future__ import annotations

import re

import torch

from sc_tune.adapters.base import find_submodule
from sc_tune.adapters.chat_template import ChatTemplateAdapter, TemplateImageInputs
from sc_tune.adapters.qwen2_vl import GATED_DELTANET_PROJECTIONS
from sc_tune.adapters.registry import Family, auto_image_text_to_text, register
from sc_tune.vision_cache import VisionTrunk


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
    # The text model is Qwen3.5's hybrid (its Gated DeltaNet state updates in place in a static cache, as Qwen3.5's
    # own adapter has it), and generate hands every step its positions: 1-D on 4.6; on 4.7 the canvas M-RoPE's
    # four rows (text, T, H, W), computed once for the prompt (get_rope_index, from mm_token_type_ids) and advanced
    # by one per token on every row, so the step's forward never recomputes them from the cache's length. Neither
    # family resumes from a handed-in cache (the recurrent state), so a static cache is always filled from column 0.
    # 4.6's forward has no logits_to_keep: a one-token step's logits are the last column anyway.
    static_decoding_verified = True

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

    def vision_trunk(self, model):
        # Per view, the whole output memoised (see the module docstring); only the post-layernorm is recorded.
        tower = find_submodule(model, self.vision_prefix)
        return VisionTrunk(
            tower,
            replayed=[tower.post_layernorm],
            skipped=[tower.embeddings, *tower.encoder.layers, tower.vit_merger],
            image_pixels=_views,
            output_rows_per_image=True,
            images_call=_call_with_views,
            # Its attention takes packed windows (cu_seqlens): the window merger's are four tokens each, one
            # attention call apiece without flash-attn.
            packed_attention_config=tower.config,
            rows_dim=1,
        )


class MiniCPMV47Adapter(MiniCPMV46Adapter):
    # The canvas M-RoPE finds each view's tokens from mm_token_type_ids (1 on <|image_pad|>), in every forward.
    image_type_key = "mm_token_type_ids"


def patches_per_feature(image_processor) -> int:
    """Patches merged into one image feature: "16x" merges 2 x 2 twice (the tower's window merger, then the merger),
    "4x" once."""
    return 4 if image_processor.downsample_mode == "4x" else 16


# The tower's forward parameters in order (MiniCPMV4_6VisionModel.forward); get_image_features passes the pixels by
# position and the others by name.
_TOWER_PARAMETERS = ("pixel_values", "target_sizes", "use_vit_merger")


def _tower_arguments(args: tuple, kwargs: dict) -> dict:
    """A tower call's arguments by name."""
    return {**dict(zip(_TOWER_PARAMETERS, args)), **kwargs}


def _view_columns(arguments: dict) -> tuple[list[torch.Tensor], list[list[int]]]:
    """Each view's pixels, ``(3, patch, h * w * patch)``, and its ``(h, w)``: its patches are ``patch``-wide column
    blocks of the packed ``pixel_values`` ``(1, 3, patch, sum of patches * patch)``, in ``target_sizes`` order."""
    pixels, grids = arguments["pixel_values"], arguments["target_sizes"].tolist()
    patch = pixels.shape[-2]
    return list(torch.split(pixels[0], [h * w * patch for h, w in grids], dim=-1)), grids


def _views(args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """One tensor per view, ``(h * w, 3 * patch * patch + 3)``: a row per patch (so the view's output rows are in
    proportion to its rows), its pixels beside the view's ``h``, ``w`` and window-merger switch, which the encoding
    reads too. In the pixels' dtype where it holds the view's grid sides exactly (bfloat16: up to 256 patches), else
    in float32 (the cache keeps a copy of every view). Chosen per view, so a view's key is the same whatever views
    share its call."""
    arguments = _tower_arguments(args, kwargs)
    merged = float(arguments.get("use_vit_merger", True))
    columns_per_view, grids = _view_columns(arguments)
    views = []
    for columns, (height, width) in zip(columns_per_view, grids):
        dtype = columns.dtype
        if max(height, width) > 2 / torch.finfo(dtype).eps:  # the largest integer from which all below are exact
            dtype = torch.float32
        patch = columns.shape[1]
        patches = columns.reshape(-1, patch, height * width, patch).permute(2, 0, 1, 3).flatten(1).to(dtype)
        layout = patches.new_tensor([height, width, merged]).expand(len(patches), -1)
        views.append(torch.cat([patches, layout], 1))
    return views


def _call_with_views(args: tuple, kwargs: dict, indices: list[int]) -> tuple[tuple, dict] | None:
    """The tower call over only the views ``indices``, or None where another tensor travels with it (precomputed
    positions or windows of the whole call, which this does not know how to cut)."""
    arguments = _tower_arguments(args, kwargs)
    cut = ("pixel_values", "target_sizes")
    if any(isinstance(value, torch.Tensor) for key, value in arguments.items() if key not in cut):
        return None
    columns, _ = _view_columns(arguments)
    sizes = arguments["target_sizes"]
    chosen = torch.tensor(indices, device=sizes.device)
    rest = {key: value for key, value in arguments.items() if key not in cut}
    pixels = torch.cat([columns[i] for i in indices], -1)[None]
    return (pixels,), {**rest, "target_sizes": sizes.index_select(0, chosen)}


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
