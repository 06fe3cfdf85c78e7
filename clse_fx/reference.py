"""The eager reference pruner: the test oracle for every compiled path.

It runs an unmodified `transformers` model's decoder-layer loop itself and applies the method
(docs/method.md) between layers. The embedding, the causal mask and the rotary tables come from the model's
own code (captured at the input of decoder layer 0); q and k come from the model's own attention modules
(captured by :func:`capture_attention_inputs`). Readable first, not fast.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from clse_fx.models import adapter_for
from clse_fx.plan import PEER_SCORES, PruneConfig, StageSpec
from clse_fx.scoring import last_query_attention, score_stage
from clse_fx.static_ops import select_topk


@contextlib.contextmanager
def capture_attention_inputs(decoder: torch.nn.Module) -> Iterator[dict[int, tuple]]:
    """While active, record each of ``decoder``'s layers' SDPA inputs (q, k, v, mask, scale) into the yielded
    dict, keyed by layer index: q and k after RoPE and before any GQA repeat.

    It overrides the "sdpa" entry of transformers' attention-function table (``AttentionInterface``) on its
    shared instance for the duration, and restores it on exit, also on error; attention modules of other
    models keep running plain SDPA, since only this decoder's modules are recorded.
    """
    layer_of = {layer.self_attn: index for index, layer in enumerate(decoder.layers)}
    records: dict[int, tuple] = {}
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]

    def capturing_sdpa(module, query, key, value, attention_mask, **kwargs):
        if module in layer_of:
            records[layer_of[module]] = (query, key, value, attention_mask, kwargs.get("scaling"))
        return sdpa(module, query, key, value, attention_mask, **kwargs)

    ALL_ATTENTION_FUNCTIONS["sdpa"] = capturing_sdpa  # an instance-local override of the shared table
    try:
        yield records
    finally:
        del ALL_ATTENTION_FUNCTIONS["sdpa"]
        if ALL_ATTENTION_FUNCTIONS["sdpa"] is not sdpa:  # the entry was itself a local override: put it back
            ALL_ATTENTION_FUNCTIONS["sdpa"] = sdpa


class _StopAtLayer0(Exception):
    pass


@dataclass
class ReferenceOutput:
    """Logits on the kept tokens, what each stage kept, and the KV cache after prefill.

    ``kept[j]``: [B, keep_j] indices into the row's visual tokens (0..N-1, grid order) kept by stage j.
    ``positions``: [B, S'] original sequence positions of the tokens the last layer ran on.
    ``cache[i]``: layer i's (key, value) [B, Hkv, S_i, D] under the KV policy, at ``cache_positions[i]``.
    """

    logits: torch.Tensor
    kept: list[torch.Tensor]
    positions: torch.Tensor
    cache: list[tuple[torch.Tensor, torch.Tensor]]
    cache_positions: list[torch.Tensor]
    # scores[j]: [B, N] float32 score of each visual id at stage j (NaN for ids an earlier stage dropped)
    scores: list[torch.Tensor] = field(default_factory=list)


def _layer0_inputs(model, adapter, model_inputs: dict) -> tuple[torch.Tensor, dict]:
    """Run the model up to decoder layer 0 and return its hidden states and keyword inputs."""
    captured = {}

    def hook(module, args, kwargs):
        captured["hidden"] = args[0] if args else kwargs["hidden_states"]
        captured["kwargs"] = kwargs
        raise _StopAtLayer0

    handle = adapter.decoder().layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model(**model_inputs, use_cache=False)
    except _StopAtLayer0:
        pass
    finally:
        handle.remove()
    return captured["hidden"], captured["kwargs"]


def _rows(mask: torch.Tensor) -> torch.Tensor:
    """Column indices of the True entries of each row of [B, S] ``mask`` (same count per row): [B, n]."""
    return mask.nonzero()[:, 1].reshape(mask.shape[0], -1)


def _gather_seq(x: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    """Gather sequence positions ``index`` [B, S'] along ``dim`` of x, whose batch dim is the one before it
    (it may be 1 and broadcast; position tables may carry a leading M-RoPE axis).

    Deliberately not the graph path's ``passes.ops.gather_sequence``: the oracle shares no gather code with
    what it checks."""
    dim = dim % x.dim()
    sizes = list(x.shape)
    sizes[dim - 1] = index.shape[0]
    x = x.expand(sizes)
    view = [1] * x.dim()
    view[dim - 1], view[dim] = index.shape
    sizes[dim] = index.shape[1]
    return x.gather(dim, index.reshape(view).expand(sizes))


def _tome_merge(
    z: torch.Tensor, metric: torch.Tensor, sizes: torch.Tensor, local: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row by row: each dropped token joins its most cosine-similar kept token (first on ties), and the kept
    token becomes the size-weighted average of itself and what joined it. Returns (merged, sizes) of the
    kept tokens, in ``local`` order."""
    merged_rows, size_rows = [], []
    for row in range(z.shape[0]):
        kept = local[row].tolist()
        dropped = [i for i in range(z.shape[1]) if i not in set(kept)]
        similarity = F.cosine_similarity(metric[row, dropped][:, None], metric[row, kept][None], dim=-1)
        target = similarity.argmax(dim=1)
        total = z[row, kept].float() * sizes[row, kept, None]
        size = sizes[row, kept].clone()
        total.index_add_(0, target, z[row, dropped].float() * sizes[row, dropped, None])
        size.index_add_(0, target, sizes[row, dropped])
        merged_rows.append(total / size[:, None])
        size_rows.append(size)
    return torch.stack(merged_rows), torch.stack(size_rows)


def _most(values: torch.Tensor, pool: list[int], count: int) -> list[int]:
    """The ``count`` members of ``pool`` with the largest ``values``, ties to the lower index."""
    return sorted(pool, key=lambda i: (-float(values[i]), i))[:count]


def dart_keep(
    z: torch.Tensor,
    key_norm: torch.Tensor,
    text: torch.Tensor,
    text_key_norm: torch.Tensor,
    keep: int,
    candidates: list[int],
    norm_weight: torch.Tensor | None = None,
    pivots: tuple[int, int] = (4, 4),
) -> list[int]:
    """DART (arXiv 2502.11494) on one row, as the authors' code does it: of the visual tokens ``z`` [n, C]
    (layer K-1 key L1 norms ``key_norm`` [n]) and the instruction tokens ``text`` [m, C] (``text_key_norm``),
    the pivots are the tokens of largest key norm (``pivots``: visual, text); the visual pivots are kept, then
    each pivot in turn takes its quota of the remaining candidates least cosine-similar to it (after the final
    norm's weight). Ties go to the lower index; the quota is the kept count left over, split over the pivots
    (the first ones take one more when it does not divide). A missing text pivot (fewer instruction tokens)
    finds every token equally similar. Returns the kept indices into ``z``."""
    weight = 1.0 if norm_weight is None else norm_weight.float()
    feats, text_feats = z.float() * weight, text.float() * weight
    image_pivots = sorted(_most(key_norm, candidates, min(pivots[0], keep)))
    text_pivots = sorted(_most(text_key_norm, list(range(len(text))), pivots[1]))
    pivot_feats = [feats[i] for i in image_pivots] + [text_feats[i] for i in text_pivots]
    pivot_feats += [None] * (pivots[1] - len(text_pivots))
    kept = list(image_pivots)
    pool = [i for i in candidates if i not in kept]
    rest = keep - len(image_pivots)
    for index, pivot in enumerate(pivot_feats):
        quota = rest // len(pivot_feats) + (index < rest % len(pivot_feats))
        if pivot is None:
            similarity = torch.zeros(len(z), device=z.device)
        else:
            similarity = F.cosine_similarity(pivot[None], feats, dim=-1)
        taken = _most(-similarity, pool, quota)
        kept += taken
        pool = [i for i in pool if i not in taken]
    return kept


def cdpruner_keep(
    z: torch.Tensor, text: torch.Tensor, keep: int, candidates: list[int]
) -> tuple[list[int], torch.Tensor]:
    """CDPruner (arXiv 2506.10967) on one row, as the authors' code does it: relevance r = min-max normalised
    (over the candidates, +1e-6) negated mean cosine similarity of each visual token ``z`` [n, C] to the
    instruction tokens ``text`` [m, C]; kernel L = diag(r) S diag(r) with S the visual cosine similarities;
    ``keep`` steps of greedy DPP MAP (Chen et al. 2018), taking the largest residual gain (first on ties).
    Gains at or below 1e-5 are spent: they count as 0, and choosing one changes no other gain. Returns the
    chosen indices in the order chosen and each token's closeness to being chosen [n]: the largest ratio of its
    gain to the chosen one's over the steps (1 for chosen and spent tokens, 0 for non-candidates), which tells a
    near-tie trade (another backend choosing a near-duplicate) from a divergence."""
    unit, text_unit = F.normalize(z.float(), dim=-1), F.normalize(text.float(), dim=-1)
    relevance = -(unit @ text_unit.T).mean(dim=1)
    low, high = relevance[candidates].min(), relevance[candidates].max()
    relevance = (relevance - low + 1e-6) / max(float(high - low), 1e-6)
    kernel = relevance[:, None] * (unit @ unit.T) * relevance[None, :]
    gains = torch.full((len(z),), float("-inf"), device=z.device)
    gains[candidates] = torch.diagonal(kernel)[candidates]
    rows: list[torch.Tensor] = []
    chosen: list[int] = []
    closeness = torch.zeros(len(z), device=z.device)
    for _ in range(keep):
        gains[(gains <= 1e-5) & (gains > float("-inf"))] = 0.0
        j = int(gains.argmax())
        ratio = gains / gains[j] if gains[j] > 0 else (gains == 0).float()
        closeness = torch.maximum(closeness, ratio.clamp(min=0))
        residual = kernel[j] - sum((row[j] * row for row in rows), torch.zeros(len(z), device=z.device))
        row = residual / float(gains[j]) ** 0.5 if gains[j] > 0 else torch.zeros(len(z), device=z.device)
        rows.append(row)
        gains = gains - row**2
        gains[j] = float("-inf")
        chosen.append(j)
    return chosen, closeness


def _peer_stage(
    spec: StageSpec,
    z: torch.Tensor,
    hidden: torch.Tensor,
    current_ids: torch.Tensor,
    visual: torch.Tensor,
    is_extra: torch.Tensor,
    key: torch.Tensor | None,
    norm_weight: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A DART or CDPruner stage, row by row with the oracles above: the kept local indices [B, visual_out]
    (extras included) and a [B, n] score, whose cut is 1 (DART: 1 chosen, 0 not; CDPruner: the closeness to
    being chosen; extras +inf). The instruction is every token after the row's last visual token; key norms sum
    |k| over heads and channels."""
    locals_, scores = [], torch.zeros(z.shape[:2], device=z.device)
    for row in range(z.shape[0]):
        last_visual = int(visual[row].nonzero().max())
        text = list(range(last_visual + 1, current_ids.shape[1]))
        candidates = [i for i in range(z.shape[1]) if not is_extra[row, i]]
        if spec.score == "dart":
            norms = key[row].float().abs().sum(dim=(0, 2))  # [S]
            vis_norms = norms[visual[row]]
            chosen = dart_keep(z[row], vis_norms, hidden[row, text], norms[text], spec.keep, candidates, norm_weight)
            scores[row, chosen] = 1.0
        else:
            chosen, scores[row] = cdpruner_keep(z[row], hidden[row, text], spec.keep, candidates)
        scores[row, is_extra[row]] = float("inf")
        locals_.append(sorted(chosen + is_extra[row].nonzero()[:, 0].tolist()))
    return torch.tensor(locals_, dtype=torch.long, device=z.device), scores


@torch.no_grad()
def reference_prune(
    model: torch.nn.Module,
    config: PruneConfig,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    **model_inputs: torch.Tensor,
) -> ReferenceOutput:
    """Prefill ``model`` on one batch with CLSE pruning per ``config`` and return a :class:`ReferenceOutput`."""
    adapter = adapter_for(model)
    decoder = adapter.decoder()
    plan = config.plan
    if plan.num_layers != adapter.num_layers:
        raise ValueError(f"the plan is for {plan.num_layers} layers but the model has {adapter.num_layers}")

    inputs = dict(input_ids=input_ids, attention_mask=attention_mask, **model_inputs)
    if pixel_values is not None:
        inputs["pixel_values"] = pixel_values
    hidden, layer_kwargs = _layer0_inputs(model, adapter, inputs)
    batch, seq = input_ids.shape

    visual = adapter.visual_mask(input_ids)
    num_visual = adapter.visual_count(input_ids)
    layout = adapter.prompt_layout({"input_ids": input_ids, **model_inputs})

    mask = layer_kwargs.get("attention_mask")
    cos, sin = layer_kwargs["position_embeddings"]
    position_ids = layer_kwargs.get("position_ids")
    device = input_ids.device
    positions = torch.arange(seq, device=device).expand(batch, seq)  # original position of every current token
    vis_index = _rows(visual)  # [B, n]: where the current visual tokens sit in the current sequence
    vis_id = torch.arange(num_visual, device=device).expand(batch, num_visual)  # their visual indices 0..N-1
    z_ref = _gather_seq(hidden, vis_index, 1) if num_visual else None

    # A prompt without an image is left unpruned.
    specs = {spec.layer: spec for spec in config.stage_specs(layout, adapter.visual_token_ids())} if num_visual else {}
    sizes = torch.ones(batch, num_visual, device=device)  # tokens each visual token stands for (merge="tome")
    kept: list[torch.Tensor] = []
    stage_scores: list[torch.Tensor] = []
    layer_positions: list[torch.Tensor] = []
    with capture_attention_inputs(decoder) as records:
        for layer_idx, layer in enumerate(decoder.layers):
            if layer_idx in specs:
                spec = specs[layer_idx]
                attn = key = None  # a stage before layer 0 (scores that read no layer K-1)
                if layer_idx > 0:
                    if layer_idx - 1 not in records:
                        raise ValueError(
                            "the reference pruner needs SDPA attention: load the model with attn_implementation='sdpa'"
                        )
                    query, key, _, layer_mask, scale = records[layer_idx - 1]
                    attn = last_query_attention(query, key, layer_mask, scale).gather(1, vis_index)
                z_cur = _gather_seq(hidden, vis_index, 1)
                is_extra = torch.isin(vis_id, torch.tensor(spec.extras, device=device)) if spec.extras else None
                if spec.score in PEER_SCORES:
                    current_ids = input_ids.gather(1, positions)
                    extra = is_extra if is_extra is not None else torch.zeros_like(vis_id, dtype=torch.bool)
                    weight = getattr(decoder.norm, "weight", None) if spec.score == "dart" else None
                    visual_now = adapter.visual_mask(current_ids)
                    local, scores = _peer_stage(spec, z_cur, hidden, current_ids, visual_now, extra, key, weight)
                else:
                    scores = score_stage(spec, attn=attn, z_ref=z_ref, z_cur=z_cur, is_extra=is_extra)
                    local = select_topk(scores, spec.visual_out)
                by_id = torch.full((batch, num_visual), float("nan"), device=device)
                stage_scores.append(by_id.scatter(1, vis_id, scores.to(torch.float32)))
                if config.merge == "tome":
                    metric = z_cur if config.merge_metric == "hidden" else _gather_seq(key.mean(dim=1), vis_index, 1)
                    merged, sizes = _tome_merge(z_cur, metric, sizes, local)
                kept.append(vis_id.gather(1, local))
                keep_mask = ~adapter.visual_mask(input_ids.gather(1, positions))
                keep_mask.scatter_(1, vis_index.gather(1, local), True)
                index = _rows(keep_mask)  # [B, S']: current tokens that survive, in sequence order

                if mask is None:  # SDPA's implicit causal mask: make it explicit so it can be gathered
                    mask = torch.ones(seq, seq, dtype=torch.bool, device=device).tril().expand(batch, 1, seq, seq)
                mask = mask.gather(2, index[:, None, :, None].expand(-1, mask.shape[1], -1, mask.shape[3]))
                mask = mask.gather(3, index[:, None, None, :].expand(-1, mask.shape[1], mask.shape[2], -1))
                hidden = _gather_seq(hidden, index, 1)
                cos, sin = (_gather_seq(t, index, -2) for t in (cos, sin))
                if position_ids is not None:
                    position_ids = _gather_seq(position_ids, index, -1)
                positions = positions.gather(1, index)
                vis_index = _rows(adapter.visual_mask(input_ids.gather(1, positions)))
                vis_id = kept[-1]
                if config.merge == "tome":
                    hidden = hidden.scatter(1, vis_index[..., None].expand_as(merged), merged.to(hidden.dtype))
            layer_positions.append(positions)
            hidden = layer(
                hidden,
                attention_mask=mask,
                position_embeddings=(cos, sin),
                position_ids=position_ids,
                use_cache=False,
            )

    logits = adapter.lm_head()(decoder.norm(hidden))
    cache, cache_positions = [], []
    for layer_idx in range(plan.num_layers):
        key, value = records[layer_idx][1:3]
        layer_pos = layer_positions[layer_idx]
        if config.kv_policy == "uniform" and layer_pos.shape[1] != positions.shape[1]:
            index = torch.searchsorted(layer_pos.contiguous(), positions)
            key, value = (
                t.gather(2, index[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[3])) for t in (key, value)
            )
            layer_pos = positions
        cache.append((key, value))
        cache_positions.append(layer_pos)
    return ReferenceOutput(
        logits=logits, kept=kept, positions=positions, cache=cache, cache_positions=cache_positions, scores=stage_scores
    )


@torch.no_grad()
def reference_generate(
    model: torch.nn.Module,
    config: PruneConfig,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 16,
    **model_inputs: torch.Tensor,
) -> torch.Tensor:
    """Greedy generation: :func:`reference_prune` prefill, then the unmodified model's own forward decodes
    against a transformers ``DynamicCache`` holding the pruned KV. Returns [B, max_new_tokens] token ids.

    Decode positions continue after the unpruned prompt length, shifted by the model's own rope deltas
    (M-RoPE). Each step is the unmodified model's forward, except for padded batches under the per-layer
    policy: there the layers' caches differ in length, which one model-level mask cannot describe, so the
    decoder layers run one by one, each with its cache's padding mask gathered from ``attention_mask`` at
    the positions that layer kept.
    """
    from transformers import DynamicCache

    out = reference_prune(model, config, input_ids, pixel_values, attention_mask, **model_inputs)
    adapter = adapter_for(model)
    inputs = dict(model_inputs, input_ids=input_ids, attention_mask=attention_mask)
    deltas = adapter.rope_deltas(inputs)[:, None]
    batch, seq = input_ids.shape
    padded = attention_mask is not None and not bool(attention_mask.all())
    cache = DynamicCache()
    for layer_idx, (key, value) in enumerate(out.cache):
        cache.update(key, value, layer_idx)
    # Per layer: which cached tokens are real (not padding); the model-level mask when all layers agree.
    kept_masks = [attention_mask.gather(1, positions) for positions in out.cache_positions] if padded else None
    token = out.logits[:, -1].argmax(dim=-1)
    generated = [token]
    for step in range(max_new_tokens - 1):
        position_ids = adapter.decode_position_ids(seq + step + deltas)
        if kept_masks is not None:
            kept_masks = [
                torch.cat([m, torch.ones(batch, 1, dtype=m.dtype, device=m.device)], dim=1) for m in kept_masks
            ]
        if kept_masks is None or config.kv_policy == "uniform":
            mask = kept_masks[-1] if kept_masks else None
            logits = model(
                input_ids=token[:, None], attention_mask=mask, position_ids=position_ids, cache=cache, use_cache=True
            ).logits
        else:
            logits = _decode_layer_by_layer(model, adapter, token, position_ids, kept_masks, cache)
        token = logits[:, -1].argmax(dim=-1)
        generated.append(token)
    return torch.stack(generated, dim=1)


def _decode_layer_by_layer(model, adapter, token, position_ids, kept_masks, cache) -> torch.Tensor:
    """One decode step through the model's own modules, with a padding mask per layer ([B, L_i] bool)."""
    decoder = adapter.decoder()
    hidden = model.get_input_embeddings()(token[:, None])
    position_embeddings = decoder.rotary_emb(hidden, position_ids)
    for layer, kept in zip(decoder.layers, kept_masks):
        hidden = layer(
            hidden,
            attention_mask=kept.bool()[:, None, None, :],
            position_embeddings=position_embeddings,
            position_ids=position_ids,
            cache=cache,
            use_cache=True,
        )
    return adapter.lm_head()(decoder.norm(hidden))
