"""Every family's documented answer forms read as the box they mean, through ``python -m sc_tune.families``;
ambiguous forms read as no box, with a reason; budgets and forms come from one place (the adapter)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from sc_tune.adapters import adapter_class, families, supported_model_types
from sc_tune.box_codecs import GENERIC_CODEC, BracketListCodec, JsonBoxCodec, JsonGridCodec, PairGridCodec
from sc_tune.families import main as families_main

FORMS = [
    pytest.param(model_type, form, id=f"{model_type}-{i}")
    for model_type in supported_model_types()
    for i, form in enumerate(adapter_class(model_type).documented_answers)
]


def cli(capsys, *argv) -> dict:
    assert families_main(list(argv)) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_every_family_documents_its_answers_with_sources():
    for family in families():
        forms = family.adapter.documented_answers
        assert forms, f"{family.name}: no documented answer forms"
        assert all(form.source for form in forms)
        assert any(form.box is not None for form in forms)


@pytest.mark.parametrize("model_type,form", FORMS)
def test_documented_answer_reads_through_the_cli(capsys, model_type, form):
    out = cli(capsys, "parse", "--model_type", model_type, "--answer", form.text, "--image_size", *map(str, form.frame))
    if form.box is None:
        assert out["box"] is None and out["reason"]
    else:
        assert out == {"box": pytest.approx(list(form.box), abs=1e-6)}


def test_cli_runs_as_a_module():
    answer = '```json\n[\n\t{"bbox_2d": [100, 200, 300, 400], "label": "the dog"}\n]\n```'
    done = subprocess.run([sys.executable, "-m", "sc_tune.families", "parse", "--model_type", "qwen3_vl",
                           "--answer", answer], capture_output=True, text=True, check=True)
    assert json.loads(done.stdout) == {"box": [0.1, 0.2, 0.3, 0.4]}


def test_y_first_answers_are_never_read_x_first():
    gemma4 = JsonBoxCodec("box_2d", "yxyx", 1000)
    assert gemma4.read('{"box_2d": [200, 100, 600, 500]}').box == pytest.approx([0.1, 0.2, 0.5, 0.6])
    assert gemma4.format([0.1, 0.2, 0.5, 0.6]) == '{"box_2d": [200, 100, 600, 500]}'
    # Qwen's key is x-first; the other vendor's key is refused by name, not transposed.
    reading = JsonGridCodec(1000).read('[{"box_2d": [200, 100, 600, 500]}]')
    assert reading.box is None and "box_2d" in reading.reason
    # The generic codec reads a keyed answer by its key's order.
    assert GENERIC_CODEC.read('{"box_2d": [200, 100, 600, 500]}').box == pytest.approx([0.1, 0.2, 0.5, 0.6])
    assert GENERIC_CODEC.read('{"bbox_2d": [100, 200, 500, 600]}').box == pytest.approx([0.1, 0.2, 0.5, 0.6])


@pytest.mark.parametrize("text,expected", [
    ("[0.1, 0.2, 0.5, 0.6]", [0.1, 0.2, 0.5, 0.6]),  # normalised decimals (the LLaVA lineage)
    ("[100, 200, 500, 600]", [0.1, 0.2, 0.5, 0.6]),
    ("[1.5, 2, 3, 4]", None),  # decimals above 1: neither convention
    ("[100, 200, 500]", None),
    ("(100, 200, 500, 600)", None),  # the generic form is bracketed
])
def test_generic_codec_forms(text, expected):
    reading = GENERIC_CODEC.read(text)
    if expected is None:
        assert reading.box is None and reading.reason
    else:
        assert reading.box == pytest.approx(expected)


def test_bracket_variants_and_integer_grids():
    glm = BracketListCodec(1000, styles="[(<")
    for text in ("[[100, 200, 500, 600]]", "[100,200,500,600]", "(100,200,500,600)", "<100, 200, 500, 600>"):
        assert glm.read(text).box == pytest.approx([0.1, 0.2, 0.5, 0.6]), text
    assert glm.read("(100, 200, 500, 600]").box is None
    assert BracketListCodec(1000).read("(100,200,500,600)").box is None  # InternVL writes square brackets
    assert PairGridCodec(1000).read("(10.5,20),(30,40)").reason.startswith("decimal")


def test_box_end_marks_what_the_locator_must_write():
    answer = '```json\n[\n\t{"bbox_2d": [1, 2, 3, 4], "label": "x"}\n]\n```'
    end = JsonGridCodec(1000).box_end(answer)
    assert answer[:end].endswith("[1, 2, 3, 4]") and JsonGridCodec(1000).box_end("no box") is None


def test_budget_command_counts_the_checkpoints_form(capsys, tmp_path):
    from sc_tune.tiny import save_tiny

    folder = save_tiny(tmp_path / "q3", "qwen3_vl")
    out = cli(capsys, "budget", "--model_name_or_path", str(folder))
    adapter = adapter_class("qwen3_vl").from_pretrained(folder)
    assert out["counted_on"].startswith("```json\n[\n\t{\"bbox_2d\": [1000, 1000, 1000, 1000]")
    assert out["locator_max_new_tokens"] == len(adapter.encode_target(out["counted_on"])) + out["margin"]
