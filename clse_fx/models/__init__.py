"""Model-family adapters; importing this package registers every supported family."""

from clse_fx.models import (  # noqa: F401  (importing a family module registers it)
    llava,
    llava_next,
    llava_next_video,
    llava_onevision,
    qwen2_vl,
    video_llava,
)
from clse_fx.models.base import (
    DeployRecipe,
    ExampleInputs,
    Family,
    ModelAdapter,
    adapter_for,
    deploy_recipe_for,
    examples_for,
    register_family,
    registered_families,
    supported_architectures,
)

__all__ = [
    "DeployRecipe",
    "ExampleInputs",
    "Family",
    "ModelAdapter",
    "adapter_for",
    "deploy_recipe_for",
    "examples_for",
    "register_family",
    "registered_families",
    "supported_architectures",
]
