"""Tiny random models of every registered family, for tests, smoke runs and bug reports.

    python -m sc_tune.tiny --model_type MODEL_TYPE --output_dir DIR

writes a folder that ``finetune.py --model_name_or_path DIR`` and ``evaluate.py --model DIR`` load.

This package sits above the adapters: it may read the registry (which model types exist), the adapters never
import it. Its modules:

- ``chat``: the shared machinery of the transformers-native chat families (tiny BPE tokenizer, ``TinySpec``,
  ``TinySizes``, ``build_tiny(spec)``, ``write_folder``);
- ``configs``: one ``TinySpec`` per Qwen2-VL ... Qwen3.5, Qwen3.8-Flash-Next, GLM-4.xV, EXAONE 4.5 and HyperCLOVA X SEED
  Vision v2 ``model_type``
  (``TINY_SPECS``);
- ``template_families``: InternVL, Gemma 3 / 4, LLaVA-OneVision, LLaVA-1.5 / NeXT, Mistral 3, Aya Vision, Granite 4
  Vision, Llama 3.2 Vision, SmolVLM, Ovis2 and MiniCPM-V 4.6 / 4.7, with stand-in chat templates;
- ``qwen_vl``: the native Qwen-VL (tiktoken vocabulary, its own config and model class).

``SAVERS`` maps each model type to the function that writes its folder; a test checks that every model type the
registry serves has one.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from sc_tune.adapters import supported_model_types
from sc_tune.tiny.configs import TINY_SPECS, build_tiny_model, save_tiny_model
from sc_tune.tiny.qwen_vl import save_tiny_qwen_vl
from sc_tune.tiny.template_families import TINY_TEMPLATE_SPECS, build_tiny_template_family, save_tiny_template_family


def _save_qwen_vl(model_type: str, directory: str) -> str:
    return save_tiny_qwen_vl(directory)


# (model_type, directory) -> the folder written
SAVERS: dict[str, Callable[[str, str], str]] = {
    **{model_type: save_tiny_model for model_type in TINY_SPECS},
    **{model_type: save_tiny_template_family for model_type in TINY_TEMPLATE_SPECS},
    "qwen": _save_qwen_vl,
}


def build_tiny(model_type: str, **kwargs):
    """(model, tokenizer, image_processor) of a tiny random transformers-native chat model, in memory.

    Keyword arguments: ``corpus``, ``image_size``, ``seed``, ``reinit`` and the sizes of ``sc_tune.tiny.chat.TinySizes``.
    The chat-template families (InternVL, ...) carry their stand-in chat template on the tokenizer; of those, only
    InternVL takes another ``image_size`` (its tile).
    """
    if model_type in TINY_TEMPLATE_SPECS and model_type not in TINY_SPECS:
        return build_tiny_template_family(model_type, **kwargs)
    return build_tiny_model(model_type, **kwargs)


def save_tiny(directory, model_type: str) -> str:
    """A tiny checkpoint folder of any registered ``model_type``."""
    try:
        save = SAVERS[model_type]
    except KeyError:
        raise ValueError(f"no tiny builder for model_type {model_type!r}; known: {', '.join(sorted(SAVERS))}") from None
    return save(model_type, str(directory))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sc_tune.tiny",
                                     description="Write a tiny random checkpoint folder of a supported family.")
    parser.add_argument("--model_type", required=True, choices=supported_model_types())
    parser.add_argument("--output_dir", required=True)
    args = parser.parse_args(argv)
    print(save_tiny(args.output_dir, args.model_type))
