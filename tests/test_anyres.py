"""Any-resolution images (LLaVA-NeXT, LLaVA-OneVision): a base grid plus a tiled grid whose shape follows the image's
aspect ratio (OneVision shrinks large ones), with a newline token after each tiled row; and OneVision's videos,
frames of pooled grids and one newline. Pass == reference, all tokens == the unmodified model, and bundles
generating as the reference, at several aspect ratios, batch 2 with the visual block at different positions."""

import pytest
import torch

import clse_fx
from clse_fx.compiler import prune_prefill
from clse_fx.deploy.engine import Engine
from clse_fx.models import adapter_for, examples_for
from clse_fx.plan import PruneConfig, extra_positions, plan_budget, scored_count, segment_size
from clse_fx.reference import reference_generate, reference_prune

from .test_deploy import clse_run_blocked, greedy_answers_match, sample_images, sample_video, video_reference_inputs
from .tiny_models import save_tiny_llava_next, save_tiny_llava_next_video, save_tiny_llava_onevision, tiny_processor

# Two prompts of exactly the bundles' 9 text tokens (the tiny tokenizer is word-level): no padding, so the
# reference can be fed the processor's batch as it is.
PROMPTS = ["what is the colour of the left shape ?", "how many red circle are there in image ?"]

# image size -> tiled grid, per family (OneVision's tiny config caps tiled grids at 2 tiles' worth: 5x5 for 8x8)
SIZES = {
    "llava_next": {(64, 64): (8, 8), (40, 64): (6, 8), (64, 40): (8, 6), (32, 96): (4, 12)},
    "llava_onevision": {(64, 64): (5, 5), (40, 64): (4, 6), (96, 96): (5, 5), (90, 60): (6, 4)},
    "llava_next_video": {(96, 96): (12, 12), (60, 96): (8, 12), (96, 60): (12, 8), (48, 96): (6, 12)},  # 48 px tiles
}
SAVE = {
    "llava_next": save_tiny_llava_next,
    "llava_onevision": save_tiny_llava_onevision,
    "llava_next_video": save_tiny_llava_next_video,  # its still images
}


