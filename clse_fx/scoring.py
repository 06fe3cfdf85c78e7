"""CLSE token scores (docs/method.md), pure torch, batch-first, float32 math.

Everything here is shape-static for a fixed grid and budget, so the same functions run eagerly in the
reference pruner and are traced into the compiled graph.
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from clse_fx.peer_scores import Instruction, cdpruner_selection, dart_selection
from clse_fx.plan import SCORE_TYPES, Grid, Layout, extra_positions, layout_grids, scored_positions

if TYPE_CHECKING:
    from clse_fx.plan import StageSpec

# Score types that need the intact spectral grid; later stages fall back to "attn" (docs/method.md#score-types).
SPECTRAL_SCORE_TYPES = ("clse_attn", "clse")


def _check_grid(z: torch.Tensor, grid: Grid) -> tuple[int, int, int]:
    if len(grid) != 3 or min(grid) < 1:
        raise ValueError(f"grid must be (T, H, W) with positive sizes, got {tuple(grid)}")
    t, h, w = (int(g) for g in grid)
    if z.dim() != 3 or z.shape[1] != t * h * w:
        raise ValueError(f"z must be [B, N, C] with N = T*H*W = {t * h * w}, got shape {tuple(z.shape)}")
    return t, h, w


def _gaussian_response(n: int, cutoff: float, sigma_extent: int) -> np.ndarray:
    """1-D Gaussian low-pass response centred at n // 2 (fftshifted layout), float64.

    Filter constants are built in numpy, outside torch, so tracing never turns them into fake tensors.
    """
    if cutoff == 0:
        return np.zeros(n)
    d = np.arange(n, dtype=np.float64) - n // 2
    sigma = sigma_extent * cutoff
    if sigma == 0:  # the sigma -> 0 limit of exp(-d^2 / 2 sigma^2): a delta at the centre
        return (d == 0).astype(np.float64)
    return np.exp(-(d**2) / (2 * sigma**2))


def highpass_mask(h: int, w: int, cutoff: float) -> torch.Tensor:
    """The 2-D Gaussian high-pass M(u, v) = 1 - exp(-d^2 / (2 sigma^2)) on the fftshifted spectrum."""
    extent = min(h // 2, w // 2)
    return torch.from_numpy(1 - np.outer(_gaussian_response(h, cutoff, extent), _gaussian_response(w, cutoff, extent)))


@functools.lru_cache(maxsize=64)
def _circulant_lowpass_values(n: int, cutoff: float, sigma_extent: int) -> np.ndarray:
    column = np.fft.ifft(np.fft.ifftshift(_gaussian_response(n, cutoff, sigma_extent))).real
    rows = np.arange(n)
    matrix = column[(rows[:, None] - rows[None, :]) % n].astype(np.float32)
    matrix.flags.writeable = False  # shared by every caller of the cache
    return matrix


def circulant_lowpass(n: int, cutoff: float, sigma_extent: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Real n x n circulant C with C x == ifft(ifftshift(g) * fft(x)) for the 1-D Gaussian g.

    g is real and symmetric around the centre, so its inverse DFT is real and the filter is an exact
    real matrix; the separable 2-D low-pass is then C_H X C_W^T (docs/graph.md#fft-free-filter). Built once per
    (n, cutoff, sigma extent).
    """
    return torch.tensor(_circulant_lowpass_values(n, cutoff, sigma_extent), device=device)


