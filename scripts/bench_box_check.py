"""The host's cost of ending locator rows at their box in SC-Tune's decoding loop, on a released tokenizer (CPU).

    python scripts/fetch_released_files.py     # Qwen2.5-VL's released tokenizer.json into .cache/real_checkpoints
    PYTHONPATH=. OMP_NUM_THREADS=1 python scripts/bench_box_check.py --rows 128

SC-Tune's loop (``sc_tune.decoding._RowCheck``) asks ``rollout.BoxCompleteStop.row_done`` about each open row once
per decode step: a decode of the row's ids so far and a parse of the text. On a GPU the check of one step's tokens
runs while the device runs the next step, so it costs nothing as long as it takes less than a step. This times that
check alone, without a model: ``--rows`` rows write Qwen2.5-VL's own locator answer (``locator_target``: the fenced
JSON list with the caption as its label) token by token, each row's box a little wider than the last, through the
released tokenizer. Prints per repeat the steps until every row is found complete and the milliseconds per step
(median, max) and per call, then one JSON line of the last repeat.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sc_tune.adapters import adapter_class  # noqa: E402
from sc_tune.rollout import BoxCompleteStop  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RELEASED = os.path.join(ROOT, ".cache", "real_checkpoints", "Qwen__Qwen2.5-VL-7B-Instruct")


def released_adapter(tokenizer_folder: str):
    """Qwen2.5-VL's adapter on the released tokenizer, with transformers' Qwen2-VL image processor at its defaults
    (the released pixel bounds): only the answer's pixel frame is read from it."""
    from transformers import AutoTokenizer, Qwen2VLImageProcessorPil

    return adapter_class("qwen2_5_vl")(AutoTokenizer.from_pretrained(tokenizer_folder), Qwen2VLImageProcessorPil())


def locator_answers(adapter, rows: int) -> list[list[int]]:
    """The ids of ``rows`` Qwen2.5-VL locator answers on a 1280 x 720 photo, each box a little wider than the last."""
    from PIL import Image

    image = adapter.prepare_image(Image.new("RGB", (1280, 720), (200, 40, 40)))
    return [adapter.encode_target(adapter.locator_target((0.1 + 0.001 * i, 0.2, 0.55 + 0.001 * i, 0.9), image,
                                                         f"the red car number {i}")) for i in range(rows)]


def one_call(adapter, answers: list[list[int]]) -> tuple[list[float], int]:
    """The check as the loop runs it: per step, each open row's next token appended and ``row_done`` asked; a row
    found complete is dropped. Returns the seconds of each step and the rows found complete."""
    stop = BoxCompleteStop(adapter, 0)
    open_rows = {row: [] for row in range(len(answers))}
    seconds = []
    for step in range(max(map(len, answers))):
        began = time.perf_counter()
        for row in list(open_rows):
            ids = open_rows[row]
            ids.append(answers[row][step])
            if stop.row_done(row, ids):
                del open_rows[row]
        seconds.append(time.perf_counter() - began)
        if not open_rows:
            break
    return seconds, len(stop.stopped_at)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=128, help="locator rows in one call (2B for a rollout of B boxes)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tokenizer", default=RELEASED, help="a folder holding Qwen2.5-VL's released tokenizer.json")
    args = parser.parse_args(argv)
    if not os.path.isfile(os.path.join(args.tokenizer, "tokenizer.json")):
        sys.exit(f"bench_box_check: no tokenizer.json in {args.tokenizer} (python scripts/fetch_released_files.py)")
    adapter = released_adapter(args.tokenizer)
    answers = locator_answers(adapter, args.rows)
    print(f"{args.rows} rows, answers of {min(map(len, answers))}-{max(map(len, answers))} tokens, e.g. "
          f"{adapter.decode(answers[0])!r}")
    for repeat in range(args.repeats):
        seconds, found = one_call(adapter, answers)
        result = {"rows": args.rows, "rows_found_complete": found, "steps": len(seconds),
                  "ms_per_step_median": round(1e3 * statistics.median(seconds), 3),
                  "ms_per_step_max": round(1e3 * max(seconds), 3), "ms_per_call": round(1e3 * sum(seconds), 1)}
        print(f"repeat {repeat}: {result}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
