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
- GLM-4.1V/4.5V/4.6V (and InternVL): ``[[x1, y1, x2, y2]]`` on ``0..1000`` (``NestedListGridCodec``).
- Generic (``--box_format generic``, and the native format of families that document none): the plain
  list ``[x1, y1, x2, y2]`` of integers on ``0..1000`` (``GENERIC_CODEC``). Any family can be trained with it;
  the model then learns the format from the locator's pseudo-labels instead of relying on pre-training.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Sequence

_INT = r"\s*(-?\d+)\s*"
_PAIR_RE = re.compile(rf"\({_INT},{_INT}\)\s*,\s*\({_INT},{_INT}\)")
_JSON_RE = re.compile(rf'"bbox_2d"\s*:\s*\[{_INT},{_INT},{_INT},{_INT}\]')
_LIST_RE = re.compile(rf"\[{_INT},{_INT},{_INT},{_INT}\]")


class BoxCodec(ABC):
    """Writes a normalised box as model text and reads it back.

    A codec is a text ``template`` with four integer slots, the ``pattern`` that finds it in model output, and
    the integer range of each axis (a fixed grid, or the pixels of the model's input frame).
    """

    template: str
    pattern: re.Pattern
    # How a locator prompt asks for this format (families whose prompt names the format use it).
    request: str = "Answer with its bounding box."

    @abstractmethod
    def axis_scales(self, frame: tuple[int, int]) -> tuple[int, int]:
        """The largest integer of the x and y axes; ``frame`` is the (width, height) the model sees."""

    def format(self, box_norm: Sequence[float], frame: tuple[int, int] = (0, 0)) -> str:
        sx, sy = self.axis_scales(frame)
        x1, y1, x2, y2 = box_norm
        return self.template.format(_quantize(x1, sx), _quantize(y1, sy), _quantize(x2, sx), _quantize(y2, sy))

    def parse(self, text: str, frame: tuple[int, int] = (0, 0)) -> list[float] | None:
        """The first box in ``text`` as a normalised box, or ``None`` if there is no well-formed one in range."""
        match = self.pattern.search(text)
        if match is None:
            return None
        x1, y1, x2, y2 = (int(g) for g in match.groups())
        sx, sy = self.axis_scales(frame)
        if not (0 <= x1 <= sx and 0 <= x2 <= sx and 0 <= y1 <= sy and 0 <= y2 <= sy):
            return None
        return [x1 / sx, y1 / sy, x2 / sx, y2 / sy]


def _quantize(v: float, scale: int) -> int:
    return int(min(max(round(float(v) * scale), 0), scale))


class PairGridCodec(BoxCodec):
    """``(x1,y1),(x2,y2)`` with integers on a ``0..scale`` grid (Qwen-VL, Qwen2-VL)."""

    template = "({},{}),({},{})"
    pattern = _PAIR_RE

    def __init__(self, scale: int):
        self.scale = scale

    def axis_scales(self, frame):
        return self.scale, self.scale


class JsonGridCodec(PairGridCodec):
    """``{"bbox_2d": [x1, y1, x2, y2]}`` with integers on a ``0..scale`` grid (Qwen3-VL)."""

    template = '{{"bbox_2d": [{}, {}, {}, {}]}}'
    pattern = _JSON_RE
    request = "Output its bbox_2d in JSON."

    def __init__(self, scale: int = 1000):
        super().__init__(scale)


class JsonPixelCodec(BoxCodec):
    """``{"bbox_2d": [x1, y1, x2, y2]}`` in absolute pixels of the resized model input (Qwen2.5-VL).

    ``frame`` must be the (width, height) the image processor resized the image to; the normalised box
    is the same whatever the original image size, so rescaling back to the original is exact up to one
    pixel of the resized frame.
    """

    template = JsonGridCodec.template
    pattern = _JSON_RE
    request = JsonGridCodec.request

    def axis_scales(self, frame):
        return frame


class ListGridCodec(PairGridCodec):
    """``[x1, y1, x2, y2]`` with integers on a ``0..scale`` grid: the generic codec (``--box_format generic``)."""

    template = "[{}, {}, {}, {}]"
    pattern = _LIST_RE

    def __init__(self, scale: int = 1000):
        super().__init__(scale)
        self.request = f"Answer with its box as [x1, y1, x2, y2], integers from 0 to {scale}."


class NestedListGridCodec(PairGridCodec):
    """``[[x1, y1, x2, y2]]`` with integers on a ``0..scale`` grid: one box of a list of boxes (GLM-V)."""

    template = "[[{}, {}, {}, {}]]"
    pattern = re.compile(rf"\[\s*\[{_INT},{_INT},{_INT},{_INT}\]\s*\]")

    def __init__(self, scale: int = 1000):
        super().__init__(scale)


GENERIC_CODEC = ListGridCodec(1000)
BOX_FORMATS = ("native", "generic")


def select_codec(native: BoxCodec, box_format: str) -> BoxCodec:
    """The codec an adapter uses: its family's own (``native``) or the generic one."""
    if box_format == "native":
        return native
    if box_format == "generic":
        return GENERIC_CODEC
    raise ValueError(f"box_format must be one of {BOX_FORMATS}, got {box_format!r}")
