"""Box codecs: how each model family writes a box as text, and how that text is read back.

A codec converts between the project's box convention (normalised ``[x1, y1, x2, y2]``, see
:mod:`sc_tune.boxes`) and the text a model reads and writes. It has two text forms:

- ``format(box)``: the box as the family writes it inside a sentence (the describer prompt names a region
  this way), e.g. ``{"bbox_2d": [x1, y1, x2, y2]}`` or ``<box>[[x1, y1, x2, y2]]</box>``;
- ``answer(box, frame, label)``: the whole answer as the released model writes it when asked to ground a
  phrase, e.g. Qwen's fenced JSON list ``\\`\\`\\`json\\n[\\n\\t{"bbox_2d": [...], "label": "..."}\\n]\\n\\`\\`\\```.
  The locator is trained on exactly this text, so that a tuned model keeps answering in its released format.
  ``answer_layouts`` adds the other layouts the family's documentation shows (indentation, a bare object),
  which the locator's token budget must also hold.

Reading never invents a box: ``read`` returns a :class:`BoxReading`, whose ``box`` is ``None`` with a ``reason``
when the text holds no box, more than one box, a box out of range, or a box whose reading is ambiguous (a
y-first ``box_2d`` handed to an x-first reader, coordinates normalised to 0..1 handed to a 0..1000 grid, a list
that names no key where the family's key says the axis order). The trainer and the evaluator count those as
parse failures (the reference silently turned them into ``[0, 0, 0, 0]``). ``box_end`` says where the first
complete box ends in a partial answer: generation stops there (``sc_tune.rollout``), so a long trailing label
costs no decoding steps.

Quantisation policy (the one place it is stated): a normalised coordinate ``v`` is written on an integer
grid ``0..scale`` as ``round(v * scale)`` and read back as ``n / scale`` (a fractional ``n`` is read the same way).

- Qwen-VL / Qwen-VL-Chat: ``scale = 999``. The reference SC-Tune loader wrote ``int(v * 999)``, and Qwen-VL's
  own grounding evaluation reads ``n / 999`` (QwenLM/Qwen-VL ``eval_mm/evaluate_grounding.py``); its README
  calls the values normalised to ``[0, 1000)``. We round instead of truncating so that encode -> decode moves a
  coordinate by at most half a grid step.
- Qwen2-VL, Qwen3-VL, Qwen3.5, Qwen3.8-Flash-Next, GLM-V, InternVL, Gemma: ``scale = 1000`` (their documented
  relative grid).
- Qwen2.5-VL: absolute pixels of the *resized* model input (``frame``), rescaled to ``[0, 1]`` on decode.
- Gemma 3 / 4 (Gemini's convention): ``box_2d`` is **y-first**, ``[y1, x1, y2, x2]`` on 0..1000.
- Generic (``--box_format generic``): the plain list ``[x1, y1, x2, y2]`` of integers on ``0..1000``
  (``GENERIC_CODEC``). Any family can be trained with it; the model then learns the format from the
  locator's pseudo-labels instead of relying on pre-training.
"""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

_NUM = r"(-?\d+(?:\.\d+)?)"
_FOUR = rf"\s*{_NUM}\s*,\s*{_NUM}\s*,\s*{_NUM}\s*,\s*{_NUM}\s*"
_PAIR_RE = re.compile(rf"\(\s*{_NUM}\s*,\s*{_NUM}\s*\)\s*,\s*\(\s*{_NUM}\s*,\s*{_NUM}\s*\)")
_LIST_RE = re.compile(rf"\[{_FOUR}\]")
_NUMBER_RE = re.compile(_NUM)
# The JSON keys of the two box conventions that name their axis order: Qwen's ``bbox_2d`` is x-first,
# Gemini's (and Gemma's) ``box_2d`` is y-first.
KEY_AXES = {"bbox_2d": "x-first [x1, y1, x2, y2]", "box_2d": "y-first [y1, x1, y2, x2]"}


