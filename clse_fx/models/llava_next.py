"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``), any-resolution images: per image a base grid (the whole image
at the tower's resolution) and a tiled high-resolution grid, unpadded to the image's aspect ratio, with a newline
token after each of its rows (kept, never scored). The tiled grid's shape depends on the image size, so a
bundle is compiled for one image size (``--image-size HxW``, the size of the images it will be given)."""

from __future__ import annotations

import torch
from transformers.models.llava_next.modeling_llava_next import (
    get_anyres_image_grid_shape,
    image_size_to_num_patches,
    unpad_image,
)

from clse_fx.models.base import DeployRecipe, ExampleInputs, Family, ModelAdapter, register_family
from clse_fx.models.recipes import anyres_pixels
from clse_fx.plan import LLAVA_SCHEDULE, Layout, scored_count, segment_size


class LlavaNextAdapter(ModelAdapter):
    schedule = LLAVA_SCHEDULE
    layers_path = "model.language_model.layers"
    graph_inputs = ("pixel_values",)

    def visual_token_ids(self) -> tuple[int, ...]:
        return (self.model.config.image_token_id,)

    def side(self) -> int:
        """Patch-grid side of the base image and of each tile."""
        config = self.model.config
        if self.drops_cls() != self.tower_has_cls():
            raise ValueError(
                "the vision features are not a patch grid: use vision_feature_select_strategy='default' with a "
                "CLS-token tower (CLIP) and 'full' with one without (SigLIP)"
            )
        return config.vision_config.image_size // config.vision_config.patch_size

    def drops_cls(self) -> bool:
        """transformers drops the first vision token under the "default" strategy, whatever the tower."""
        return self.model.config.vision_feature_select_strategy == "default"

    def tower_has_cls(self) -> bool:
        return any(name.endswith("class_embedding") for name, _ in self.model.model.vision_tower.named_parameters())

    def default_image_size(self) -> tuple[int, int]:
        """Compiled image size when none is given: the largest square resolution the model tiles to."""
        squares = [h for h, w in self.model.config.image_grid_pinpoints if h == w]
        side = max(squares) if squares else self.model.config.vision_config.image_size
        return side, side

    def image_layout(self, image_size: tuple[int, int] | None = None) -> Layout:
        """One image's tokens at ``image_size`` (H, W) pixels: the base grid, then the unpadded tiled grid with a
        newline after each row (transformers' own anyres helpers decide the tiling and the unpadding)."""
        config, side = self.model.config, self.side()
        size = list(image_size or self.default_image_size())
        tile = config.vision_config.image_size
        if image_size_to_num_patches(size, config.image_grid_pinpoints, tile) == 1:
            return (("grid", 1, side, side), ("extra", 1))
        rows, cols = get_anyres_image_grid_shape(size, config.image_grid_pinpoints, tile)
        height, width = self.fit_tiled(*unpad_image(torch.empty(0, rows * side, cols * side), size).shape[1:])
        return (("grid", 1, side, side), ("grid", 1, height, width, 1))

    def fit_tiled(self, height: int, width: int) -> tuple[int, int]:
        """The tiled grid's shape after unpadding; families that cap its size (LLaVA-OneVision) shrink it."""
        return height, width

    def tokens_per_image(self, image_size: tuple[int, int] | None = None) -> int:
        return scored_count(self.image_layout(image_size))

    def image_size(self, inputs: dict) -> tuple[int, int]:
        """The one image size of a compile, from the processor's ``image_sizes``."""
        sizes = {tuple(size) for size in inputs["image_sizes"].tolist()}
        if len(sizes) != 1:
            raise ValueError(f"images of different sizes {sorted(sizes)}; compile one image size at a time")
        return sizes.pop()

    def visual_layout(self, num_visual: int, **inputs: torch.Tensor) -> Layout:
        image = self.image_layout(self.image_size(inputs))
        per_image = sum(segment_size(segment) for segment in image)
        if num_visual % per_image:
            raise ValueError(f"{num_visual} image tokens is not a whole number of {per_image}-token images")
        return image * (num_visual // per_image)

    def graph_constants(self, inputs: dict[str, torch.Tensor]) -> dict:
        if inputs.get("image_sizes") is None:
            return {}
        return {"image_size": self.image_size(inputs)}

    def prefill_logits(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        image_size: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """The model's prefill with the image features packed for all images at once. transformers packs them
        image by image from a Python list as long as the batch, which would fix the batch in the trace; the
        result is the same (the unmodified model is the oracle in the tests). Videos (families that take them)
        go through transformers' own path, which handles the whole batch at once."""
        if pixel_values is None:
            videos = {} if pixel_values_videos is None else {"pixel_values_videos": pixel_values_videos}
            return super().prefill_logits(input_ids, attention_mask, **videos)
        embeds = self.model.get_input_embeddings()(input_ids)
        features = self.packed_image_features(pixel_values, image_size).to(embeds.dtype)
        mask = (input_ids == self.visual_token_ids()[0])[..., None].expand_as(embeds)
        embeds = embeds.masked_scatter(mask, features)
        return self.last_logits(self.model.model(inputs_embeds=embeds, attention_mask=attention_mask))

    def packed_image_features(self, pixel_values: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """[images, tiles, 3, s, s] pixels -> [images, tokens, C] features laid out as :meth:`image_layout`."""
        model, config, side = self.model.model, self.model.config, self.side()
        images, tiles = pixel_values.shape[:2]
        hidden = model.vision_tower(pixel_values.flatten(0, 1), output_hidden_states=True).hidden_states
        layers = config.vision_feature_layer
        selected = hidden[layers] if isinstance(layers, int) else torch.cat([hidden[i] for i in layers], dim=-1)
        features = model.multi_modal_projector(selected[:, 1:] if self.drops_cls() else selected)
        features = features.reshape(images, tiles, side * side, -1)
        base, channels = features[:, 0], features.shape[-1]
        layout = self.image_layout(image_size)
        if len(layout) == 2 and layout[1][0] == "extra":  # no tiles: the base grid and one newline
            return torch.cat([base, model.image_newline.expand(images, 1, channels)], dim=1)
        rows, cols = get_anyres_image_grid_shape(
            list(image_size), config.image_grid_pinpoints, config.vision_config.image_size
        )
        grid = features[:, 1:].reshape(images, rows, cols, side, side, channels)
        grid = grid.permute(0, 5, 1, 3, 2, 4).reshape(images * channels, rows * side, cols * side)
        grid = unpad_image(grid, list(image_size))
        grid = grid.reshape(images, channels, *grid.shape[1:])
        height, width = self.fit_tiled(*grid.shape[2:])
        if (height, width) != tuple(grid.shape[2:]):  # as transformers shrinks it, image by image
            grid = torch.nn.functional.interpolate(grid, [height, width], mode="bilinear")
        newline = model.image_newline[None, :, None, None].expand(images, channels, height, 1).to(grid.dtype)
        tiled = torch.cat([grid, newline], dim=-1).flatten(2).transpose(1, 2)
        return torch.cat([base, tiled], dim=1)


class LlavaNextExamples(ExampleInputs):
    def example_inputs(self, batch, text_len, images, generator, frames=1, image_size=None):
        if frames != 1:
            raise ValueError("LLaVA-NeXT takes still images; drop --frames")
        adapter, config = self.adapter, self.model.config
        size = tuple(image_size or adapter.default_image_size())
        per_image = sum(segment_size(segment) for segment in adapter.image_layout(size))
        block = [config.image_token_id] * per_image * images
        input_ids = self.example_rows(batch, text_len, block, generator)
        inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
        if images:
            tile = config.vision_config.image_size
            tiles = image_size_to_num_patches(list(size), config.image_grid_pinpoints, tile)
            inputs["pixel_values"] = torch.randn(batch * images, tiles, 3, tile, tile, generator=generator)
            inputs["image_sizes"] = torch.tensor([list(size)] * batch * images)
        return inputs


class LlavaNextDeploy(DeployRecipe):
    def compiled_geometry(self, inputs: dict[str, torch.Tensor]) -> dict:
        size = self.adapter.image_size(inputs) if inputs.get("image_sizes") is not None else None
        return {"image_size": list(size or self.adapter.default_image_size())}

    def pixel_recipe(self, processor, modality: str, inputs: dict[str, torch.Tensor]) -> dict | None:
        if modality != "image":
            return None
        size = self.adapter.image_size(inputs) if inputs.get("image_sizes") is not None else None
        return anyres_pixels(processor.image_processor, size or self.adapter.default_image_size())


register_family(Family(("LlavaNextForConditionalGeneration",), LlavaNextAdapter, LlavaNextExamples, LlavaNextDeploy))
