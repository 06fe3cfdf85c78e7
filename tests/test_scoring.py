import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from clse_fx import scoring
from clse_fx.peer_scores import Instruction
from clse_fx.plan import StageSpec, grid_layout
from clse_fx.scoring import evolution_factor, highpass_mask, last_query_attention, spectral_energy
from clse_fx.static_ops import select_topk


def _spec(score, index, keep, grid):
    n = grid[0] * grid[1] * grid[2]
    return StageSpec(index, 1 + index, keep, n, grid_layout(*grid), (0,), score, 0.1, 0.1, 0, "none", "hidden")


GRIDS = [(1, 24, 24), (1, 17, 23), (1, 1, 1), (1, 2, 3), (8, 6, 5), (8, 4, 4), (2, 7, 9)]


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("cutoff", [0.0, 0.1, 0.25])
def test_matmul_form_equals_fft_form(grid, cutoff):
    torch.manual_seed(0)
    n = grid[0] * grid[1] * grid[2]
    z = torch.randn(2, n, 48)
    fft = spectral_energy(z, grid, cutoff, impl="fft")
    matmul = spectral_energy(z, grid, cutoff, impl="matmul")
    assert fft.shape == matmul.shape == (2, n) and matmul.dtype == torch.float32
    assert ((fft - matmul).abs() / fft.abs().clamp_min(1e-6)).max() <= 1e-5


def test_spectral_energy_hand_checked():
    # Constant frames have only DC energy; the high-pass removes exactly the Gaussian's DC weight (1 at
    # the centre), so a constant map has zero high-frequency energy, and cutoff 0 keeps |z| itself.
    z = torch.full((1, 16, 3), 2.0)
    assert spectral_energy(z, (1, 4, 4), 0.1).abs().max() < 1e-6
    assert torch.allclose(spectral_energy(z, (1, 4, 4), 0.0), torch.full((1, 16), 2.0))
    # The mask follows 1 - exp(-d^2 / 2 sigma^2) with sigma = min(H//2, W//2) * cutoff.
    mask = highpass_mask(6, 4, 0.5)  # sigma = 1, centre (3, 2)
    assert mask[3, 2] == 0
    assert math.isclose(mask[4, 2].item(), 1 - math.exp(-0.5), rel_tol=1e-9)
    assert math.isclose(mask[5, 3].item(), 1 - math.exp(-2.5), rel_tol=1e-9)


def test_spectral_energy_frames_are_independent():
    torch.manual_seed(1)
    z = torch.randn(1, 2 * 25, 4)
    both = spectral_energy(z, (2, 5, 5))
    assert torch.allclose(both[:, :25], spectral_energy(z[:, :25], (1, 5, 5)), atol=1e-6)
    assert torch.allclose(both[:, 25:], spectral_energy(z[:, 25:], (1, 5, 5)), atol=1e-6)


def test_spectral_energy_rejects_bad_grid():
    with pytest.raises(ValueError, match="N = T\\*H\\*W"):
        spectral_energy(torch.randn(1, 10, 2), (1, 3, 3))
    with pytest.raises(ValueError, match="impl"):
        spectral_energy(torch.randn(1, 9, 2), (1, 3, 3), impl="dft")


def test_evolution_factor_hand_checked():
    s_ref = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    s_cur = torch.tensor([[1.0, 2.0, 1.5, 9.0]])
    # I = |d| / (mean(s_ref) + s_ref + eps) = [0, 0.5, 0.25, 4 -> clamped 1]
    i = torch.tensor([0.0, 0.5, 0.25, 1.0])
    z = (i - i.mean()) / (i.std() + 1e-6)
    expected = torch.sigmoid(z / 0.1)
    assert torch.allclose(evolution_factor(s_ref, s_cur), expected[None], atol=1e-7)
    assert torch.allclose(evolution_factor(s_ref, s_cur, temp=1.0), torch.sigmoid(z)[None], atol=1e-7)
    # One token: no spread, a neutral 0.5 rather than NaN.
    assert evolution_factor(torch.ones(1, 1), torch.ones(1, 1) * 3).item() == 0.5


