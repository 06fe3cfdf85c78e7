"""Every registered family implements every declared method, and its parts agree on the token layout."""

import inspect

import pytest
import torch
from transformers import (
    LlavaForConditionalGeneration,
    LlavaNextForConditionalGeneration,
    LlavaNextVideoForConditionalGeneration,
    LlavaOnevisionForConditionalGeneration,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLForConditionalGeneration,
    VideoLlavaForConditionalGeneration,
)

from clse_fx.demo import tiny_llava_config
from clse_fx.models import adapter_for, deploy_recipe_for, examples_for, registered_families
from clse_fx.plan import check_layout, scored_count, segment_size

from .tiny_models import (
    tiny_llava_next_config,
    tiny_llava_next_video_config,
    tiny_llava_onevision_config,
    tiny_qwen_config,
    tiny_video_llava_config,
)

# Weightless models (the adapters only read configs and shapes), with the example geometry to check.
MODELS = {
    "LlavaForConditionalGeneration": (lambda: LlavaForConditionalGeneration(tiny_llava_config()), {}),
    "LlavaNextVideoForConditionalGeneration": (
        lambda: LlavaNextVideoForConditionalGeneration(tiny_llava_next_video_config()),
        {"frames": 4},
    ),
    "Qwen2VLForConditionalGeneration": (
        lambda: Qwen2VLForConditionalGeneration(tiny_qwen_config("qwen2_vl")),
        {"image_size": (56, 72)},
    ),
    "Qwen2_5_VLForConditionalGeneration": (
        lambda: Qwen2_5_VLForConditionalGeneration(tiny_qwen_config("qwen2_5_vl")),
        {"image_size": (56, 72)},
    ),
    "LlavaNextForConditionalGeneration": (
        lambda: LlavaNextForConditionalGeneration(tiny_llava_next_config()),
        {"image_size": (40, 64)},
    ),
    "LlavaOnevisionForConditionalGeneration": (
        lambda: LlavaOnevisionForConditionalGeneration(tiny_llava_onevision_config()),
        {"frames": 4},
    ),
    "VideoLlavaForConditionalGeneration": (
        lambda: VideoLlavaForConditionalGeneration(tiny_video_llava_config()),
        {"frames": 4},
    ),
}


@pytest.mark.parametrize("family", registered_families(), ids=lambda family: family.adapter.__name__)
def test_every_family_implements_every_declared_method(family):
    for part in (family.adapter, family.examples, family.deploy):
        assert not inspect.isabstract(part), f"{part.__name__} lacks {sorted(part.__abstractmethods__)}"
    assert set(family.architectures) <= set(MODELS), "add the new family to MODELS below"


@pytest.mark.parametrize("architecture", sorted(MODELS))
def test_example_inputs_hold_the_declared_visual_tokens(architecture):
    build, geometry = MODELS[architecture]
    with torch.device("meta"):
        model = build()
    adapter = adapter_for(model)
    frames = geometry.get("frames", 1)
    inputs = examples_for(model).example_inputs(2, 5, 1, torch.Generator().manual_seed(0), **geometry)
    per_row = adapter.visual_mask(inputs["input_ids"]).sum(dim=1)
    assert per_row[0] == per_row[1]
    layout = adapter.visual_layout(int(per_row[0]), **{k: v for k, v in inputs.items() if k != "input_ids"})
    # The layout covers every visual token, and its grids hold tokens_per_image per image or frame.
    assert sum(segment_size(segment) for segment in check_layout(layout)) == per_row[0]
    per_item = adapter.tokens_per_frame if frames > 1 else adapter.tokens_per_image
    assert scored_count(layout) == per_item(geometry.get("image_size")) * frames
    geometry_entries = deploy_recipe_for(model).compiled_geometry(inputs)
    assert "image_size" in geometry_entries
