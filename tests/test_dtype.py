"""--dtype / --device: checkpoints load in the asked dtype, scores stay float32 in the graph, the manifest records
the dtype, and float16 ONNX Runtime bundles stay within the parity bounds of docs/compile.md."""

import pytest
import torch

import clse_fx
from clse_fx.api import example_inputs, load_checkpoint, place_model
from clse_fx.cli import compile_main
from clse_fx.deploy.engine import Engine
from clse_fx.options import CompileOptions

# The float16 bounds of docs/compile.md (ONNX Runtime vs the float16 PyTorch program, and vs the float32 reference).
FLOAT16_ORT_MAX_ABS_LOGITS = 5e-2
FLOAT16_VS_FLOAT32_MAX_ABS_LOGITS = 1e-1
BFLOAT16_VS_FLOAT32_MAX_ABS_LOGITS = 2e-1  # weights rounded to 8 mantissa bits (float16: 11); computed in float32
OPTIONS = dict(stages="1:20,3:6", batch=2, text_len=6)


@pytest.fixture(scope="module")
def half_bundle(tiny_llava_dir, tmp_path_factory):
    """A float16 bundle written by clse-compile --dtype float16."""
    out = tmp_path_factory.mktemp("half") / "bundle"
    argv = [str(tiny_llava_dir), "--stages", "1:20,3:6", "--batch", "2", "--text-len", "6", "--dtype", "float16"]
    assert compile_main([*argv, "-o", str(out)]) == 0
    return Engine.load(out)


@pytest.fixture(scope="module")
def float32_result(tiny_llava):
    """The same compile in float32, which both float16 tests compare against."""
    return clse_fx.compile(tiny_llava, **OPTIONS, verify=False)


def test_checkpoint_loads_in_the_asked_dtype_without_hub_kernels(tiny_llava_dir):
    """transformers >= 5.25 swaps layers for Hub kernels by default (code fetched at load time, and a load error
    where the `kernels` package is missing, as on the GPU machine); the compiler traces the unmodified model."""
    for dtype in ("float16", "bfloat16"):
        model, _ = load_checkpoint(tiny_llava_dir, dtype=dtype)
        assert {p.dtype for p in model.parameters()} == {getattr(torch, dtype)}
        assert not model.use_kernels


def test_manifest_records_the_dtype_and_float16_parity(half_bundle, float32_result):
    manifest = half_bundle.manifest
    assert (manifest.dtype, manifest.device, manifest.kv_cache_bytes.dtype) == ("float16", "cpu", "float16")
    assert manifest.kv_cache_bytes.pruned * 2 == float32_result.manifest.kv_cache_bytes.pruned
    assert manifest.parity["reference_kept_identical"]
    assert manifest.parity["onnxruntime_max_abs_logits"] <= FLOAT16_ORT_MAX_ABS_LOGITS


def test_float16_bundle_runs_in_onnx_runtime_close_to_float32(half_bundle, tiny_llava, float32_result):
    assert half_bundle.manifest.graphs["prefill"]["outputs"][0]["dtype"] == "float16"
    inputs = example_inputs(tiny_llava, CompileOptions(**OPTIONS))  # the compile's own (seeded) inputs
    feeds = {name: tensor.numpy() for name, tensor in inputs.items()}  # float32 pixels, as processors give
    logits = torch.from_numpy(half_bundle.prefill.run(**feeds)[0]).float()
    expected = float32_result.pruned().logits
    assert (logits - expected).abs().max() <= FLOAT16_VS_FLOAT32_MAX_ABS_LOGITS


def test_float16_in_graph_decode_stays_close_to_the_portable_one(half_bundle, tiny_llava_dir, tmp_path):
    """GroupQueryAttention in float16 (ONNX Runtime's CPU kernel computes its scores in float32) against the
    portable float16 decode step on the same bundle, left-padded rows."""
    from PIL import Image

    from .conftest import assert_decodes_like_portable

    model = place_model(load_checkpoint(tiny_llava_dir, dtype="float16")[0], None, "float16")  # as compiled
    image = Image.new("RGB", (40, 30), "green")
    feeds = half_bundle.encode([image, image], ["red ?", "what colour ?"])
    assert feeds["attention_mask"][0].sum() != feeds["attention_mask"][1].sum()
    assert_decodes_like_portable(half_bundle, model, tmp_path, feeds, steps=8, bound=FLOAT16_ORT_MAX_ABS_LOGITS)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_device_cuda_without_a_gpu_is_a_one_line_error(tiny_llava_dir, tmp_path, capsys):
    assert compile_main([str(tiny_llava_dir), "--keep", "8", "--device", "cuda", "-o", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "no CUDA device is visible" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "c").exists()


def test_bfloat16_bundle_keeps_bfloat16_weights_and_computes_in_float32(
    tiny_llava_dir, tiny_llava, tmp_path, float32_result
):
    """ONNX Runtime's CPU provider has no bfloat16 kernels: the bundle stores the weights in bfloat16, widens each
    with a Cast as it is used and computes in float32, within the float16 bound of the float32 model. The pruning
    scores stay float32 inside the bfloat16 program."""
    import onnx_ir as ir

    out = tmp_path / "bf16"
    model, _ = load_checkpoint(tiny_llava_dir, dtype="bfloat16")
    result = clse_fx.compile(model, **OPTIONS, output_dir=out, optimize_onnx=False)
    # The first stage's comparison-rank top-K compares [1, 36, 1] against [1, 1, 36] scores: float32 ones.
    compares = [
        n.args[0].meta["val"]
        for n in result.pruned.program.graph.nodes
        if n.target is torch.ops.aten.gt.Tensor and n.args[0].meta["val"].shape[-2:].numel() == 36
    ]
    assert compares and {value.dtype for value in compares} == {torch.float32}
    engine = Engine.load(out)
    assert engine.manifest.dtype == "bfloat16" and engine.manifest.parity["reference_kept_identical"]
    graph = ir.load(out / "prefill.onnx").graph
    stored = [value for value in graph.initializers.values() if value.dtype == ir.DataType.BFLOAT16]
    assert stored and all(use.node.op_type == "Cast" for value in stored for use in value.uses())
    computed = [value for node in graph for value in node.outputs]
    assert {value.dtype for value in computed} & {ir.DataType.BFLOAT16} == set()
    inputs = example_inputs(tiny_llava, CompileOptions(**OPTIONS))
    logits = torch.from_numpy(engine.prefill.run(**{name: t.numpy() for name, t in inputs.items()})[0])
    assert logits.dtype == torch.float32
    assert (logits - float32_result.pruned().logits).abs().max() <= BFLOAT16_VS_FLOAT32_MAX_ABS_LOGITS


def test_a_bfloat16_decode_step_widens_its_weights_once_where_they_fit():
    """Cast at every token, a bfloat16 decode step runs 17x slower than from float32 copies made at load; the
    copies are made where twice the bfloat16 bytes fit in the available memory (a 7B model's do not on 24 GB)."""
    from clse_fx.deploy.engine import graph_weight_bytes
    from clse_fx.deploy.session import widened_weights_fit

    assert widened_weights_fit(1 << 20) and not widened_weights_fit(1 << 50)
    entries = {"a": {"type": 16, "length": 6}, "b": {"type": 1, "length": 8}, "c": {"type": 16, "length": 2}}
    graph = {"initializers": entries}
    assert graph_weight_bytes(graph) == 8
