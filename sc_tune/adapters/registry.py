"""The family registry: the one place that maps a checkpoint's ``config.model_type`` to its family.

A ``Family`` holds everything SC-Tune needs to know about a VLM line beyond the adapter's prompts and
codec: the class ``from_pretrained`` loads and an optional export hook. Family modules in
``sc_tune/adapters/`` call ``register`` when imported (``sc_tune/adapters/__init__.py`` imports them all);
nothing outside ``sc_tune/adapters/``, ``sc_tune/models/`` and the tiny-model builders of ``sc_tune/tiny/``
(a package above this one, keyed by these model types) names a family.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sc_tune.adapters.base import PIXEL_BUDGET_FAMILIES, ModelAdapter
from sc_tune.adapters.unserved import refusal


@dataclass(frozen=True)
class Family:
    name: str  # human name for docs and errors, e.g. "Qwen3.5 / 3.6 / 3.8"
    model_types: tuple[str, ...]  # the config.model_type values it serves
    adapter: type[ModelAdapter]  # prompts, codec, parsing, batches, suppressed ids, LoRA targets, fix_vit prefixes
    model_class: Callable[[], type]  # lazy import of the class used for from_pretrained
    finalize_export: Callable[[str, str], None] | None = None  # (output_dir, source_dir): files next to weights


_BY_MODEL_TYPE: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Add ``family`` under each of its model types; a model type already served by another family is an error."""
    if not family.model_types:
        raise ValueError(f"family {family.name!r} serves no model_type")
    for model_type in family.model_types:
        known = _BY_MODEL_TYPE.get(model_type)
        if known is not None and known != family:
            raise ValueError(f"model_type {model_type!r} is served by {known.name!r}; cannot register {family.name!r}")
    for model_type in family.model_types:
        _BY_MODEL_TYPE[model_type] = family
    sets_a_budget = family.adapter.limit_image_pixels is not ModelAdapter.limit_image_pixels
    if sets_a_budget and family.name not in PIXEL_BUDGET_FAMILIES:
        PIXEL_BUDGET_FAMILIES.append(family.name)
    return family


def family_for(model_type: str) -> Family:
    """The family serving ``model_type``; a ValueError naming it otherwise, with why where the survey of
    transformers' families says (``sc_tune.adapters.unserved``), and the model types that are served."""
    try:
        return _BY_MODEL_TYPE[model_type]
    except KeyError:
        raise ValueError(
            f"no SC-Tune family serves model_type {model_type!r}{refusal(model_type)}; "
            f"supported: {', '.join(supported_model_types())}"
        ) from None


def supported_model_types() -> list[str]:
    return sorted(_BY_MODEL_TYPE)


def families() -> list[Family]:
    """Every registered family once, in registration order."""
    return list(dict.fromkeys(_BY_MODEL_TYPE.values()))


def auto_image_text_to_text() -> type:
    """``model_class`` of the families transformers implements natively (lazy: importing is slow)."""
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText


def adapter_class(model_type: str) -> type[ModelAdapter]:
    return family_for(model_type).adapter
