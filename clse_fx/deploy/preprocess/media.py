"""Reading images and videos from files for ``clse-run`` and the server: pillow only. A video is a folder of
frame images (sorted by name) or an animated image file pillow reads (GIF, animated WebP/PNG); a bundle's
compiled frame count is sampled from it uniformly. Other containers (MP4, ...) need a decoder pillow lacks:
extract frames first (e.g. ``ffmpeg -i clip.mp4 frames/%04d.png``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageSequence, UnidentifiedImageError

FRAME_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif"}
SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}  # 16-bit grayscale PNG opens as one of these
# The only formats pillow is asked to decode, each by its own in-process decoder. Pillow's other plugins include
# EPS and PDF, which hand the file to Ghostscript when one is installed, and dozens of rarely used decoders: a file
# in any other format is refused before a decoder sees it.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
# What those decoders name the images they open: pillow's JPEG opener names a camera's JPEG that carries a
# multi-picture index MPO.
OPENED_FORMATS = (*IMAGE_FORMATS, "MPO")
FORMATS_HINT = "send PNG, JPEG, WebP, GIF or BMP"


@dataclass(frozen=True)
class ImageLimits:
    """What an accepted image may measure, checked from its header before it is decoded or resized (the same
    defaults in ``clse-run``, ``Engine`` and ``clse-serve``): a 48 KB PNG can claim 20000x20000 pixels, and a
    105-byte 50000x1 one took 2.1 GB to resize. At the defaults an accepted image costs at most ~200 MB."""

    max_pixels: int = 4096 * 4096
    max_side: int = 8192
    max_aspect_ratio: float = 20.0


DEFAULT_LIMITS = ImageLimits()


class ImageTooLarge(ValueError):
    """An image past the size limits (HTTP 413 in the server)."""


def check_image_size(width: int, height: int, limits: ImageLimits = DEFAULT_LIMITS) -> None:
    """A one-line ValueError when a ``width`` x ``height`` image is empty, :class:`ImageTooLarge` past ``limits``."""
    if width < 1 or height < 1:
        raise ValueError(f"the image is {width}x{height}: empty; send a real image")
    if max(width, height) > limits.max_side:
        raise ImageTooLarge(f"the image is {width}x{height}, over the {limits.max_side}-pixel side limit; downscale it")
    if width * height > limits.max_pixels:
        raise ImageTooLarge(f"the image has more than the {limits.max_pixels} pixels allowed; downscale it")
    if max(width, height) / min(width, height) > limits.max_aspect_ratio:
        raise ImageTooLarge(
            f"the image is {width}x{height}, past the {limits.max_aspect_ratio:g}:1 aspect ratio limit; crop it"
        )


def check_image(image: object, limits: ImageLimits = DEFAULT_LIMITS) -> None:
    """A TypeError naming what is expected when ``image`` is not a PIL image; a ValueError when it was opened from a
    file of a format outside :data:`IMAGE_FORMATS` (an EPS image would run Ghostscript when its pixels are read);
    its size by :func:`check_image_size`."""
    if not isinstance(image, Image.Image):
        raise TypeError(
            f"images must be PIL images (a video: a list of them), got {type(image).__name__}; open files with "
            "clse_fx.deploy.preprocess.media.load_image"
        )
    if image.format is not None and image.format not in OPENED_FORMATS:
        raise ValueError(f"{image.format} images are not accepted; {FORMATS_HINT}")
    check_image_size(image.width, image.height, limits)


def as_rgb(image: Image.Image) -> Image.Image:
    """``image`` in 8-bit RGB: 16-bit grayscale scaled to 8 bits (pillow's own conversion clips it to white),
    other modes by pillow; floating-point images are refused in one line (their range is unknown)."""
    if image.mode in SIXTEEN_BIT_MODES:
        values = np.asarray(image, dtype=np.float64)
        return Image.fromarray(np.clip(np.round(values / 257), 0, 255).astype(np.uint8), "L").convert("RGB")
    if image.mode == "F":
        raise ValueError("floating-point (mode F) images are not supported; save the image with 8 or 16 bits")
    return image if image.mode == "RGB" else image.convert("RGB")  # pillow's convert would copy an RGB image


class UnacceptedFormat(ValueError):
    """Data that is not an image in one of :data:`IMAGE_FORMATS` (HTTP 415 in the server)."""


def open_image(source: str | Path | BinaryIO, limits: ImageLimits = DEFAULT_LIMITS) -> Image.Image:
    """An image from a file path or a binary stream in one of :data:`IMAGE_FORMATS`, its size checked against
    ``limits`` from the header before decoding (``check_image_size``); other formats (:class:`UnacceptedFormat`),
    decompression bombs and unreadable data are one-line ValueErrors."""
    try:
        with _open(source) as image:
            check_image_size(image.width, image.height, limits)
            image.load()
            return image
    except Image.DecompressionBombError as error:
        raise ImageTooLarge(f"the image has more than the {limits.max_pixels} pixels allowed; downscale it") from error


def _open(source: str | Path | BinaryIO) -> Image.Image:
    """``Image.open`` trying only the accepted formats' decoders."""
    try:
        return Image.open(source, formats=IMAGE_FORMATS)
    except UnidentifiedImageError as error:  # its text names pillow's plugins or our in-memory buffer: say it plainly
        raise UnacceptedFormat(f"not an image in an accepted format; {FORMATS_HINT}") from error


def load_image(path: str | Path, limits: ImageLimits = DEFAULT_LIMITS) -> Image.Image:
    """One image file, decoded; a missing, unreadable or oversized file is a one-line ValueError."""
    try:
        return open_image(path, limits)
    except (FileNotFoundError, IsADirectoryError, OSError, ValueError) as error:
        raise ValueError(f"cannot read image {path}: {error}") from error


def sample_indices(total: int, frames: int) -> list[int]:
    """``frames`` indices spread evenly over ``total`` frames, first and last included."""
    return np.linspace(0, total - 1, frames).round().astype(int).tolist()


def load_video(path: str | Path, frames: int, limits: ImageLimits = DEFAULT_LIMITS) -> list[Image.Image]:
    """``frames`` RGB frames sampled uniformly from a folder of frame images or an animated image file."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in FRAME_SUFFIXES)
        if not files:
            raise ValueError(f"video folder {path} holds no frame images ({', '.join(sorted(FRAME_SUFFIXES))})")
        return [as_rgb(load_image(files[i], limits)) for i in sample_indices(len(files), frames)]
    try:
        with _open(path) as video:
            check_image_size(video.width, video.height, limits)
            decoded = [frame.convert("RGB") for frame in ImageSequence.Iterator(video)]
    except (FileNotFoundError, UnacceptedFormat, OSError) as error:
        raise ValueError(
            f"cannot read video {path}: {error}; give a folder of frames or an animated GIF/WebP/PNG "
            "(extract an MP4's frames with ffmpeg first)"
        ) from error
    return [decoded[i] for i in sample_indices(len(decoded), frames)]
