"""Opening an image: the one home of the conversion to RGB, shared by training (the pre-step-0 check and every
drawn sample), evaluation, the cycle pictures and the Objects365 converter, so one file is one image everywhere.

Rules (``load_rgb``): the file is decoded fully (a truncated file fails here, not inside a processor); EXIF
orientation is applied; 16-bit and 32-bit integer grayscale is scaled from 0..65535 to 0..255 (not clipped), float
images are read as 0..1; palette images expand through their palette; alpha (RGBA, LA, palette transparency) is
composited over white; CMYK, grayscale and every other mode are converted to RGB by PIL.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageOps


def _to_8bit(image: Image.Image) -> Image.Image:
    """High-bit-depth grayscale scaled (not clipped) into 8 bits."""
    array = np.asarray(image)
    if image.mode == "F":
        scaled = np.clip(array, 0.0, 1.0) * 255.0
    else:
        scaled = np.clip(array.astype(np.float64), 0, 65535) / 257.0
    return Image.fromarray(np.round(scaled).astype(np.uint8))


def load_rgb(path: str | io.BytesIO) -> Image.Image:
    """Decode an image (a path, or its bytes) fully and convert it to RGB by the rules in the module docstring."""
    with Image.open(path) as opened:
        opened.load()  # decode everything now: a truncated file fails here, not inside the processor
        image = ImageOps.exif_transpose(opened)
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        image = _to_8bit(image)
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def displayed_size(path: str) -> tuple[int, int]:
    """``(width, height)`` of the image at ``path`` as :func:`load_rgb` returns it (EXIF orientations 5-8, which
    ``exif_transpose`` turns a quarter, swap the stored sides), from the file's header: nothing is decoded."""
    with Image.open(path) as opened:
        width, height = opened.size
        turned = opened.getexif().get(0x0112) in (5, 6, 7, 8)  # the Orientation tag
    return (height, width) if turned else (width, height)


def image_problem(path: str, size_problem: Callable[[int, int], str | None] | None = None) -> str | None:
    """Why the image at ``path`` cannot be trained on (missing, empty, undecodable, bad size), or None."""
    return checked_image(path, size_problem, digest=False)[0]


def checked_image(path: str, size_problem: Callable[[int, int], str | None] | None = None, digest: bool = True
                  ) -> tuple[str | None, str | None]:
    """(why the image at ``path`` cannot be trained on, or None; the SHA-256 of its bytes where it can and ``digest``),
    from one read of the file: the digest is what a resume compares to tell another image under the same name."""
    if os.path.isdir(path):
        return "image path is a folder, not a file", None
    if not os.path.isfile(path):
        return "image not found", None
    if os.path.getsize(path) == 0:
        return "image file is empty (0 bytes)", None
    try:
        with open(path, "rb") as f:
            data = f.read()
        image = load_rgb(io.BytesIO(data))
    except Exception as e:  # noqa: BLE001 - PIL raises many types for undecodable files; all are this reason
        return f"image cannot be decoded ({type(e).__name__}: {str(e)[:80]})", None
    problem = size_problem(*image.size) if size_problem is not None else None
    return problem, None if problem or not digest else hashlib.sha256(data).hexdigest()
