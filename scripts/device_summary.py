"""The acceptance figures of issue 21 from a device check's outputs (``scripts/device_check.sh``), printed and written
as JSON: ``python scripts/device_summary.py OUT`` reads OUT/2_real_size.txt (``gpu_check.py``),
OUT/2b_decode_attention.txt (``bench_decode_attention.py``) and OUT/3_bench_step.txt (``bench_step.py``) and writes
OUT/acceptance.json. A figure whose stage did not print it is ``null`` (not measured)."""

import argparse
import json
import os
import re

TARGET_NEW_TOKENS_PER_S, TARGET_FLOOR_RATIO, TARGET_BATCH = 2000.0, 2.5, 64


def targets_met(new_tokens_per_s: float | None, decode_floor_ratio: float | None,
                generation_batch_size: int | None) -> bool | None:
    """Issue 21's acceptance on the describer's figures (``gpu_check.py`` judges its own report with it too): at
    least TARGET_NEW_TOKENS_PER_S new tokens/s and at most TARGET_FLOOR_RATIO times the weight-read floor, at a
    generation batch of at least TARGET_BATCH. None, never False, where either figure was not measured."""
    if new_tokens_per_s is None or decode_floor_ratio is None:
        return None
    return ((generation_batch_size or 0) >= TARGET_BATCH and new_tokens_per_s >= TARGET_NEW_TOKENS_PER_S
            and decode_floor_ratio <= TARGET_FLOOR_RATIO)


def setting_lines(path: str) -> dict[str, dict]:
    """``<config> <phase>_<setting>: {json}`` lines of a gpu_check output -> {"<phase>_<setting>": figures}."""
    found = {}
    if os.path.exists(path):
        for line in open(path, encoding="utf-8", errors="replace"):
            match = re.match(r"^\S+ ((?:describer|locator)_\w+): (\{.*\})\s*$", line)
            if match:
                found[match.group(1)] = json.loads(match.group(2))
    return found


def last_json(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    for line in reversed(open(path, encoding="utf-8", errors="replace").read().splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                return {}
    return {}


def _profile_lines(profile: dict | None) -> dict | None:
    """A profiled window's per-step totals and kernel classes (its top kernels stay in 2_real_size.txt)."""
    if not profile or "kernels_per_step" not in profile:
        return profile
    keep = ("steps", "kernels_per_step", "kernel_ms_per_step", "busy_ms_per_step", "wall_ms_per_step", "by_class")
    return {key: profile[key] for key in keep if key in profile}


def summary(out: str) -> dict:
    real = setting_lines(os.path.join(out, "2_real_size.txt"))
    bench = last_json(os.path.join(out, "3_bench_step.txt"))
    attention = last_json(os.path.join(out, "2b_decode_attention.txt"))
    fast, eager = real.get("describer_fast", {}), real.get("describer_transformers", {})
    compiled = real.get("describer_compiled", {})
    figures = {
        "describer_new_tokens_per_s": fast.get("new_tokens_per_s"),
        "describer_decode_ms_per_step": fast.get("decode_ms_per_step"),
        "weight_read_floor_ms": fast.get("weight_read_floor_ms"),
        "decode_floor_ratio": fast.get("decode_floor_ratio"),
        "generation_batch_size": fast.get("generation_batch_size"),
        "graph_failures": fast.get("graph_failures"),
        "graph_model_part_only": fast.get("graph_model_part_only"),
        "describer_transformers_new_tokens_per_s": eager.get("new_tokens_per_s"),
        "describer_speedup_vs_transformers_loop": (
            round(eager["step_seconds"] / fast["step_seconds"], 3)
            if fast.get("step_seconds") and eager.get("step_seconds") else None
        ),
        "locator_new_tokens_per_s": real.get("locator_fast", {}).get("new_tokens_per_s"),
        "describer_fast_profile": _profile_lines(fast.get("profile")),
        "describer_compiled_new_tokens_per_s": compiled.get("new_tokens_per_s"),
        "describer_compiled_decode_floor_ratio": compiled.get("decode_floor_ratio"),
        "describer_compiled_compiles_in_timed_units": compiled.get("compiles_in_timed_units"),
        "describer_compiled_profile": _profile_lines(compiled.get("profile")),
        # one decode step's attention, compiled (bench_decode_attention.py): transformers' SDPA against SC-Tune's
        "decode_attention_ms_per_step": {path: attention[path]["ms_per_step"] for path in ("transformers_sdpa", "sc_tune")
                                         if path in attention} or None,
        "side_by_side_describer_ratio": bench.get("describer_ratio"),  # this trainer / the reference's passes
        "side_by_side_describer_seconds": bench.get("describer_seconds"),
        "side_by_side_peak_memory_gib": bench.get("peak_memory_gib"),
    }
    figures["acceptance_met"] = targets_met(figures["describer_new_tokens_per_s"], figures["decode_floor_ratio"],
                                            figures["generation_batch_size"])
    return figures


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", nargs="?", default=os.environ.get("OUT", "/tmp/device_check_out"),
                        help="the device check's output folder (default: $OUT, else /tmp/device_check_out)")
    out = parser.parse_args(argv).out
    figures = summary(out)
    with open(os.path.join(out, "acceptance.json"), "w", encoding="utf-8") as f:
        json.dump(figures, f, indent=1)
    print("acceptance " + json.dumps(figures))


if __name__ == "__main__":
    main()
