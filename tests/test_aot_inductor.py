"""The aot-inductor target: prefill.pt2 and decode.pt2 equal the PyTorch programs, the runtime generates with them
token for token like the reference pruner, and the packages load without the model's Python code. On the demo
bundle (conftest.demo_aot_bundle), which the cross-target test in test_readme.py shares."""

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clse_fx.deploy.aoti import AotiSession
from clse_fx.deploy.engine import Engine
from clse_fx.deploy.session import checked_feeds
from clse_fx.export import deploy_check
from clse_fx.plan import PruneConfig, plan_budget
from clse_fx.reference import reference_generate

EXAMPLES = Path(__file__).parents[1] / "examples" / "demo"
PRUNE = PruneConfig(plan=plan_budget(64, 6, 256), score="clse")
pytestmark = [
    pytest.mark.inductor,  # a minute of Inductor C++ builds: run with -m inductor (pyproject.toml)
    pytest.mark.skipif(
        not any(shutil.which(name) for name in ("c++", "g++", "clang++")),
        reason="AOTInductor compiles C++: no C++ compiler on the PATH",
    ),
]


def _feeds(engine: Engine) -> dict[str, np.ndarray]:
    """Two questions about the sample images, as the engine encodes them: prompts of different lengths (row 0 is
    left-padded further) and the preprocessor's transposed pixel arrays."""
    images = [Image.open(EXAMPLES / name).convert("RGB") for name in ("shapes-1.png", "shapes-2.png")]
    return engine.encode(images, ["what colour is the circle ?", "is the cross at the top or bottom ?"], chat=True)


def _tensors(feeds: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {name: torch.from_numpy(np.ascontiguousarray(array)) for name, array in feeds.items()}


def test_packages_equal_pytorch_and_generate_like_the_reference(demo_model, demo_aot_bundle):
    engine = Engine.load(demo_aot_bundle)
    parity = engine.manifest.parity
    assert parity["aot_inductor_max_abs_logits"] <= 1e-4 and parity["aot_inductor_indices_identical"]
    assert parity["aot_inductor_decode_max_abs"] <= 1e-4
    assert isinstance(engine.prefill, AotiSession) and isinstance(engine.decode, AotiSession)
    assert not any(name.endswith(".onnx") for name in engine.manifest.files)
    feeds = _feeds(engine)
    generated, _ = engine.generate_ids(feeds, max_new_tokens=6)
    expected = reference_generate(demo_model[0], PRUNE, max_new_tokens=6, **_tensors(feeds)).tolist()
    assert generated == [row[: len(tokens)] for row, tokens in zip(expected, generated)]
    with pytest.raises(ValueError, match=r"input_ids has shape \[1, 288\] but prefill.pt2 was compiled for \[2, 288\]"):
        engine.prefill.run(**{name: value[:1] for name, value in feeds.items()})


def test_packages_keep_the_reference_tokens_on_tied_realistic_images(demo_model, demo_aot_bundle):
    """The deploy-path check (which the shared bundle skips for time) on the packages: a constant image saturates
    the spectral score (23 of 256 tokens at exactly 1.0), so ties are real; flat regions too."""
    inputs = _tensors(_feeds(Engine.load(demo_aot_bundle)))
    run = deploy_check.bundle_runner(demo_aot_bundle)
    figures = deploy_check.check("aot-inductor", run, demo_model[0], PRUNE, inputs)
    assert figures["deploy_constant_kept_identical"] and figures["deploy_flat_regions_kept_identical"]


def test_sessions_read_feeds_in_the_layout_they_were_built_for(demo_aot_bundle):
    """A package reads its inputs with the strides it was compiled for: the preprocessor's pixels are a transposed
    (HWC -> CHW) view, which gave wrong kept tokens and answers on real images before every session's feeds were
    made row-major in one place (checked_feeds); a stride-0 size-1 dim (a [B, 1] token column) is normalised too."""
    prefill = Engine.load(demo_aot_bundle).prefill
    feeds = _feeds(Engine.load(demo_aot_bundle))
    assert not feeds["pixel_values"].flags["C_CONTIGUOUS"]
    contiguous = {name: np.ascontiguousarray(array) for name, array in feeds.items()}
    for have, want in zip(prefill.run(**feeds), prefill.run(**contiguous)):
        assert np.array_equal(have, want)
    column = np.lib.stride_tricks.as_strided(np.arange(2), shape=(2, 1), strides=(8, 0))
    checked = checked_feeds("g", {"pixel_values": [2, 3, 64, 64], "ids": [2, 1]}, {**contiguous, "ids": column})
    assert checked["ids"].strides == (8, 8)
    assert checked["pixel_values"] is contiguous["pixel_values"]  # already row-major: not copied


def test_packages_load_without_the_model_code(demo_aot_bundle, tmp_path):
    """Only torch is needed to run prefill.pt2: transformers and clse_fx cannot even be imported here."""
    engine = Engine.load(demo_aot_bundle)
    feeds = {name: np.ascontiguousarray(array) for name, array in _feeds(engine).items()}
    arrays = tmp_path / "feeds.npz"
    np.savez(arrays, **{name: feeds[name] for name in engine.prefill.inputs})  # in the graph's input order
    expected = engine.prefill.run(**feeds)[0]
    code = (
        "import sys\nsys.modules['transformers'] = sys.modules['clse_fx'] = None\n"
        "import numpy as np, torch\n"
        "feeds = np.load(sys.argv[2])\n"
        "runner = torch._inductor.aoti_load_package(sys.argv[1])\n"
        "logits = runner(*(torch.from_numpy(feeds[k]) for k in feeds.files))[0]\n"
        "np.save(sys.argv[3], logits.numpy())\n"
    )
    out = tmp_path / "logits.npy"
    done = subprocess.run(
        [sys.executable, "-c", code, str(demo_aot_bundle / "prefill.pt2"), str(arrays), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert np.array_equal(np.load(out), expected)


def test_aot_inductor_sessions_refuse_ids_outside_the_vocabulary(demo_aot_bundle):
    """An AOTInductor package indexes its embedding unchecked: an id out of range aborted the process (rc 134)."""
    engine = Engine.load(demo_aot_bundle)
    vocab = engine.manifest.vocab_size()
    feeds = engine.encode([Image.new("RGB", (64, 64))] * 2, ["what", "what"])
    ids = feeds["input_ids"].copy()
    ids[0, -1] = vocab
    with pytest.raises(ValueError, match=rf"token id {vocab}, outside the model's vocabulary"):
        engine.prefill.run(**feeds | {"input_ids": ids})
    with pytest.raises(ValueError, match="pixel_values holds NaN"):
        engine.prefill.run(**feeds | {"pixel_values": np.full_like(feeds["pixel_values"], np.inf)})
