"""The vision tower's seconds per describer unit, vision cache off against on, on a tiny checkpoint (CPU, toy).

    OMP_NUM_THREADS=1 python scripts/bench_vision_cache.py --model_type minicpmv4_6
    OMP_NUM_THREADS=1 python scripts/bench_vision_cache.py --model_type minicpmv4_6 --vision_layers 24

A *describer unit* is one rollout and its two PPO optimizer steps (``tests.helpers.two_phase_trainer`` with
``max_steps=2``: full fine-tuning, the snapshot a frozen copy). The tower's seconds are the wall time of every call
of the family's vision tower (``ModelAdapter.vision_trunk(model).tower``'s class, the policy's and the snapshot's),
the cache's lookup, encoding and replay included. ``--vision_layers`` deepens the tiny tower (its new layers
random), where the tiny 2-layer tower's work is the size of the cache's bookkeeping. Prints each arm's median over
``--runs`` runs (they alternate, so drift in machine load hits both), then one JSON line; the losses of the two arms
are checked equal. The JSON line also holds, from each arm's last run, its tower calls (the same calls in both arms)
and losses, and what shows the cache was used: the images it encoded (its unit: a view on MiniCPM-V, a tile on the
tiled families; each once per rollout) and the tower calls its memo answered whole (``sc_tune.vision_cache``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from typing import NamedTuple

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sc_tune.modeling import load_model_and_adapter  # noqa: E402
from sc_tune.tiny import save_tiny  # noqa: E402
from tests.helpers import two_phase_trainer  # noqa: E402


def tiny_checkpoint(model_type: str, directory: str, vision_layers: int | None) -> str:
    """A tiny checkpoint of ``model_type``, its tower deepened to ``vision_layers`` (random weights) where given."""
    path = save_tiny(directory, model_type)
    if vision_layers is not None:
        model, _ = load_model_and_adapter(path)
        config = model.config
        config.vision_config.num_hidden_layers = vision_layers
        torch.manual_seed(0)
        type(model)(config).save_pretrained(path)
    return path


class TowerRun(NamedTuple):
    """One describer unit's figures; the cache's are None with the cache off."""

    seconds: float  # in the vision tower's calls
    calls: int  # of the vision tower (policy and snapshot)
    losses: list[float]
    images_encoded: int | None  # by the cache's trunk
    calls_from_memo: int | None  # tower calls the cache answered whole


def tower_seconds(checkpoint: str, output_dir: str, vision_cache: bool) -> TowerRun:
    """Seconds in the vision tower over one describer unit, and the unit's other figures."""
    trainer, losses = two_phase_trainer(checkpoint, output_dir, vision_cache=vision_cache, max_steps=2)
    tower_class = type(trainer.adapter.vision_trunk(trainer.model).tower)
    started, seconds = {}, []

    def before(module, args):
        if type(module) is tower_class:
            started[id(module)] = time.perf_counter()

    def after(module, args, output):
        if type(module) is tower_class:
            seconds.append(time.perf_counter() - started.pop(id(module)))

    handles = [torch.nn.modules.module.register_module_forward_pre_hook(before),
               torch.nn.modules.module.register_module_forward_hook(after)]
    try:
        trainer.train()
    finally:
        for handle in handles:
            handle.remove()
    # One rollout (max_steps=2), so the cache, cleared when a rollout starts, counted the whole unit.
    cache = trainer.cycle.vision_cache
    if cache is None:
        return TowerRun(sum(seconds), len(seconds), losses, None, None)
    return TowerRun(sum(seconds), len(seconds), losses, cache.encoded_images, cache.reused_tower_calls)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model_type", required=True)
    parser.add_argument("--vision_layers", type=int, default=None)
    parser.add_argument("--runs", type=int, default=3)
    opts = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as directory:
        checkpoint = tiny_checkpoint(opts.model_type, os.path.join(directory, "model"), opts.vision_layers)
        results = {False: [], True: []}
        last = {}  # each arm's last run
        for run in range(opts.runs):
            for cache in (False, True) if run % 2 == 0 else (True, False):
                last[cache] = tower_seconds(checkpoint, os.path.join(directory, f"{cache}{run}"), cache)
                results[cache].append(last[cache].seconds)
    if last[False].losses != last[True].losses:
        raise SystemExit(f"the losses differ with the cache on and off: {last[True].losses} against "
                         f"{last[False].losses}")
    off, on = (statistics.median(results[cache]) for cache in (False, True))
    print(f"{opts.model_type}, vision layers {opts.vision_layers or 'tiny'}: tower seconds per describer unit, "
          f"cache off {off:.3f} -> on {on:.3f} (median of {opts.runs})")
    print(json.dumps({"model_type": opts.model_type, "vision_layers": opts.vision_layers, "off_s": round(off, 4),
                      "on_s": round(on, 4), "runs": {str(k): [round(s, 4) for s in v] for k, v in results.items()},
                      "tower_calls": {str(k): arm.calls for k, arm in last.items()},
                      "losses": {str(k): arm.losses for k, arm in last.items()},
                      "cache_images_encoded": last[True].images_encoded,
                      "cache_calls_from_memo": last[True].calls_from_memo}))


if __name__ == "__main__":
    main()
