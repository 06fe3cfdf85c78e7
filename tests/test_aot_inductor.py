"""The aot-inductor target: prefill.pt2 and decode.pt2 equal the PyTorch programs, the runtime generates with them
token for token like the reference pruner, and the packages load without the model's Python code."""

import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import LlavaForConditionalGeneration

import clse_fx
from clse_fx.demo import save_tiny_llava
from clse_fx.deploy.aoti import AotiSession
from clse_fx.deploy.engine import Engine
from clse_fx.deploy.session import checked_feeds
from clse_fx.plan import PruneConfig, plan_budget
from clse_fx.reference import reference_generate

from .conftest import prompt_ids

STAGES = "1:20"
pytestmark = pytest.mark.skipif(
    not any(shutil.which(name) for name in ("c++", "g++", "clang++")),
    reason="AOTInductor compiles C++: no C++ compiler on the PATH",
)


@pytest.fixture(scope="module")
def shallow_llava(tmp_path_factory):
    """The tiny LLaVA with a 2-layer decoder: C++ compile time grows with the graph, and one stage is enough."""
    path = save_tiny_llava(tmp_path_factory.mktemp("shallow-llava"), num_layers=2)
    return LlavaForConditionalGeneration.from_pretrained(path).eval()


@pytest.fixture(scope="module")
def aot_bundle(shallow_llava, tmp_path_factory):
    out = tmp_path_factory.mktemp("aot") / "bundle"
    # Test-only: an unoptimised C++ wrapper compiles faster; the kernels and the package format are the same.
    with torch._inductor.config.patch({"aot_inductor.compile_wrapper_opt_level": "O0"}):
        clse_fx.compile(
            shallow_llava, stages=STAGES, target="aot-inductor", batch=2, text_len=6, output_dir=out, verify=False
        )
    return out


def _feeds(model):
    """Two prompts of the compiled geometry, the image at different places, row 0 left-padded."""
    pad = model.config.text_config.pad_token_id
    ids = prompt_ids(model, [[pad, pad, 5, "img", 7, 8, 9], [5, 7, 8, "img", 9, 10, 11]])
    pixels = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(2))
    return {"input_ids": ids.numpy(), "attention_mask": (ids != pad).long().numpy(), "pixel_values": pixels.numpy()}


def test_packages_equal_pytorch_and_generate_like_the_reference(shallow_llava, aot_bundle):
    engine = Engine.load(aot_bundle)
    parity = engine.manifest.parity
    assert parity["aot_inductor_max_abs_logits"] <= 1e-4 and parity["aot_inductor_indices_identical"]
    assert parity["aot_inductor_decode_max_abs"] <= 1e-4
    assert isinstance(engine.prefill, AotiSession) and isinstance(engine.decode, AotiSession)
    assert not any(name.endswith(".onnx") for name in engine.manifest.files)
    feeds = _feeds(shallow_llava)
    generated, _ = engine.generate_ids(feeds, max_new_tokens=8)
    prune = PruneConfig(plan=plan_budget(None, 2, 36, stages=STAGES))
    ids, mask, pixels = (torch.from_numpy(feeds[k]) for k in ("input_ids", "attention_mask", "pixel_values"))
    assert generated == reference_generate(shallow_llava, prune, ids, pixels, mask, max_new_tokens=8).tolist()
    with pytest.raises(ValueError, match=r"input_ids has shape \[1, 42\] but prefill.pt2 was compiled for \[2, 42\]"):
        engine.prefill.run(**{name: value[:1] for name, value in feeds.items()})


def test_sessions_read_feeds_in_the_layout_they_were_built_for(shallow_llava, aot_bundle):
    """A package reads its inputs with the strides it was compiled for: the preprocessor's pixels are a transposed
    (HWC -> CHW) view, which gave wrong kept tokens and answers on real images before every session's feeds were
    made row-major in one place (checked_feeds); a stride-0 size-1 dim (a [B, 1] token column) is normalised too."""
    feeds = _feeds(shallow_llava)
    transposed = np.ascontiguousarray(feeds["pixel_values"].transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    assert not transposed.flags["C_CONTIGUOUS"] and np.array_equal(transposed, feeds["pixel_values"])
    prefill = Engine.load(aot_bundle).prefill
    expected = prefill.run(**feeds)
    for have, want in zip(prefill.run(**{**feeds, "pixel_values": transposed}), expected):
        assert np.array_equal(have, want)
    column = np.lib.stride_tricks.as_strided(np.arange(2), shape=(2, 1), strides=(8, 0))
    checked = checked_feeds("g", {"pixel_values": [2, 3, 48, 48], "ids": [2, 1]}, {**feeds, "ids": column})
    assert checked["pixel_values"].strides == feeds["pixel_values"].strides and checked["ids"].strides == (8, 8)
    assert checked["pixel_values"] is feeds["pixel_values"]  # already row-major: not copied


def test_packages_load_without_the_model_code(shallow_llava, aot_bundle, tmp_path):
    """Only torch is needed to run prefill.pt2: transformers and clse_fx cannot even be imported here."""
    arrays = tmp_path / "feeds.npz"
    feeds = _feeds(shallow_llava)
    np.savez(arrays, **feeds)  # in the graph's input order
    expected = Engine.load(aot_bundle).prefill.run(**feeds)[0]
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
        [sys.executable, "-c", code, str(aot_bundle / "prefill.pt2"), str(arrays), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert np.array_equal(np.load(out), expected)
