"""Insert a CLSE stage (score, top-K, sorted gather) before each planned decoder layer."""

from __future__ import annotations

import operator

import torch
from torch import fx

from clse_fx.passes.gather_crossing import SequenceInfo, gather_crossing_values
from clse_fx.passes.layer_boundaries import attention_node, final_norm_weight, layer_input, layer_nodes
from clse_fx.passes.ops import clse_stage, place_merged, sequence_positions
from clse_fx.passes.settings import PassSettings


def _placeholder(graph: fx.Graph, name: str) -> fx.Node:
    return next(n for n in graph.nodes if n.op == "placeholder" and n.name == name)


def insert_clse_stages(gm: fx.GraphModule, settings: PassSettings) -> fx.GraphModule:
    """Cut the graph before each stage layer K: score the visual tokens from layer K-1's q/k and the spectral
    evolution since the reference layer, keep the top K, and gather everything that flows past the cut.

    The graph gains outputs after the logits: the final original positions [B, S'] and each stage's kept
    visual ids [B, keep].
    """
    graph = gm.graph
    input_ids = _placeholder(graph, "input_ids")
    batch_symbol, seq_symbol = (size.node.expr for size in input_ids.meta["val"].shape)
    info = SequenceInfo(graph, batch_symbol, seq_symbol)
    layers = layer_nodes(graph, settings.layers_path)
    hidden_ref = layer_input(layers[0])

    first = next(n for n in graph.nodes if n.op in ("call_function", "call_method", "call_module"))
    with graph.inserting_before(first):
        positions = graph.call_function(sequence_positions, (input_ids,))
    kept: fx.Node | None = None
    kept_outputs: list[fx.Node] = []
    sizes: fx.Node | None = None  # merged-token sizes, carried from stage to stage (merge="tome")
    norm = final_norm_weight(graph, settings.layers_path) if settings.prune.score == "dart" else None
    for spec in settings.stages:
        cut = layers[spec.layer][0]
        query = key = mask = scale = None  # a stage before layer 0 has no layer K-1 (scores that need none)
        if spec.layer > 0:
            sdpa = attention_node(layers[spec.layer - 1])
            query, key, _value = sdpa.args[:3]
            mask = sdpa.args[3] if len(sdpa.args) > 3 else sdpa.kwargs.get("attn_mask")
            scale = sdpa.kwargs.get("scale")
        hidden = layer_input(layers[spec.layer])
        reference = hidden_ref if spec.index == 0 else None
        with graph.inserting_before(cut):
            norm_weight = None if norm is None else graph.get_attr(norm.target)
            args = (input_ids, positions, hidden, reference, query, key, mask, kept, sizes, norm_weight)
            stage = graph.call_function(clse_stage, args, {"spec": spec._replace(scale=scale)})
            index, positions, kept, *merge_outputs = (
                graph.call_function(operator.getitem, (stage, i)) for i in range(5 if spec.merge == "tome" else 3)
            )
            kept_outputs.append(kept)
            new_length = graph.call_function(torch.ops.aten.sym_size.int, (index, 1))
        gathered = gather_crossing_values(graph, cut, index, new_length, info)
        inserted = [stage, index, positions, kept, *merge_outputs, new_length, *gathered.values()]
        inserted += [norm_weight] if norm_weight is not None else []
        if merge_outputs:
            sizes, merged = merge_outputs
            # The residual stream past the cut carries the merged visual tokens instead of the kept ones.
            pruned_hidden = gathered[hidden]
            with graph.inserting_after(pruned_hidden):
                placed = graph.call_function(
                    place_merged, (pruned_hidden, input_ids, positions, merged, settings.token_ids)
                )
            pruned_hidden.replace_all_uses_with(placed, delete_user_cb=lambda user, placed=placed: user is not placed)
            inserted.append(placed)
        name = f"clse.stage{spec.index}.before_layer{spec.layer}"
        for node in inserted:
            node.meta["nn_module_stack"] = {f"clse_stage_{spec.index}": (name, "clse_fx.clse_stage")}

    output = graph.output_node()
    (results,) = output.args
    results = results if isinstance(results, (tuple, list)) else (results,)
    output.args = (tuple(results) + (positions, *kept_outputs),)
    graph.lint()
    gm.recompile()
    return gm
