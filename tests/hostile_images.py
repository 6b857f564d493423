"""Image files of every colour mode and every kind of damage, for the hostile-data tests."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("red circle", "blå", "plain")  # a space and a non-ASCII letter


BIG = (6400, 6400)  # about 41 megapixels: a real photo's size, which must be used


def _noise(size: tuple[int, int] = (64, 64), seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8))


def _palette(colour, transparent: bool) -> Image.Image:
    image = Image.new("P", (10, 6), 1)
    image.putpalette([200, 0, 0, *colour])  # index 0: red, index 1: the colour
    if transparent:
        image = Image.new("P", (10, 6), 0)
        image.putpalette([200, 0, 0, *colour])
        image.info["transparency"] = 0  # every pixel is transparent red: composited onto white
    return image


def _sixteen_bit(value: int) -> Image.Image:
    return Image.fromarray(np.full((6, 9), value, dtype=np.uint16))  # mode I;16


# Good images: (file name, writer(colour) -> (PIL image, format), expected RGB after decoding, tolerance).
# `c` is a per-image RGB colour; every image is uniform so its decoded mean is known.
def _good_kinds(c: tuple[int, int, int]) -> list[tuple[str, Image.Image, str, tuple[int, int, int], float]]:
    grey = c[1]
    return [
        ("rgb.png", Image.new("RGB", (12, 9), c), "PNG", c, 0),
        ("photo ø.jpg", Image.new("RGB", (20, 16), c), "JPEG", c, 6),
        ("grey.png", Image.new("L", (7, 7), grey), "PNG", (grey,) * 3, 0),
        ("one bit.png", Image.new("1", (9, 9), 1), "PNG", (255, 255, 255), 0),
        ("palette.png", _palette(c, transparent=False), "PNG", c, 0),
        ("palette transparent.png", _palette(c, transparent=True), "PNG", (255, 255, 255), 0),
        ("rgba clear.png", Image.new("RGBA", (8, 8), (10, 20, 30, 0)), "PNG", (255, 255, 255), 0),
        ("rgba opaque.png", Image.new("RGBA", (8, 8), (*c, 255)), "PNG", c, 0),
        ("cmyk.tif", Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "TIFF", (255, 0, 0), 0),
        ("cmyk.jpg", Image.new("CMYK", (16, 16), (255, 0, 255, 0)), "JPEG", (0, 255, 0), 8),
        ("sixteen bit.png", _sixteen_bit(32768), "PNG", (128, 128, 128), 1),  # mid-grey, not white
        ("grey alpha.png", Image.new("LA", (8, 8), (grey, 255)), "PNG", (grey,) * 3, 0),
        ("tiny 1x1.png", Image.new("RGB", (1, 1), c), "PNG", c, 0),
    ]


def _colour(label: int, i: int) -> tuple[int, int, int]:
    return (40 + 60 * label, 30 + 15 * i, 200 - 10 * i)


def _write_good(folder: Path, label: int, count: int, start: int, expected: dict[str, tuple]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + count):
        kinds = _good_kinds(_colour(label, i))
        name, image, fmt, rgb, tolerance = kinds[i % len(kinds)]
        path = folder / f"{i:02d} {name}"
        image.save(path, fmt)
        expected[str(path)] = (rgb, tolerance)


def _jpeg_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()
