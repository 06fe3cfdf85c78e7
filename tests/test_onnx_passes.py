"""ONNX-level passes of the export: RMSNorm in the form ONNX Runtime fuses, bfloat16 graphs computed in float32."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from clse_fx.export.float32_compute import compute_in_float32
from clse_fx.export.rsqrt_as_division import rsqrt_as_division


def _model(nodes, inputs, outputs, initializers) -> ir.Model:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializers)
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))


def test_rms_norm_in_division_form_is_fused_by_onnx_runtime(tmp_path):
    """x * rsqrt(mean(x^2) + eps) * gamma, as the exporter writes transformers' RMSNorm: after the rewrite the same
    numbers, and ONNX Runtime's optimized graph holds one SimplifiedLayerNormalization instead of seven nodes."""
    gamma = np.linspace(0.5, 2.0, 16, dtype=np.float32)
    nodes = [
        helper.make_node("Pow", ["x", "two"], ["sq"]),
        helper.make_node("ReduceMean", ["sq", "axes"], ["mean"], keepdims=1),
        helper.make_node("Add", ["mean", "eps"], ["var"]),
        helper.make_node("Sqrt", ["var"], ["root"]),
        helper.make_node("Reciprocal", ["root"], ["inv"]),
        helper.make_node("Mul", ["x", "inv"], ["normed"]),
        helper.make_node("Mul", ["normed", "gamma"], ["y"]),
    ]
    constants = [
        numpy_helper.from_array(np.array(2.0, np.float32), "two"),
        numpy_helper.from_array(np.array([-1], np.int64), "axes"),
        numpy_helper.from_array(np.array(1e-6, np.float32), "eps"),
        numpy_helper.from_array(gamma, "gamma"),
    ]
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 3, 16]) for n in ("x", "y")]
    x = np.random.default_rng(0).standard_normal((2, 3, 16)).astype(np.float32)
    expected = x / np.sqrt((x**2).mean(-1, keepdims=True) + 1e-6) * gamma
    model = _model(nodes, io[:1], io[1:], constants)
    assert rsqrt_as_division(model) == 1
    assert "Reciprocal" not in {n.op_type for n in model.graph}
    path = tmp_path / "norm.onnx"
    ir.save(model, path)
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"x": x})[0], expected, rtol=1e-5, atol=1e-6)
    fused = [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    assert fused == ["SimplifiedLayerNormalization"]


def test_a_bfloat16_graph_computes_in_float32_from_its_bfloat16_weights():
    """Conv and MatMul on bfloat16 weights (no ONNX Runtime CPU kernel, a Conv the ONNX checker rejects): after the
    pass the checker accepts it, ONNX Runtime runs it, the weights stay bfloat16 behind one Cast each, and the
    result is float32 arithmetic on the bfloat16-rounded weights (the graph's own cast of the pixels to bfloat16
    becomes a cast to float32)."""
    rng = np.random.default_rng(1)
    kernel = rng.standard_normal((4, 3, 2, 2)).astype(ml_dtypes.bfloat16)
    weight = rng.standard_normal((4, 5)).astype(ml_dtypes.bfloat16)

    def bf16(array, name):
        return helper.make_tensor(name, TensorProto.BFLOAT16, array.shape, array.view(np.uint16).tobytes(), raw=True)

    nodes = [
        helper.make_node("Cast", ["pixels"], ["pixels_bf16"], to=TensorProto.BFLOAT16),
        helper.make_node("Conv", ["pixels_bf16", "kernel"], ["features"], strides=[2, 2]),
        helper.make_node("Reshape", ["features", "shape"], ["rows"]),
        helper.make_node("MatMul", ["rows", "weight"], ["out"]),
    ]
    initializers = [
        bf16(kernel, "kernel"),
        bf16(weight, "weight"),
        numpy_helper.from_array(np.array([1, 4], np.int64), "shape"),
    ]
    model = _model(
        nodes,
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, [1, 3, 2, 2])],
        [helper.make_tensor_value_info("out", TensorProto.BFLOAT16, [1, 5])],
        initializers,
    )
    assert compute_in_float32(model) == 2
    proto = ir.to_proto(model)
    onnx.checker.check_model(proto, full_check=True)
    assert {t.data_type for t in proto.graph.initializer if t.name in ("kernel", "weight")} == {TensorProto.BFLOAT16}
    pixels = rng.standard_normal((1, 3, 2, 2)).astype(np.float32)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    out = session.run(None, {"pixels": pixels})[0]
    features = np.einsum("chw,ochw->o", pixels[0], kernel.astype(np.float32))[None]
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, features @ weight.astype(np.float32), rtol=1e-5, atol=1e-5)
