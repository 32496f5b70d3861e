"""Step time of this trainer against a replay of the reference release's passes, same model and batch.

    python scripts/bench_step.py                              # toy Qwen2.5-VL proportions, CPU
    python scripts/bench_step.py --config toy-qwen-vl-chat    # vision ~ half of a prompt forward (Qwen-VL-Chat)
    python scripts/bench_step.py --config qwen2.5-vl-7b --device cuda   # real size, one GPU (bf16 on CUDA)

A *unit* is what one batch costs in a phase: the describer's rollout and its two PPO optimizer steps, or
one locator step. Arm A runs ``SCTuneTrainer.training_step`` (vision cache as ``--vision_cache``); arm B
replays the reference's pass structure with the same generation helpers, model, optimizer and batch:

- describer: 4 generate calls (sampled caption by the policy, its box by the frozen copy, the copy's greedy
  caption and its box), 4 no-grad log-prob passes over full logits with all-ones attention masks (caption
  and box under policy and copy), 2 forward/backward passes over full logits, images preprocessed for
  every pass, the snapshot a full model copy;
- locator: 2 generate calls (the copy's greedy caption, the policy's box), the same 4 log-prob passes,
  1 forward/backward.

After ``--warmup`` units of each arm, ``--pairs`` A/B pairs run interleaved (the order alternates, so drift
in machine load hits both arms alike). Printed per phase: the median of the per-pair ratios A/B with its
IQR, each arm's median seconds, and a per-stage breakdown; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_configs import CONFIGS, prepare  # noqa: E402  (scripts/, the script's own folder)
from sc_tune.arguments import SCTuneConfig  # noqa: E402
from sc_tune.modeling import freeze_vision_tower  # noqa: E402
from sc_tune.ppo import ppo_clip_loss  # noqa: E402
from sc_tune.rollout import GenerationSettings, describe, locate  # noqa: E402
from sc_tune.timing import StageClock  # noqa: E402
from sc_tune.trainer import SCTuneTrainer  # noqa: E402


def synthetic_batch(batch: int, size: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(batch):
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        x1, y1 = rng.uniform(0.05, 0.5, 2)
        w, h = rng.uniform(0.1, 0.4, 2)
        samples.append({"index": i, "image": Image.fromarray(pixels), "bbox": [x1, y1, x1 + w, y1 + h]})
    return samples


def collate(samples):
    return {
        "index": [s["index"] for s in samples],
        "images": [s["image"] for s in samples],
        "boxes": torch.tensor([s["bbox"] for s in samples], dtype=torch.float32),
    }


class ThisTrainer:
    """Arm A: the real ``training_step``, driven step by step (cycle: 2 describer steps, then 1 locator step)."""

    def __init__(self, model, adapter, samples, args):
        self.trainer = SCTuneTrainer(model=model, args=args, adapter=adapter, train_dataset=samples)
        self.trainer.create_optimizer()
        self.trainer.current_gradient_accumulation_steps = 1
        self.cycle = 0

    def _step(self, step, inputs, phase: str, ppo_epoch: int = 0):
        # A unit must time the phase it is named after: the trainer picks the phase from the step number.
        position = self.trainer.schedule.at(step)
        if (position.phase.value, position.ppo_epoch) != (phase, ppo_epoch):
            raise RuntimeError(f"bench_step: step {step} is a {position.phase.value} step (PPO epoch "
                               f"{position.ppo_epoch}), not the {phase} step (epoch {ppo_epoch}) the unit times")
        self.trainer.state.global_step = step
        self.trainer.training_step(self.trainer.model, inputs)
        self.trainer.optimizer.step()
        self.trainer.optimizer.zero_grad()

    def describer(self, inputs):
        base = 3 * self.cycle
        self.cycle += 1
        self._step(base, inputs, "describer", ppo_epoch=0)  # the rollout and its first PPO epoch
        self._step(base + 1, inputs, "describer", ppo_epoch=1)
        return self._stages()

    def locator(self, inputs):
        base = 3 * self.cycle
        self.cycle += 1
        self._step(base + 2, inputs, "locator")
        return self._stages()

    def _stages(self):
        """The unit's ``timing/*`` seconds; the other metrics it logged stay in ``self.logged``."""
        metrics = self.trainer._metrics
        stages = {k[len("timing/") :]: sum(v) for k, v in metrics.items() if k.startswith("timing/")}
        self.logged = {k: list(v) for k, v in metrics.items() if not k.startswith("timing/")}
        metrics.clear()
        return stages


