"""Qwen2-VL / Qwen2.5-VL through the same passes: M-RoPE ids and the vision tower are graph inputs."""

import pytest
import torch
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)

from clse_fx.compiler import prune_prefill
from clse_fx.models import adapter_for
from clse_fx.plan import QWEN2_VL_SCHEDULE, PruneConfig, plan_budget
from clse_fx.reference import reference_prune

IMAGE, START, END = 150, 152, 153
GRID = (1, 14, 18)  # 4 px patches; after the 2x2 merge a 7x9 grid of 63 tokens
TOKENS = 63

FAMILIES = {
    "qwen2_vl": (Qwen2VLConfig, Qwen2VLForConditionalGeneration, {}),
    "qwen2_5_vl": (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, {"out_hidden_size": 64, "window_size": 16}),
}


def _save_tiny(path, family):
    config_class, model_class, vision_extra = FAMILIES[family]
    text = dict(
        vocab_size=200, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
        max_position_embeddings=1024, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    vision = dict(
        depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=4, spatial_merge_size=2,
        temporal_patch_size=2, in_channels=3, **vision_extra,
    )  # fmt: skip
    if family == "qwen2_5_vl":
        vision.update(hidden_size=32, intermediate_size=64, fullatt_block_indexes=[1])
        vision.pop("embed_dim"), vision.pop("mlp_ratio")
    config = config_class(
        text_config=text, vision_config=vision, image_token_id=IMAGE, video_token_id=151,
        vision_start_token_id=START, vision_end_token_id=END,
    )  # fmt: skip
    torch.manual_seed(0)
    model = model_class(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0.0, 0.2)
    model.save_pretrained(path)
    return model_class.from_pretrained(path, attn_implementation="sdpa").eval()


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def qwen(request, tmp_path_factory):
    return _save_tiny(tmp_path_factory.mktemp(request.param), request.param)


def _inputs(model, rows):
    patch = model.config.vision_config.patch_size
    channels = 3 * model.config.vision_config.temporal_patch_size * patch * patch
    ids = torch.tensor(rows)
    grid = torch.tensor([GRID] * len(rows))
    pixels = torch.randn(len(rows) * GRID[1] * GRID[2], channels, generator=torch.Generator().manual_seed(0))
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": pixels,
        "image_grid_thw": grid,
        "mm_token_type_ids": (ids == IMAGE).int(),
    }


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
