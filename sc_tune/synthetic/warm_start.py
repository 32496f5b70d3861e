"""Supervised warm start of a tiny Qwen3-VL on the shapes dataset: the starting point of the benchmark.

The model is trained from scratch with teacher forcing on a 50/50 mix of the two SC-Tune roles, built
with the model's own adapter so that the prompts are exactly those the trainer and the evaluator use:

- describer: box -> caption. The target is deliberately *terse* (``"the circle"``) with probability
  ``p_terse`` and full (``"the red circle"``) otherwise, like a real LVLM that under-specifies. Greedy
  decoding then says the terse caption, which is ambiguous for about half of the objects: the room that
  SC-Tune is meant to recover.
- locator: caption -> box. The target caption is the full one (a terse one only where it is unambiguous,
  with probability ``p_locator_terse``), so that the locator is a reliable judge of informative captions.

Everything is deterministic from ``seed`` (scene stream, caption choices, shuffling and initialisation).
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from sc_tune.adapters import adapter_class
from sc_tune.adapters.base import ImageInputs, ModelAdapter
from sc_tune.jsonio import write_json
from sc_tune.modeling import load_model_and_adapter, read_model_type
from sc_tune.synthetic.evaluate import evaluate_benchmark
from sc_tune.synthetic.shapes import (
    ShapesScene,
    ShapesSpec,
    caption_corpus,
    render,
    scene_stream,
    split_seed,
    write_split,
)
from sc_tune.tiny import build_tiny


@dataclass
class WarmStartConfig:
    seed: int = 0
    # The architecture: any model_type that sc_tune.tiny builds. The committed warm start is a tiny Qwen3-VL; the
    # same recipe runs on another family, e.g. --model_type qwen3_5 (Qwen3.5's hybrid linear-attention LM).
    model_type: str = "qwen3_vl"
    hidden: int = 128
    layers: int = 2
    vision_width: int = 64
    # Attention heads of the language model (sc_tune.tiny builds 2 query heads sharing 1 key/value head).
    text_heads: int = 4
    text_kv_heads: int = 2
    # Comma-separated text layer pattern of a hybrid text model (Gated DeltaNet layers), e.g.
    # "full_attention,linear_attention"; empty: the family's default tiny pattern.
    text_layer_types: str = ""
    # Initial decay of the Gated DeltaNet layers (hybrid text models): "reference" (the Gated DeltaNet reference's
    # dt_bias, sc_tune.tiny.configs.reference_gated_deltanet_decay) or "transformers" (its _init_weights, dt_bias = 1:
    # nearly memoryless heads; every hybrid build before 2026-11-28). Other families ignore it.
    linear_attention_init: str = "reference"
    image_size: int = 128
    grid: int = 4
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 100
    max_steps: int = 8000
    min_lr_ratio: float = 0.1  # cosine decay from lr to lr * min_lr_ratio at max_steps
    p_terse: float = 0.6
    # Fewest objects per training scene. Scenes with a single object teach "where is the object" and
    # "what is it" without the need to match a caption or a box first: a curriculum for the plateau in
    # which a from-scratch model ignores the image. The held-out split keeps ShapesSpec's 2-4 objects.
    stream_min_objects: int = 1
    p_locator_terse: float = 0.3
    eval_every: int = 500
    eval_objects: int = 300
    heldout_images: int = 400
    threads: int = 1  # faster than 2 at this size, and robust to a busy second core
    # Continue from a saved checkpoint folder (a step_<n> of an earlier build) instead of a fresh random model,
    # with this config's schedule restarting at step 0. For a build whose locator was still climbing when its
    # schedule ran out; model_type must match the folder's, and its sizes are the folder's, not these fields.
    init_from: str = ""

    @property
    def spec(self) -> ShapesSpec:
        return ShapesSpec(image_size=self.image_size, grid=self.grid)


@dataclass
class Sample:
    image: ImageInputs
    prompt: str
    target: str


def scene_samples(scene: ShapesScene, image: ImageInputs, adapter: ModelAdapter, rng: random.Random,
                  cfg: WarmStartConfig) -> list[Sample]:
    """One describer and one locator sample per object of ``scene``."""
    samples = []
    for j, obj in enumerate(scene.objects):
        caption = obj.terse_caption if rng.random() < cfg.p_terse else obj.full_caption
        samples.append(Sample(image, adapter.describer_prompt(obj.bbox, image), adapter.describer_target(caption)))
        use_terse = not scene.is_ambiguous(j) and rng.random() < cfg.p_locator_terse
        query = obj.terse_caption if use_terse else obj.full_caption
        samples.append(Sample(image, adapter.locator_prompt(query, image),
                              adapter.locator_target(obj.bbox, image, query)))
    return samples


def sample_batches(adapter: ModelAdapter, cfg: WarmStartConfig, buffer_size: int = 1024) -> Iterator[list[Sample]]:
    """Endless shuffled batches from a fresh scene stream (no image is seen twice, so no overfitting)."""
    rng = random.Random(cfg.seed)
    scenes = scene_stream(split_seed(cfg.seed, "warmstart"), replace(cfg.spec, min_objects=cfg.stream_min_objects))
    buffer: list[Sample] = []
    while True:
        while len(buffer) < buffer_size:
            scene = next(scenes)
            buffer.extend(scene_samples(scene, adapter.prepare_image(render(scene, cfg.spec)), adapter, rng, cfg))
        rng.shuffle(buffer)
        while len(buffer) >= buffer_size // 2:
            batch, buffer = buffer[: cfg.batch_size], buffer[cfg.batch_size :]
            yield batch


def evaluate_warm_start(model, adapter: ModelAdapter, data_root: Path, cfg: WarmStartConfig) -> dict:
    """The benchmark's held-out metrics (cycle and REC Acc@0.5, caption shares) on the first ``eval_objects``
    objects, through the project's evaluators (:func:`sc_tune.synthetic.evaluate.evaluate_benchmark`)."""
    metrics = evaluate_benchmark(model, adapter, data_root, limit=cfg.eval_objects)
    metrics.pop("rows")
    return metrics


