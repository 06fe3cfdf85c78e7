"""Static-shape torch functions that the passes insert into graphs as call_function nodes.

Re-exporting the rewritten graph traces through them into plain ATen ops, so they must avoid
data-dependent shapes (no nonzero / masked_select) and FFTs: the engines need fixed shapes and constant K.
"""

from __future__ import annotations

import torch
from torch import fx

from clse_fx.peer_scores import Instruction, key_l1_norm, query_tokens
from clse_fx.plan import PEER_SCORES, StageSpec
from clse_fx.scoring import last_query_attention, merge_into_kept, score_stage
from clse_fx.static_ops import compact_true, member_mask, running_count, take_rows, topk_mask, visual_mask


def gather_sequence(
    x: torch.Tensor, index: torch.Tensor, batch_dim: int | None, seq_dims: tuple[int, ...]
) -> torch.Tensor:
    """Gather [B, S'] sequence ``index`` along each of ``seq_dims`` of ``x``.

    ``batch_dim`` is x's batch dimension (it may have size 1 and broadcast); None means x has no batch
    dimension and is shared by all rows, which is only well-defined for a batch of one.
    """
    if batch_dim is None:
        if index.shape[0] != 1:
            raise ValueError("a sequence tensor without a batch dim cannot be gathered per row for batch > 1")
        batch_dim, x = 0, x.unsqueeze(0)
        seq_dims = tuple(d + 1 for d in seq_dims)
        squeeze = True
    else:
        squeeze = False
    sizes = list(x.shape)
    sizes[batch_dim] = index.shape[0]
    x = x.expand(sizes)
    for dim in seq_dims:
        view = [1] * x.dim()
        view[batch_dim], view[dim] = index.shape
        sizes = list(x.shape)
        sizes[dim] = index.shape[1]
        x = x.gather(dim, index.reshape(view).expand(sizes))
    return x.squeeze(0) if squeeze else x


def sequence_positions(input_ids: torch.Tensor) -> torch.Tensor:
    """[B, S] original positions 0..S-1 of every token."""
    return torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)


