"""Write the graph's readable form to a file, for debugging a pass list (``--dump-graph``)."""

from __future__ import annotations

from pathlib import Path

from torch import fx


def dump_graph(gm: fx.GraphModule, path: str | Path, title: str) -> fx.GraphModule:
    """Append ``gm``'s code under a ``title`` header to ``path``; the graph is returned unchanged."""
    with open(path, "a") as f:
        f.write(f"# ===== {title}: {len(gm.graph.nodes)} nodes =====\n")
        f.write(gm.print_readable(print_output=False))
        f.write("\n")
    return gm
