"""Real-size step check on one GPU: random-initialised Qwen2.5-VL-7B and Qwen-VL-Chat, bf16, LoRA, checkpointing.

    python scripts/gpu_check.py                  # on one H100: about 4 minutes (5-6 with --prompt_cache_ab)
    python scripts/gpu_check.py --dry_run        # anywhere: real sizes instantiated on the meta device, then
                                                 # the same code path at toy size on CPU (toy Qwen-VL-Chat)

For each configuration: ``--describer_units`` describer units (a rollout and its two PPO steps) and
``--locator_steps`` locator steps through ``SCTuneTrainer.training_step``, with the vision cache on and then
off (after one warm-up unit of each phase). Printed per phase and cache setting: median step time,
samples/s, generated tokens/s (tokens written by ``generate`` over the time spent in it), the per-stage
``timing/*`` seconds and whether the prompt cache engaged (greedy captions, locating); per configuration the peak
GPU memory.
``--prompt_cache_ab`` adds the describer with ``--snapshot_prompt_cache False``. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_configs import CONFIGS, prepare  # noqa: E402
from bench_step import ThisTrainer, collate, synthetic_batch  # noqa: E402

import sc_tune.rollout  # noqa: E402
from sc_tune.arguments import LoraArguments, SCTuneConfig  # noqa: E402
from sc_tune.modeling import apply_lora, freeze_vision_tower  # noqa: E402

GPU_CONFIGS = ["qwen2.5-vl-7b", "qwen-vl-chat"]
PHASES = ("describer", "locator")


class GenerationMeter:
    """Counts the tokens ``generate`` writes and the seconds spent in it (wraps ``sc_tune.rollout.generate``)."""

    def __init__(self, device: str):
        self.tokens, self.seconds, self.device = 0, 0.0, device
        original = sc_tune.rollout.generate

        def counted(*args, **kwargs):
            self._sync()
            start = time.perf_counter()
            completions = original(*args, **kwargs)
            self._sync()
            self.seconds += time.perf_counter() - start
            self.tokens += int(completions.mask_BT.sum())
            return completions

        # describe, locate and the rollout cycle (sc_tune.cycle) look it up in the module when they call it
        sc_tune.rollout.generate = counted

    def _sync(self):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()

    def pop(self) -> tuple[int, float]:
        got = (self.tokens, self.seconds)
        self.tokens, self.seconds = 0, 0.0
        return got


def check_instantiates(names):
    """Real sizes on the meta device: config, adapter, model and LoRA wrapping all build (no memory used)."""
    for name in names:
        model, adapter = prepare(name, tempfile.mkdtemp(prefix="gpu_check_"), device="meta", dtype=torch.bfloat16)
        frozen = freeze_vision_tower(model, adapter)
        model = apply_lora(model, adapter, LoraArguments(use_lora=True), gradient_checkpointing=True)
        trunk = adapter.vision_trunk(model)
        total = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(
            f"[meta] {name}: {total / 1e9:.2f} B parameters, {trainable / 1e6:.1f} M trainable (LoRA + merger), "
            f"{frozen / 1e9:.2f} B frozen vision parameters, "
            f"vision cache trunk: {'yes' if trunk is not None else 'no (fallback)'}",
            flush=True,
        )


def run_config(name, opts, device, dtype, meter):
    bench = CONFIGS[name]
    batch = opts.batch or bench.batch
    model, adapter = prepare(name, tempfile.mkdtemp(prefix="gpu_check_"), device=device, dtype=dtype)
    freeze_vision_tower(model, adapter)
    model = apply_lora(model, adapter, LoraArguments(use_lora=True), gradient_checkpointing=True)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    samples = synthetic_batch(batch, bench.image_size)
    inputs = collate(samples)
    args = SCTuneConfig(
        output_dir=tempfile.mkdtemp(prefix="gpu_check_out_"),
        per_device_train_batch_size=batch,
        describer_update_steps=1,
        locator_update_steps=1,
        ppo_epochs=2,
        use_cpu=device == "cpu",
        bf16=dtype == torch.bfloat16,
        gradient_checkpointing=True,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        describer_max_new_tokens=opts.max_new_tokens,
        policy_kl_stop=float("inf"),
        ratio_threshold=float("inf"),
    )
    ours = ThisTrainer(model, adapter, samples, args)
    cache = ours.trainer.cycle.vision_cache
    report = {"batch": batch}
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        report["gpu_memory_at_start_gib"] = round(torch.cuda.memory_allocated() / 2**30, 2)  # model + optimizer
    # (label, vision cache, snapshot prompt cache, phases): the vision cache on and off for both phases, then the
    # describer with the prompt cache off (it only changes the describer rollout, and only where the family allows).
    settings = [("cache_on", True, True, PHASES), ("cache_off", False, True, PHASES)]
    if opts.prompt_cache_ab:
        settings.append(("prompt_cache_off", True, False, PHASES[:1]))
    for label, cache_on, prompt_cache, phases in settings:
        ours.trainer.cycle.vision_cache = cache if cache_on else None
        ours.trainer.args.snapshot_prompt_cache = prompt_cache
        for phase in phases:
            units = opts.describer_units if phase == "describer" else opts.locator_steps
            run = getattr(ours, phase)
            run(inputs)  # warm-up
            meter.pop()  # the warm-up does not count
            seconds, stage_rows, engaged, prefixed = [], [], [], []
            for _ in range(units):
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                start = time.perf_counter()
                stage_rows.append(run(inputs))
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                seconds.append(time.perf_counter() - start)
                engaged += ours.logged.get("describer/prompt_cache", [])
                prefixed += ours.logged.get("describer/locating_prefix_cache", [])
            tokens, gen_seconds = meter.pop()
            steps = 2 if phase == "describer" else 1  # optimizer steps per unit
            unit = statistics.median(seconds)
            stages = {k: round(statistics.median(r.get(k, 0.0) for r in stage_rows) / steps, 3) for k in stage_rows[0]}
            key = f"{phase}_{label}"
            report[key] = {
                "step_seconds": round(unit / steps, 3),
                # whether the snapshot's greedy captions started from the prompt cache (its logged metric)
                "prompt_cache_engaged": all(v == 1.0 for v in engaged) if engaged else None,
                # whether locating started from the scoring pass's image prefix (Qwen-VL; its logged metric)
                "locating_prefix_engaged": all(v == 1.0 for v in prefixed) if prefixed else None,
                "samples_per_second": round(batch / unit, 3),
                "generated_tokens_per_second": round(tokens / gen_seconds, 1) if gen_seconds else None,
                "stages_per_step": stages,
            }
            print(f"{name} {key}: {json.dumps(report[key])}", flush=True)
    if device.startswith("cuda"):
        report["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        print(f"{name} peak GPU memory {report['peak_gpu_memory_gib']} GiB", flush=True)
    for phase in ("describer", "locator"):
        on, off = report[f"{phase}_cache_on"]["step_seconds"], report[f"{phase}_cache_off"]["step_seconds"]
        report[f"{phase}_cache_speedup"] = round(off / on, 3)
    if opts.prompt_cache_ab:
        on, off = report["describer_cache_on"]["step_seconds"], report["describer_prompt_cache_off"]["step_seconds"]
        report["describer_prompt_cache_speedup"] = round(off / on, 3)
    del ours, model, cache
    # The trainer holds reference cycles (callbacks, accelerator): without a collection the model can outlive this
    # function and count in the next configuration's peak (the second 2026-11-27 H100 run's 41 GiB did).
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return report


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", default=",".join(GPU_CONFIGS))
    parser.add_argument("--dry_run", action="store_true", help="meta-device real sizes + toy size on CPU")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--describer_units", type=int, default=2)
    parser.add_argument("--locator_steps", type=int, default=2)
    parser.add_argument("--max_new_tokens", type=int, default=30)
    parser.add_argument(
        "--prompt_cache_ab", action="store_true", help="also time the describer with --snapshot_prompt_cache False"
    )
    opts = parser.parse_args(argv)
    names = opts.configs.split(",")
    check_instantiates(names)
    if opts.dry_run:
        names, device, dtype = ["toy-qwen-vl-chat"], "cpu", torch.float32  # the paper's model
        opts.batch, opts.describer_units, opts.locator_steps, opts.max_new_tokens = 2, 1, 1, 4
    else:
        if not torch.cuda.is_available():
            raise SystemExit("gpu_check: no CUDA device (use --dry_run to check the script on CPU)")
        device, dtype = "cuda", torch.bfloat16
        print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    meter = GenerationMeter(device)
    results = {name: run_config(name, opts, device, dtype, meter) for name in names}
    print(json.dumps(results))


if __name__ == "__main__":
    main()