def lr_at(step: int, cfg: WarmStartConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def save_checkpoint(directory: Path, model, adapter: ModelAdapter, cfg: WarmStartConfig, metrics: dict) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    adapter.save_pretrained(str(directory))
    write_json(directory / "warm_start.json", {"config": asdict(cfg), "metrics": metrics})


def build_model(cfg: WarmStartConfig):
    """``sc_tune.tiny.build_tiny(cfg.model_type, ...)`` with the sizes of ``cfg``."""
    if cfg.linear_attention_init not in ("reference", "transformers"):
        raise ValueError(f"linear_attention_init {cfg.linear_attention_init!r}: expected 'reference' or 'transformers'")
    # pad_first: the committed warm starts' tokenizers hold the pad at id 0; a rebuild by their recipes
    # (docs/benchmark.md, docs/notes/) tokenizes as they do only with it there (test_benchmark checks the vocabulary).
    return build_tiny(cfg.model_type, corpus=caption_corpus(), image_size=cfg.image_size, seed=cfg.seed,
                      reinit=cfg.linear_attention_init == "reference", pad_first=True,
                      hidden=cfg.hidden, layers=cfg.layers, vision_width=cfg.vision_width,
                      text_heads=cfg.text_heads, text_kv_heads=cfg.text_kv_heads,
                      text_layer_types=tuple(t for t in cfg.text_layer_types.split(",") if t))


def initial_model(cfg: WarmStartConfig) -> tuple[torch.nn.Module, ModelAdapter]:
    """A fresh random model of ``cfg``'s sizes, or the checkpoint ``cfg.init_from`` to continue training."""
    if not cfg.init_from:
        model, tokenizer, image_processor = build_model(cfg)
        return model, adapter_class(cfg.model_type).from_parts(tokenizer, image_processor, model.config)
    found = read_model_type(cfg.init_from)
    if found != cfg.model_type:
        raise ValueError(f"--init_from {cfg.init_from} holds a {found!r} model, but --model_type is "
                         f"{cfg.model_type!r}: pass --model_type {found}")
    return load_model_and_adapter(cfg.init_from)


def train_warm_start(cfg: WarmStartConfig, output_dir: str | Path, log=print) -> dict:
    """Train, evaluating and saving ``output_dir/step_<n>`` every ``eval_every`` steps and ``last`` at the end."""
    torch.set_num_threads(cfg.threads)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model, adapter = initial_model(cfg)
    torch.manual_seed(cfg.seed)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    # The held-out split as the benchmark writes it (same seed, same scenes), evaluated the benchmark's way.
    eval_root = output_dir / "eval_data"
    write_split(eval_root, "heldout", cfg.heldout_images, cfg.seed, cfg.spec)
    history = []
    batches = sample_batches(adapter, cfg)
    train_seconds, loss_sum, loss_count = 0.0, 0.0, 0
    metrics: dict = {}
    for step in range(cfg.max_steps):
        started = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        samples = next(batches)
        batch = adapter.build_batch([s.prompt for s in samples], [s.image for s in samples],
                                    [s.target for s in samples])
        loss = model(**batch.inputs, labels=batch.labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        train_seconds += time.perf_counter() - started
        loss_sum, loss_count = loss_sum + loss.item(), loss_count + 1
        done = step + 1
        if done % cfg.eval_every == 0 or done == cfg.max_steps:
            metrics = evaluate_warm_start(model, adapter, eval_root, cfg)
            metrics.update(step=done, train_minutes=round(train_seconds / 60, 2), loss=round(loss_sum / loss_count, 4),
                           lr=lr_at(step, cfg))
            loss_sum, loss_count = 0.0, 0
            history.append(metrics)
            log(json.dumps(metrics))
            save_checkpoint(output_dir / f"step_{done}", model, adapter, cfg, metrics)
            write_json(output_dir / "history.json", history, indent=1)
    save_checkpoint(output_dir / "last", model, adapter, cfg, metrics)
    return metrics
