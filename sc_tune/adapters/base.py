"""The model-adapter interface: everything the trainer and the evaluator need to know about a family.

An adapter owns the prompt text of the two roles, the box codec, how one image becomes model inputs
(once per sample per step), how a batch is built (left padding, labels on the answer only), what to pass
to ``generate`` and how generated text is decoded. The trainer and the evaluator never name a family.

Prompts (per family, see the subclasses), rendered through the checkpoint's own chat template (``render``:
thinking switched off where the template has a switch, the default system turn where it inserts one):

- describer: image + box -> the model continues with a caption that ends in the family's end token;
- locator: image + caption -> the model continues with ``locator_target(box, image, caption)``: the family's real
  grounding answer (``locator_answer``, e.g. Qwen's fenced JSON list with the caption as label) and the end.

Each family lists the answers its own documentation shows (``answer_examples``, with their sources); the tests
and ``python -m sc_tune.families parse`` read every one of them back to its box.
"""

from __future__ import annotations

import os
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image

from sc_tune.box_codecs import BoxCodec, BoxReading, select_codec
from sc_tune.jsonio import read_json
from sc_tune.vision_cache import VisionTrunk

# Special tokens no generated text may carry, found by name in the family's own tokenizer so that the full
# tokenizer of a real checkpoint is covered, not only the tokens a prompt uses. Media tokens (image/video
# placeholders and their frames) are never generated; a sampled placeholder breaks the rope-index step of
# the Qwen3.5-style models. Box/reference tokens are kept out of captions only: locator answers use them.
MEDIA_TOKEN_RE = re.compile(r"image|video|vision|img", re.IGNORECASE)
BOX_TOKEN_RE = re.compile(r"box|ref|quad", re.IGNORECASE)


# The attention and MLP projections of a transformers decoder layer: LoRA's default targets in the language model.
LM_PROJECTIONS = "q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj"


def language_model_lora_targets(language_model_prefix: str, *more_projections: str) -> str:
    """PEFT ``target_modules`` regex: the attention and MLP projections of the language model only (and
    ``more_projections``, alternatives such as ``"in_proj_qkv|out_proj"``, for text models with other layer kinds)."""
    names = "|".join((LM_PROJECTIONS, *more_projections))
    return rf"{re.escape(language_model_prefix)}\..*\.({names})"


# Decoder layer kinds a static decode step knows (sc_tune.decoding): attention over the cache, recurrent state
# (Qwen3.5's Gated DeltaNet), and windows as long as they cover the call (checked per call).
STATIC_DECODING_LAYERS = {"full_attention", "linear_attention", "sliding_attention", "chunked_attention"}


@dataclass(frozen=True)
class DocumentedAnswer:
    """A grounding answer as a family's own documentation (README, cookbook, model card, maintainer) shows the
    released model writing it, and the box it must read as (``None``: it cannot be read unambiguously)."""

    text: str
    box: tuple[float, float, float, float] | None
    source: str
    frame: tuple[int, int] = (1000, 1000)  # (width, height) of the model input the answer refers to (pixel codecs)


class ThinkingCheckpointError(ValueError):
    """A reasoning-only checkpoint: its answers open with a reasoning block that SC-Tune's budgets cannot hold."""


class ModelFolderError(ValueError):
    """A checkpoint folder lacks a file its family's tokenizer needs, or holds one that cannot be its vocabulary; the
    message names the folder and the file. ``sc_tune.modeling`` turns it into a ``CheckpointError``."""


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


