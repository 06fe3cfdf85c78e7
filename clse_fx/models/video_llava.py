"""Video-LLaVA (``VideoLlavaForConditionalGeneration``): images are CLIP patch grids (CLS dropped, as LLaVA-1.5);
a video's frames each keep their CLS token before the patch grid (8 x (1 + 256) = 2056 tokens at 224 px), so
a video is laid out as frames of [CLS extra, H x W grid], the CLS tokens kept and never scored."""

from __future__ import annotations

import torch

from clse_fx.models.base import DeployRecipe, ExampleInputs, Family, ModelAdapter, register_family
from clse_fx.models.llava import fixed_resolution
from clse_fx.models.recipes import clip_pixels, video_pixels
from clse_fx.plan import LLAVA_SCHEDULE, Layout, grid_layout


class VideoLlavaAdapter(ModelAdapter):
    schedule = LLAVA_SCHEDULE
    layers_path = "model.language_model.layers"
    graph_inputs = ("pixel_values", "pixel_values_videos")

    def visual_token_ids(self) -> tuple[int, ...]:
        return (self.model.config.image_token_id, self.model.config.video_token_id)

    def side(self) -> int:
        """Patch-grid side of one image or frame."""
        vision = self.model.config.vision_config
        return vision.image_size // vision.patch_size

    def tokens_per_image(self, image_size: tuple[int, int] | None = None) -> int:
        """Scored (patch-grid) tokens of one image or frame; a video frame adds its CLS token."""
        fixed_resolution(self.model, image_size)
        if self.model.config.vision_feature_select_strategy != "default":
            raise ValueError("only vision_feature_select_strategy='default' (CLS dropped from images) is supported")
        return self.side() ** 2

    def visual_layout(self, num_visual: int, **inputs: torch.Tensor) -> Layout:
        side, per_image = self.side(), self.tokens_per_image()
        if self.modality(inputs) == "video":
            per_frame = per_image + 1
            if num_visual % per_frame:
                raise ValueError(f"{num_visual} video tokens is not a whole number of {per_frame}-token frames")
            return (("extra", 1), ("grid", 1, side, side)) * (num_visual // per_frame)
        if num_visual % per_image:
            raise ValueError(f"{num_visual} image tokens is not a whole number of {per_image}-token images")
        return grid_layout(num_visual // per_image, side, side)


class VideoLlavaExamples(ExampleInputs):
    def example_inputs(self, batch, text_len, images, generator, frames=1, image_size=None):
        size = fixed_resolution(self.model, image_size)
        config, per_image = self.model.config, self.adapter.tokens_per_image()
        if frames > 1:
            if images != 1:
                raise ValueError("Video-LLaVA bundles take one video per prompt; use --images 1 and --frames N")
            return self.video_example(batch, text_len, (per_image + 1) * frames, frames, size, generator)
        block = [config.image_token_id] * per_image * images
        pixels = {"pixel_values": torch.randn(batch * images, 3, size, size, generator=generator)} if images else {}
        input_ids = self.example_rows(batch, text_len, block, generator)
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), **pixels}


class VideoLlavaDeploy(DeployRecipe):
    def compiled_geometry(self, inputs: dict[str, torch.Tensor]) -> dict:
        modality = self.adapter.modality(inputs)
        geometry = {"image_size": self.model.config.vision_config.image_size, "modality": modality}
        if modality == "video":
            geometry["frames"] = inputs["pixel_values_videos"].shape[1]
        return geometry

    def pixel_recipe(self, processor, modality: str, inputs: dict[str, torch.Tensor]) -> dict | None:
        """Images into the graph's ``pixel_values`` (the processor calls them ``pixel_values_images``)."""
        if modality == "video":
            return video_pixels(processor, self.adapter.modalities["video"])
        return clip_pixels(processor.image_processor, self.adapter.modalities["image"])


register_family(
    Family(("VideoLlavaForConditionalGeneration",), VideoLlavaAdapter, VideoLlavaExamples, VideoLlavaDeploy)
)