def clse_stage(
    input_ids: torch.Tensor,
    positions: torch.Tensor,
    hidden: torch.Tensor,
    hidden_ref: torch.Tensor | None,
    query: torch.Tensor | None,
    key: torch.Tensor | None,
    mask: torch.Tensor | None,
    previous_kept: torch.Tensor | None,
    previous_sizes: torch.Tensor | None,
    norm_weight: torch.Tensor | None = None,
    *,
    spec: StageSpec,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """One CLSE stage on the current sequence.

    ``positions`` [B, S] are the original positions of the current tokens; ``hidden_ref`` is the full
    sequence at the reference layer (only read by spectral scores, on the first stage); ``query`` / ``key`` /
    ``mask`` are layer K-1's attention inputs (None for a stage before layer 0); ``norm_weight`` the decoder's
    final norm weight (read by DART only); ``previous_kept`` /
    ``previous_sizes`` are the previous stage's kept ids and merged sizes (None on the first). Returns the
    [B, S'] current-sequence index of the survivors, their original positions, the kept visual ids
    (0..N-1) [B, keep], and with ``merge="tome"`` the kept tokens' sizes and merged hidden states
    [B, keep, C] (else None twice).
    """
    # Visual positions in and out: the scored tokens plus the layout's extras, which every stage keeps.
    keep, num_current = spec.visual_out, spec.visual_in
    current_ids = input_ids.gather(1, positions)
    is_visual = visual_mask(current_ids, spec.token_ids)
    vis_index = compact_true(is_visual, num_current)  # [B, n] in sequence order
    z_cur = take_rows(hidden, vis_index)
    z_ref = z_cur if hidden_ref is None else take_rows(hidden_ref, vis_index)
    attn = None if query is None else last_query_attention(query, key, mask, spec.scale).gather(1, vis_index)
    vis_ids = torch.arange(num_current, device=hidden.device).expand_as(vis_index)
    current = vis_ids if previous_kept is None else previous_kept  # the row's visual ids (0..N-1) of each token
    is_extra = member_mask(current, spec.extras) if spec.extras else None
    key_norm = instruction = None
    if spec.score in PEER_SCORES:
        key_norm = None if key is None else key_l1_norm(key)
        instruction = Instruction(hidden, query_tokens(is_visual), key_norm, norm_weight)
        key_norm = None if key_norm is None else key_norm.gather(1, vis_index)
    scores = score_stage(
        spec, attn=attn, z_ref=z_ref, z_cur=z_cur, is_extra=is_extra, key_norm=key_norm, instruction=instruction
    )
    chosen = topk_mask(scores, keep)
    local = compact_true(chosen, keep)
    kept = current.gather(1, local)
    # Membership by comparison rather than a scatter of True: TensorRT takes neither a BOOL scatter nor a
    # BOOL ConstantOfShape fill. O(S x keep) compares per row.
    kept_positions = vis_index.gather(1, local)
    sequence = torch.arange(positions.shape[1], device=positions.device)
    survivors = ~is_visual | (sequence[None, :, None] == kept_positions[:, None, :]).any(dim=-1)
    index = compact_true(survivors, positions.shape[1] - num_current + keep)
    sizes = merged = None
    if spec.merge == "tome":
        pruned = compact_true(~chosen, num_current - keep)
        metric = z_cur if spec.merge_metric == "hidden" else take_rows(key.mean(dim=1), vis_index)
        current_sizes = torch.ones_like(scores) if previous_sizes is None else previous_sizes
        z_kept, z_pruned, s_kept, s_pruned, m_kept, m_pruned = (
            take_rows(x, i) for x in (z_cur, current_sizes, metric) for i in (local, pruned)
        )
        merged, sizes = merge_into_kept(z_kept, z_pruned, s_kept, s_pruned, m_kept, m_pruned)
    return index, positions.gather(1, index), kept, sizes, merged


def place_merged(
    hidden: torch.Tensor,
    input_ids: torch.Tensor,
    positions: torch.Tensor,
    merged: torch.Tensor,
    token_ids: tuple[int, ...],
) -> torch.Tensor:
    """Write the merged visual tokens [B, keep, C] over the visual positions of the pruned sequence."""
    slots = compact_true(visual_mask(input_ids.gather(1, positions), token_ids), merged.shape[1])
    return hidden.scatter(1, slots[..., None].expand(-1, -1, hidden.shape[-1]), merged.to(hidden.dtype))


def masked_scatter_static(x: torch.Tensor, mask: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """``x.masked_scatter(mask, source)`` for token masks, without NonZero: the k-th masked token (row-major
    over batch and sequence) takes source's k-th row, found by a running count, so shapes stay static.

    MLLMs place whole feature vectors, so the mask is the same across the last (channel) dim; it is read
    from channel 0.
    """
    tokens = mask.expand_as(x)[..., 0].reshape(-1)  # [B*S]
    rows = source.reshape(-1, x.shape[-1]).to(x.dtype)
    take = (running_count(tokens, dim=0) - 1).clamp(min=0, max=rows.shape[0] - 1)
    flat = x.reshape(-1, x.shape[-1])
    return torch.where(tokens[:, None], rows[take], flat).reshape(x.shape)


def stage_nodes(graph: fx.Graph) -> list[tuple[StageSpec, fx.Node]]:
    """The stages inserted into ``graph``, in order: each one's spec and its [B, S'] survivor-index node.

    Later passes read the stages from the graph itself, so their only contract with ``insert_clse_stages``
    is this op and its first output."""
    found = []
    for node in graph.nodes:
        if node.op == "call_function" and node.target is clse_stage:
            index = next(user for user in node.users if user.args[1] == 0)
            found.append((node.kwargs["spec"], index))
    return found