# The registered families whose adapter sets a pixel budget (``registry.register`` adds them), which the refusal in
# ``ModelAdapter.limit_image_pixels`` names: a list written out by hand fell behind the registry.
PIXEL_BUDGET_FAMILIES: list[str] = []


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
    # Whether the family's released checkpoints document grounding (writing a box for a phrase). Without it the
    # locator must first be taught boxes (a grounding warm start): until then every cycle reward is 0.
    grounding_prior: bool = True
    # Whether the family's image processor is read from the checkpoint folder (preprocessor_config.json, or a
    # processor_config.json with an image_processor block); Qwen-VL builds its own from config.json.
    reads_image_processor_files: bool = True
    # The grounding answers the family's own documentation shows, with their sources (see DocumentedAnswer).
    answer_examples: tuple[DocumentedAnswer, ...] = ()

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

    def resumed_positions(self, model: torch.nn.Module, input_ids_BW: torch.Tensor, attention_mask_BW: torch.Tensor,
                          images: Sequence[ImageInputs], tail_offsets_B: torch.Tensor | None = None
                          ) -> dict[str, torch.Tensor]:
        """The position inputs, over all ``W`` columns, of a batch whose first columns come from a key/value cache
        that another pass left (``sc_tune.prompt_cache``): each row at the positions of its own unpadded prompt.

        ``tail_offsets_B``: a batch laid out as moved prefix, padding, tail (``moves_cached_prompt_columns``): what to
        add to a tail column's index to get its position (minus the padding gap). ``None``: the cache's pass had this
        batch's own layout (``resumes_from_scoring_cache``). Default: ``{}``, the model counts positions on from the
        cache's length, as it would in the pass that left it."""
        if tail_offsets_B is not None:
            raise NotImplementedError(f"{type(self).__name__} does not move cached prompt columns")
        return {}

    def scoring_positions(self, model: torch.nn.Module, input_ids_BW: torch.Tensor, attention_mask_BW: torch.Tensor
                          ) -> dict[str, torch.Tensor]:
        """The position inputs of a teacher-forced pass over a left-padded batch of sampled rows (the snapshot's
        scoring pass and the policy's update read the describer's rows with them): the positions ``generate`` gave
        the same rows, so that the log-probs are the sampling's and the cached keys later passes resume from carry
        them. Default: ``{}``, the forward's own positions (Qwen-VL counts columns in both; the Qwen2 families' rope
        index skips padding in both); the 1-D rotary families' forward counts padding, ``generate`` does not
        (``sc_tune.adapters.unpadded_positions``)."""
        return {}

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

    @classmethod
    @abstractmethod
    def from_pretrained(cls, path: str, box_format: str = "native") -> ModelAdapter:
        """Load the tokenizer (and image processor) saved in a checkpoint folder."""

    @classmethod
    def from_parts(cls, tokenizer, image_processor, config) -> ModelAdapter:
        """The adapter of a model built in memory (a tiny model trained from scratch), from the parts that
        ``from_pretrained`` would read from its folder."""
        raise NotImplementedError(f"{cls.__name__} is not built from in-memory parts")

    def save_pretrained(self, directory: str) -> None:
        """Write the tokenizer (and image processor) next to saved weights, so the folder reloads."""
        self.tokenizer.save_pretrained(directory)
        image_processor = getattr(self, "image_processor", None)
        if hasattr(image_processor, "save_pretrained"):  # Qwen-VL's lives in config.json's "visual" block
            image_processor.save_pretrained(directory)

    # ---------------------------------------------------------------- prompts and targets (text)
    # Whether render() gives a system message's content as a string (Gemma 4's released template writes it as it
    # stands, `messages[0]['content'] | trim`) rather than a list of text parts, which every other family's takes.
    system_as_string: bool = False

    def render(self, user_text: str, system: str | None = None) -> str:
        """One user turn (the image, then ``user_text``) and the opened assistant turn, through the checkpoint's
        chat template, as the family's processor renders ``[{"type": "image"}, {"type": "text", ...}]``; with
        ``system``, a system turn of that text before it (else the template's default, if it writes one).

        ``enable_thinking=False``: templates with a reasoning switch (Qwen3.5, GLM-4.5V / 4.6V) then open the
        answer with an empty reasoning block (and GLM's append ``/nothink``); templates without one ignore it."""
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": user_text}]}]
        if system is not None:
            content = system if self.system_as_string else [{"type": "text", "text": system}]
            messages.insert(0, {"role": "system", "content": content})
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                  enable_thinking=False)

    def thinking_only_reason(self) -> str | None:
        """Why this checkpoint can only answer after reasoning, or ``None``. Default: the chat template still opens
        a reasoning block (``<think>`` with no ``</think>`` after it) when asked not to think."""
        prompt = self.render("?")
        opened = prompt.rfind("<think>")
        if opened >= 0 and "</think>" not in prompt[opened:]:
            return ("its chat template opens a reasoning block (<think>) for every answer, also with "
                    "enable_thinking=False")
        return None

    def check_not_thinking_only(self, checkpoint: str) -> None:
        """Refuse a reasoning-only checkpoint, naming it.

        Why refuse rather than budget for the reasoning: SC-Tune's rollouts decode a caption and a box per sample
        (30 and ~40 tokens); a reasoning model writes hundreds to thousands of tokens first, so every answer would
        be cut off (reward 0) or each step would cost orders of magnitude more, and the PPO update would train the
        reasoning text as if it were the caption."""
        reason = self.thinking_only_reason()
        if reason:
            raise ThinkingCheckpointError(
                f"{checkpoint} is a reasoning-only checkpoint ({reason}): its answers start with a long reasoning "
                "block that SC-Tune's caption and box budgets cannot hold. Use the family's instruct or hybrid "
                "checkpoint (thinking switched off), e.g. Qwen3-VL-*-Instruct instead of -Thinking, GLM-4.5V / "
                "GLM-4.6V(-Flash) instead of GLM-4.1V-9B-Thinking."
            )

    def plain_text(self, text: str) -> str:
        """``text`` without special-token strings. Why: a caption is plain text, but one that spells a token
        such as ``<image>`` in ordinary pieces would re-tokenise into that special token, and an extra image
        placeholder makes the batch unusable (a crash mid-run); such strings carry no caption meaning. Removed
        until none is left: one removal can join the pieces around it into another ("<im<image>age>").

        Whitespace tokens are kept: Gemma's tokenizers add newlines, tabs and their runs as tokens, and removing one
        would join the words around it ("a dog", a newline, "on grass" read "a dogon grass"); in text they tokenise
        as the whitespace they are."""
        if not hasattr(self, "_special_re"):
            tokens = sorted((t for t in self.reserved_strings() if t.strip()), key=len, reverse=True)
            self._special_re = re.compile("|".join(map(re.escape, tokens))) if tokens else None
        while self._special_re is not None and self._special_re.search(text):
            text = self._special_re.sub("", text)
        return text

    def reserved_strings(self) -> set[str]:
        """The strings ``plain_text`` keeps out of prompt text: the special tokens."""
        return set(self.special_tokens())

    @abstractmethod
    def describer_prompt(self, box_norm: Sequence[float], image: ImageInputs) -> str:
        """Text that makes the model caption the object in ``box_norm``."""

    @abstractmethod
    def locator_prompt(self, caption: str, image: ImageInputs) -> str:
        """Text that makes the model write the box of the object ``caption`` refers to."""

    # What the chat template writes between the generation prompt and any answer, where a target tokenised on its own
    # must write it itself (``chat_template.answer_opening``: SmolVLM's ``Assistant:`` + " "); default nothing.
    answer_opening: str = ""

    def answer_prefix(self, caption: str) -> str:
        """What the family's grounding answer writes before the box (InternVL and Qwen2-VL repeat the phrase as a
        reference); default nothing."""
        return ""

    def locator_answer(self, box_norm: Sequence[float], image: ImageInputs, caption: str) -> str:
        """The grounding answer the released model writes for ``caption`` (without the end token): the template's
        answer opening, the answer prefix, then the codec's answer form, labelled with the caption where the form has
        a label."""
        caption = self.plain_text(caption)
        return self.answer_opening + self.answer_prefix(caption) + self.codec.answer(box_norm, image.frame, caption)

    def locator_answer_layouts(self, box_norm: Sequence[float], image: ImageInputs, caption: str) -> list[str]:
        """``locator_answer`` and the other layouts the family's documentation shows (for the token budget)."""
        caption = self.plain_text(caption)
        prefix = self.answer_opening + self.answer_prefix(caption)
        return [prefix + layout for layout in self.codec.answer_layouts(box_norm, image.frame, caption)]

    def locator_target(self, box_norm: Sequence[float], image: ImageInputs, caption: str) -> str:
        """What the locator should write after ``locator_prompt(caption, image)``: the family's real grounding
        answer and the end token, so that a tuned model keeps answering in its released format."""
        return self.locator_answer(box_norm, image, caption) + self.end_text

    def describer_target(self, caption: str) -> str:
        """What the describer should write after ``describer_prompt`` for a known caption (warm starts)."""
        return self.answer_opening + caption + self.end_text

    def read_locator_output(self, text: str, image: ImageInputs) -> BoxReading:
        """The normalised box in the locator's continuation, or ``None`` and why (a parse failure)."""
        return self.codec.read(text, image.frame)

    def parse_locator_output(self, text: str, image: ImageInputs) -> list[float] | None:
        """The normalised box in the locator's continuation, or ``None`` (counted as a parse failure)."""
        return self.read_locator_output(text, image).box

    def locator_answer_end(self, text: str) -> int | None:
        """Where the first complete box of a (partial) locator answer ends, or ``None``: decoding stops there."""
        return self.codec.box_end(text)

    # ---------------------------------------------------------------- images and tokens
    # Image sizes the family's processor accepts, checked for every record before training; a family whose
    # processor is stricter (or looser) overrides these or ``image_size_problem``.
    min_image_side: int = 8
    max_image_aspect_ratio: float = 200.0  # Qwen2-VL-style processors refuse longer/shorter side > 200

    def visible_region(self, width: int, height: int) -> tuple[float, float, float, float] | None:
        """The part of a ``width`` x ``height`` image the model sees, normalised ``(x1, y1, x2, y2)``, where its
        image processor cuts some away (LLaVA-1.5's center crop); ``None``: all of it (the default). Boxes stay
        normalised to the whole image either way; a run counts the training boxes mostly outside this part."""
        return None

    def image_size_problem(self, width: int, height: int) -> str | None:
        """Why an image of this size cannot go through the processor, or None."""
        if min(width, height) < self.min_image_side:
            return f"image too small ({width}x{height}, shorter side < {self.min_image_side})"
        if max(width, height) / min(width, height) > self.max_image_aspect_ratio:
            return f"image aspect ratio too extreme ({width}x{height}, > {self.max_image_aspect_ratio:g}:1)"
        return None

    # ``--image_min_pixels`` / ``--image_max_pixels`` as set (``limit_image_pixels``); None: the processor's own bounds.
    image_pixel_limits: tuple[int | None, int | None] | None = None

    def limit_image_pixels(self, min_pixels: int | None, max_pixels: int | None) -> None:
        """Bound the pixels (width x height) of every image as resized for the model, for the families whose
        processor resizes to a pixel budget (the patch-grid ones). Default: refused, naming the family."""
        from sc_tune.arguments import ArgumentError

        raise ArgumentError(
            f"--image_min_pixels/--image_max_pixels: {type(self).__name__} has no pixel budget to set (they bound the "
            f"dynamic-resolution families: {', '.join(PIXEL_BUDGET_FAMILIES)}); this family's processor sizes images "
            "its own way, set in the checkpoint's preprocessor_config.json"
        )

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

    def suppressed_token_ids(self, describer: bool) -> list[int]:
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

    def generation_kwargs(self, describer: bool) -> dict:
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


