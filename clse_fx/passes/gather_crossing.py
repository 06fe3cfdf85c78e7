"""Gather every sequence-indexed value that crosses a cut, and re-bind sequence lengths after it."""

from __future__ import annotations

import torch
from torch import fx

from clse_fx.passes.ops import gather_sequence


class SequenceInfo:
    """Which dims of each node are batch and sequence dims, from the symbols of the traced shapes."""

    def __init__(self, graph: fx.Graph, batch_symbol, seq_symbol) -> None:
        self.seq_symbol = seq_symbol
        self.dims: dict[fx.Node, tuple[int | None, tuple[int, ...]]] = {}
        self.lengths: set[fx.Node] = set()  # SymInt nodes holding the current sequence length
        for node in graph.nodes:
            val = node.meta.get("val")
            if isinstance(val, torch.SymInt) and val.node.expr == seq_symbol:
                self.lengths.add(node)
            elif isinstance(val, torch.Tensor):
                exprs = [getattr(size, "node", None) and size.node.expr for size in val.shape]
                seq_dims = tuple(i for i, e in enumerate(exprs) if e == seq_symbol)
                if seq_dims:
                    batch_dims = [i for i, e in enumerate(exprs) if e == batch_symbol]
                    if batch_dims:
                        batch_dim = batch_dims[0]
                    elif seq_dims[0] > 0 and val.shape[seq_dims[0] - 1] == 1:
                        batch_dim = seq_dims[0] - 1  # broadcast over the batch (e.g. RoPE tables)
                    else:
                        batch_dim = None
                    self.dims[node] = (batch_dim, seq_dims)

    def depends_on_length(self, node: fx.Node) -> bool:
        val = node.meta.get("val")
        return isinstance(val, torch.SymInt) and self.seq_symbol in val.node.expr.free_symbols


def gather_crossing_values(
    graph: fx.Graph, cut: fx.Node, index: fx.Node, new_length: fx.Node, info: SequenceInfo
) -> dict[fx.Node, fx.Node]:
    """Before ``cut``, gather each value that is used at or after it along its sequence dims by ``index``
    [B, S'], and point later uses of the sequence length at ``new_length``. Returns {value: its gather}."""
    order = {node: i for i, node in enumerate(graph.nodes)}
    after = order[cut]
    gathered = {}
    for node in list(graph.nodes):
        if order[node] >= after or node in (index, new_length):
            continue
        late_users = [user for user in node.users if order[user] >= after]
        if not late_users:
            continue
        if node in info.lengths:
            replacement = new_length
        elif node in info.dims:
            batch_dim, seq_dims = info.dims[node]
            with graph.inserting_before(cut):
                replacement = graph.call_function(gather_sequence, (node, index, batch_dim, seq_dims))
            info.dims[replacement] = info.dims[node]
            gathered[node] = replacement
        elif info.depends_on_length(node):
            raise NotImplementedError(
                f"{node.name} is a shape expression of the sequence length used across a pruning cut; "
                "this graph layout is not supported yet"
            )
        else:
            continue
        for user in late_users:
            user.replace_input_with(node, replacement)
    info.lengths.add(new_length)
    return gathered
