"""LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``): images as LLaVA-NeXT's (base grid plus a tiled grid
with row newlines), the tiled grid shrunk to at most ``anyres_max_N`` tiles' worth of tokens; videos as frames of
2x-pooled grids followed by one newline token. One image or one video per prompt."""

from __future__ import annotations

import math

import torch

from clse_fx.models.base import Family, register_family
from clse_fx.models.llava import fixed_resolution
from clse_fx.models.llava_next import LlavaNextAdapter, LlavaNextDeploy, LlavaNextExamples
from clse_fx.models.recipes import video_pixels
from clse_fx.plan import Layout


class LlavaOnevisionAdapter(LlavaNextAdapter):
    graph_inputs = ("pixel_values", "pixel_values_videos")

    def visual_token_ids(self) -> tuple[int, ...]:
        return (self.model.config.image_token_id, self.model.config.video_token_id)

    def fit_tiled(self, height: int, width: int) -> tuple[int, int]:
        # transformers' rule: shrink (bilinear) to about N tiles' worth when over 1.1x that.
        max_tiles = int(self.model.config.vision_aspect_ratio.removeprefix("anyres_max_"))
        ratio = math.sqrt(height * width / (max_tiles * self.side() ** 2))
        return (int(height // ratio), int(width // ratio)) if ratio > 1.1 else (height, width)

    def tokens_per_frame(self, image_size: tuple[int, int] | None = None) -> int:
        fixed_resolution(self.model, image_size)
        return self.pooled_side() ** 2

    def pooled_side(self) -> int:
        """Side of a video frame's grid after the 2x bilinear pooling."""
        return math.ceil(self.side() / 2)

    def visual_layout(self, num_visual: int, **inputs: torch.Tensor) -> Layout:
        if self.modality(inputs) != "video":
            return super().visual_layout(num_visual, **inputs)
        frames, side = inputs["pixel_values_videos"].shape[1], self.pooled_side()
        if num_visual != frames * side * side + 1:
            raise ValueError(f"{num_visual} video tokens, but {frames} frames make {frames * side * side + 1}")
        return (("grid", frames, side, side), ("extra", 1))


class LlavaOnevisionExamples(LlavaNextExamples):
    def example_inputs(self, batch, text_len, images, generator, frames=1, image_size=None):
        if images != 1:
            raise ValueError("LLaVA-OneVision bundles take one image or one video per prompt; use --images 1")
        if frames == 1:
            return super().example_inputs(batch, text_len, images, generator, frames, image_size)
        size, tokens = fixed_resolution(self.model, image_size), frames * self.adapter.tokens_per_frame() + 1
        return self.video_example(batch, text_len, tokens, frames, size, generator)


class LlavaOnevisionDeploy(LlavaNextDeploy):
    def compiled_geometry(self, inputs: dict[str, torch.Tensor]) -> dict:
        if self.adapter.modality(inputs) != "video":
            return {"modality": "image", **super().compiled_geometry(inputs)}
        size = self.model.config.vision_config.image_size
        return {"modality": "video", "image_size": [size, size], "frames": inputs["pixel_values_videos"].shape[1]}

    def pixel_recipe(self, processor, modality: str, inputs: dict[str, torch.Tensor]) -> dict | None:
        if modality == "video":
            return video_pixels(processor)
        return super().pixel_recipe(processor, modality, inputs)


register_family(
    Family(
        ("LlavaOnevisionForConditionalGeneration",), LlavaOnevisionAdapter, LlavaOnevisionExamples, LlavaOnevisionDeploy
    )
)
