"""Qwen2-VL / Qwen2.5-VL through the same passes: M-RoPE ids and the vision tower are graph inputs."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from clse_fx.compiler import prune_prefill
from clse_fx.deploy.engine import Engine
from clse_fx.deploy.manifest import read_manifest
from clse_fx.models import adapter_for
from clse_fx.plan import QWEN2_VL_SCHEDULE, PruneConfig, plan_budget
from clse_fx.reference import reference_generate, reference_prune

from .test_deploy import PIXEL_TOLERANCE, clse_run_blocked, greedy_answers_match, sample_images
from .tiny_models import QWEN_END as END
from .tiny_models import QWEN_FAMILIES, qwen_inputs, save_tiny_qwen, tiny_processor, tiny_qwen_config
from .tiny_models import QWEN_IMAGE as IMAGE
from .tiny_models import QWEN_START as START

GRID = (1, 14, 18)  # 4 px patches; after the 2x2 merge a 7x9 grid of 63 tokens
TOKENS = 63


@pytest.fixture(scope="module", params=sorted(QWEN_FAMILIES))
def qwen(request, tmp_path_factory):
    return save_tiny_qwen(tmp_path_factory.mktemp(request.param), request.param)


def _inputs(model, rows):
    return qwen_inputs(model, rows, GRID)


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
    # Qwen2-VL ratio budgets: 0.334 -> [0.57, 0.36, 0.098] of the visual tokens, floored as the published code does
    # (int(63 * 0.57) = 35), layers scaled from [1, 10, 19]/28.
    assert plan_budget(0.334, 4, TOKENS, schedule=adapter.schedule).stages == ((1, 35), (2, 22), (3, 6))


def test_budget_of_all_tokens_equals_unmodified_model(qwen):
    inputs = _inputs(qwen, TWO_ROWS)
    out = prune_prefill(qwen, PruneConfig(plan=_plan("1:63,2:63,3:63")), inputs)()
    with torch.no_grad():
        plain = qwen(**inputs, logits_to_keep=1).logits
    assert (out.logits - plain).abs().max() <= 1e-5


@pytest.mark.parametrize("score", ["clse_attn", "attn", "clse"])
@pytest.mark.parametrize("stages", ["2:20", "1:40,2:20,3:8"])
def test_pass_equals_reference(qwen, score, stages):
    _check_against_reference(qwen, PruneConfig(plan=_plan(stages), score=score))


@pytest.mark.parametrize(("score", "stages"), [("dart", "2:20"), ("cdpruner", "0:20")])
def test_peer_scores_one_shot_equal_reference(qwen, score, stages):
    """The peers where their authors prune (DART after layer 2's K-1, CDPruner before the decoder) keep the
    oracle's tokens (reference.py), M-RoPE ids gathered alike; on Qwen2-VL only (the same adapter serves 2.5)."""
    if qwen.config.model_type != "qwen2_vl":
        pytest.skip("Qwen2.5-VL shares the adapter; one family keeps the suite within its time budget")
    _check_against_reference(qwen, PruneConfig(plan=_plan(stages), score=score))


def _check_against_reference(qwen, prune):
    inputs = _inputs(qwen, TWO_ROWS)
    out = prune_prefill(qwen, prune, inputs)()
    ref = reference_prune(qwen, prune, **inputs)
    assert (out.logits - ref.logits[:, -1:]).abs().max() <= 1e-5  # the prefill gives the last position's
    assert torch.equal(out.positions, ref.positions)
    assert all(torch.equal(a, b) for a, b in zip(out.kept, ref.kept))
    for (key, value), (ref_key, ref_value) in zip(out.cache, ref.cache):
        assert (key - ref_key).abs().max() <= 1e-5 and (value - ref_value).abs().max() <= 1e-5


@pytest.fixture(scope="module")
def qwen_bundle(qwen, tmp_path_factory):
    """A bundle written by clse-compile from the saved checkpoint."""
    from clse_fx.cli import compile_main

    if "2_5" in type(qwen).__name__:
        # Qwen2.5-VL's bundle path (its own vision tower, M-RoPE with frame timing) is built by the video bundle
        # of test_video.py; one bundle per Qwen family keeps the suite within its time budget.
        pytest.skip("Qwen2.5-VL's bundle is test_video.py's")

    out = tmp_path_factory.mktemp("bundle") / "b"
    argv = [qwen.name_or_path, "--stages", STAGES, "--batch", "2", "--text-len", "8", "--image-size", "56x72"]
    # The checkpoint's processor loads without its video processor (it needs torchvision): api.load_processor
    assert compile_main([*argv, "-o", str(out)]) == 0
    return out, read_manifest(out)


STAGES = "1:40,2:20,3:8"


def test_bundle_runs_vision_and_mrope_graphs_and_matches_pytorch(qwen_bundle):
    """The vision tower and the M-RoPE index are their own engine graphs, run before the prefill; each equals
    the unmodified model's computation (``get_image_features``, ``get_rope_index``), and the prefill fed by
    them equals PyTorch."""
    _, manifest = qwen_bundle
    parity = manifest.parity
    assert manifest.pipeline == ["vision", "rope"]
    assert parity["onnxruntime_vision_image_embeds_max_abs"] <= 1e-4
    assert parity["onnxruntime_rope_position_ids_max_abs"] == 0 and parity["onnxruntime_rope_rope_deltas_max_abs"] == 0
    assert parity["onnxruntime_max_abs_logits"] <= 1e-4 and parity["onnxruntime_indices_identical"]
    assert parity["reference_max_abs_logits"] <= 1e-5 and parity["reference_kept_identical"]
    assert manifest.geometry["grid"] == [1, 7, 9] and manifest.geometry["grid_thw"] == [1, 14, 18]
    readiness = manifest.tensorrt_readiness
    assert not any(found for graph, found in readiness.items() if graph != "decode")
    assert readiness["decode"] and all("GroupQueryAttention is an ONNX Runtime" in f for f in readiness["decode"])


def _padded(inputs):
    """Left-pad row 0 by three tokens (its last three text tokens drop out)."""
    ids, mask = inputs["input_ids"].clone(), inputs["attention_mask"].clone()
    ids[0] = torch.cat([torch.zeros(3, dtype=ids.dtype), ids[0, :-3]])
    mask[0, :3] = 0
    return dict(inputs, input_ids=ids, attention_mask=mask, mm_token_type_ids=(ids == IMAGE).int())


@pytest.mark.parametrize("padded", [False, True])
def test_bundle_greedy_generation_equals_reference(qwen, qwen_bundle, padded):
    """16 greedy tokens from the engines (vision, M-RoPE, prefill, decode with the rope deltas) equal the
    reference pruner followed by the unmodified model's decode."""
    rows = [[5] + [START] + [IMAGE] * TOKENS + [END] + [6, 7, 8, 9, 10, 11, 12], [5, 6, 7, 8, START]]
    rows[1] += [IMAGE] * TOKENS + [END, 9, 10, 11, 12]
    inputs = _inputs(qwen, rows)
    inputs = _padded(inputs) if padded else inputs
    engine = Engine.load(qwen_bundle[0])
    feeds = {k: inputs[k].numpy() for k in ("input_ids", "attention_mask", "pixel_values")}
    generated, _ = engine.generate_ids(feeds, max_new_tokens=16)
    prune = PruneConfig(plan=_plan(STAGES))
    expected = reference_generate(qwen, prune, max_new_tokens=16, **inputs)
    assert generated == expected.tolist()


def test_clse_compile_cli_for_qwen(qwen, qwen_bundle, tmp_path, capsys):
    """The CLI bundle (the fixture) records the compiled resolution; a ratio budget plans on the image's merged
    grid; a resolution off the merge step is a one-line error that leaves nothing behind."""
    from clse_fx.api import example_inputs, make_plan
    from clse_fx.cli import compile_main
    from clse_fx.options import CompileOptions

    _, manifest = qwen_bundle
    assert manifest.pipeline == ["vision", "rope"] and manifest.geometry["image_size"] == [56, 72]
    options = CompileOptions(keep=0.334, image_size=(56, 72), text_len=8)
    assert make_plan(qwen, options, example_inputs(qwen, options)).plan.stages == ((1, 35), (2, 22), (3, 6))
    bad = compile_main([qwen.name_or_path, "--keep", "0.334", "--image-size", "50x72", "-o", str(tmp_path / "bad")])
    err = capsys.readouterr().err
    assert bad == 2 and "multiple of 8 pixels" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "bad").exists()


