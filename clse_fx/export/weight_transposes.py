"""Fold ``Transpose(weight)`` into a transposed initializer that is computed only when the graph is written.

The ONNX exporter lowers every ``nn.Linear`` to ``MatMul(x, Transpose(W))``; onnxscript's optimizer folds each
transpose into a new initializer, computed with numpy and held in memory until the model is saved: a copy of
nearly every weight (13 GB for LLaVA-1.5-7B in float16) on top of the model's own. This pass does the same fold
first, but each transposed initializer is an ``onnx_ir.LazyTensor``: the save streams them to the external-data
file one at a time (peak memory: the largest weight), and the graph is the one the optimizer would have made.
"""

from __future__ import annotations

import numpy as np


def defer_weight_transposes(model) -> int:
    """Replace each ``Transpose`` of an initializer used by nothing else with a lazily transposed initializer
    (``model``: an ``onnx_ir.Model``, changed in place); returns how many were replaced."""
    import onnx_ir as ir

    graph = model.graph
    replaced = 0
    for node in list(graph):
        if node.op_type != "Transpose" or node.domain not in ("", "ai.onnx"):
            continue
        source = node.inputs[0]
        weight = source.const_value if source is not None and source.is_initializer() else None
        output = node.outputs[0]
        if weight is None or len(source.uses()) != 1 or source.is_graph_output() or output.is_graph_output():
            continue
        attribute = node.attributes.get("perm")
        perm = tuple(attribute.as_ints()) if attribute is not None else tuple(reversed(range(len(weight.shape))))
        lazy = ir.LazyTensor(
            lambda weight=weight, perm=perm: ir.tensor(np.ascontiguousarray(weight.numpy().transpose(perm))),
            dtype=weight.dtype,
            shape=ir.Shape([weight.shape[axis] for axis in perm]),
            name=f"{source.name}.T",  # after the weight, so later passes can tell whose it is (export/quantize.py)
        )
        folded = ir.Value(name=lazy.name, shape=lazy.shape, type=ir.TensorType(weight.dtype), const_value=lazy)
        output.replace_all_uses_with(folded)
        graph.remove(node, safe=True)
        del graph.initializers[source.name]
        graph.register_initializer(folded)
        replaced += 1
    return replaced
