"""The peers' visual-token selections as static-shape scores (docs/scores.md): DART and CDPruner.

Both choose a set rather than rank tokens one by one, so each returns a [B, n] score that is positive on
exactly the ``keep`` chosen tokens and 0 elsewhere: the stage's top-K then keeps that set. Every loop below
runs a fixed number of times with fixed shapes (no data-dependent sizes), so the graphs export to engines
with a constant K. ``candidates`` ([B, n] bool, None for all) excludes tokens that are not scored (a
layout's extra tokens); the eager oracles in :mod:`clse_fx.reference` share none of this code.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from clse_fx.static_ops import compact_true, running_count, take_rows, topk_mask

# DART (arXiv 2502.11494): pivots are the visual and instruction tokens whose layer K-1 keys have the largest
# L1 norm, 4 of each in the authors' scripts.
DART_IMAGE_PIVOTS = 4
DART_TEXT_PIVOTS = 4
# CDPruner's min-max normalisation of the relevance adds this to the numerator (authors' code).
RELEVANCE_EPS = 1e-6
# Residual DPP gains at or below this count as spent (kernel values r_i r_j S_ij are at most about 1): once a
# token's near-duplicates are chosen, or the steps outnumber the feature dimensions, what is left of its gain is
# float32 rounding, which would order the rest differently in every backend. Spent tokens tie at 0 (the lower
# index goes first) and change no other gain.
SPENT_GAIN = 1e-5


class Instruction(NamedTuple):
    """The current sequence's instruction tokens, which the peers condition on.

    ``hidden`` [B, S, C]: every current token's hidden state; ``is_query`` [B, S] bool: the text tokens after
    the last visual token (the question and answer prompt); ``key_norm`` [B, S]: L1 norm of each token's
    layer K-1 keys over heads and channels (None before layer 0); ``norm_weight`` [C]: the decoder's final
    RMSNorm weight, which DART applies before its cosine similarities (None: unweighted)."""

    hidden: torch.Tensor
    is_query: torch.Tensor
    key_norm: torch.Tensor | None = None
    norm_weight: torch.Tensor | None = None


def query_tokens(is_visual: torch.Tensor) -> torch.Tensor:
    """[B, S] bool: the tokens after a row's last visual token (its instruction), from [B, S] ``is_visual``."""
    seen = running_count(is_visual, dim=1)
    return (seen == seen[:, -1:]) & ~is_visual


def key_l1_norm(key: torch.Tensor) -> torch.Tensor:
    """L1 norm of each token's keys over heads and channels: [B, H, S, D] -> [B, S] float32."""
    return key.to(torch.float32).abs().sum(dim=(1, 3))


