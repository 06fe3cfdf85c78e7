"""Video MLLMs through the same passes: Qwen2-VL / Qwen2.5-VL videos and LLaVA-NeXT-Video, T = 4 and 8 frames
(the spectral filter runs per frame), batch 2 with the video at different positions."""

import numpy as np
import pytest
import torch
from PIL import Image

from clse_fx.cli import compile_main
from clse_fx.compiler import prune_prefill
from clse_fx.deploy.engine import Engine
from clse_fx.deploy.manifest import read_manifest
from clse_fx.models import adapter_for
from clse_fx.plan import PruneConfig, plan_budget
from clse_fx.reference import reference_generate, reference_prune

from .test_deploy import (
    PIXEL_TOLERANCE,
    clse_run_blocked,
    greedy_answers_match,
    sample_video,
    video_reference_inputs,
)
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
    assert (out.logits - ref.logits[:, -1:]).abs().max() <= 1e-5  # the prefill gives the last position's
    assert torch.equal(out.positions, ref.positions)
    assert all(torch.equal(a, b) for a, b in zip(out.kept, ref.kept))


def test_video_budget_of_all_tokens_equals_unmodified_model(video_model):
    inputs, tokens = video_inputs(video_model, 4)
    prune = PruneConfig(plan=plan_budget(None, 4, tokens, stages=[(1, tokens), (3, tokens)]))
    out = prune_prefill(video_model, prune, inputs)()
    with torch.no_grad():
        plain = video_model(**inputs, logits_to_keep=1).logits
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
    # text_len: the rows of video_inputs (9 text tokens), Qwen's with vision start/end markers around the video
    argv = ["--batch", "2", "--text-len", str(9 - qwen), "--frames", "4", "--no-onnx-optimize"]
    argv += ["--stages", ",".join(f"{layer}:{keep}" for layer, keep in stages)]
    argv += ["--image-size", "56x72"] if qwen else []
    # clse-compile as a user runs it on the checkpoint dir: its processor loads without the video processor,
    # which needs torchvision (api.load_processor); the bundle's preprocessing comes from it.
    assert compile_main([video_model.name_or_path, *argv, "-o", str(out)]) == 0
    return out, read_manifest(out), stages


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
        pytest.skip("the Qwen families' answers from frames are test_qwen_video_bundle_answers_from_frames'")
    bundle, manifest, stages = request.getfixturevalue("video_bundle")  # not built for a skipped family
    engine = Engine.load(bundle)
    videos = [sample_video(4, seed) for seed in (0, 1)]
    prompts = ["what is the colour of the left shape ?", "how many red circle are there in image ?"]  # 9 tokens
    answers = engine.generate(videos, prompts, max_new_tokens=8)
    tokens = 4 * adapter_for(video_model).tokens_per_frame()
    inputs = video_reference_inputs("llava_next_video", tiny_processor("llava_next_video"), videos, prompts, tokens)
    prune = PruneConfig(plan=plan_budget(None, 4, tokens, stages=stages))
    greedy_answers_match(answers, reference_generate(video_model, prune, max_new_tokens=8, **inputs), engine)
    rows = clse_run_blocked(bundle, [list(frames) for frames in videos], prompts, tmp_path)
    assert [row["token_ids"] for row in rows] == [a.token_ids for a in answers]


def qwen_video_oracle(processor, videos) -> np.ndarray:
    """Qwen videos' ``pixel_values_videos`` as transformers computes them, without its video processor (it needs
    torchvision): each frame through the image processor (PIL backend: resize, rescale, normalise, patchify with
    the frame repeated over the temporal patch), unpatchified back to [3, H, W] (checked by patchifying it again
    with the image processor's own ``patchify``), then the frames stacked and patchified by the video processor's
    ``patchify``, whose source is read from transformers and run as is."""
    import ast
    from pathlib import Path

    import transformers

    source = Path(transformers.__file__).parent / "models/qwen2_vl/video_processing_qwen2_vl.py"
    tree = ast.parse(source.read_text())
    video_class = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Qwen2VLVideoProcessor")
    method = next(n for n in video_class.body if isinstance(n, ast.FunctionDef) and n.name == "patchify")
    namespace = {"torch": torch}
    exec(compile(ast.Module([method], type_ignores=[]), str(source), "exec"), namespace)
    image_processor = processor.image_processor
    sizes = image_processor.patch_size, image_processor.merge_size, image_processor.temporal_patch_size
    patch, merge, temporal = sizes
    out = []
    for frames in videos:
        stack = []
        for frame in frames:
            processed = image_processor(images=[frame], return_tensors="np")
            patches, (grid_h, grid_w) = processed["pixel_values"], processed["image_grid_thw"][0, 1:]
            blocks = patches.reshape(grid_h // merge, grid_w // merge, merge, merge, 3, temporal, patch, patch)
            assert (blocks == blocks[..., :1, :, :]).all()  # the image's temporal copies
            array = blocks[..., 0, :, :].transpose(4, 0, 2, 5, 1, 3, 6).reshape(3, grid_h * patch, grid_w * patch)
            assert np.array_equal(image_processor.patchify(array, *sizes)[0], patches)
            stack.append(array)
        video = torch.from_numpy(np.stack(stack))[None]
        out.append(namespace["patchify"](None, video, patch, merge, temporal)[0][0].numpy())
    return np.concatenate(out)


def qwen_video(frames, seed):
    """``frames`` frames of 57 x 70 px, which smart_resize fits to the bundles' 56 x 72."""
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (57, 70, 3), dtype=np.uint8)) for _ in range(frames)]