class ReferenceReplay:
    """Arm B: the reference release's passes (see the module docstring), on the same model and optimizer."""

    def __init__(self, model, adapter, optimizer, args: SCTuneConfig):
        self.model, self.adapter, self.optimizer = model, adapter, optimizer
        self.snapshot = copy.deepcopy(model).eval().requires_grad_(False)  # a full model copy
        self.clock = StageClock()
        self.sample = GenerationSettings(
            args.describer_max_new_tokens, args.describer_min_new_tokens, True,
            args.describer_top_k, args.describer_top_p, args.describer_temperature,
        )
        self.greedy_caption = GenerationSettings(args.describer_max_new_tokens, args.describer_min_new_tokens)
        self.greedy_box = GenerationSettings(args.locator_max_new_tokens, args.locator_min_new_tokens)

    def _images(self, inputs):  # the reference preprocesses the images for every pass
        return [self.adapter.prepare_image(image) for image in inputs["images"]]

    def _full_logprobs(self, model, prompts_fn, texts, inputs):
        images = self._images(inputs)
        batch = self.adapter.build_batch(
            [prompts_fn(i, im) for i, im in enumerate(images)], images, [t + self.adapter.end_text for t in texts]
        )
        model_inputs = dict(batch.inputs)
        model_inputs["attention_mask"] = torch.ones_like(model_inputs["attention_mask"])  # all-ones mask
        device = next(model.parameters()).device
        model_inputs = {k: v.to(device) for k, v in model_inputs.items()}
        logits = model(**model_inputs, use_cache=False).logits[:, :-1].float()  # full logits
        logp = torch.log_softmax(logits, -1).gather(-1, model_inputs["input_ids"][:, 1:, None])[..., 0]
        mask = (batch.labels[:, 1:] != -100).to(device)
        return logp, mask

    def _four_logprob_passes(self, inputs, boxes, captions, box_texts):
        describer = lambda i, im: self.adapter.describer_prompt(boxes[i], im)  # noqa: E731
        locator = lambda i, im: self.adapter.locator_prompt(captions[i], im)  # noqa: E731
        with torch.no_grad(), self.clock.stage("logprob_passes"):
            for model in (self.model, self.snapshot):
                self._full_logprobs(model, describer, captions, inputs)
                self._full_logprobs(model, locator, box_texts, inputs)

    def _sync(self):
        with torch.no_grad():
            for mine, policy in zip(self.snapshot.parameters(), self.model.parameters()):
                mine.copy_(policy)

    def describer(self, inputs):
        boxes = inputs["boxes"].tolist()
        self._sync()
        self.model.eval()
        with self.clock.stage("policy_sampling"):
            _, sampled = describe(self.model, self.adapter, self._images(inputs), boxes, self.sample)
        with self.clock.stage("locating"):
            _, box_texts = locate(self.snapshot, self.adapter, self._images(inputs), sampled.texts, self.greedy_box)
        with self.clock.stage("snapshot_generation"):
            _, greedy = describe(self.snapshot, self.adapter, self._images(inputs), boxes, self.greedy_caption)
        with self.clock.stage("locating"):
            locate(self.snapshot, self.adapter, self._images(inputs), greedy.texts, self.greedy_box)
        self._four_logprob_passes(inputs, boxes, sampled.texts, box_texts)
        self.model.train()
        old_logp = None
        for _ in range(2):  # PPO epochs
            with self.clock.stage("forward"):
                describer = lambda i, im: self.adapter.describer_prompt(boxes[i], im)  # noqa: E731
                logp, mask = self._full_logprobs(self.model, describer, sampled.texts, inputs)
                old_logp = logp.detach() if old_logp is None else old_logp
                loss = ppo_clip_loss(logp, old_logp, torch.ones_like(logp), mask.float(), 0.2)[0]
            self._backward_and_step(loss)
        return _pop_stages(self.clock)

    def locator(self, inputs):
        boxes = inputs["boxes"].tolist()
        self._sync()
        self.model.eval()
        with self.clock.stage("snapshot_generation"):
            _, captions = describe(self.snapshot, self.adapter, self._images(inputs), boxes, self.greedy_caption)
        with self.clock.stage("locating"):
            _, box_texts = locate(self.model, self.adapter, self._images(inputs), captions.texts, self.greedy_box)
        self._four_logprob_passes(inputs, boxes, captions.texts, box_texts)
        self.model.train()
        with self.clock.stage("forward"):
            images = self._images(inputs)
            targets = [self.adapter.locator_target(b, im, c) for b, im, c in zip(boxes, images, captions.texts)]
            batch = self.adapter.build_batch(
                [self.adapter.locator_prompt(c, im) for c, im in zip(captions.texts, images)], images, targets
            )
            device = next(self.model.parameters()).device
            model_inputs = {k: v.to(device) for k, v in batch.inputs.items()}
            model_inputs["attention_mask"] = torch.ones_like(model_inputs["attention_mask"])
            loss = self.model(**model_inputs, labels=batch.labels.to(device), use_cache=False).loss
        self._backward_and_step(loss)
        return _pop_stages(self.clock)

    def _backward_and_step(self, loss):
        with self.clock.stage("backward"):
            loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()


