"""Images are checked before they cost memory: sizes from the header against limits (clse-run, Engine and
clse-serve share the defaults), decompression bombs refused in one line, 16-bit images scaled (not clipped to
white), and anything that is not an image a TypeError naming what is expected."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from clse_fx.deploy.engine import Engine
from clse_fx.deploy.preprocess.media import DEFAULT_LIMITS, ImageLimits, as_rgb, check_image, load_image, load_video
from clse_fx.deploy.serve import Limits, RequestError, _decode_image


def png_header(width: int, height: int, mode: int = 3) -> bytes:
    """A PNG that claims ``width`` x ``height`` (colour type ``mode``; 3: paletted) and holds no pixel data: what a
    decompression bomb's header says, at no cost to this test."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, mode, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    ("width", "height", "message"),
    [
        (20000, 20000, "pixels allowed"),  # pillow's own bomb check answers first
        (50000, 1, "over the 8192-pixel side limit"),
        (8000, 8000, f"more than the {DEFAULT_LIMITS.max_pixels} pixels allowed"),
        (4000, 100, "past the 20:1 aspect ratio limit"),
    ],
)
def test_oversized_images_are_refused_from_the_header(tmp_path, width, height, message):
    path = tmp_path / "big.png"
    path.write_bytes(png_header(width, height))
    with pytest.raises(ValueError, match=message) as error:
        load_image(path)
    assert "\n" not in str(error.value)
    with pytest.raises(RequestError, match=message) as refused:
        _decode_image(path.read_bytes(), Limits())
    assert refused.value.status == 413


def test_limits_are_configurable(tmp_path):
    path = tmp_path / "wide.png"
    Image.new("RGB", (300, 10)).save(path)
    with pytest.raises(ValueError, match="aspect ratio"):
        load_image(path)
    assert load_image(path, ImageLimits(max_aspect_ratio=40)).size == (300, 10)


def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path):
    path = tmp_path / "gray16.png"
    Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16)).save(path)
    image = load_image(path)
    assert image.mode in {"I", "I;16"} and image.convert("RGB").getpixel((0, 0)) == (255, 255, 255)  # pillow clips
    assert as_rgb(image).getpixel((0, 0)) == (128, 128, 128)
    with pytest.raises(ValueError, match="mode F"):
        as_rgb(Image.new("F", (4, 4)))


def test_engine_refuses_what_is_not_an_image(cli_bundle):
    engine = Engine.load(cli_bundle[0])
    for item in (np.zeros((3, 20, 20), np.uint8), None, "cat.png"):
        with pytest.raises(TypeError, match=f"images must be PIL images .*got {type(item).__name__}"):
            engine.generate([item], ["what"], 2)
    with pytest.raises(ValueError, match="the image is 0x0: empty"):
        engine.generate([Image.new("RGB", (0, 0))], ["what"], 2)
    engine.image_limits = ImageLimits(max_side=16)
    with pytest.raises(ValueError, match="over the 16-pixel side limit"):
        engine.generate([Image.new("RGB", (20, 20))], ["what"], 2)


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\nnewpath 0 0 moveto 16 16 lineto stroke\nshowpage\n%%EOF\n"


@pytest.mark.parametrize(
    ("name", "write"),
    [
        ("figure.eps", lambda path: path.write_bytes(EPS)),  # pillow would run Ghostscript to read its pixels
        ("scan.tiff", lambda path: Image.new("RGB", (16, 16)).save(path)),
        ("icon.ico", lambda path: Image.new("RGB", (16, 16)).save(path)),
    ],
)
def test_only_the_listed_formats_are_decoded(tmp_path, monkeypatch, name, write):
    """EPS, TIFF, ICO... are refused in one line before any decoder runs (no Ghostscript is started: PATH is
    empty), by clse-run's loader, the server's decoder and, for an image opened elsewhere, the Engine's check."""
    monkeypatch.setenv("PATH", "")
    path = tmp_path / name
    write(path)
    with pytest.raises(ValueError, match="not an image in an accepted format; send PNG, JPEG, WebP, GIF or BMP"):
        load_image(path)
    with pytest.raises(ValueError, match="cannot read video .*not an image in an accepted format"):
        load_video(path, 2)
    with pytest.raises(RequestError, match="not an image in an accepted format") as caught:
        _decode_image(path.read_bytes(), Limits())
    assert caught.value.status == 415
    with Image.open(path) as opened:  # a caller's own Image.open: refused before its pixels are read
        with pytest.raises(ValueError, match=f"{opened.format} images are not accepted; send PNG"):
            check_image(opened)
    for image in (Image.new("RGB", (16, 16)), Image.new("L", (16, 16))):  # made in memory: no format to check
        check_image(image)
