"""ONNX Runtime against the PyTorch pruned graph, and the static-shape guarantees of the exported file."""

import numpy as np
import onnx
import pytest
import torch

from clse_fx.compiler import prune_prefill
from clse_fx.deploy.session import OnnxSession
from clse_fx.export.onnxruntime import export_decode_onnx, export_onnx, graph_signature
from clse_fx.plan import PruneConfig, plan_budget

from .conftest import prompt_ids


@pytest.fixture(scope="module")
def exported(tiny_llava, tmp_path_factory):
    ids = prompt_ids(tiny_llava, [[5, "img", 7, 8, 9], [5, 7, 8, "img", 9]])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": torch.randn(2, 3, 48, 48)}
    prune = PruneConfig(plan=plan_budget(None, 4, 36, stages="1:20,2:10,3:4"))
    pruned = prune_prefill(tiny_llava, prune, inputs)
    return pruned, export_onnx(pruned, tmp_path_factory.mktemp("onnx") / "prefill.onnx")


def test_onnxruntime_equals_pytorch(exported):
    pruned, path = exported
    session = OnnxSession(path)
    names = ["input_ids", "attention_mask", "pixel_values"]
    engine = session.run(**dict(zip(names, pruned.example_args)))
    torch_out = pruned.flat()
    assert len(engine) == len(torch_out) == 2 + 3 + 2 * 4 + 1  # logits, positions, kept, cache, valid
    assert np.abs(engine[0] - torch_out[0].numpy()).max() <= 1e-4
    for e, t in zip(engine[1:5], torch_out[1:5]):  # positions and kept ids: exactly equal
        assert np.array_equal(e, t.numpy())
    for e, t in zip(engine[5:-1], torch_out[5:-1]):  # the KV cache
        assert e.shape == t.shape and np.abs(e - t.numpy()).max() <= 1e-4
    assert engine[-1].tolist() == torch_out[-1].tolist() == [True, True]  # every row is one it was built for


def test_onnxruntime_on_other_image_positions(exported):
    """Image positions are data, not shapes: the same engine serves another layout."""
    pruned, path = exported
    ids = pruned.example_args[0].clone()
    ids[0] = ids[0].roll(3)
    args = (ids, pruned.example_args[1], torch.randn(2, 3, 48, 48))
    engine = OnnxSession(path).run(input_ids=args[0], attention_mask=args[1], pixel_values=args[2])
    torch_out = pruned.flat(*args)
    assert np.abs(engine[0] - torch_out[0].numpy()).max() <= 1e-4
    assert np.array_equal(engine[1], torch_out[1].numpy())


def test_exported_graph_is_static_and_engine_friendly(exported):
    _, path = exported
    model = onnx.load(str(path))
    ops = {node.op_type for node in model.graph.node}
    assert not ops & {"DFT", "STFT", "NonZero", "Unique", "Loop", "If"}
    complex_types = {onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128}
    inferred = onnx.shape_inference.infer_shapes(model)
    for value in list(inferred.graph.value_info) + list(inferred.graph.output):
        assert value.type.tensor_type.elem_type not in complex_types
    # Top-K selection lowers to comparisons + CumSum + ScatterElements; any TopK must take a constant K.
    constants = {init.name for init in model.graph.initializer} | {
        out for node in model.graph.node if node.op_type == "Constant" for out in node.output
    }
    for node in model.graph.node:
        if node.op_type == "TopK":
            assert node.input[1] in constants
    signature = graph_signature(path)
    assert [i["name"] for i in signature["inputs"]] == ["input_ids", "attention_mask", "pixel_values"]
    names = [o["name"] for o in signature["outputs"]]
    assert names[:5] == ["logits", "positions", "kept_0", "kept_1", "kept_2"]
    assert names[5:7] == ["present.0.key", "present.0.value"] and names[5 + 8 :] == ["valid"]
    for value in signature["inputs"] + signature["outputs"]:
        assert all(d > 0 for d in value["shape"]), value  # every dimension static
    assert signature["outputs"][0]["shape"][:2] == [2, 1]  # logits at the last position only


def test_engine_rejects_shapes_it_was_not_compiled_for(exported):
    pruned, path = exported
    ids, mask, pixels = pruned.example_args
    with pytest.raises(ValueError, match=r"input_ids has shape \[2, 41\] but prefill.onnx was compiled for \[2, 40\]"):
        OnnxSession(path).run(input_ids=torch.cat([ids, ids[:, :1]], 1), attention_mask=mask, pixel_values=pixels)
    with pytest.raises(ValueError, match="needs input 'pixel_values'"):
        OnnxSession(path).run(input_ids=ids, attention_mask=mask)


@pytest.mark.parametrize("score", ["random", "uniform"])
def test_baseline_scores_export_as_constants(tiny_llava, tmp_path, score):
    """The random and uniform baselines are compile-time constants in the graph: ORT keeps the same tokens."""
    ids = prompt_ids(tiny_llava, [[5, "img", 7, 8, 9], [5, 7, 8, "img", 9]])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": torch.randn(2, 3, 48, 48)}
    pruned = prune_prefill(
        tiny_llava, PruneConfig(plan=plan_budget(None, 4, 36, stages="1:12,3:5"), score=score), inputs
    )
    engine = OnnxSession(export_onnx(pruned, tmp_path / "prefill.onnx", optimize=False)).run(
        **dict(zip(["input_ids", "attention_mask", "pixel_values"], pruned.example_args))
    )
    torch_out = pruned.flat()
    assert np.abs(engine[0] - torch_out[0].numpy()).max() <= 1e-4
    for e, t in zip(engine[1:4], torch_out[1:4]):
        assert np.array_equal(e, t.numpy())
    assert torch.equal(pruned.flat()[2], torch_out[2])  # the same tokens on every call


def test_decode_exports_served_from_the_cache_bring_their_weights(tiny_llava, tmp_path):
    """Every graph keeps its weights in ``<graph>.onnx.data`` (bundles then share them in weights.data, see
    tests/test_deploy_check.py); a decode export served from the cache writes its data file again."""
    import copy

    model = copy.deepcopy(tiny_llava)  # a decode export of its own
    ids = prompt_ids(model, [[5, "img", 7, 8, 9]])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": torch.randn(1, 3, 48, 48)}
    cache = prune_prefill(model, PruneConfig(plan=plan_budget(None, 4, 36, stages="1:20")), inputs)().cache
    paths = [tmp_path / folder / "decode.onnx" for folder in ("first", "cached")]
    for path in paths:
        path.parent.mkdir()
        export_decode_onnx(model, cache, path, optimize=False)
    first, cached = (path.with_name("decode.onnx.data") for path in paths)
    assert first.stat().st_size > 0 and cached.read_bytes() == first.read_bytes()
    initializers = onnx.load(str(paths[1]), load_external_data=False).graph.initializer
    assert any(tensor.data_location == onnx.TensorProto.EXTERNAL for tensor in initializers)
