"""Model-family adapters; importing this package registers every supported family."""

from clse_fx.models import llava  # noqa: F401  (registers the adapter)
from clse_fx.models.base import ModelAdapter, adapter_for, register_adapter, supported_architectures

__all__ = ["ModelAdapter", "adapter_for", "register_adapter", "supported_architectures"]