@dataclass(frozen=True)
class BoxReading:
    """What a codec read from an answer: the normalised box, or ``None`` and why not."""

    box: list[float] | None
    reason: str = ""


def _fail(reason: str) -> BoxReading:
    return BoxReading(None, reason)


class BoxCodec(ABC):
    """Writes a normalised box as model text and reads it back.

    A codec writes its coordinates with ``coordinates_text`` (a grid or the pixels of the model's input frame,
    x-first unless ``y_first``), optionally between an ``open`` and a ``close`` token (InternVL's ``<box>``,
    GLM's ``<|begin_of_box|>``). Subclasses say what the coordinate text looks like and how to find it.
    """

    # How a locator prompt asks for this format (families whose prompt names the format use it).
    request: str = "Answer with its bounding box."
    open: str = ""
    close: str = ""
    y_first: bool = False
    # What ``read`` looks for, in words (reasons name it).
    shape: str = "a box"

    @abstractmethod
    def axis_scales(self, frame: tuple[int, int]) -> tuple[int, int]:
        """The largest coordinate of the x and y axes; ``frame`` is the (width, height) the model sees."""

    @abstractmethod
    def coordinates_text(self, values: Sequence[int]) -> str:
        """The four numbers, in the order written, as this family's coordinate text."""

    @abstractmethod
    def find_boxes(self, text: str) -> list[re.Match]:
        """Every complete coordinate text in ``text`` (one match per box, four numeric groups each)."""

    def why_none(self, text: str) -> str:
        """Why ``text`` (which holds no box of this codec's shape) is not a box: a subclass names the near misses."""
        return f"no {self.shape} in the answer"

    # ---------------------------------------------------------------- writing
    def written_values(self, box_norm: Sequence[float], frame: tuple[int, int]) -> list[int]:
        sx, sy = self.axis_scales(frame)
        x1, y1, x2, y2 = box_norm
        xyxy = [_quantize(x1, sx), _quantize(y1, sy), _quantize(x2, sx), _quantize(y2, sy)]
        return [xyxy[1], xyxy[0], xyxy[3], xyxy[2]] if self.y_first else xyxy

    def format(self, box_norm: Sequence[float], frame: tuple[int, int] = (0, 0)) -> str:
        """The box as the family writes it in a sentence (with its box tokens, if any)."""
        return self.text_of(self.written_values(box_norm, frame))

    def text_of(self, values: Sequence) -> str:
        """``format``'s text for four values as written (in the written axis order)."""
        return f"{self.open}{self.coordinates_text(values)}{self.close}"

    def answer(self, box_norm: Sequence[float], frame: tuple[int, int] = (0, 0), label: str = "") -> str:
        """The grounding answer as the released model writes it (``label``: the phrase it grounds)."""
        return self.format(box_norm, frame)

    def answer_layouts(self, box_norm: Sequence[float], frame: tuple[int, int] = (0, 0),
                       label: str = "") -> list[str]:
        """``answer`` and the other layouts the family's documentation shows (the budget must hold each)."""
        return [self.answer(box_norm, frame, label)]

    # ---------------------------------------------------------------- reading
    def segments(self, text: str) -> list[tuple[str, int]] | BoxReading:
        """The parts of ``text`` that may hold coordinates, with their offsets: the text between each
        ``open`` and ``close`` where the family frames its boxes, else the whole text."""
        if not self.open:
            return [(text, 0)]
        found, start = [], 0
        while (begin := text.find(self.open, start)) >= 0:
            inner = begin + len(self.open)
            end = text.find(self.close, inner)
            found.append((text[inner:] if end < 0 else text[inner:end], inner))
            if end < 0:
                break
            start = end + len(self.close)
        if not found:
            return _fail(f"no {self.open}...{self.close} box in the answer")
        return found

    def read(self, text: str, frame: tuple[int, int] = (0, 0)) -> BoxReading:
        """The one box in ``text`` as a normalised box, or ``None`` with the reason there is none."""
        segments = self.segments(text)
        if isinstance(segments, BoxReading):
            return segments
        matches = [m for segment, _ in segments for m in self.find_boxes(segment)]
        if not matches:
            return _fail(self.why_none(text))
        if len(matches) > 1:
            return _fail(f"{len(matches)} boxes in the answer: a referring expression names one object")
        return self.normalise(matches[0].groups(), frame)

    def parse(self, text: str, frame: tuple[int, int] = (0, 0)) -> list[float] | None:
        """``read(text, frame).box``: the normalised box, or ``None`` (a parse failure)."""
        return self.read(text, frame).box

    def box_end(self, text: str) -> int | None:
        """Where the first complete box ends in ``text`` (after its ``close`` token, if any), or ``None`` while
        none is complete. Generation stops there: the rest of an answer cannot change what ``read`` returns,
        except by adding a second box, which the locator's one-box answer never needs."""
        segments = self.segments(text)
        if isinstance(segments, BoxReading):
            return None
        for segment, offset in segments:
            if self.open:
                closed = text.find(self.close, offset)
                if closed >= 0 and self.find_boxes(text[offset:closed]):
                    return closed + len(self.close)
                continue
            match = next(iter(self.find_boxes(segment)), None)
            if match is not None:
                return offset + match.end()
        return None

    def normalise(self, numbers: Sequence[str], frame: tuple[int, int]) -> BoxReading:
        """Four written numbers -> the normalised xyxy box, or why they are not one."""
        values = [float(n) for n in numbers]
        if self.y_first:
            values = [values[1], values[0], values[3], values[2]]
        sx, sy = self.axis_scales(frame)
        fractional = any("." in n for n in numbers)
        if max(sx, sy) > 1 and fractional and all(0 <= v <= 1 for v in values):
            return _fail(f"coordinates {list(numbers)} look normalised to 0..1, not written on this family's "
                         f"0..{sx}x0..{sy} scale: ambiguous")
        x1, y1, x2, y2 = values
        if not (0 <= x1 <= sx and 0 <= x2 <= sx and 0 <= y1 <= sy and 0 <= y2 <= sy):
            return _fail(f"coordinates {list(numbers)} outside 0..{sx} (x) and 0..{sy} (y)")
        return BoxReading([x1 / sx, y1 / sy, x2 / sx, y2 / sy])


