"""The torch.compile target: the pruned prefill as an Inductor-compiled module, for PyTorch users."""

from __future__ import annotations

from collections.abc import Callable

import torch

from clse_fx.compiler import PrefillOutputs, PrunedPrefill


class CompiledPrefill:
    """The pruned program compiled by torch.compile (Inductor by default); returns :class:`PrefillOutputs`.

    Pruning is already in the graph (the same passes as every other target); torch.compile only fuses and
    generates kernels, so outputs match the exported program up to kernel rounding.
    """

    def __init__(self, pruned: PrunedPrefill, backend: str = "inductor") -> None:
        self.pruned = pruned
        self.module: Callable = torch.compile(pruned.program.module(), backend=backend, fullgraph=True, dynamic=False)

    def __call__(self, *args: torch.Tensor) -> PrefillOutputs:
        with torch.no_grad():
            flat = self.module(*(args or self.pruned.example_args))
        return PrefillOutputs.from_flat(flat, len(self.pruned.settings.stages))
