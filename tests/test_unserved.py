"""The refusal of a model type transformers implements and SC-Tune does not serve says why (``adapters/unserved.py``),
and the survey behind it (docs/families.md) covers every image-text model type of the installed transformers."""

import os
import re

import pytest

from sc_tune.adapters import family_for, supported_model_types
from sc_tune.adapters.unserved import SURVEY, UNSERVED
from tests.conftest import ROOT

SURVEYED = [(entry, model_type) for entry in UNSERVED for model_type in entry.model_types]


@pytest.mark.parametrize("entry,model_type", SURVEYED, ids=[model_type for _, model_type in SURVEYED])
def test_an_unserved_model_type_is_refused_with_the_reason_and_where_the_survey_is(entry, model_type):
    with pytest.raises(ValueError) as refused:
        family_for(model_type)
    message = str(refused.value)
    assert message.startswith(f"no SC-Tune family serves model_type {model_type!r} ({entry.name}): {entry.reason} "
                              f"(see {SURVEY}); supported: "), message
    assert message.endswith(", ".join(supported_model_types()))


def test_molmo2_is_refused_because_it_answers_with_points():
    with pytest.raises(ValueError, match=r"'molmo2' \(Molmo2\): it answers a grounding request with points, not boxes"):
        family_for("molmo2")


def test_a_model_type_outside_the_survey_is_refused_as_before():
    with pytest.raises(ValueError) as refused:
        family_for("llama_vl")
    assert str(refused.value) == f"no SC-Tune family serves model_type 'llama_vl'; supported: " \
                                 f"{', '.join(supported_model_types())}"


def test_the_survey_names_each_model_type_once_and_none_that_is_served():
    surveyed = [model_type for _, model_type in SURVEYED]
    assert len(surveyed) == len(set(surveyed))
    assert not set(surveyed) & set(supported_model_types())
    assert all(entry.reason and not entry.reason.endswith(".") for entry in UNSERVED)


def test_the_survey_covers_every_image_text_model_type_of_the_installed_transformers():
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
        MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES,
    )

    surveyed = {model_type for _, model_type in SURVEYED}
    assert surveyed <= set(CONFIG_MAPPING_NAMES)  # no misspelt model type
    implemented = set(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES) | set(MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES)
    assert implemented - surveyed - set(supported_model_types()) == set()


def test_the_docs_section_names_every_surveyed_model_type():
    with open(os.path.join(ROOT, "docs", "families.md"), encoding="utf-8") as f:
        text = f.read()
    title = SURVEY.split('"')[1]
    section = text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"`([a-z0-9_.-]+)`", section))
    assert {model_type for _, model_type in SURVEYED} - named == set()
    # A family served since keeps no row in the table (its model_type column, the second).
    rows = [line.split("|") for line in section.splitlines() if line.startswith("| ") and "`" in line]
    tabled = {name for row in rows for name in re.findall(r"`([a-z0-9_.-]+)`", row[2])}
    assert tabled and tabled & set(supported_model_types()) == set()