def _quantize(v: float, scale: int) -> int:
    return int(min(max(round(float(v) * scale), 0), scale))


def _grid(values: Sequence[int], template: str) -> str:
    return template.format(*values)


class _GridScale:
    """A fixed ``0..scale`` grid on both axes."""

    def __init__(self, scale: int):
        self.scale = scale

    def axis_scales(self, frame):
        return self.scale, self.scale


class PairGridCodec(_GridScale, BoxCodec):
    """``(x1,y1),(x2,y2)`` on a ``0..scale`` grid (Qwen-VL; Qwen2-VL between ``<|box_start|>``/``<|box_end|>``)."""

    shape = "(x1,y1),(x2,y2) box"

    def __init__(self, scale: int, open: str = "", close: str = ""):
        super().__init__(scale)
        self.open, self.close = open, close

    def coordinates_text(self, values):
        return _grid(values, "({},{}),({},{})")

    def find_boxes(self, text):
        return list(_PAIR_RE.finditer(text))


class ListGridCodec(_GridScale, BoxCodec):
    """``[x1, y1, x2, y2]`` on a ``0..scale`` grid: the generic codec (``--box_format generic``).

    The list names no axis order, so an answer that says ``box_2d`` (Gemini's and Gemma's y-first key) is
    refused rather than read x-first."""

    shape = "[x1, y1, x2, y2] box"

    def __init__(self, scale: int = 1000):
        super().__init__(scale)
        self.request = f"Answer with its box as [x1, y1, x2, y2], integers from 0 to {scale}."

    def coordinates_text(self, values):
        return _grid(values, "[{}, {}, {}, {}]")

    def find_boxes(self, text):
        return list(_LIST_RE.finditer(text))

    def read(self, text, frame=(0, 0)):
        if re.search(r'"box_2d"\s*:', text):
            return _fail('a "box_2d" answer is y-first by its convention ([y1, x1, y2, x2]); this format is '
                         "x-first [x1, y1, x2, y2]: ambiguous")
        return super().read(text, frame)


