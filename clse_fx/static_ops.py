"""Static-shape tensor primitives: nonzero, top-K and membership formulated with fixed output shapes.

Engines built at a fixed token budget need every shape known at build time, and TensorRT rejects some ops
and types (docs/graph.md#static-compaction), so the graph path, the adapters' input graphs and the oracle
share these instead of ``nonzero``, ``torch.topk`` or boolean scatters.
"""

from __future__ import annotations

import torch


def visual_mask(input_ids: torch.Tensor, token_ids: tuple[int, ...]) -> torch.Tensor:
    """[B, S] bool: positions holding any of the visual placeholder ``token_ids``."""
    mask = input_ids == token_ids[0]
    for token_id in token_ids[1:]:
        mask = mask | (input_ids == token_id)
    return mask


def member_mask(values: torch.Tensor, members: tuple[int, ...]) -> torch.Tensor:
    """[B, n] bool: which ``values`` are among ``members`` (one broadcast comparison with a constant, not a
    chain of ORs, since layouts can hold many extra positions)."""
    return (values[..., None] == torch.tensor(members, device=values.device)).any(dim=-1)


def running_count(mask: torch.Tensor, dim: int) -> torch.Tensor:
    """Inclusive count of True entries along ``dim``, as int64.

    Counted in float32 because TensorRT's CumSum takes floating types only; exact below 2**24 entries.
    """
    return mask.to(torch.float32).cumsum(dim=dim).to(torch.long)


def compact_true(mask: torch.Tensor, count: int) -> torch.Tensor:
    """Column indices of the True entries of each row of [B, S] ``mask``, which has ``count`` per row: [B, count].

    A static-shape nonzero (engines need fixed shapes): each True column is scattered to its rank among
    the row's True entries; the rest land in a spill column that is cut off. A row with other than ``count``
    True entries (a prompt the graph was not built for) never indexes out of bounds: extra entries spill too,
    missing ones leave column 0; the graph's ``valid`` output reports such rows.
    """
    batch, seq = mask.shape
    rank = running_count(mask, dim=1) - 1
    slot = torch.where(mask & (rank < count), rank, torch.full_like(rank, count))
    columns = torch.arange(seq, device=mask.device).expand(batch, seq)
    out = torch.zeros(batch, count + 1, dtype=torch.long, device=mask.device)
    return out.scatter(1, slot, columns)[:, :count]


def select_topk(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the ``keep`` best scores per row, in ascending (sequence) order: [B, N] -> [B, keep].

    Ties go to the lower index. Neither torch.topk (tie order unspecified) nor a stable sort (no ONNX
    lowering) gives that portably, so each score is ranked against all others: rank_i = #{j: s_j > s_i}
    + #{j < i: s_j == s_i}, a strict order that eager PyTorch, ONNX Runtime and TensorRT compute alike.
    O(N^2) compares per row, negligible next to one decoder layer for N in the thousands.
    """
    return compact_true(topk_mask(scores, keep), keep)


def topk_mask(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """[B, N] bool: True at the ``keep`` best scores of each row, ties to the lower index (see select_topk)."""
    n = scores.shape[-1]
    s_i, s_j = scores[..., :, None], scores[..., None, :]
    index = torch.arange(n, device=scores.device)
    earlier = index[None, :] < index[:, None]  # [i, j]: j < i (no bool ConstantOfShape, which TensorRT rejects)
    rank = ((s_j > s_i) | ((s_j == s_i) & earlier)).sum(dim=-1)
    return rank < keep


def take_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x[b, index[b, i]] for [B, S] or [B, S, C] x and [B, n] index."""
    return x.gather(1, index if x.dim() == 2 else index[..., None].expand(-1, -1, x.shape[-1]))


def valid_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor, token_ids: tuple[int, ...], visual: int):
    """[B] bool: rows the prefill graph was built for: a left-padded 0/1 mask holding at least one token, exactly
    ``visual`` visual placeholders, none of them in the padding (what ``deploy.loop.check_prompt_feeds`` checks
    before a run, computed inside the graph so that callers that skip the runtime learn it too)."""
    is_visual = visual_mask(input_ids, token_ids)
    binary = ((attention_mask == 0) | (attention_mask == 1)).all(dim=1)
    ones = attention_mask == 1
    left_padded = (ones[:, 1:] | ~ones[:, :-1]).all(dim=1)  # no 1 followed by a 0
    counted = is_visual.sum(dim=1) == visual
    return binary & left_padded & ones.any(dim=1) & counted & ~(is_visual & ~ones).any(dim=1)