def processor_chat_template(path: str) -> str | None:
    """The processor's template, where the folder has one: its ``chat_template.json``, else the ``chat_template`` of its
    ``processor_config.json`` (where idefics2-8b-chatty's release keeps it, and transformers' processors read it)."""
    for name in ("chat_template.json", "processor_config.json"):
        legacy = os.path.join(path, name)
        if os.path.isfile(legacy):
            template = read_json(legacy).get("chat_template")  # a malformed file is named
            if template:
                return template
    return None


TOKENIZER_FILE = "tokenizer.json"  # the fast tokenizer's one file: vocabulary, merges and added tokens


def _tokenizer_files_missing(path: str, tokenizer) -> list[str]:
    """The vocabulary files ``path`` lacks for ``tokenizer``'s class: none with ``tokenizer.json``; without it, the
    slow tokenizer's own files (``vocab.json`` and ``merges.txt`` for Qwen's BPE, ``tokenizer.model`` for a
    SentencePiece one), every one of them."""
    if os.path.isfile(os.path.join(path, TOKENIZER_FILE)):
        return []
    slow = [name for key, name in type(tokenizer).vocab_files_names.items() if name != TOKENIZER_FILE]
    missing = [name for name in slow if not os.path.isfile(os.path.join(path, name))]
    return [TOKENIZER_FILE, *missing] if missing or not slow else []