class NestedListGridCodec(_GridScale, BoxCodec):
    """``[[x1, y1, x2, y2]]`` on a ``0..scale`` grid, one box of a list of boxes (InternVL, in ``<box>...</box>``).

    Read as InternVL's own grounding evaluation reads it (``evaluate_grounding.py``: ``\\[*\\[(.*?),(.*?),(.*?),
    (.*?)\\]\\]*``): double or single brackets, inside the box tags where the answer has them, else anywhere."""

    shape = "[[x1, y1, x2, y2]] box"
    _pattern = re.compile(rf"\[?\[{_FOUR}\]\]?")

    def __init__(self, scale: int = 1000, open: str = "", close: str = ""):
        super().__init__(scale)
        self.open, self.close = open, close

    def coordinates_text(self, values):
        return _grid(values, "[[{}, {}, {}, {}]]")

    def find_boxes(self, text):
        return list(self._pattern.finditer(text))

    def segments(self, text):
        if self.open and self.open not in text:
            return [(text, 0)]  # InternVL's evaluation reads an answer without its box tags too
        return super().segments(text)

    def box_end(self, text):
        if self.open and self.open not in text:
            match = self._pattern.search(text)
            return match.end() if match and match.group(0).startswith("[[") == match.group(0).endswith("]]") else None
        return super().box_end(text)


class BracketGridCodec(_GridScale, BoxCodec):
    """Four numbers on a ``0..scale`` grid in any bracket style, between box tokens (GLM-V).

    GLM-V's README: inside ``<|begin_of_box|>...<|end_of_box|>`` "the bracket style may vary ([], [[]], (), <>,
    etc.)". We write ``[[x1, y1, x2, y2]]`` (the style its grounding prompt names) and read any of them, also as
    two corner pairs; the text between the box tokens must be numbers, brackets and commas only."""

    shape = "box of four numbers"
    _ONLY_COORDINATES = re.compile(r"^[\s\[\]()<>,\d.\-]*$")

    def __init__(self, scale: int, open: str, close: str):
        super().__init__(scale)
        self.open, self.close = open, close

    def coordinates_text(self, values):
        return _grid(values, "[[{}, {}, {}, {}]]")

    def find_boxes(self, text):
        if not self._ONLY_COORDINATES.match(text) or not re.search(r"[\])>]\s*$", text):
            return []  # words inside the box tokens, or an unclosed bracket: not (yet) a box
        numbers = list(_NUMBER_RE.finditer(text))
        if len(numbers) % 4 or not numbers:
            return []
        # One pseudo-match per four numbers, so that read() counts boxes like the other codecs.
        return [_Numbers([n.group(1) for n in numbers[i : i + 4]]) for i in range(0, len(numbers), 4)]

    def why_none(self, text):
        segments = self.segments(text)
        inner = segments[0][0] if isinstance(segments, list) else text
        numbers = _NUMBER_RE.findall(inner)
        if not self._ONLY_COORDINATES.match(inner):
            return f"the text between {self.open} and {self.close} is not coordinates: {inner[:60]!r}"
        if numbers and not len(numbers) % 4:
            # an answer cut off by the token budget mid-box: its last number may be cut too ("60" of "600")
            return f"the box after {self.open} has no closing bracket (cut off?): {inner[:60]!r}"
        return f"{len(numbers)} numbers between {self.open} and {self.close}, not four per box: {inner[:60]!r}"


class _Numbers:
    """A stand-in for a regex match over numbers found one by one (``groups`` is all ``read`` uses)."""

    def __init__(self, numbers: list[str]):
        self._numbers = tuple(numbers)

    def groups(self):
        return self._numbers


