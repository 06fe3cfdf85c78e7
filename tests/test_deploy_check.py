"""Compile-time verification through the deploy path (clse_fx/export/deploy_check.py): every built target runs the
way users run it on a constant image (saturated, tied scores: the tie rule decides at the cut) and on flat regions with
edges, against the reference pruner; a divergence fails the compile naming the target and the stage."""

import copy
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import LlavaForConditionalGeneration

from clse_fx import static_ops
from clse_fx.compiler import PrefillOutputs, prune_prefill
from clse_fx.demo import save_tiny_llava
from clse_fx.export import deploy_check
from clse_fx.plan import PruneConfig, plan_budget
from clse_fx.reference import reference_prune
from clse_fx.resident import page_out_weights
from clse_fx.trace import graph_inputs

from .conftest import prompt_ids

STAGES = "1:20,3:6"


@pytest.fixture(scope="module")
def program(tiny_llava):
    """The pass-built program of the tiny LLaVA at batch 2, and its prune config and processor-style inputs."""
    ids = prompt_ids(tiny_llava, [[5, "img", 7, 8, 9], [5, 7, 8, "img", 9]])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": torch.randn(2, 3, 48, 48)}
    prune = PruneConfig(plan=plan_budget(None, 4, 36, stages=STAGES), score="clse")
    return prune_prefill(tiny_llava, prune, inputs), prune, inputs


def test_images_have_the_statistics_of_real_ones(program):
    _, _, inputs = program
    constant = deploy_check.with_pixels(inputs, deploy_check.constant_image)["pixel_values"]
    flat = deploy_check.with_pixels(inputs, deploy_check.flat_regions)["pixel_values"]
    assert constant.unique().numel() == 1 and 3 <= flat.unique().numel() <= 4
    rows = deploy_check.flat_regions(torch.randn(24, 8))  # patchified pixels: runs of identical rows
    assert rows.unique(dim=0).shape[0] == 2
    feeds = deploy_check.as_deploy_feeds({"pixel_values": flat, "input_ids": inputs["input_ids"]})
    assert not feeds["pixel_values"].flags["C_CONTIGUOUS"] and np.array_equal(feeds["pixel_values"], flat.numpy())


def test_a_program_that_runs_like_the_reference_passes_with_tied_scores(tiny_llava, program):
    pruned, prune, inputs = program

    def run(realistic):
        return pruned(*graph_inputs(tiny_llava, realistic).values())

    figures = deploy_check.check("onnxruntime", run, tiny_llava, prune, inputs)
    assert figures["deploy_constant_kept_identical"] and figures["deploy_flat_regions_kept_identical"]
    assert figures["deploy_constant_max_abs_last_logits"] <= 1e-5


def test_a_target_that_reads_pixels_in_another_layout_fails_naming_the_stage(tiny_llava, program):
    """What the aot-inductor bundles did on real images (pixels read with the wrong strides), caught."""
    pruned, prune, inputs = program

    def misread(realistic):
        named = graph_inputs(tiny_llava, realistic)
        pixels = named["pixel_values"]
        named["pixel_values"] = pixels.permute(0, 2, 3, 1).reshape(pixels.shape)  # HWC bytes read as CHW
        return pruned(*named.values())

    with pytest.raises(RuntimeError, match=r"^aot-inductor diverges .* flat regions image: stage 0 \(before layer 1\)"):
        deploy_check.check("aot-inductor", misread, tiny_llava, prune, inputs)


def test_ties_go_to_the_lower_visual_index_on_a_constant_image(tiny_llava, program, monkeypatch):
    """A constant image saturates the spectral score: 31 of the 36 visual tokens score exactly the same, and stage 1
    keeps 20, so the cut falls inside the tie and the rule (lower visual index first) alone decides. The reference
    and the pass-built program keep the tie's 20 lowest ids; every compile's deploy check holds each target to the
    reference on this image (the ONNX Runtime, aot-inductor and torch-compile tests compile with ties like it)."""
    pruned, prune, inputs = program
    constant = deploy_check.with_pixels(inputs, deploy_check.constant_image)
    scores = []
    select = static_ops.topk_mask
    monkeypatch.setattr(static_ops, "topk_mask", lambda s, keep: scores.append(s) or select(s, keep))
    expected_kept = reference_prune(tiny_llava, prune, **constant).kept[0][0]
    first = scores[0][0]
    tied = (first == first.max()).nonzero().flatten()
    assert len(tied) > 20 > len(tied) - 20, "the cut should fall inside the tie"
    assert expected_kept.tolist() == tied[:20].tolist()
    assert pruned(*graph_inputs(tiny_llava, constant).values()).kept[0][0].tolist() == tied[:20].tolist()


