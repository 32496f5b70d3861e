"""The model-adapter interface: everything the trainer and the evaluator need to know about a family.

An adapter owns the prompt text of the two roles, the box codec, how one image becomes model inputs
(once per sample per step), how a batch is built (left padding, labels on the answer only), what to pass
to ``generate`` and how generated text is decoded. The trainer and the evaluator never name a family.

Prompts (per family, see the subclasses):

- describer: image + box -> the model continues with a caption that ends in the family's end token;
- locator: image + caption -> the model continues with ``locator_target(box)`` (the box text and the end).
"""

from __future__ import annotations

import json
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image

from sc_tune.box_codecs import BoxCodec, BoxReading, select_codec
from sc_tune.vision_cache import VisionTrunk

# Special tokens no generated text may carry, found by name in the family's own tokenizer so that the full
# tokenizer of a real checkpoint is covered, not only the tokens a prompt uses. Media tokens (image/video
# placeholders and their frames) are never generated; a sampled placeholder breaks the rope-index step of
# the Qwen3.5-style models. Box/reference tokens are kept out of captions only: locator answers use them.
MEDIA_TOKEN_RE = re.compile(r"image|video|vision|img", re.IGNORECASE)
BOX_TOKEN_RE = re.compile(r"box|ref|quad", re.IGNORECASE)


# Decoder layer kinds a static decode step knows (sc_tune.decoding): attention over the cache, recurrent state
# (Qwen3.5's Gated DeltaNet), and windows as long as they cover the call (checked per call).
STATIC_DECODING_LAYERS = {"full_attention", "linear_attention", "sliding_attention", "chunked_attention"}
# The box a codec writes longest: every coordinate at its maximum (1000 on a grid, the frame on pixels).
WIDEST_BOX = (1.0, 1.0, 1.0, 1.0)
# Tokens a locator budget allows beyond the widest box answer the family's own form takes: the whitespace
# and indentation variants released models write (a tab or two spaces, a newline more or less).
LOCATOR_BUDGET_MARGIN = 6


@dataclass(frozen=True)
class DocumentedAnswer:
    """A grounding answer as the released model writes it, quoted from the family's own documentation.

    ``box`` is the normalised box it must read as (``None``: it must not read, because it is ambiguous);
    ``frame`` is the model-input (width, height) that pixel coordinates refer to."""

    text: str
    box: tuple[float, float, float, float] | None
    source: str
    frame: tuple[int, int] = (1000, 1000)


class ThinkingOnlyCheckpoint(ValueError):
    """A checkpoint that always reasons before it answers: SC-Tune's short answers cannot hold its reasoning."""


@dataclass
class ImageInputs:
    """One sample's image, preprocessed once and reused by every prompt built for that sample."""

    tensors: dict[str, torch.Tensor]  # e.g. pixel_values and image_grid_thw for Qwen2-VL
    num_tokens: int  # placeholder tokens the image takes in the text
    frame: tuple[int, int]  # (width, height) of the model input, for pixel-space box codecs


@dataclass
class PromptBatch:
    """A left-padded batch of prompts (optionally with targets) and its images, ready for the model."""

    inputs: dict[str, torch.Tensor]  # input_ids, attention_mask and the family's image tensors
    labels: torch.Tensor | None = None  # -100 except on target tokens, when targets were given
    images: list[ImageInputs] = field(default_factory=list)

    @property
    def input_ids(self) -> torch.Tensor:
        return self.inputs["input_ids"]

    def to(self, device: torch.device | str) -> PromptBatch:
        moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.inputs.items()}
        labels = self.labels.to(device) if self.labels is not None else None
        return PromptBatch(moved, labels, self.images)


