"""Turn a ``save_pretrained`` folder into one the official Qwen-VL-Chat demos load unchanged.

``QWenLMHeadModel.save_pretrained`` already writes the official state-dict keys. What it cannot write:

- ``config.json`` fields the official code needs: ``model_type`` "qwen", ``architectures``, the official
  ``auto_map`` (kept from the source folder when it has one) and ``torch_dtype`` (transformers 5 writes ``dtype``);
- the original ``generation_config.json``: ``save_pretrained`` drops ``chat_format``, ``max_window_size`` and
  friends, and ``model.chat`` then fails (docs/qwen_vl_remote_code.md, F1);
- the tokenizer files (``qwen.tiktoken``, ``tokenizer_config.json`` with its ``auto_map``);
- the remote-code files (``modeling_qwen.py`` and the rest), which this project does not ship; they are
  copied from the input checkpoint folder when it holds them.
"""

from __future__ import annotations

import os
import shutil
import warnings

from sc_tune.jsonio import read_json, write_json

REMOTE_CODE_FILES = (
    "configuration_qwen.py",
    "modeling_qwen.py",
    "qwen_generation_utils.py",
    "tokenization_qwen.py",
    "visual.py",
)
OPTIONAL_FILES = ("SimSun.ttf",)  # the official tokenizer's font for drawing boxes (used only for drawing)
TOKENIZER_FILES = ("qwen.tiktoken", "tokenizer_config.json")
OFFICIAL_AUTO_MAP = {
    "AutoConfig": "configuration_qwen.QWenConfig",
    "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel",
}
OFFICIAL_TOKENIZER_AUTO_MAP = {"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", None]}


def official_generation_config(eod_id: int) -> dict:
    """Qwen-VL-Chat's released generation_config.json, with the end-of-document id of the vocabulary."""
    return {
        "chat_format": "chatml",
        "do_sample": True,
        "eos_token_id": eod_id,
        "max_new_tokens": 512,
        "max_window_size": 6144,
        "pad_token_id": eod_id,
        "top_k": 0,
        "top_p": 0.3,
    }


def _source_file(source_dir: str | None, name: str) -> str | None:
    if source_dir is None:
        return None
    path = os.path.join(source_dir, name)
    return path if os.path.isfile(path) else None


def finalize_export(out_dir: str, source_dir: str | None, tokenizer=None, quiet: bool = False) -> dict:
    """Complete ``out_dir`` (already written by ``model.save_pretrained``) for the official demos.

    ``source_dir`` is the checkpoint folder training started from (the official download); its
    generation config, tokenizer files and remote-code files are copied. ``tokenizer`` (a
    :class:`QWenTokenizer`) is used for the tokenizer files only when the source has none. Returns what was
    done, per file group.
    """
    config_path = os.path.join(out_dir, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{config_path} is missing: call model.save_pretrained({out_dir!r}) first")
    report: dict[str, list[str] | str] = {}

    config = read_json(config_path)
    source_config_path = _source_file(source_dir, "config.json")
    source_config = read_json(source_config_path) if source_config_path else {}
    config["model_type"] = "qwen"
    config["architectures"] = ["QWenLMHeadModel"]
    config["auto_map"] = source_config.get("auto_map", OFFICIAL_AUTO_MAP)
    config["tokenizer_type"] = "QWenTokenizer"
    if "dtype" in config and "torch_dtype" not in config:
        config["torch_dtype"] = config["dtype"]
    write_json(config_path, config)
    report["config.json"] = "model_type, architectures, auto_map, torch_dtype set"

    generation_path = os.path.join(out_dir, "generation_config.json")
    source_generation = _source_file(source_dir, "generation_config.json")
    if source_generation:
        shutil.copyfile(source_generation, generation_path)
        report["generation_config.json"] = f"copied from {source_generation}"
    else:
        eod_id = config.get("eos_token_id")
        if tokenizer is not None:
            eod_id = tokenizer.eod_id
        if eod_id is None:
            raise ValueError(f"{config_path}: no eos_token_id and no tokenizer given; cannot write generation_config.json")
        write_json(generation_path, official_generation_config(int(eod_id)))
        report["generation_config.json"] = "written with the official Qwen-VL-Chat values"

    source_tokenizer = [_source_file(source_dir, name) for name in TOKENIZER_FILES]
    if all(source_tokenizer):
        for path in source_tokenizer:
            shutil.copyfile(path, os.path.join(out_dir, os.path.basename(path)))
        report["tokenizer"] = f"copied from {source_dir}"
    elif tokenizer is not None:
        tokenizer.save_vocabulary(out_dir)
        write_json(os.path.join(out_dir, "tokenizer_config.json"), {
            "model_max_length": 8192,
            "tokenizer_class": "QWenTokenizer",
            "auto_map": OFFICIAL_TOKENIZER_AUTO_MAP,
        })
        report["tokenizer"] = "written from the tokenizer object"
    else:
        raise ValueError(
            f"finalize_export: {source_dir!r} holds no {' and '.join(TOKENIZER_FILES)} and no tokenizer was given"
        )
    for leftover in ("special_tokens_map.json", "added_tokens.json", "chat_template.jinja"):
        path = os.path.join(out_dir, leftover)
        # Written by a generic tokenizer.save_pretrained; the official folder has none (one the source has stays).
        if os.path.isfile(path) and not _source_file(source_dir, leftover):
            os.remove(path)

    copied, missing = [], []
    for name in REMOTE_CODE_FILES + OPTIONAL_FILES:
        path = _source_file(source_dir, name)
        if path:
            shutil.copyfile(path, os.path.join(out_dir, name))
            copied.append(name)
        elif name in REMOTE_CODE_FILES:
            missing.append(name)
    report["remote_code"] = copied
    if missing:
        message = (
            f"Qwen-VL export {out_dir}: the source folder {source_dir!r} has no {', '.join(missing)}. The folder "
            "loads with sc_tune.models.qwen_vl.QWenLMHeadModel.from_pretrained, but the official demos "
            "(trust_remote_code=True) need those files: copy them from the official Qwen-VL-Chat release."
        )
        report["missing_remote_code"] = missing
        if not quiet:
            warnings.warn(message, stacklevel=2)
    return report
