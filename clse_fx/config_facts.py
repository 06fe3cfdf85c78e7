"""What a checkpoint's ``config.json`` alone decides, read as plain JSON (no torch, no transformers), so that
``clse-compile`` refuses what it cannot compile in about a second instead of after the checkpoint has loaded.

The family knowledge here (decoder depth, scored visual tokens per image or frame) is what the adapters in
``clse_fx/models/`` decide from a loaded model; ``tests/test_config_facts.py`` checks that both agree on every
family's tiny checkpoint and that :data:`DEFAULTS` are transformers' own. A fact config.json cannot give (a sub-config
left out, or a count that needs the any-resolution tiling of LLaVA-NeXT and LLaVA-OneVision images) is None, and
the check waits for the loaded model, as before.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from clse_fx.plan import LLAVA_SCHEDULE, QWEN2_VL_SCHEDULE, ReferenceSchedule

# transformers' class defaults for the keys read here, by sub-config model_type: save_pretrained leaves out the
# values equal to them.
DEFAULTS: dict[str, dict[str, int]] = {
    "llama": {"num_hidden_layers": 32},
    "mistral": {"num_hidden_layers": 32},
    "qwen2": {"num_hidden_layers": 32},
    "qwen2_vl_text": {"num_hidden_layers": 80},
    "qwen2_5_vl_text": {"num_hidden_layers": 80},
    "clip_vision_model": {"image_size": 224, "patch_size": 32},
    "siglip_vision_model": {"image_size": 224, "patch_size": 16},
    "qwen2_vl_vision": {"patch_size": 14, "spatial_merge_size": 2},
    "qwen2_5_vl_vision": {"patch_size": 14, "spatial_merge_size": 2},
}


@dataclass(frozen=True)
class Geometry:
    """The compiled geometry the visual-token count depends on (``clse-compile``'s flags)."""

    images: int = 1
    frames: int = 1
    image_size: tuple[int, int] | None = None


class Config:
    """A config.json's top level and its text and vision sub-configs, each key read with transformers' default
    for the sub-config's model_type (the family's own type where the sub-config names none)."""

    def __init__(self, data: dict, text_type: str, vision_type: str) -> None:
        self.data = data
        text = data.get("text_config")
        if text is None and text_type.startswith("qwen2_"):  # older Qwen2-VL configs keep text settings at the top
            text = {key: value for key, value in data.items() if key != "model_type"}
        self.text = _section(text, text_type)
        self.vision = _section(data.get("vision_config"), vision_type)

    def get(self, key: str, default: object) -> object:
        return self.data.get(key, default)


def _section(data: dict | None, model_type: str) -> Callable[[str], int | None] | None:
    """A sub-config's keys with their defaults, or None when config.json has no such sub-config."""
    if data is None:
        return None
    defaults = DEFAULTS.get(data.get("model_type", model_type), {})
    return lambda key: data.get(key, defaults.get(key))


def _side(config: Config) -> int | None:
    """Patch-grid side of one image or tile of a fixed-resolution tower."""
    if config.vision is None or config.vision("image_size") is None:
        return None
    return config.vision("image_size") // config.vision("patch_size")


def _llava(config: Config, geometry: Geometry) -> int | None:
    side = _side(config)
    if side is None or geometry.frames != 1 or config.get("vision_feature_select_strategy", "default") != "default":
        return None  # the adapter names what is wrong once the model is loaded
    return geometry.images * side * side


def _video_llava(config: Config, geometry: Geometry) -> int | None:
    side = _side(config)  # a video frame's CLS token is always kept, never counted
    return None if side is None else geometry.images * geometry.frames * side * side


def _llava_next_video(config: Config, geometry: Geometry) -> int | None:
    side = _side(config)
    if side is None or geometry.frames == 1:  # still images: the any-resolution tiling
        return None
    return geometry.frames * (side // config.get("spatial_pool_stride", 2)) ** 2


def _llava_onevision(config: Config, geometry: Geometry) -> int | None:
    side = _side(config)
    if side is None or geometry.frames == 1:  # still images: the any-resolution tiling
        return None
    return geometry.frames * math.ceil(side / 2) ** 2  # frames are pooled 2x (the newline after them is kept)


def _any_resolution(config: Config, geometry: Geometry) -> None:
    return None  # the tiled grid's size needs transformers' tiling rules


def _qwen2_vl(config: Config, geometry: Geometry) -> int | None:
    if config.vision is None:
        return None
    step = config.vision("patch_size") * config.vision("spatial_merge_size")
    height, width = geometry.image_size or (16 * step, 16 * step)
    if height % step or width % step:
        return None  # the adapter's error names the multiple to use
    return geometry.images * geometry.frames * (height // step) * (width // step)


@dataclass(frozen=True)
class Family:
    text_type: str
    vision_type: str
    visual_tokens: Callable[[Config, Geometry], int | None]
    schedule: ReferenceSchedule = LLAVA_SCHEDULE


FAMILIES: dict[str, Family] = {
    "LlavaForConditionalGeneration": Family("llama", "clip_vision_model", _llava),
    "VideoLlavaForConditionalGeneration": Family("llama", "clip_vision_model", _video_llava),
    "LlavaNextForConditionalGeneration": Family("llama", "clip_vision_model", _any_resolution),
    "LlavaNextVideoForConditionalGeneration": Family("llama", "clip_vision_model", _llava_next_video),
    "LlavaOnevisionForConditionalGeneration": Family("qwen2", "siglip_vision_model", _llava_onevision),
    "Qwen2VLForConditionalGeneration": Family("qwen2_vl_text", "qwen2_vl_vision", _qwen2_vl, QWEN2_VL_SCHEDULE),
    "Qwen2_5_VLForConditionalGeneration": Family("qwen2_5_vl_text", "qwen2_5_vl_vision", _qwen2_vl, QWEN2_VL_SCHEDULE),
}


@dataclass(frozen=True)
class ConfigFacts:
    """What config.json says about a checkpoint: its supported architecture, the decoder depth and the scored visual
    tokens per prompt at the compiled geometry (None: known only once the model has loaded)."""

    architecture: str
    schedule: ReferenceSchedule
    num_layers: int | None
    num_visual: int | None


def read_config(model_dir: Path) -> dict:
    """The checkpoint's config.json; a one-line error when it is missing or unreadable."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir} has no config.json; pass a transformers checkpoint dir (save_pretrained)")
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read {path}: {error}; pass a transformers checkpoint dir") from None


def supported_architecture(config: dict) -> str:
    """The first of the config's architectures that clse-fx supports; a ValueError naming the supported ones."""
    architectures = config.get("architectures") or []
    supported = [name for name in architectures if name in FAMILIES]
    if not supported:
        raise ValueError(
            f"unsupported architecture {', '.join(architectures) or config.get('model_type', 'unknown')}; "
            f"clse-fx supports: {', '.join(sorted(FAMILIES))}"
        )
    return supported[0]


def config_facts(model_dir: Path, geometry: Geometry = Geometry()) -> ConfigFacts:
    """:class:`ConfigFacts` of the checkpoint in ``model_dir`` for ``geometry``, from its config.json alone."""
    data = read_config(model_dir)
    architecture = supported_architecture(data)
    family = FAMILIES[architecture]
    config = Config(data, family.text_type, family.vision_type)
    layers = config.text("num_hidden_layers") if config.text else None
    return ConfigFacts(architecture, family.schedule, layers, family.visual_tokens(config, geometry))
