"""A tiny random Qwen-VL built in code: tiktoken vocabulary, config, model, image processor, folder.

The vocabulary is a real byte-level BPE (the 256 single bytes, then merges learned greedily from a small
corpus with Qwen's pre-tokenisation regex), so the special tokens land after the last rank in the official
order, exactly as they do after the 151,643 official ranks. The config keeps every official switch (dynamic
NTK, logn, no bias) and shrinks sizes; the language model's width must stay >= 128 because the resampler
has ``output_dim // 128`` heads.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable

import regex
import torch

from sc_tune.models.qwen_vl.configuration import QWenConfig
from sc_tune.models.qwen_vl.image_processing import QWenVLImageProcessor
from sc_tune.models.qwen_vl.tokenization import PAT_STR, SPECIAL_TOKENS, VOCAB_FILE, QWenTokenizer, save_tiktoken_ranks

TINY_CORPUS = (
    "This is a red circle. This is the green square on the left.",
    "a blue triangle; the yellow shape at the top right; a small dog next to a large cat",
    "the man in a white shirt is standing (120,45),(678,999)",
    "You are a helpful assistant. user assistant Picture 1: What is this? Describe the image.",
)


def learn_bpe_ranks(corpus: Iterable[str], num_merges: int = 96) -> dict[bytes, int]:
    """Byte-level BPE: ranks 0..255 are the single bytes, then ``num_merges`` most frequent pair merges."""
    ranks = {bytes([b]): b for b in range(256)}
    words = Counter(piece.encode("utf8") for text in corpus for piece in regex.findall(PAT_STR, text))
    splits = {word: [bytes([b]) for b in word] for word in words}
    for _ in range(num_merges):
        pairs = Counter()
        for word, parts in splits.items():
            for a, b in zip(parts, parts[1:]):
                pairs[(a, b)] += words[word]
        if not pairs:
            break
        (a, b), _ = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))  # most frequent, ties by bytes
        ranks[a + b] = len(ranks)
        for word, parts in splits.items():
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and parts[i] == a and parts[i + 1] == b:
                    merged.append(a + b)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            splits[word] = merged
    return ranks


def save_tiny_vocab(directory: str, corpus: Iterable[str] = TINY_CORPUS, num_merges: int = 96) -> str:
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, VOCAB_FILE)
    save_tiktoken_ranks(learn_bpe_ranks(corpus, num_merges), path)
    return path


def tiny_config(num_ranks: int, hidden: int = 128, layers: int = 2, heads: int = 2, vision_width: int = 32,
                vision_layers: int = 2, image_size: int = 28, n_queries: int = 4, **overrides) -> QWenConfig:
    """A tiny config whose special-token ids follow a vocabulary of ``num_ranks`` BPE ranks."""
    num_specials = len(SPECIAL_TOKENS)
    image_start_id = num_ranks + SPECIAL_TOKENS.index("<img>")
    # Padded to a multiple of 64 (the official pads its 151,860 tokens to 151,936 rows, a multiple of 128)
    vocab_size = -(-(num_ranks + num_specials) // 64) * 64
    fields = dict(
        vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        kv_channels=hidden // heads, intermediate_size=4 * hidden, seq_length=2048, max_position_embeddings=8192,
        visual={"heads": 2, "image_size": image_size, "image_start_id": image_start_id, "layers": vision_layers,
                "mlp_ratio": 2.0, "output_dim": hidden, "patch_size": 14, "width": vision_width,
                "n_queries": n_queries},
        eos_token_id=num_ranks, pad_token_id=num_ranks,
    )
    fields.update(overrides)
    return QWenConfig(**fields)


def build_tiny_qwen_vl(directory: str, seed: int = 0, dtype=torch.float32, **config_kwargs):
    """(model, tokenizer, image_processor) of a tiny random Qwen-VL; the vocab file is written to ``directory``."""
    from sc_tune.models.qwen_vl.modeling import QWenLMHeadModel

    vocab_path = save_tiny_vocab(directory)
    config = tiny_config(len(open(vocab_path).read().splitlines()), **config_kwargs)
    tokenizer = QWenTokenizer(vocab_path, image_token_span=config.image_queries)
    torch.manual_seed(seed)
    model = QWenLMHeadModel(config).to(dtype)
    model.generation_config.eos_token_id = tokenizer.eod_id
    model.generation_config.pad_token_id = tokenizer.eod_id
    return model, tokenizer, QWenVLImageProcessor.from_config(config)


def save_tiny_qwen_vl(directory: str, **kwargs) -> str:
    """A tiny checkpoint folder laid out like the official one (config, weights, qwen.tiktoken, configs)."""
    from sc_tune.models.qwen_vl.export import finalize_export

    model, tokenizer, _ = build_tiny_qwen_vl(directory, **kwargs)
    model.save_pretrained(directory)
    finalize_export(directory, source_dir=None, tokenizer=tokenizer, quiet=True)
    return str(directory)
