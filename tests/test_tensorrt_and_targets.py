"""TensorRT readiness check, and the torch-compile, onnxruntime-gpu and tensorrt targets."""

import importlib.util

import onnx
import pytest
import torch
from onnx import TensorProto, helper
from PIL import Image

import clse_fx
from clse_fx.cli import compile_main
from clse_fx.compiler import prune_prefill
from clse_fx.deploy.cli import run_main
from clse_fx.deploy.engine import Engine
from clse_fx.deploy.session import select_providers
from clse_fx.export.tensorrt_check import check_tensorrt_ready
from clse_fx.export.torch_compile import CompiledEngine
from clse_fx.plan import PruneConfig, plan_budget
from clse_fx.reference import reference_generate, reference_prune

from .conftest import prompt_ids

HAVE_TENSORRT = torch.cuda.is_available() and importlib.util.find_spec("torch_tensorrt") is not None
NO_TENSORRT = "needs a CUDA device and torch-tensorrt (pip install 'clse-fx[tensorrt]'); this machine has neither"


def _model(nodes, inputs, outputs, initializers=()):
    graph = helper.make_graph(nodes, "planted", inputs, outputs, initializer=list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])


def _info(name, dtype, shape):
    return helper.make_tensor_value_info(name, dtype, shape)


def test_flags_dft_node():
    model = _model(
        [helper.make_node("DFT", ["x"], ["y"], name="spectral_fft")],
        [_info("x", TensorProto.FLOAT, [1, 8, 1])],
        [_info("y", TensorProto.FLOAT, [1, 8, 2])],
    )
    (finding,) = check_tensorrt_ready(model)
    assert finding.node == "spectral_fft" and "not supported" in finding.problem


def test_flags_topk_with_runtime_or_large_k():
    k = helper.make_tensor("k_const", TensorProto.INT64, [1], [4096])
    model = _model(
        [
            helper.make_node("TopK", ["x", "k_input"], ["v", "i"], name="topk_runtime_k"),
            helper.make_node("TopK", ["x", "k_const"], ["v2", "i2"], name="topk_big_k", sorted=0),
        ],
        [_info("x", TensorProto.FLOAT, [1, 5000]), _info("k_input", TensorProto.INT64, [1])],
        [_info("v", TensorProto.FLOAT, None), _info("v2", TensorProto.FLOAT, None)],
        [k],
    )
    problems = {(f.node, f.problem) for f in check_tensorrt_ready(model)}
    assert ("topk_runtime_k", "input 1 (k_input) must be a build-time constant") in problems
    assert ("topk_big_k", "K must be below 3840 for TensorRT's TopK") in problems
    assert ("topk_big_k", "TensorRT's TopK returns sorted results only (sorted=0 unsupported)") in problems


def test_flags_nonzero_complex_and_integer_cumsum_and_bool_scatter():
    axis = helper.make_tensor("axis", TensorProto.INT64, [], [0])
    model = _model(
        [
            helper.make_node("NonZero", ["m"], ["nz"], name="data_dependent"),
            helper.make_node("CumSum", ["ints", "axis"], ["c"], name="int_cumsum"),
            helper.make_node("ScatterElements", ["m", "idx", "m"], ["s"], name="bool_scatter"),
            helper.make_node("Identity", ["z"], ["z2"], name="complex_value"),
        ],
        [
            _info("m", TensorProto.BOOL, [4]),
            _info("ints", TensorProto.INT64, [4]),
            _info("idx", TensorProto.INT64, [4]),
            _info("z", TensorProto.COMPLEX64, [4]),
        ],
        [
            _info("nz", TensorProto.INT64, None),
            _info("c", TensorProto.INT64, [4]),
            _info("z2", TensorProto.COMPLEX64, [4]),
        ],
        [axis],
    )
    flagged = {f.node: f.problem for f in check_tensorrt_ready(model)}
    assert "depends on input values" in flagged["data_dependent"]
    assert flagged["int_cumsum"].startswith("INT64 input, TensorRT takes floating types only")
    assert "BOOL data" in flagged["bool_scatter"]
    assert "complex tensor" in flagged["complex_value"]


