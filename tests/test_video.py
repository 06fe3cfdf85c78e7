"""Video MLLMs through the same passes: Qwen2-VL / Qwen2.5-VL videos and LLaVA-NeXT-Video, T = 4 and 8 frames
(the spectral filter runs per frame), batch 2 with the video at different positions."""

import pytest
import torch

from clse_fx.compiler import prune_prefill
from clse_fx.models import adapter_for
from clse_fx.plan import PruneConfig, plan_budget
from clse_fx.reference import reference_prune

from .tiny_models import QWEN_FAMILIES, QWEN_VIDEO, VIDEO_TOKEN, qwen_inputs, save_tiny_llava_next_video, save_tiny_qwen

QWEN_PATCHES = (14, 18)  # after the 2x2 merge a 7x9 grid per temporal patch


@pytest.fixture(scope="module", params=[*sorted(QWEN_FAMILIES), "llava_next_video"])
def video_model(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    if request.param == "llava_next_video":
        return save_tiny_llava_next_video(path)
    return save_tiny_qwen(path, request.param)


def video_inputs(model, frames: int, offsets=(2, 5)) -> tuple[dict, int]:
    """Batch-2 inputs, each row one video of ``frames`` temporal grid steps after ``offsets[row]`` text tokens."""
    adapter = adapter_for(model)
    if isinstance(model, tuple(QWEN_FAMILIES[f][1] for f in QWEN_FAMILIES)):
        tokens, token = frames * 63, QWEN_VIDEO
    else:
        tokens, token = frames * adapter.tokens_per_image(), VIDEO_TOKEN
    rows = [[1] + [3 + i for i in range(n)] + [token] * tokens + [40 + i for i in range(8 - n)] for n in offsets]
    if token == QWEN_VIDEO:
        return qwen_inputs(model, rows, (frames, *QWEN_PATCHES), modality="video"), tokens
    ids = torch.tensor(rows)
    size = model.config.vision_config.image_size
    pixels = torch.randn(len(rows), frames, 3, size, size, generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values_videos": pixels}, tokens


@pytest.mark.parametrize("frames", [4, 8])
def test_video_grid_is_frames_by_spatial_grid(video_model, frames):
    inputs, tokens = video_inputs(video_model, frames)
    grid = adapter_for(video_model).visual_grid(tokens, **{k: v for k, v in inputs.items() if k != "input_ids"})
    assert grid == ((frames, 7, 9) if "Qwen" in type(video_model).__name__ else (frames, 3, 3))


@pytest.mark.parametrize("frames", [4, 8])
@pytest.mark.parametrize("score", ["clse_attn", "clse"])
@pytest.mark.parametrize("three_stage", [False, True])
def test_video_pass_equals_reference(video_model, frames, score, three_stage):
    inputs, tokens = video_inputs(video_model, frames)
    keep = tokens // 3
    stages = [(1, 2 * keep), (2, keep), (3, keep // 3)] if three_stage else [(2, keep)]
    prune = PruneConfig(plan=plan_budget(None, 4, tokens, stages=stages), score=score)
    out = prune_prefill(video_model, prune, inputs)()
    ref = reference_prune(video_model, prune, **inputs)
    assert (out.logits - ref.logits).abs().max() <= 1e-5
    assert torch.equal(out.positions, ref.positions)
    assert all(torch.equal(a, b) for a, b in zip(out.kept, ref.kept))


def test_video_budget_of_all_tokens_equals_unmodified_model(video_model):
    inputs, tokens = video_inputs(video_model, 4)
    prune = PruneConfig(plan=plan_budget(None, 4, tokens, stages=[(1, tokens), (3, tokens)]))
    out = prune_prefill(video_model, prune, inputs)()
    with torch.no_grad():
        plain = video_model(**inputs).logits
    assert (out.logits - plain).abs().max() <= 1e-5


def test_llava_next_video_rejects_still_images(tmp_path):
    model = save_tiny_llava_next_video(tmp_path)
    with pytest.raises(ValueError, match="still images .* not supported; pass videos"):
        adapter_for(model).prepare_graph_inputs({"pixel_values": torch.zeros(1, 3, 48, 48)})
