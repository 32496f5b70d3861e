"""sc_tune.jsonio: one argument order, round trips, and errors that name the file (and the line)."""

import pytest

from sc_tune.jsonio import JSONFileError, read_json, read_jsonl, read_records, write_json, write_jsonl


def test_round_trips_keep_values_and_non_ascii_text(tmp_path):
    value = {"caption": "der rote Kreis – ÄÖÜ", "bbox": [0.1, 0.2, 0.3, 0.4], "n": 3}
    write_json(tmp_path / "a.json", value)
    assert read_json(tmp_path / "a.json") == value
    assert "ÄÖÜ" in (tmp_path / "a.json").read_text(encoding="utf-8")  # written as text, not \u escapes
    rows = [{"i": 0}, {"i": 1, "s": "é"}]
    write_jsonl(tmp_path / "b.jsonl", rows)
    assert (tmp_path / "b.jsonl").read_text(encoding="utf-8").splitlines() == ['{"i": 0}', '{"i": 1, "s": "é"}']
    assert read_jsonl(tmp_path / "b.jsonl") == rows
    # read_records takes either layout
    write_json(tmp_path / "c.json", rows)
    assert read_records(tmp_path / "c.json") == read_records(tmp_path / "b.jsonl") == rows


def test_errors_name_the_file_and_the_line(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nothing\.json: no such file"):
        read_json(tmp_path / "nothing.json")
    (tmp_path / "bad.json").write_text('[{"image": "a.png",}]')
    with pytest.raises(JSONFileError, match=r"bad\.json: not valid JSON \(.*line 1 column 20"):
        read_json(tmp_path / "bad.json")
    (tmp_path / "bad.jsonl").write_text('{"i": 0}\n\n{"i": 1\n')
    with pytest.raises(JSONFileError, match=r"bad\.jsonl: line 3 is not valid JSON"):
        read_jsonl(tmp_path / "bad.jsonl")
    (tmp_path / "latin1.json").write_bytes('["caf\xe9"]'.encode("latin-1"))
    with pytest.raises(JSONFileError, match=r"latin1\.json: not UTF-8 text \(byte 5"):
        read_json(tmp_path / "latin1.json")
    (tmp_path / "scalars.jsonl").write_text('{"i": 0}\n7\n')
    with pytest.raises(JSONFileError, match=r"scalars\.jsonl: record 1: expected a JSON object, got int"):
        read_records(tmp_path / "scalars.jsonl")
    # one JSON value over several lines (a COCO-style object): named as such, not as "line 1 is not valid JSON"
    write_json(tmp_path / "coco.json", {"images": [], "annotations": []})
    with pytest.raises(JSONFileError, match=r"coco\.json: expected a JSON list of records or JSON Lines \(one object "
                                            r"per line\), got one JSON dict with keys \['annotations', 'images'\]$"):
        read_records(tmp_path / "coco.json")
    (tmp_path / "cut.jsonl").write_text('{"i": 0}\n{"i": 1\n')  # real JSON Lines with a bad line: still the line
    with pytest.raises(JSONFileError, match=r"cut\.jsonl: line 2 is not valid JSON"):
        read_records(tmp_path / "cut.jsonl")


def test_writes_are_atomic_a_failure_mid_write_leaves_the_earlier_file(tmp_path):
    """Both writers go through a temporary file and a rename: an error (or a kill) mid-write leaves the earlier
    file whole and no temporary file behind."""
    write_jsonl(tmp_path / "rows.jsonl", [{"i": 0}])
    write_json(tmp_path / "value.json", {"old": True})

    def rows():
        yield {"i": 1}
        raise KeyboardInterrupt("killed mid-write")

    with pytest.raises(KeyboardInterrupt):
        write_jsonl(tmp_path / "rows.jsonl", rows())
    with pytest.raises(TypeError):
        write_json(tmp_path / "value.json", {"new": object()})  # not JSON: fails after the file was opened
    assert read_jsonl(tmp_path / "rows.jsonl") == [{"i": 0}]
    assert read_json(tmp_path / "value.json") == {"old": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.jsonl", "value.json"]
