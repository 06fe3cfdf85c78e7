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
from clse_fx.deploy.preprocess.media import load_video, sample_indices

PIXEL_TOLERANCE = 1e-5
# Runs a Python snippet with torch and transformers unimportable (their import raises).
BLOCKED = textwrap.dedent(
    """
    import importlib.abc, sys

    class Blocked(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in ("torch", "transformers"):
                raise ImportError(f"{name} is blocked: deploy must run without it")

    sys.meta_path.insert(0, Blocked())
    """
)


def run_blocked(code: str) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter whose torch/transformers imports raise; it must succeed."""
    done = subprocess.run([sys.executable, "-c", BLOCKED + textwrap.dedent(code)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done


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
    images = sample_images()[:2]
    paths = []
    for i, image in enumerate(images):
        paths.append(tmp_path / f"{i}.png")
        image.save(paths[-1])
    prompts = ["what is it", "describe it"]
    expected = llava_engine.generate([Image.open(p).convert("RGB") for p in paths], prompts, max_new_tokens=5)
    argv = [str(bundle), "--json", "--max-new-tokens", "5"]
    for path, prompt in zip(paths, prompts):
        argv += ["--image", str(path), "--prompt", prompt]
    done = run_blocked(f"from clse_fx.cli import run_main; sys.exit(run_main({argv!r}))")
    rows = json.loads(done.stdout)["results"]
    assert [row["token_ids"] for row in rows] == [g.token_ids for g in expected]
    assert [row["text"] for row in rows] == [g.text for g in expected]
    done = run_blocked(
        f"""
        from PIL import Image
        from clse_fx.deploy.engine import Engine
        engine = Engine.load({str(bundle)!r})
        images = [Image.open(p).convert("RGB") for p in {[str(p) for p in paths]!r}]
        print([g.token_ids for g in engine.generate(images, {prompts!r}, max_new_tokens=5)])
        assert not any(m.partition(".")[0] in ("torch", "transformers") for m in sys.modules)
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