class JsonBoxCodec(BoxCodec):
    """A JSON object ``{"KEY": [..4 numbers..], "label": ...}``, fenced as a list in the family's answers.

    ``key`` says the convention: ``bbox_2d`` (Qwen2.5-VL, Qwen3-VL, Qwen3.5: x-first) or ``box_2d``
    (Gemini's, assumed for Gemma 3 and 4: y-first, ``y_first=True``). ``scale``: a ``0..scale`` grid, or ``None``
    for the pixels of the resized model input (Qwen2.5-VL; ``frame`` must be the size the image processor
    resized to, so rescaling to the original image is exact up to one pixel of that frame).

    Reading takes the fenced list, a bare list or a bare object alike (labels and other keys ignored, trailing
    commas as Qwen's OCR answers write them), by finding ``"KEY": [a, b, c, d]``. An answer with the other
    convention's key, or a bare list with no key, is refused: its axis order is not the one this family writes.
    """

    def __init__(self, key: str = "bbox_2d", scale: int | None = 1000, y_first: bool = False, indent: str = "\t",
                 request: str = "Output its bbox coordinates in JSON format."):
        if key not in KEY_AXES:
            raise ValueError(f"unknown box key {key!r}; known: {sorted(KEY_AXES)}")
        self.key, self.scale, self.y_first, self.indent, self.request = key, scale, y_first, indent, request
        self.shape = f'"{key}": [..] box'
        self._pattern = re.compile(rf'"{re.escape(key)}"\s*:\s*\[{_FOUR}\]')

    def axis_scales(self, frame):
        return frame if self.scale is None else (self.scale, self.scale)

    def coordinates_text(self, values):
        return _grid(values, "[{}, {}, {}, {}]")

    def text_of(self, values):
        return f'{{"{self.key}": {self.coordinates_text(values)}}}'

    def _object(self, box_norm, frame, label: str, sep: str = ", ") -> str:
        coordinates = self.coordinates_text(self.written_values(box_norm, frame))
        return f'"{self.key}": {coordinates}{sep}"label": {json.dumps(label, ensure_ascii=False)}'

    def answer(self, box_norm, frame=(0, 0), label=""):
        # The documented answer: a fenced JSON list, one object per line, the box before its label.
        return f"```json\n[\n{self.indent}{{{self._object(box_norm, frame, label)}}}\n]\n```"

    def answer_layouts(self, box_norm, frame=(0, 0), label=""):
        coordinates = self.coordinates_text(self.written_values(box_norm, frame))
        return [
            self.answer(box_norm, frame, label),
            # one object per line, 4 spaces, trailing comma (Qwen2.5-VL's spatial-understanding cookbook)
            f"```json\n[\n    {{{self._object(box_norm, frame, label)}}},\n]\n```",
            # each object opened on its own line, 4 / 8 spaces, trailing commas (Qwen2.5-VL's OCR cookbook)
            f"```json\n[\n    {{\n        {self._object(box_norm, frame, label)},\n    }},\n]\n```",
            f"{{{self._object(box_norm, frame, label)}}}",  # a bare object
            f'{{\n"{self.key}": {coordinates}\n}}',  # Qwen's fine-tuning README's grounding example
        ]

    def find_boxes(self, text):
        return list(self._pattern.finditer(text))

    def why_none(self, text):
        for other, axes in KEY_AXES.items():
            if other != self.key and re.search(rf'"{other}"\s*:', text):
                return (f'a "{other}" answer ({axes} by its convention) where this family writes "{self.key}" '
                        f"({KEY_AXES[self.key]}): ambiguous")
        if _LIST_RE.search(text):
            return (f'a list with no "{self.key}" key: it does not say its axis order (this family writes '
                    f"{KEY_AXES[self.key]})")
        return super().why_none(text)


GENERIC_CODEC = ListGridCodec(1000)
BOX_FORMATS = ("native", "generic")


def select_codec(native: BoxCodec, box_format: str) -> BoxCodec:
    """The codec an adapter uses: its family's own (``native``) or the generic one."""
    if box_format == "native":
        return native
    if box_format == "generic":
        return GENERIC_CODEC
    raise ValueError(f"box_format must be one of {BOX_FORMATS}, got {box_format!r}")
