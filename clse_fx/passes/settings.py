"""What every pass is given: the pruning config, the model family's layout and the stages to insert."""

from __future__ import annotations

from dataclasses import dataclass

from clse_fx.plan import Layout, PruneConfig, StageSpec


@dataclass(frozen=True)
class PassSettings:
    """The passes' one input besides the graph.

    ``stages`` are the plan's stage specs, or none for prompts without visual tokens (left unpruned).
    """

    prune: PruneConfig
    layers_path: str
    token_ids: tuple[int, ...]
    layout: Layout | None  # None for prompts without visual tokens
    stages: tuple[StageSpec, ...]
    dump_graph: str | None = None
