"""Model-family adapters; importing this package registers every supported family."""

from clse_fx.models import llava, llava_next_video, qwen2_vl  # noqa: F401  (registers the adapters)
from clse_fx.models.base import ModelAdapter, adapter_for, register_adapter, supported_architectures

__all__ = ["ModelAdapter", "adapter_for", "register_adapter", "supported_architectures"]
