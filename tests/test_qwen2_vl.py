"""Qwen2-VL / Qwen2.5-VL through the same passes: M-RoPE ids and the vision tower are graph inputs."""

import pytest
import torch

from clse_fx.compiler import prune_prefill
from clse_fx.models import adapter_for
from clse_fx.plan import QWEN2_VL_SCHEDULE, PruneConfig, plan_budget
from clse_fx.reference import reference_prune

from .tiny_models import QWEN_END as END
from .tiny_models import QWEN_FAMILIES, qwen_inputs, save_tiny_qwen
from .tiny_models import QWEN_IMAGE as IMAGE
from .tiny_models import QWEN_START as START

GRID = (1, 14, 18)  # 4 px patches; after the 2x2 merge a 7x9 grid of 63 tokens
TOKENS = 63


@pytest.fixture(scope="module", params=sorted(QWEN_FAMILIES))
def qwen(request, tmp_path_factory):
    return save_tiny_qwen(tmp_path_factory.mktemp(request.param), request.param)


def _inputs(model, rows):
    return qwen_inputs(model, rows, GRID)


TWO_ROWS = [
    [1, 2, START] + [IMAGE] * TOKENS + [END, 3, 4, 5, 6, 7],
    [1, 2, 3, 4, 5, START] + [IMAGE] * TOKENS + [END, 6, 7],
]


def _plan(stages):
    return plan_budget(None, 4, TOKENS, stages=stages, schedule=QWEN2_VL_SCHEDULE)


def test_grid_and_schedule(qwen):
    adapter = adapter_for(qwen)
    assert adapter.visual_grid(TOKENS, image_grid_thw=torch.tensor([GRID])) == (1, 7, 9)
    assert adapter.visual_grid(2 * TOKENS, image_grid_thw=torch.tensor([GRID, GRID])) == (2, 7, 9)
    # Qwen2-VL ratio budgets: 0.334 -> [0.57, 0.36, 0.098] of the visual tokens, layers scaled from [1, 10, 19]/28.
    assert plan_budget(0.334, 4, TOKENS, schedule=adapter.schedule).stages == ((1, 36), (2, 23), (3, 6))


def test_budget_of_all_tokens_equals_unmodified_model(qwen):
    inputs = _inputs(qwen, TWO_ROWS)
    out = prune_prefill(qwen, PruneConfig(plan=_plan("1:63,2:63,3:63")), inputs)()
    with torch.no_grad():
        plain = qwen(**inputs).logits
    assert (out.logits - plain).abs().max() <= 1e-5


@pytest.mark.parametrize("score", ["clse_attn", "attn", "clse"])
@pytest.mark.parametrize("stages", ["2:20", "1:40,2:20,3:8"])
def test_pass_equals_reference(qwen, score, stages):
    inputs = _inputs(qwen, TWO_ROWS)
    prune = PruneConfig(plan=_plan(stages), score=score)
    out = prune_prefill(qwen, prune, inputs)()
    ref = reference_prune(qwen, prune, **inputs)
    assert (out.logits - ref.logits).abs().max() <= 1e-5
    assert torch.equal(out.positions, ref.positions)
    assert all(torch.equal(a, b) for a, b in zip(out.kept, ref.kept))
    for (key, value), (ref_key, ref_value) in zip(out.cache, ref.cache):
        assert (key - ref_key).abs().max() <= 1e-5 and (value - ref_value).abs().max() <= 1e-5


def test_compile_api_says_bundles_are_not_supported_yet(qwen):
    import clse_fx

    with pytest.raises(ValueError, match="does not build .* bundles yet; prune its graph with"):
        clse_fx.compile(qwen, 0.334)
