"""Box codecs: how each model family writes a box as text, and how that text is read back.

A codec converts between the project's box convention (normalised ``[x1, y1, x2, y2]``, see
:mod:`sc_tune.boxes`) and the text a model reads and writes. Parsing never invents a box: text that does
not hold one well-formed box in range returns ``None``, which the trainer and the evaluator count as a
parse failure (the reference silently turned it into ``[0, 0, 0, 0]``).

Quantisation policy (the one place it is stated): a normalised coordinate ``v`` is written on an integer
grid ``0..scale`` as ``round(v * scale)`` and read back as ``n / scale``.

- Qwen-VL / Qwen-VL-Chat: ``scale = 999``. The reference SC-Tune loader wrote ``int(v * 999)``; Qwen-VL's
  own grounding evaluation reads ``n / 1000``. Both keep every coordinate inside ``[0, 999]``, the range the
  model was pre-trained on; we round instead of truncating so that encode -> decode moves a coordinate by
  at most half a grid step. The difference between 999 and 1000 is at most one unit.
- Qwen2-VL and Qwen3-VL: ``scale = 1000`` (their documented relative grid).
- Qwen2.5-VL: absolute pixels of the *resized* model input (``frame``), rescaled to ``[0, 1]`` on decode.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Sequence

_INT = r"\s*(-?\d+)\s*"
_PAIR_RE = re.compile(rf"\({_INT},{_INT}\)\s*,\s*\({_INT},{_INT}\)")
_JSON_RE = re.compile(rf'"bbox_2d"\s*:\s*\[{_INT},{_INT},{_INT},{_INT}\]')


class BoxCodec(ABC):
    """Writes a normalised box as model text and reads it back."""

    @abstractmethod
    def format(self, box_norm: Sequence[float], frame: tuple[int, int]) -> str:
        """Text for ``box_norm``; ``frame`` is the (width, height) of the image the model sees."""

    @abstractmethod
    def parse(self, text: str, frame: tuple[int, int]) -> list[float] | None:
        """The first box in ``text`` as a normalised box, or ``None`` if there is no well-formed one."""


def _quantize(v: float, scale: int) -> int:
    return int(min(max(round(float(v) * scale), 0), scale))


def _in_range(values: Sequence[int], hi_x: int, hi_y: int) -> bool:
    x1, y1, x2, y2 = values
    return 0 <= x1 <= hi_x and 0 <= x2 <= hi_x and 0 <= y1 <= hi_y and 0 <= y2 <= hi_y


class PairGridCodec(BoxCodec):
    """``(x1,y1),(x2,y2)`` with integers on a ``0..scale`` grid (Qwen-VL, Qwen2-VL)."""

    def __init__(self, scale: int):
        self.scale = scale

    def format(self, box_norm, frame=(0, 0)):
        x1, y1, x2, y2 = (_quantize(v, self.scale) for v in box_norm)
        return f"({x1},{y1}),({x2},{y2})"

    def parse(self, text, frame=(0, 0)):
        match = _PAIR_RE.search(text)
        if match is None:
            return None
        values = [int(g) for g in match.groups()]
        if not _in_range(values, self.scale, self.scale):
            return None
        return [v / self.scale for v in values]


class JsonGridCodec(BoxCodec):
    """``{"bbox_2d": [x1, y1, x2, y2]}`` with integers on a ``0..scale`` grid (Qwen3-VL)."""

    def __init__(self, scale: int = 1000):
        self.scale = scale

    def format(self, box_norm, frame=(0, 0)):
        x1, y1, x2, y2 = (_quantize(v, self.scale) for v in box_norm)
        return f'{{"bbox_2d": [{x1}, {y1}, {x2}, {y2}]}}'

    def parse(self, text, frame=(0, 0)):
        match = _JSON_RE.search(text)
        if match is None:
            return None
        values = [int(g) for g in match.groups()]
        if not _in_range(values, self.scale, self.scale):
            return None
        return [v / self.scale for v in values]


class JsonPixelCodec(BoxCodec):
    """``{"bbox_2d": [x1, y1, x2, y2]}`` in absolute pixels of the resized model input (Qwen2.5-VL).

    ``frame`` must be the (width, height) the image processor resized the image to; the normalised box
    is the same whatever the original image size, so rescaling back to the original is exact up to one
    pixel of the resized frame.
    """

    def format(self, box_norm, frame):
        width, height = frame
        x1, y1, x2, y2 = box_norm
        return (
            f'{{"bbox_2d": [{_quantize(x1, width)}, {_quantize(y1, height)}, '
            f"{_quantize(x2, width)}, {_quantize(y2, height)}]}}"
        )

    def parse(self, text, frame):
        width, height = frame
        match = _JSON_RE.search(text)
        if match is None:
            return None
        x1, y1, x2, y2 = (int(g) for g in match.groups())
        if not _in_range((x1, y1, x2, y2), width, height):
            return None
        return [x1 / width, y1 / height, x2 / width, y2 / height]
