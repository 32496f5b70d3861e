"""Adapters driven by the checkpoint's own chat template (InternVL, Gemma 3 / 4, LLaVA-OneVision, LLaVA-1.5 / NeXT,
Mistral 3, Aya Vision, Granite 4 Vision, Llama 3.2 Vision, Idefics2, SmolVLM, Ovis2, MiniCPM-V 4.6 / 4.7).

These families ship their turn format as a Jinja chat template with the tokenizer (``chat_template.jinja``,
or the processor's legacy ``chat_template.json``). A prompt is rendered through that template, exactly as
the family's processor would render ``[{"type": "image"}, {"type": "text", ...}]``, and the one image marker
the template writes (``<IMG_CONTEXT>``, ``<start_of_image>``, ``<|image|>``, ``<image>``, ``<|image_pad|>``) is
then expanded to the placeholder sequence of that image (its start/end tokens and one placeholder token per image
feature; Llama 3.2 Vision's ``<|image|>`` stays one token, its image read through cross-attention layers).

Why not call the family's processor: in transformers 5.24 the InternVL, LLaVA-OneVision, SmolVLM, Gemma 4 and
MiniCPM-V processors cannot be built without a video processor, which needs torchvision (not a dependency
here), and SmolVLM's also needs ``num2words``. The image processors have PIL backends, so each family module
preprocesses with the image processor and expands the marker itself, reusing transformers' own helpers
where they are public (SmolVLM's prompt string, LLaVA-OneVision's feature count, Ovis2's and MiniCPM-V's
placeholders). Every expanded prompt is checked to hold exactly as many placeholder tokens as the image yields
features, so a wrong count fails at batch building with a clear error, not as "image features and image tokens do
not match" inside the model.

Boxes: InternVL has a documented convention (its own codec, see ``sc_tune.adapters.internvl``); Gemma 3 / 4 take
Gemini's y-first ``box_2d`` (``sc_tune.adapters.gemma``); LLaVA-OneVision, Idefics2, SmolVLM, Ovis2 and MiniCPM-V
4.6 / 4.7 document none, so their native codec is the generic one (``sc_tune.box_codecs.GENERIC_CODEC``) and their
prompts ask for it in words.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from sc_tune.adapters.base import ImageInputs, ModelAdapter, language_model_lora_targets, load_chat_tokenizer
from sc_tune.box_codecs import GENERIC_CODEC

logger = logging.getLogger(__name__)


@dataclass
class TemplateImageInputs(ImageInputs):
    """An image preprocessed once, with the text that replaces the chat template's image marker."""

    placeholder: str = ""


class GenericTemplateTurns:
    """The prompts and turn end of a family with no grounding form of its own, driven by its chat template: prompts in
    words asking for the codec's box, answers closed by ``end_token`` (the template's turn end, ``turn_end_token``),
    the tokenizer's EOS also stopping. Shared by ``ChatTemplateAdapter`` and the patch-grid families without a
    documented form (EXAONE 4.5, HyperCLOVA X SEED Vision v2)."""

    end_token: str | None

    def describer_prompt(self, box_norm, image):
        return self.render(f"Describe the object at {self.codec.format(box_norm, image.frame)} in a few words.")

    def locator_prompt(self, caption, image):
        return self.render(f"Locate {self.plain_text(caption)}. {self.codec.request}")

    @property
    def end_text(self) -> str:
        return self.end_token

    @property
    def end_token_ids(self) -> list[int]:
        # Also stop on the tokenizer's EOS where it differs (Gemma: <eos> besides <end_of_turn>).
        ids = [self.tokenizer.convert_tokens_to_ids(self.end_token)]
        if self.tokenizer.eos_token_id is not None and self.tokenizer.eos_token_id not in ids:
            ids.append(self.tokenizer.eos_token_id)
        return ids

    @property
    def pad_token_id(self) -> int:
        # Some checkpoints define no pad token; pads are masked out (attention and completion masks), so the
        # turn's end token serves.
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else self.end_token_ids[0]


