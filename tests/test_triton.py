"""The Triton model repository: every config.pbtxt parses as Triton's ModelConfig and matches its ONNX file, and
the Python-backend generation model, run against a stand-in for Triton's BLS API, answers as Engine does."""

import importlib.util
import json
import re
import shutil
import sys
import types

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from PIL import Image

from clse_fx.cli import compile_main
from clse_fx.deploy.engine import Engine, SamplingConfig
from clse_fx.deploy.loop import check_prompt_feeds
from clse_fx.deploy.manifest import read_manifest, split_prefill_outputs
from clse_fx.deploy.triton import onnx_config, write_triton_repo
from clse_fx.export.bundle import write_manifest
from clse_fx.export.onnxruntime import graph_signature

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
text_format = pytest.importorskip("google.protobuf.text_format")

ONNX_TO_TRITON = {TensorProto.INT64: "TYPE_INT64", TensorProto.FLOAT: "TYPE_FP32", TensorProto.BOOL: "TYPE_BOOL"}
NUMPY_TO_TRITON = {"int64": "TYPE_INT64", "int32": "TYPE_INT32", "float32": "TYPE_FP32", "bool": "TYPE_BOOL"}


def _config(path):
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def _signature(values) -> list[tuple]:
    return [
        (
            v.name,
            ONNX_TO_TRITON[v.type.tensor_type.elem_type],
            [d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim],
        )
        for v in values
    ]


def _config_signature(tensors) -> list[tuple]:
    return [(t.name, model_config_pb2.DataType.Name(t.data_type), list(t.dims)) for t in tensors]


@pytest.fixture(scope="module")
def compiled(cli_bundle):
    """A batch-2 bundle and its Triton repository, both written by one clse-compile --triton-repo."""
    return cli_bundle[:2]


def _feeds(engine: Engine) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (40 + 9 * i, 50, 3), dtype=np.uint8)) for i in range(2)]
    return engine.encode(images, ["describe ?", "how many red star ?"])


def bad_feeds(feeds: dict[str, np.ndarray], image_token: int, pad: int) -> list[tuple[dict, str]]:
    """Compiled-shape feeds the prefill graph was not built for, each with the start of the error it must get."""
    ids, mask = feeds["input_ids"], feeds["attention_mask"]
    no_image, extra_image, padded_image = ids.copy(), ids.copy(), ids.copy()
    no_image[0][no_image[0] == image_token] = pad + 7  # 0 image tokens in row 0
    text = (extra_image[1] != image_token) & (mask[1] == 1)
    extra_image[1, np.argmax(text)] = image_token  # one image token too many in row 1
    first_real = int(np.argmax(mask[0]))
    if first_real:  # move one of row 0's image tokens into its padding: the right count, in the wrong place
        padded_image[0, np.argmax(ids[0] == image_token)] = pad + 7
        padded_image[0, first_real - 1] = image_token
    holed = mask.copy()
    holed[0, -1] = 0  # a zero after the ones: not left padded
    cases = [
        (dict(feeds, input_ids=no_image), "row 0 holds 0 visual placeholder tokens"),
        (dict(feeds, input_ids=extra_image), "row 1 holds"),
        (dict(feeds, attention_mask=np.zeros_like(mask)), "row 0: the attention mask is all zeros"),
        (dict(feeds, attention_mask=holed), "row 0: the attention mask is not left padded"),
        (dict(feeds, input_ids=ids.astype(np.float32)), "input_ids must be integer token ids"),
        (dict(feeds, input_ids=ids[:, 1:], attention_mask=mask[:, 1:]), "input_ids has shape"),
    ]
    if first_real:  # the prompt is shorter than the compiled text length: there is padding to misuse
        cases.append((dict(feeds, input_ids=padded_image), "row 0: visual placeholder tokens sit in the padding"))
    return cases