def _full_attention_last_row(q, k, mask=None, scale=None):
    rep = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(rep, dim=1)
    logits = q @ k.transpose(-1, -2) * (scale or q.shape[-1] ** -0.5)
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else logits + mask
    return torch.softmax(logits, dim=-1)[:, :, -1, :].mean(dim=1)


@pytest.mark.parametrize("heads", [(4, 4), (8, 2), (6, 1)])
def test_last_query_attention_equals_full_attention(heads):
    torch.manual_seed(2)
    hq, hkv = heads
    q, k = torch.randn(3, hq, 11, 16), torch.randn(3, hkv, 11, 16)
    causal = torch.ones(11, 11, dtype=torch.bool).tril()
    padded = causal.expand(3, 1, 11, 11).clone()
    padded[1, :, :, :3] = False  # left padding in row 1
    additive = torch.zeros(3, 1, 11, 11).masked_fill(~padded, float("-inf"))
    for mask in (None, causal, padded, additive):
        got = last_query_attention(q, k, mask)
        assert torch.allclose(got, _full_attention_last_row(q, k, mask), atol=1e-6)
    assert torch.allclose(last_query_attention(q, k, scale=0.3), _full_attention_last_row(q, k, scale=0.3), atol=1e-6)
    assert torch.allclose(last_query_attention(q, k).sum(-1), torch.ones(3))
    assert last_query_attention(q, k, padded)[1, :3].abs().max() == 0


def test_last_query_attention_hand_checked():
    q = torch.zeros(1, 1, 2, 2)
    q[0, 0, -1] = torch.tensor([1.0, 0.0])
    k = torch.tensor([[[[2.0, 0.0], [0.0, 0.0]]]])
    expected = torch.softmax(torch.tensor([2.0, 0.0]) / math.sqrt(2), 0)
    assert torch.allclose(last_query_attention(q, k)[0], expected)


