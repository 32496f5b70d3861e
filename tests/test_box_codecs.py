"""Box codecs: round trips, the released answer forms, and answers that must be refused (with their reason)."""

import pytest

from sc_tune.box_codecs import (GENERIC_CODEC, BracketGridCodec, JsonBoxCodec, ListGridCodec, NestedListGridCodec,
                                PairGridCodec)

BOX = [0.1234, 0.5, 0.75, 0.999]


def test_pair_grid_1000_round_trip_and_text():
    codec = PairGridCodec(1000)
    text = codec.format(BOX)
    assert text == "(123,500),(750,999)"
    assert codec.parse(text) == pytest.approx([0.123, 0.5, 0.75, 0.999])


def test_pair_grid_999_is_the_qwen_vl_grid():
    codec = PairGridCodec(999)
    assert codec.format([0.0, 0.5, 1.0, 1.0]) == "(0,500),(999,999)"  # round(0.5 * 999) = 500 (499.5 -> 500)
    decoded = codec.parse(codec.format(BOX))
    assert all(abs(a - b) <= 0.5 / 999 + 1e-9 for a, b in zip(decoded, BOX))


def test_pair_grid_parses_inside_model_text_and_with_spaces():
    codec = PairGridCodec(1000)
    assert codec.parse("<box>( 10, 20 ),(30,40)</box><|im_end|>") == pytest.approx([0.01, 0.02, 0.03, 0.04])


@pytest.mark.parametrize("text", ["", "the red circle", "(10,20),(30", "(10,20)", "(a,b),(c,d)", "(10,20),(30,1001)",
                                  "(-1,20),(30,40)"])
def test_malformed_text_is_a_parse_failure_not_a_box(text):
    reading = PairGridCodec(1000).read(text)
    assert reading.box is None and reading.reason


def test_qwen2_vl_box_tokens_frame_the_pairs():
    codec = PairGridCodec(1000, "<|box_start|>", "<|box_end|>")
    answer = "<|object_ref_start|>the dog<|object_ref_end|><|box_start|>(10,20),(30,40)<|box_end|><|im_end|>"
    assert codec.parse(answer) == pytest.approx([0.01, 0.02, 0.03, 0.04])
    assert codec.box_end(answer) == answer.index("<|im_end|>")
    assert "no <|box_start|>" in codec.read("(10,20),(30,40)").reason  # outside the box tokens


def test_json_grid_answer_is_the_fenced_list_with_its_label():
    codec = JsonBoxCodec("bbox_2d", scale=1000)
    assert codec.format(BOX) == '{"bbox_2d": [123, 500, 750, 999]}'
    answer = codec.answer(BOX, label='the "big" dog')
    assert answer == '```json\n[\n\t{"bbox_2d": [123, 500, 750, 999], "label": "the \\"big\\" dog"}\n]\n```'
    for layout in codec.answer_layouts(BOX, label="the dog"):
        assert codec.parse(layout + "<|im_end|>") == pytest.approx([0.123, 0.5, 0.75, 0.999]), layout
        # decoding may stop right after the box: the label after it is not needed
        assert codec.parse(layout[: codec.box_end(layout)]) == pytest.approx([0.123, 0.5, 0.75, 0.999])
    assert codec.box_end('```json\n[\n\t{"bbox_2d": [123, 500, 750, 99') is None  # 99 may go on to 999
    # a label outside ASCII is written as text, as a model writes it, not as \u escapes
    assert codec.answer(BOX, label="羊").endswith('"label": "羊"}\n]\n```')


def test_json_reads_floats_and_trailing_commas_and_refuses_what_is_ambiguous():
    codec = JsonBoxCodec("bbox_2d", scale=1000)
    assert codec.parse('{"bbox_2d": [100.5, 200, 300, 400.25],}') == pytest.approx([0.1005, 0.2, 0.3, 0.40025])
    reasons = {
        '{"bbox_2d": [1, 2, 3]}': "no",
        '{"bbox": [1, 2, 3, 4]}': "key",
        '{"box_2d": [200, 100, 600, 500]}': "y-first",  # Gemini's key: the axes would be swapped
        "[100, 200, 500, 600]": "axis order",  # no key says which axis comes first
        '{"bbox_2d": [0.1, 0.2, 0.5, 0.6]}': "normalised",  # 0..1 floats on a 0..1000 grid
        '[{"bbox_2d": [1, 2, 3, 4]}, {"bbox_2d": [5, 6, 7, 8]}]': "2 boxes",
        '{"bbox_2d": [1, 2, 3, 1001]}': "outside",
    }
    for text, words in reasons.items():
        reading = codec.read(text)
        assert reading.box is None and words in reading.reason, (text, reading.reason)


def test_json_pixel_codec_uses_the_resized_frame():
    codec = JsonBoxCodec("bbox_2d", scale=None)
    frame = (448, 336)  # the resized model input, not the original image
    text = codec.format([0.25, 0.5, 0.75, 1.0], frame)
    assert text == '{"bbox_2d": [112, 168, 336, 336]}'
    assert codec.parse(text, frame) == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert codec.parse('{"bbox_2d": [0, 0, 449, 10]}', frame) is None  # outside the frame