def load_chat_tokenizer(path: str):
    """The checkpoint's tokenizer, left-padded, with the chat template the family's processor renders with: the
    processor's ``chat_template.json`` where the folder has one, else ``chat_template.jinja`` or the tokenizer
    config's (the tokenizer's own order). A folder without the vocabulary files
    (``tokenizer.json``, or the slow tokenizer's), whose tokenizer holds its added special tokens and no vocabulary,
    or with no chat template is a :class:`ModelFolderError` naming it and the file."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left", local_files_only=True)
    except (OSError, ValueError) as error:  # a truncated or malformed tokenizer file (JSONDecodeError is a ValueError)
        lacking = "" if os.path.isfile(os.path.join(path, TOKENIZER_FILE)) else f" (it has no {TOKENIZER_FILE})"
        raise ModelFolderError(f"{path}: the tokenizer files cannot be read{lacking}: "
                               + " ".join(str(error).split())) from error  # one line: transformers' spans several
    missing = _tokenizer_files_missing(path, tokenizer)
    if missing:
        slow = f" (or the slow tokenizer's {' and '.join(missing[1:])})" if missing[1:] else ""
        raise ModelFolderError(
            f"{path} has no {missing[0]}{slow}: without its vocabulary the tokenizer loads with {len(tokenizer)} "
            "token(s), its added special tokens alone, and every prompt and answer would encode to almost nothing; "
            "copy the checkpoint's tokenizer files into the folder"
        )
    # A vocabulary file lost or saved back empty still loads: the added special tokens alone (12 for Qwen), and every
    # prompt would encode to a few ids (loss 0, empty captions). Checked on the vocabulary itself, not on its size
    # against config.json's vocab_size: embeddings are padded above the tokenizer by design (Qwen2.5-VL: 151,665
    # tokens for 152,064 rows; the benchmarks' real-size configurations on a toy tokenizer, far more).
    if len(tokenizer) == len(tokenizer.get_added_vocab()):
        source = TOKENIZER_FILE if os.path.isfile(os.path.join(path, TOKENIZER_FILE)) else "the slow tokenizer's files"
        raise ModelFolderError(
            f"{path}: the tokenizer read from {source} holds only its {len(tokenizer)} added special token(s), no "
            "vocabulary: every prompt and answer would encode to almost nothing; copy the checkpoint's own tokenizer "
            "files into the folder again"
        )
    # The family's chat demo renders through its processor, which takes chat_template.json over the tokenizer's
    # template; where a release's two differ, training on the tokenizer's would tune prompts the demo never shows.
    tokenizer.chat_template = processor_chat_template(path) or tokenizer.chat_template
    if not tokenizer.chat_template:
        raise ModelFolderError(f"{path} has no chat template (chat_template.jinja, the tokenizer config's "
                               "chat_template, or chat_template.json): SC-Tune renders every prompt through the "
                               "checkpoint's own template")
    return tokenizer