@pytest.mark.parametrize("family", sorted(QWEN_FAMILIES))
def test_qwen_video_recipe_matches_transformers(family, tmp_path):
    """A 4-step video bundle takes 8 frames (2 per temporal patch); its recipe's pixels equal
    :func:`qwen_video_oracle`'s within 1e-5, for a batch of two videos; the prompt names the video as Qwen's chat
    template does."""
    from .test_qwen2_vl import qwen_preprocessor

    processor, preprocessor = qwen_preprocessor(family, tmp_path, frames=4)
    assert preprocessor.modality == "video" and preprocessor.frames == 8
    videos = [qwen_video(8, seed) for seed in (0, 1)]
    got = preprocessor.pixel_feeds([[video] for video in videos])["pixel_values_videos"]
    expected = qwen_video_oracle(processor, videos)
    assert got.dtype == np.float32 and got.shape == expected.shape == (2 * 4 * 252, 96)
    assert np.abs(got - expected).max() <= PIXEL_TOLERANCE
    ids = preprocessor.encode_text("what is it", 1)
    expected_ids = processor.tokenizer("<|vision_start|><|video_pad|><|vision_end|>what is it")["input_ids"]
    assert ids == [i for t in expected_ids for i in ([t] * 4 * 63 if t == QWEN_VIDEO else [t])]


def test_qwen_video_bundle_answers_from_frames(video_model, request, tmp_path):
    """Qwen2.5-VL from frames and text: Engine.generate's greedy answers equal the reference fed what the
    processor gives (the tokenizer's ids with the video placeholder expanded, :func:`qwen_video_oracle`'s pixels,
    the video grids, one second per temporal step as the bundle was compiled), and clse-run --video on folders of
    frames answers the same without torch or transformers."""
    if type(video_model).__name__ != "Qwen2_5_VLForConditionalGeneration":
        pytest.skip("one Qwen video bundle: Qwen2.5-VL's")
    bundle, manifest, stages = request.getfixturevalue("video_bundle")
    engine = Engine.load(bundle)
    videos = [qwen_video(8, seed) for seed in (0, 1)]
    prompts = ["what is the colour of the shape ?", "how many red circle are there ?"]  # 8 tokens at most
    answers = engine.generate(videos, prompts, max_new_tokens=8)
    processor, tokens = tiny_processor("qwen2_5_vl"), 4 * 63
    item = engine.preprocessor.text.item_text
    rows, masks = [], []
    for prompt in processor.tokenizer([item + p for p in prompts])["input_ids"]:
        row = [i for t in prompt for i in ([t] * tokens if t == QWEN_VIDEO else [t])]
        pad = engine.sequence_length - len(row)
        rows.append([engine.pad_id] * pad + row)
        masks.append([0] * pad + [1] * len(row))
    ids = torch.tensor(rows)
    assert ids.tolist() == engine.encode(videos, prompts)["input_ids"].tolist()
    inputs = {
        "input_ids": ids,
        "attention_mask": torch.tensor(masks),
        "pixel_values_videos": torch.from_numpy(qwen_video_oracle(processor, videos)),
        "video_grid_thw": torch.tensor([[4, 14, 18]] * 2),
        "second_per_grid_ts": torch.tensor([1.0, 1.0]),
        "mm_token_type_ids": (ids == QWEN_VIDEO).int() * 2,
    }
    prune = PruneConfig(plan=plan_budget(None, 4, tokens, stages=stages))
    greedy_answers_match(answers, reference_generate(video_model, prune, max_new_tokens=8, **inputs), engine)
    assert any(len(a.token_ids) > 1 for a in answers)
    rows = clse_run_blocked(bundle, [list(frames) for frames in videos], prompts, tmp_path)
    assert [row["token_ids"] for row in rows] == [a.token_ids for a in answers]
