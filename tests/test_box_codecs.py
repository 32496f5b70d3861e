import pytest

from sc_tune.box_codecs import JsonGridCodec, JsonPixelCodec, PairGridCodec

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
    assert PairGridCodec(1000).parse(text) is None


def test_json_grid_round_trip():
    codec = JsonGridCodec(1000)
    text = codec.format(BOX)
    assert text == '{"bbox_2d": [123, 500, 750, 999]}'
    assert codec.parse(text + "<|im_end|>") == pytest.approx([0.123, 0.5, 0.75, 0.999])
    assert codec.parse('{"bbox_2d": [1, 2, 3]}') is None
    assert codec.parse('{"bbox": [1, 2, 3, 4]}') is None


def test_json_pixel_codec_uses_the_resized_frame():
    codec = JsonPixelCodec()
    frame = (448, 336)  # the resized model input, not the original image
    text = codec.format([0.25, 0.5, 0.75, 1.0], frame)
    assert text == '{"bbox_2d": [112, 168, 336, 336]}'
    assert codec.parse(text, frame) == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert codec.parse('{"bbox_2d": [0, 0, 449, 10]}', frame) is None  # outside the frame
