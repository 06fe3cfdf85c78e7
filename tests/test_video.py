"""Video MLLMs through the same passes: Qwen2-VL / Qwen2.5-VL videos and LLaVA-NeXT-Video, T = 4 and 8 frames
(the spectral filter runs per frame), batch 2 with the video at different positions."""

import json

import pytest
import torch

import clse_fx
from clse_fx.compiler import prune_prefill
from clse_fx.deploy.engine import Engine
from clse_fx.models import adapter_for
from clse_fx.plan import PruneConfig, plan_budget
from clse_fx.reference import reference_generate, reference_prune

from .test_deploy import greedy_answers_match, run_blocked, sample_video, video_reference_inputs
from .tiny_models import (
    QWEN_FAMILIES,
    QWEN_VIDEO,
    VIDEO_TOKEN,
    qwen_inputs,
    save_tiny_llava_next_video,
    save_tiny_qwen,
    tiny_processor,
)

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
        tokens, token = frames * adapter.tokens_per_frame(), VIDEO_TOKEN
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
    layout = adapter_for(video_model).visual_layout(tokens, **{k: v for k, v in inputs.items() if k != "input_ids"})
    assert layout == (("grid", frames, 7, 9) if "Qwen" in type(video_model).__name__ else ("grid", frames, 3, 3),)


@pytest.mark.parametrize(
    ("frames", "score", "three_stage"),
    [(4, "clse_attn", True), (8, "clse", False)],
)
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


@pytest.fixture(scope="module")
def video_bundle(video_model, tmp_path_factory):
    """A batch-2, 4-frame bundle (text_len 8 leaves room for the Qwen vision start/end markers)."""
    if type(video_model).__name__ == "Qwen2VLForConditionalGeneration":
        # Qwen2.5-VL's video bundle runs the same adapter, vision and M-RoPE graph code plus the frame timing,
        # and Qwen2-VL's own graphs are exported by test_qwen2_vl.py: one Qwen video bundle keeps the suite short.
        pytest.skip("covered by the Qwen2.5-VL video bundle and Qwen2-VL's image bundle")
    out = tmp_path_factory.mktemp("video-bundle") / "b"
    qwen = "Qwen" in type(video_model).__name__
    tokens = 4 * (63 if qwen else adapter_for(video_model).tokens_per_frame())
    stages = [(1, tokens // 2), (2, tokens // 4), (3, tokens // 12)]
    size = {"image_size": (56, 72)} if qwen else {}
    text_len = (
        9 - qwen
    )  # the rows of video_inputs (9 text tokens), Qwen's with vision start/end markers around the video
    # The graph's parity with the reference pruner is test_video_pass_equals_reference's; this bundle is checked
    # against ONNX Runtime (in the manifest) and by generation.
    # LLaVA-NeXT-Video's bundle gets the tiny processor (it cannot be saved with the checkpoint: tiny_processor)
    processor = None if qwen else tiny_processor("llava_next_video")
    result = clse_fx.compile(
        video_model, stages=stages, batch=2, text_len=text_len, frames=4, output_dir=out, verify=False,
        processor=processor, **size,
    )  # fmt: skip
    return out, result.manifest, stages


def test_video_bundle_generation_equals_reference(video_model, video_bundle):
    """ONNX Runtime == PyTorch, and 16 greedy tokens from the engines equal the reference, for 4-frame videos."""
    bundle, manifest, stages = video_bundle
    parity = manifest.parity
    assert parity["onnxruntime_max_abs_logits"] <= 1e-4 and parity["onnxruntime_indices_identical"]
    assert manifest.geometry["grid"][0] == 4
    inputs, tokens = video_inputs(video_model, 4)
    if "Qwen" in type(video_model).__name__:  # wrap the video in the vision start/end markers the bundle expects
        ids = inputs["input_ids"]
        start, end = video_model.config.vision_start_token_id, video_model.config.vision_end_token_id
        first = (ids == QWEN_VIDEO).int().argmax(dim=1)
        rows = [r[:f].tolist() + [start] + r[f : f + tokens].tolist() + [end] + r[f + tokens :].tolist()[:-1]
                for r, f in zip(ids, first.tolist())]  # fmt: skip
        ids = torch.tensor(rows)
        inputs = dict(
            inputs, input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=(ids == QWEN_VIDEO).int() * 2
        )
    engine = Engine.load(bundle)
    pixels = "pixel_values_videos"
    feeds = {k: inputs[k].numpy() for k in ("input_ids", "attention_mask", pixels)}
    generated, _ = engine.generate_ids(feeds, max_new_tokens=16)
    prune = PruneConfig(plan=plan_budget(None, 4, tokens, stages=stages))
    expected = reference_generate(video_model, prune, max_new_tokens=16, **inputs)
    assert generated == expected.tolist()


def test_llava_next_video_bundle_answers_from_frames(video_model, request, tmp_path):
    """From frames and text: Engine.generate's greedy answers equal the reference fed what the processor gives
    (ids with the video placeholder expanded; frames as the per-frame image processing of its video processor,
    which needs torchvision), and clse-run --video on folders of frames answers the same without torch or
    transformers."""
    if type(video_model).__name__ != "LlavaNextVideoForConditionalGeneration":
        pytest.skip("the Qwen families' deploy preprocessing is not tested here")
    bundle, manifest, stages = request.getfixturevalue("video_bundle")  # not built for a skipped family
    engine = Engine.load(bundle)
    videos = [sample_video(4, seed) for seed in (0, 1)]
    prompts = ["what is the colour of the left shape ?", "how many red circle are there in image ?"]  # 9 tokens
    answers = engine.generate(videos, prompts, max_new_tokens=8)
    tokens = 4 * adapter_for(video_model).tokens_per_frame()
    inputs = video_reference_inputs("llava_next_video", tiny_processor("llava_next_video"), videos, prompts, tokens)
    prune = PruneConfig(plan=plan_budget(None, 4, tokens, stages=stages))
    greedy_answers_match(answers, reference_generate(video_model, prune, max_new_tokens=8, **inputs), engine)
    argv = [str(bundle), "--json", "--max-new-tokens", "8"]
    for v, (frames, prompt) in enumerate(zip(videos, prompts)):
        (tmp_path / str(v)).mkdir()
        for i, frame in enumerate(frames):
            frame.save(tmp_path / str(v) / f"{i:03d}.png")
        argv += ["--video", str(tmp_path / str(v)), "--prompt", prompt]
    done = run_blocked(f"from clse_fx.deploy.cli import run_main; sys.exit(run_main({argv!r}))")
    assert [row["token_ids"] for row in json.loads(done.stdout)["results"]] == [a.token_ids for a in answers]