class ModelAdapter(ABC):
    """Family-specific glue. Subclasses set ``native_codec`` and implement the abstract methods.

    ``box_format`` (``--box_format``) picks the codec at construction: ``native`` (the family's own
    convention, ``native_codec``) or ``generic`` (``sc_tune.box_codecs.GENERIC_CODEC``).
    """

    native_codec: BoxCodec
    codec: BoxCodec  # the one in use, set by __init__
    # Per-token model inputs other than input_ids/attention_mask that must grow with appended tokens
    # (filled with ``0``, which marks text), e.g. ``mm_token_type_ids`` on transformers 5.
    per_token_keys: tuple[str, ...] = ()

    # Module-name prefixes used by ``fix_vit`` and LoRA (names as in the model's state dict).
    vision_prefix: str = ""  # the whole vision tower, frozen by ``fix_vit``...
    vision_trainable_prefixes: tuple[str, ...] = ()  # ...except these (the resampler / merger)
    # PEFT ``target_modules``: a regex matched against full module names (language model only).
    lora_target_modules: str = ""
    # MoE variants: the routed experts' fused 3-D parameters (name suffixes), for ``--lora_target_experts``.
    lora_expert_parameters: tuple[str, ...] = ()
    # Whether the released checkpoints were trained to ground (write boxes). Families without it need a
    # grounding warm start before SC-Tune: until then no box parses and every reward is 0 (the preflight says so).
    grounding_prior: bool = True
    # Answers the released checkpoints write, quoted from the family's docs (tests and
    # ``python -m sc_tune.families`` read every one).
    documented_answers: tuple[DocumentedAnswer, ...] = ()

    def vision_trunk(self, model: torch.nn.Module) -> VisionTrunk | None:
        """Where ``model``'s frozen vision trunk is, for ``sc_tune.vision_cache`` (``--vision_cache``).

        Fallback (this default): ``None``, no cache; every pass runs the whole tower, which is always
        correct, only slower. A family overrides this when its tower splits cleanly into frozen blocks whose
        outputs a trainable tail (merger, resampler, projector) reads, per image, contiguous along dim 0."""
        return None

    def resumes_from_scoring_cache(self, model: torch.nn.Module, prompt_length: int, scored_length: int) -> bool:
        """Whether ``model.generate`` may start from the key/value cache of a teacher-forced pass over the same
        left-padded prompts followed by ``scored_length - prompt_length`` more columns, cropped back to the prompt.

        The trainer uses it to skip the snapshot's prompt prefill for its greedy captions (its scoring pass has
        just computed that cache). It is exact only where a prompt column's keys and values do not depend on
        what follows the prompt, and the family's ``generate`` resumes from a cache that it did not build.
        Default (fallback): ``False``, the prompt is prefilled again, which is always correct."""
        return False

    def moves_cached_prompt_columns(self, model: torch.nn.Module, prompt_length: int) -> bool:
        """Whether prompt columns of one batch's key/value cache may be moved into another batch's cache, at other
        columns and positions, for prompts of up to ``prompt_length`` tokens (``sc_tune.prompt_cache``).

        The trainer uses it to locate captions from the image prefix that the snapshot's scoring pass has just
        read. It needs ``move_cached_keys`` and a model that takes per-row ``position_offsets`` in ``generate``.
        Default (fallback): ``False``, the locator prompts are prefilled in full, which is always correct."""
        return False

    def move_cached_keys(self, model: torch.nn.Module, keys_BHCD: torch.Tensor, shift_B: torch.Tensor) -> torch.Tensor:
        """Cached keys of one layer, each row's moved ``shift_B`` positions along (only where
        ``moves_cached_prompt_columns``); values need no change."""
        raise NotImplementedError(f"{type(self).__name__} does not move cached prompt columns")

    # sc_tune.decoding's static key/value cache and fixed-shape (CUDA-graph) decode steps: a family opts in once
    # tests/test_decoding.py shows its tokens equal transformers' generate, greedy and sampled.
    static_decoding_verified: bool = False

    def static_decoding_problem(self, model: torch.nn.Module) -> str | None:
        """Why ``model`` cannot decode from a static key/value cache with fixed-shape steps (``--static_decoding``), or
        ``None`` where it can. Default (fallback): the family is not verified, and transformers' ``generate`` decodes."""
        name = type(self).__name__
        if not self.static_decoding_verified:
            return f"{name}: static decoding is not verified for this family"
        text = model.config.get_text_config(decoder=True)
        attention = getattr(text, "_attn_implementation", None) or "sdpa"
        if attention != "sdpa":
            return f"{name}: attention implementation {attention!r} (static decode steps build SDPA masks)"
        unknown = set(getattr(text, "layer_types", None) or []) - STATIC_DECODING_LAYERS
        if unknown:
            return f"{name}: no static decode step for {sorted(unknown)} layers"
        return None

    def resumed_decoding_inputs(self, inputs: dict) -> dict:
        """A prompt batch's model inputs for a ``generate`` that starts from its prompt cache: the images are in
        the cache already, so a family whose model would encode them again (and find no image token in the
        uncached column) drops them here. Default: unchanged."""
        return inputs

    def __init__(self, tokenizer, box_format: str = "native"):
        self.tokenizer = tokenizer
        self.box_format = box_format
        self.codec = select_codec(self.native_codec, box_format)

    @property
    def native(self) -> bool:
        """Whether the family's own box format is in use (``--box_format native``); the generic one otherwise."""
        return self.codec is self.native_codec

    @classmethod
    @abstractmethod
    def from_pretrained(cls, path: str, box_format: str = "native") -> ModelAdapter:
        """Load the tokenizer (and image processor) saved in a checkpoint folder."""

    def save_pretrained(self, directory: str) -> None:
        """Write the tokenizer (and image processor) next to saved weights, so the folder reloads."""
        self.tokenizer.save_pretrained(directory)
        image_processor = getattr(self, "image_processor", None)
        if hasattr(image_processor, "save_pretrained"):  # Qwen-VL's lives in config.json's "visual" block
            image_processor.save_pretrained(directory)

    # ---------------------------------------------------------------- prompts and targets (text)
    @abstractmethod
    def describer_prompt(self, box_norm: Sequence[float], image: ImageInputs) -> str:
        """Text that makes the model caption the object in ``box_norm``."""

    @abstractmethod
    def locator_prompt(self, caption: str, image: ImageInputs) -> str:
        """Text that makes the model write the box of the object ``caption`` refers to."""

    @abstractmethod
    def locator_target(self, box_norm: Sequence[float], image: ImageInputs, caption: str = "") -> str:
        """What the locator should write after ``locator_prompt(caption)``: the family's own answer form holding
        the box (and, where the form labels it, the caption), then the end token."""

    def describer_target(self, caption: str) -> str:
        """What the describer should write after ``describer_prompt`` for a known caption (warm starts)."""
        return caption + self.end_text

    def read_locator_output(self, text: str, image: ImageInputs) -> BoxReading:
        """The normalised box in the locator's continuation, or ``BoxReading(None, why)``."""
        return self.codec.read(text, image.frame)

    def parse_locator_output(self, text: str, image: ImageInputs) -> list[float] | None:
        """The normalised box in the locator's continuation, or ``None`` (counted as a parse failure)."""
        return self.read_locator_output(text, image).box

    @classmethod
    def default_frame(cls, image_size: tuple[int, int]) -> tuple[int, int]:
        """The model-input (width, height) the family's released processor makes of an image of ``image_size``
        (what pixel coordinates refer to), without a checkpoint at hand. Grid codecs ignore it."""
        return tuple(image_size)

    def widest_answer(self, image: ImageInputs) -> str:
        """The family's answer form for the widest box of ``image``, up to where its box ends: what a locator
        must have written before its answer parses (a trailing label or closing fence needs no budget)."""
        target = self.locator_target(WIDEST_BOX, image)
        end = self.codec.box_end(target)
        if end is None:
            raise ValueError(f"{type(self).__name__}: its own locator target does not read back: {target!r}")
        return target[:end]

    def locator_budget(self, images: Sequence[ImageInputs]) -> int:
        """New tokens a locator needs for its widest box in these images, counted with this tokenizer in the
        family's answer form, plus ``LOCATOR_BUDGET_MARGIN``."""
        return max(len(self.encode_target(self.widest_answer(im))) for im in images) + LOCATOR_BUDGET_MARGIN

    # ---------------------------------------------------------------- the chat template
    def render(self, user_text: str, answer_prefix: str = "") -> str:
        """One user turn (the image, then ``user_text``) and the opened assistant turn, rendered by the
        checkpoint's own chat template with reasoning switched off where the template has a switch
        (``enable_thinking=False``: Qwen3.5's empty think block, GLM-4.5V/4.6V's ``/nothink``)."""
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": user_text}]}]
        prompt = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, enable_thinking=False
        )
        return prompt + answer_prefix

    def check_chat_template(self, name: str) -> None:
        """Refuse a checkpoint without a chat template, or one whose template always opens a reasoning block
        (e.g. Qwen3-VL-*-Thinking, which shares ``model_type`` with Instruct): a 20-40-token answer cannot
        hold its reasoning, so every box would be a parse failure and every reward 0."""
        if not self.tokenizer.chat_template:
            raise ValueError(
                f"{name}: the tokenizer has no chat template (chat_template.jinja, chat_template.json or "
                "tokenizer_config.json's chat_template); SC-Tune renders every prompt through it"
            )
        probe = self.render("?")
        if probe.count("<think>") > probe.count("</think>"):
            raise ThinkingOnlyCheckpoint(
                f"{name} is a thinking-only checkpoint: its chat template opens a reasoning block it cannot "
                "switch off. SC-Tune's describer and locator answers are 20-40 tokens, which cannot hold the "
                "reasoning. Use the family's Instruct (non-thinking) release."
            )

    # ---------------------------------------------------------------- images and tokens
    # Image sizes the family's processor accepts, checked for every record before training; a family whose
    # processor is stricter (or looser) overrides these or ``image_size_problem``.
    min_image_side: int = 8
    max_image_aspect_ratio: float = 200.0  # Qwen2-VL-style processors refuse longer/shorter side > 200

    def image_size_problem(self, width: int, height: int) -> str | None:
        """Why an image of this size cannot go through the processor, or None."""
        if min(width, height) < self.min_image_side:
            return f"image too small ({width}x{height}, shorter side < {self.min_image_side})"
        if max(width, height) / min(width, height) > self.max_image_aspect_ratio:
            return f"image aspect ratio too extreme ({width}x{height}, > {self.max_image_aspect_ratio:g}:1)"
        return None

    @abstractmethod
    def prepare_image(self, image: Image.Image) -> ImageInputs:
        """Preprocess one RGB image (resize, normalise, patchify) into model tensors."""

    @abstractmethod
    def encode_prompt(self, text: str, image: ImageInputs) -> list[int]:
        """Token ids of a prompt, with the image placeholder expanded to ``image.num_tokens`` tokens."""

    @abstractmethod
    def image_batch(self, images: Sequence[ImageInputs], input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """The image tensors of a batch whose rows use ``images`` in order (plus per-token fields)."""

    @property
    @abstractmethod
    def end_text(self) -> str:
        """The token text that ends an answer (the describer's caption and the locator's box)."""

    @property
    def end_token_ids(self) -> list[int]:
        """Ids that stop generation. By default the id of ``end_text``."""
        return [self.tokenizer.convert_tokens_to_ids(self.end_text)]

    @property
    def pad_token_id(self) -> int:
        return self.tokenizer.pad_token_id

    def special_tokens(self) -> dict[str, int]:
        """Every special (added) token of the tokenizer, text -> id."""
        return dict(self.tokenizer.get_added_vocab())

    def suppressed_token_ids(self, describer: bool = True) -> list[int]:
        """Ids generation must never emit: media tokens always, box/reference tokens in captions too.

        End tokens are never suppressed. Sorted, so that generation does not depend on dict order."""
        keep = set(self.end_token_ids)
        names = (MEDIA_TOKEN_RE, BOX_TOKEN_RE) if describer else (MEDIA_TOKEN_RE,)
        return sorted(
            {
                token_id
                for text, token_id in self.special_tokens().items()
                if token_id not in keep and any(r.search(text) for r in names)
            }
        )

    def encode_target(self, text: str) -> list[int]:
        """Token ids of an answer, tokenised on its own so that it never merges with the prompt."""
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode_caption(self, token_ids: Sequence[int]) -> str:
        """Generated describer tokens -> caption text for the locator prompt (specials dropped)."""
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True).strip()

    def decode(self, token_ids: Sequence[int]) -> str:
        """Generated locator tokens -> text the codec parses (special tokens kept: some formats use them)."""
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=False)

    def generation_kwargs(self, describer: bool = True) -> dict:
        return {
            "eos_token_id": self.end_token_ids,
            "pad_token_id": self.pad_token_id,
            "suppress_tokens": self.suppressed_token_ids(describer) or None,
        }

    # ---------------------------------------------------------------- batches (shared by every family)
    def build_batch(
        self,
        prompts: Sequence[str],
        images: Sequence[ImageInputs],
        targets: Sequence[str] | None = None,
    ) -> PromptBatch:
        """Tokenise, append targets, left-pad, and attach images. Labels cover target tokens only."""
        if len(prompts) != len(images) or (targets is not None and len(targets) != len(prompts)):
            raise ValueError(
                f"build_batch got {len(prompts)} prompts, {len(images)} images and "
                f"{'no' if targets is None else len(targets)} targets; they must match one to one"
            )
        rows, label_rows = [], []
        for i, (text, image) in enumerate(zip(prompts, images)):
            ids = self.encode_prompt(text, image)
            labels = [-100] * len(ids)
            if targets is not None:
                target_ids = self.encode_target(targets[i])
                ids = ids + target_ids
                labels = labels + target_ids
            rows.append(ids)
            label_rows.append(labels)
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        for i, (ids, lab) in enumerate(zip(rows, label_rows)):
            input_ids[i, width - len(ids) :] = torch.tensor(ids)
            attention_mask[i, width - len(ids) :] = 1
            labels[i, width - len(ids) :] = torch.tensor(lab)
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        inputs.update(self.image_batch(images, input_ids))
        return PromptBatch(inputs, labels if targets is not None else None, list(images))

    def append_completion(
        self, batch: PromptBatch, completion_ids_BT: torch.Tensor, completion_mask_BT: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Model inputs for a teacher-forced pass over prompt + completion (pads after EOS masked out)."""
        inputs = dict(batch.inputs)
        inputs["input_ids"] = torch.cat([batch.inputs["input_ids"], completion_ids_BT], dim=1)
        inputs["attention_mask"] = torch.cat(
            [batch.inputs["attention_mask"], completion_mask_BT.to(batch.inputs["attention_mask"].dtype)], dim=1
        )
        for key in self.per_token_keys:
            if key in inputs:
                inputs[key] = torch.cat([inputs[key], torch.zeros_like(completion_ids_BT, dtype=inputs[key].dtype)], 1)
        return inputs


def find_submodule(model: torch.nn.Module, name: str) -> torch.nn.Module:
    """The submodule named ``name`` in the bare model, also when wrapped (PEFT prefixes ``base_model.model.``)."""
    for full_name, module in model.named_modules():
        if full_name == name or full_name.endswith("." + name):
            return module
    raise ValueError(f"{type(model).__name__} has no submodule named {name!r}")


def load_chat_tokenizer(path: str):
    """The checkpoint's tokenizer (left padding) with its chat template, also where the template lives only in
    the processor's legacy ``chat_template.json`` (Qwen2/2.5-VL, some Qwen3-VL and LLaVA releases)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    legacy = os.path.join(path, "chat_template.json")
    if not tokenizer.chat_template and os.path.isfile(legacy):
        with open(legacy) as f:
            tokenizer.chat_template = json.load(f).get("chat_template")
    return tokenizer
