"""Box codecs: how each model family writes a box as text, and how that text is read back.

A codec converts between the project's box convention (normalised ``[x1, y1, x2, y2]``, see
:mod:`sc_tune.boxes`) and the coordinate text a model reads and writes. Reading never invents a box: text
that does not hold one well-formed box in range reads as ``BoxReading(None, reason)``, which the trainer and
the evaluators count as a parse failure (the reference silently turned it into ``[0, 0, 0, 0]``), and
``python -m sc_tune.families parse`` prints with its reason.

Quantisation policy (the one place it is stated): a normalised coordinate ``v`` is written on an integer
grid ``0..scale`` as ``round(v * scale)`` and read back as ``n / scale``.

- Qwen-VL / Qwen-VL-Chat: ``(x1,y1),(x2,y2)``, ``scale = 999``. The reference SC-Tune loader wrote
  ``int(v * 999)``; Qwen-VL's own grounding evaluation reads ``n / 1000``. Both keep every coordinate inside
  ``[0, 999]``; we round instead of truncating so that encode -> decode moves a coordinate by at most half a
  grid step.
- Qwen2-VL: the same pairs on ``0..1000``.
- Qwen2.5-VL: ``"bbox_2d": [x1, y1, x2, y2]`` in absolute pixels of the *resized* model input (``frame``).
- Qwen3-VL, Qwen3.5: ``"bbox_2d"`` on ``0..1000``.
- Gemma 4: ``"box_2d": [y1, x1, y2, x2]`` on ``0..1000``: **y first**, as Google's detection answers write it.
- GLM-4.1V/4.5V/4.6V: four integers on ``0..1000`` in any of the bracket styles the GLM-V README lists
  (``[]``, ``[[]]``, ``()``, ``<>``); InternVL: ``[[x1, y1, x2, y2]]`` on ``0..1000``.
- Generic (``--box_format generic``, and the native format of families that document none): the plain list
  ``[x1, y1, x2, y2]`` of integers on ``0..1000`` (``GENERIC_CODEC``), which the locator prompt asks for in
  words. A keyed answer is read by its key's documented order (``"box_2d"`` y-first, ``"bbox_2d"`` x-first),
  and four decimals in ``[0, 1]`` as normalised coordinates (the LLaVA lineage writes those).

Ambiguity is a parse failure, never a guess: a y-first answer is never read as x-first, and a codec that
needs a key (the axis order) refuses four bare numbers.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

_NUMBER = r"-?\d+(?:\.\d+)?"
_N = rf"\s*({_NUMBER})\s*"
_FOUR = rf"{_N},{_N},{_N},{_N}"
_PAIR_RE = re.compile(rf"\({_N},{_N}\)\s*,\s*\({_N},{_N}\)")
_BRACKETS = {"[": "]", "(": ")", "<": ">"}


@dataclass(frozen=True)
class BoxReading:
    """What a codec read: a normalised box, or ``None`` and why not."""

    box: list[float] | None
    reason: str | None = None


def _keyed_re(key: str) -> re.Pattern:
    """``"key": [a, b, c, d]`` (JSON, or a Python dict's single quotes)."""
    return re.compile(rf"""["']{re.escape(key)}["']\s*:\s*\[{_FOUR}\]""")


class BoxCodec(ABC):
    """Writes a normalised box as model text and reads it back.

    A codec is a text ``template`` with four slots in the order the family writes them (``order``), and the
    integer range of each axis (a fixed grid, or the pixels of the model's input frame).
    """

    template: str
    order: str = "xyxy"  # "yxyx": the family writes [y1, x1, y2, x2]
    integers_only: bool = True  # decimals are a parse failure (the families' grids are integer)
    # How a locator prompt asks for this format (families whose prompt names the format use it).
    request: str = "Answer with its bounding box."

    @abstractmethod
    def axis_scales(self, frame: tuple[int, int]) -> tuple[int, int]:
        """The largest value of the x and y axes; ``frame`` is the (width, height) the model sees."""

    @abstractmethod
    def find(self, text: str) -> tuple[list[str], int] | str:
        """The four coordinate strings of the first box in ``text`` (in written order) and the offset where its
        text ends, or the reason there is none."""

    def box_end(self, text: str) -> int | None:
        """Where the first box's text ends in ``text`` (what a locator must have written for it to parse)."""
        found = self.find(text)
        return None if isinstance(found, str) else found[1]

    def format(self, box_norm: Sequence[float], frame: tuple[int, int] = (0, 0)) -> str:
        sx, sy = self.axis_scales(frame)
        x1, y1, x2, y2 = box_norm
        values = (_quantize(x1, sx), _quantize(y1, sy), _quantize(x2, sx), _quantize(y2, sy))
        if self.order == "yxyx":
            values = (values[1], values[0], values[3], values[2])
        return self.template.format(*values)

    def read(self, text: str, frame: tuple[int, int] = (0, 0)) -> BoxReading:
        """The first box in ``text`` as a normalised box, or ``BoxReading(None, reason)``."""
        found = self.find(text)
        if isinstance(found, str):
            return BoxReading(None, found)
        found = found[0]
        if self.integers_only and any("." in v for v in found):
            return BoxReading(None, f"decimal coordinates {found}: this format writes integers")
        a, b, c, d = (float(v) for v in found)
        x1, y1, x2, y2 = (b, a, d, c) if self.order == "yxyx" else (a, b, c, d)
        return _in_frame((x1, y1, x2, y2), self.axis_scales(frame))

    def parse(self, text: str, frame: tuple[int, int] = (0, 0)) -> list[float] | None:
        """The first box in ``text`` as a normalised box, or ``None`` if there is no well-formed one in range."""
        return self.read(text, frame).box


def _in_frame(xyxy: Sequence[float], scales: tuple[int, int]) -> BoxReading:
    sx, sy = scales
    x1, y1, x2, y2 = xyxy
    if not (0 <= x1 <= sx and 0 <= x2 <= sx and 0 <= y1 <= sy and 0 <= y2 <= sy):
        return BoxReading(None, f"coordinates {[x1, y1, x2, y2]} outside 0..{sx} (x) / 0..{sy} (y)")
    return BoxReading([x1 / sx, y1 / sy, x2 / sx, y2 / sy])


def _quantize(v: float, scale: int) -> int:
    return int(min(max(round(float(v) * scale), 0), scale))


class PairGridCodec(BoxCodec):
    """``(x1,y1),(x2,y2)`` with integers on a ``0..scale`` grid (Qwen-VL, Qwen2-VL)."""

    template = "({},{}),({},{})"

    def __init__(self, scale: int):
        self.scale = scale

    def axis_scales(self, frame):
        return self.scale, self.scale

    def find(self, text):
        match = _PAIR_RE.search(text)
        return (list(match.groups()), match.end()) if match else "no (x1,y1),(x2,y2) pair of corners"


class JsonBoxCodec(BoxCodec):
    """``{"KEY": [a, b, c, d]}`` on a ``0..scale`` grid, or in pixels of the model's input frame (``scale=None``).

    The key is found anywhere in the answer, so the released forms all read: a bare object, a list of
    objects with labels, a fenced ````json`` block. The first box is the answer (as Qwen's own grounding
    evaluation reads it). A box under the other vendor's key is refused by name: ``"box_2d"`` is y-first,
    ``"bbox_2d"`` x-first, and reading one as the other would silently transpose the box."""

    def __init__(self, key: str = "bbox_2d", order: str = "xyxy", scale: int | None = 1000):
        self.key, self.order, self.scale = key, order, scale
        self.template = f'{{{{"{key}": [{{}}, {{}}, {{}}, {{}}]}}}}'
        self.pattern = _keyed_re(key)
        self.integers_only = False  # Qwen2.5-VL pixel answers and other releases may write decimals
        self.request = "Output its bbox_2d in JSON." if key == "bbox_2d" else f"Output its {key} in JSON."

    def axis_scales(self, frame):
        return frame if self.scale is None else (self.scale, self.scale)

    def find(self, text):
        match = self.pattern.search(text)
        if match:
            return list(match.groups()), match.end()
        other = "box_2d" if self.key == "bbox_2d" else "bbox_2d"
        if _keyed_re(other).search(text):
            return f'the answer holds "{other}" (another axis order), not "{self.key}"'
        return f'no "{self.key}": [four numbers]'


class JsonGridCodec(JsonBoxCodec):
    """``{"bbox_2d": [x1, y1, x2, y2]}`` on a ``0..scale`` grid (Qwen3-VL, Qwen3.5)."""

    def __init__(self, scale: int = 1000):
        super().__init__("bbox_2d", "xyxy", scale)


class JsonPixelCodec(JsonBoxCodec):
    """``{"bbox_2d": [x1, y1, x2, y2]}`` in absolute pixels of the resized model input (Qwen2.5-VL).

    ``frame`` must be the (width, height) the image processor resized the image to; the normalised box is
    the same whatever the original image size."""

    def __init__(self):
        super().__init__("bbox_2d", "xyxy", None)


class BracketListCodec(BoxCodec):
    """Four integers on a ``0..scale`` grid inside brackets: ``[[x1, y1, x2, y2]]`` by default.

    ``styles`` are the bracketings that read (outer nesting allowed, e.g. ``[[...]]`` and ``[...]``); of a
    list of boxes the first is the answer."""

    def __init__(self, scale: int = 1000, template: str = "[[{}, {}, {}, {}]]", styles: str = "["):
        self.scale, self.template, self.styles = scale, template, styles
        opening = "".join(re.escape(s) for s in styles)
        self.pattern = re.compile(rf"([{opening}]){_FOUR}([\]\)>])")

    def axis_scales(self, frame):
        return self.scale, self.scale

    def find(self, text):
        for match in self.pattern.finditer(text):
            if _BRACKETS[match.group(1)] == match.group(6):
                return list(match.groups()[1:5]), match.end()
        allowed = " ".join(f"{s}...{_BRACKETS[s]}" for s in self.styles)
        return f"no four numbers in {allowed}"


class GenericCodec(BracketListCodec):
    """The generic format ``[x1, y1, x2, y2]`` on ``0..scale``: what families without a documented grounding
    format are asked for, and learn from the locator's pseudo-labels (``--box_format generic``).

    Other forms a pre-trained model may still write read only where their order is known: a ``"box_2d"`` key
    (Google's y-first convention), a ``"bbox_2d"`` key (Qwen's x-first), four decimals in ``[0, 1]``
    (normalised, as the LLaVA lineage writes them)."""

    def __init__(self, scale: int = 1000):
        super().__init__(scale, "[{}, {}, {}, {}]", "[")
        self.request = f"Answer with its box as [x1, y1, x2, y2], integers from 0 to {scale}."
        self._keyed = (JsonBoxCodec("box_2d", "yxyx", scale), JsonBoxCodec("bbox_2d", "xyxy", scale))

    def read(self, text, frame=(0, 0)):
        for keyed in self._keyed:
            if keyed.pattern.search(text):
                return keyed.read(text, frame)
        found = self.find(text)
        found = [] if isinstance(found, str) else found[0]
        if found and any("." in v for v in found):
            values = [float(v) for v in found]
            if all(0.0 <= v <= 1.0 for v in values):
                return _in_frame(values, (1, 1))
            return BoxReading(None, f"decimal coordinates {found} above 1: neither normalised nor the 0..{self.scale} grid")
        return super().read(text, frame)


GENERIC_CODEC = GenericCodec(1000)
BOX_FORMATS = ("native", "generic")


def select_codec(native: BoxCodec, box_format: str) -> BoxCodec:
    """The codec an adapter uses: its family's own (``native``) or the generic one."""
    if box_format == "native":
        return native
    if box_format == "generic":
        return GENERIC_CODEC
    raise ValueError(f"box_format must be one of {BOX_FORMATS}, got {box_format!r}")
