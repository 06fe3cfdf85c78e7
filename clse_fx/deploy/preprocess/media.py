"""Reading images and videos from files for ``clse-run`` and the server: pillow only. A video is a folder of
frame images (sorted by name) or an animated image file pillow reads (GIF, animated WebP/PNG); a bundle's
compiled frame count is sampled from it uniformly. Other containers (MP4, ...) need a decoder pillow lacks:
extract frames first (e.g. ``ffmpeg -i clip.mp4 frames/%04d.png``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageSequence, UnidentifiedImageError

FRAME_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def load_image(path: str | Path) -> Image.Image:
    """One image file, decoded; a missing or unreadable file is a one-line ValueError."""
    try:
        with Image.open(path) as image:
            image.load()
            return image
    except (FileNotFoundError, IsADirectoryError, UnidentifiedImageError, OSError) as error:
        raise ValueError(f"cannot read image {path}: {error}") from error


def sample_indices(total: int, frames: int) -> list[int]:
    """``frames`` indices spread evenly over ``total`` frames, first and last included."""
    return np.linspace(0, total - 1, frames).round().astype(int).tolist()


def load_video(path: str | Path, frames: int) -> list[Image.Image]:
    """``frames`` RGB frames sampled uniformly from a folder of frame images or an animated image file."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in FRAME_SUFFIXES)
        if not files:
            raise ValueError(f"video folder {path} holds no frame images ({', '.join(sorted(FRAME_SUFFIXES))})")
        return [load_image(files[i]).convert("RGB") for i in sample_indices(len(files), frames)]
    try:
        with Image.open(path) as video:
            decoded = [frame.convert("RGB") for frame in ImageSequence.Iterator(video)]
    except (FileNotFoundError, UnidentifiedImageError, OSError) as error:
        raise ValueError(
            f"cannot read video {path}: {error}; give a folder of frames or an animated GIF/WebP "
            "(extract an MP4's frames with ffmpeg first)"
        ) from error
    return [decoded[i] for i in sample_indices(len(decoded), frames)]