def test_engine_refuses_feeds_it_was_not_built_for(compiled):
    engine = Engine.load(compiled[0])
    feeds = _feeds(engine)
    for bad, message in bad_feeds(feeds, engine.manifest.image_token_id, engine.pad_id):
        with pytest.raises(ValueError, match=re.escape(message)):
            engine.generate_ids(bad, 4)


def test_the_prefill_graph_itself_reports_bad_rows_and_never_indexes_out_of_bounds(compiled):
    """A direct prefill caller (a Triton client of clse_prefill) that skips the runtime checks: each bad input runs
    without an out-of-bounds error and the graph's ``valid`` output flags exactly the bad row."""
    engine = Engine.load(compiled[0])
    feeds = _feeds(engine)
    valid = split_prefill_outputs(engine.prefill.run(**feeds), engine.num_stages)[4]
    assert valid.tolist() == [True, True]
    for bad, message in bad_feeds(feeds, engine.manifest.image_token_id, engine.pad_id):
        if bad["input_ids"].dtype != np.int64 or bad["input_ids"].shape != feeds["input_ids"].shape:
            continue  # shapes and types are refused by ONNX Runtime itself
        expected = [_row_passes_runtime_checks(engine, bad, row) for row in range(2)]  # the numpy checks agree
        valid = split_prefill_outputs(engine.prefill.run(**bad), engine.num_stages)[4]
        assert valid.tolist() == expected and not all(expected), message
        first = expected.index(False)
        with pytest.raises(ValueError, match=f"row {first}: the prefill graph reports a prompt it was not built for"):
            engine.run_prefill(bad)


def _row_passes_runtime_checks(engine: Engine, feeds: dict[str, np.ndarray], row: int) -> bool:
    one = slice(row, row + 1)
    try:
        check_prompt_feeds(
            feeds["input_ids"][one],
            feeds["attention_mask"][one],
            (1, engine.sequence_length),
            engine.manifest.visual_token_ids,
            engine.manifest.geometry["visual_tokens_per_prompt"],
        )
    except ValueError:
        return False
    return True


def test_every_config_parses_and_matches_its_onnx_file(compiled):
    bundle, repo = compiled
    models = sorted(p.name for p in repo.iterdir() if p.is_dir())
    assert models == ["clse_decode", "clse_generate", "clse_prefill"]  # LLaVA: the vision tower is in the prefill
    for name in models:
        config = _config(repo / name / "config.pbtxt")
        assert config.name == name and config.max_batch_size == 0
        if name == "clse_generate":
            continue
        assert config.backend == "onnxruntime"
        assert [g.kind for g in config.instance_group] == [model_config_pb2.ModelInstanceGroup.KIND_CPU]
        graph = onnx.load(str(repo / name / "1" / "model.onnx"), load_external_data=False).graph
        assert _config_signature(config.input) == _signature(graph.input)
        assert _config_signature(config.output) == _signature(graph.output)
        source = bundle / f"{name.removeprefix('clse_')}.onnx"
        assert (repo / name / "1" / "model.onnx").read_bytes() == source.read_bytes()
    # The decode graph's growing past length is the only dynamic dimension.
    decode = _config(repo / "clse_decode" / "config.pbtxt")
    assert {tuple(t.dims) for t in decode.input if t.name.startswith("past.")} == {(2, 2, -1, 32)}
    generate = _config(repo / "clse_generate" / "config.pbtxt")
    assert generate.backend == "python"
    prefill = onnx.load(str(bundle / "prefill.onnx"), load_external_data=False).graph
    required = [t for t in generate.input if not t.optional]
    assert _config_signature(required) == _signature(prefill.input)
    assert {t.name for t in generate.input if t.optional} == {
        "max_new_tokens",
        "do_sample",
        "temperature",
        "top_k",
        "seed",
    }
    assert _config_signature(generate.output) == [
        ("output_ids", "TYPE_INT64", [2, -1]),
        ("output_lengths", "TYPE_INT64", [2]),
    ]
    readme = (repo / "README.md").read_text()
    assert f"tritonserver --model-repository {repo.resolve()}" in readme and "the vision tower is inside it" in readme