def _pop_stages(clock: StageClock) -> dict[str, float]:
    """The replay's stage seconds, without the ``timing/`` log prefix."""
    return {k[len("timing/") :]: v for k, v in clock.pop().items()}


@torch.no_grad()
def vision_share(model, adapter, inputs, repeats: int = 3) -> float:
    """Seconds in the vision tower over seconds of a whole no-grad prompt forward (describer batch, median)."""
    trunk = adapter.vision_trunk(model)
    if trunk is None:
        return float("nan")
    images = [adapter.prepare_image(image) for image in inputs["images"]]
    prompts = [adapter.describer_prompt(b, im) for b, im in zip(inputs["boxes"].tolist(), images)]
    batch = adapter.build_batch(prompts, images)
    device = next(model.parameters()).device
    model_inputs = {k: v.to(device) for k, v in batch.inputs.items()}
    spent = []
    pre = trunk.tower.register_forward_pre_hook(lambda *a: spent.append(-time.perf_counter()))
    post = trunk.tower.register_forward_hook(lambda *a: spent.append(time.perf_counter()))
    shares = []
    try:
        for _ in range(repeats):
            spent.clear()
            start = time.perf_counter()
            model(**model_inputs, use_cache=False)
            shares.append(sum(spent) / (time.perf_counter() - start))
    finally:
        pre.remove()
        post.remove()
    return statistics.median(shares)


