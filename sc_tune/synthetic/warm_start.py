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

from sc_tune.adapters.base import ImageInputs, ModelAdapter
from sc_tune.adapters.qwen2_vl import Qwen3VLAdapter
from sc_tune.rewards import cycle_iou
from sc_tune.rollout import GenerationSettings, describe, locate
from sc_tune.synthetic.shapes import (ShapesScene, ShapesSpec, caption_corpus, render, sample_scene,
                                      scene_stream, split_seed)
from sc_tune.tiny import build_tiny

CAPTION_TOKENS = 8  # longest caption is 4 tokens with the end token; leave room for babble
BOX_TOKENS = 32  # the JSON box is 26 tokens with the end token


@dataclass
class WarmStartConfig:
    seed: int = 0
    hidden: int = 128
    layers: int = 2
    vision_width: int = 64
    # Attention heads of the language model (sc_tune.tiny builds 2 query heads sharing 1 key/value head).
    text_heads: int = 4
    text_kv_heads: int = 2
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
        samples.append(Sample(image, adapter.locator_prompt(query, image), adapter.locator_target(obj.bbox, image)))
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


def heldout_objects(cfg: WarmStartConfig, adapter: ModelAdapter, limit: int) -> list[dict]:
    """The first ``limit`` objects of the held-out split, built in memory exactly as ``write_split`` does."""
    rng = random.Random(split_seed(cfg.seed, "heldout"))
    objects = []
    for _ in range(cfg.heldout_images):
        scene = sample_scene(rng, cfg.spec)
        image = adapter.prepare_image(render(scene, cfg.spec))
        for j, obj in enumerate(scene.objects):
            objects.append({"image": image, "bbox": obj.bbox, "caption": obj.full_caption,
                            "terse": obj.terse_caption, "ambiguous": scene.is_ambiguous(j)})
            if len(objects) >= limit:
                return objects
    return objects


@torch.no_grad()
def evaluate_roles(model, adapter: ModelAdapter, objects: list[dict], batch_size: int = 64) -> dict:
    """Locator Acc@0.5 on full captions, describer validity and greedy cycle Acc@0.5."""
    model.eval()
    greedy_caption = GenerationSettings(max_new_tokens=CAPTION_TOKENS)
    greedy_box = GenerationSettings(max_new_tokens=BOX_TOKENS)
    loc_hits = cyc_hits = cyc_amb_hits = valid = exact = terse = parse_fail = 0
    for start in range(0, len(objects), batch_size):
        chunk = objects[start : start + batch_size]
        images = [o["image"] for o in chunk]
        target = torch.tensor([o["bbox"] for o in chunk])
        boxes, _ = locate(model, adapter, images, [o["caption"] for o in chunk], greedy_box)
        loc_hits += int((cycle_iou(boxes, target).reward_N >= 0.5).sum())
        _, captions = describe(model, adapter, images, [o["bbox"] for o in chunk], greedy_caption)
        cyc_boxes, _ = locate(model, adapter, images, captions.texts, greedy_box)
        hit = cycle_iou(cyc_boxes, target).reward_N >= 0.5
        cyc_hits += int(hit.sum())
        cyc_amb_hits += int(sum(h for h, o in zip(hit.tolist(), chunk) if o["ambiguous"]))
        parse_fail += sum(b is None for b in cyc_boxes)
        for text, o in zip(captions.texts, chunk):
            exact += text == o["caption"]
            terse += text == o["terse"]
            valid += text in (o["caption"], o["terse"])
    n = len(objects)
    n_amb = max(1, sum(o["ambiguous"] for o in objects))
    model.train()
    return {"loc_acc50": loc_hits / n, "cycle_acc50": cyc_hits / n, "cycle_acc50_ambiguous": cyc_amb_hits / n_amb,
            "desc_valid": valid / n, "desc_exact": exact / n, "desc_terse": terse / n,
            "cycle_parse_fail": parse_fail / n, "objects": n}


def lr_at(step: int, cfg: WarmStartConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def save_checkpoint(directory: Path, model, tokenizer, image_processor, cfg: WarmStartConfig, metrics: dict) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    image_processor.save_pretrained(directory)
    (directory / "warm_start.json").write_text(json.dumps({"config": asdict(cfg), "metrics": metrics}, indent=2))


def build_model(cfg: WarmStartConfig):
    """``sc_tune.tiny.build_tiny("qwen3_vl", ...)`` with the sizes of ``cfg``."""
    return build_tiny("qwen3_vl", corpus=caption_corpus(), image_size=cfg.image_size, seed=cfg.seed,
                      hidden=cfg.hidden, layers=cfg.layers, vision_width=cfg.vision_width,
                      text_heads=cfg.text_heads, text_kv_heads=cfg.text_kv_heads)


def train_warm_start(cfg: WarmStartConfig, output_dir: str | Path, log=print) -> dict:
    """Train, evaluating and saving ``output_dir/step_<n>`` every ``eval_every`` steps and ``last`` at the end."""
    torch.set_num_threads(cfg.threads)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model, tokenizer, image_processor = build_model(cfg)
    adapter = Qwen3VLAdapter(tokenizer, image_processor)
    torch.manual_seed(cfg.seed)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    eval_objects = heldout_objects(cfg, adapter, cfg.eval_objects)
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
            metrics = evaluate_roles(model, adapter, eval_objects)
            metrics.update(step=done, train_minutes=round(train_seconds / 60, 2), loss=round(loss_sum / loss_count, 4),
                           lr=lr_at(step, cfg))
            loss_sum, loss_count = 0.0, 0
            history.append(metrics)
            log(json.dumps(metrics))
            save_checkpoint(output_dir / f"step_{done}", model, tokenizer, image_processor, cfg, metrics)
            (output_dir / "history.json").write_text(json.dumps(history, indent=1))
    save_checkpoint(output_dir / "last", model, tokenizer, image_processor, cfg, metrics)
    return metrics
