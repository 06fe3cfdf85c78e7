"""Weight-only int8 / int4 quantization (--weight-format): ONNX Runtime's packing, dequantization bounds, the
quantized bundle through shared weights and Engine, and the lossy check failing on a planted error."""

from __future__ import annotations

import gc
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from clse_fx.export.quantize import FORMATS, WeightFormat, WeightRoles, block_for, quantize_file, quantize_graph

ROLES = WeightRoles(decoder_prefix="decoder.layers")


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _matmul_model(weight: np.ndarray, name: str) -> onnx.ModelProto:
    k, n = weight.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", name], ["y"], name="linear")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, n])],
        [numpy_helper.from_array(weight, name)],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_matmul_is_onnxruntimes_own_quantization(bits):
    """The rewrite (lazy, tensor by tensor) gives the graph ONNX Runtime's MatMulNBitsQuantizer gives: the same
    packed weights, scales and zero points, so bit-identical outputs."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    rng = np.random.default_rng(0)
    weight, x = rng.standard_normal((256, 48)).astype(np.float32), rng.standard_normal((3, 256)).astype(np.float32)
    name = "decoder.layers.0.mlp.up_proj.weight.T" if bits == 4 else "vision.proj.weight.T"
    ours = ir.from_proto(_matmul_model(weight, name))
    assert quantize_graph(ours, ROLES, FORMATS["int4"]) == {f"int{bits}": 1}  # int4: decoder 4 bits, the rest 8
    theirs = MatMulNBitsQuantizer(_matmul_model(weight, name), bits=bits, block_size=128, accuracy_level=4)
    theirs.process()
    ours_out = _session(ir.to_proto(ours)).run(None, {"x": x})[0]
    theirs_out = _session(theirs.model.model).run(None, {"x": x})[0]
    np.testing.assert_array_equal(ours_out, theirs_out)
    # accuracy level 4 quantizes the activations to int8 as well: about 1% at 8 bits
    assert np.abs(ours_out - x @ weight).max() < (0.15 if bits == 4 else 0.03) * np.abs(x @ weight).max()


def _mapped_rss(path) -> int | None:
    """Resident bytes of this process's mappings of ``path`` (``/proc/self/smaps``), or None if it is not mapped."""
    resident, inside = None, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5:  # a mapping's header line: address range ... [path]
            inside = len(fields) >= 6 and fields[5] == str(path)
        elif inside and fields[0] == "Rss:":
            resident = (resident or 0) + int(fields[1]) * 1024
    return resident


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")
def test_quantizing_a_graph_leaves_its_weights_file_unmapped(tmp_path):
    """Each weight read is let go once quantized: onnx_ir maps the whole file per tensor read, and a graph's
    reference cycles kept every mapping (at 7B, the weights' bytes resident once per graph) until a collection."""
    weight = np.random.default_rng(0).standard_normal((256, 64)).astype(np.float32)
    path = tmp_path / "g.onnx"
    onnx.save(
        _matmul_model(weight, "decoder.layers.0.mlp.up_proj.weight.T"),
        path,
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="weights.data",
        size_threshold=0,
    )
    gc.disable()  # as at 7B, where no collection happens to run in between
    try:
        assert quantize_file(path, ROLES, FORMATS["int8"]) == {"int8": 1}
        assert _mapped_rss(tmp_path / "weights.data") is None
    finally:
        gc.enable()


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_embedding_stays_within_one_step_of_each_weight(bits):
    """GatherBlockQuantized rows dequantize to within one quantization step of the float table: each block of
    the hidden axis has its own scale, (max - min) / (2^bits - 1) over the block and zero."""
    rng = np.random.default_rng(1)
    table = rng.standard_normal((40, 64)).astype(np.float32) * np.linspace(0.1, 3, 64, dtype=np.float32)
    ids = np.array([[0, 7, 39, 7]], dtype=np.int64)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["embed.weight", "ids"], ["out"], axis=0)],
        "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 4])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 4, 64])],
        [numpy_helper.from_array(table, "embed.weight")],
    )
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    chosen = WeightFormat(decoder_bits=bits, other_bits=bits, block_size=32)
    assert quantize_graph(model, ROLES, chosen) == {f"int{bits}": 1}
    assert [n.op_type for n in model.graph] == ["GatherBlockQuantized"]
    out = _session(ir.to_proto(model)).run(None, {"ids": ids})[0]
    blocks = table.reshape(40, 2, 32)
    step = (np.maximum(blocks.max(-1), 0) - np.minimum(blocks.min(-1), 0)) / (2**bits - 1)  # [rows, blocks]
    error = np.abs(out[0] - table[ids[0]]).reshape(4, 2, 32)
    assert (error <= step[ids[0]][..., None] * 1.0001).all()
    assert error.max() > 0  # quantized, not passed through


def test_embedding_blocks_divide_the_rows():
    assert block_for(4096, 128) == 128 and block_for(1376, 128) == 32 and block_for(64, 128) == 64
    assert block_for(100, 128) is None  # no power of two >= 16 divides it: the table stays unquantized


@pytest.fixture(scope="module")
def int4_bundle(tmp_path_factory, tiny_llava):
    """The tiny LLaVA compiled with --weight-format int4 (unoptimised ONNX: faster to export, same quantization)."""
    import clse_fx

    bundle = tmp_path_factory.mktemp("int4") / "bundle"
    options = dict(keep=8, weight_format="int4", optimize_onnx=False)
    result = clse_fx.compile(tiny_llava, output_dir=bundle, **options)
    return bundle, result


