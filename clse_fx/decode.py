"""The decode step: one new token per row against the pruned KV cache, built from the model's own modules.

Two forms share :func:`decoder_step`. :class:`DecodeStep` (the ONNX bundles' ``decode.onnx``): the step takes
each layer's past keys/values (any length, a dynamic dimension of the graph; lengths differ per layer under
the per-layer policy, so every layer's past length is its own dimension) and returns only the new token's
keys/values, which the runtime appends. :class:`StaticDecodeStep` (the torch-compile target): preallocated
buffers written in place, every shape fixed, so a compiler can capture it as one CUDA graph. Positions continue after
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


class _SlotCache:
    """``update`` writes the new token's keys/values into preallocated buffers at each layer's next slot (in
    place) and returns the whole buffers; the attention mask hides the slots not written yet."""

    def __init__(self, buffers: list[torch.Tensor], slots: list[torch.Tensor]) -> None:
        self.buffers, self.slots = buffers, slots

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        keys, values = self.buffers[2 * layer_idx], self.buffers[2 * layer_idx + 1]
        keys.index_copy_(2, self.slots[layer_idx], key)
        values.index_copy_(2, self.slots[layer_idx], value)
        return keys, values


def decoder_step(
    model: nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor, cache, masks: list[torch.Tensor]
) -> torch.Tensor:
    """One token per row through the model's own embedding, decoder layers (each with its [B, 1, 1, L_i] bool
    mask and ``cache``, whose ``update`` returns that layer's keys/values) and LM head: logits [B, 1, V]."""
    adapter = adapter_for(model)
    decoder = adapter.decoder()
    hidden = model.get_input_embeddings()(input_ids)
    position_ids = adapter.decode_position_ids(position_ids)
    position_embeddings = decoder.rotary_emb(hidden, position_ids)
    for layer, mask in zip(decoder.layers, masks):
        hidden = layer(
            hidden,
            attention_mask=mask,
            position_embeddings=position_embeddings,
            position_ids=position_ids,
            cache=cache,
            use_cache=True,
        )
    return adapter.lm_head()(decoder.norm(hidden))


class DecodeStep(nn.Module):
    """(input_ids [B,1], position_ids [B,1], pad_counts [B], past key/value per layer) -> (logits [B,1,V],
    new key/value per layer [B,Hkv,1,D]). ``pad_counts`` masks each row's left padding, which sits at the
    front of every layer's cache (padding is text, and text is never pruned)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, pad_counts: torch.Tensor, *past: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        cache = _StepCache(past)
        masks = []
        for keys in past[::2]:
            positions = torch.arange(keys.shape[2] + 1, device=input_ids.device)
            masks.append((positions[None, :] >= pad_counts[:, None])[:, None, None, :])  # [B, 1, 1, L]
        logits = decoder_step(self.model, input_ids, position_ids, cache, masks)
        return (logits, *cache.new)


class StaticDecodeStep(nn.Module):
    """The decode step on preallocated KV buffers, for compiled (CUDA-graph) generation: shapes never change.

    Layer i's buffers hold ``lengths[i]`` prompt slots plus ``max_new_tokens`` slots; :meth:`load` fills the
    prompt slots from a prefill's cache, and step ``t`` (a 0-d tensor, so one compiled graph serves every step)
    writes its token at slot ``lengths[i] + t`` and attends to ``[pad_counts, lengths[i] + t]``. The buffers are
    module buffers, so CUDA graphs see fixed addresses."""

    def __init__(self, model: nn.Module, prefill_cache: list[tuple[torch.Tensor, torch.Tensor]], max_new_tokens: int):
        super().__init__()
        self.model = model
        self.lengths = [key.shape[2] for key, _ in prefill_cache]
        for i, (key, _) in enumerate(prefill_cache):
            shape = (key.shape[0], key.shape[1], key.shape[2] + max_new_tokens, key.shape[3])
            for kind in ("key", "value"):
                self.register_buffer(f"{kind}_{i}", key.new_zeros(shape), persistent=False)

    def buffers_in_order(self) -> list[torch.Tensor]:
        return [getattr(self, f"{kind}_{i}") for i in range(len(self.lengths)) for kind in ("key", "value")]

    @torch.no_grad()
    def load(self, prefill_cache: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Copy a prefill's cache into the prompt slots (in place: compiled graphs keep their addresses)."""
        # Slots past the prompt need no clearing: the mask hides them until a step writes them.
        for buffer, tensor in zip(self.buffers_in_order(), (t for pair in prefill_cache for t in pair)):
            buffer[:, :, : tensor.shape[2]].copy_(tensor)

    def forward(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, step: torch.Tensor, pad_counts: torch.Tensor
    ) -> torch.Tensor:
        buffers = self.buffers_in_order()
        slots, masks = [], []
        for length, keys in zip(self.lengths, buffers[::2]):
            slot = (step + length).reshape(1)
            positions = torch.arange(keys.shape[2], device=input_ids.device)
            visible = (positions[None, :] >= pad_counts[:, None]) & (positions[None, :] <= slot)
            slots.append(slot)
            masks.append(visible[:, None, None, :])
        return decoder_step(self.model, input_ids, position_ids, _SlotCache(buffers, slots), masks)


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
