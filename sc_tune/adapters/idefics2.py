"""Idefics2 (``idefics2``: HuggingFaceM4/idefics2-8b and idefics2-8b-chatty, ``Idefics2ForConditionalGeneration``): a
chat-template adapter, generic box codec; and ``IdeficsLineAdapter``, what the Idefics line (Idefics2, Idefics3 /
SmolVLM in ``sc_tune.adapters.smolvlm``) shares.

Box convention: none found (the idefics2-8b model card, transformers' ``idefics2`` doc and the processor show
captioning, visual question answering and OCR, no grounding prompt or box answer), so the adapter uses the generic codec
``[x1, y1, x2, y2]`` on 0..1000 (``sc_tune.box_codecs.GENERIC_CODEC``), requested in the locator prompt, and the
checkpoints need a grounding warm start (docs/grounding_warm_start.md).

Template: ``User:<image>text<end_of_utterance>\\n`` and the opened ``Assistant:``; the turn's end is read from the
checkpoint's template (``<end_of_utterance>``; the releases' generation config also stops on ``</s>``, the tokenizer's
EOS). The template writes no BOS: the tokenizer prepends ``<s>``, as ``Idefics2Processor`` tokenises a rendered prompt.

Images: a perceiver resampler, not a pixel shuffle, so every image (and every crop) takes the same number of
``<image>`` tokens, ``perceiver_config.resampler_n_latents`` (64 in the releases), between
``<fake_token_around_image>`` tokens. With ``do_image_splitting`` (idefics2-8b's default) ``Idefics2ImageProcessorPil``
cuts the photo into its 4 quarters and appends the whole photo, 5 crops each resized on its own; crops are padded to
the largest, and ``pixel_attention_mask`` marks their real pixels (the tower attends to whole patches inside it only).
Crops and masks are zero-padded across the batch (the model drops all-zero crops). ``fix_vit`` freezes
``model.vision_model``; ``model.connector`` (modality projection and perceiver) stays trainable.

Caches: static decoding runs (a Mistral text model). There is no vision cache (``vision_trunk``, which answers so by
name below). The snapshot's greedy captions resume from its scoring pass's cache while the scored sequence fits the
Mistral window (1-D rotary positions: ``sc_tune.adapters.unpadded_positions``); its window layers move no cached
prompt columns, so locating prefills in full. SmolVLM opts in the same way, with full attention layers that also move.
"""

from __future__ import annotations

from sc_tune.adapters.chat_template import ChatTemplateAdapter, TemplateImageInputs
from sc_tune.adapters.registry import Family, auto_image_text_to_text, register
from sc_tune.adapters.unpadded_positions import UnpaddedPositionsPromptCache


class IdeficsLineAdapter(ChatTemplateAdapter):
    """The Idefics line's prompt tokens and module names (Idefics2, Idefics3 / SmolVLM): ``<image>`` for the template's
    image and for each feature, ``<fake_token_around_image>`` around the images' features, turns ended by
    ``<end_of_utterance>``; the text model at ``model.text_model``, the tower at ``model.vision_model`` (the connector
    beside it stays trainable); crops and their pixel masks padded across a batch."""

    image_marker = "<image>"
    image_token = "<image>"
    end_token = "<end_of_utterance>"
    static_decoding_verified = True
    grounding_prior = False  # no documented grounding: a grounding warm start first (docs/grounding_warm_start.md)
    language_model_prefix = "model.text_model"
    vision_prefix = "model.vision_model"
    padded_keys = ("pixel_values", "pixel_attention_mask")

    def __init__(self, tokenizer, image_processor, config, box_format: str = "native"):
        super().__init__(tokenizer, image_processor, config, box_format)
        self.crop_token = getattr(tokenizer, "fake_image_token", None) or "<fake_token_around_image>"
        self.token_ids(self.crop_token)


class Idefics2Adapter(UnpaddedPositionsPromptCache, IdeficsLineAdapter):
    def __init__(self, tokenizer, image_processor, config, box_format: str = "native"):
        super().__init__(tokenizer, image_processor, config, box_format)
        # The perceiver's latents are the features of one crop whatever its size; Idefics2Processor's image_seq_len
        # (processor_config.json) must equal them, and the model checks the count.
        self.image_seq_len = int(config.perceiver_config.resampler_n_latents)

    def preprocess_image(self, image):
        out = self.image_processor(images=[[image]], return_tensors="pt")
        pixel_values_1NCHW, pixel_attention_mask_1NHW = out["pixel_values"], out["pixel_attention_mask"]
        crops = int(pixel_values_1NCHW.shape[1])  # 5 with image splitting (4 quarters + the whole photo), else 1
        # As Idefics2Processor lays out its crops: one <fake_token_around_image> between two crops, not two.
        placeholder = self.crop_token + (self.image_token * self.image_seq_len + self.crop_token) * crops
        # The whole photo is the last crop; its unpadded size (the generic codec does not read it).
        whole_HW = pixel_attention_mask_1NHW[0, -1]
        frame = (int(whole_HW[0].sum()), int(whole_HW[:, 0].sum()))
        tensors = {"pixel_values": pixel_values_1NCHW, "pixel_attention_mask": pixel_attention_mask_1NHW}
        return TemplateImageInputs(tensors, self.image_seq_len * crops, frame, placeholder)

    def expand_image_marker(self, text, image):
        # Idefics2Processor keeps a word glued to the image ("User:<image>Locate ...": the template writes the text
        # right after the image) apart from the closing <fake_token_around_image> with a space; the checkpoints read
        # their prompts so.
        head, tail = text.split(self.image_marker, 1)
        gap = " " if tail[:1] and not tail[:1].isspace() and tail[:1] != "<" else ""
        return head + image.placeholder + gap + tail

    def vision_trunk(self, model):
        """None: no vision cache. A crop is padded to the batch's largest crop, and the tower's output rows for it are
        its padded patches, so an image's encoding is not the same in every batch that holds it; every pass runs the
        whole tower (correct, slower)."""
        return None


register(Family("Idefics2", ("idefics2",), Idefics2Adapter, auto_image_text_to_text))
