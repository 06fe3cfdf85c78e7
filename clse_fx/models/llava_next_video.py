"""LLaVA-NeXT-Video (``LlavaNextVideoForConditionalGeneration``): videos are per-frame CLIP grids pooled by the
resampler, frames stacked along T (the spectral filter runs per frame); still images are LLaVA-NeXT's
any-resolution layout (base grid plus a tiled grid with row newlines)."""

from __future__ import annotations

import torch

from clse_fx.models.base import Family, register_family
from clse_fx.models.llava import fixed_resolution
from clse_fx.models.llava_next import LlavaNextAdapter, LlavaNextDeploy, LlavaNextExamples
from clse_fx.models.recipes import video_pixels
from clse_fx.plan import Grid, Layout, grid_layout


class LlavaNextVideoAdapter(LlavaNextAdapter):
    graph_inputs = ("pixel_values", "pixel_values_videos")

    def visual_token_ids(self) -> tuple[int, ...]:
        return (self.model.config.image_token_id, self.model.config.video_token_id)

    def frame_side(self) -> int:
        """Tokens per side of one frame after the resampler's spatial pooling."""
        return self.side() // self.model.config.spatial_pool_stride

    def tokens_per_frame(self, image_size: tuple[int, int] | None = None) -> int:
        fixed_resolution(self.model, image_size)
        return self.frame_side() ** 2

    def visual_grid(self, num_visual: int, **inputs: torch.Tensor) -> Grid:
        """The (frames, H, W) grid of a video's tokens."""
        per_frame = self.tokens_per_frame()
        if num_visual % per_frame:
            raise ValueError(f"{num_visual} video tokens is not a whole number of {per_frame}-token frames")
        return (num_visual // per_frame, self.frame_side(), self.frame_side())

    def visual_layout(self, num_visual: int, **inputs: torch.Tensor) -> Layout:
        if self.modality(inputs) == "video":
            return grid_layout(*self.visual_grid(num_visual, **inputs))
        return super().visual_layout(num_visual, **inputs)


class LlavaNextVideoExamples(LlavaNextExamples):
    def example_inputs(self, batch, text_len, images, generator, frames=1, image_size=None):
        if frames == 1:
            return super().example_inputs(batch, text_len, images, generator, frames, image_size)
        if images != 1:
            raise ValueError("LLaVA-NeXT-Video bundles take one video per prompt; use --images 1 and --frames N")
        size, tokens = fixed_resolution(self.model, image_size), self.adapter.tokens_per_frame() * frames
        return self.video_example(batch, text_len, tokens, frames, size, generator)


class LlavaNextVideoDeploy(LlavaNextDeploy):
    def compiled_geometry(self, inputs: dict[str, torch.Tensor]) -> dict:
        if self.adapter.modality(inputs) != "video":
            return {"modality": "image", **super().compiled_geometry(inputs)}
        frames = inputs["pixel_values_videos"].shape[1]
        return {"modality": "video", "image_size": self.model.config.vision_config.image_size, "frames": frames}

    def pixel_recipe(self, processor, modality: str, inputs: dict[str, torch.Tensor]) -> dict | None:
        if modality == "video":
            return video_pixels(processor)
        return super().pixel_recipe(processor, modality, inputs)


register_family(
    Family(
        ("LlavaNextVideoForConditionalGeneration",), LlavaNextVideoAdapter, LlavaNextVideoExamples, LlavaNextVideoDeploy
    )
)
