"""Write ``x * Reciprocal(Sqrt(v))`` as ``Div(x, Sqrt(v))`` so ONNX Runtime fuses every RMSNorm.

transformers' RMSNorm multiplies by ``torch.rsqrt(variance + eps)``, which the ONNX exporter lowers to
``Reciprocal(Sqrt(...))``; ONNX Runtime's SimplifiedLayerNormFusion (a session-level graph optimization) knows the
``Pow, ReduceMean, Add, Sqrt, Div, Mul`` form only. In the division form each norm becomes one
SimplifiedLayerNormalization node when a session loads the graph (a 1/8-width LLaVA-1.5 decode step: 2133 -> 1743
nodes, 14.9 -> 11.6 ms per step in int8 on 2 cores), while the file keeps standard ONNX ops (TensorRT reads it).
"""

from __future__ import annotations


def rsqrt_as_division(model) -> int:
    """Rewrite ``model`` (an ``onnx_ir.Model``, in place); returns how many products became divisions."""
    import onnx_ir as ir

    graph = model.graph
    rewritten = 0
    for node in list(graph):
        root = node.inputs[0].producer() if node.op_type == "Reciprocal" else None
        if root is None or root.op_type != "Sqrt":
            continue
        inverse = node.outputs[0]
        for use in list(inverse.uses()):
            product = use.node
            if product.op_type != "Mul" or product.inputs[0] is product.inputs[1]:
                continue
            division = ir.Node("", "Div", [product.inputs[1 - use.idx], node.inputs[0]], name=f"{product.name}_div")
            graph.insert_before(product, division)
            output = product.outputs[0]
            name, shape, element = output.name, output.shape, output.type
            output.replace_all_uses_with(division.outputs[0], replace_graph_outputs=True)
            graph.remove(product, safe=True)
            division.outputs[0].name, division.outputs[0].shape, division.outputs[0].type = name, shape, element
            rewritten += 1
        if not inverse.uses() and not inverse.is_graph_output():
            graph.remove(node, safe=True)
    return rewritten
