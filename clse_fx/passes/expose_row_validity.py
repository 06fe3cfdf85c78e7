"""Return whether each row is one the graph was built for, so engines report bad prompts instead of answering them."""

from __future__ import annotations

from torch import fx

from clse_fx.passes.settings import PassSettings
from clse_fx.plan import extra_positions, scored_count
from clse_fx.static_ops import valid_rows


def expose_row_validity(gm: fx.GraphModule, settings: PassSettings) -> fx.GraphModule:
    """Append ``valid`` [B] bool to the outputs: a left-padded 0/1 attention mask with tokens, and exactly the
    compiled number of visual placeholders, none in the padding (``static_ops.valid_rows``)."""
    graph = gm.graph
    placeholders = {node.name: node for node in graph.nodes if node.op == "placeholder"}
    layout = settings.layout
    visual = scored_count(layout) + len(extra_positions(layout)) if layout else 0
    output = graph.output_node()
    with graph.inserting_before(output):
        valid = graph.call_function(
            valid_rows, (placeholders["input_ids"], placeholders["attention_mask"], settings.token_ids, visual)
        )
    (results,) = output.args
    output.args = (tuple(results) + (valid,),)
    graph.lint()
    gm.recompile()
    return gm
