"""Tiny random models of the real architectures, built in code in well under a second.

They make the whole pipeline testable without a model hub: a byte-level BPE tokenizer trained on a small
corpus (digits split one per token, as in the Qwen tokenizers), the family's own image processor with a
small input size, and a model config of a few hundred thousand parameters. Nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForImageTextToText, Qwen2TokenizerFast

from sc_tune.adapters.qwen2_vl import VISION_SPECIAL_TOKENS
from sc_tune.models.qwen_vl.tokenization import PAT_STR as QWEN_PRETOKENIZE_PATTERN  # Qwen2 uses the same

CHAT_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    *VISION_SPECIAL_TOKENS,
)
# The words of every prompt template in sc_tune.adapters, so that the tiny tokenizer spends one token
# per word on them (sequences stay short on CPU).
TEMPLATE_TEXT = (
    "user\nassistant\nDescribe the object in in a few words. Find . Describe the object at "
    'Locate . Output its bbox_2d in JSON. {"bbox_2d": [0, 1, 2, 3]} (0,1),(2,3) This is a the'
)
DEFAULT_CORPUS = (
    "the red circle",
    "the green square on the left",
    "a blue triangle",
    "the yellow shape at the top right",
    "a small dog next to a large cat",
    "the man in a white shirt",
    "0123456789",
)


def build_tokenizer(corpus: Iterable[str] = DEFAULT_CORPUS, vocab_size: int = 600) -> Qwen2TokenizerFast:
    """A byte-level BPE trained on ``corpus`` + the prompt templates, with the Qwen VL special tokens."""
    from tokenizers import Regex

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(CHAT_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([TEMPLATE_TEXT, *corpus], trainer=trainer)
    return Qwen2TokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        bos_token=None,
        extra_special_tokens=list(CHAT_SPECIAL_TOKENS[1:]),
        padding_side="left",
    )


def build_image_processor(family: str, image_size: int = 56):
    from transformers import Qwen2VLImageProcessorPil

    patch = 16 if family == "qwen3_vl" else 14
    pixels = image_size * image_size
    return Qwen2VLImageProcessorPil(
        size={"shortest_edge": pixels, "longest_edge": pixels},
        patch_size=patch,
        temporal_patch_size=2,
        merge_size=2,
    )


def build_config(
    family: str,
    tokenizer,
    hidden: int = 64,
    layers: int = 2,
    vision_width: int = 32,
    text_heads: int = 2,
    text_kv_heads: int = 1,
):
    ids = {
        name: tokenizer.convert_tokens_to_ids(tok)
        for name, tok in (
            ("image_token_id", "<|image_pad|>"),
            ("video_token_id", "<|video_pad|>"),
            ("vision_start_token_id", "<|vision_start|>"),
            ("vision_end_token_id", "<|vision_end|>"),
        )
    }
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=text_heads,
        num_key_value_heads=text_kv_heads,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    vision = dict(depth=2, num_heads=2, in_channels=3, spatial_merge_size=2, temporal_patch_size=2)
    if family == "qwen2_vl":
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 4, 8]}
        vision.update(embed_dim=vision_width, hidden_size=hidden, mlp_ratio=2, patch_size=14)
    elif family == "qwen2_5_vl":
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 4, 8]}
        vision.update(
            hidden_size=vision_width,
            out_hidden_size=hidden,
            intermediate_size=2 * vision_width,
            patch_size=14,
            window_size=112,
            fullatt_block_indexes=[1],
        )
    elif family == "qwen3_vl":
        text["head_dim"] = 32
        text["rope_parameters"] = {
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": [8, 4, 4],
            "mrope_interleaved": True,
        }
        vision.update(
            hidden_size=vision_width,
            out_hidden_size=hidden,
            intermediate_size=2 * vision_width,
            patch_size=16,
            num_position_embeddings=64,
            deepstack_visual_indexes=[0],
        )
    else:
        raise ValueError(f"unknown family {family!r}")
    return AutoConfig.for_model(family, text_config=text, vision_config=vision, tie_word_embeddings=False, **ids)


def build_tiny(
    family: str = "qwen2_vl",
    corpus: Iterable[str] = DEFAULT_CORPUS,
    image_size: int = 56,
    seed: int = 0,
    **config_kwargs,
):
    """(model, tokenizer, image_processor) for a tiny random model of ``family``, in fp32 on CPU."""
    tokenizer = build_tokenizer(corpus)
    image_processor = build_image_processor(family, image_size)
    config = build_config(family, tokenizer, **config_kwargs)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    return model, tokenizer, image_processor


def save_tiny(directory, family: str = "qwen2_vl", **kwargs) -> str:
    """Write a tiny checkpoint folder (model, tokenizer, image processor) that ``finetune.py`` can load."""
    model, tokenizer, image_processor = build_tiny(family, **kwargs)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    image_processor.save_pretrained(directory)
    return str(directory)
