"""Find decoder-layer boundaries in a traced graph from its ``nn_module_stack`` metadata."""

from __future__ import annotations

import re

import torch
from torch import fx


def module_path(node: fx.Node) -> str:
    """The innermost module path a node was traced in ("" outside any module)."""
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else ""


def layer_nodes(graph: fx.Graph, layers_path: str) -> dict[int, list[fx.Node]]:
    """Nodes of each decoder layer under ``layers_path`` (e.g. "model.language_model.layers"), in graph order."""
    pattern = re.compile(rf"(?:^|\.){re.escape(layers_path)}\.(\d+)(?:\.|$)")
    layers: dict[int, list[fx.Node]] = {}
    for node in graph.nodes:
        match = pattern.search(module_path(node))
        if match:
            layers.setdefault(int(match.group(1)), []).append(node)
    if not layers:
        raise ValueError(f"no decoder layers under {layers_path!r} found in the traced graph")
    return dict(sorted(layers.items()))


def layer_input(nodes: list[fx.Node]) -> fx.Node:
    """The residual-stream input of a decoder layer: the first value its first node reads from outside it."""
    inside = set(nodes)
    for node in nodes:
        for arg in node.all_input_nodes:
            if arg not in inside and isinstance(arg.meta.get("val"), torch.Tensor) and arg.meta["val"].dim() == 3:
                return arg
    raise ValueError(f"cannot find the hidden-state input of the layer starting at {nodes[0].name}")


def attention_node(nodes: list[fx.Node]) -> fx.Node:
    """The layer's self-attention ``scaled_dot_product_attention`` node (q, k, mask are read from it)."""
    sdpa = [n for n in nodes if n.target is torch.ops.aten.scaled_dot_product_attention.default]
    if len(sdpa) != 1:
        raise ValueError(
            f"expected one scaled_dot_product_attention in the layer at {nodes[0].name}, found {len(sdpa)}; "
            "load the model with attn_implementation='sdpa'"
        )
    return sdpa[0]


def final_norm_weight(graph: fx.Graph, layers_path: str) -> fx.Node | None:
    """The ``get_attr`` node of the weight of the norm after the decoder layers (``<decoder>.norm``), if any."""
    norm_path = layers_path.rpartition(".")[0] + ".norm"
    for node in graph.nodes:
        if module_path(node).endswith(norm_path):
            weights = [arg for arg in node.all_input_nodes if arg.op == "get_attr"]
            if weights:
                return weights[0]
    return None