# Deploy preprocessing (``qwen2_vl`` pixel recipe) against the transformers processor.
QWEN_SIZE = (56, 72)  # the bundles' compiled resolution: a 14 x 18 patch grid
# Sources whose smart_resize (8 px factor) is the compiled size, so the processor resizes them to it itself.
NATURAL_SIZES = [(57, 70), (53, 75), (59, 69)]


def qwen_preprocessor(family, tmp_path, frames=1):
    """The family's tiny processor and the :class:`Preprocessor` its deploy recipe writes for a bundle compiled
    at :data:`QWEN_SIZE` (``frames`` temporal grid steps: a video), without compiling one."""
    from clse_fx.deploy.preprocess import Preprocessor
    from clse_fx.models import deploy_recipe_for, examples_for

    torch.manual_seed(0)
    model = QWEN_FAMILIES[family][1](tiny_qwen_config(family)).eval()
    processor = tiny_processor(family)
    generator = torch.Generator().manual_seed(0)
    inputs = examples_for(model).example_inputs(1, 9, 1, generator, frames=frames, image_size=QWEN_SIZE)
    section = json.loads(json.dumps(deploy_recipe_for(model).preprocess(processor, inputs, 1)))  # as in manifests
    processor.tokenizer.save_pretrained(tmp_path)
    return processor, Preprocessor(tmp_path, section)


