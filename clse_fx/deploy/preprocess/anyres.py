"""The ``anyres`` pixel recipe: LLaVA-NeXT's and LLaVA-OneVision's any-resolution images, as their transformers
image processors' PIL backend computes them. Per image: the grid pinpoint that best fits its size is chosen, the
image resized into it keeping its aspect ratio (the longer fitted side exact, the other rounded up) and
zero-padded to it (centred), the result cut into tower-sized tiles (row by row); the whole image resized to
one tile comes first. Each tile is then resized, centre cropped, rescaled and normalised as the ``clip`` recipe
does (``params["size"]``, ``params["crop_size"]``), giving ``pixel_values`` [N, tiles, 3, H, W] and
``image_sizes`` [N, 2].

A bundle is compiled for one image size (``params["image_size"]``, the manifest geometry's): the tile layout,
hence the visual-token count and the graph, depend on it. An image of another size is therefore first resized
to the compiled size (with the recipe's resampling filter, aspect ratio not kept), then processed as above; the
processor given the same resized image gives the same pixels."""

from __future__ import annotations

import math

import numpy as np

from clse_fx.deploy.preprocess import pixel_recipe
from clse_fx.deploy.preprocess.clip import clip_array
from clse_fx.deploy.preprocess.ops import resize, rgb_array_at


def select_best_resolution(height: int, width: int, pinpoints: list[list[int]]) -> tuple[int, int]:
    """The (height, width) pinpoint keeping the most of the image's resolution, then wasting the least."""
    best, most, least = None, 0, math.inf
    for pin_height, pin_width in pinpoints:
        scale = min(pin_width / width, pin_height / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = pin_width * pin_height - effective
        if effective > most or (effective == most and wasted < least):
            best, most, least = (pin_height, pin_width), effective, wasted
    return best


def fitted_size(height: int, width: int, target: tuple[int, int]) -> tuple[int, int]:
    """The image's size resized into ``target`` keeping its aspect ratio (the other side rounded up)."""
    target_height, target_width = target
    scale_w, scale_h = target_width / width, target_height / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), target_height), target_width
    return target_height, min(math.ceil(width * scale_h), target_width)


def image_tiles(array: np.ndarray, params: dict) -> list[np.ndarray]:
    """uint8 [3, H, W] -> the base image and the tiles, uint8, before the per-tile resize/crop/normalise."""
    height, width = array.shape[-2:]
    target = select_best_resolution(height, width, params["image_grid_pinpoints"])
    new_height, new_width = fitted_size(height, width, target)
    resized = resize(array, new_height, new_width, params["resample"])
    top, left = (target[0] - new_height) // 2, (target[1] - new_width) // 2
    padded = np.zeros((array.shape[0], *target), dtype=array.dtype)
    padded[:, top : top + new_height, left : left + new_width] = resized
    tile = params["tile"]
    tiles = [
        padded[:, i : i + tile, j : j + tile] for i in range(0, target[0], tile) for j in range(0, target[1], tile)
    ]
    base = resize(array, *params["base_size"], params["resample"])
    return [base, *tiles]


def anyres_image(image, params: dict) -> np.ndarray:
    """One PIL image -> float32 [tiles, 3, H, W], after resizing it to the compiled ``image_size``."""
    array = rgb_array_at(image, params["image_size"], params["resample"])
    return np.stack([clip_array(tile, params) for tile in image_tiles(array, params)])


@pixel_recipe("anyres")
def anyres_pixels(params: dict, images: list) -> dict[str, np.ndarray]:
    """The images as ``params["output"]`` [N, tiles, 3, H, W] and their sizes [N, 2] (all the compiled size)."""
    pixels = np.stack([anyres_image(image, params) for image in images])
    sizes = np.array([params["image_size"]] * len(images), dtype=np.int64)
    return {params["output"]: pixels, "image_sizes": sizes}
