"""VideoLLaMA3 for images (``video_llama_3``, ``VideoLlama3ForConditionalGeneration``: DAMO-NLP-SG's VideoLLaMA3-2B / 7B
and their ``-Image`` checkpoints as converted for transformers, e.g. ``lkhl/VideoLLaMA3-2B-Image-HF``).

Model: a SigLIP-based tower (``model.vision_model``, 2-D axial rotary positions over each image's patch grid, its
``merge_size x merge_size`` blocks averaged by a bilinear resize after the last layer), an MLP ``model.projector``
onto the text width (outside the tower: it stays trainable under ``fix_vit``) and a Qwen2 text model
(``model.language_model``). Positions are 1-D: no multimodal rope index; the text model counts
``arange(sequence) + cached length`` itself, so SC-Tune passes none (rotary attention depends on differences only,
which left padding does not change).

Images: ``VideoLlama3ImageProcessor(Pil)`` is Qwen2-VL's patch grid with ``temporal_patch_size`` 1 and its own
``merge_size`` (1 in transformers' defaults, the image checkpoints'; videos merge 2 x 2). It also returns
``image_merge_sizes``, which the model needs beside ``pixel_values`` and ``image_grid_thw``. ``VideoLlama3Processor``
replaces the image token (``<|image_pad|>`` unless the tokenizer names another) with ``grid.prod() // merge_size**2``
of them: ``PatchGridChatAdapter``'s count. The processor's video processor needs torchvision and is never built; the
image processor's PIL backend needs none.

Boxes: DAMO-NLP-SG's own notebook (DAMO-NLP-SG/VideoLLaMA3 ``inference/notebooks/03_visual_referring_and_grounding
.ipynb``, VideoLLaMA3-7B-Image) grounds with "Where is the white car? Answer in [[x0,y0,x1,y1]] format." and prints
``<ref>the white car</ref>[[56, 42, 390, 484]]``, which it reads as ``[[x0, y0, x1, y1]]`` on a 0..1000 grid
(``normalized2raw``: ``box / 1000 * width``); its referring example asks "What is the license plate number of
[234, 117, 828, 707]?", the box as one list on the same grid. So the native codec is ``NestedListGridCodec(1000)``
(no box tags), the locator's target repeats the reference (``<ref>CAPTION</ref>``) before the box, and the describer's
prompt writes its box as the referring example does. The notebook runs the original remote-code release; that the
transformers conversion answers alike is assumed (same weights, same template turns).

Turn end: read from the checkpoint's template (``turn_end_token``: ``<|im_end|>``, ChatML as the release's
``DEFAULT_CHAT_TEMPLATE`` writes it).

Caches: the vision cache memoises the whole (frozen) tower per image (``vision_trunk``). No resume from a scoring
pass's cache, no moved prompt columns: each answers so by name below (not verified for this family); those passes run
in full, as for a family without them.
"""

from __future__ import annotations

from sc_tune.adapters.base import DocumentedAnswer, find_submodule
from sc_tune.adapters.patch_grid_chat import OneDPositionPatchGridAdapter, PatchGridTowerCall, patch_grid_vision_trunk
from sc_tune.adapters.registry import Family, auto_image_text_to_text, register
from sc_tune.box_codecs import GENERIC_CODEC, NestedListGridCodec

_NOTEBOOK = "DAMO-NLP-SG/VideoLLaMA3 inference/notebooks/03_visual_referring_and_grounding.ipynb"
VIDEO_LLAMA_3_ANSWERS = (
    DocumentedAnswer("<ref>the white car</ref>[[56, 42, 390, 484]]", (0.056, 0.042, 0.390, 0.484),
                     f"{_NOTEBOOK}, 1. Visual Grounding, Example1 (VideoLLaMA3-7B-Image)"),
    DocumentedAnswer("<ref>the logo of the yellow car</ref>[[640, 442, 723, 485]]", (0.640, 0.442, 0.723, 0.485),
                     f"{_NOTEBOOK}, 1. Visual Grounding, Example2 (VideoLLaMA3-7B-Image)"),
)
# The notebook's grounding request, after the phrase's question.
BOX_REQUEST = "Answer in [[x0,y0,x1,y1]] format."


class VideoLlama3Adapter(OneDPositionPatchGridAdapter):
    """Qwen2's full-attention layers: 1-D positions the text model counts, static decoding verified (the base's)."""

    native_codec = NestedListGridCodec(1000)
    answer_examples = VIDEO_LLAMA_3_ANSWERS
    image_keys = ("pixel_values", "image_grid_thw", "image_merge_sizes")
    vision_prefix = "model.vision_model"
    vision_trainable_prefixes = ()  # the projector (model.projector) is outside the tower

    def _native(self) -> bool:
        return self.codec is self.native_codec

    def describer_prompt(self, box_norm, image):
        if not self._native():
            return super().describer_prompt(box_norm, image)
        # The referring example writes the region as one list on the 0..1000 grid: the generic codec's text.
        return self.render(f"Describe the object at {GENERIC_CODEC.format(box_norm)} in a few words.")

    def locator_prompt(self, caption, image):
        if not self._native():
            return super().locator_prompt(caption, image)
        return self.render(f"Where is {self.plain_text(caption)}? {BOX_REQUEST}")

    def answer_prefix(self, caption):
        # The notebook's grounding answers repeat the reference before the box.
        return f"<ref>{caption}</ref>" if self._native() else ""

    def vision_trunk(self, model):
        # transformers' VideoLlama3VisionModel: patch embedding, encoder layers attending within each image
        # (cu_seqlens, no reordering), post_layernorm, then a per-image bilinear merge of each merge_size x merge_size
        # block (pixel_unshuffle, no parameters) and nothing else: under fix_vit the whole tower is frozen (the
        # trainable projector is outside it), so its whole output is memoised per image and only the post-layernorm
        # needs replaying for a call that misses the memo. The output holds grid.prod() / merge_size**2 rows per
        # image: in proportion to its pixel rows because SC-Tune's images all come from one image processor, with
        # one merge_size (the same pixels then also have the same grid and merge size, which the trunk reads).
        tower = find_submodule(model, self.vision_prefix)
        return patch_grid_vision_trunk(tower, tower.encoder.layers, [tower.post_layernorm],
                                       PatchGridTowerCall(("pixel_values", "grid_thw", "merge_sizes")))

    def resumes_from_scoring_cache(self, model, prompt_length, scored_length):
        """No (not verified for this family): the snapshot's greedy captions prefill their prompts again."""
        return False

    def moves_cached_prompt_columns(self, model, prompt_length):
        """No: moving cached prompt columns to other positions would re-rotate the Qwen2 layers' keys
        (``move_cached_keys``), which is not implemented for this family; the locator prompts are prefilled in
        full."""
        return False


register(Family("VideoLLaMA3", ("video_llama_3",), VideoLlama3Adapter, auto_image_text_to_text))
