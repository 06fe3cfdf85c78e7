"""Qwen2-VL / Qwen2.5-VL: merged-patch grid from ``image_grid_thw`` / ``video_grid_thw``, 3-D M-RoPE ids.

Two things stay outside the traced prefill, because the unmodified model computes them with data-dependent
Python (``.tolist()`` over the grid): the M-RoPE position ids (``get_rope_index``) and the vision tower
(its attention splits by ``cu_seqlens.tolist()``). Both are graph inputs instead; the passes then gather
the [3, B, S] ids on their sequence axis like any other sequence-indexed value. A compile holds one
modality (images or a video), since one spectral grid describes all visual tokens of a row.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

from clse_fx.models.base import DeployRecipe, ExampleInputs, Family, InputGraph, ModelAdapter, register_family
from clse_fx.models.recipes import qwen2_vl_pixels
from clse_fx.plan import QWEN2_VL_SCHEDULE, Grid, Layout, grid_layout
from clse_fx.static_ops import running_count, visual_mask

# Processor outputs per modality: (pixels, grid, graph input holding the vision tower's output).
MODALITIES = {
    "image": ("pixel_values", "image_grid_thw", "image_embeds"),
    "video": ("pixel_values_videos", "video_grid_thw", "video_embeds"),
}


class MRopeIndex(nn.Module):
    """(input_ids, attention_mask) -> (position_ids [3, B, S], rope_deltas [B]): ``get_rope_index`` in static
    tensor ops, for prompts whose visual items all share one merged grid (the compiled resolution).

    ``get_rope_index`` walks token groups in Python, which no exporter can stage. Here each token's position
    follows from two running counts: text tokens before it, and visual items before it (each advances the text
    position by ``max(H, W)``); a visual token adds its (t * interval, h, w) offset inside its item. Padding
    gets 0, as upstream.
    """

    def __init__(self, token_ids: tuple[int, ...], grid: Grid, time_interval: float = 1.0) -> None:
        super().__init__()
        self.token_ids, self.grid, self.time_interval = token_ids, grid, time_interval

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t, h, w = self.grid
        valid = attention_mask.bool()
        visual = visual_mask(input_ids, self.token_ids) & valid
        text = valid & ~visual
        text_before = running_count(text, 1) - text.long()
        visual_before = running_count(visual, 1) - visual.long()
        offset = visual_before % (t * h * w)  # a visual token's index inside its item
        start = text_before + visual_before // (t * h * w) * max(h, w)
        frame = (torch.div(offset, h * w, rounding_mode="floor") * self.time_interval).long()
        axes = (frame, torch.div(offset, w, rounding_mode="floor") % h, offset % w)
        position_ids = torch.stack([torch.where(visual, start + axis, start) for axis in axes])
        position_ids = torch.where(valid, position_ids, 0)
        deltas = position_ids.amax(dim=(0, 2)) + 1 - valid.sum(dim=1)
        return position_ids, deltas


class VisionEncoder(nn.Module):
    """Pixels -> visual features for a fixed batch of items of one grid (the compiled resolution)."""

    def __init__(self, model: nn.Module, modality: str, grid_thw: torch.Tensor) -> None:
        super().__init__()
        self.model, self.modality = model, modality
        self.register_buffer("grid_thw", grid_thw.clone(), persistent=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        inner = self.model.model
        encode = inner.get_image_features if self.modality == "image" else inner.get_video_features
        return torch.cat(encode(pixels, self.grid_thw, return_dict=True).pooler_output, dim=0)


class Qwen2VLAdapter(ModelAdapter):
    schedule = QWEN2_VL_SCHEDULE
    layers_path = "model.language_model.layers"
    graph_inputs = ("position_ids", "image_embeds", "video_embeds")

    def visual_token_ids(self) -> tuple[int, ...]:
        return (self.model.config.image_token_id, self.model.config.video_token_id)

    def modality(self, inputs: dict) -> str | None:
        present = [name for name, (pixels, grid, _) in MODALITIES.items() if inputs.get(grid) is not None]
        if len(present) > 1:
            raise ValueError("a prompt with both images and a video has no single grid; compile one modality")
        return present[0] if present else None

    def visual_grid(self, num_visual: int, **inputs) -> Grid:
        modality = self.modality(inputs)
        if modality is None:
            raise ValueError("Qwen2-VL needs image_grid_thw or video_grid_thw (from its processor) to know the grid")
        merge = self.model.config.vision_config.spatial_merge_size
        grids = {tuple(g) for g in inputs[MODALITIES[modality][1]].tolist()}
        if len(grids) != 1:
            raise ValueError(f"{modality}s of different grids {sorted(grids)}; compile one resolution at a time")
        t, h, w = grids.pop()
        per_item = t * (h // merge) * (w // merge)
        if num_visual % per_item:
            raise ValueError(f"{num_visual} visual tokens is not a whole number of {per_item}-token {modality}s")
        # Each item's t frames and each further item stack along T; the filter runs per frame.
        return (num_visual // per_item * t, h // merge, w // merge)

    def visual_layout(self, num_visual: int, **inputs: torch.Tensor) -> Layout:
        return grid_layout(*self.visual_grid(num_visual, **inputs))

    def prepare_graph_inputs(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        modality = self.modality(inputs)
        if modality is None:
            return {}
        pixels, grid, embeds = MODALITIES[modality]
        if inputs.get("position_ids") is not None and inputs.get(embeds) is not None:
            return {"position_ids": inputs["position_ids"], embeds: inputs[embeds]}  # precomputed (e.g. on meta)
        model = self.model.model
        position_ids, _ = self._rope_index(modality, inputs)
        encode = model.get_image_features if modality == "image" else model.get_video_features
        with torch.no_grad():
            features = encode(inputs[pixels], inputs[grid], return_dict=True)
        return {"position_ids": position_ids, embeds: torch.cat(features.pooler_output, dim=0)}

    def tokens_per_image(self, image_size: tuple[int, int] | None = None) -> int:
        height, width = self.resolution(image_size)
        return height * width // self.merge_step() ** 2

    def merge_step(self) -> int:
        """Pixels per merged token on each side (patch x spatial merge)."""
        vision = self.model.config.vision_config
        return vision.patch_size * vision.spatial_merge_size

    def resolution(self, image_size: tuple[int, int] | None) -> tuple[int, int]:
        """``image_size`` (H, W) checked against the merge step, or the default 16 x 16 merged tokens."""
        step = self.merge_step()
        height, width = image_size or (16 * step, 16 * step)
        if height % step or width % step:
            raise ValueError(f"--image-size must be a multiple of {step} pixels (patch x merge) on each side")
        return height, width

    def merged_tokens(self, grid_thw: torch.Tensor) -> int:
        """Visual tokens the items of ``grid_thw`` [N, 3] become after the spatial merge."""
        return int(grid_thw.prod(dim=-1).sum()) // self.model.config.vision_config.spatial_merge_size**2

    def decode_position_ids(self, position_ids: torch.Tensor) -> torch.Tensor:
        return position_ids[None].expand(3, -1, -1)  # text tokens: one id on every M-RoPE axis

    def rope_deltas(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        modality = self.modality(inputs)
        if modality is None:
            return super().rope_deltas(inputs)
        _, deltas = self._rope_index(modality, inputs)
        return deltas.reshape(-1)

    def _rope_index(self, modality: str, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The unmodified model's M-RoPE (position ids [3, B, S], rope deltas [B, 1]) for processor ``inputs``."""
        grid = MODALITIES[modality][1]
        return self.model.model.get_rope_index(
            inputs["input_ids"],
            attention_mask=inputs.get("attention_mask"),
            mm_token_type_ids=inputs["mm_token_type_ids"],
            **{key: inputs[key] for key in (grid, "second_per_grid_ts") if inputs.get(key) is not None},
        )

    def graph_input_dims(self, name: str) -> dict[int, str] | None:
        return {1: "batch", 2: "seq"} if name == "position_ids" else None

    def prefill_logits(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
        video_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        embeds = {"image": image_embeds, "video": video_embeds}
        encoded = {key: BaseModelOutputWithPooling(pooler_output=[e]) for key, e in embeds.items() if e is not None}
        outputs = self.model.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            mm_encoder_outputs=encoded or None,
            use_cache=False,
        )
        return self.last_logits(outputs)


