"""What a family reads and writes, from the command line: parse an answer, count the token budgets.

    python -m sc_tune.families parse --model_type MT --answer TEXT [--image_size W H] [--box_format generic]
    python -m sc_tune.families budget --model_name_or_path DIR [--image_size W H] [--caption TEXT]

``parse`` prints the box the family's codec reads in ``TEXT`` as JSON, ``{"box": [x1, y1, x2, y2]}`` (normalised
to 0..1), or ``{"box": null, "reason": ...}`` when the answer holds no box, several boxes, or one that cannot be
read unambiguously (a y-first answer where the family writes x-first, coordinates normalised to 0..1 where it
writes a 0..1000 grid, ...). ``--image_size`` is the (width, height) of the image as the model saw it, needed
where the family writes pixels (Qwen2.5-VL: pixels of its resized input).

``budget`` loads a checkpoint folder's tokenizer and image processor (no weights) and prints the locator's and
describer's token budgets, the family's answer form they were counted on (the widest of its documented layouts,
every coordinate at its widest, up to where the box is complete and generation stops), and whether the
checkpoint is reasoning-only (refused by training). ``--image_size`` here is the original image's size, which the
image processor resizes (pixel codecs write up to the resized frame).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from sc_tune.adapters import Family, family_for, supported_model_types
from sc_tune.box_codecs import BOX_FORMATS, BoxReading, select_codec


def read_answer(model_type: str, answer: str, image_size: Sequence[int] | None = None,
                box_format: str = "native") -> BoxReading:
    """What ``model_type``'s codec reads in ``answer`` (``image_size``: the model input's (width, height))."""
    codec = select_codec(family_for(model_type).adapter.native_codec, box_format)
    frame = tuple(int(v) for v in image_size) if image_size else (0, 0)
    if min(codec.axis_scales(frame)) <= 0:
        raise ValueError(f"{model_type} writes boxes in pixels of the model's input: pass --image_size W H (the "
                         "size of the image as the model saw it)")
    return codec.read(answer, frame)


def parse_result(reading: BoxReading) -> dict:
    if reading.box is None:
        return {"box": None, "reason": reading.reason}
    return {"box": [round(v, 6) for v in reading.box]}


def check_checkpoint_folder(path: str) -> None:
    """``path`` is a folder (checked before transformers is asked to load from it, whose errors for a missing folder
    speak of hub repo ids; the adapter's loading names a missing tokenizer file)."""
    if not os.path.exists(path):
        raise ValueError(f"--model_name_or_path {path}: no such folder")
    if not os.path.isdir(path):
        raise ValueError(f"--model_name_or_path {path} is a file, not a checkpoint folder")


def model_type_and_family(path: str) -> tuple[str, Family]:
    """The folder's ``model_type`` and its family as training reads them (``sc_tune.modeling``), their errors as this
    CLI's: a config.json without a ``model_type`` may be completed with --model_type, an unserved one may not (the
    refusal says why)."""
    from sc_tune.checkpoints import CheckpointError
    from sc_tune.modeling import read_model_type, served_family

    try:
        model_type = read_model_type(path)
    except (FileNotFoundError, CheckpointError) as error:
        raise ValueError(f"{error}; or pass --model_type") from None
    try:
        return model_type, served_family(model_type, path)
    except CheckpointError as error:
        raise ValueError(str(error)) from None


def budget_report(path: str, model_type: str | None, image_size: Sequence[int], caption: str,
                  describer_max_new_tokens: int, image_max_pixels: int | None) -> dict:
    """The token budgets of ``path``'s family, counted with its tokenizer, and what they were counted on (an image
    of ``image_size`` resized as training would, within ``image_max_pixels`` where given). The defaults are the
    command line's (``main``), their one home."""
    from PIL import Image

    from sc_tune.rollout import LOCATOR_BUDGET_MARGIN, describer_budget, widest_locator_answer

    check_checkpoint_folder(path)
    if model_type is None:
        model_type, family = model_type_and_family(path)
    else:
        family = family_for(model_type)
    try:
        adapter = _budget_adapter(family.adapter, path)
    except OSError as error:  # transformers: a file the family's tokenizer or image processor needs is missing
        raise ValueError(f"--model_name_or_path {path}: cannot load its {model_type} tokenizer and image processor: "
                         + " ".join(str(error).split())) from None
    if image_max_pixels is not None:
        adapter.limit_image_pixels(None, image_max_pixels)
    image = adapter.prepare_image(Image.new("RGB", tuple(int(v) for v in image_size), (128, 128, 128)))
    widest = widest_locator_answer(adapter, image, caption)
    has_template = bool(getattr(adapter.tokenizer, "chat_template", None))
    reasoning = adapter.thinking_only_reason() if has_template or model_type == "qwen" else "unknown: no chat template"
    return {
        "model_type": model_type,
        "model_input_frame": list(image.frame),
        "image_tokens": image.num_tokens,  # the image's placeholder tokens in every prompt
        "locator_budget": widest.tokens + LOCATOR_BUDGET_MARGIN,
        "widest_answer_tokens": widest.tokens,
        "margin": LOCATOR_BUDGET_MARGIN,
        "widest_answer": widest.text,
        "answer_form": adapter.locator_target([0.1, 0.2, 0.5, 0.6], image, caption),
        "describer_budget": describer_budget(adapter, describer_max_new_tokens),
        "describer_max_new_tokens": describer_max_new_tokens,
        "reasoning_only": reasoning,
        "grounding_prior": adapter.grounding_prior,
    }


def _budget_adapter(adapter_class, path: str):
    """The family's adapter on ``path``'s tokenizer and image processor. A folder of released non-weight files may
    lack the chat template (the budget counts answers, not prompts); the template-free families are then built
    without it. A reasoning-only checkpoint is refused here as in training, naming it."""
    from sc_tune.adapters.patch_grid_chat import PatchGridChatAdapter

    try:
        return adapter_class.from_pretrained(path)
    except ValueError as error:
        if "no chat template" not in str(error) or not issubclass(adapter_class, PatchGridChatAdapter):
            raise
    from transformers import AutoImageProcessor, AutoTokenizer

    return adapter_class(AutoTokenizer.from_pretrained(path, padding_side="left"),
                         AutoImageProcessor.from_pretrained(path))


def main(argv: Sequence[str] | None = None) -> int:
    from sc_tune.arguments import SCTuneConfig  # finetune.py's defaults: a budget counted here is training's

    parser = argparse.ArgumentParser(prog="python -m sc_tune.families", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    parse = commands.add_parser("parse", help="the box a family reads in an answer, or why there is none")
    parse.add_argument("--model_type", required=True, choices=supported_model_types())
    parse.add_argument("--answer", required=True, help="the model's answer text (special tokens as text)")
    parse.add_argument("--image_size", type=int, nargs=2, metavar=("W", "H"),
                       help="width and height of the image as the model saw it (needed for pixel coordinates)")
    parse.add_argument("--box_format", choices=BOX_FORMATS, default="native")
    budget = commands.add_parser("budget", help="the token budgets of a checkpoint folder and their answer form")
    budget.add_argument("--model_name_or_path", required=True)
    budget.add_argument("--model_type", choices=supported_model_types(),
                        help="for a folder without config.json")
    budget.add_argument("--image_size", type=int, nargs=2, metavar=("W", "H"), default=(1920, 1080),
                        help="original image size, resized by the image processor (default 1920 1080)")
    budget.add_argument("--caption", default="the red circle",
                        help="the phrase grounded (families whose answer repeats it before the box)")
    budget.add_argument("--describer_max_new_tokens", type=int, default=SCTuneConfig.describer_max_new_tokens,
                        help="the caption length training uses (finetune.py's flag; default: its default)")
    budget.add_argument("--image_max_pixels", type=int,
                        help="the pixel budget training uses (finetune.py --image_max_pixels; default: the folder's)")
    args = parser.parse_args(argv)
    try:
        if args.command == "parse":
            result = parse_result(read_answer(args.model_type, args.answer, args.image_size, args.box_format))
        else:
            result = budget_report(args.model_name_or_path, args.model_type, args.image_size, args.caption,
                                   args.describer_max_new_tokens, args.image_max_pixels)
    except ValueError as error:
        print(f"{parser.prog} {args.command}: error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(result, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
