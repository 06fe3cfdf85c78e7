"""Visual-token layouts of several segments: grids scored frame by frame, extra tokens never scored and kept."""

import pytest
import torch

from clse_fx.models.llava import LlavaAdapter
from clse_fx.plan import PruneConfig, StageSpec, check_layout, extra_positions, plan_budget, scored_count
from clse_fx.scoring import evolution_factor, grids_spectral_energy, score_stage, spectral_energy

from .test_compile_parity import TWO_ROWS, _check_against_reference, _inputs

# The tiny LLaVA's 36 visual tokens read as: a CLS-like extra, a 4x4 grid, two separators, a 3x5 grid and two
# trailing extras (1 + 16 + 2 + 15 + 2).
LAYOUT = (("extra", 1), ("grid", 1, 4, 4), ("extra", 2), ("grid", 1, 3, 5), ("extra", 2))


def _spec(layout, index=0, keep=5, score="clse_attn"):
    num_current = scored_count(layout) if index == 0 else 12
    return StageSpec(index, 1 + index, keep, num_current, layout, (0,), score, 0.1, 0.1, 0, "none", "hidden")


def test_layout_helpers_and_validation():
    assert sum(s[1] if s[0] == "extra" else s[1] * s[2] * s[3] for s in LAYOUT) == 36
    assert scored_count(LAYOUT) == 31 and extra_positions(LAYOUT) == (0, 17, 18, 34, 35)
    for bad in [(("grid", 1, 0, 4),), (("extra", 2),), (("tile", 3),), (("grid", 1, 4),)]:
        with pytest.raises(ValueError, match="layout"):
            check_layout(bad)


def test_first_stage_scores_each_grid_alone_and_extras_score_inf():
    torch.manual_seed(0)
    z_ref, z_cur, attn = torch.randn(2, 36, 8), torch.randn(2, 36, 8), torch.rand(2, 36)
    got = score_stage(_spec(LAYOUT), attn=attn, z_ref=z_ref, z_cur=z_cur)
    extras = list(extra_positions(LAYOUT))
    grid_tokens = [i for i in range(36) if i not in extras]
    assert torch.isinf(got[:, extras]).all()
    # Oracle: the torch.fft filter on each grid on its own, the evolution factor over the grids' tokens.
    first, second = grid_tokens[:16], grid_tokens[16:]

    def fft(z):
        return torch.cat(
            [spectral_energy(z[:, first], (1, 4, 4), impl="fft"), spectral_energy(z[:, second], (1, 3, 5), impl="fft")],
            1,
        )

    oracle = evolution_factor(fft(z_ref), fft(z_cur)) * attn[:, grid_tokens]
    assert torch.allclose(got[:, grid_tokens], oracle, atol=1e-5)
    grids = grids_spectral_energy(z_cur[:, grid_tokens], ((1, 4, 4), (1, 3, 5)))
    assert torch.allclose(grids, fft(z_cur).float(), atol=1e-5)


def test_later_stages_keep_extras_by_their_ids():
    attn = torch.rand(1, 14)
    is_extra = torch.zeros(1, 14, dtype=torch.bool)
    is_extra[0, [0, 5]] = True
    got = score_stage(_spec(LAYOUT, index=1), attn=attn, z_ref=None, z_cur=torch.randn(1, 14, 8), is_extra=is_extra)
    assert torch.isinf(got[0, [0, 5]]).all() and torch.equal(got[~is_extra], attn[~is_extra])


@pytest.fixture
def segmented(monkeypatch):
    """The tiny LLaVA's 36 image tokens described as ``LAYOUT`` (the adapter's answer is all that changes)."""
    monkeypatch.setattr(LlavaAdapter, "visual_layout", lambda self, num_visual, **inputs: LAYOUT)


@pytest.mark.parametrize(("score", "merge"), [("clse_attn", "none"), ("uniform", "none"), ("clse_attn", "tome")])
def test_pass_equals_reference_and_keeps_every_extra(tiny_llava, segmented, score, merge):
    prune = PruneConfig(plan=plan_budget(None, 4, 31, stages="1:20,2:10,3:4"), score=score, merge=merge)
    pruned, _ = _check_against_reference(tiny_llava, prune, _inputs(tiny_llava, TWO_ROWS))
    kept = pruned().kept
    assert [k.shape[1] for k in kept] == [25, 15, 9]  # each stage's keep plus the 5 extras
    for stage in kept:
        assert all(set(extra_positions(LAYOUT)) <= set(row.tolist()) for row in stage)


def test_segmented_layout_exports_to_onnx_runtime_and_is_tensorrt_ready(tiny_llava, segmented, tmp_path):
    import numpy as np

    from clse_fx.compiler import prune_prefill
    from clse_fx.deploy.session import OnnxSession
    from clse_fx.export.onnxruntime import export_onnx
    from clse_fx.export.tensorrt_check import check_tensorrt_ready

    prune = PruneConfig(plan=plan_budget(None, 4, 31, stages="1:20,3:4"), score="clse_attn")
    pruned = prune_prefill(tiny_llava, prune, _inputs(tiny_llava, TWO_ROWS))
    path = export_onnx(pruned, tmp_path / "prefill.onnx")
    engine = OnnxSession(path).run(**dict(zip(pruned.input_names, pruned.example_args)))
    torch_out = pruned.flat()
    assert np.abs(engine[0] - torch_out[0].numpy()).max() <= 1e-4
    for e, t in zip(engine[1:4], torch_out[1:4]):  # positions and both stages' kept ids
        assert np.array_equal(e, t.numpy())
    assert check_tensorrt_ready(path) == []
