"""Qwen2-VL / Qwen2.5-VL: merged-patch grid from ``image_grid_thw`` / ``video_grid_thw``, 3-D M-RoPE ids.

Two things stay outside the traced prefill, because the unmodified model computes them with data-dependent
Python (``.tolist()`` over the grid): the M-RoPE position ids (``get_rope_index``) and the vision tower
(its attention splits by ``cu_seqlens.tolist()``). Both are graph inputs instead; the passes then gather
the [3, B, S] ids on their sequence axis like any other sequence-indexed value. A compile holds one
modality (images or a video), since one spectral grid describes all visual tokens of a row.
"""

from __future__ import annotations

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from clse_fx.models.base import ModelAdapter, register_adapter
from clse_fx.plan import QWEN2_VL_SCHEDULE
from clse_fx.scoring import Grid

# Processor outputs per modality: (pixels, grid, graph input holding the vision tower's output).
MODALITIES = {
    "image": ("pixel_values", "image_grid_thw", "image_embeds"),
    "video": ("pixel_values_videos", "video_grid_thw", "video_embeds"),
}


@register_adapter
class Qwen2VLAdapter(ModelAdapter):
    architectures = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")
    schedule = QWEN2_VL_SCHEDULE
    layers_path = "model.language_model.layers"
    graph_inputs = ("position_ids", "image_embeds", "video_embeds")
    bundles = False  # the vision tower is not an exported graph yet, so bundles could not run from pixels

    def visual_token_ids(self) -> tuple[int, ...]:
        return (self.model.config.image_token_id, self.model.config.video_token_id)

    def _modality(self, inputs: dict) -> str | None:
        present = [name for name, (pixels, grid, _) in MODALITIES.items() if inputs.get(grid) is not None]
        if len(present) > 1:
            raise ValueError("a prompt with both images and a video has no single grid; compile one modality")
        return present[0] if present else None

    def visual_grid(self, num_visual: int, **inputs) -> Grid:
        modality = self._modality(inputs)
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

    def prepare_graph_inputs(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        modality = self._modality(inputs)
        if modality is None:
            return {}
        pixels, grid, embeds = MODALITIES[modality]
        model = self.model.model
        position_ids, _ = model.get_rope_index(
            inputs["input_ids"],
            attention_mask=inputs.get("attention_mask"),
            mm_token_type_ids=inputs["mm_token_type_ids"],
            **{key: inputs[key] for key in (grid, "second_per_grid_ts") if inputs.get(key) is not None},
        )
        encode = model.get_image_features if modality == "image" else model.get_video_features
        with torch.no_grad():
            features = encode(inputs[pixels], inputs[grid], return_dict=True)
        return {"position_ids": position_ids, embeds: torch.cat(features.pooler_output, dim=0)}

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
        return self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            mm_encoder_outputs=encoded or None,
            use_cache=False,
        ).logits
