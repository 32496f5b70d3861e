"""Reading and writing JSON and JSON Lines: the project's one home for it.

Every function takes the path first. A missing file, a file that is not UTF-8 and a file that is not valid
JSON each raise an error that names the file (and, for JSON Lines, the line), so a bad input never surfaces
as a bare ``JSONDecodeError`` from deep inside a run.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from contextlib import contextmanager
from typing import Any


class JSONFileError(ValueError):
    """A file that cannot be read as JSON / JSON Lines; the message names the file."""


def _read_text(path) -> str:
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise JSONFileError(f"{path}: is a folder, not a JSON file") from None
    except UnicodeDecodeError as e:
        raise JSONFileError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None


def _parse_json(text: str, path) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise JSONFileError(f"{os.fspath(path)}: not valid JSON ({e})") from None


def _parse_jsonl(text: str, path) -> list:
    rows = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise JSONFileError(f"{os.fspath(path)}: line {line_no} is not valid JSON ({e})") from None
    return rows


def read_json(path) -> Any:
    """The value of a JSON file."""
    return _parse_json(_read_text(path), path)


def read_jsonl(path) -> list:
    """The values of a JSON Lines file, one per non-blank line."""
    return _parse_jsonl(_read_text(path), path)


def read_records(path) -> list[dict]:
    """A JSON list of objects or a JSON Lines file of objects (told apart by the first character)."""
    path = os.fspath(path)
    text = _read_text(path)
    if text.lstrip().startswith("["):
        records = _parse_json(text, path)
    else:
        try:
            records = _parse_jsonl(text, path)
        except JSONFileError as not_lines:
            # Not JSON Lines, but perhaps one JSON value over several lines (a COCO-style file, a dict of records):
            # say what it is rather than which of its lines is not a whole object.
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                raise not_lines from None
            keys = f" with keys {sorted(value)[:8]}" if isinstance(value, dict) else ""
            raise JSONFileError(f"{path}: expected a JSON list of records or JSON Lines (one object per line), got one "
                                f"JSON {type(value).__name__}{keys}") from None
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise JSONFileError(f"{path}: record {i}: expected a JSON object, got {type(record).__name__}")
    return records


@contextmanager
def _atomically(path):
    """A text file to write in place of ``path``: written beside it under a temporary name, synced, then renamed onto
    it, so a process killed mid-write leaves the earlier file (or none), never half a file."""
    path = os.fspath(path)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json(path, value, indent: int | None = 2) -> None:
    """Write ``value`` as UTF-8 JSON (non-ASCII text kept as is) with a final newline, atomically."""
    with _atomically(path) as f:
        json.dump(value, f, indent=indent, ensure_ascii=False)
        f.write("\n")


def write_jsonl(path, rows: Iterable) -> None:
    """Write one JSON value per line (UTF-8), atomically."""
    with _atomically(path) as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
