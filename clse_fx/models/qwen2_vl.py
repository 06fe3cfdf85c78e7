"""Qwen2-VL / Qwen2.5-VL: merged-patch grid from ``image_grid_thw``, 3-D M-RoPE position ids.

Two things stay outside the traced graph, because the unmodified model computes them with data-dependent
Python (``.tolist()`` over the grid): the M-RoPE position ids (``get_rope_index``) and the vision tower
(its attention splits by ``cu_seqlens.tolist()``). Both are graph inputs instead; the passes then gather
the [3, B, S] ids on their sequence axis like any other sequence-indexed value.
"""

from __future__ import annotations

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from clse_fx.models.base import ModelAdapter, register_adapter
from clse_fx.plan import QWEN2_VL_SCHEDULE
from clse_fx.scoring import Grid


@register_adapter
class Qwen2VLAdapter(ModelAdapter):
    architectures = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")
    schedule = QWEN2_VL_SCHEDULE
    layers_path = "model.language_model.layers"
    graph_inputs = ("position_ids", "image_embeds")
    bundles = False  # the vision tower is not an exported graph yet, so bundles could not run from pixels

    def visual_token_ids(self) -> tuple[int, ...]:
        return (self.model.config.image_token_id,)

    def visual_grid(self, num_visual: int, image_grid_thw: torch.Tensor | None = None, **inputs) -> Grid:
        if image_grid_thw is None:
            raise ValueError("Qwen2-VL needs image_grid_thw (from its processor) to know the image grid")
        merge = self.model.config.vision_config.spatial_merge_size
        grids = {tuple(g) for g in image_grid_thw.tolist()}
        if len(grids) != 1:
            raise ValueError(f"images of different grids {sorted(grids)}; compile one resolution at a time")
        t, h, w = grids.pop()
        per_image = t * (h // merge) * (w // merge)
        if num_visual % per_image:
            raise ValueError(f"{num_visual} image tokens is not a whole number of {per_image}-token images")
        # Each image's t frames and each further image stack along T; the filter runs per frame.
        return (num_visual // per_image * t, h // merge, w // merge)

    def prepare_graph_inputs(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if inputs.get("pixel_values") is None:
            return {}
        model = self.model.model
        position_ids, _ = model.get_rope_index(
            inputs["input_ids"],
            image_grid_thw=inputs["image_grid_thw"],
            attention_mask=inputs.get("attention_mask"),
            mm_token_type_ids=inputs["mm_token_type_ids"],
        )
        with torch.no_grad():
            features = model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"], return_dict=True)
        return {"position_ids": position_ids, "image_embeds": torch.cat(features.pooler_output, dim=0)}

    def graph_input_dims(self, name: str) -> dict[int, str] | None:
        return {1: "batch", 2: "seq"} if name == "position_ids" else None

    def prefill_logits(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        encoded = None if image_embeds is None else {"image": BaseModelOutputWithPooling(pooler_output=[image_embeds])}
        return self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            mm_encoder_outputs=encoded,
            use_cache=False,
        ).logits
