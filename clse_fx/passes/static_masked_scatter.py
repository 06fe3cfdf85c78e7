"""Replace ``aten.masked_scatter`` (how MLLMs place image features) by a static-shape equivalent."""

from __future__ import annotations

import torch
from torch import fx

from clse_fx.passes.ops import masked_scatter_static
from clse_fx.passes.settings import PassSettings


def static_masked_scatter(gm: fx.GraphModule, settings: PassSettings) -> fx.GraphModule:
    """masked_scatter exports to NonZero + ScatterND (data-dependent shapes); rewrite it to CumSum + Gather + Where."""
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is torch.ops.aten.masked_scatter.default:
            node.target = masked_scatter_static
    gm.recompile()
    return gm