class ChatTemplateAdapter(GenericTemplateTurns, ModelAdapter):
    """Prompts through the tokenizer's chat template; one image per prompt; families differ in small tables.

    A family subclass sets the class attributes below and implements ``preprocess_image``.
    """

    native_codec = GENERIC_CODEC
    image_marker: str  # what the chat template writes for {"type": "image"}
    image_token: str  # the placeholder token the model replaces with one image feature each
    image_start: str = ""  # the tokens around one image's placeholders ("" where there are none)
    image_end: str = ""
    # Whether the template's image marker is a token of the tokenizer (Ovis2's "<image>" is plain text that its
    # processor replaces before tokenising; the released tokenizer has no such token).
    image_marker_is_token: bool = True
    # The token that closes an assistant turn; None: read from the checkpoint's chat template (turn_end_token), for
    # families whose checkpoints end turns differently (llava-hf's </s>, <|im_end|>, <|eot_id|>; Mistral 3's </s>).
    end_token: str | None = None
    # Modules (names as in the model's state dict): fix_vit freezes the vision tower; the projector lives outside it
    # in these families, so it stays trainable (Ovis2's visual head, inside the tower: vision_trainable_prefixes).
    language_model_prefix: str = "model.language_model"
    vision_prefix: str = "model.vision_tower"
    # Per-token input marking image placeholders with 1 (Gemma: bidirectional attention inside an image).
    image_type_key: str | None = None
    # Per-image tensors whose shape past the first dimension (tiles / crops; Mistral 3's pixel height and width)
    # differs between images: zero-padded at the end of each dimension to the batch's largest (the models drop
    # all-zero tiles, or slice by ``image_sizes``), the rest concatenated.
    padded_keys: tuple[str, ...] = ()
    # Per-image tensors packed NaViT-style along their last dimension (MiniCPM-V's pixel_values): concatenated there.
    packed_keys: tuple[str, ...] = ()
    # Projections LoRA targets besides LM_PROJECTIONS (a hybrid text model's linear-attention layers).
    lora_extra_projections: tuple[str, ...] = ()
    # Media special tokens the base class's name patterns miss (e.g. SmolVLM's tile tokens <row_1_col_1>).
    extra_media_tokens: re.Pattern | None = None
    # Whether the adapter renders a template that writes today's date (strftime_now) with a fixed one (Mistral 3).
    pins_template_date: bool = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "lora_target_modules" not in cls.__dict__:
            prefix, extra = cls.language_model_prefix, cls.lora_extra_projections
            cls.lora_target_modules = language_model_lora_targets(prefix, *extra)
        cls.per_token_keys = (cls.image_type_key,) if cls.image_type_key else ()

    @classmethod
    def from_pretrained(cls, path: str, box_format: str = "native") -> ChatTemplateAdapter:
        from transformers import AutoConfig, AutoImageProcessor

        adapter = cls(load_chat_tokenizer(path), AutoImageProcessor.from_pretrained(path),
                      AutoConfig.from_pretrained(path), box_format)
        adapter.check_not_thinking_only(path)
        return adapter

    @classmethod
    def from_parts(cls, tokenizer, image_processor, config) -> ChatTemplateAdapter:
        return cls(tokenizer, image_processor, config)

    def __init__(self, tokenizer, image_processor, config, box_format: str = "native"):
        super().__init__(tokenizer, box_format)
        self.image_processor = image_processor
        self.config = config
        if not tokenizer.chat_template:
            raise ValueError(f"{type(self).__name__}: the tokenizer has no chat template (chat_template.jinja)")
        if self.end_token is None:
            self.end_token = turn_end_token(tokenizer)
        self.answer_opening = answer_opening(tokenizer)
        if "strftime_now" in tokenizer.chat_template and not self.pins_template_date:
            # Mistral 3's template dates its system message; a checkpoint of another family may too. Its prompts then
            # change at midnight, and a resume (or a resumed evaluation) on another day renders other prompts.
            logger.warning("%s: the chat template writes today's date (strftime_now) into the prompts: they change at "
                           "midnight, and a resume on another day is not exact", type(self).__name__)
        marker = self.image_marker if self.image_marker_is_token else ""
        family_tokens = (self.image_token, marker, self.end_token, self.image_start, self.image_end)
        self.image_token_id = self.token_ids(*(t for t in family_tokens if t))[0]

    def token_ids(self, *tokens: str) -> list[int]:
        """Ids of the family's special tokens; a clear error if the tokenizer lacks one (it would otherwise be
        split into ordinary pieces and the prompt would silently lose its structure)."""
        vocab = self.tokenizer.get_vocab()
        missing = [t for t in tokens if t not in vocab]
        if missing:
            raise ValueError(f"{type(self).__name__}: the tokenizer lacks the family's special tokens {missing}")
        return [vocab[t] for t in tokens]

    # ---------------------------------------------------------------- prompts
    def reserved_strings(self) -> set[str]:
        # A marker that is plain text (Ovis2's "<image>") is no special token, but the family's processor expands every
        # one in a prompt into an image: a caption that spells it would be one image too many there.
        return super().reserved_strings() | {self.image_marker}

    def suppressed_token_ids(self, describer: bool) -> list[int]:
        ids = set(super().suppressed_token_ids(describer))
        if self.extra_media_tokens is not None:
            ids |= {i for text, i in self.special_tokens().items() if self.extra_media_tokens.search(text)}
        return sorted(ids - set(self.end_token_ids))

    # ---------------------------------------------------------------- images and tokens
    def preprocess_image(self, image: Image.Image) -> TemplateImageInputs:
        """The family's image processor on one RGB image -> tensors, feature count, placeholder text, frame."""
        raise NotImplementedError

    def image_block(self, num_tokens: int) -> str:
        """One image's placeholder sequence: start token, one placeholder per feature, end token."""
        return f"{self.image_start}{self.image_token * num_tokens}{self.image_end}"

    def prepare_image(self, image: Image.Image) -> TemplateImageInputs:
        return self.preprocess_image(image.convert("RGB"))

    def encode_prompt(self, text: str, image: ImageInputs) -> list[int]:
        if self.image_marker not in text:
            raise ValueError(f"a prompt must hold the image marker {self.image_marker!r}: {text!r}")
        expanded = self.expand_image_marker(text, image)
        ids = self.tokenizer(expanded, add_special_tokens=self.adds_special_tokens(text))["input_ids"]
        found = ids.count(self.image_token_id)
        if found != image.num_tokens:
            raise ValueError(
                f"prompt holds {found} {self.image_token!r} tokens for {image.num_tokens} image features "
                f"(does its text carry a stray {self.image_token!r}?): {text!r}"
            )
        return ids

    def expand_image_marker(self, text: str, image: TemplateImageInputs) -> str:
        """The rendered prompt with the image's placeholder text in place of its marker. The image item comes first in
        the user turn, so the first marker is the image's."""
        return text.replace(self.image_marker, image.placeholder, 1)

    def adds_special_tokens(self, prompt: str) -> bool:
        """Whether the tokenizer's own special tokens go around a rendered prompt, as the family's processor decides
        in ``apply_chat_template``: yes unless the prompt starts with the BOS. A template that writes its BOS (Gemma's
        ``<bos>``) gets no second one; one that does not (the llava-hf templates, whose Llama / Mistral tokenizers
        prepend ``<s>``) gets the BOS its model always saw."""
        bos = self.tokenizer.bos_token
        return not (bos is not None and prompt.startswith(bos))

    def image_batch(self, images: Sequence[ImageInputs], input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        batch = {}
        for key in images[0].tensors:
            parts = [im.tensors[key] for im in images]
            if key in self.padded_keys:
                batch[key] = _pad_to_largest(parts)
            else:
                batch[key] = torch.cat(parts, dim=-1 if key in self.packed_keys else 0)
        if self.image_type_key:
            batch[self.image_type_key] = (input_ids == self.image_token_id).long()
        return batch


def processor_tile(image_processor) -> tuple[int, int]:
    """(height, width) of a tiling image processor's ``size`` (a dict, or transformers' ``SizeDict``): the tile it cuts,
    which the families' towers take whole (Aya Vision, Llama 3.2 Vision)."""
    size = image_processor.size
    return (size["height"], size["width"]) if isinstance(size, dict) else (size.height, size.width)


def _pad_to_largest(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Stack per-image ``(1, ...)`` tensors into ``(B, ...)``, each dimension as large as the largest image's,
    zero-padded at its end (tiles after an image's own; pixel rows below and columns right of it, as Pixtral's
    processor pads)."""
    shape = [max(sizes) for sizes in zip(*(p.shape[1:] for p in parts))]
    out = parts[0].new_zeros((len(parts), *shape))
    for i, p in enumerate(parts):
        out[(i, *(slice(0, n) for n in p.shape[1:]))] = p[0]
    return out


_PROBE = "sc-tune-probe-answer"  # an assistant answer no template writes itself


def turn_end_token(tokenizer) -> str:
    """The special token that closes an assistant turn in the checkpoint's chat template: the first special token the
    template writes after an answer (``<|im_end|>``, ``<|eot_id|>``, ``</s>``), else the tokenizer's EOS (LLaVA-1.5's
    template writes nothing after an answer: the model ends it with ``</s>``)."""
    messages = [{"role": "user", "content": [{"type": "text", "text": "q"}]},
                {"role": "assistant", "content": [{"type": "text", "text": _PROBE}]}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    if _PROBE not in rendered:
        raise ValueError("the chat template does not render an assistant answer, so the token that ends a turn "
                         "cannot be read from it")
    after = rendered.split(_PROBE, 1)[1]
    found = [(after.index(t), -len(t), t) for t in {*tokenizer.get_added_vocab(), *tokenizer.all_special_tokens}
             if t and t in after]
    if found:
        return min(found)[2]
    if tokenizer.eos_token is None:
        raise ValueError("the chat template writes no special token after an answer and the tokenizer has no "
                         "eos_token (tokenizer_config.json): nothing would end a turn")
    return tokenizer.eos_token


def answer_opening(tokenizer) -> str:
    """What a target tokenised on its own must start with to be the answer the checkpoint's template writes after its
    generation prompt: the spacing the template puts between the two (SmolVLM's, Idefics2's and LLaVA-1.5's
    ``Assistant:`` + " " + answer), unless the tokenizer already writes it at the start of any text (a Llama-style
    "▁" prefix: the answer alone then tokenises as it does in place). Empty for templates whose generation prompt ends
    where an answer starts (ChatML, Gemma, Llama 3 headers), and for templates whose rendered answer does not follow
    their generation prompt (a thinking opener only the prompt writes).

    Why: the released model learnt its answers in place, so SmolVLM's first answer token is " [" (with its space);
    a locator target without it would teach the model a turn the template never writes."""
    user = [{"role": "user", "content": [{"type": "text", "text": "q"}]}]
    prompt = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    answer_turn = {"role": "assistant", "content": [{"type": "text", "text": _PROBE}]}
    answered = tokenizer.apply_chat_template(user + [answer_turn], tokenize=False, enable_thinking=False)
    if not answered.startswith(prompt) or _PROBE not in answered[len(prompt):]:
        return ""
    gap = answered[len(prompt):].split(_PROBE, 1)[0]
    if not gap or gap.strip():
        # Nothing, or more than spacing: a template whose generation prompt does not open the answer turn (a role
        # header written only with the answer) is not made whole by the target.
        return ""
    ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    answer = "[1"  # how every answer form starts (a bracket, then a digit)
    in_place, before = ids(prompt + gap + answer), ids(prompt)
    if in_place[:len(before)] == before and in_place[len(before):] == ids(answer):
        return ""  # the tokenizer writes the gap itself
    return gap
