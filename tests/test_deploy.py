"""Deploy runs bundles from pixels and text without torch or transformers: the preprocessing recipe against the
transformers processors (the oracle: ids identical, pixels within 1e-5), and clse-run / Engine.generate in a
process where importing torch or transformers fails, answering as in-process runs do."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from clse_fx.deploy.engine import Engine
from clse_fx.deploy.preprocess import Preprocessor
from clse_fx.deploy.preprocess.media import load_video, sample_indices

from . import tiny_models

PIXEL_TOLERANCE = 1e-5
# What a deployment image need not have: only numpy, onnxruntime, tokenizers and pillow are allowed.
BLOCKED_PACKAGES = ("torch", "transformers", "rich", "huggingface_hub", "safetensors", "onnx", "onnxscript")
# Runs a Python snippet with those packages unimportable (their import raises).
BLOCKED = textwrap.dedent(
    """
    import importlib.abc, sys

    BLOCKED_PACKAGES = {blocked}

    class Blocked(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in BLOCKED_PACKAGES:
                raise ImportError(f"{name} is blocked: deploy must run without it")

    sys.meta_path.insert(0, Blocked())
    """
).replace("{blocked}", repr(BLOCKED_PACKAGES))


def run_blocked(code: str) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter whose torch/transformers imports raise; it must succeed."""
    done = subprocess.run([sys.executable, "-c", BLOCKED + textwrap.dedent(code)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done


def clse_run_blocked(bundle, media: list, prompts: list[str], folder, max_new_tokens: int = 8) -> list[dict]:
    """``clse-run --json`` in a process without the blocked packages, on ``media`` saved under ``folder``: images
    as PNG files (``--image``), videos (lists of frames) as folders of PNG frames (``--video``); its result rows."""
    argv = [str(bundle), "--json", "--max-new-tokens", str(max_new_tokens)]
    for i, (item, prompt) in enumerate(zip(media, prompts)):
        if isinstance(item, list):
            (folder / f"video{i}").mkdir()
            for frame_number, frame in enumerate(item):
                frame.save(folder / f"video{i}" / f"{frame_number:03d}.png")
            argv += ["--video", str(folder / f"video{i}"), "--prompt", prompt]
        else:
            item.save(folder / f"image{i}.png")
            argv += ["--image", str(folder / f"image{i}.png"), "--prompt", prompt]
    done = run_blocked(f"from clse_fx.deploy.cli import run_main; sys.exit(run_main({argv!r}))")
    return json.loads(done.stdout)["results"]


def sample_images(seed: int = 0) -> list[Image.Image]:
    """Images a processor must handle: non-square both ways, RGBA with transparency, grayscale, palette, tiny."""
    rng = np.random.default_rng(seed)

    def noise(height, width, channels=3):
        return rng.integers(0, 256, (height, width, channels), dtype=np.uint8)

    rgba = Image.fromarray(noise(50, 70, 4), "RGBA")
    return [
        Image.fromarray(noise(60, 90)),
        Image.fromarray(noise(97, 41)),
        rgba,
        Image.fromarray(noise(33, 33)[..., 0], "L"),
        Image.fromarray(noise(40, 64)).convert("P"),
        Image.fromarray(noise(7, 9)),
    ]


def processor_oracle(bundle, images, prompts):
    """The transformers processor saved in the bundle, as the bundle's recipe prompts it."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(bundle)
    token = processor.image_token
    rows = [
        processor(images=[image], text=f"{token}\n{prompt}", return_tensors="np")
        for image, prompt in zip(images, prompts)
    ]
    return [row["input_ids"][0].tolist() for row in rows], np.concatenate([row["pixel_values"] for row in rows])


@pytest.fixture(scope="module")
def llava_engine(cli_bundle):
    return Engine.load(cli_bundle[0], threads=1)


def test_llava_recipe_matches_the_processor(llava_engine, cli_bundle):
    images = sample_images()
    prompts = ["what is it", "describe the left side"] * 3
    ids, pixels = processor_oracle(cli_bundle[0], images, prompts)
    for start in range(0, len(images), 2):
        feeds = llava_engine.encode(images[start : start + 2], prompts[start : start + 2])
        for row, expected in enumerate(ids[start : start + 2]):
            assert feeds["input_ids"][row, -len(expected) :].tolist() == expected
        got = feeds["pixel_values"]
        assert got.dtype == np.float32 and got.shape == pixels[start : start + 2].shape
        assert np.abs(got - pixels[start : start + 2]).max() <= PIXEL_TOLERANCE


def test_clse_run_and_engine_generate_need_neither_torch_nor_transformers(llava_engine, cli_bundle, tmp_path):
    bundle = cli_bundle[0]
    images = [image.convert("RGB") for image in sample_images()[:2]]
    prompts = ["what is it", "describe it"]
    expected = llava_engine.generate(images, prompts, max_new_tokens=5)
    rows = clse_run_blocked(bundle, images, prompts, tmp_path, max_new_tokens=5)
    paths = [tmp_path / f"image{i}.png" for i in range(len(images))]
    assert [row["token_ids"] for row in rows] == [g.token_ids for g in expected]
    assert [row["text"] for row in rows] == [g.text for g in expected]
    done = run_blocked(
        f"""
        from PIL import Image
        from clse_fx.deploy.engine import Engine
        engine = Engine.load({str(bundle)!r})
        images = [Image.open(p).convert("RGB") for p in {[str(p) for p in paths]!r}]
        print([g.token_ids for g in engine.generate(images, {prompts!r}, max_new_tokens=5)])
        assert not any(m.partition(".")[0] in BLOCKED_PACKAGES for m in sys.modules)
        """
    )
    assert done.stdout.strip() == str([g.token_ids for g in expected])


def test_videos_load_from_frame_folders_and_animations(tmp_path):
    frames = [Image.new("RGB", (8, 6), (i * 20, 0, 0)) for i in range(10)]
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, frame in enumerate(frames):
        frame.save(folder / f"{i:03d}.png")
    frames[0].save(tmp_path / "clip.gif", save_all=True, append_images=frames[1:], duration=40)
    assert sample_indices(10, 4) == [0, 3, 6, 9] and sample_indices(3, 5) == [0, 0, 1, 2, 2]
    for source in (folder, tmp_path / "clip.gif"):
        loaded = load_video(source, 4)
        assert [frame.getpixel((0, 0))[0] for frame in loaded] == [0, 60, 120, 180]
    (tmp_path / "empty").mkdir()
    for bad, message in [(tmp_path / "empty", "holds no frame images"), (tmp_path / "no.mp4", "cannot read video")]:
        with pytest.raises(ValueError, match=message):
            load_video(bad, 4)


# The LLaVA-derived families' tiny configs and model classes (built, not saved: the recipe needs the adapter only).
LLAVA_FAMILIES = {
    "llava_next": ("tiny_llava_next_config", "LlavaNextForConditionalGeneration"),
    "llava_onevision": ("tiny_llava_onevision_config", "LlavaOnevisionForConditionalGeneration"),
    "llava_next_video": ("tiny_llava_next_video_config", "LlavaNextVideoForConditionalGeneration"),
    "video_llava": ("tiny_video_llava_config", "VideoLlavaForConditionalGeneration"),
}


def family_preprocessor(family, tmp_path, image_size=None, frames=1):
    """The family's tiny processor and the :class:`Preprocessor` its deploy recipe writes for a bundle compiled
    at ``image_size`` (or for ``frames``-frame videos), without compiling one."""
    import torch
    import transformers

    from clse_fx.models import deploy_recipe_for, examples_for

    config, model_class = LLAVA_FAMILIES[family]
    torch.manual_seed(0)
    model = getattr(transformers, model_class)(getattr(tiny_models, config)()).eval()
    processor = tiny_models.tiny_processor(family)
    generator = torch.Generator().manual_seed(0)
    inputs = examples_for(model).example_inputs(1, 9, 1, generator, frames=frames, image_size=image_size)
    section = json.loads(json.dumps(deploy_recipe_for(model).preprocess(processor, inputs, 1)))  # as in manifests
    processor.tokenizer.save_pretrained(tmp_path)
    return processor, Preprocessor(tmp_path, section)


@pytest.mark.parametrize(
    ("family", "size"),
    [
        ("llava_next", (40, 64)),
        ("llava_next", (64, 40)),
        ("llava_next", (32, 96)),
        ("llava_onevision", (40, 64)),
        ("llava_next_video", (60, 96)),
        ("video_llava", None),
    ],
)
def test_llava_family_image_recipes_match_their_processors(family, size, tmp_path):
    """LLaVA-NeXT / OneVision / NeXT-Video stills (``anyres``: tiles of the pinpoint fitting the compiled size)
    and Video-LLaVA images (``clip``; the processor names them ``pixel_values_images``): ids identical, pixels
    within 1e-5 of the transformers processor, for images of the compiled size; an image of another size is
    resized to it first."""
    processor, preprocessor = family_preprocessor(family, tmp_path, image_size=size)
    assert preprocessor.pixels_params["kind"] == ("clip" if size is None else "anyres")
    images = sample_images()
    if size is not None:
        images = [image.convert("RGB").resize(size[::-1], Image.BICUBIC) for image in images]
    for image in images:
        expected = processor(images=[image], text=f"{processor.image_token}\nwhat is it", return_tensors="np")
        assert preprocessor.encode_text("what is it", 1) == expected["input_ids"][0].tolist()
        feeds = preprocessor.pixel_feeds([[image]])
        pixels = processed_pixels(expected)
        assert feeds["pixel_values"].dtype == np.float32 and feeds["pixel_values"].shape == pixels.shape
        assert np.abs(feeds["pixel_values"] - pixels).max() <= PIXEL_TOLERANCE
        if size is not None:
            assert feeds["image_sizes"].tolist() == expected["image_sizes"].tolist() == [list(size)]
    if size is not None:  # another size: resized to the compiled one first (the graph's tiling is fixed)
        odd = sample_images()[0]
        fitted = odd.resize(size[::-1], Image.BICUBIC)
        assert np.array_equal(
            preprocessor.pixel_feeds([[odd]])["pixel_values"], preprocessor.pixel_feeds([[fitted]])["pixel_values"]
        )


def processed_pixels(outputs):
    """An image processor's pixels: Video-LLaVA's (until transformers drops its legacy name) are
    ``pixel_values_images``."""
    return outputs["pixel_values_images"] if "pixel_values_images" in outputs else outputs["pixel_values"]


def frame_oracle(family, processor):
    """A transformers image processor that does what the family's video processor does to each frame (resize,
    centre crop unless SigLIP-style, rescale, normalise): the video processors need torchvision, not installed."""
    from transformers import CLIPImageProcessor

    if family == "video_llava":
        return processor.image_processor  # Video-LLaVA's CLIP image processor
    if family == "llava_onevision":
        return CLIPImageProcessor(size={"height": 32, "width": 32}, do_center_crop=False)
    return CLIPImageProcessor(size={"shortest_edge": 48}, crop_size={"height": 48, "width": 48})


def frame_pixels(family, processor, videos):
    """[N, T, 3, H, W] from :func:`frame_oracle` applied to every frame."""
    oracle = frame_oracle(family, processor)
    return np.stack([processed_pixels(oracle(images=frames, return_tensors="np")) for frames in videos])


def sample_video(frames, seed=0):
    """``frames`` frames of a non-square RGB video."""
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (45, 70, 3), dtype=np.uint8)) for _ in range(frames)]


@pytest.mark.parametrize("family", ["video_llava", "llava_next_video", "llava_onevision"])
def test_llava_family_video_recipes_match_per_frame_image_processing(family, tmp_path):
    """Videos (``clip`` per frame into ``pixel_values_videos`` [N, T, 3, H, W]) against a transformers image
    processor applied per frame, which is what the families' video processors do (they need torchvision, not
    installed, so they cannot be the oracle here)."""
    processor, preprocessor = family_preprocessor(family, tmp_path, frames=4)
    assert preprocessor.modality == "video" and preprocessor.frames == 4
    videos = [sample_video(4, seed) for seed in (0, 1)]
    feeds = preprocessor.pixel_feeds([[video] for video in videos])
    expected = frame_pixels(family, processor, videos)
    assert feeds["pixel_values_videos"].shape == expected.shape
    assert np.abs(feeds["pixel_values_videos"] - expected).max() <= PIXEL_TOLERANCE
    ids = preprocessor.encode_text("what is it", 1)
    video_id = processor.tokenizer.convert_tokens_to_ids(processor.video_token)
    assert (
        ids.count(video_id) == preprocessor.text.tokens_per_item
        and ids[-3:] == preprocessor.tokenizer.encode("what is it").ids
    )


def greedy_answers_match(generations, expected, engine):
    """Engine.generate's answers (cut after the bundle's first stop token) against the reference's fixed-length
    greedy rows."""
    stops = set(engine.manifest.stop_token_ids())
    for generation, row in zip(generations, expected.tolist()):
        cut = next((i + 1 for i, token in enumerate(row) if token in stops), len(row))
        assert generation.token_ids == row[:cut]


def video_reference_inputs(family, processor, videos, prompts, tokens):
    """What the family's processor gives for one video per prompt, built without its video processor (it needs
    torchvision): "<video>" expanded to ``tokens`` ids before each prompt, and :func:`frame_pixels`."""
    import torch

    video_id = processor.tokenizer.convert_tokens_to_ids(processor.video_token)
    rows = []
    for prompt in prompts:
        ids = processor.tokenizer(f"{processor.video_token}\n{prompt}")["input_ids"]
        rows.append([i for token in ids for i in ([token] * tokens if token == video_id else [token])])
    ids = torch.tensor(rows)
    pixels = torch.from_numpy(frame_pixels(family, processor, videos))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values_videos": pixels}


def test_serving_and_the_triton_repository_writer_import_without_the_compiler(cli_bundle, tmp_path):
    """clse-serve's arguments and request parsing, and writing a Triton repository, in the import-blocked process."""
    bundle = cli_bundle[0]
    done = run_blocked(
        f"""
        from clse_fx.deploy import serve, triton
        from clse_fx.deploy.engine import Engine
        engine = Engine.load({str(bundle)!r})
        prepared = serve.parse_request({{"prompt": "what", "image": {_png_base64()!r}}}, engine, serve.Limits())
        assert prepared.feeds["input_ids"].shape == (1, engine.sequence_length)
        triton.write_triton_repo({str(bundle)!r}, {str(tmp_path / "repo")!r})
        from clse_fx.deploy.cli import serve_main
        serve_main(["--help"])
        """
    )
    assert "clse-serve" in done.stdout and (tmp_path / "repo" / "clse_generate" / "1" / "model.py").is_file()


def _png_base64() -> str:
    import base64
    import io

    buffer = io.BytesIO()
    Image.new("RGB", (20, 20), "red").save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()