def test_an_int4_bundle_stores_quantized_weights_once_and_answers_through_engine(int4_bundle):
    from clse_fx.deploy.engine import Engine
    from clse_fx.export.deploy_check import LOSSY_FLOORS

    bundle, result = int4_bundle
    manifest = json.loads((bundle / "manifest.json").read_text())
    quantization = manifest["quantization"]
    assert quantization["weight_format"] == "int4" and quantization["floors"] == LOSSY_FLOORS["int4"]
    assert quantization["below_floors"] == []
    decode, prefill = quantization["weights"]["decode"], quantization["weights"]["prefill"]
    assert decode == {"int4": 4 * 7, "int8": 2}  # 4 layers x (q, k, v, o, gate, up, down); embedding, LM head
    assert prefill["int4"] == 4 * 7 and prefill["int8"] > 2  # and the vision tower and projector at 8 bits
    # The prefill's LM head runs on the last position only, a 2-D product the exporter writes as Gemm: quantized too.
    assert "gm.model.lm_head.weight.q8" in manifest["graphs"]["prefill"]["initializers"]
    assert quantization["bytes"]["after"] < quantization["bytes"]["before"] / 3
    assert sorted(p.name for p in bundle.glob("*.data")) == ["weights.data"]  # every graph reads one file
    types = {entry["type"] for graph in manifest["graphs"].values() for entry in graph["initializers"].values()}
    assert TensorProto.UINT8 in types
    parity = manifest["parity"]
    for image in ("flat_regions", "noise"):
        assert parity[f"lossy_{image}_logits_cosine"] >= LOSSY_FLOORS["int4"]["logits_cosine"]
        assert parity[f"lossy_{image}_top5_containment"] >= LOSSY_FLOORS["int4"]["top5_containment"]
    # TensorRT cannot import the contrib ops: the readiness report says so instead of passing.
    assert any("MatMulNBits" in finding for finding in manifest["tensorrt_readiness"]["decode"])
    # Engine maps weights.data once and hands each session its quantized initializers from that map; ONNX Runtime
    # reading each graph's external data itself must compute the same logits.
    engine = Engine.load(bundle)
    assert any(name.endswith(".q4") for name in engine.prefill.initializers)
    if sys.platform.startswith("linux"):  # every session packed its quantized weights: the mapped copy is let go
        assert _mapped_rss(bundle / "weights.data") == 0
    feeds = {name: arg.numpy() for name, arg in zip(result.pruned.input_names, result.pruned.example_args)}
    own = ort.InferenceSession(str(bundle / "prefill.onnx"), providers=["CPUExecutionProvider"]).run(None, feeds)
    np.testing.assert_array_equal(engine.run_prefill(feeds)[0], own[0])
    tokens, _ = engine.generate_ids(feeds, 6)
    assert [len(row) for row in tokens] == [6] * len(tokens)


def test_the_lossy_check_fails_a_bundle_with_a_planted_error(int4_bundle, tiny_llava, tmp_path):
    """Flipping the LM head's 8-bit codes in weights.data (q -> 255 - q, hashes updated, as a broken quantizer
    would write them) fails the check with one line naming the measure, or with accept (--accept-lossy) returns
    the misses; the untouched bundle passes it."""
    from clse_fx.api import example_inputs
    from clse_fx.deploy.manifest import read_manifest
    from clse_fx.export.bundle import write_manifest
    from clse_fx.export.deploy_check import check_lossy
    from clse_fx.options import CompileOptions

    bundle, result = int4_bundle
    prune, inputs = result.pruned.settings.prune, example_inputs(tiny_llava, CompileOptions(keep=8))
    figures, misses = check_lossy("int4", bundle, tiny_llava, prune, inputs, steps=4)
    assert figures["lossy_noise_top5_containment"] > 0 and misses == []
    broken = tmp_path / "broken"
    shutil.copytree(bundle, broken)
    manifest = read_manifest(broken)
    entry = next(e for name, e in manifest.graphs["decode"]["initializers"].items() if "lm_head" in name)
    with open(broken / "weights.data", "r+b") as f:
        f.seek(entry["offset"])
        codes = np.frombuffer(f.read(entry["length"]), dtype=np.uint8)
        f.seek(entry["offset"])
        f.write((255 - codes).tobytes())
    write_manifest(broken, manifest)
    with pytest.raises(RuntimeError, match="int4 bundle is too far from the unquantized model: logits cosine"):
        check_lossy("int4", broken, tiny_llava, prune, inputs, steps=4)
    # --accept-lossy: the same misses, recorded instead of raised
    figures, misses = check_lossy("int4", broken, tiny_llava, prune, inputs, steps=4, accept=True)
    assert any(miss.startswith("logits cosine") for miss in misses) and figures["lossy_noise_logits_cosine"] < 0.7


def test_the_report_shows_the_lossy_figures_and_any_floor_kept_below(int4_bundle):
    """clse-compile's report has a row with each image's cosine / top-5 / kept overlap, and says when
    --accept-lossy kept a bundle under its floors."""
    import dataclasses

    from rich.console import Console

    from clse_fx.cli import _report

    bundle, result = int4_bundle

    def rendered(result) -> str:
        console = Console(record=True, width=400)
        _report(console, result, bundle)
        return " ".join(console.export_text().split())

    text = rendered(result)
    assert "quantized vs unquantized" in text and "noise: logits cosine" in text and "(floors met)" in text
    below = dict(result.manifest.quantization, below_floors=["top5 containment 0.375 < 0.6 on a noise image"])
    kept = dataclasses.replace(result, manifest=dataclasses.replace(result.manifest, quantization=below))
    assert "BELOW FLOORS, kept by --accept-lossy: top5 containment 0.375 < 0.6 on a noise image" in rendered(kept)