@pytest.fixture(scope="module", params=sorted(SAVE))
def family(request, tmp_path_factory):
    """(family name, tiny model reloaded through from_pretrained)."""
    return request.param, SAVE[request.param](tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def model(family):
    return family[1]


def _inputs(model, size, images=1, offsets=(2, 5)) -> tuple[dict, int]:
    """Batch-2 inputs with ``images`` images of ``size`` after ``offsets[row]`` text tokens, and the scored
    tokens per row."""
    layout = adapter_for(model).image_layout(size)
    tokens = sum(segment_size(segment) for segment in layout) * images
    token = model.config.image_token_id
    rows = [[1] + [3 + i for i in range(n)] + [token] * tokens + [40 + i for i in range(8 - n)] for n in offsets]
    example = examples_for(model).example_inputs(2, 9, images, torch.Generator().manual_seed(1), image_size=size)
    ids = torch.tensor(rows)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    inputs.update({k: example[k] for k in ("pixel_values", "image_sizes")})
    return inputs, scored_count(layout) * images


def test_tiled_grid_follows_the_aspect_ratio(family):
    name, model = family
    for size, tiled in SIZES[name].items():
        _check_tiled_layout(model, size, tiled)


def _check_tiled_layout(model, size, tiled):
    adapter = adapter_for(model)
    layout = adapter.image_layout(size)
    side = adapter.side()
    assert layout == (("grid", 1, side, side), ("grid", 1, *tiled, 1))
    inputs, _ = _inputs(model, size)
    # The processor-facing count: transformers' own packing of the unmodified model gives as many features.
    with torch.no_grad():
        features = model.model.get_image_features(inputs["pixel_values"][:1], inputs["image_sizes"][:1]).pooler_output
    assert features[0].shape[0] == sum(segment_size(segment) for segment in layout)
    newlines = extra_positions(layout)
    assert len(newlines) == tiled[0] and newlines[0] == side * side + tiled[1]


@pytest.mark.parametrize(
    ("size", "images", "score", "fractions"),
    [
        ((64, 64), 1, "clse_attn", (2, 4, 10)),
        ((40, 64), 2, "clse", (3,)),
    ],
)
def test_pass_equals_reference(family, size, images, score, fractions):
    name, model = family
    if images > 1 and name != "llava_next":  # one multi-image case: the packing code is LLaVA-NeXT's for all three
        pytest.skip("LLaVA-OneVision takes one image per prompt; LLaVA-NeXT-Video's stills run LLaVA-NeXT's code")
    inputs, scored = _inputs(model, size, images)
    stages = [(layer, scored // fraction) for layer, fraction in zip((1, 2, 3), fractions)]
    prune = PruneConfig(plan=plan_budget(None, 4, scored, stages=stages), score=score)
    out = prune_prefill(model, prune, inputs)()
    ref = reference_prune(model, prune, **inputs)
    assert (out.logits - ref.logits[:, -1:]).abs().max() <= 1e-5  # the prefill gives the last position's
    assert torch.equal(out.positions, ref.positions)
    assert all(torch.equal(a, b) for a, b in zip(out.kept, ref.kept))
    newlines = set(extra_positions(adapter_for(model).image_layout(size) * images))
    assert all(newlines <= set(row.tolist()) for stage in out.kept for row in stage)


def test_budget_of_all_tokens_equals_unmodified_model(model):
    size = (40, 64)
    inputs, scored = _inputs(model, size)
    out = prune_prefill(model, PruneConfig(plan=plan_budget(scored, 4, scored)), inputs)()
    with torch.no_grad():
        plain = model(**inputs, logits_to_keep=1).logits
    assert (out.logits - plain).abs().max() <= 1e-5


def test_bundle_generation_equals_reference(family, tmp_path):
    """A batch-2 bundle compiled for 40 x 64 images: ONNX Runtime == PyTorch, 16 greedy tokens == reference.
    (LLaVA-NeXT-Video's stills run LLaVA-NeXT's adapter code, whose bundle this checks; its graph is checked
    above, its video bundle in test_video.py.) Then from pixels and text: Engine.generate's greedy answers equal
    the reference fed the transformers processor's outputs, and (LLaVA-NeXT) clse-run answers the same in a
    process without torch or transformers."""
    name, model = family
    if name == "llava_next_video":
        pytest.skip("same image path as LLaVA-NeXT's bundle; kept out for the suite's time budget")
    size = (40, 64)
    inputs, scored = _inputs(model, size)
    stages = [(1, scored // 2), (2, scored // 4), (3, scored // 10)]
    # The processor comes from the checkpoint, as in clse-compile (OneVision's without its video processor)
    result = clse_fx.compile(
        model, stages=stages, batch=2, text_len=9, image_size=size, output_dir=tmp_path / "b", verify=False,
        optimize_onnx=False,
    )  # fmt: skip
    manifest = result.manifest
    assert manifest.parity["onnxruntime_max_abs_logits"] <= 1e-4 and manifest.parity["onnxruntime_indices_identical"]
    layout = adapter_for(model).image_layout(size)
    assert manifest.geometry["layout"] == [list(segment) for segment in layout]
    assert manifest.geometry["image_size"] == list(size)
    feeds = {k: inputs[k].numpy() for k in ("input_ids", "attention_mask", "pixel_values")}
    engine = Engine.load(tmp_path / "b")
    generated, _ = engine.generate_ids(feeds, max_new_tokens=16)
    prune = PruneConfig(plan=plan_budget(None, 4, scored, stages=stages))
    assert generated == reference_generate(model, prune, max_new_tokens=16, **inputs).tolist()

    assert manifest.preprocess["pixels"]["kind"] == "anyres"
    images = [image.convert("RGB").resize(size[::-1]) for image in sample_images()[:2]]
    answers = engine.generate(images, PROMPTS, max_new_tokens=8)
    processor = tiny_processor(name)
    batch = processor(images=images, text=[f"<image>\n{prompt}" for prompt in PROMPTS], return_tensors="pt")
    batch = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_sizes")}
    greedy_answers_match(answers, reference_generate(model, prune, max_new_tokens=8, **batch), engine)
    if name == "llava_next":  # one anyres bundle through clse-run without torch or transformers
        rows = clse_run_blocked(tmp_path / "b", images, PROMPTS, tmp_path)
        assert [row["token_ids"] for row in rows] == [a.token_ids for a in answers]


def _video_inputs(model, frames: int, offsets=(2, 5)) -> tuple[dict, int]:
    """Batch-2 OneVision inputs, one video of ``frames`` frames per row, and the scored tokens per row."""
    tokens = frames * 4 + 1  # 2x2 pooled grids, then one newline
    rows = [
        [1] + [3 + i for i in range(n)] + [model.config.video_token_id] * tokens + [40 + i for i in range(8 - n)]
        for n in offsets
    ]
    ids = torch.tensor(rows)
    pixels = torch.randn(2, frames, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values_videos": pixels}, frames * 4


@pytest.fixture(scope="module")
def onevision(tmp_path_factory):
    return save_tiny_llava_onevision(tmp_path_factory.mktemp("onevision"))


@pytest.mark.parametrize(("frames", "score"), [(4, "clse_attn")])
def test_onevision_video_pass_equals_reference(onevision, frames, score):
    inputs, scored = _video_inputs(onevision, frames)
    layout = adapter_for(onevision).visual_layout(scored + 1, pixel_values_videos=inputs["pixel_values_videos"])
    assert layout == (("grid", frames, 2, 2), ("extra", 1))
    prune = PruneConfig(plan=plan_budget(None, 4, scored, stages=[(1, scored // 2), (3, scored // 4)]), score=score)
    out = prune_prefill(onevision, prune, inputs)()
    ref = reference_prune(onevision, prune, **inputs)
    assert (out.logits - ref.logits[:, -1:]).abs().max() <= 1e-5  # the prefill gives the last position's
    assert all(torch.equal(a, b) for a, b in zip(out.kept, ref.kept))
    assert all(scored in row.tolist() for stage in out.kept for row in stage)  # the closing newline stays
    with torch.no_grad():
        plain = onevision(**inputs, logits_to_keep=1).logits
    everything = prune_prefill(onevision, PruneConfig(plan=plan_budget(scored, 4, scored)), inputs)()
    assert (everything.logits - plain).abs().max() <= 1e-5


def test_onevision_video_bundle_generation_equals_reference(onevision, tmp_path):
    inputs, scored = _video_inputs(onevision, 4)
    stages = [(1, 8), (2, 4), (3, 2)]
    processor = tiny_processor("llava_onevision")
    result = clse_fx.compile(
        onevision, stages=stages, batch=2, text_len=9, frames=4, output_dir=tmp_path / "b", verify=False,
        processor=processor, optimize_onnx=False,
    )  # fmt: skip
    assert result.manifest.parity["onnxruntime_indices_identical"]
    feeds = {k: inputs[k].numpy() for k in ("input_ids", "attention_mask", "pixel_values_videos")}
    engine = Engine.load(tmp_path / "b")
    generated, _ = engine.generate_ids(feeds, max_new_tokens=16)
    prune = PruneConfig(plan=plan_budget(None, 4, scored, stages=stages))
    assert generated == reference_generate(onevision, prune, max_new_tokens=16, **inputs).tolist()
    # From frames and text (frames as the per-frame image processing its video processor does; that one needs
    # torchvision): Engine.generate answers as the reference fed the same.
    videos = [sample_video(4, seed) for seed in (0, 1)]
    answers = engine.generate(videos, PROMPTS, max_new_tokens=8)
    inputs = video_reference_inputs("llava_onevision", processor, videos, PROMPTS, 4 * 4 + 1)
    greedy_answers_match(answers, reference_generate(onevision, prune, max_new_tokens=8, **inputs), engine)
