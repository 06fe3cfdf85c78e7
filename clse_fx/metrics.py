"""Machine-independent cost figures: FLOPs (torch.utils.flop_counter) and KV-cache bytes."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from clse_fx.plan import Plan


def count_flops(fn: Callable[..., object], *args: torch.Tensor) -> int:
    """FLOPs of one call of ``fn`` as counted by torch's FlopCounterMode (matmul-class ops)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn(*args)
    return counter.get_total_flops()


def kv_cache_tokens(plan: Plan, text_tokens: int, policy: str) -> list[int]:
    """Tokens each layer holds in its KV cache after prefill under ``policy`` ("uniform" or "per-layer")."""
    per_layer = [text_tokens + visual for visual in plan.visual_tokens_per_layer()]
    return [per_layer[-1]] * len(per_layer) if policy == "uniform" else per_layer


def kv_cache_bytes(tokens_per_layer: list[int], batch: int, kv_heads: int, head_dim: int, itemsize: int) -> int:
    """Bytes of keys plus values for ``tokens_per_layer`` across all layers."""
    return sum(2 * batch * kv_heads * tokens * head_dim * itemsize for tokens in tokens_per_layer)
