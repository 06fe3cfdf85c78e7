"""The decode step: one new token per row against the pruned KV cache, built from the model's own modules.

Three forms share :func:`decoder_step`. :class:`DecodeStep` (the portable ``decode.onnx`` of the onnxruntime-gpu
and tensorrt targets, and ``decode.pt2``): the step takes each layer's KV *buffer* (capacity a dynamic dimension of the
graph, one per layer: pruned lengths differ per layer under the per-layer policy) and how many of its slots are
filled, and returns only the new token's keys/values, which the runtime writes at the next slot of its
preallocated buffers (O(1) per step: no cache grows or is copied, ``clse_fx.deploy.loop``). Graphs are
functional, so writing the new key into the buffer inside the graph would copy the whole buffer every step;
instead :func:`slot_attention` attends to the buffer's filled slots and to the new key separately (one softmax
over both). :class:`StaticDecodeStep` (the torch-compile target): buffers owned by the module and written in
place, every shape fixed, so a compiler can capture it as one CUDA graph; it masks like :class:`DecodeStep`
(:func:`visible_slots`). :class:`InPlaceDecodeStep` (the onnxruntime target's ``decode.onnx``): the same inputs,
attention through ONNX Runtime's GroupQueryAttention (:func:`group_query_attention`), which writes the new
key/value into the buffer it reads; the graph returns each buffer with the token written (a copy in PyTorch, the
buffer itself where ONNX Runtime binds the output to the input's memory). Positions continue after
the *unpruned* prompt length (pruning removes tokens, it never renumbers them), shifted per row by the prompt's
rope delta under M-RoPE (the runtime adds it; the adapter spreads the ids over the rotary axes).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AttentionInterface

from clse_fx.models import adapter_for

SLOT_ATTENTION = "clse_slot"
IN_PLACE_ATTENTION = "clse_in_place"


class _BufferCache:
    """The slice of transformers' Cache API the attention layers use: ``update`` keeps the new token's
    key/value (the step's outputs) and hands :func:`slot_attention` (buffer, new) pairs, copying nothing."""

    def __init__(self, buffers: tuple[torch.Tensor, ...]) -> None:
        self.buffers = buffers
        self.new: list[torch.Tensor] = []

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        self.new += [key, value]
        return (self.buffers[2 * layer_idx], key), (self.buffers[2 * layer_idx + 1], value)


def slot_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention of one new token per row over a KV buffer plus its own key/value, without joining them.

    ``key``/``value`` are (buffer [B, Hkv, C, D], new [B, Hkv, 1, D]) pairs from :class:`_BufferCache`;
    ``attention_mask`` [B, 1, 1, C] marks the buffer slots to attend to (filled, not padding); the new token
    always attends to itself. One softmax over the buffer's scores and the new token's, as the model's SDPA
    over the concatenated cache computes; grouped-query heads read their shared KV head by reshaping the
    query, never by repeating the cache. Returns [B, 1, H, D] like transformers' attention functions."""
    (keys, new_key), (values, new_value) = key, value
    batch, heads, steps, dim = query.shape  # steps == 1
    grouped = query.reshape(batch, keys.shape[1], heads // keys.shape[1] * steps, dim)  # [B, Hkv, G, D]
    scale = dim**-0.5 if scaling is None else scaling
    past = torch.matmul(grouped, keys.transpose(2, 3)) * scale  # [B, Hkv, G, C]
    past = past.masked_fill(~attention_mask, float("-inf"))
    own = (grouped * new_key).sum(dim=-1, keepdim=True) * scale  # [B, Hkv, G, 1]
    probs = torch.softmax(torch.cat([past, own], dim=-1), dim=-1, dtype=torch.float32).to(query.dtype)
    out = torch.matmul(probs[..., :-1], values) + probs[..., -1:] * new_value  # [B, Hkv, G, D]
    return out.reshape(batch, heads, steps, dim).transpose(1, 2).contiguous(), None


AttentionInterface.register(SLOT_ATTENTION, slot_attention)


@torch.library.custom_op("clse::group_query_attention", mutates_args=())
def group_query_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    past_key: torch.Tensor,
    past_value: torch.Tensor,
    seqlens_k: torch.Tensor,
    total_sequence_length: torch.Tensor,
    attention_bias: torch.Tensor,
    num_heads: int,
    kv_num_heads: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What ONNX Runtime's ``com.microsoft::GroupQueryAttention`` computes for one new token per row (no rotary,
    no softcap, causal), here functionally; the ONNX export emits that op (clse_fx/export/group_query_attention.py).

    query [B, 1, H*D], key/value [B, 1, Hkv*D] (heads packed), past_key/past_value [B, Hkv, C, D]; row b's new
    key/value goes to slot ``seqlens_k[b]`` (int32 [B]) of the present buffers (copies of the past ones: ONNX
    Runtime writes into the past buffer itself when the output is bound to it), and its query attends to slots
    ``[0, seqlens_k[b]]`` plus ``attention_bias`` [B or 1, 1, 1, T] (T = ``total_sequence_length``, an int32
    scalar, here the capacity C). Returns (output [B, 1, H*D], present_key, present_value)."""
    batch, dim = query.shape[0], past_key.shape[3]
    rows, slots = torch.arange(batch, device=query.device), seqlens_k.long()
    present_key, present_value = past_key.clone(), past_value.clone()
    present_key[rows, :, slots] = key.reshape(batch, kv_num_heads, dim)
    present_value[rows, :, slots] = value.reshape(batch, kv_num_heads, dim)
    total = int(total_sequence_length)
    grouped = query.reshape(batch, kv_num_heads, num_heads // kv_num_heads, dim)  # query head h reads KV head h // G
    scores = torch.matmul(grouped, present_key[:, :, :total].transpose(2, 3)) * scale + attention_bias
    unwritten = torch.arange(total, device=query.device)[None, :] > slots[:, None]
    scores = scores.masked_fill(unwritten[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    output = torch.matmul(probs, present_value[:, :, :total])  # [B, Hkv, G, D]
    return output.reshape(query.shape), present_key, present_value


@group_query_attention.register_fake
def _(query, key, value, past_key, past_value, seqlens_k, total_sequence_length, attention_bias, *attributes):
    return torch.empty_like(query), torch.empty_like(past_key), torch.empty_like(past_value)


@dataclass
class SharedSlots:
    """What :func:`in_place_attention` needs besides q/k/v, passed in a layer's ``attention_mask`` argument:
    ``seqlens_k`` [B] int32, the slot of each row's new token (the layer's filled slots); ``total`` (int32
    scalar), the buffers' capacity C; ``bias`` [B, 1, 1, C], 0 on the slots a row attends to and -inf on its left
    padding; ``presents``, where each layer appends its present key and value."""

    seqlens_k: torch.Tensor
    total: torch.Tensor
    bias: torch.Tensor
    presents: list[torch.Tensor]


def shared_slots(keys: torch.Tensor, pad_counts: torch.Tensor, filled: torch.Tensor, presents: list) -> SharedSlots:
    """:class:`SharedSlots` of a layer whose key buffer is ``keys`` [B, Hkv, C, D] with ``filled`` (a 0-d tensor)
    slots in use. ``total`` is the capacity, not the filled length: the op reads only slots up to each row's
    ``seqlens_k``, and the capacity keeps the bias independent of the step."""
    batch, capacity = keys.shape[0], keys.shape[2]
    visible = torch.arange(capacity, device=keys.device)[None, :] >= pad_counts[:, None]
    bias = torch.zeros((), dtype=keys.dtype, device=keys.device).masked_fill(~visible, float("-inf"))
    return SharedSlots(
        seqlens_k=filled.to(torch.int32).expand(batch),
        total=torch.full((), capacity, dtype=torch.int32, device=keys.device),
        bias=bias[:, None, None, :],
        presents=presents,
    )


def in_place_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention of one new token per row through :func:`group_query_attention`: ``key``/``value`` are (buffer,
    new) pairs from :class:`_BufferCache`, ``attention_mask`` the layer's :class:`SharedSlots`, which receives
    the present buffers. Returns [B, 1, H, D] like transformers' attention functions."""
    (past_key, new_key), (past_value, new_value) = key, value
    batch, heads, steps, dim = query.shape  # steps == 1

    def packed(states: torch.Tensor) -> torch.Tensor:  # [B, N, S, D] -> [B, S, N*D], the op's layout
        return states.transpose(1, 2).reshape(batch, steps, -1)

    slots: SharedSlots = attention_mask
    output, present_key, present_value = group_query_attention(
        packed(query),
        packed(new_key),
        packed(new_value),
        past_key,
        past_value,
        slots.seqlens_k,
        slots.total,
        slots.bias,
        heads,
        past_key.shape[1],
        dim**-0.5 if scaling is None else scaling,
    )
    slots.presents += [present_key, present_value]
    return output.reshape(batch, steps, heads, dim), None