def natural_images(seed=0):
    """RGB, RGBA (transparent) and grayscale images that the processor's smart_resize fits to :data:`QWEN_SIZE`."""
    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)) for size in NATURAL_SIZES]
    images.append(Image.fromarray(rng.integers(0, 256, (55, 73, 4), dtype=np.uint8), "RGBA"))
    images.append(Image.fromarray(rng.integers(0, 256, (58, 71), dtype=np.uint8), "L"))
    return images


@pytest.mark.parametrize("family", sorted(QWEN_FAMILIES))
def test_qwen_image_recipe_matches_the_processor(family, tmp_path):
    """Ids identical and pixels within 1e-5 (in fact equal) of the transformers processor (PIL image processor):
    on images the processor's own smart_resize brings to the compiled 56 x 72 (so the resize is checked too), and
    on images of other sizes and aspects resized to it first (the bundle's grid is fixed; the recipe resizes any
    image to it, where the processor would pick another grid)."""
    processor, preprocessor = qwen_preprocessor(family, tmp_path)
    text = preprocessor.text
    assert preprocessor.pixels_params["kind"] == "qwen2_vl" and text.tokens_per_item == 63
    assert text.item_text == "<|vision_start|><|image_pad|><|vision_end|>" and text.after_items == ""
    resized = [image.convert("RGB").resize(QWEN_SIZE[::-1], Image.BICUBIC) for image in sample_images()]
    images = natural_images() + resized
    prompt = f"{text.item_text}what is it"
    for image in images:
        expected = processor(images=[image], text=prompt, return_tensors="np")
        assert expected["image_grid_thw"].tolist() == [[1, 14, 18]]
        assert preprocessor.encode_text("what is it", 1) == expected["input_ids"][0].tolist()
        got = preprocessor.pixel_feeds([[image]])["pixel_values"]
        assert got.dtype == np.float32 and got.shape == expected["pixel_values"].shape == (252, 96)
        assert np.abs(got - expected["pixel_values"]).max() <= PIXEL_TOLERANCE
    batch = processor(images=images[:2], text=[prompt, prompt], return_tensors="np")["pixel_values"]
    assert np.abs(preprocessor.pixel_feeds([[images[0]], [images[1]]])["pixel_values"] - batch).max() <= PIXEL_TOLERANCE
    odd = sample_images()[0]  # 60 x 90: resized to the compiled size, aspect ratio not kept
    assert np.array_equal(
        preprocessor.pixel_feeds([[odd]])["pixel_values"], preprocessor.pixel_feeds([[resized[0]]])["pixel_values"]
    )


def test_qwen_bundle_answers_from_images_and_text(qwen, qwen_bundle, tmp_path):
    """Engine.generate's greedy answers equal the reference fed the transformers processor's outputs for the same
    images and prompts (padded to the bundle's length), and clse-run --image answers the same without torch or
    transformers."""
    bundle, manifest = qwen_bundle
    engine = Engine.load(bundle)
    images = natural_images()[:2]
    prompts = ["what is the colour of the shape ?", "how many red circle are there ?"]  # 8 tokens at most
    answers = engine.generate(images, prompts, max_new_tokens=8)
    processor = tiny_processor("qwen2_vl")
    item = engine.preprocessor.text.item_text
    inputs = processor(
        images=images, text=[item + p for p in prompts], padding="max_length", max_length=engine.sequence_length,
        return_tensors="pt",
    )  # fmt: skip
    assert inputs["input_ids"].tolist() == engine.encode(images, prompts)["input_ids"].tolist()
    prune = PruneConfig(plan=_plan(STAGES))
    greedy_answers_match(answers, reference_generate(qwen, prune, max_new_tokens=8, **inputs), engine)
    assert any(len(a.token_ids) > 1 for a in answers)
    rows = clse_run_blocked(bundle, images, prompts, tmp_path)
    assert [row["token_ids"] for row in rows] == [a.token_ids for a in answers]


def test_a_bfloat16_vision_graph_exports_and_computes_in_float32(qwen, tmp_path):
    """The TorchScript exporter (torch 2.13) breaks bfloat16 graphs twice: its constant folding fails and its
    casts to bfloat16 come out typed complex128 (export/onnxruntime.py); the vision graph exported from bfloat16
    weights runs in ONNX Runtime close to the bfloat16 tower."""
    from clse_fx.api import load_checkpoint
    from clse_fx.deploy.session import OnnxSession
    from clse_fx.export.onnxruntime import export_input_graph
    from clse_fx.models import deploy_recipe_for

    model, _ = load_checkpoint(qwen.name_or_path, dtype="bfloat16")
    inputs = _inputs(model, [[5, START] + [IMAGE] * TOKENS + [END, 6]])
    vision, _ = deploy_recipe_for(model).input_graphs(inputs)
    path = export_input_graph(vision, inputs, tmp_path / "vision.onnx", optimize=False)
    (embeds,) = OnnxSession(path).run(pixel_values=inputs["pixel_values"].numpy())
    with torch.no_grad():
        expected = vision.module(inputs["pixel_values"].to(torch.bfloat16)).float().numpy()
    assert embeds.dtype == np.float32 and np.abs(embeds - expected).max() <= 5e-2 * np.abs(expected).max()
