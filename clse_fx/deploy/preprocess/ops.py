"""The image operations of the transformers processors' PIL backend, on [C, H, W] arrays, in the same order
and arithmetic (so the results agree to float rounding): RGB conversion onto white, PIL resampling,
centre crop, rescale in float64 then float32, normalisation in float32."""

from __future__ import annotations

import numpy as np
from PIL import Image

from clse_fx.deploy.preprocess.media import as_rgb


def to_rgb_array(image: Image.Image) -> np.ndarray:
    """A PIL image -> uint8 [3, H, W]; transparency is composited onto white, as the processors do; 16-bit images
    are scaled to 8 bits (:func:`clse_fx.deploy.preprocess.media.as_rgb`)."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return np.moveaxis(np.asarray(as_rgb(image)), -1, 0)


def resize(image: np.ndarray, height: int, width: int, resample: int) -> np.ndarray:
    """uint8 [C, H, W] resized with PIL's ``resample`` filter (a PIL.Image.Resampling value)."""
    pil = Image.fromarray(np.moveaxis(image, 0, -1))
    return np.moveaxis(np.asarray(pil.resize((width, height), resample=resample)), -1, 0)


def rgb_array_at(image: Image.Image, size: list[int], resample: int) -> np.ndarray:
    """uint8 [3, H, W] at the compiled ``size`` (H, W): a bundle's graph is static, so families whose processor
    sizes each image by its own shape (any-resolution tiling, Qwen's smart resize) get it resized to the
    compiled size first, aspect ratio not kept."""
    array = to_rgb_array(image)
    height, width = size
    return array if tuple(array.shape[-2:]) == (height, width) else resize(array, height, width, resample)


def shortest_edge_size(height: int, width: int, shortest: int) -> tuple[int, int]:
    """(height, width) with the shorter side ``shortest`` and the aspect ratio kept (the longer side floored)."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(shortest * long / short)
    return (new_long, shortest) if width <= height else (shortest, new_long)


def center_crop(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """The centred [height, width] window (top and left offsets floored); a smaller image is an error here, where
    the processors would pad, since every recipe resizes to at least the crop first."""
    top, left = (image.shape[-2] - height) // 2, (image.shape[-1] - width) // 2
    if top < 0 or left < 0:
        raise ValueError(f"cannot crop {height}x{width} out of an image of {image.shape[-2]}x{image.shape[-1]}")
    return image[..., top : top + height, left : left + width]


def rescale_normalize(image: np.ndarray, params: dict) -> np.ndarray:
    """uint8 -> float32: times ``rescale_factor`` (in float64, as the processors), then (x - mean) / std."""
    out = image.astype(np.float32)
    if params["do_rescale"]:
        out = (image.astype(np.float64) * params["rescale_factor"]).astype(np.float32)
    if params["do_normalize"]:
        mean = np.array(params["image_mean"], dtype=np.float32)[:, None, None]
        std = np.array(params["image_std"], dtype=np.float32)[:, None, None]
        out = (out - mean) / std
    return out