def test_gpu_targets_run_on_the_gpu_and_tensorrt_accelerates(compiled):
    bundle, _ = compiled
    entry = json.loads((bundle / "manifest.json").read_text())["graphs"]["prefill"]
    gpu = text_format.Parse(onnx_config("prefill", entry, "onnxruntime-gpu"), model_config_pb2.ModelConfig())
    assert gpu.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    assert not gpu.optimization.execution_accelerators.gpu_execution_accelerator
    trt = text_format.Parse(onnx_config("prefill", entry, "tensorrt", "fp16"), model_config_pb2.ModelConfig())
    (accelerator,) = trt.optimization.execution_accelerators.gpu_execution_accelerator
    assert accelerator.name == "tensorrt" and accelerator.parameters["precision_mode"] == "FP16"


class _Backend:
    """A stand-in for ``triton_python_backend_utils``: BLS requests run the repository's ONNX files with ONNX
    Runtime after the checks Triton makes against each model's config (names, data types, dims)."""

    def __init__(self, repo):
        import onnxruntime

        self.repo, self.calls = repo, {}
        self.configs = {p.name: _config(p / "config.pbtxt") for p in repo.iterdir() if p.is_dir()}
        self.sessions = {
            name: onnxruntime.InferenceSession(str(repo / name / "1" / "model.onnx"))
            for name, config in self.configs.items()
            if config.backend == "onnxruntime"
        }
        backend = self

        class Tensor:
            def __init__(self, name, array):
                self._name, self._array = name, np.asarray(array)

            def name(self):
                return self._name

            def as_numpy(self):
                return self._array

        class TritonError:
            def __init__(self, message):
                self._message = message

            def message(self):
                return self._message

        class InferenceResponse:
            def __init__(self, output_tensors, error=None):
                self._tensors, self._error = output_tensors, error

            def has_error(self):
                return self._error is not None

            def error(self):
                return self._error

            def output_tensors(self):
                return self._tensors

        class InferenceRequest:
            def __init__(self, model_name, requested_output_names, inputs, preferred_memory=None):
                self.model_name, self.outputs, self._inputs = model_name, requested_output_names, inputs

            def inputs(self):
                return self._inputs

            def exec(self):
                backend.check(self.model_name, self._inputs)
                backend.calls[self.model_name] = backend.calls.get(self.model_name, 0) + 1
                feeds = {t.name(): t.as_numpy() for t in self._inputs}
                arrays = backend.sessions[self.model_name].run(self.outputs, feeds)
                return InferenceResponse([Tensor(n, a) for n, a in zip(self.outputs, arrays)])

        def by_name(tensors, name):
            return next((t for t in tensors if t.name() == name), None)

        self.module = types.SimpleNamespace(
            Tensor=Tensor,
            TritonError=TritonError,
            TritonModelException=RuntimeError,
            InferenceRequest=InferenceRequest,
            InferenceResponse=InferenceResponse,
            PreferredMemory=lambda kind, device: None,
            TRITONSERVER_MEMORY_CPU=0,
            get_input_tensor_by_name=lambda request, name: by_name(request.inputs(), name),
            get_output_tensor_by_name=lambda response, name: by_name(response.output_tensors(), name),
        )
        self.request = lambda feeds: InferenceRequest("clse_generate", [], [Tensor(n, a) for n, a in feeds.items()])

    def check(self, model, tensors):
        """Triton's checks of a request against the model config."""
        config = self.configs[model]
        declared = {t.name: t for t in config.input}
        given = {t.name(): t.as_numpy() for t in tensors}
        assert set(given) <= set(declared), f"{model}: undeclared inputs {set(given) - set(declared)}"
        assert {n for n, t in declared.items() if not t.optional} <= set(given), f"{model}: missing inputs"
        for name, array in given.items():
            want = declared[name]
            assert NUMPY_TO_TRITON[array.dtype.name] == model_config_pb2.DataType.Name(want.data_type), name
            assert len(array.shape) == len(want.dims), name
            assert all(d == -1 or d == s for d, s in zip(want.dims, array.shape)), (name, array.shape)


