"""The torch.compile target: the pruned prefill as an Inductor-compiled module, for PyTorch users."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from clse_fx.compiler import PrefillOutputs, PrunedPrefill
from clse_fx.export.manifest import TargetSection

if TYPE_CHECKING:
    from clse_fx.api import BuildContext


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


def build(context: BuildContext, bundle: Path | None) -> TargetSection:
    """Compile the pruned prefill with Inductor in process and measure it against the reference pruner."""
    with context.phase("torch.compile (Inductor)", "torch_compile"):
        module = CompiledPrefill(context.pruned)
        logits = module().logits
        error = float((logits - context.reference_output().logits).abs().max())
    return TargetSection(parity={"torch_compile_max_abs_logits": error}, module=module)
