"""Debugging commands for a family's answers and budgets, on a user's own text and checkpoint.

    python -m sc_tune.families parse --model_type qwen2_5_vl --answer '```json [{"bbox_2d": [1, 2, 3, 4]}] ```' \
        --image_size 640 480
    python -m sc_tune.families budget --model_name_or_path Qwen2.5-VL-7B-Instruct
    python -m sc_tune.families forms --model_type gemma4

``parse`` prints ``{"box": [x1, y1, x2, y2]}`` (normalised) or ``{"box": null, "reason": ...}``: exactly what
the trainer's reward and the evaluators read from that answer. ``budget`` prints the locator's token budget
and the answer form it was counted on, with the checkpoint's own tokenizer. ``forms`` lists the family's
documented answer forms and how each reads.
"""

from __future__ import annotations

import argparse
import json
import sys

from PIL import Image

from sc_tune.adapters import adapter_class, supported_model_types
from sc_tune.adapters.base import LOCATOR_BUDGET_MARGIN, ModelAdapter
from sc_tune.box_codecs import BOX_FORMATS, BoxCodec, BoxReading, select_codec

DEFAULT_IMAGE_SIZE = (448, 448)


def model_input_frame(model_type: str, image_size: tuple[int, int]) -> tuple[int, int]:
    """The (width, height) the family's released processor resizes an image of ``image_size`` to: what pixel
    coordinates refer to (Qwen2.5-VL). Grid families ignore it."""
    return adapter_class(model_type).default_frame(image_size)


def read_answer(model_type: str, answer: str, image_size: tuple[int, int] = DEFAULT_IMAGE_SIZE,
                box_format: str = "native", adapter: ModelAdapter | None = None) -> BoxReading:
    """How ``answer`` reads for a family: through a loaded checkpoint's adapter when given (its processor sets the
    frame), else through the family's codec and its released processor's resizing."""
    if adapter is not None:
        image = adapter.prepare_image(Image.new("RGB", image_size))
        return adapter.read_locator_output(answer, image)
    codec: BoxCodec = select_codec(adapter_class(model_type).native_codec, box_format)
    return codec.read(answer, model_input_frame(model_type, image_size))


def _load(path: str, box_format: str = "native") -> ModelAdapter:
    from sc_tune.modeling import read_model_type

    return adapter_class(read_model_type(path)).from_pretrained(path, box_format=box_format)


def _reading_json(reading: BoxReading) -> dict:
    if reading.box is None:
        return {"box": None, "reason": reading.reason}
    return {"box": [round(v, 6) for v in reading.box]}


def budget_report(adapter: ModelAdapter, image_size: tuple[int, int] = DEFAULT_IMAGE_SIZE) -> dict:
    image = adapter.prepare_image(Image.new("RGB", image_size))
    widest = adapter.widest_answer(image)
    return {
        "locator_max_new_tokens": adapter.locator_budget([image]),
        "answer_tokens": len(adapter.encode_target(widest)),
        "margin": LOCATOR_BUDGET_MARGIN,
        "counted_on": widest,
        "full_target": adapter.locator_target((1.0, 1.0, 1.0, 1.0), image, "<caption>"),
        "model_input_frame": list(image.frame),
        "describer_end_tokens": len(adapter.encode_target(adapter.end_text)),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sc_tune.families", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    parse = commands.add_parser("parse", help="read one locator answer as the trainer does")
    parse.add_argument("--model_type", choices=supported_model_types())
    parse.add_argument("--model_name_or_path", help="a checkpoint folder (its processor sets the frame)")
    parse.add_argument("--answer", required=True)
    parse.add_argument("--image_size", nargs=2, type=int, metavar=("W", "H"), default=list(DEFAULT_IMAGE_SIZE))
    parse.add_argument("--box_format", choices=BOX_FORMATS, default="native")
    budget = commands.add_parser("budget", help="the locator's token budget, counted with the checkpoint's tokenizer")
    budget.add_argument("--model_name_or_path", required=True)
    budget.add_argument("--image_size", nargs=2, type=int, metavar=("W", "H"), default=list(DEFAULT_IMAGE_SIZE))
    budget.add_argument("--box_format", choices=BOX_FORMATS, default="native")
    forms = commands.add_parser("forms", help="the family's documented answer forms and how each reads")
    forms.add_argument("--model_type", required=True, choices=supported_model_types())
    args = parser.parse_args(argv)

    if args.command == "parse":
        if not args.model_type and not args.model_name_or_path:
            parser.error("parse needs --model_type or --model_name_or_path")
        adapter = _load(args.model_name_or_path, args.box_format) if args.model_name_or_path else None
        reading = read_answer(args.model_type, args.answer, tuple(args.image_size), args.box_format, adapter)
        print(json.dumps(_reading_json(reading)))
    elif args.command == "budget":
        print(json.dumps(budget_report(_load(args.model_name_or_path, args.box_format), tuple(args.image_size))))
    else:
        for form in adapter_class(args.model_type).documented_answers:
            reading = adapter_class(args.model_type).native_codec.read(form.text, form.frame)
            print(json.dumps({"answer": form.text, "source": form.source, "expected": form.box,
                              **_reading_json(reading)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