class Qwen2VLExamples(ExampleInputs):
    def example_inputs(self, batch, text_len, images, generator, frames=1, image_size=None):
        adapter, vision = self.adapter, self.model.config.vision_config
        height, width = adapter.resolution(image_size)
        modality = "video" if frames > 1 else "image"
        pixels, grid_name, _ = MODALITIES[modality]
        grid = torch.tensor([[frames, height // vision.patch_size, width // vision.patch_size]] * batch * images)
        token = adapter.visual_token_ids()[modality == "video"]
        config = self.model.config
        item = [config.vision_start_token_id] + [token] * adapter.merged_tokens(grid[:1]) + [config.vision_end_token_id]
        block = item * images
        input_ids = self.example_rows(batch, text_len, block, generator)
        channels = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
        return {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            pixels: torch.randn(int(grid.prod(dim=-1).sum()), channels, generator=generator),
            grid_name: grid,
            "mm_token_type_ids": (input_ids == token).int() * (2 if modality == "video" else 1),
        }


class Qwen2VLDeploy(DeployRecipe):
    def input_graphs(self, inputs: dict[str, torch.Tensor]) -> list[InputGraph]:
        modality = self.adapter.modality(inputs)
        if modality is None:
            return []
        pixels, grid_name, embeds = MODALITIES[modality]
        t, h, w = self.adapter.visual_grid(
            self.adapter.merged_tokens(inputs[grid_name][:1]), **{grid_name: inputs[grid_name]}
        )
        rope = MRopeIndex(self.adapter.visual_token_ids(), (t, h, w), self.time_interval(modality, inputs))
        return [
            InputGraph("vision", VisionEncoder(self.model, modality, inputs[grid_name]), (pixels,), (embeds,), True),
            InputGraph("rope", rope, ("input_ids", "attention_mask"), ("position_ids", "rope_deltas")),
        ]

    def time_interval(self, modality: str, inputs: dict) -> float:
        """Temporal M-RoPE step of a video's grid steps (Qwen2.5-VL scales it by the frame timing)."""
        tokens_per_second = getattr(self.model.config.vision_config, "tokens_per_second", None)
        if modality != "video" or tokens_per_second is None:
            return 1.0
        seconds = inputs.get("second_per_grid_ts")
        values = {1.0} if seconds is None else {float(x) for x in torch.as_tensor(seconds).flatten().tolist()}
        if len(values) != 1:
            raise ValueError(f"videos of different frame timings {sorted(values)}; compile one timing at a time")
        return tokens_per_second * values.pop()

    def compiled_geometry(self, inputs: dict[str, torch.Tensor]) -> dict:
        modality = self.adapter.modality(inputs)
        grid = inputs[MODALITIES[modality][1]][0].tolist()
        patch = self.model.config.vision_config.patch_size
        return {"modality": modality, "grid_thw": grid, "image_size": [grid[1] * patch, grid[2] * patch]}

    def pixel_recipe(self, processor, modality: str, inputs: dict[str, torch.Tensor]) -> dict:
        """Patches of items resized to the compiled grid's size (``qwen2_vl``); the processor's patch, merge and
        temporal sizes must be the vision tower's."""
        image_processor, vision = processor.image_processor, self.model.config.vision_config
        sizes = {"patch_size": "patch_size", "merge_size": "spatial_merge_size", "temporal_patch_size": None}
        for name, config_name in sizes.items():
            expected = getattr(vision, config_name or name)
            if getattr(image_processor, name) != expected:
                raise ValueError(
                    f"the processor's {name} {getattr(image_processor, name)} is not the vision tower's {expected}"
                )
        _, grid_h, grid_w = inputs[MODALITIES[modality][1]][0].tolist()
        size = (grid_h * vision.patch_size, grid_w * vision.patch_size)
        return qwen2_vl_pixels(image_processor, size, MODALITIES[modality][0], video=modality == "video")

    def placeholder(self, processor, modality: str) -> tuple[str, str, str]:
        """Qwen prompts name an item as <|vision_start|><|image_pad|><|vision_end|> (<|video_pad|> for a video),
        as its chat template writes it, with nothing between the items and the text."""
        token = processor.video_token if modality == "video" else processor.image_token
        config, tokenizer = self.model.config, processor.tokenizer
        start, end = tokenizer.convert_ids_to_tokens([config.vision_start_token_id, config.vision_end_token_id])
        return token, f"{start}{token}{end}", ""

    def frames(self, inputs: dict[str, torch.Tensor]) -> int:
        """Frames per compiled video: each temporal grid step is ``temporal_patch_size`` frames."""
        steps = int(inputs[MODALITIES["video"][1]][0, 0])
        return steps * self.model.config.vision_config.temporal_patch_size


register_family(
    Family(
        ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration"),
        Qwen2VLAdapter,
        Qwen2VLExamples,
        Qwen2VLDeploy,
    )
)