def test_emitted_bundle_is_tensorrt_ready_and_the_gpu_target_falls_back_to_cpu(tiny_llava_dir, tmp_path, capsys):
    """One onnxruntime-gpu bundle: every node TensorRT-ready; without a CUDA provider, compiling and loading it
    say (in one line) that it runs on the CPU."""
    import onnxruntime

    out = tmp_path / "bundle"
    argv = [str(tiny_llava_dir), "--stages", "1:20,2:10,3:4", "--batch", "2", "-o", str(out), "--check", "tensorrt"]
    argv += ["--no-verify"]  # what is checked here is the graphs; parity is every other test's
    assert compile_main([*argv, "--target", "onnxruntime-gpu"]) == 0
    printed = capsys.readouterr().out
    assert "TensorRT readiness: every node accepted (prefill, decode)" in printed
    for graph in ("prefill.onnx", "decode.onnx"):
        assert check_tensorrt_ready(out / graph) == []
    # Findings name the layer a node was traced from.
    model = onnx.load(str(out / "prefill.onnx"))
    scopes = {p.value for n in model.graph.node for p in n.metadata_props if p.key == "pkg.torch.onnx.name_scopes"}
    assert any("language_model.layers.3" in s for s in scopes) and any("clse.stage1.before_layer2" in s for s in scopes)
    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        return  # the fallback path is not taken
    image = tmp_path / "image.png"
    Image.new("RGB", (48, 48), (200, 30, 30)).save(image)
    assert run_main([str(out), "--image", str(image), "--prompt", "what", "--max-new-tokens", "2"]) == 0
    err = capsys.readouterr().err  # clse-run shows the fallback as one line, without Python's source line
    assert err.startswith("warning: onnxruntime-gpu bundle") and "running on CPU" in err
    assert len(err.strip().splitlines()) == 1
    with pytest.warns(UserWarning, match="running on CPU. Install the gpu extra"):
        assert select_providers("onnxruntime-gpu") == ["CPUExecutionProvider"]
    with pytest.warns(UserWarning, match="running on CPU"):
        engine = Engine.load(out)
    assert engine.manifest.target == "onnxruntime-gpu"
    assert engine.prefill.session.get_providers() == ["CPUExecutionProvider"]


def _padded_prompts(model):
    """Two rows of the compiled geometry (6 text tokens), the image at different places, row 0 left-padded."""
    pad = model.config.text_config.pad_token_id
    ids = prompt_ids(model, [[pad, pad, 5, "img", 7, 8, 9], [5, 7, 8, "img", 9, 10, 11]])
    pixels = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "attention_mask": (ids != pad).long(), "pixel_values": pixels}


def test_static_kv_decode_per_layer_policy(tiny_llava):
    """Per-layer caches have a length each: the static buffers and masks follow every layer's own length."""
    prune = PruneConfig(plan=plan_budget(None, 4, 36, stages="1:20,3:6"), kv_policy="per-layer")
    inputs = _padded_prompts(tiny_llava)
    engine = CompiledEngine(tiny_llava, prune_prefill(tiny_llava, prune, inputs), 8, backend="eager")
    assert len({buffer.shape[2] for buffer in engine.decode.buffers_in_order()}) == 3  # 42 + 8, 26 + 8, 12 + 8
    assert engine.generate(inputs, 8) == reference_generate(tiny_llava, prune, max_new_tokens=8, **inputs).tolist()
    with pytest.raises(ValueError, match="drop the output dir"):
        clse_fx.compile(tiny_llava, stages="1:20", target="torch-compile", output_dir="x")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; none on this machine")
def test_torch_compile_target_on_cuda(tiny_llava):
    model = tiny_llava.to("cuda")
    try:
        result = clse_fx.compile(model, stages="1:20,3:6", target="torch-compile", text_len=6)
        assert result.manifest.parity["torch_compile_max_abs_logits"] <= 1e-3
    finally:
        tiny_llava.to("cpu")


@pytest.mark.skipif(HAVE_TENSORRT, reason="TensorRT is available; the missing-TensorRT error is not reachable")
def test_tensorrt_target_without_cuda_says_how_to_install(tiny_llava_dir, tmp_path, capsys):
    assert compile_main([str(tiny_llava_dir), "--keep", "8", "--target", "tensorrt", "-o", str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err
    assert "pip install 'clse-fx[tensorrt]'" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "t").exists()


@pytest.mark.skipif(not HAVE_TENSORRT, reason=NO_TENSORRT)
def test_tensorrt_engine_equals_reference(tiny_llava, tmp_path):
    import torch_tensorrt

    out = tmp_path / "trt"
    try:
        result = clse_fx.compile(tiny_llava, stages="1:20,3:6", target="tensorrt", text_len=6, output_dir=out)
        engine = torch_tensorrt.load(str(out / result.manifest.graphs["prefill_tensorrt"]["file"])).module()
        args = [a.cuda() for a in result.pruned.example_args]
        logits = engine(*args)[0]
        ref = reference_prune(tiny_llava, result.pruned.settings.prune, args[0], args[2], args[1])
        assert (logits - ref.logits[:, -1:]).abs().max() <= 1e-3
    finally:
        tiny_llava.to("cpu")
