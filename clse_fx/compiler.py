"""Trace -> passes -> static re-export: the pruned prefill program for one input geometry."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from clse_fx.deploy.manifest import split_prefill_outputs
from clse_fx.models import adapter_for
from clse_fx.passes import PassSettings, run_passes
from clse_fx.plan import PruneConfig
from clse_fx.trace import export_static, graph_inputs, trace_prefill


@dataclass
class PrefillOutputs:
    """The pruned prefill's results, named (the graph returns them flat, in the order of
    ``deploy.manifest.prefill_output_names``)."""

    logits: torch.Tensor  # [B, S', V]
    positions: torch.Tensor  # [B, S'] original positions of the kept tokens
    kept: list[torch.Tensor]  # per stage [B, keep] kept visual ids
    cache: list[tuple[torch.Tensor, torch.Tensor]]  # per layer (key, value) [B, Hkv, S_i, D]
    valid: torch.Tensor  # [B] bool: rows the graph was built for

    def cpu(self) -> PrefillOutputs:
        return PrefillOutputs(
            self.logits.cpu(),
            self.positions.cpu(),
            [k.cpu() for k in self.kept],
            [(k.cpu(), v.cpu()) for k, v in self.cache],
            self.valid.cpu(),
        )

    def to_flat(self) -> list[torch.Tensor]:
        """The graph's flat output order (the inverse of :meth:`from_flat`)."""
        return [self.logits, self.positions, *self.kept, *(t for pair in self.cache for t in pair), self.valid]

    @classmethod
    def from_flat(cls, flat, num_stages: int) -> PrefillOutputs:
        logits, positions, kept, kv, valid = split_prefill_outputs(flat, num_stages)
        return cls(logits, positions, kept, [(kv[i], kv[i + 1]) for i in range(0, len(kv), 2)], valid)


@dataclass
class PrunedPrefill:
    """A statically shaped, pruned prefill program (flat outputs, see :class:`PrefillOutputs`)."""

    program: torch.export.ExportedProgram
    settings: PassSettings
    example_args: tuple[torch.Tensor, ...]
    input_names: tuple[str, ...] = ("input_ids", "attention_mask", "pixel_values")

    def flat(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Run on ``args`` (default: the example inputs) and return the graph's flat outputs."""
        with torch.no_grad():
            return tuple(self.program.module()(*(args or self.example_args)))

    def __call__(self, *args: torch.Tensor) -> PrefillOutputs:
        return PrefillOutputs.from_flat(self.flat(*args), len(self.settings.stages))


def pass_settings(
    model: nn.Module, prune: PruneConfig, inputs: dict[str, torch.Tensor], dump_graph: str | None = None
) -> PassSettings:
    """The :class:`PassSettings` for ``model`` on prompts like ``inputs`` (processor outputs; the input ids
    must be readable, and families with variable grids read theirs, e.g. ``image_grid_thw``)."""
    adapter = adapter_for(model)
    layout = adapter.prompt_layout(inputs)
    token_ids = adapter.visual_token_ids()
    return PassSettings(
        prune=prune,
        layers_path=adapter.layers_path,
        token_ids=token_ids,
        layout=layout,
        stages=prune.stage_specs(layout, token_ids) if layout else (),  # no image: left unpruned
        dump_graph=dump_graph,
    )


def prune_prefill(
    model: nn.Module,
    prune: PruneConfig,
    inputs: dict[str, torch.Tensor],
    dump_graph: str | None = None,
    settings: PassSettings | None = None,
) -> PrunedPrefill:
    """Trace ``model``'s prefill, run the pruning passes and re-export at the shapes of ``inputs``.

    ``settings`` defaults to :func:`pass_settings` on ``inputs``; pass them for weightless (meta-device)
    models, whose input ids cannot be read.
    """
    settings = settings or pass_settings(model, prune, inputs, dump_graph)
    gm = run_passes(trace_prefill(model, inputs), settings)
    named = graph_inputs(model, inputs)
    args = tuple(named.values())
    return PrunedPrefill(
        program=export_static(gm, args), settings=settings, example_args=args, input_names=tuple(named)
    )
