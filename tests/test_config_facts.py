"""``clse_fx.config_facts``: what clse-compile reads from config.json before importing torch must be what the
adapters decide from the loaded model, and its defaults must be transformers' own."""

import pytest
import torch
import transformers

from clse_fx.config_facts import DEFAULTS, FAMILIES, Geometry, config_facts
from clse_fx.demo import tiny_llava_config
from clse_fx.models import adapter_for, examples_for, supported_architectures
from clse_fx.plan import scored_count
from tests.tiny_models import (
    tiny_llava_next_config,
    tiny_llava_next_video_config,
    tiny_llava_onevision_config,
    tiny_qwen_config,
    tiny_video_llava_config,
)

CONFIGS = {
    "LlavaForConditionalGeneration": tiny_llava_config,
    "VideoLlavaForConditionalGeneration": tiny_video_llava_config,
    "LlavaNextForConditionalGeneration": tiny_llava_next_config,
    "LlavaNextVideoForConditionalGeneration": tiny_llava_next_video_config,
    "LlavaOnevisionForConditionalGeneration": tiny_llava_onevision_config,
    "Qwen2VLForConditionalGeneration": lambda: tiny_qwen_config("qwen2_vl"),
    "Qwen2_5_VLForConditionalGeneration": lambda: tiny_qwen_config("qwen2_5_vl"),
}
# Per family, the geometries its tests compile: images, and videos where it takes them.
GEOMETRIES = {
    "LlavaForConditionalGeneration": [Geometry(), Geometry(images=2)],
    "VideoLlavaForConditionalGeneration": [Geometry(), Geometry(frames=3)],
    "LlavaNextForConditionalGeneration": [Geometry()],
    "LlavaNextVideoForConditionalGeneration": [Geometry(frames=2)],
    "LlavaOnevisionForConditionalGeneration": [Geometry(frames=2)],
    "Qwen2VLForConditionalGeneration": [Geometry(), Geometry(image_size=(48, 64)), Geometry(frames=2)],
    "Qwen2_5_VLForConditionalGeneration": [Geometry(), Geometry(frames=2)],
}


def test_defaults_are_transformers_own():
    for model_type, keys in DEFAULTS.items():
        config = transformers.AutoConfig.for_model(model_type)
        assert {key: getattr(config, key) for key in keys} == keys, model_type


def test_every_supported_architecture_is_known_before_loading():
    assert sorted(FAMILIES) == supported_architectures() == sorted(CONFIGS) == sorted(GEOMETRIES)


@pytest.mark.parametrize(
    ("architecture", "geometry"), [(name, shape) for name, shapes in GEOMETRIES.items() for shape in shapes]
)
def test_config_facts_agree_with_the_adapters(architecture, geometry, tmp_path):
    """config.json as save_pretrained writes it (values equal to the defaults left out) gives the adapter's depth and
    scored visual-token count; the count is None only where it needs the any-resolution tiling."""
    config = CONFIGS[architecture]()
    config.architectures = [architecture]
    config.save_pretrained(tmp_path)
    facts = config_facts(tmp_path, geometry)
    with torch.device("meta"):  # no weights: the adapters read the config and module names only
        model = getattr(transformers, architecture)(config)
    adapter = adapter_for(model)
    inputs = examples_for(model).example_inputs(
        1, 4, geometry.images, torch.Generator().manual_seed(0), geometry.frames, geometry.image_size
    )
    assert (facts.architecture, facts.num_layers) == (architecture, adapter.num_layers)
    assert facts.schedule == adapter.schedule
    anyres_images = architecture.startswith(("LlavaNext", "LlavaOnevision")) and geometry.frames == 1
    assert facts.num_visual == (None if anyres_images else scored_count(adapter.prompt_layout(inputs)))
