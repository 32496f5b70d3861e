"""Tiny random models of every registered family, for tests, smoke runs and bug reports.

    python -m sc_tune.tiny --model_type MODEL_TYPE --output_dir DIR

writes a folder that ``finetune.py --model_name_or_path DIR`` and ``evaluate.py --model DIR`` load. The
builders live with their families (``sc_tune/models/``) and are found through the registry.
"""

from __future__ import annotations

import argparse

from sc_tune.adapters import family_for, supported_model_types
from sc_tune.models.tiny_configs import TINY_SPECS, build_tiny_model
from sc_tune.models.tiny_template_families import TINY_TEMPLATE_SPECS, build_tiny_template_family


def build_tiny(model_type: str, **kwargs):
    """(model, tokenizer, image_processor) of a tiny random transformers-native chat model, in memory.

    Keyword arguments: ``corpus``, ``image_size``, ``seed``, ``reinit`` and the sizes of
    ``sc_tune.models.tiny_chat.TinySizes``. The chat-template families (InternVL, ...) carry their stand-in chat
    template on the tokenizer; of those, only InternVL takes another ``image_size`` (its tile).
    """
    if model_type in TINY_TEMPLATE_SPECS and model_type not in TINY_SPECS:
        return build_tiny_template_family(model_type, **kwargs)
    return build_tiny_model(model_type, **kwargs)


def save_tiny(directory, model_type: str) -> str:
    """A tiny checkpoint folder of any registered ``model_type``."""
    return family_for(model_type).build_tiny(model_type, str(directory))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Write a tiny random checkpoint folder of a supported family.")
    parser.add_argument("--model_type", required=True, choices=supported_model_types())
    parser.add_argument("--output_dir", required=True)
    args = parser.parse_args(argv)
    print(save_tiny(args.output_dir, args.model_type))


if __name__ == "__main__":
    main()
