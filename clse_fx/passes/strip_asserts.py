"""Remove runtime assertions and guards that block ONNX export (transformers' input checks among them)."""

from __future__ import annotations

import torch
from torch import fx

from clse_fx.passes.settings import PassSettings

_ASSERT_TARGETS = {
    torch.ops.aten._assert_tensor_metadata.default,
    torch.ops.aten._assert_scalar.default,
    torch.ops.aten._assert_async.default,
    torch.ops.aten._assert_async.msg,
    torch.ops.aten.sym_constrain_range_for_size.default,
    torch.ops.aten._functional_assert_async.msg,
}


def strip_asserts(gm: fx.GraphModule, settings: PassSettings) -> fx.GraphModule:
    """Drop assert/guard nodes, then whatever only fed them (e.g. ``aten._is_all_true``)."""
    return remove_asserts(gm)


def remove_asserts(gm: fx.GraphModule) -> fx.GraphModule:
    """The body of :func:`strip_asserts`, for graphs that get no pass settings (the unpruned FLOP count)."""
    for node in list(gm.graph.nodes):
        is_guard = node.op == "call_module" and node.target == "_guards_fn"
        if is_guard or (node.op == "call_function" and node.target in _ASSERT_TARGETS):
            gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    for name, _ in list(gm.named_children()):
        if name == "_guards_fn":
            delattr(gm, name)
    gm.recompile()
    return gm