def test_onnx_sessions_take_any_layout_and_refuse_other_dtypes_in_one_line(cli_bundle):
    """Every session's feeds go through checked_feeds: made row-major (here a transposed pixel view into ONNX
    Runtime; the aot-inductor test does the same for its packages) and checked against the graph's dtypes."""
    from clse_fx.deploy.engine import Engine

    engine = Engine.load(cli_bundle[0])
    feeds = {
        "input_ids": np.full((2, engine.sequence_length), 5, dtype=np.int64),
        "attention_mask": np.ones((2, engine.sequence_length), dtype=np.int64),
        "pixel_values": np.random.default_rng(0).standard_normal((2, 3, 48, 48), dtype=np.float32),
    }
    feeds["input_ids"][:, 1 : 1 + engine.manifest.geometry["num_visual"]] = engine.manifest.visual_token_ids[0]
    transposed = np.moveaxis(np.ascontiguousarray(np.moveaxis(feeds["pixel_values"], 1, -1)), -1, 1)
    for have, want in zip(engine.prefill.run(**{**feeds, "pixel_values": transposed}), engine.prefill.run(**feeds)):
        assert np.array_equal(have, want)
    with pytest.raises(ValueError, match=r"^pixel_values has dtype float64 but prefill.onnx takes float32; convert"):
        engine.prefill.run(**{**feeds, "pixel_values": feeds["pixel_values"].astype(np.float64)})


@pytest.fixture(scope="module")
def shallow_tie(tmp_path_factory):
    """A 2-layer tiny LLaVA (compiles fast) whose spectral score ties 3 ways at exactly 1.0 on a constant image
    (visual ids 0, 1, 4): a one-stage plan keeping 2 cuts inside the tie. The model, its program and prune config
    and inputs."""
    model = LlavaForConditionalGeneration.from_pretrained(
        save_tiny_llava(tmp_path_factory.mktemp("shallow"), num_layers=2)
    ).eval()
    ids = prompt_ids(model, [[5, "img", 7, 8, 9]])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": torch.randn(1, 3, 48, 48)}
    prune = PruneConfig(plan=plan_budget(None, 2, 36, stages="1:2"), score="clse")
    return model, prune_prefill(model, prune, inputs), prune, inputs


def test_onnx_runtime_cuts_a_tie_like_the_reference(shallow_tie, tmp_path):
    """An ONNX Runtime run of the program keeps the reference's ids where the cut falls inside a tie (constant
    image), through the deploy check (flat regions too). The torch-compile target's ties are checked on the demo in
    test_readme.py (its manifest's deploy check), the AOTInductor packages' in test_aot_inductor.py."""
    from clse_fx.deploy.session import OnnxSession
    from clse_fx.export.onnxruntime import export_onnx

    model, pruned, prune, inputs = shallow_tie
    constant = deploy_check.with_pixels(inputs, deploy_check.constant_image)
    assert reference_prune(model, prune, **constant).kept[0][0].tolist() == [0, 1]  # of the tie 0, 1, 4
    session = OnnxSession(export_onnx(pruned, tmp_path / "prefill.onnx", optimize=False))

    def onnxruntime(realistic):
        feeds = deploy_check.as_deploy_feeds(graph_inputs(model, realistic))
        return PrefillOutputs.from_flat([torch.from_numpy(a) for a in session.run(**feeds)], 1)

    assert deploy_check.check("onnxruntime", onnxruntime, model, prune, inputs)["deploy_constant_kept_identical"]


def test_near_tie_trades_are_told_apart_from_divergence():
    """Engines round differently, so tokens scored within the tolerance of the cut may trade places (recorded, the
    comparison stops there); keeping a token the reference scores far below the cut is a divergence."""
    scores = torch.tensor([[0.9, 0.5, 0.50004, 0.1]])
    want = torch.tensor([[0, 2]])  # the reference's cut: 0.50004
    assert deploy_check.near_tie_flips(want, want, scores, 1e-4) == 0
    assert deploy_check.near_tie_flips(torch.tensor([[0, 1]]), want, scores, 1e-4) == 1
    assert deploy_check.near_tie_flips(torch.tensor([[0, 3]]), want, scores, 1e-4) is None
    assert deploy_check.near_tie_flips(torch.tensor([[0, 1]]), want, scores, 1e-6) is None


