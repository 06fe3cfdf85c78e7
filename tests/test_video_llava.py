"""Video-LLaVA: images are one patch grid; each video frame is [CLS, grid], its CLS an extra token that every
stage keeps. Pass == reference, all tokens == the unmodified model, and a bundle generating as the reference."""

import pytest
import torch

import clse_fx
from clse_fx.compiler import prune_prefill
from clse_fx.deploy.engine import Engine
from clse_fx.models import adapter_for
from clse_fx.plan import PruneConfig, extra_positions, plan_budget, scored_count
from clse_fx.reference import reference_generate, reference_prune

from .test_deploy import greedy_answers_match, sample_video, video_reference_inputs
from .tiny_models import VIDEO_LLAVA_IMAGE, VIDEO_LLAVA_VIDEO, save_tiny_video_llava, tiny_processor

GRID = 16  # 4x4 patches per image or frame


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_tiny_video_llava(tmp_path_factory.mktemp("video_llava"))


def _inputs(modality: str, count: int, offsets=(2, 5)) -> tuple[dict, int]:
    """Batch-2 inputs with ``count`` images (or one video of ``count`` frames) after ``offsets[row]`` text
    tokens; returns them and the scored (grid) tokens per row."""
    token, per_item = (VIDEO_LLAVA_IMAGE, GRID) if modality == "image" else (VIDEO_LLAVA_VIDEO, GRID + 1)
    rows = [
        [1] + [3 + i for i in range(n)] + [token] * per_item * count + [40 + i for i in range(8 - n)] for n in offsets
    ]
    ids = torch.tensor(rows)
    generator = torch.Generator().manual_seed(0)
    if modality == "image":
        pixels = {"pixel_values": torch.randn(2 * count, 3, 32, 32, generator=generator)}
    else:
        pixels = {"pixel_values_videos": torch.randn(2, count, 3, 32, 32, generator=generator)}
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), **pixels}, GRID * count


def test_video_frames_are_cls_then_grid(model):
    inputs, scored = _inputs("video", 4)
    layout = adapter_for(model).visual_layout(4 * (GRID + 1), **{k: v for k, v in inputs.items() if k != "input_ids"})
    assert layout == (("extra", 1), ("grid", 1, 4, 4)) * 4
    assert scored_count(layout) == scored and extra_positions(layout) == (0, 17, 34, 51)
    images, _ = _inputs("image", 2)
    assert adapter_for(model).visual_layout(2 * GRID, pixel_values=images["pixel_values"]) == (("grid", 2, 4, 4),)


@pytest.mark.parametrize(
    ("modality", "count", "score", "stages"),
    [
        ("video", 4, "clse_attn", "1:40,2:20,3:6"),
        ("video", 8, "clse", "1:64,2:32,3:10"),
        ("image", 1, "clse_attn", "1:10,2:6,3:2"),
    ],
)
def test_pass_equals_reference(model, modality, count, score, stages):
    inputs, scored = _inputs(modality, count)
    prune = PruneConfig(plan=plan_budget(None, 4, scored, stages=stages), score=score)
    out = prune_prefill(model, prune, inputs)()
    ref = reference_prune(model, prune, **inputs)
    assert (out.logits - ref.logits[:, -1:]).abs().max() <= 1e-5  # the prefill gives the last position's
    assert torch.equal(out.positions, ref.positions)
    assert all(torch.equal(a, b) for a, b in zip(out.kept, ref.kept))
    if modality == "video":  # every frame's CLS survives every stage
        cls = set(range(0, count * (GRID + 1), GRID + 1))
        assert all(cls <= set(row.tolist()) for stage in out.kept for row in stage)


@pytest.mark.parametrize("modality", ["image", "video"])
def test_budget_of_all_tokens_equals_unmodified_model(model, modality):
    inputs, scored = _inputs(modality, 4 if modality == "video" else 1)
    prune = PruneConfig(plan=plan_budget(scored, 4, scored))
    out = prune_prefill(model, prune, inputs)()
    with torch.no_grad():
        plain = model(**inputs, logits_to_keep=1).logits
    assert (out.logits - plain).abs().max() <= 1e-5


def test_video_bundle_generation_equals_reference(model, tmp_path):
    """A batch-2, 4-frame bundle: ONNX Runtime == PyTorch, and 16 greedy tokens equal the reference; from frames
    and text, Engine.generate answers as the reference fed what the processor gives (frames as the per-frame
    image processing its video processor does: that one needs torchvision)."""
    stages = [(1, 32), (2, 16), (3, 6)]
    result = clse_fx.compile(  # the processor comes from the checkpoint, without its video processor
        model, stages=stages, batch=2, text_len=9, frames=4, output_dir=tmp_path / "b", verify=False,
        optimize_onnx=False,
    )  # fmt: skip
    processor = tiny_processor("video_llava")
    manifest = result.manifest
    assert manifest.parity["onnxruntime_max_abs_logits"] <= 1e-4 and manifest.parity["onnxruntime_indices_identical"]
    assert manifest.geometry["layout"] == [["extra", 1], ["grid", 1, 4, 4]] * 4
    assert manifest.geometry["num_visual"] == 64 and manifest.geometry["pruned_length"] == 9 + 4 + 6
    inputs, scored = _inputs("video", 4)
    feeds = {k: inputs[k].numpy() for k in ("input_ids", "attention_mask", "pixel_values_videos")}
    engine = Engine.load(tmp_path / "b")
    generated, _ = engine.generate_ids(feeds, max_new_tokens=16)
    prune = PruneConfig(plan=plan_budget(None, 4, scored, stages=stages))
    assert generated == reference_generate(model, prune, max_new_tokens=16, **inputs).tolist()

    videos = [sample_video(4, seed) for seed in (0, 1)]
    prompts = ["what is the colour of the left shape ?", "how many red circle are there in image ?"]  # 9 tokens
    answers = engine.generate(videos, prompts, max_new_tokens=8)
    inputs = video_reference_inputs("video_llava", processor, videos, prompts, 4 * (GRID + 1))
    greedy_answers_match(answers, reference_generate(model, prune, max_new_tokens=8, **inputs), engine)
