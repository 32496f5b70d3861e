"""Peak memory of the two snapshot kinds: a full model copy (full fine-tuning) vs a LoRA adapter snapshot.

    python scripts/bench_memory.py                      # toy (18 M) and ~100 M-parameter Qwen2.5-VL, CPU
    python scripts/bench_memory.py --sizes toy-qwen2.5-vl

Each (size, kind) runs in its own process: build the model, the trainer (its snapshot and optimizer), then one
describer unit (rollout + two PPO steps, batch 2, short captions). Printed: parameters, the snapshot's own
tensors (bytes it holds beyond the policy), and the process's peak RSS. The last line is one JSON object.
The two kinds of a size run side by side (each process's peak RSS is its own; nothing here is timed), each with
half the CPU's threads unless OMP_NUM_THREADS is set.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile

SIZES = ["toy-qwen2.5-vl", "toy-qwen2.5-vl-100m"]


def measure(name: str, kind: str) -> dict:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from bench_configs import CONFIGS, prepare
    from bench_step import ThisTrainer, collate, synthetic_batch

    from sc_tune.arguments import LoraArguments, SCTuneConfig
    from sc_tune.modeling import apply_lora, freeze_vision_tower

    workdir = tempfile.mkdtemp(prefix="bench_memory_")
    model, adapter = prepare(name, workdir)
    freeze_vision_tower(model, adapter)
    if kind == "lora":
        model = apply_lora(model, adapter, LoraArguments(use_lora=True), gradient_checkpointing=False)
    samples = synthetic_batch(2, CONFIGS[name].image_size)
    args = SCTuneConfig(
        output_dir=workdir, per_device_train_batch_size=2, describer_update_steps=1, locator_update_steps=1,
        ppo_epochs=2, use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True,
        describer_max_new_tokens=4, describer_min_new_tokens=1, locator_max_new_tokens=4,
        skip_preflight=True,  # random weights never write a box that parses; the preflight would stop the run
    )
    ours = ThisTrainer(model, adapter, samples, args)
    ours.describer(collate(samples))
    snapshot_bytes = sum(t.numel() * t.element_size() for t in ours.trainer.snapshot.named_local_tensors().values())
    return {
        "config": name,
        "snapshot": "full copy" if kind == "full" else "LoRA adapter",
        "parameters_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
        "trainable_m": round(sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6, 2),
        "snapshot_mib": round(snapshot_bytes / 2**20, 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),  # Linux: KiB
    }


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 3 and argv[0] == "--child":
        print(json.dumps(measure(argv[1], argv[2])))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default=",".join(SIZES),
                        help="comma-separated configurations (scripts/bench_configs.py)")
    opts = parser.parse_args(argv)
    # Two processes side by side, each with its share of the cores: more threads than cores would spin-wait.
    env = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // 2)), **os.environ}
    rows = []
    for name in opts.sizes.split(","):
        children = {
            kind: subprocess.Popen([sys.executable, __file__, "--child", name, kind], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, env=env)
            for kind in ("full", "lora")
        }
        outputs = {kind: child.communicate() for kind, child in children.items()}
        for kind, child in children.items():
            stdout, stderr = outputs[kind]
            if child.returncode != 0:  # the child's own error, not just its exit status
                raise SystemExit(f"bench_memory: {name} {kind} failed:\n" + "\n".join(stderr.splitlines()[-15:]))
            row = json.loads(stdout.strip().splitlines()[-1])
            rows.append(row)
            print(
                f"{row['config']:>22} {row['snapshot']:>12}: {row['parameters_m']} M parameters, "
                f"{row['trainable_m']} M trainable, snapshot holds {row['snapshot_mib']} MiB, "
                f"peak RSS {row['peak_rss_mib']} MiB",
                flush=True,
            )
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
