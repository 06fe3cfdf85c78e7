"""LLaVA-1.5 (``LlavaForConditionalGeneration``): CLIP patch grid, image-token placeholders, 1-D RoPE."""

from __future__ import annotations

import torch

from clse_fx.models.base import DeployRecipe, ExampleInputs, Family, ModelAdapter, register_family
from clse_fx.models.recipes import clip_pixels
from clse_fx.plan import LLAVA_SCHEDULE, Grid, Layout, grid_layout


def fixed_resolution(model, image_size: tuple[int, int] | None) -> int:
    """The square input resolution of a CLIP-tower model; any other requested size is an error."""
    size = model.config.vision_config.image_size
    if image_size is not None and tuple(image_size) != (size, size):
        raise ValueError(f"{type(model).__name__}'s vision tower runs at a fixed {size}px; drop --image-size")
    return size


class LlavaAdapter(ModelAdapter):
    schedule = LLAVA_SCHEDULE
    layers_path = "model.language_model.layers"

    def visual_token_ids(self) -> tuple[int, ...]:
        return (self.model.config.image_token_id,)

    def tokens_per_image(self, image_size: tuple[int, int] | None = None) -> int:
        fixed_resolution(self.model, image_size)
        vision = self.model.config.vision_config
        side = vision.image_size // vision.patch_size
        # The "full" strategy keeps CLS, which is not on the patch grid; only "default" is a clean grid.
        if self.model.config.vision_feature_select_strategy != "default":
            raise ValueError("only vision_feature_select_strategy='default' (CLS dropped) has a patch grid")
        return side * side

    def visual_grid(self, num_visual: int, **inputs: torch.Tensor) -> Grid:
        per_image = self.tokens_per_image()
        if num_visual % per_image:
            raise ValueError(f"{num_visual} image tokens is not a whole number of {per_image}-token images")
        side = int(round(per_image**0.5))
        return (num_visual // per_image, side, side)

    def visual_layout(self, num_visual: int, **inputs: torch.Tensor) -> Layout:
        return grid_layout(*self.visual_grid(num_visual, **inputs))


class LlavaExamples(ExampleInputs):
    def example_inputs(self, batch, text_len, images, generator, frames=1, image_size=None):
        if frames != 1:
            raise ValueError("LLaVA takes still images; drop --frames")
        size = fixed_resolution(self.model, image_size)
        block = [self.adapter.visual_token_ids()[0]] * self.adapter.tokens_per_image() * images
        input_ids = self.example_rows(batch, text_len, block, generator)
        inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
        if images:
            inputs["pixel_values"] = torch.randn(batch * images, 3, size, size, generator=generator)
        return inputs


class LlavaDeploy(DeployRecipe):
    def compiled_geometry(self, inputs: dict[str, torch.Tensor]) -> dict:
        return {"image_size": self.model.config.vision_config.image_size}

    def pixel_recipe(self, processor, modality: str, inputs: dict[str, torch.Tensor]) -> dict:
        return clip_pixels(processor.image_processor, "pixel_values")


register_family(Family(("LlavaForConditionalGeneration",), LlavaAdapter, LlavaExamples, LlavaDeploy))
