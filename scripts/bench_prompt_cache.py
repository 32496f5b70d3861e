"""The snapshot's prompt-cache reuse in a describer rollout, timed on CPU for a 1-D rotary family (toy InternVL).

    PYTHONPATH=. OMP_NUM_THREADS=1 python scripts/bench_prompt_cache.py --units 3

After the policy's sampled captions and the snapshot's teacher-forced scoring pass (its cache kept, at the positions
``scoring_inputs`` gives), one unit writes the snapshot's greedy captions and locates the 2B captions, with the reuse
(``--snapshot_prompt_cache``: greedy decoding from the scoring cache, locating from its image prefix) or without it
(full prefills). Printed per setting: the seconds of the model's multi-column forwards after the scoring pass
(prefills, the vision tower inside them) and of the two stages, per unit, and whether the locator answers agree;
then one JSON line with those figures, each stage's prefill columns (rows x columns) per unit (with the reuse the
greedy captions prefill nothing and every locator row at least its image span less) and the last unit's locator
answers. ``--checkpoint`` times another folder of a family that does both (the tests pass a tiny InternVL).
``gpu_check.py`` times the trainer's whole step, on Qwen configurations only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sc_tune.modeling import load_model_and_adapter  # noqa: E402
from sc_tune.prompt_cache import ScoredPrompts, keep_prompt_columns, scoring_inputs  # noqa: E402
from sc_tune.rollout import GenerationSettings, describe, generate, locate, locate_from_prefix  # noqa: E402
from sc_tune.tiny.template_families import save_tiny_template_family  # noqa: E402


class PrefillClock:
    """Seconds spent in ``model``'s forwards over more than one column (prefills), and their columns summed over
    rows, since the last ``reset``."""

    def __init__(self, model):
        self.seconds, self.columns, self._began = 0.0, 0, None
        model.register_forward_pre_hook(self._before, with_kwargs=True)
        model.register_forward_hook(self._after, with_kwargs=True)

    def reset(self):
        self.seconds, self.columns = 0.0, 0

    def _before(self, module, args, kwargs):
        if kwargs["input_ids"].shape[1] > 1:
            self.columns += kwargs["input_ids"].numel()
            self._began = time.perf_counter()

    def _after(self, module, args, kwargs, output):
        if self._began is not None:
            self.seconds += time.perf_counter() - self._began
            self._began = None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--units", type=int, default=3, help="timed units per setting, after one warm-up pair")
    parser.add_argument("--batch", type=int, default=8, help="boxes per rollout (2B locator rows)")
    parser.add_argument("--checkpoint", default=None,
                        help="a checkpoint folder to time instead of the toy InternVL (its family must resume from "
                             "the scoring cache and locate from its image prefix)")
    opts = parser.parse_args(argv)
    if opts.checkpoint is not None:
        model, adapter = load_model_and_adapter(opts.checkpoint)
    else:
        # 448 px tiles of 256 image tokens and a text model of the toy Qwen2.5-VL's width and depth
        # (scripts/bench_configs); the folder is only read while loading.
        with tempfile.TemporaryDirectory(prefix="bench_prompt_cache_") as folder:
            model, adapter = load_model_and_adapter(save_tiny_template_family(
                "internvl", folder, image_size=448, hidden=512, layers=4, vision_width=192, text_heads=8,
                text_kv_heads=2))
    model.eval()
    sampling = GenerationSettings(max_new_tokens=16, do_sample=True, top_k=50, top_p=1.0)
    greedy_settings = GenerationSettings(max_new_tokens=16)
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]
    images = [adapter.prepare_image(Image.new("RGB", (448, 448), colours[i % 4])) for i in range(opts.batch)]
    # Boxes of other digit counts: prompts of other lengths, so the rows are left-padded.
    boxes = [[0.1 + 0.05 * i, 0.2, 0.5, 0.6 + 0.001 * (i % 2)] for i in range(opts.batch)]
    clock = PrefillClock(model)

    def unit(reuse: bool) -> tuple[dict, list]:
        """One unit's figures (seconds, and the prefills' columns of each stage) and its locator answers."""
        torch.manual_seed(0)
        batch, sampled = describe(model, adapter, images, boxes, sampling)
        width = batch.input_ids.shape[1]
        teacher = adapter.append_completion(batch, sampled.ids_BT, sampled.mask_BT)
        with torch.no_grad():
            cache = model(**scoring_inputs(model, adapter, teacher), use_cache=True).cache
        scored = ScoredPrompts(batch, keep_prompt_columns(cache, width), width - 1)
        clock.reset()
        start = time.perf_counter()
        resumes = reuse and adapter.resumes_from_scoring_cache(model, width, teacher["input_ids"].shape[1])
        greedy = generate(model, adapter, batch, greedy_settings, True, prompt_cache=scored.cache if resumes else None)
        greedy_columns = clock.columns
        captions, rows = sampled.texts + greedy.texts, images + images
        sources = list(range(opts.batch)) * 2
        found = locate_from_prefix(model, adapter, rows, captions, greedy_settings, scored, sources) if reuse else None
        if reuse and not (resumes and found is not None):
            raise SystemExit("bench_prompt_cache: the reuse did not engage")
        found = found or locate(model, adapter, rows, captions, greedy_settings)
        figures = {"prefill_s": clock.seconds, "stages_s": time.perf_counter() - start,
                   "greedy_prefill_columns": greedy_columns, "locating_prefill_columns": clock.columns - greedy_columns}
        return figures, found[1]

    name = "toy InternVL" if opts.checkpoint is None else model.config.model_type
    print(f"{name}: {images[0].num_tokens} image tokens, batch {opts.batch}, {opts.units} units per setting")
    for reuse in (False, True):  # warm-up
        unit(reuse)
    answers, report = {}, {}
    for reuse in (False, True):
        runs = [unit(reuse) for _ in range(opts.units)]
        answers[reuse] = runs[-1][1]
        per_unit = {key: round(sum(figures[key] for figures, _ in runs) / opts.units, 4) for key in runs[0][0]}
        report[f"reuse_{'on' if reuse else 'off'}"] = {**per_unit, "locator_texts": answers[reuse]}
        print(f"reuse {'on' if reuse else 'off'}: prefill {per_unit['prefill_s']:.3f} s/unit, "
              f"greedy captions + locating {per_unit['stages_s']:.3f} s/unit")
    print("the same locator answers with and without:", answers[True] == answers[False])
    print(json.dumps({"model_type": model.config.model_type, "image_tokens": images[0].num_tokens,
                      "batch": opts.batch, "units": opts.units, **report,
                      "same_locator_answers": answers[True] == answers[False]}))


if __name__ == "__main__":
    main()
