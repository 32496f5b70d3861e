"""Tiny random models of the transformers-native chat VLMs, built in code in about a second.

A tiny model is a byte-level BPE tokenizer trained on a small corpus (digits split one per token, as in
the Qwen and GLM tokenizers) carrying the family's special tokens, the family's own image processor with a
small input size, and a model config of a few hundred thousand parameters. Nothing is downloaded.

What differs per ``model_type`` (special tokens, image processor, config) is a ``TinySpec`` in
``sc_tune.tiny.configs``; this module holds the shared machinery.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from sc_tune.models.qwen_vl.tokenization import PAT_STR  # Qwen's pre-tokenizer regex: digits one per token

DEFAULT_CORPUS = (
    "the red circle",
    "the green square on the left",
    "a blue triangle",
    "the yellow shape at the top right",
    "a small dog next to a large cat",
    "the man in a white shirt",
    "0123456789",
)


@dataclass(frozen=True)
class TinySizes:
    hidden: int = 64
    layers: int = 2
    vision_width: int = 32
    text_heads: int = 2
    text_kv_heads: int = 1
    # A hybrid text model's layer pattern (Qwen3.5: "linear_attention" / "full_attention" per layer); empty: the
    # family's default. A family whose layers are not configurable refuses a pattern (see build_tiny).
    text_layer_types: tuple[str, ...] = ()


@dataclass(frozen=True)
class TinySpec:
    """How to build a tiny model of one ``model_type``.

    ``special_tokens[0]`` is the pad token; every special token is a single added token, so prompts
    tokenise as the real family's do around them.
    """

    special_tokens: tuple[str, ...]
    eos_token: str
    template_text: str  # the words of the family's prompt templates: one token per word in the tiny BPE
    image_processor: Callable[[int], object]  # image_size -> the family's image processor
    config: Callable[[object, TinySizes], object]  # (tokenizer, sizes) -> the model config
    tokenizer_class: Callable[[], type] = field(default=lambda: _default_tokenizer_class())
    chat_template: str = ""  # a stand-in for the released template (sc_tune.tiny.chat_templates)
    bos_token: str | None = None  # where the released tokenizer names one (its chat template writes it)
    # The released tokenizer prepends its BOS itself (Llama / Mistral: ``add_bos_token``) and the chat template does
    # not write it (the llava-hf releases): the family's processor then adds it to the rendered prompt.
    prepends_bos: bool = False
    # Special tokens the released tokenizer config names, which the family's processor reads off the tokenizer
    # (Gemma 3's ``boi_token``, InternVL's ``start_image_token``): without them AutoProcessor cannot load the folder.
    named_tokens: tuple[tuple[str, str], ...] = ()
    # Re-draws some of the random model's weights after transformers' own init: (model, seed) -> None. For a
    # model trained from scratch (the benchmark's warm starts) where transformers' init is not the reference's.
    reinit: Callable[[object, int], None] | None = None


def _default_tokenizer_class():
    from transformers import Qwen2TokenizerFast

    return Qwen2TokenizerFast


def build_tokenizer(spec: TinySpec, corpus: Iterable[str] = DEFAULT_CORPUS, vocab_size: int = 600,
                    pad_first: bool = False):
    """A byte-level BPE trained on ``corpus`` + the prompt templates, with the family's special tokens.

    The special tokens take the first ids, the pad last among them, so that its id is not 0: released pads are far
    from 0 (Qwen2.5-VL's ``<|endoftext|>`` is 151643), and a pad written as 0, or negated, would look right at 0.
    ``pad_first``: the pad at id 0, as builds before (the committed warm starts' tokenizers)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PAT_STR), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(spec.special_tokens) if pad_first else [*spec.special_tokens[1:], spec.special_tokens[0]],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([spec.template_text, *corpus], trainer=trainer)
    if spec.prepends_bos:
        bos = (spec.bos_token, tok.token_to_id(spec.bos_token))
        tok.post_processor = processors.TemplateProcessing(single=f"{bos[0]} $A", pair=f"{bos[0]} $A {bos[0]} $B",
                                                           special_tokens=[bos])
    tokenizer = spec.tokenizer_class()(
        tokenizer_object=tok,
        eos_token=spec.eos_token,
        pad_token=spec.special_tokens[0],
        unk_token=None,
        bos_token=spec.bos_token,
        extra_special_tokens=list(spec.special_tokens[1:]),
        padding_side="left",
        **dict(spec.named_tokens),
    )
    if spec.chat_template:
        tokenizer.chat_template = spec.chat_template
    return tokenizer


def build_tiny(
    spec: TinySpec,
    corpus: Iterable[str] = DEFAULT_CORPUS,
    image_size: int = 56,
    seed: int = 0,
    reinit: bool = True,
    pad_first: bool = False,
    **sizes,
):
    """(model, tokenizer, image_processor) for a tiny random model described by ``spec``, in fp32 on CPU.

    ``reinit``: apply ``spec.reinit`` (False keeps transformers' initialisation everywhere, as builds before it).
    ``pad_first``: see :func:`build_tokenizer`."""
    from transformers import AutoModelForImageTextToText

    tokenizer = build_tokenizer(spec, corpus, pad_first=pad_first)
    image_processor = spec.image_processor(image_size)
    sizes = TinySizes(**sizes)
    config = spec.config(tokenizer, sizes)
    built = list(getattr(config.text_config, "layer_types", None) or [])
    if sizes.text_layer_types and built != list(sizes.text_layer_types):
        raise ValueError(
            f"text_layer_types {list(sizes.text_layer_types)}: this model_type builds layers {built or '(unnamed)'}; "
            "only a hybrid text model (qwen3_5, qwen3_5_moe, qwen4_exp, minicpmv4_6, minicpmv4_7) takes a layer "
            "pattern (qwen4_exp names its attention layers indexed_attention)"
        )
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    if reinit and spec.reinit is not None:
        spec.reinit(model, seed)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    return model, tokenizer, image_processor


def write_folder(directory: str, model, tokenizer, image_processor) -> str:
    """A checkpoint folder (model, tokenizer, image processor) that ``finetune.py`` and ``evaluate.py`` load."""
    os.makedirs(directory, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    image_processor.save_pretrained(directory)
    return str(directory)


def save_tiny(spec: TinySpec, directory: str, **kwargs) -> str:
    """Write a tiny checkpoint folder of ``spec``."""
    return write_folder(directory, *build_tiny(spec, **kwargs))