def timed(fn, inputs, device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    stages = fn(inputs)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start, stages


def quartiles(values):
    q = np.percentile(values, [25, 50, 75])
    return float(q[1]), float(q[0]), float(q[2])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="toy-qwen2.5-vl", choices=sorted(CONFIGS))
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch", type=int, default=None, help="override the configuration's batch size")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                        help="auto: bfloat16 on CUDA (a 7 B model with AdamW and two full copies fits one 139 GB card "
                        "only so), float32 on CPU")
    parser.add_argument("--vision_cache", default="True", choices=["True", "False"])
    parser.add_argument("--phases", default="describer,locator")
    opts = parser.parse_args(argv)

    bench = CONFIGS[opts.config]
    batch = opts.batch or bench.batch
    if opts.dtype == "auto":
        opts.dtype = "bfloat16" if opts.device.startswith("cuda") else "float32"
    dtype = getattr(torch, opts.dtype)
    workdir = tempfile.mkdtemp(prefix="bench_step_")
    model, adapter = prepare(opts.config, workdir, device=opts.device, dtype=dtype)
    freeze_vision_tower(model, adapter)
    samples = synthetic_batch(batch, bench.image_size)
    inputs = collate(samples)
    args = SCTuneConfig(
        output_dir=workdir,
        per_device_train_batch_size=batch,
        describer_update_steps=1,
        locator_update_steps=1,
        ppo_epochs=2,
        use_cpu=opts.device == "cpu",
        bf16=opts.dtype == "bfloat16",
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        vision_cache=opts.vision_cache == "True",
        policy_kl_stop=float("inf"),  # never skip the second epoch: both arms do the same work
        ratio_threshold=float("inf"),
        skip_preflight=True,  # random weights never write a box that parses; the preflight would stop the run
    )
    ours = ThisTrainer(model, adapter, samples, args)
    reference = ReferenceReplay(ours.trainer.model, adapter, ours.trainer.optimizer, args)
    first_image = adapter.prepare_image(samples[0]["image"])
    prompt_len = len(adapter.encode_prompt(adapter.describer_prompt(samples[0]["bbox"], first_image), first_image))
    params = sum(p.numel() for p in model.parameters())
    share = vision_share(model, adapter, inputs)
    load = os.getloadavg()
    print(
        f"config {opts.config}: {params / 1e6:.1f} M parameters, batch {batch}, describer prompt {prompt_len} tokens, "
        f"vision tower {100 * share:.0f} % of a prompt forward, "
        f"vision cache {'on' if ours.trainer.cycle.vision_cache is not None else 'off'}, {opts.device} {opts.dtype}, "
        f"torch threads {torch.get_num_threads()}, load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}",
        flush=True,
    )

    result = {"config": opts.config, "pairs": opts.pairs, "batch": batch, "vision_share": round(share, 3)}
    for phase in opts.phases.split(","):
        arm_a, arm_b = getattr(ours, phase), getattr(reference, phase)
        for _ in range(opts.warmup):
            timed(arm_a, inputs, opts.device)
            timed(arm_b, inputs, opts.device)
        ratios, secs_a, secs_b, stages_a, stages_b = [], [], [], [], []
        for pair in range(opts.pairs):
            order = (("a", arm_a), ("b", arm_b)) if pair % 2 == 0 else (("b", arm_b), ("a", arm_a))
            got = {name: timed(fn, inputs, opts.device) for name, fn in order}
            secs_a.append(got["a"][0])
            secs_b.append(got["b"][0])
            stages_a.append(got["a"][1])
            stages_b.append(got["b"][1])
            ratios.append(got["a"][0] / got["b"][0])
            print(f"  {phase} pair {pair}: this {got['a'][0]:.2f} s, reference {got['b'][0]:.2f} s", flush=True)
        median, q1, q3 = quartiles(ratios)
        print(
            f"{phase}: ratio (this / reference) median {median:.3f} (IQR {q1:.3f}-{q3:.3f}, min {min(ratios):.3f}, "
            f"max {max(ratios):.3f}); this {statistics.median(secs_a):.2f} s, reference "
            f"{statistics.median(secs_b):.2f} s per {batch} samples"
        )
        for label, per_pair, total in (("this", stages_a, secs_a), ("reference", stages_b, secs_b)):
            names = sorted({k for s in per_pair for k in s})
            share = {n: statistics.median(s.get(n, 0.0) for s in per_pair) for n in names}
            text = ", ".join(f"{n} {v:.2f} s ({100 * v / statistics.median(total):.0f} %)" for n, v in share.items())
            print(f"  {label} stages (median s per unit): {text}")
            result[f"{phase}_stages_{label}"] = {n: round(v, 4) for n, v in share.items()}
        result[f"{phase}_ratio"] = round(median, 4)
        result[f"{phase}_ratio_iqr"] = [round(q1, 4), round(q3, 4)]
        result[f"{phase}_seconds"] = {
            "this": round(statistics.median(secs_a), 3),
            "reference": round(statistics.median(secs_b), 3),
        }
    result["load_average"] = [round(x, 2) for x in os.getloadavg()]
    # arm A's rollout decoding (the reference replays transformers')
    result["decoding"] = repr(ours.trainer.cycle.decoding)
    if opts.device.startswith("cuda"):
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