AttentionInterface.register(IN_PLACE_ATTENTION, in_place_attention)


@contextmanager
def _attention_implementation(model: nn.Module, name: str):
    """Run the decoder layers' attention through ``name`` (a registered attention function) for the block."""
    configs = {id(layer.self_attn.config): layer.self_attn.config for layer in adapter_for(model).decoder().layers}
    previous = {key: config._attn_implementation for key, config in configs.items()}
    for config in configs.values():
        config._attn_implementation = name
    try:
        yield
    finally:
        for key, config in configs.items():
            config._attn_implementation = previous[key]


def visible_slots(capacity: int, pad_counts: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
    """[B, 1, 1, capacity] bool: the buffer slots a row attends to, from its first non-padding slot (left
    padding sits at the front of every layer's cache: padding is text, and text is never pruned) up to ``end``
    (exclusive; slots from there on are not written yet)."""
    positions = torch.arange(capacity, device=pad_counts.device)[None, :]
    return ((positions >= pad_counts[:, None]) & (positions < end))[:, None, None, :]


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
    model: nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor, cache, masks: list
) -> torch.Tensor:
    """One token per row through the model's own embedding, decoder layers (each with its mask, as its attention
    function takes it, and ``cache``, whose ``update`` returns that layer's keys/values) and LM head: logits
    [B, 1, V]."""
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
    """(input_ids [B,1], position_ids [B,1], pad_counts [B], cache_lengths [L], KV buffer per layer
    [B,Hkv,C_i,D]) -> (logits [B,1,V], new key/value per layer [B,Hkv,1,D]). Layer i's buffer holds its cache in
    slots ``[0, cache_lengths[i])`` (the rest is not read: the runtime writes the new key/value at slot
    ``cache_lengths[i]`` after the step); ``pad_counts`` masks each row's left padding."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        pad_counts: torch.Tensor,
        cache_lengths: torch.Tensor,
        *buffers: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        return self.step(input_ids, position_ids, pad_counts, cache_lengths, buffers)

    def step(self, input_ids, position_ids, pad_counts, cache_lengths, buffers: tuple) -> tuple[torch.Tensor, ...]:
        """The step on :meth:`forward`'s inputs, the buffers as one tuple (a subclass may attend otherwise)."""
        cache = _BufferCache(buffers)
        masks = [visible_slots(keys.shape[2], pad_counts, cache_lengths[i]) for i, keys in enumerate(buffers[::2])]
        with _attention_implementation(self.model, SLOT_ATTENTION):
            logits = decoder_step(self.model, input_ids, position_ids, cache, masks)
        return (logits, *cache.new)


