"""Model sizes for the step benchmark (``scripts/bench_step.py``) and the GPU check (``scripts/gpu_check.py``).

Each configuration is a real architecture with random weights and the tiny tokenizer of ``sc_tune.tiny``
(vocabulary size only moves the output layer, set to the real one for the real sizes):

- ``toy-qwen2.5-vl`` (CPU): Qwen2.5-VL proportions scaled down, LM 512 x 4 layers, ViT 192 x 4 blocks,
  448 px -> 1,024 patches -> 256 visual tokens;
- ``toy-qwen-vl-chat`` (CPU): Qwen-VL, LM 512 x 4, ViT 192 x 5 blocks, 448 px -> 1,024 patches resampled to
  256 queries: the ViT is about half of a prompt forward, as ViT-bigG is for Qwen-VL-Chat;
- ``mini-qwen2.5-vl``, ``mini-qwen-vl-chat`` (CPU, ``gpu_check.py --dry_run``): the same architectures at the
  smallest size that still takes every path the toy sizes take (LoRA, grouped-query attention, a windowed and a
  full-attention ViT block, the resampler), 224 px -> 64 visual tokens, LM 256 x 2 layers: the dry run checks the
  script's keys and paths, not its timings;
- ``qwen2.5-vl-7b``, ``qwen-vl-chat`` (GPU): the published sizes of Qwen2.5-VL-7B-Instruct and Qwen-VL-Chat.

``prepare`` writes the tokenizer, image processor and config to a folder (no weights), loads the family's
adapter from it and instantiates the model directly on the device, so real sizes never touch the disk.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BenchConfig:
    model_type: str
    batch: int
    image_size: int
    sizes: dict  # TinySizes fields (transformers families) or sc_tune.tiny.qwen_vl.tiny_config arguments
    tweak: Callable | None = None  # config -> None, for what the tiny builders do not expose
    gpu: bool = False


def _toy_qwen25(config) -> None:
    config.vision_config.depth = 4
    config.vision_config.num_heads = 4
    config.vision_config.fullatt_block_indexes = [1, 3]
    config.text_config.intermediate_size = 4 * config.text_config.hidden_size
    config.text_config.rope_parameters["mrope_section"] = [8, 12, 12]  # head_dim 64: sections sum to 32


def _mini_qwen25(config) -> None:
    config.vision_config.depth = 2
    config.vision_config.num_heads = 4
    config.vision_config.fullatt_block_indexes = [1]  # block 0 windowed (2 x 2 windows at 224 px), block 1 full
    config.text_config.intermediate_size = 4 * config.text_config.hidden_size
    config.text_config.rope_parameters["mrope_section"] = [8, 12, 12]  # head_dim 64: sections sum to 32


def _real_qwen25_7b(config) -> None:
    """The released config.json's values (tests/test_bench_scripts.py compares them when the file is at hand); the
    ones that set no weight's shape (norm epsilon, RoPE base, positions) too, so a real-size run computes as the
    release does."""
    text, vision = config.text_config, config.vision_config
    text.intermediate_size, text.vocab_size, text.max_position_embeddings = 18944, 152064, 128000
    text.rms_norm_eps, text.max_window_layers = 1e-6, 28
    text.rope_parameters["rope_theta"] = 1e6
    text.rope_parameters["mrope_section"] = [16, 24, 24]
    vision.tokens_per_second = 2
    vision.depth, vision.num_heads, vision.intermediate_size = 32, 16, 3420
    vision.fullatt_block_indexes = [7, 15, 23, 31]
    vision.out_hidden_size = text.hidden_size


CONFIGS = {
    "toy-qwen2.5-vl": BenchConfig(
        "qwen2_5_vl", 8, 448, dict(hidden=512, layers=4, vision_width=192, text_heads=8, text_kv_heads=2), _toy_qwen25
    ),
    "toy-qwen-vl-chat": BenchConfig(
        "qwen", 8, 448, dict(hidden=512, layers=4, heads=4, vision_width=192, vision_layers=5, n_queries=256)
    ),
    "mini-qwen2.5-vl": BenchConfig(
        "qwen2_5_vl", 8, 224, dict(hidden=256, layers=2, vision_width=128, text_heads=4, text_kv_heads=2), _mini_qwen25
    ),
    "mini-qwen-vl-chat": BenchConfig(
        "qwen", 8, 224, dict(hidden=256, layers=2, heads=4, vision_width=128, vision_layers=2, n_queries=64)
    ),
    "toy-qwen2.5-vl-100m": BenchConfig(  # the memory comparison's ~100 M-parameter size
        "qwen2_5_vl", 8, 448, dict(hidden=1024, layers=8, vision_width=192, text_heads=16, text_kv_heads=4), _toy_qwen25
    ),
    "qwen2.5-vl-7b": BenchConfig(
        "qwen2_5_vl",
        8,
        448,
        dict(hidden=3584, layers=28, vision_width=1280, text_heads=28, text_kv_heads=4),
        _real_qwen25_7b,
        gpu=True,
    ),
    "qwen-vl-chat": BenchConfig(
        "qwen",
        8,
        448,
        dict(
            hidden=4096, layers=32, heads=32, vision_width=1664, vision_layers=48, n_queries=256,
            intermediate_size=22016, vision_heads=16, mlp_ratio=4.9231, vocab_size=151936,
        ),
        gpu=True,
    ),
}


def prepare(name: str, directory: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """(model, adapter) of configuration ``name``: random weights, made on ``device`` in ``dtype``."""
    from sc_tune.adapters import family_for

    bench = CONFIGS[name]
    os.makedirs(directory, exist_ok=True)
    config = _write_folder(bench, directory)
    family = family_for(bench.model_type)
    adapter = family.adapter.from_pretrained(directory)
    torch.manual_seed(0)
    with torch.device(device):
        if bench.model_type == "qwen":
            model = family.model_class()(config).to(dtype)
        else:
            model = family.model_class().from_config(config, dtype=dtype)
    model.generation_config.pad_token_id = adapter.pad_token_id
    model.generation_config.eos_token_id = adapter.end_token_ids
    return model, adapter


def _write_folder(bench: BenchConfig, directory: str):
    if bench.model_type == "qwen":
        from sc_tune.models.qwen_vl.export import finalize_export
        from sc_tune.tiny.qwen_vl import save_tiny_vocab, tiny_config
        from sc_tune.models.qwen_vl.tokenization import QWenTokenizer

        sizes = dict(bench.sizes)
        vision_heads, mlp_ratio = sizes.pop("vision_heads", 2), sizes.pop("mlp_ratio", 2.0)
        vocab_path = save_tiny_vocab(directory)
        config = tiny_config(len(open(vocab_path).read().splitlines()), image_size=bench.image_size, **sizes)
        config.visual = {**config.visual, "heads": vision_heads, "mlp_ratio": mlp_ratio}
        config.save_pretrained(directory)
        tokenizer = QWenTokenizer(vocab_path, image_token_span=config.image_queries)
        finalize_export(directory, source_dir=None, tokenizer=tokenizer, quiet=True)
        return config
    from sc_tune.tiny.chat import TinySizes, build_tokenizer
    from sc_tune.tiny.configs import tiny_spec

    spec = tiny_spec(bench.model_type)
    tokenizer = build_tokenizer(spec)
    config = spec.config(tokenizer, TinySizes(**bench.sizes))
    if bench.tweak is not None:
        bench.tweak(config)
    config.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    spec.image_processor(bench.image_size).save_pretrained(directory)
    return config