def test_bundle_stores_each_weight_once(cli_bundle, tiny_llava_dir):
    """prefill.onnx and decode.onnx point into one weights.data, which holds each distinct tensor once: about the
    checkpoint's bytes, not twice them."""
    import onnx

    from clse_fx.deploy.manifest import read_manifest

    bundle = cli_bundle[0]
    manifest = read_manifest(bundle)
    assert not list(bundle.glob("*.onnx.data")) and (bundle / "weights.data").is_file()
    assert {name: graph["external_data"] for name, graph in manifest.graphs.items()} == {
        "prefill": ["weights.data"],
        "decode": ["weights.data"],
    }
    checkpoint = sum(f.stat().st_size for f in tiny_llava_dir.glob("*.safetensors"))
    assert (bundle / "weights.data").stat().st_size <= 1.05 * checkpoint
    offsets = {}
    for graph in ("prefill.onnx", "decode.onnx"):
        for tensor in onnx.load(str(bundle / graph), load_external_data=False).graph.initializer:
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                info = {entry.key: entry.value for entry in tensor.external_data}
                offsets.setdefault(graph, set()).add(int(info["offset"]))
    assert offsets["prefill.onnx"] & offsets["decode.onnx"], "the graphs should share the decoder's weights"


def test_engine_maps_the_shared_weights_once(cli_bundle, tmp_path):
    """Engine's prefill and decode sessions read every weight from one memory map of weights.data (shared
    initializers, where each graph declares them), so the file's pages count once in RSS; a prefill that loads its
    weights itself answers the same (tests/test_bundle_attacks.py checks the manifest's table against the graphs)."""
    import shutil
    from pathlib import Path

    from clse_fx.deploy.engine import Engine
    from clse_fx.deploy.session import OnnxSession

    bundle = tmp_path / "bundle"
    shutil.copytree(cli_bundle[0], bundle)
    engine = Engine.load(bundle)
    weights = (bundle / "weights.data").resolve()
    maps = [line for line in Path("/proc/self/maps").read_text().splitlines() if line.endswith(str(weights))]
    start, end = (int(part, 16) for part in maps[0].split()[0].split("-"))
    assert len(maps) == 1, maps
    tables = {name: engine.manifest.graphs[name]["initializers"] for name in ("prefill", "decode")}
    for name, session in (("prefill", engine.prefill), ("decode", engine.decode)):
        assert set(session.initializers) == set(tables[name]) and tables[name]
        assert all(start <= value.data_ptr() < end for value in session.initializers.values())
    ids = np.full((engine.manifest.batch, engine.sequence_length), 5, dtype=np.int64)
    ids[:, 1 : 1 + engine.manifest.geometry["num_visual"]] = engine.manifest.image_token_id
    pixels = np.random.default_rng(0).standard_normal(engine.prefill.inputs["pixel_values"]).astype(np.float32)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "pixel_values": pixels}
    own = OnnxSession(bundle / "prefill.onnx")  # ONNX Runtime reads the weights itself
    assert all(np.array_equal(a, b) for a, b in zip(engine.prefill.run(**feeds), own.run(**feeds)))


def mapped_resident_kib(path) -> int:
    """Resident KiB of this process's mappings of ``path`` (``/proc/self/smaps``)."""
    resident, inside = 0, False
    for line in open("/proc/self/smaps"):
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5:  # a mapping's header line
            inside = len(fields) == 6 and fields[5] == str(path)
        elif inside and fields[0] == "Rss:":
            resident += int(fields[1])
    return resident


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="reads Linux's /proc/self/smaps")
def test_the_models_mapped_weights_are_handed_back_and_read_again(tiny_llava_dir, tmp_path):
    """Between the model's side of a parity check and a bundle's, the checkpoint's mapped pages leave the process
    (a 7B compile would otherwise hold both copies of the weights); the model then runs as before."""
    shutil.copytree(tiny_llava_dir, tmp_path / "ckpt")
    weights = (tmp_path / "ckpt" / "model.safetensors").resolve()
    with open(weights, "rb+") as written:  # a checkpoint as users have it: on disk (the kernel keeps dirty pages)
        os.fsync(written.fileno())
    model = LlavaForConditionalGeneration.from_pretrained(tmp_path / "ckpt").eval()
    ids = prompt_ids(model, [[5, "img", 7]])
    with torch.no_grad():
        before = model(input_ids=ids, pixel_values=torch.ones(1, 3, 48, 48)).logits
    assert mapped_resident_kib(weights) > 0.9 * weights.stat().st_size / 1024
    assert page_out_weights(model) >= weights.stat().st_size * 0.9
    assert mapped_resident_kib(weights) < 0.05 * weights.stat().st_size / 1024
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, pixel_values=torch.ones(1, 3, 48, 48)).logits, before)
    in_memory = copy.deepcopy(model)  # anonymous memory: never advised (it would go to swap, not back to a file)
    assert page_out_weights(in_memory) == 0