def test_y_first_box_2d_is_written_and_read_y_first():
    codec = JsonBoxCodec("box_2d", scale=1000, y_first=True)
    box = [0.1, 0.2, 0.5, 0.6]
    assert codec.format(box) == '{"box_2d": [200, 100, 600, 500]}'  # [y1, x1, y2, x2]
    assert codec.parse('```json\n[\n  {"box_2d": [200, 100, 600, 500], "label": "dog"}\n]\n```') == pytest.approx(box)
    assert "x-first" in codec.read('{"bbox_2d": [100, 200, 500, 600]}').reason
    assert "axis order" in codec.read("[200, 100, 600, 500]").reason


def test_the_generic_list_never_reads_a_y_first_answer_as_x_first():
    reading = GENERIC_CODEC.read('```json\n[{"box_2d": [200, 100, 600, 500], "label": "dog"}]\n```')
    assert reading.box is None and "y-first" in reading.reason
    assert GENERIC_CODEC.parse("[100, 200, 500, 600]") == pytest.approx([0.1, 0.2, 0.5, 0.6])
    assert "2 boxes" in GENERIC_CODEC.read("[1, 2, 3, 4] and [5, 6, 7, 8]").reason
    # a row stops right after the list's closing bracket, and not before it is written
    assert GENERIC_CODEC.box_end("[100, 200, 500, 600] the dog") == len("[100, 200, 500, 600]")
    assert GENERIC_CODEC.box_end("[100, 200, 500, 60") is None
    assert ListGridCodec(1000).request == "Answer with its box as [x1, y1, x2, y2], integers from 0 to 1000."


@pytest.mark.parametrize("inner", ["[[100, 200, 500, 600]]", "[100,200,500,600]", "(100, 200, 500, 600)",
                                   "<100,200,500,600>", "[(100,200),(500,600)]", " [ [100.0, 200, 500, 600] ] "])
def test_glm_bracket_styles_all_read_to_the_same_box(inner):
    codec = BracketGridCodec(1000, "<|begin_of_box|>", "<|end_of_box|>")
    answer = f"<|begin_of_box|>{inner}<|end_of_box|><|user|>"
    assert codec.parse(answer) == pytest.approx([0.1, 0.2, 0.5, 0.6])
    assert codec.box_end(answer) == answer.index("<|user|>")
    assert codec.box_end(answer[: answer.index("<|end_of_box|>")]) is None  # the box tokens close it


@pytest.mark.parametrize("answer,words", [
    ("<|begin_of_box|>[[1, 2, 3, 4], [5, 6, 7, 8]]<|end_of_box|>", "2 boxes"),
    ("<|begin_of_box|>[1, 2, 3]<|end_of_box|>", "3 numbers"),
    ("<|begin_of_box|>the dog<|end_of_box|>", "not coordinates"),
    ("[[1, 2, 3, 4]]", "no <|begin_of_box|>"),
    ("<|begin_of_box|>[0.1, 0.2, 0.5, 0.6]<|end_of_box|>", "normalised"),
    ("<|begin_of_box|>[0.0, 0.2, 1.0, 0.6]<|end_of_box|>", "normalised"),  # 0 and 1 are normalised values too
    ("<|begin_of_box|>[[100, 200, 500, 60", "no closing bracket"),  # cut off by the token budget mid-number
    ("<|begin_of_box|>[[100, 200, 500, 600", "no closing bracket"),
])
def test_glm_answers_that_are_not_one_box_are_refused_with_their_reason(answer, words):
    reading = BracketGridCodec(1000, "<|begin_of_box|>", "<|end_of_box|>").read(answer)
    assert reading.box is None and words in reading.reason, reading.reason


def test_internvl_nested_list_in_box_tags():
    codec = NestedListGridCodec(1000, "<box>", "</box>")
    assert codec.format([0.1, 0.2, 0.5, 0.6]) == "<box>[[100, 200, 500, 600]]</box>"
    assert codec.parse("<ref>the dog</ref><box>[[10, 20, 30, 40]]</box>") == pytest.approx([0.01, 0.02, 0.03, 0.04])
    # InternVL's own grounding evaluation also reads single brackets, and answers without the box tags
    assert codec.parse("<box>[10, 20, 30, 40]</box>") == pytest.approx([0.01, 0.02, 0.03, 0.04])
    assert codec.parse("[[10, 20, 30, 40]]") == pytest.approx([0.01, 0.02, 0.03, 0.04])
    assert codec.box_end("<box>[[10, 20, 30, 40]]") is None  # waits for </box>
    # without tags a row stops at its closing brackets, the double ones where it opened with two
    for answer, end in (("[[10, 20, 30, 40]]", 18), ("[[10, 20, 30, 40]", None), ("[10, 20, 30, 40] the dog", 16)):
        assert codec.box_end(answer) == end, answer
    assert "2 boxes" in codec.read("<box>[[1, 2, 3, 4]]</box><box>[[5, 6, 7, 8]]</box>").reason
