"""The ``clip`` pixel recipe: resize (shortest edge, or to a fixed size), centre crop, rescale, normalise; one
[3, H, W] image per item (LLaVA-1.5, Video-LLaVA), or per frame of a video item ([T, 3, H, W]; Video-LLaVA,
LLaVA-NeXT-Video and LLaVA-OneVision videos, the last with SigLIP's fixed-size resize and no crop)."""

from __future__ import annotations

import numpy as np

from clse_fx.deploy.preprocess import pixel_recipe
from clse_fx.deploy.preprocess.ops import center_crop, rescale_normalize, resize, shortest_edge_size, to_rgb_array


def clip_image(image, params: dict) -> np.ndarray:
    """One PIL image -> float32 [3, H, W] under the recipe's ``params``."""
    return clip_array(to_rgb_array(image), params)


def clip_array(array: np.ndarray, params: dict) -> np.ndarray:
    """uint8 [3, H, W] -> float32 [3, H, W]: resize, centre crop, rescale, normalise as ``params`` say."""
    if params["do_resize"]:
        size = params["size"]
        if "shortest_edge" in size:
            height, width = shortest_edge_size(*array.shape[-2:], size["shortest_edge"])
        else:
            height, width = size["height"], size["width"]
        array = resize(array, height, width, params["resample"])
    if params["do_center_crop"]:
        array = center_crop(array, params["crop_size"]["height"], params["crop_size"]["width"])
    return rescale_normalize(array, params)


@pixel_recipe("clip")
def clip_pixels(params: dict, items: list) -> dict[str, np.ndarray]:
    """The items stacked on the batch axis of ``params["output"]``: images as [N, 3, H, W], videos (lists of
    frames) as [N, T, 3, H, W]."""
    if params.get("video"):
        pixels = np.stack([np.stack([clip_image(frame, params) for frame in frames]) for frames in items])
    else:
        pixels = np.stack([clip_image(image, params) for image in items])
    return {params["output"]: pixels}
