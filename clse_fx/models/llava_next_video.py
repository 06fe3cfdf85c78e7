"""LLaVA-NeXT-Video (``LlavaNextVideoForConditionalGeneration``): per-frame CLIP grids pooled by the
resampler, frames stacked along T (the spectral filter runs per frame). Video inputs only: its still
images are any-resolution tiles with row-newline tokens, which are not one grid."""

from __future__ import annotations

import torch

from clse_fx.models.base import DeployRecipe, ExampleInputs, Family, ModelAdapter, register_family
from clse_fx.models.llava import fixed_resolution
from clse_fx.plan import LLAVA_SCHEDULE, Grid, Layout, grid_layout


class LlavaNextVideoAdapter(ModelAdapter):
    schedule = LLAVA_SCHEDULE
    layers_path = "model.language_model.layers"
    graph_inputs = ("pixel_values_videos",)

    def visual_token_ids(self) -> tuple[int, ...]:
        return (self.model.config.video_token_id,)

    def frame_side(self) -> int:
        """Tokens per side of one frame after the resampler's spatial pooling."""
        config = self.model.config
        if config.vision_feature_select_strategy != "default":
            raise ValueError("only vision_feature_select_strategy='default' (CLS dropped) has a patch grid")
        return config.vision_config.image_size // config.vision_config.patch_size // config.spatial_pool_stride

    def tokens_per_image(self, image_size: tuple[int, int] | None = None) -> int:
        fixed_resolution(self.model, image_size)
        return self.frame_side() ** 2

    def visual_grid(self, num_visual: int, **inputs: torch.Tensor) -> Grid:
        per_frame = self.tokens_per_image()
        if num_visual % per_frame:
            raise ValueError(f"{num_visual} video tokens is not a whole number of {per_frame}-token frames")
        return (num_visual // per_frame, self.frame_side(), self.frame_side())

    def visual_layout(self, num_visual: int, **inputs: torch.Tensor) -> Layout:
        return grid_layout(*self.visual_grid(num_visual, **inputs))

    def prepare_graph_inputs(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if inputs.get("pixel_values") is not None:
            raise ValueError("LLaVA-NeXT-Video still images (tiles with newline tokens) are not supported; pass videos")
        return inputs


class LlavaNextVideoExamples(ExampleInputs):
    def example_inputs(self, batch, text_len, images, generator, frames=1, image_size=None):
        if images != 1:
            raise ValueError("LLaVA-NeXT-Video bundles take one video per prompt; use --images 1 and --frames N")
        size = fixed_resolution(self.model, image_size)
        block = [self.adapter.visual_token_ids()[0]] * self.adapter.tokens_per_image() * frames
        input_ids = self.example_rows(batch, text_len, block, generator)
        pixels = torch.randn(batch, frames, 3, size, size, generator=generator)
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "pixel_values_videos": pixels}


class LlavaNextVideoDeploy(DeployRecipe):
    def compiled_geometry(self, inputs: dict[str, torch.Tensor]) -> dict:
        frames = inputs["pixel_values_videos"].shape[1]
        return {"image_size": self.model.config.vision_config.image_size, "frames": frames}


register_family(
    Family(
        ("LlavaNextVideoForConditionalGeneration",), LlavaNextVideoAdapter, LlavaNextVideoExamples, LlavaNextVideoDeploy
    )
)