def spectral_energy(z: torch.Tensor, grid: Grid, cutoff: float = 0.1, impl: str = "matmul") -> torch.Tensor:
    """High-frequency energy per visual token: [B, N, C] on a (T, H, W) grid -> [B, N] float32.

    ``impl="matmul"`` is the FFT-free circulant form used in graphs; ``impl="fft"`` is the oracle.
    """
    t, h, w = _check_grid(z, grid)
    if cutoff < 0:
        raise ValueError(f"cutoff must be >= 0, got {cutoff}")
    b, n, c = z.shape
    x = z.to(torch.float32)
    if impl == "fft":
        frames = x.reshape(b, t, h, w, c).permute(0, 1, 4, 2, 3)  # [B, T, C, H, W]
        spectrum = torch.fft.fftshift(torch.fft.fft2(frames), dim=(-2, -1))
        spectrum = spectrum * highpass_mask(h, w, cutoff).to(x.device)
        high = torch.fft.ifft2(torch.fft.ifftshift(spectrum, dim=(-2, -1))).abs()
        return high.mean(dim=2).reshape(b, n)
    if impl != "matmul":
        raise ValueError(f"impl must be 'matmul' or 'fft', got {impl!r}")
    extent = min(h // 2, w // 2)
    c_h = circulant_lowpass(h, float(cutoff), extent, x.device)
    c_w = circulant_lowpass(w, float(cutoff), extent, x.device)
    # Two broadcast matmuls, no permutes: mix rows on [BT, H, W*C], then columns on [BTH, W, C].
    low = torch.matmul(c_h, x.reshape(b * t, h, w * c))
    low = torch.matmul(c_w, low.reshape(b * t * h, w, c))
    return (x - low.reshape(b, n, c)).abs().mean(dim=-1)


def evolution_factor(s_ref: torch.Tensor, s_cur: torch.Tensor, temp: float = 0.1, eps: float = 1e-6) -> torch.Tensor:
    """sigmoid(zscore(min(|s_K - s_L| / (mean_N(s_L) + s_L + eps), 1)) / temp): [B, N] -> [B, N]."""
    s_ref = s_ref.to(torch.float32)
    s_cur = s_cur.to(torch.float32)
    change = (s_cur - s_ref).abs() / (s_ref.mean(dim=-1, keepdim=True) + s_ref + eps)
    change = change.clamp(max=1.0)
    centred = change - change.mean(dim=-1, keepdim=True)
    # One token has no spread: its z-score is 0 (torch's unbiased std would be NaN).
    std = change.std(dim=-1, keepdim=True) if change.shape[-1] > 1 else torch.zeros_like(centred)
    return torch.sigmoid(centred / (std + eps) / temp)


def last_query_attention(
    q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None = None, scale: float | None = None
) -> torch.Tensor:
    """Head-averaged softmax attention of the last query over all keys: q [B,Hq,S,D], k [B,Hkv,S,D] -> [B,S].

    Only the last query row is computed; GQA is handled by grouping query heads per key head, which equals
    repeating the keys (transformers' repeat_kv) without materialising the copies.
    """
    b, hq, _, d = q.shape
    hkv, s_k = k.shape[1], k.shape[2]
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of key heads ({hkv})")
    scale = d**-0.5 if scale is None else scale
    q_last = q[:, :, -1, :].to(torch.float32).reshape(b, hkv, hq // hkv, d)
    logits = torch.matmul(q_last, k.to(torch.float32).transpose(-1, -2)) * scale  # [B, Hkv, rep, S]
    logits = logits.reshape(b, hq, s_k)
    if mask is not None:
        row = mask[..., -1, :]  # [B or 1, H or 1, S]
        if row.dtype == torch.bool:
            logits = logits.masked_fill(~row, float("-inf"))
        else:
            logits = logits + row.to(torch.float32)
    return torch.softmax(logits, dim=-1).mean(dim=1)


def l2_score(z: torch.Tensor) -> torch.Tensor:
    """Hidden-state L2 norm per token: [B, N, C] -> [B, N]."""
    return z.to(torch.float32).norm(dim=-1)


def random_score(batch: int, n: int, seed: int = 0) -> torch.Tensor:
    """A seeded random score per visual position, the same for every row and call: [B, N].

    Drawn with numpy at trace time, so the graph holds a constant (a torch.Generator does not export)."""
    values = np.random.default_rng(seed).random(n).astype(np.float32)
    return torch.from_numpy(values).expand(batch, n)


def uniform_score(batch: int, n: int, keep: int, grid: Grid | None = None) -> torch.Tensor:
    """1 at ``keep`` evenly spread positions, 0 elsewhere: [B, N].

    On an intact (T, H, W) grid the positions form a lattice over its T*H rows and W columns (even spacing of
    the flat index would keep whole columns whenever W divides the spacing); otherwise they are the centres of
    ``keep`` equal bins of the sequence.
    """
    score = np.zeros(n, dtype=np.float32)
    if grid is not None and math.prod(grid) == n:
        rows_total, width = grid[0] * grid[1], grid[2]
        cols = min(width, max(1, round(math.sqrt(keep * width / rows_total))), keep)
        cols = max(cols, math.ceil(keep / rows_total))  # enough columns that the rows fit the grid
        rows = math.ceil(keep / cols)
        row_at = [int((i + 0.5) * rows_total / rows) for i in range(rows)]
        col_at = [int((j + 0.5) * width / cols) for j in range(cols)]
        score[[r * width + c for r in row_at for c in col_at][:keep]] = 1.0
    else:
        score[(np.arange(keep) * n + n // 2) // keep] = 1.0
    return torch.from_numpy(score).expand(batch, n)


def combine_scores(
    score_type: str,
    keep: int,
    *,
    attn: torch.Tensor | None = None,
    evo: torch.Tensor | None = None,
    hidden: torch.Tensor | None = None,
    seed: int = 0,
    grid: Grid | None = None,
    key_norm: torch.Tensor | None = None,
    instruction: Instruction | None = None,
    candidates: torch.Tensor | None = None,
) -> torch.Tensor:
    """The [B, N] score of ``score_type`` from whichever inputs it needs (attn/evo [B, N], hidden [B, N, C];
    ``grid`` when the N tokens still form the full visual grid; for the peers' selections the visual tokens'
    layer K-1 key norms [B, N], the instruction tokens and which tokens may be chosen, [B, N] bool)."""
    if score_type == "clse_attn":
        return evo * attn
    if score_type == "clse":
        return evo
    if score_type == "attn":
        return attn
    if score_type == "l2":
        return l2_score(hidden)
    if score_type == "dart":
        return dart_selection(hidden, key_norm, instruction, keep, candidates)
    if score_type == "cdpruner":
        return cdpruner_selection(hidden, instruction, keep, candidates)
    batch, n = hidden.shape[:2]
    if score_type == "random":
        return random_score(batch, n, seed).to(hidden.device)
    if score_type == "uniform":
        return uniform_score(batch, n, keep, grid).to(hidden.device)
    raise ValueError(f"unknown score type {score_type!r}; choose one of {', '.join(SCORE_TYPES)}")


def merge_into_kept(
    z_kept: torch.Tensor,
    z_pruned: torch.Tensor,
    size_kept: torch.Tensor,
    size_pruned: torch.Tensor,
    metric_kept: torch.Tensor,
    metric_pruned: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ToMe-style merge: each pruned token joins its most cosine-similar kept token, which becomes the
    size-weighted average of itself and the tokens that joined it. Returns (merged [B,k,C], sizes [B,k]).

    Static shapes and no scatter-add: the assignment is a one-hot [B, m, k] matrix (argmax ties to the lower
    index, as ONNX ArgMax) and the sums are matmuls with it.
    """
    similarity = torch.matmul(
        F.normalize(metric_pruned.to(torch.float32), dim=-1),
        F.normalize(metric_kept.to(torch.float32), dim=-1).transpose(1, 2),
    )  # [B, m, k]
    assign = similarity.argmax(dim=-1)  # [B, m]
    slots = torch.arange(z_kept.shape[1], device=z_kept.device)
    one_hot = (assign[..., None] == slots).to(torch.float32)  # [B, m, k]
    joined = one_hot.transpose(1, 2)  # [B, k, m]
    sizes = size_kept + torch.matmul(joined, size_pruned[..., None])[..., 0]
    totals = z_kept.to(torch.float32) * size_kept[..., None] + torch.matmul(
        joined, z_pruned.to(torch.float32) * size_pruned[..., None]
    )
    return (totals / sizes[..., None]).to(z_kept.dtype), sizes


def stage_score_type(score_type: str, stage_index: int) -> str:
    """The score a stage uses: spectral types need the intact grid, so stages after the first use "attn"."""
    if score_type not in SCORE_TYPES:
        raise ValueError(f"unknown score type {score_type!r}; choose one of {', '.join(SCORE_TYPES)}")
    return "attn" if stage_index > 0 and score_type in SPECTRAL_SCORE_TYPES else score_type


def grids_spectral_energy(z: torch.Tensor, grids: tuple[Grid, ...], cutoff: float = 0.1) -> torch.Tensor:
    """:func:`spectral_energy` of tokens holding several grids back to back, each filtered on its own: [B, N]."""
    if len(grids) == 1:
        return spectral_energy(z, grids[0], cutoff)
    parts, start = [], 0
    for grid in grids:
        size = math.prod(grid)
        parts.append(spectral_energy(z[:, start : start + size], grid, cutoff))
        start += size
    return torch.cat(parts, dim=1)


def score_stage(
    spec: StageSpec,
    *,
    attn: torch.Tensor,
    z_ref: torch.Tensor,
    z_cur: torch.Tensor,
    is_extra: torch.Tensor | None = None,
    key_norm: torch.Tensor | None = None,
    instruction: Instruction | None = None,
) -> torch.Tensor:
    """One stage's [B, n] visual-token scores (docs/method.md#score-types).

    ``attn`` is the last-query attention over the current visual tokens (None before layer 0), ``z_ref`` /
    ``z_cur`` their hidden states at the reference layer and now ([B, n, C]); the spectral terms are only
    computed when used. ``key_norm`` / ``instruction``: what the peers' selections read (peer_scores.py). Extra
    tokens of the layout (``is_extra`` [B, n] after the first stage) score +inf, so top-K always keeps them;
    on the first stage the grids' tokens are scored alone (docs/method.md#token-layouts).
    """
    kind = stage_score_type(spec.score, spec.index)
    first_with_extras = spec.index == 0 and bool(spec.extras)
    if first_with_extras:  # the intact layout: take the grids' tokens by static slices
        attn, z_ref, z_cur, key_norm = (
            None if x is None else _grid_tokens(x, spec.layout) for x in (attn, z_ref, z_cur, key_norm)
        )
    grids = layout_grids(spec.layout)
    evo = None
    if kind in SPECTRAL_SCORE_TYPES:
        s_ref, s_cur = (grids_spectral_energy(z, grids, spec.cutoff) for z in (z_ref, z_cur))
        evo = evolution_factor(s_ref, s_cur, spec.temp)
    # Only the first stage sees one intact grid; later stages score a subset, several grids have no one lattice.
    intact = grids[0] if spec.index == 0 and len(grids) == 1 else None
    scores = combine_scores(
        kind,
        spec.keep,
        attn=attn,
        evo=evo,
        hidden=z_cur,
        seed=spec.seed + spec.index,
        grid=intact,
        key_norm=key_norm,
        instruction=instruction,
        candidates=None if first_with_extras or not spec.extras else ~is_extra,
    )
    if first_with_extras:
        return _with_extras(scores, spec.layout)
    if spec.extras:
        return scores.masked_fill(is_extra, float("inf"))
    return scores


def _grid_tokens(x: torch.Tensor, layout: Layout) -> torch.Tensor:
    """The grids' tokens of an intact layout's [B, N, ...] values, back to back (a gather at constant indices)."""
    return x[:, torch.tensor(scored_positions(layout), device=x.device)]


def _with_extras(scores: torch.Tensor, layout: Layout) -> torch.Tensor:
    """Grid-token scores [B, n_scored] spread over the intact layout, with +inf at its extra tokens: each visual
    position reads its grid score, or an appended +inf column (one gather at constant indices)."""
    n_scored = scores.shape[1]
    source = [n_scored] * (n_scored + len(extra_positions(layout)))  # the +inf column by default
    for index, position in enumerate(scored_positions(layout)):
        source[position] = index
    padded = torch.cat([scores, scores.new_full((scores.shape[0], 1), float("inf"))], dim=1)
    return padded[:, torch.tensor(source, device=scores.device)]
