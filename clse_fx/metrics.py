"""Machine-independent cost figures, defined once (docs/method.md#cost): prefill FLOPs and KV-cache bytes.

- FLOPs are counted by ``torch.utils.flop_counter`` (matmul-class ops) on one call of a graph. The *unpruned*
  figure is the model's traced prefill before any pruning pass (what ``torch.export`` records of the
  unmodified forward at the same shapes), the *pruned* one the compiled program: both count the same graph
  form, and both run on weightless (meta-device) models.
- KV bytes are keys plus values of every layer after prefill: ``2 * batch * kv_heads * tokens * head_dim *
  itemsize`` summed over layers, with the tokens each layer holds under a KV policy, or all of them unpruned.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch._subclasses.fake_tensor import FakeTensorMode  # what torch.export traces with; public in all but name
from torch.utils.flop_counter import FlopCounterMode

from clse_fx.compiler import PrunedPrefill
from clse_fx.passes.strip_asserts import remove_asserts
from clse_fx.plan import Plan
from clse_fx.trace import example_args, trace_prefill

KV_ACCOUNTS = ("uniform", "per-layer", "unpruned")


def count_flops(fn: Callable[..., object], *args: torch.Tensor) -> int:
    """FLOPs of one call of ``fn`` as counted by torch's FlopCounterMode (matmul-class ops), on fake tensors: the
    shapes alone decide the count, so nothing is computed (at 7B on a CPU each real call took minutes)."""
    with torch.no_grad(), FakeTensorMode(allow_non_fake_inputs=True) as fake, FlopCounterMode(display=False) as counter:
        fn(*(fake.from_tensor(arg) if isinstance(arg, torch.Tensor) else arg for arg in args))
    return counter.get_total_flops()


def prefill_flops(pruned: PrunedPrefill) -> int:
    """FLOPs of one call of the compiled (pruned) prefill program on its example inputs."""
    return count_flops(pruned.program.module(), *pruned.example_args)


def unpruned_prefill_flops(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> int:
    """FLOPs of the model's traced prefill on ``inputs`` before any pass; its runtime checks are removed, as they
    read tensor values, which weightless (meta-device) models do not have."""
    return count_flops(remove_asserts(trace_prefill(model, inputs)), *example_args(model, inputs))


def kv_cache_tokens(plan: Plan, non_visual: int, policy: str) -> list[int]:
    """Tokens each layer holds in its KV cache after prefill: ``non_visual`` (text and markers) plus the visual
    tokens the layer ran on ("per-layer"), the final kept set in every layer ("uniform"), or all ("unpruned")."""
    if policy not in KV_ACCOUNTS:
        raise ValueError(f"unknown KV policy {policy!r}; choose one of {', '.join(KV_ACCOUNTS)}")
    if policy == "unpruned":
        return [non_visual + plan.num_visual] * plan.num_layers
    per_layer = [non_visual + visual for visual in plan.visual_tokens_per_layer()]
    return [per_layer[-1]] * len(per_layer) if policy == "uniform" else per_layer


def kv_cache_bytes(text_config, tokens_per_layer: list[int], batch: int, itemsize: int) -> int:
    """Bytes of keys plus values for ``tokens_per_layer`` across all layers of a decoder with ``text_config``."""
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    return sum(
        2 * batch * text_config.num_key_value_heads * tokens * head_dim * itemsize for tokens in tokens_per_layer
    )
