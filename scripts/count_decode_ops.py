"""Count the tensor operations of one decode step of SC-Tune's decoding loop, on CPU.

    python scripts/count_decode_ops.py                 # Qwen2.5-VL-7B's 28 layers at toy widths, LoRA as trained
    python scripts/count_decode_ops.py --layers 4

On a GPU a captured decode step replays one kernel per operation that is not a view, and at a large batch many of
them are small: their count, not the bytes they read, can set the step's time (``docs/performance.md``). The count
depends on the layer structure, the LoRA targets and the loop, not on the widths, so it can be taken here at toy
widths with the real layer count. Operations are counted with a ``TorchDispatchMode`` during one steady-state
decode step (the second), for the describer's fused loop (sampled rows, then greedy rows):

- ``base``: the adapters disabled;
- ``one_adapter``: every row with the policy's adapter (PEFT's own forward);
- ``row_adapters_per_block``: the policy's adapter on the sampled rows and the snapshot's on the greedy rows, each
  block's LoRA term on its own (``sc_tune.snapshot.row_adapters`` before the stacked terms);
- ``row_adapters_masked``: the same with every block's term in one pair of matmuls over the stacked ranks, each row
  masked to its own adapter's (``sc_tune.snapshot._StackedRowTerms`` where the blocks do not tile the call);
- ``row_adapters``: the same with batched matmuls, block by block (``_StackedRowTerms`` where equal blocks tile the
  call, as the describer's B sampled and B greedy rows do: the default).

Per setting: ``ops`` (all dispatched operations), ``kernel_ops`` (those not views, allocations or host reads:
what a GPU would launch), and ``lora_kernel_ops_per_layer`` (``kernel_ops`` above ``base``, per LoRA layer). The last
line is one JSON object. GPU times are not measured here.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
from contextlib import nullcontext

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_configs import CONFIGS, prepare  # noqa: E402
from bench_step import synthetic_batch  # noqa: E402
from peft.tuners.lora import Linear as LoraLinear  # noqa: E402

import sc_tune.decoding as decoding  # noqa: E402
import sc_tune.snapshot as snapshot  # noqa: E402
from sc_tune.arguments import LoraArguments, SCTuneConfig  # noqa: E402
from sc_tune.decoding import Decoding  # noqa: E402
from sc_tune.modeling import apply_lora, freeze_vision_tower  # noqa: E402
from sc_tune.rollout import GenerationSettings, describe_with_greedy  # noqa: E402
from sc_tune.snapshot import POLICY_ADAPTER, SNAPSHOT_ADAPTER, active_adapter, row_adapters  # noqa: E402

SETTINGS = ("base", "one_adapter", "row_adapters_per_block", "row_adapters_masked", "row_adapters")
# Dispatched, but no kernel of their own on a GPU: allocations, the host read of a scalar, and a reshape that
# returns a view without being declared one.
NOT_KERNELS = {"empty", "empty_strided", "empty_like", "_local_scalar_dense", "lift_fresh", "_unsafe_view"}


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops, self.kernel_ops = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        if not func.is_view and func.overloadpacket.__name__ not in NOT_KERNELS:
            self.kernel_ops += 1
        return func(*args, **(kwargs or {}))


def count_one_step(run) -> OpCounter:
    """Run ``run()`` (one generate call) and count the operations of its second decode step."""
    counter = OpCounter()
    original = decoding._run

    def counted_run(step, loop, graphed, device, logits, row_check=None):
        calls = 0

        def one_step():
            nonlocal calls
            calls += 1
            with counter if calls == 2 else nullcontext():
                step()

        return original(one_step, loop, graphed, device, logits, row_check)

    decoding._run = counted_run
    try:
        run()
    finally:
        decoding._run = original
    if counter.ops == 0:
        raise SystemExit("count_decode_ops: the call decoded fewer than two steps")
    return counter


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="toy-qwen2.5-vl")
    parser.add_argument("--layers", type=int, default=28, help="language-model layers (Qwen2.5-VL-7B: 28)")
    parser.add_argument("--boxes", type=int, default=2, help="boxes: one sampled and one greedy row each")
    opts = parser.parse_args(argv)

    name = f"{opts.config}-{opts.layers}-layers"
    base = CONFIGS[opts.config]
    CONFIGS[name] = dataclasses.replace(base, sizes={**base.sizes, "layers": opts.layers})
    model, adapter = prepare(name, tempfile.mkdtemp(prefix="count_ops_"))
    freeze_vision_tower(model, adapter)
    model = apply_lora(model, adapter, LoraArguments(use_lora=True), gradient_checkpointing=False)
    model.add_adapter(SNAPSHOT_ADAPTER, model.peft_config[POLICY_ADAPTER])
    model.eval()
    lora_layers = sum(1 for m in model.modules() if isinstance(m, LoraLinear))

    samples = synthetic_batch(opts.boxes, base.image_size)
    images = [adapter.prepare_image(s["image"]) for s in samples]
    boxes = [s["bbox"] for s in samples]
    n = len(images)
    # Both kinds of rows run the whole budget (no end token), so the second step always comes.
    defaults = {f.name: f.default for f in dataclasses.fields(SCTuneConfig)}
    sampled = GenerationSettings(max_new_tokens=4, min_new_tokens=4, do_sample=True, top_k=defaults["describer_top_k"],
                                 top_p=defaults["describer_top_p"], temperature=defaults["describer_temperature"])
    greedy = GenerationSettings(max_new_tokens=4, min_new_tokens=4, do_sample=False)
    stacked_for_layer, tiled = snapshot._StackedRowTerms.for_layer, snapshot._StackedRowTerms._tiled

    def run(setting):
        if setting == "base":
            context = model.disable_adapter()
        elif setting == "one_adapter":
            context = active_adapter(model, POLICY_ADAPTER)
        else:
            context = row_adapters(model, [(POLICY_ADAPTER, 0, n), (SNAPSHOT_ADAPTER, n, 2 * n)])
        if setting == "row_adapters_per_block":
            snapshot._StackedRowTerms.for_layer = classmethod(lambda cls, layer, blocks: None)
        if setting == "row_adapters_masked":
            snapshot._StackedRowTerms._tiled = lambda self, rows: False
        try:
            with torch.no_grad(), context:
                describe_with_greedy(model, adapter, images, boxes, images, boxes, sampled, greedy,
                                     Decoding(static_cache=True))
        finally:
            snapshot._StackedRowTerms.for_layer, snapshot._StackedRowTerms._tiled = stacked_for_layer, tiled

    report = {"config": opts.config, "layers": opts.layers, "lora_layers": lora_layers, "rows": 2 * n}
    for setting in SETTINGS:
        counter = count_one_step(lambda: run(setting))
        report[setting] = {"ops": counter.ops, "kernel_ops": counter.kernel_ops}
    for setting in SETTINGS[1:]:
        extra = report[setting]["kernel_ops"] - report["base"]["kernel_ops"]
        report[setting]["lora_kernel_ops_per_layer"] = round(extra / lora_layers, 2)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
