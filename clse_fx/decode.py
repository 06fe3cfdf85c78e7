"""The decode step: one new token per row against the pruned KV cache, built from the model's own modules.

KV buffers grow: the step takes each layer's past keys/values (any length, a dynamic dimension of the
graph) and returns only the new token's keys/values, which the runtime appends. Lengths differ per layer
under the per-layer policy, so every layer's past length is its own dimension. Positions continue after
the *unpruned* prompt length (pruning removes tokens, it never renumbers them), shifted per row by the prompt's
rope delta under M-RoPE (the runtime adds it; the adapter spreads the ids over the rotary axes).
"""

from __future__ import annotations

import torch
from torch import nn

from clse_fx.models import adapter_for


class _StepCache:
    """The slice of transformers' Cache API the attention layers use: ``update`` returns past + new."""

    def __init__(self, past: tuple[torch.Tensor, ...]) -> None:
        self.past = past
        self.new: list[torch.Tensor] = []

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        self.new += [key, value]
        past_key, past_value = self.past[2 * layer_idx], self.past[2 * layer_idx + 1]
        return torch.cat([past_key, key], dim=2), torch.cat([past_value, value], dim=2)


class DecodeStep(nn.Module):
    """(input_ids [B,1], position_ids [B,1], pad_counts [B], past key/value per layer) -> (logits [B,1,V],
    new key/value per layer [B,Hkv,1,D]). ``pad_counts`` masks each row's left padding, which sits at the
    front of every layer's cache (padding is text, and text is never pruned)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.adapter = adapter_for(model)

    def forward(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, pad_counts: torch.Tensor, *past: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        decoder = self.adapter.decoder()
        hidden = self.model.get_input_embeddings()(input_ids)
        position_ids = self.adapter.decode_position_ids(position_ids)
        position_embeddings = decoder.rotary_emb(hidden, position_ids)
        cache = _StepCache(past)
        for layer_idx, layer in enumerate(decoder.layers):
            length = past[2 * layer_idx].shape[2] + 1
            keys = torch.arange(length, device=input_ids.device)
            mask = (keys[None, :] >= pad_counts[:, None])[:, None, None, :]  # [B, 1, 1, L]
            hidden = layer(
                hidden,
                attention_mask=mask,
                position_embeddings=position_embeddings,
                position_ids=position_ids,
                cache=cache,
                use_cache=True,
            )
        logits = self.adapter.lm_head()(decoder.norm(hidden))
        return (logits, *cache.new)


def decode_example(prefill_cache: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, ...]:
    """Example decode inputs shaped like the first step after a prefill that produced ``prefill_cache``."""
    key = prefill_cache[0][0]
    past = tuple(t for pair in prefill_cache for t in pair)
    zeros = torch.zeros(key.shape[0], 1, dtype=torch.long, device=key.device)
    return (zeros, zeros.clone(), zeros[:, 0].clone(), *past)


def export_decode(model: nn.Module, prefill_cache: list[tuple[torch.Tensor, torch.Tensor]]):
    """torch.export the decode step with each layer's past length dynamic."""
    args = decode_example(prefill_cache)
    # Dim.DYNAMIC rather than named Dims: SDPA's stride guards (min(32 + 32 L, 64 + 64 L) == 32 + 32 L) hold
    # for every L >= 1 but are beyond what export can prove for a declared range.
    dims = [{2: torch.export.Dim.DYNAMIC} for _ in range(2 * len(prefill_cache))]
    with torch.no_grad():
        return torch.export.export(
            DecodeStep(model), args, dynamic_shapes=(None, None, None, tuple(dims)), strict=False
        )