def _load_generate_model(repo, backend, monkeypatch):
    """Import clse_generate/1/model.py as Triton does, with clse_fx unimportable: the repository stands alone."""
    version = repo / "clse_generate" / "1"
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", backend.module)
    monkeypatch.delitem(sys.modules, "clse_runtime", raising=False)
    monkeypatch.syspath_prepend(str(version))
    spec = importlib.util.spec_from_file_location("clse_generate_model", version / "model.py")
    module = importlib.util.module_from_spec(spec)
    package, sys.modules["clse_fx"] = sys.modules["clse_fx"], None  # any import of clse_fx now fails
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules["clse_fx"] = package
    model = module.TritonPythonModel()
    model.initialize({"model_name": "clse_generate", "model_version": "1"})
    return model


def _answers(backend, response):
    assert not response.has_error(), response.error().message()
    tensors = {t.name(): t.as_numpy() for t in response.output_tensors()}
    ids, lengths = tensors["output_ids"], tensors["output_lengths"]
    assert ids.dtype == lengths.dtype == np.int64 and len(ids) == len(lengths) == 2
    assert np.all(ids[np.arange(ids.shape[1])[None, :] >= lengths[:, None]] == -1)
    return [row[:n].tolist() for row, n in zip(ids, lengths)]


def test_generation_model_equals_engine(compiled, monkeypatch):
    bundle, repo = compiled
    engine = Engine.load(bundle)
    feeds = _feeds(engine)
    backend = _Backend(repo)
    model = _load_generate_model(repo, backend, monkeypatch)
    stops = {engine.manifest.eos_token_id}
    sampled = {"do_sample": np.array([True]), "top_k": np.array([5], np.int32), "seed": np.array([3], np.int64)}
    requests = [
        backend.request(dict(feeds, max_new_tokens=np.array([12], np.int32))),
        backend.request(dict(feeds, max_new_tokens=np.array([9999], np.int32))),  # over the limit: an error
        backend.request(dict(feeds, max_new_tokens=np.array([6], np.int32), **sampled)),
        backend.request(dict(feeds, do_sample=np.array([True]), temperature=np.array([np.inf], np.float32))),
        backend.request(dict(feeds, seed=np.array([-1], np.int64))),
    ]
    malformed = bad_feeds(feeds, engine.manifest.image_token_id, engine.pad_id)
    requests += [backend.request(bad) for bad, _ in malformed if bad["input_ids"].dtype == np.int64]
    greedy, too_many, sample, infinite, negative, *refused = model.execute(requests)
    # Refused before any model ran: an error each, and the prefill is only called for the two good requests.
    expected_errors = [message for bad, message in malformed if bad["input_ids"].dtype == np.int64]
    for response, message in zip(refused, expected_errors, strict=True):
        assert response.has_error() and message in response.error().message(), message
    assert _answers(backend, greedy) == engine.generate_ids(feeds, 12, stops=stops)[0]
    assert too_many.has_error() and "max_new_tokens must be between 1 and 256" in too_many.error().message()
    expected = engine.generate_ids(feeds, 6, SamplingConfig(do_sample=True, top_k=5, seed=3), stops=stops)[0]
    assert _answers(backend, sample) == expected
    assert infinite.has_error() and "temperature must be a finite number" in infinite.error().message()
    assert negative.has_error() and "seed must be a non-negative integer" in negative.error().message()
    assert backend.calls["clse_prefill"] == 2 and backend.calls["clse_decode"] >= 1


def _graph(path, name, nodes, inputs, outputs) -> None:
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info(*i) for i in inputs],
        [helper.make_tensor_value_info(*o) for o in outputs],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)


