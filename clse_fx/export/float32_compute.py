"""Run a bfloat16 (or float16) ONNX graph in float32 with its weights still stored in the narrow type.

ONNX Runtime's CPU provider has no bfloat16 kernels for MatMul, Conv and most other ops (and, unlike float16, it
inserts no casts for them: the session fails to build), and the ONNX checker rejects bfloat16 Conv. So a bfloat16
export becomes a float32 graph whose bfloat16 initializers each pass through a ``Cast`` to float32: the weights
keep half the bytes on disk and in the memory-mapped file, and each is widened as its consumer runs (sessions keep
these casts: ``clse_fx.deploy.session.OnnxSession`` disables constant folding for bfloat16 bundles). Activations,
the KV cache and the logits are float32. Quantized bundles from float16 checkpoints take the same path
(``narrow=FLOAT16_TOO``): ONNX Runtime's int4/int8 kernels compute faster on float32 activations than on float16
ones (0.41 vs 0.67 ms of CPU per 4096x4096 int4 product here), and the few weights left unquantized (norms,
biases) are small.
"""

from __future__ import annotations

import numpy as np

DTYPE_ATTRIBUTES = ("to", "dtype")  # Cast, EyeLike, RandomNormal*, ...: integer attributes naming an element type
FLOAT16_TOO = ("BFLOAT16", "FLOAT16")


def compute_in_float32(model, narrow: tuple[str, ...] = ("BFLOAT16",)) -> int:
    """Rewrite ``model`` (an ``onnx_ir.Model``, in place) as described above for the element types named in
    ``narrow``; returns how many initializers were given a cast."""
    import onnx_ir as ir

    types, f32 = {getattr(ir.DataType, name) for name in narrow}, ir.DataType.FLOAT
    graph = model.graph
    for node in graph:
        for attribute in list(node.attributes.values()):
            names_type = attribute.name in DTYPE_ATTRIBUTES and attribute.type == ir.AttributeType.INT
            if names_type and attribute.value in types:
                node.attributes[attribute.name] = ir.AttrInt64(attribute.name, f32)
            elif attribute.type == ir.AttributeType.TENSOR and attribute.value.dtype in types:
                widened = ir.tensor(attribute.value.numpy().astype(np.float32), name=attribute.value.name)
                node.attributes[attribute.name] = ir.AttrTensor(attribute.name, widened)
        for value in node.outputs:
            _widen(ir, value, types)
    for value in [*graph.inputs, *graph.outputs]:
        _widen(ir, value, types)
    casts = []
    for name, weight in list(graph.initializers.items()):
        if weight.dtype not in types:
            continue
        widened = ir.Value(name=f"{name}.float32", shape=weight.shape, type=ir.TensorType(f32))
        weight.replace_all_uses_with(widened)
        casts.append(ir.Node("", "Cast", [weight], [ir.AttrInt64("to", f32)], outputs=[widened]))
    if casts:
        graph.insert_before(next(iter(graph)), casts)
    return len(casts)


def _widen(ir, value, types: set) -> None:
    if value.dtype in types:
        value.type = ir.TensorType(ir.DataType.FLOAT)
