"""LLaVA-1.5 (``LlavaForConditionalGeneration``): CLIP patch grid, image-token placeholders, 1-D RoPE."""

from __future__ import annotations

import torch

from clse_fx.models.base import ModelAdapter, register_adapter
from clse_fx.plan import LLAVA_SCHEDULE
from clse_fx.scoring import Grid


@register_adapter
class LlavaAdapter(ModelAdapter):
    architectures = ("LlavaForConditionalGeneration",)
    schedule = LLAVA_SCHEDULE
    layers_path = "model.language_model.layers"

    def visual_token_ids(self) -> tuple[int, ...]:
        return (self.model.config.image_token_id,)

    def tokens_per_image(self) -> int:
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
