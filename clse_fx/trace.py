"""Trace an unmodified transformers MLLM's prefill into an FX GraphModule with torch.export."""

from __future__ import annotations

import torch
import torch.fx.traceback as fx_traceback
from torch import fx, nn


class PrefillModule(nn.Module):
    """The prefill call as positional tensors -> logits, the signature every exported graph shares."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor | None = None
    ) -> torch.Tensor:
        inputs = {"pixel_values": pixel_values} if pixel_values is not None else {}
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **inputs).logits


def example_args(inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """The positional arguments of :class:`PrefillModule` for a processor-style input dict."""
    args = (inputs["input_ids"], inputs.get("attention_mask", torch.ones_like(inputs["input_ids"])))
    return args + ((inputs["pixel_values"],) if inputs.get("pixel_values") is not None else ())


def trace_prefill(model: nn.Module, inputs: dict[str, torch.Tensor]) -> fx.GraphModule:
    """Export the prefill with batch and sequence dynamic; returns the unlifted graph with plain codegen.

    Dynamic dims give every batch- and sequence-sized dimension a symbol of its own, which the passes use
    to find what to gather and which shape arguments to re-bind. Plain codegen drops the pytree output
    spec so passes may add outputs.
    """
    args = example_args(inputs)
    batch = torch.export.Dim("batch", min=1, max=4096)
    seq = torch.export.Dim("seq", min=2, max=1 << 20)
    dynamic = ({0: batch, 1: seq}, {0: batch, 1: seq}) + ((None,) if len(args) == 3 else ())
    # Size-oblivious reasoning keeps a batch of 1 symbolic instead of specialising it (0/1 specialisation).
    with torch.no_grad(), torch.fx.experimental._config.patch(backed_size_oblivious=True):
        program = torch.export.export(PrefillModule(model), args, dynamic_shapes=dynamic, strict=False)
    gm = program.module()
    gm.graph._codegen = fx.graph.CodeGen()
    gm.recompile()
    return gm


class _Replay(nn.Module):
    """Runs a GraphModule node by node with its metadata current, so a re-export keeps each node's
    ``nn_module_stack``: engine nodes stay traceable to the decoder layer they came from."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__()
        self.gm = gm

    def forward(self, *args: torch.Tensor):
        with fx_traceback.preserve_node_meta():
            return fx.Interpreter(self.gm).run(*args)


def export_static(gm: fx.GraphModule, args: tuple[torch.Tensor, ...]) -> torch.export.ExportedProgram:
    """Re-export a rewritten graph at fixed shapes (the compiled budget): every size becomes a constant."""
    with torch.no_grad():
        return torch.export.export(_Replay(gm), args, strict=False)