class InPlaceDecodeStep(DecodeStep):
    """:class:`DecodeStep`'s inputs -> (logits [B,1,V], present key/value per layer [B,Hkv,C_i,D]): layer i's
    buffers with the new token's key/value at slot ``cache_lengths[i]``, written by ONNX Runtime's
    GroupQueryAttention (:func:`group_query_attention`) into the very buffers the runtime binds as both input and
    output. With ``equal_lengths`` (every layer's cache as long, as under the uniform KV policy; export then gives
    all buffers one capacity) the op's lengths and padding bias are computed once for every layer; otherwise
    once per layer."""

    def __init__(self, model: nn.Module, equal_lengths: bool) -> None:
        super().__init__(model)
        self.equal_lengths = equal_lengths

    def step(self, input_ids, position_ids, pad_counts, cache_lengths, buffers: tuple) -> tuple[torch.Tensor, ...]:
        presents: list[torch.Tensor] = []
        if self.equal_lengths:
            slots = [shared_slots(buffers[0], pad_counts, cache_lengths[0], presents)] * (len(buffers) // 2)
        else:
            slots = [shared_slots(keys, pad_counts, cache_lengths[i], presents) for i, keys in enumerate(buffers[::2])]
        with _attention_implementation(self.model, IN_PLACE_ATTENTION):
            logits = decoder_step(self.model, input_ids, position_ids, _BufferCache(buffers), slots)
        return (logits, *presents)


class StaticDecodeStep(nn.Module):
    """The decode step on preallocated KV buffers, for compiled (CUDA-graph) generation: shapes never change.

    Layer i's buffers hold ``lengths[i]`` prompt slots plus ``max_new_tokens`` slots; :meth:`load` fills the
    prompt slots from a prefill's cache, and step ``t`` (a 0-d tensor, so one compiled graph serves every step)
    writes its token at slot ``lengths[i] + t`` (in place: unlike an exported graph, a module may) and attends to
    ``[pad_counts, lengths[i] + t]``. The buffers are module buffers, so CUDA graphs see fixed addresses."""

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
            slots.append(slot)
            masks.append(visible_slots(keys.shape[2], pad_counts, slot + 1))
        return decoder_step(self.model, input_ids, position_ids, _SlotCache(buffers, slots), masks)


def kv_buffers(prefill_cache: list[tuple[torch.Tensor, torch.Tensor]], free_slots: int) -> list[torch.Tensor]:
    """Each layer's key and value buffer: its prefill cache followed by ``free_slots`` empty slots."""
    return [
        torch.cat([t, t.new_zeros(*t.shape[:2], free_slots, t.shape[3])], dim=2) for pair in prefill_cache for t in pair
    ]


def decode_example(prefill_cache: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, ...]:
    """Example decode inputs shaped like the first step after a prefill that produced ``prefill_cache``, with
    buffers of two free slots (any capacity works: it is a dynamic dimension of the exported step)."""
    key = prefill_cache[0][0]
    zeros = torch.zeros(key.shape[0], 1, dtype=torch.long, device=key.device)
    lengths = torch.tensor([k.shape[2] for k, _ in prefill_cache], device=key.device)
    return (zeros, zeros.clone(), zeros[:, 0].clone(), lengths, *kv_buffers(prefill_cache, 2))


def equal_lengths(prefill_cache: list[tuple[torch.Tensor, torch.Tensor]]) -> bool:
    """Whether every layer's cache is as long (the uniform KV policy; per-layer pruning makes them differ)."""
    return len({key.shape[2] for key, _ in prefill_cache}) == 1


def export_decode(
    model: nn.Module, prefill_cache: list[tuple[torch.Tensor, torch.Tensor]], in_place: bool = False
) -> torch.export.ExportedProgram:
    """torch.export the decode step (:class:`InPlaceDecodeStep` with ``in_place``, else :class:`DecodeStep`)
    with each layer's buffer capacity dynamic (one capacity for every buffer of an in-place step whose layers'
    caches are equally long)."""
    args = decode_example(prefill_cache)
    # Dim.DYNAMIC rather than named Dims: SDPA's stride guards (min(32 + 32 L, 64 + 64 L) == 32 + 32 L) hold
    # for every L >= 1 but are beyond what export can prove for a declared range. The in-place step has no SDPA.
    dims = [{2: torch.export.Dim.DYNAMIC} for _ in range(2 * len(prefill_cache))]
    step = DecodeStep(model)
    if in_place:
        step = InPlaceDecodeStep(model, equal_lengths(prefill_cache))
        if step.equal_lengths:
            dims = [{2: torch.export.Dim("capacity")}] * len(dims)
    with torch.no_grad():
        return torch.export.export(step, args, dynamic_shapes=(None, None, None, None, tuple(dims)), strict=False)