def _weighted(x: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """``x`` float32 times the final norm's weight: RMSNorm's per-token scale cancels in a cosine similarity."""
    x = x.to(torch.float32)
    return x if weight is None else x * weight.to(torch.float32)


def dart_quotas(keep: int, pivots: int, image_pivots: int) -> list[int]:
    """Tokens each pivot adds to the kept set: what the image pivots leave of ``keep``, split evenly, the
    first pivots taking one more when it does not divide (the authors' quota is budget // pivots)."""
    rest = keep - image_pivots
    return [rest // pivots + (p < rest % pivots) for p in range(pivots)]


def dart_selection(
    z: torch.Tensor, key_norm: torch.Tensor, instruction: Instruction, keep: int, candidates: torch.Tensor | None
) -> torch.Tensor:
    """DART: keep the image pivots, then let each pivot in turn (image pivots, then instruction pivots, each in
    sequence order) add its quota of the remaining tokens least cosine-similar to it: [B, n] 0/1 score.

    ``z`` [B, n, C] and ``key_norm`` [B, n] are the visual tokens' hidden states and layer K-1 key norms.
    Ties go to the lower index (``topk_mask``). A row with fewer instruction tokens than text pivots gives
    the missing pivots a constant similarity, so their quotas go to the lowest remaining indices.
    """
    batch, n, _ = z.shape
    allowed = torch.ones(batch, n, dtype=torch.bool, device=z.device) if candidates is None else candidates
    image_pivots = min(DART_IMAGE_PIVOTS, keep)
    is_pivot = topk_mask(key_norm.masked_fill(~allowed, float("-inf")), image_pivots)
    query_norm = instruction.key_norm.masked_fill(~instruction.is_query, float("-inf"))
    is_text_pivot = topk_mask(query_norm, DART_TEXT_PIVOTS) & instruction.is_query
    features = _weighted(z, instruction.norm_weight)
    text_features = _weighted(instruction.hidden, instruction.norm_weight)
    pivots = torch.cat(
        [
            take_rows(features, compact_true(is_pivot, image_pivots)),
            take_rows(text_features, compact_true(is_text_pivot, DART_TEXT_PIVOTS)),
        ],
        dim=1,
    )  # [B, P, C]
    similarity = torch.matmul(F.normalize(pivots, dim=-1), F.normalize(features, dim=-1).transpose(1, 2))
    # Text pivots a row does not have (fewer instruction tokens): every token is equally (dis)similar to them.
    slots = torch.arange(pivots.shape[1], device=z.device) - image_pivots
    present = (slots < 0) | (slots < is_text_pivot.sum(dim=1, keepdim=True))  # [B, P]
    similarity = torch.where(present[..., None], similarity, torch.zeros_like(similarity))
    chosen, taken = is_pivot, is_pivot | ~allowed
    for pivot, quota in enumerate(dart_quotas(keep, pivots.shape[1], image_pivots)):
        if quota:
            adds = topk_mask((-similarity[:, pivot]).masked_fill(taken, float("-inf")), quota)
            chosen, taken = chosen | adds, taken | adds
    return chosen.to(torch.float32)


def cdpruner_relevance(z: torch.Tensor, instruction: Instruction, candidates: torch.Tensor | None) -> torch.Tensor:
    """Each visual token's relevance to the instruction, as the authors compute it: the mean cosine similarity
    to the instruction tokens, negated, min-max normalised over the row's candidates (+1e-6): [B, n]."""
    visual = F.normalize(z.to(torch.float32), dim=-1)
    text = F.normalize(instruction.hidden.to(torch.float32), dim=-1)
    query = instruction.is_query.to(torch.float32)  # [B, S]
    mean = torch.matmul(visual, (text * query[..., None]).transpose(1, 2)).sum(dim=-1)
    relevance = -mean / query.sum(dim=1, keepdim=True).clamp(min=1)
    low = relevance if candidates is None else relevance.masked_fill(~candidates, float("inf"))
    high = relevance if candidates is None else relevance.masked_fill(~candidates, float("-inf"))
    low, high = low.amin(dim=1, keepdim=True), high.amax(dim=1, keepdim=True)
    # A row whose tokens are all equally relevant has no spread: divide by the epsilon instead of by zero.
    return (relevance - low + RELEVANCE_EPS) / (high - low).clamp(min=RELEVANCE_EPS)


def cdpruner_kernel(z: torch.Tensor, relevance: torch.Tensor) -> torch.Tensor:
    """The conditional DPP kernel L = diag(r) S diag(r), S the visual tokens' cosine similarities: [B, n, n]."""
    unit = F.normalize(z.to(torch.float32), dim=-1)
    return relevance[:, :, None] * torch.matmul(unit, unit.transpose(1, 2)) * relevance[:, None, :]


def dpp_greedy(kernel: torch.Tensor, keep: int, candidates: torch.Tensor | None = None) -> torch.Tensor:
    """Greedy MAP inference of a DPP (Chen et al. 2018's incremental Cholesky form), unrolled for ``keep`` fixed
    steps: [B, n, n] kernel -> [B, n] score, keep - t for the token chosen at step t, 0 for the rest.

    Each step takes the token j of largest residual gain d_j (ties to the lower index, as ONNX ArgMax), computes
    its Cholesky row e = (L[j] - sum_t c_t[j] c_t) / sqrt(d_j) and lowers every gain by e^2; gains at or below
    ``SPENT_GAIN`` count as 0 and a spent pick's row is 0. The rows computed so far are one [B, t, n] tensor that
    each step appends to: about 25 vectorised ops per step, no loop op.
    """
    batch, n, _ = kernel.shape
    gains = torch.diagonal(kernel, dim1=1, dim2=2)
    if candidates is not None:
        gains = gains.masked_fill(~candidates, float("-inf"))
    positions = torch.arange(n, device=kernel.device)
    rows: torch.Tensor | None = None
    picks = []
    for _ in range(keep):
        gains = torch.where((gains <= SPENT_GAIN) & (gains > float("-inf")), torch.zeros_like(gains), gains)
        best = gains.amax(dim=1, keepdim=True)
        picks.append(gains.argmax(dim=1, keepdim=True))
        pick = positions == picks[-1]  # [B, n] one-hot
        one_hot = pick.to(kernel.dtype)[..., None]
        residual = torch.matmul(kernel, one_hot)[..., 0]  # L[:, j] (the kernel is symmetric)
        if rows is not None:
            residual = residual - (torch.matmul(rows, one_hot) * rows).sum(dim=1)
        update = torch.where(best > 0, residual / best.clamp(min=SPENT_GAIN).sqrt(), torch.zeros_like(residual))
        rows = update[:, None] if rows is None else torch.cat([rows, update[:, None]], dim=1)
        gains = (gains - update * update).masked_fill(pick, float("-inf"))
    order = torch.arange(keep, 0, -1, dtype=kernel.dtype, device=kernel.device).expand(batch, keep)
    return torch.zeros(batch, n, dtype=kernel.dtype, device=kernel.device).scatter(1, torch.cat(picks, dim=1), order)


def cdpruner_selection(
    z: torch.Tensor, instruction: Instruction, keep: int, candidates: torch.Tensor | None
) -> torch.Tensor:
    """CDPruner: greedy MAP of the instruction-conditioned DPP over the visual tokens ``z`` [B, n, C]: [B, n]."""
    kernel = cdpruner_kernel(z, cdpruner_relevance(z, instruction, candidates))
    return dpp_greedy(kernel, keep, candidates)
