"""Real-size rollouts and steps on one GPU: decoding against the weight-read floor, step times, memory.

    python scripts/gpu_check.py                    # Qwen2.5-VL-7B and Qwen-VL-Chat, random init, bf16, LoRA, batch 64
    python scripts/gpu_check.py --configs qwen2.5-vl-7b --settings fast,transformers
    python scripts/gpu_check.py --dry_run          # anywhere: real sizes on the meta device, then the same settings
                                                   # at the smallest size on CPU (mini Qwen2.5-VL, mini Qwen-VL-Chat:
                                                   # keys and paths, not timings; --configs toy-... for toy timings)

Settings, each run through ``SCTuneTrainer.training_step`` (LoRA, gradient checkpointing, vision cache on):

- ``fast``: the trainer's CUDA defaults: static decoding (``sc_tune.decoding``: static cache, each call's decode step
  captured once as a CUDA graph and replayed) and fused decoding (the policy's samples and the LoRA snapshot's
  greedy captions in one loop); on CPU the same without graphs;
- ``fast_unfused``: static decoding, the snapshot's greedy captions in their own loop from its scoring cache
  (describer only: the locator phase is the same as ``fast``);
- ``transformers``: transformers' ``generate`` (``--static_decoding false``);
- ``compiled`` (not by default): ``fast`` with the model's forward through ``torch.compile`` (inductor on CUDA,
  aot_eager on CPU) before capture: the trainer's ``--decoding_compile_backend inductor``;
- ``vision_cache_off`` and ``prompt_cache_off`` (not by default): ``fast_unfused`` without the vision cache or without
  the snapshot's prompt cache (describer).

After one warm-up unit per phase and setting (``warmup_seconds``: graph capture, any compilation), each phase runs
``--units`` timed units (2; 1 in a dry run; a describer unit is one rollout and its two PPO steps; a locator unit one
step). Per configuration, setting and phase the JSON holds:

- ``decode_ms_per_step``: decode-step wall time (after the prefill, synchronised, capture excluded) per step;
- ``weight_bytes``: what a decode step reads at least: the language model's parameters (not the vision tower, not
  the input embedding table, of which a step reads one row per token) and one LoRA adapter;
- ``weight_read_floor_ms``: ``weight_bytes`` over the card's bandwidth, measured first by a device-to-device copy
  (``copy_bandwidth_gb_s``); ``decode_floor_ratio``: ``decode_ms_per_step / weight_read_floor_ms``;
- ``generation_batch_size``: boxes per rollout; ``decode_rows``: rows per decode loop -> decode steps at that size;
  ``rows_stopped_at_box``: locator rows SC-Tune's loop ended at their complete box (a step after it), not at their
  end token or the budget (0 at random init, whose answers hold no box);
- ``new_tokens_per_s``: ``new_tokens``, the tokens ``generate`` wrote in the timed units (each row's up to its end
  token), over the seconds spent in it (prefill included);
- ``samples_per_s``: boxes per second of whole units; ``step_seconds`` and ``stages_per_step`` per optimizer step;
- ``generate_seconds_per_unit``: the generate calls' seconds split into the decode steps, the prefills (the language
  model's part: a tower that runs inside the prefill, as Qwen-VL's, is counted as vision), the vision
  tower's runs (inside the first call that needs each image) and the rest (transformers' set-up, capture, text);
  and, as parts of those, ``first_decode_steps`` (each call's first step, eager before a capture; part of the decode
  steps), ``capture`` and ``outside_decode_loop`` (generate's time outside SC-Tune's loop less the vision tower that
  transformers runs there before the loop; both part of the rest);
  SC-Tune's loop only (null for ``transformers``);
- ``peak_memory_gib`` per configuration (CUDA: ``torch.cuda.max_memory_allocated``, reset before each
  configuration; CPU: the process's peak resident set so far, earlier configurations included), named by
  ``peak_memory_kind``;
- ``warmup_units`` and ``compiles_in_timed_units``: warm-up units run until one compiles nothing new (``compiled``
  setting: a call whose cache length or adapters differ from every earlier one compiles again; at most 4), so that
  the timed units time replays, not compilation; a non-zero count means the figures include compile time.

``--profile N`` adds one unit per phase and setting of SC-Tune's decoding loop in which ``torch.profiler`` records N decode steps of the first
decode call that reaches them (from its third step on a GPU: after the eager warm-up step and the capture), and
reports under ``profile``: per step the kernels (CUDA; on CPU the top-level operators), their summed time, the time
the device was busy and the wall time in the window (the profiler adds to it), the time per kernel class
(``gemm``, ``attention``, ``elementwise``, ``reduction``, ``sort``, ``copy``, ``other``) and the 15 costliest
kernels. ``--profile_dir DIR`` also writes each window's Chrome trace there (gzipped).

The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import re
import resource
import statistics
import sys
import tempfile
import time

import torch
from torch._dynamo.utils import counters as dynamo_counters

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_configs import CONFIGS, prepare  # noqa: E402
from bench_step import ThisTrainer, collate, synthetic_batch  # noqa: E402
from device_summary import targets_met  # noqa: E402

import sc_tune.decoding  # noqa: E402
import sc_tune.rollout  # noqa: E402
from sc_tune.arguments import LoraArguments, SCTuneConfig  # noqa: E402
from sc_tune.decoding import Decoding  # noqa: E402
from sc_tune.modeling import apply_lora, freeze_vision_tower  # noqa: E402

GPU_CONFIGS = ["qwen2.5-vl-7b", "qwen-vl-chat"]
# The dry run checks the figures and the paths taken, not the timings: the smallest sizes that take every path.
DRY_RUN_CONFIGS = ["mini-qwen2.5-vl", "mini-qwen-vl-chat"]
PHASES = ("describer", "locator")
DEFAULT_SETTINGS = "fast,fast_unfused,transformers"
ALL_SETTINGS = ("fast", "fast_unfused", "transformers", "compiled", "vision_cache_off", "prompt_cache_off")


class GenerationMeter:
    """Counts the tokens ``generate`` writes and the seconds spent in it (wraps the modules' reference); for
    transformers' own loop (no ``sc_tune.decoding`` statistics) also its forwards inside ``generate``: the prefill
    ones timed, the one-token ones counted (``watch``)."""

    def __init__(self, device: str):
        self.device = device
        self.tokens, self.seconds, self.prefill_seconds, self.decode_forwards, self.by_rows = 0, 0.0, 0.0, 0, {}
        self._inside, self._began = False, None
        original = sc_tune.rollout.generate

        def counted(*args, **kwargs):
            self._sync()
            start = time.perf_counter()
            self._inside = True
            try:
                completions = original(*args, **kwargs)
            finally:
                self._inside = False
            self._sync()
            self.seconds += time.perf_counter() - start
            self.tokens += int(completions.mask_BT.sum())
            return completions

        # describe, locate and the rollout cycle (sc_tune.cycle) look it up in the module when they call it
        sc_tune.rollout.generate = counted

    def watch(self, model) -> None:
        """Hooks on the model transformers' ``generate`` calls (the bare model under PEFT)."""
        base = model.get_base_model() if hasattr(model, "get_base_model") else model

        def before(module, args, kwargs):
            ids = kwargs.get("input_ids")
            if self._inside and ids is not None and ids.shape[1] > 1:
                self._sync()
                self._began = time.perf_counter()

        def after(module, args, kwargs, output):
            ids = kwargs.get("input_ids")
            if not self._inside or ids is None:
                return
            if ids.shape[1] > 1 and self._began is not None:
                self._sync()
                self.prefill_seconds += time.perf_counter() - self._began
                self._began = None
            elif ids.shape[1] == 1:
                self.decode_forwards += 1
                self.by_rows[ids.shape[0]] = self.by_rows.get(ids.shape[0], 0) + 1

        base.register_forward_pre_hook(before, with_kwargs=True)
        base.register_forward_hook(after, with_kwargs=True)

    def _sync(self):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()

    def pop(self) -> dict:
        got = {"tokens": self.tokens, "seconds": self.seconds, "prefill_seconds": self.prefill_seconds,
               "decode_forwards": self.decode_forwards, "by_rows": dict(self.by_rows)}
        self.tokens, self.seconds, self.prefill_seconds, self.decode_forwards, self.by_rows = 0, 0.0, 0.0, 0, {}
        return got


# Kernel names -> a class, first match wins (cuBLAS/cuBLASLt, CUTLASS and inductor's Triton kernel names).
KERNEL_CLASSES = (
    ("attention", re.compile(r"fmha|flash|attention|sdpa|efficient_attention", re.I)),
    ("gemm", re.compile(r"gemm|cutlass|xmma|nvjet|matmul|cublas|_mm_|splitk|aten::(add)?b?mm\b|aten::linear", re.I)),
    ("sort", re.compile(r"sort|radix|topk", re.I)),
    ("reduction", re.compile(r"reduce|softmax|norm|cumsum|scan|argmax|triton_red|triton_per", re.I)),
    ("copy", re.compile(r"copy|memcpy|memset|index|cat|gather|scatter|fill", re.I)),
    ("elementwise", re.compile(r"elementwise|vectorized|unrolled|triton_poi|aten::", re.I)),
)


def kernel_class(name: str) -> str:
    for label, pattern in KERNEL_CLASSES:
        if pattern.search(name):
            return label
    return "other"


class DecodeProfile:
    """``torch.profiler`` around decode steps ``first`` .. ``first + count - 1`` of the first decode call that reaches
    step ``first`` (a ``sc_tune.decoding.STEP_HOOKS`` entry); ``summary()`` after the unit."""

    def __init__(self, device: str, first: int, count: int, trace_path: str | None = None):
        self.device, self.first, self.count, self.trace_path = device, first, count, trace_path
        self.profiler, self.steps, self.done, self.wall, self._began = None, 0, False, 0.0, None

    def _sync(self):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()

    def __call__(self, index):
        if self.done:
            return
        if self.profiler is None:
            if index == self.first:
                activities = [torch.profiler.ProfilerActivity.CPU]
                if self.device.startswith("cuda"):
                    activities.append(torch.profiler.ProfilerActivity.CUDA)
                self._sync()
                self.profiler = torch.profiler.profile(activities=activities)
                self.profiler.__enter__()
                self._began = time.perf_counter()
                self.steps = 1
            return
        if index is None or index == self.first + self.count:
            self._sync()
            self.wall = time.perf_counter() - self._began
            self.profiler.__exit__(None, None, None)
            self.done = True
            if self.trace_path:
                self.profiler.export_chrome_trace(self.trace_path)
        else:
            self.steps += 1

    def summary(self) -> dict | None:
        if not self.done or not self.steps:
            return None
        events = self.profiler.events()
        cuda = self.device.startswith("cuda")
        if cuda:  # the kernels the device ran (graph replays included)
            items = [(e.name, e.time_range.start, e.time_range.end) for e in events
                     if e.device_type == torch.autograd.DeviceType.CUDA]
        else:  # CPU: the top-level operators (a compiled region is one), each with its whole time
            items = [(e.name, e.time_range.start, e.time_range.end) for e in events
                     if e.device_type == torch.autograd.DeviceType.CPU and e.cpu_parent is None]
        if not items:
            return {"steps": self.steps, "error": "the profiler recorded no kernels"}
        busy, end_of_busy = 0.0, float("-inf")  # the union of the intervals: time the device was doing something
        for _, start, end in sorted(items, key=lambda item: item[1]):
            if start > end_of_busy:
                busy += end - start
            elif end > end_of_busy:
                busy += end - end_of_busy
            end_of_busy = max(end_of_busy, end)
        per_name, per_class = {}, {}
        for name, start, end in items:
            count, total = per_name.get(name, (0, 0.0))
            per_name[name] = (count + 1, total + (end - start))
            label = kernel_class(name)
            count, total = per_class.get(label, (0, 0.0))
            per_class[label] = (count + 1, total + (end - start))
        steps = self.steps
        ms = lambda us: round(us / 1000 / steps, 4)  # noqa: E731  (microseconds in the window -> ms per step)
        top = sorted(per_name.items(), key=lambda kv: -kv[1][1])[:15]
        return {
            "steps": steps,
            "what": "CUDA kernels" if cuda else "top-level CPU operators",
            "kernels_per_step": round(len(items) / steps, 1),
            "kernel_ms_per_step": ms(sum(end - start for _, start, end in items)),
            "busy_ms_per_step": ms(busy),
            "wall_ms_per_step": round(1000 * self.wall / steps, 4),
            "by_class": {label: {"ms_per_step": ms(total), "per_step": round(count / steps, 1)}
                         for label, (count, total) in sorted(per_class.items(), key=lambda kv: -kv[1][1])},
            "top": [{"name": name[:120], "per_step": round(count / steps, 1), "ms_per_step": ms(total)}
                    for name, (count, total) in top],
        }


def copy_bandwidth(device: str, megabytes: int, repeats: int = 10) -> float:
    """Bytes per second of a device-to-device copy (each byte read once and written once, both counted)."""
    size = megabytes * 2**20
    source = torch.empty(size, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    for _ in range(2):
        target.copy_(source)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        target.copy_(source)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    del source, target
    return 2 * size * repeats / seconds


def decode_weight_bytes(model, adapter) -> int:
    """Bytes of the parameters a decode step reads at least: the language model's, without the vision tower and
    without the input embedding table (a step reads one row of it per token), with one LoRA adapter (the policy's)."""
    embedding = model.get_input_embeddings().weight
    output = model.get_output_embeddings()
    tied = output is not None and output.weight is embedding
    total = 0
    for name, param in model.named_parameters():
        name = name.removeprefix("base_model.model.")
        if adapter.vision_prefix and name.startswith(adapter.vision_prefix + "."):
            continue
        if (param is embedding and not tied) or ".snapshot." in name:
            continue
        total += param.numel() * param.element_size()
    return total


def check_instantiates(names):
    """Real sizes on the meta device: config, adapter, model and LoRA wrapping all build (no memory used)."""
    for name in names:
        model, adapter = prepare(name, tempfile.mkdtemp(prefix="gpu_check_"), device="meta", dtype=torch.bfloat16)
        frozen = freeze_vision_tower(model, adapter)
        model = apply_lora(model, adapter, LoraArguments(use_lora=True), gradient_checkpointing=True)
        trunk = adapter.vision_trunk(model)
        total = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        # Under LoRA only the adapter trains: PEFT freezes everything else, the vision merger too.
        print(
            f"[meta] {name}: {total / 1e9:.2f} B parameters, {trainable / 1e6:.1f} M trainable (the LoRA adapter), "
            f"{frozen / 1e9:.2f} B frozen vision parameters, {decode_weight_bytes(model, adapter) / 1e9:.2f} GB read "
            f"per decode step, vision cache trunk: {'yes' if trunk is not None else 'no (fallback)'}, "
            f"static decoding: {adapter.static_decoding_problem(model) or 'yes'}",
            flush=True,
        )


def _apply_setting(trainer, setting, device, compile_backend):
    """Point the trainer's rollout cycle at one setting; returns the phases it times."""
    cuda = device.startswith("cuda")
    static = Decoding(static_cache=True, cuda_graphs=cuda)
    cycle = trainer.cycle
    trainer.args.snapshot_prompt_cache = setting != "prompt_cache_off"
    if setting == "transformers":
        cycle.decoding, cycle.fused_greedy = None, cycle.fused_greedy_for("false")
        return PHASES
    cycle.decoding = static if setting != "compiled" else dataclasses.replace(static, compile_backend=compile_backend)
    cycle.fused_greedy = cycle.fused_greedy_for("auto" if setting in ("fast", "compiled") else "false")
    return PHASES if setting in ("fast", "compiled") else PHASES[:1]


def run_config(name, opts, device, dtype, meter, bandwidth):
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
        skip_preflight=True,  # random weights never write a box that parses; the preflight would stop the run
        static_decoding="true",
    )
    ours = ThisTrainer(model, adapter, samples, args)
    meter.watch(model)
    vision_cache = ours.trainer.cycle.vision_cache
    vision_in_prefill = _time_vision_inside_prefills(model, ours.trainer.cycle)
    weight_bytes = decode_weight_bytes(model, adapter)
    floor_ms = 1000 * weight_bytes / bandwidth
    report = {"batch": batch, "weight_bytes": weight_bytes, "weight_read_floor_ms": round(floor_ms, 4)}
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        report["gpu_memory_at_start_gib"] = round(torch.cuda.memory_allocated() / 2**30, 2)  # model + optimizer
    compile_backend = "inductor" if device.startswith("cuda") else "aot_eager"
    for setting in opts.settings.split(","):
        phases = _apply_setting(ours.trainer, setting, device, compile_backend)
        ours.trainer.cycle.vision_cache = None if setting == "vision_cache_off" else vision_cache
        for phase in phases:
            run = getattr(ours, phase)
            start = time.perf_counter()
            # Warm-up: graph capture per call, lazy allocations, and compilation until a unit compiles nothing new
            # (a compiled call whose cache length or adapters differ from every earlier one compiles again).
            for warmup_units in range(1, 5):
                compiled_before = dynamo_counters["stats"]["unique_graphs"]
                run(inputs)
                if dynamo_counters["stats"]["unique_graphs"] == compiled_before:
                    break
            warmup = time.perf_counter() - start
            compiled_before = dynamo_counters["stats"]["unique_graphs"]
            meter.pop()
            sc_tune.decoding.STATS.pop()
            vision_in_prefill.pop()
            seconds, stage_rows, logged = [], [], []
            for _ in range(opts.units):
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                start = time.perf_counter()
                stage_rows.append(run(inputs))
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                seconds.append(time.perf_counter() - start)
                logged.append(ours.logged)
            generated = meter.pop()
            tokens, gen_seconds = generated["tokens"], generated["seconds"]
            stats = sc_tune.decoding.STATS.pop()
            vision_seconds_in_prefills = vision_in_prefill.pop()
            compiles = dynamo_counters["stats"]["unique_graphs"] - compiled_before
            profile = None
            if opts.profile and ours.trainer.cycle.decoding is not None:
                trace = (os.path.join(opts.profile_dir, f"{name}_{phase}_{setting}.json.gz") if opts.profile_dir
                         else None)
                window = DecodeProfile(device, 2 if device.startswith("cuda") else 1, opts.profile, trace)
                sc_tune.decoding.STEP_HOOKS.append(window)
                try:
                    run(inputs)
                finally:
                    if window.profiler is not None and not window.done:
                        window(None)  # a unit that stopped inside the window leaves no profiler running
                    sc_tune.decoding.STEP_HOOKS.remove(window)
                    meter.pop()
                    sc_tune.decoding.STATS.pop()
                    vision_in_prefill.pop()
                profile = window.summary() or {"error": "no decode call reached the profiled steps"}
            if ours.trainer.cycle.decoding is None:  # transformers' loop: generate time less its timed prefills
                decode_seconds = gen_seconds - generated["prefill_seconds"]
                decode_steps, by_rows = generated["decode_forwards"], generated["by_rows"]
            else:
                decode_seconds, decode_steps, by_rows = stats.decode_seconds, stats.decode_steps, stats.by_rows
            steps = 2 if phase == "describer" else 1  # optimizer steps per unit
            unit = statistics.median(seconds)
            decode_ms = 1000 * decode_seconds / decode_steps if decode_steps else None
            # Where the generate calls' time goes, per unit: the decode steps are one part; prefill and the vision
            # tower (run inside the first call that needs it, before its prefill) can be larger at this batch.
            # A family whose model runs the tower inside its forward (Qwen-VL) encodes inside the prefill; the
            # others before it: the prefill here is the language model's part either way.
            prefill_seconds = stats.prefill_seconds - vision_seconds_in_prefills
            vision_seconds = sum(r.get("vision_encoding", 0.0) for r in stage_rows)
            breakdown = {"generate": gen_seconds, "decode_steps": decode_seconds, "prefill": prefill_seconds,
                         "vision_tower": vision_seconds}
            breakdown["rest"] = gen_seconds - decode_seconds - prefill_seconds - vision_seconds
            # Parts of the above, not more terms: of the decode steps, each call's first (eager, before a capture);
            # of the rest, the captures and what generate does outside SC-Tune's loop (transformers' set-up before
            # it, the texts after it).
            # transformers 5's generate encodes the images before it hands over the loop (Qwen2/2.5/3-VL); that
            # tower time is vision, not part of the rest.
            vision_outside_loop = vision_seconds - vision_seconds_in_prefills
            breakdown.update(first_decode_steps=stats.first_step_seconds, capture=stats.capture_seconds,
                             outside_decode_loop=gen_seconds - stats.loop_seconds - vision_outside_loop)
            breakdown = {k: round(v / opts.units, 3) for k, v in breakdown.items()}
            if ours.trainer.cycle.decoding is None:
                # transformers' loop: its timed prefills hold the vision tower, and its decode steps are the rest
                breakdown = None
            key = f"{phase}_{setting}"
            report[key] = {
                "decode_ms_per_step": round(decode_ms, 3) if decode_ms else None,
                "weight_bytes": weight_bytes,
                "weight_read_floor_ms": round(floor_ms, 4),
                "decode_floor_ratio": round(decode_ms / floor_ms, 3) if decode_ms else None,
                "generation_batch_size": batch,
                "decode_rows": {str(rows): n for rows, n in sorted(by_rows.items())},
                "new_tokens": tokens,
                "new_tokens_per_s": round(tokens / gen_seconds, 1) if gen_seconds else None,
                "samples_per_s": round(batch / unit, 3),
                "step_seconds": round(unit / steps, 3),
                "warmup_seconds": round(warmup, 2),
                "warmup_units": warmup_units,
                "compiles_in_timed_units": compiles,
                "capture_seconds": round(stats.capture_seconds / opts.units, 4),
                "graph_calls": stats.graph_calls,
                "graph_failures": stats.graph_failures,
                "graph_error": stats.graph_error,
                "graph_model_part_only": stats.graph_model_part_only,
                "decode_calls": stats.calls,
                "rows_stopped_at_box": stats.rows_stopped_at_box,
                "prefill_seconds_per_unit": round(stats.prefill_seconds / opts.units, 3),
                "generate_seconds_per_unit": breakdown,
                "stages_per_step": {
                    k: round(statistics.median(r.get(k, 0.0) for r in stage_rows) / steps, 3) for k in stage_rows[0]
                },
                **_engagement(logged),
                **({"profile": profile} if profile is not None else {}),
            }
            print(f"{name} {key}: {json.dumps(report[key])}", flush=True)
    if device.startswith("cuda"):
        report["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        report["peak_memory_kind"] = "cuda max_memory_allocated"
    else:  # no per-configuration allocator figure on CPU: the process's high-water mark (Linux: ru_maxrss in KiB)
        report["peak_memory_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
        report["peak_memory_kind"] = "process peak RSS"
    print(f"{name} peak memory {report['peak_memory_gib']} GiB ({report['peak_memory_kind']})", flush=True)
    fast = report.get("describer_fast")
    if fast is not None and fast["decode_floor_ratio"] is not None:
        report["acceptance"] = {
            "new_tokens_per_s": fast["new_tokens_per_s"],
            "decode_floor_ratio": fast["decode_floor_ratio"],
            "met": targets_met(fast["new_tokens_per_s"], fast["decode_floor_ratio"], batch),
        }
    del ours, model, vision_cache
    # The trainer holds reference cycles (callbacks, accelerator): without a collection the model can outlive this
    # function and count in the next configuration's peak (the second 2026-11-27 H100 run's 41 GiB did).
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return report


class _Seconds:
    def __init__(self):
        self.seconds = 0.0

    def pop(self) -> float:
        seconds, self.seconds = self.seconds, 0.0
        return seconds


def _time_vision_inside_prefills(model, cycle) -> _Seconds:
    """The vision cache's encoding seconds spent inside SC-Tune's prefills (``model._prefill``), popped per phase."""
    inside = _Seconds()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    prefill = base._prefill

    def timed(*args, **kwargs):
        cache = cycle.vision_cache
        before = cache.encode_seconds if cache is not None else 0.0
        try:
            return prefill(*args, **kwargs)
        finally:
            if cache is not None:
                inside.seconds += cache.encode_seconds - before

    base._prefill = timed
    return inside


def _engagement(logged: list[dict]) -> dict:
    """Which shortcuts the trainer says it took (its logged metrics), over the timed units: None where not logged."""
    def every(key):
        values = [v for entry in logged for v in entry.get(key, [])]
        return all(v == 1.0 for v in values) if values else None

    return {
        "fused_decoding": every("describer/fused_decoding"),
        "prompt_cache_engaged": every("describer/prompt_cache"),
        "locating_prefix_engaged": every("describer/locating_prefix_cache"),
        "scoring_cache_engaged": every("describer/scoring_prompt_cache"),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", default=None, help=f"default: {','.join(GPU_CONFIGS)} ({','.join(DRY_RUN_CONFIGS)} "
                        "with --dry_run)")
    parser.add_argument("--dry_run", action="store_true", help="meta-device real sizes + the mini sizes on CPU")
    parser.add_argument("--settings", default=DEFAULT_SETTINGS, help=f"comma-separated, of {', '.join(ALL_SETTINGS)}")
    parser.add_argument("--batch", type=int, default=None, help="boxes per rollout and per step (default: 64; 2 dry)")
    parser.add_argument("--units", type=int, default=None, help="timed units per phase and setting (default: 2; 1 dry)")
    parser.add_argument("--max_new_tokens", type=int, default=30)
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="profile N decode steps per phase and setting in one extra unit (0: off)")
    parser.add_argument("--profile_dir", default=None, help="with --profile: write each window's Chrome trace here")
    parser.add_argument("--copy_megabytes", type=int, default=None, help="bandwidth benchmark size (GPU 2048, CPU 64)")
    opts = parser.parse_args(argv)
    unknown = set(opts.settings.split(",")) - set(ALL_SETTINGS)
    if unknown:
        parser.error(f"unknown settings {sorted(unknown)}; choose from {', '.join(ALL_SETTINGS)}")
    check_instantiates(GPU_CONFIGS if opts.configs is None else [n for n in opts.configs.split(",") if CONFIGS[n].gpu])
    if opts.dry_run:
        names, device, dtype = (opts.configs or ",".join(DRY_RUN_CONFIGS)).split(","), "cpu", torch.float32
        opts.batch, opts.units, opts.max_new_tokens = opts.batch or 2, opts.units or 1, min(opts.max_new_tokens, 4)
    else:
        if not torch.cuda.is_available():
            raise SystemExit("gpu_check: no CUDA device (use --dry_run to check the script on CPU)")
        names, device, dtype = (opts.configs or ",".join(GPU_CONFIGS)).split(","), "cuda", torch.bfloat16
        opts.batch, opts.units = opts.batch or 64, opts.units or 2
        print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    if opts.profile_dir:
        os.makedirs(opts.profile_dir, exist_ok=True)
    bandwidth = copy_bandwidth(device, opts.copy_megabytes or (2048 if device == "cuda" else 64))
    print(f"device-to-device copy: {bandwidth / 1e9:.1f} GB/s", flush=True)
    meter = GenerationMeter(device)
    results = {"copy_bandwidth_gb_s": round(bandwidth / 1e9, 1), "device": device, "torch": torch.__version__}
    for name in names:
        results[name] = run_config(name, opts, device, dtype, meter, bandwidth)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
