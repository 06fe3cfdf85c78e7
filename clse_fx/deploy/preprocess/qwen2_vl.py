"""The ``qwen2_vl`` pixel recipe: Qwen2-VL's and Qwen2.5-VL's flattened patches, as their transformers image
processor's PIL backend computes them (its video processor runs the same steps per frame, in torch).

Per image (or video frame): RGB conversion, resize, rescale, normalise (``clip``'s operations), then patchify.
The processor resizes to ``smart_resize``'s size (multiples of patch x merge near the image's own size); a bundle
is compiled for one grid (``params["image_size"]``, the manifest geometry's), so every image is resized to the
compiled size instead (aspect ratio not kept). An image whose ``smart_resize`` size is the compiled one gets
exactly the processor's pixels, as does any image resized to the compiled size first.

Patchify: a [T, C, H, W] stack (an image is one frame; a video with a frame count that is not a multiple of
``temporal_patch_size`` repeats its last frame) becomes [T / tp * gh * gw, C * tp * p * p] rows, ordered by
temporal step, then merge block (row by row), then the ``merge_size`` x ``merge_size`` patches inside it; each row
holds a patch's channels, its ``tp`` frames and its p x p pixels. An image fills its ``tp`` frames with itself.
Every item of the batch is concatenated on the first axis (``pixel_values`` or ``pixel_values_videos``); the
grids (``image_grid_thw``) are baked into the bundle's vision graph, so they are not fed."""

from __future__ import annotations

import numpy as np

from clse_fx.deploy.preprocess import pixel_recipe
from clse_fx.deploy.preprocess.ops import rescale_normalize, rgb_array_at


def qwen_frame(image, params: dict) -> np.ndarray:
    """One PIL image (or video frame) -> float32 [3, H, W] at the compiled size, rescaled and normalised."""
    return rescale_normalize(rgb_array_at(image, params["image_size"], params["resample"]), params)


def patchify(frames: np.ndarray, patch: int, merge: int, temporal: int) -> np.ndarray:
    """float32 [T, C, H, W] -> [T / temporal * (H / patch) * (W / patch), C * temporal * patch * patch], in the
    processors' order (see the module docstring)."""
    if pad := -len(frames) % temporal:
        frames = np.concatenate([frames, np.repeat(frames[-1:], pad, axis=0)])
    steps, channels, height, width = frames.shape
    grid_h, grid_w = height // patch, width // patch
    patches = frames.reshape(
        steps // temporal, temporal, channels, grid_h // merge, merge, patch, grid_w // merge, merge, patch
    )
    # (t, gh/m, gw/m, mh, mw, C, tp, ph, pw)
    patches = patches.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return patches.reshape(steps // temporal * grid_h * grid_w, channels * temporal * patch * patch)


def qwen_item(item, params: dict) -> np.ndarray:
    """One image, or a video's frames, -> its flattened patches."""
    frames = item if params.get("video") else [item]
    stack = np.stack([qwen_frame(frame, params) for frame in frames])
    return patchify(stack, params["patch_size"], params["merge_size"], params["temporal_patch_size"])


@pixel_recipe("qwen2_vl")
def qwen2_vl_pixels(params: dict, items: list) -> dict[str, np.ndarray]:
    """The items' patches concatenated into ``params["output"]``."""
    return {params["output"]: np.concatenate([qwen_item(item, params) for item in items])}
