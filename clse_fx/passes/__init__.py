"""FX passes, one concern per file, each ``(GraphModule, settings) -> GraphModule``, run as a pass list."""

from __future__ import annotations

from collections.abc import Callable

from torch import fx

from clse_fx.passes.dump_graph import dump_graph
from clse_fx.passes.expose_kv_cache import expose_kv_cache
from clse_fx.passes.expose_row_validity import expose_row_validity
from clse_fx.passes.insert_clse_stages import insert_clse_stages
from clse_fx.passes.settings import PassSettings
from clse_fx.passes.static_masked_scatter import static_masked_scatter
from clse_fx.passes.strip_asserts import strip_asserts

Pass = Callable[[fx.GraphModule, PassSettings], fx.GraphModule]

PRUNING_PASSES: list[Pass] = [
    strip_asserts,
    static_masked_scatter,
    insert_clse_stages,
    expose_kv_cache,
    expose_row_validity,
]


def run_passes(gm: fx.GraphModule, settings: PassSettings, passes: list[Pass] = PRUNING_PASSES) -> fx.GraphModule:
    """Apply ``passes`` in order; with ``settings.dump_graph`` set, dump the graph before and after each."""
    for apply in passes:
        if settings.dump_graph:
            dump_graph(gm, settings.dump_graph, f"before {apply.__name__}")
        gm = apply(gm, settings)
    if settings.dump_graph:
        dump_graph(gm, settings.dump_graph, "after all passes")
    return gm


__all__ = ["PRUNING_PASSES", "PassSettings", "run_passes"]