def test_score_types():
    attn = torch.tensor([[0.1, 0.4, 0.2, 0.3]])
    evo = torch.tensor([[0.5, 0.5, 1.0, 0.1]])
    hidden = torch.tensor([[[3.0, 4.0], [0.0, 1.0], [1.0, 0.0], [0.0, 0.0]]])
    combine = scoring.combine_scores
    assert torch.equal(combine("clse_attn", 2, attn=attn, evo=evo, hidden=hidden), attn * evo)
    assert torch.equal(combine("clse", 2, attn=attn, evo=evo, hidden=hidden), evo)
    assert torch.equal(combine("attn", 2, attn=attn, evo=evo, hidden=hidden), attn)
    assert torch.equal(combine("l2", 2, hidden=hidden), torch.tensor([[5.0, 1.0, 1.0, 0.0]]))
    assert torch.equal(combine("random", 2, hidden=hidden, seed=3), combine("random", 2, hidden=hidden, seed=3))
    assert not torch.equal(combine("random", 2, hidden=hidden, seed=3), combine("random", 2, hidden=hidden, seed=4))
    assert select_topk(combine("uniform", 2, hidden=hidden), 2).tolist() == [[1, 3]]
    assert select_topk(scoring.uniform_score(1, 576, 64), 64)[0].diff().unique().tolist() == [9]
    # On an intact grid: a lattice over rows and columns, not whole columns of the flat index.
    kept = select_topk(scoring.uniform_score(1, 576, 64, grid=(1, 24, 24)), 64)[0]
    assert sorted(set((kept // 24).tolist())) == sorted(set((kept % 24).tolist())) == list(range(1, 24, 3))
    for grid, keep in [((1, 16, 16), 48), ((1, 7, 9), 20), ((4, 3, 3), 35), ((1, 1, 16), 10), ((1, 16, 1), 10)]:
        chosen = scoring.uniform_score(1, math.prod(grid), keep, grid=grid)[0]
        assert chosen.sum() == keep  # exactly ``keep`` distinct positions
        if grid == (1, 16, 16):
            assert len(set((chosen.nonzero()[:, 0] % 16).tolist())) == 7  # spread over columns
    assert torch.equal(scoring.random_score(2, 9, seed=1), scoring.random_score(2, 9, seed=1))
    assert scoring.stage_score_type("clse_attn", 0) == "clse_attn"
    assert scoring.stage_score_type("clse_attn", 1) == "attn"
    assert scoring.stage_score_type("l2", 2) == "l2"
    with pytest.raises(ValueError, match="choose one of"):
        combine("fastv", 2, hidden=hidden)


def test_score_stage_uses_fft_free_spectral_score():
    torch.manual_seed(3)
    z_ref, z_cur = torch.randn(2, 25, 8), torch.randn(2, 25, 8)
    attn = torch.rand(2, 25)
    got = scoring.score_stage(_spec("clse_attn", 0, 5, (1, 5, 5)), attn=attn, z_ref=z_ref, z_cur=z_cur)
    oracle = evolution_factor(
        spectral_energy(z_ref, (1, 5, 5), impl="fft"), spectral_energy(z_cur, (1, 5, 5), impl="fft")
    )
    assert torch.allclose(got, oracle * attn, atol=1e-5)
    later = scoring.score_stage(_spec("clse_attn", 1, 5, (1, 5, 5)), attn=attn, z_ref=z_ref, z_cur=z_cur)
    assert torch.equal(later, attn)


def test_select_topk_breaks_ties_toward_lower_index():
    scores = torch.tensor([[1.0, 2.0, 2.0, 2.0, 0.0, 2.0]])
    assert select_topk(scores, 2).tolist() == [[1, 2]]
    assert select_topk(scores, 4).tolist() == [[1, 2, 3, 5]]
    assert select_topk(torch.zeros(1, 5), 3).tolist() == [[0, 1, 2]]


floats = st.floats(-1e3, 1e3, allow_nan=False, width=32)


@settings(max_examples=40, deadline=None)
@given(
    grid=st.tuples(st.integers(1, 3), st.integers(1, 6), st.integers(1, 6)),
    channels=st.integers(1, 5),
    data=st.data(),
)
def test_scores_are_finite_for_finite_input(grid, channels, data):
    n = grid[0] * grid[1] * grid[2]
    values = data.draw(st.lists(floats, min_size=2 * n * channels, max_size=2 * n * channels))
    z = torch.tensor(values).reshape(2, n, channels)
    z_ref = torch.roll(z, 1, dims=-1)
    attn = torch.softmax(z.sum(-1), -1)
    # The peers' selections also read the instruction tokens (here the tokens themselves) and key norms.
    instruction = Instruction(z, torch.ones(2, n, dtype=torch.bool), z.abs().sum(-1))
    for score_type in scoring.SCORE_TYPES:
        spec = _spec(score_type, 0, max(1, n // 2), grid)
        s = scoring.score_stage(spec, attn=attn, z_ref=z_ref, z_cur=z, key_norm=attn, instruction=instruction)
        assert torch.isfinite(s).all(), score_type


@settings(max_examples=60, deadline=None)
@given(data=st.data(), n=st.integers(1, 40), batch=st.integers(1, 3))
def test_kept_indices_sorted_unique_in_range_and_exact(data, n, batch):
    keep = data.draw(st.integers(1, n))
    # Few distinct values, so ties are common.
    values = data.draw(st.lists(st.sampled_from([0.0, 0.5, 1.0, 2.0]), min_size=batch * n, max_size=batch * n))
    scores = torch.tensor(values).reshape(batch, n)
    kept = select_topk(scores, keep)
    assert kept.shape == (batch, keep)
    assert (kept.diff(dim=-1) > 0).all() and kept.min() >= 0 and kept.max() < n
    # An independent oracle: Python's stable sort by (score descending, index ascending), then sequence order.
    for row in range(batch):
        best = sorted(range(n), key=lambda i, row=row: (-values[row * n + i], i))[:keep]
        assert kept[row].tolist() == sorted(best)
    for row in range(batch):
        chosen = scores[row, kept[row]]
        rest = torch.ones(n, dtype=torch.bool)
        rest[kept[row]] = False
        if rest.any():
            assert chosen.min() >= scores[row, rest].max()
            # On a tie at the boundary the lower index wins.
            tied = (scores[row] == chosen.min()) & rest
            if tied.any():
                assert tied.nonzero().min() > kept[row][scores[row, kept[row]] == chosen.min()].max()
