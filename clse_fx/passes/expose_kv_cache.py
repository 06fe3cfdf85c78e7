"""Return each decoder layer's post-prefill KV cache from the graph, under the compile-time KV policy."""

from __future__ import annotations

import torch
from torch import fx

from clse_fx.passes.layer_boundaries import attention_node, layer_nodes
from clse_fx.passes.ops import gather_sequence, stage_nodes
from clse_fx.passes.settings import PassSettings

# Ops between a layer's rotated keys and SDPA that only repeat KV heads for GQA (transformers' repeat_kv).
_REPEAT_OPS = {
    torch.ops.aten.reshape.default,
    torch.ops.aten.expand.default,
    torch.ops.aten.unsqueeze.default,
    torch.ops.aten.view.default,
}


def _before_head_repeat(node: fx.Node) -> fx.Node:
    while node.op == "call_function" and node.target in _REPEAT_OPS:
        node = node.args[0]
    return node


def compose_index(outer: torch.Tensor, inner: torch.Tensor) -> torch.Tensor:
    """outer[b, inner[b, t]]: map indices into a later sequence through an earlier stage's index."""
    return outer.gather(1, inner)


def expose_kv_cache(gm: fx.GraphModule, settings: PassSettings) -> fx.GraphModule:
    """Append (key, value) [B, Hkv, S_i, D] of every layer to the outputs, keys after RoPE and before GQA repeat.

    ``uniform`` re-indexes every earlier layer's cache to the final kept set (as the LLaVA reference does);
    ``per-layer`` keeps what each layer computed on. Reads the stages ``insert_clse_stages`` put in the graph.
    """
    graph = gm.graph
    stage_index = {spec.layer: index for spec, index in stage_nodes(graph)}
    output = graph.output_node()
    uniform = settings.prune.kv_policy == "uniform"
    # to_final[j]: indices of the final tokens within the sequence of segment j (layers after j stages).
    to_final: list[fx.Node | None] = [None]
    with graph.inserting_before(output):
        for index in reversed(list(stage_index.values())):
            inner = to_final[0]
            to_final.insert(0, index if inner is None else graph.call_function(compose_index, (index, inner)))
    caches: list[fx.Node] = []
    for layer, nodes in layer_nodes(graph, settings.layers_path).items():
        sdpa = attention_node(nodes)
        segment = sum(1 for stage_layer in stage_index if stage_layer <= layer)
        for tensor in (sdpa.args[1], sdpa.args[2]):
            cache = _before_head_repeat(tensor)
            if uniform and to_final[segment] is not None:
                with graph.inserting_before(output):
                    cache = graph.call_function(gather_sequence, (cache, to_final[segment], 0, (2,)))
            caches.append(cache)
    (results,) = output.args
    output.args = (tuple(results) + tuple(caches),)
    graph.lint()
    gm.recompile()
    return gm