def test_pipeline_graphs_run_before_the_prefill_and_external_weights_travel(compiled, tmp_path, monkeypatch):
    """A manifest whose pipeline (as Qwen2-VL's: vision tower, M-RoPE index) runs graphs before the prefill gets
    a model per graph that clse_generate calls in order, their outputs feeding the prefill and, for rope_deltas,
    the decode positions, as Engine does; a graph whose weights live in an external file gets that file too."""
    bundle, _ = compiled
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    manifest = read_manifest(copy, verify=False)
    pixels = manifest.graphs["prefill"]["inputs"][2]["shape"]
    batch, seq = manifest.graphs["prefill"]["inputs"][1]["shape"]
    float32, int64 = TensorProto.FLOAT, TensorProto.INT64
    identity = [helper.make_node("Identity", ["raw_pixels"], ["pixel_values"])]
    _graph(
        copy / "vision.onnx", "vision", identity, [("raw_pixels", float32, pixels)], [("pixel_values", float32, pixels)]
    )
    rope = [  # rope_deltas = -(tokens per row): decode positions then start at each row's pad count
        helper.make_node("Constant", [], ["axes"], value=helper.make_tensor("axes", int64, [1], [1])),
        helper.make_node("ReduceSum", ["attention_mask", "axes"], ["tokens"], keepdims=0),
        helper.make_node("Neg", ["tokens"], ["rope_deltas"]),
    ]
    _graph(
        copy / "rope.onnx", "rope", rope, [("attention_mask", int64, [batch, seq])], [("rope_deltas", int64, [batch])]
    )
    decode = onnx.load(str(copy / "decode.onnx"))
    onnx.save(decode, copy / "decode.onnx", save_as_external_data=True, location="decode.weights")
    for name in ("vision", "rope", "decode"):
        manifest.graphs[name] = {"file": f"{name}.onnx", **graph_signature(copy / f"{name}.onnx")}
    assert manifest.graphs["decode"]["external_data"] == ["decode.weights"]
    manifest.pipeline = ["vision", "rope"]
    write_manifest(copy, manifest)
    repo = write_triton_repo(copy, tmp_path / "repo")
    assert (repo / "clse_decode" / "1" / "decode.weights").is_file()
    assert sorted(p.name for p in repo.iterdir() if p.is_dir()) == [
        "clse_decode",
        "clse_generate",
        "clse_prefill",
        "clse_rope",
        "clse_vision",
    ]
    vision_config = _config(repo / "clse_vision" / "config.pbtxt")
    assert _config_signature(vision_config.input) == [("raw_pixels", "TYPE_FP32", pixels)]
    generate = _config(repo / "clse_generate" / "config.pbtxt")
    assert [t.name for t in generate.input if not t.optional] == ["raw_pixels", "attention_mask", "input_ids"]
    assert "run in order: vision, rope, prefill, decode" in (repo / "README.md").read_text()
    engine = Engine.load(copy)
    encoded = _feeds(engine)
    feeds = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
    feeds["raw_pixels"] = encoded["pixel_values"]
    backend = _Backend(repo)
    model = _load_generate_model(repo, backend, monkeypatch)
    (response,) = model.execute([backend.request(feeds)])
    stops = {engine.manifest.eos_token_id}
    assert _answers(backend, response) == engine.generate_ids(feeds, 32, stops=stops)[0]
    assert backend.calls["clse_vision"] == backend.calls["clse_rope"] == 1


def test_cli_refuses_triton_repo_without_a_bundle_or_over_an_existing_dir(tiny_llava_dir, tmp_path, capsys):
    argv = [str(tiny_llava_dir), "--keep", "8", "--target", "aot-inductor", "--triton-repo", str(tmp_path / "r")]
    assert compile_main(argv) == 2
    assert "--triton-repo needs an ONNX bundle" in capsys.readouterr().err
    (tmp_path / "taken").mkdir()
    argv = [str(tiny_llava_dir), "--keep", "8", "-o", str(tmp_path / "b"), "--triton-repo", str(tmp_path / "taken")]
    assert compile_main(argv) == 2
    assert "taken already exists; pass --force" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()
