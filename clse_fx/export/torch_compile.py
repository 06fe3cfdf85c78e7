"""The torch.compile target: the pruned prefill and a static-KV-cache decode step compiled by Inductor (with
CUDA graphs on CUDA), and greedy generation over them, for PyTorch users."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from clse_fx.compiler import PrefillOutputs, PrunedPrefill
from clse_fx.decode import StaticDecodeStep
from clse_fx.export.targets import TargetSection
from clse_fx.models import adapter_for
from clse_fx.trace import graph_inputs

if TYPE_CHECKING:
    from clse_fx.api import BuildContext


def compile_mode(device: torch.device) -> str | None:
    """Inductor with CUDA graphs on CUDA ("reduce-overhead": launch-bound steps replay as one graph), default
    elsewhere."""
    return "reduce-overhead" if device.type == "cuda" else None


class CompiledEngine:
    """The pruned prefill and the decode step, each compiled once at fixed shapes (the compiled batch and
    geometry; KV buffers for ``max_new_tokens`` new tokens).

    Pruning is already in the graph (the same passes as every other target); torch.compile only fuses and
    generates kernels, so outputs match the exported program up to kernel rounding.
    """

    def __init__(self, model: nn.Module, pruned: PrunedPrefill, max_new_tokens: int, backend: str = "inductor"):
        self.model, self.pruned, self.max_new_tokens = model, pruned, max_new_tokens
        device = pruned.example_args[0].device
        options = dict(backend=backend, fullgraph=True, dynamic=False, mode=compile_mode(device))
        self.prefill_module = torch.compile(pruned.program.module(), **options)
        self.decode = StaticDecodeStep(model, pruned().cache, max_new_tokens)
        self.decode_module = torch.compile(self.decode, **options)

    def __call__(self, *args: torch.Tensor) -> PrefillOutputs:
        """The compiled prefill on graph inputs (default: the example inputs)."""
        with torch.no_grad():
            flat = self.prefill_module(*(args or self.pruned.example_args))
        return PrefillOutputs.from_flat(flat, len(self.pruned.settings.stages))

    def fit_to_compiled_length(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Processor output as it comes (unpadded, or padded to the batch's longest prompt): ``input_ids`` and
        ``attention_mask`` left-padded to the compiled sequence length, as every engine expects; a longer prompt or
        another batch size is a one-line error."""
        ids = inputs["input_ids"]
        batch, length = self.pruned.example_args[0].shape
        if ids.shape[0] != batch or ids.shape[1] > length:
            raise ValueError(
                f"input_ids has shape {list(ids.shape)} but this engine was compiled for {batch} prompt(s) of at "
                f"most {length} tokens; recompile with batch={ids.shape[0]} / a longer text_len, or pass the "
                f"processor padding='max_length', max_length={length}"
            )
        pad = length - ids.shape[1]
        if pad == 0:
            return inputs
        mask = inputs.get("attention_mask", torch.ones_like(ids))
        pad_id = self.model.config.text_config.pad_token_id or 0
        return {
            **inputs,
            "input_ids": torch.cat([ids.new_full((batch, pad), pad_id), ids], dim=1),
            "attention_mask": torch.cat([mask.new_zeros((batch, pad)), mask], dim=1),
        }

    @torch.no_grad()
    def generate(self, inputs: dict[str, torch.Tensor], max_new_tokens: int, stops: set[int] = frozenset()):
        """Greedy generation for processor-style ``inputs`` (the compiled batch; shorter prompts are left-padded to
        the compiled length): per row the new token ids, cut after the first stop token. Decode positions continue
        after the unpruned prompt length (plus the rope deltas under M-RoPE), as in every other runtime."""
        if not 1 <= max_new_tokens <= self.max_new_tokens:
            raise ValueError(
                f"max_new_tokens={max_new_tokens}: this engine was compiled for 1..{self.max_new_tokens}; "
                f"recompile with max_new_tokens={max_new_tokens}"
            )
        named = graph_inputs(self.model, self.fit_to_compiled_length(inputs))
        out = self(*named.values())
        self.decode.load(out.cache)
        ids, mask = named["input_ids"], named["attention_mask"]
        seq = ids.shape[1]
        pad_counts = seq - mask.sum(dim=1)
        positions = (seq + adapter_for(self.model).rope_deltas(inputs).to(ids.device))[:, None]
        token = out.logits[:, -1].argmax(dim=-1)
        generated = [token]
        for step in range(max_new_tokens - 1):
            step_tensor = torch.tensor(step, device=ids.device)
            logits = self.decode_module(token[:, None], positions + step, step_tensor, pad_counts)
            token = logits[:, -1].argmax(dim=-1)
            generated.append(token)
        rows = []
        for row in torch.stack(generated, dim=1).tolist():
            cut = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
            rows.append(row[:cut])
        return rows


def build(context: BuildContext, bundle: Path | None) -> TargetSection:
    """Compile prefill and decode in process and measure the prefill against the reference pruner."""
    with context.phase("torch.compile (Inductor)", "torch_compile"):
        engine = CompiledEngine(context.model, context.pruned, context.options.max_new_tokens)
        logits = engine().logits
        error = float((logits - context.reference_output().logits[:, -1:]).abs().max())
    return TargetSection(parity={"torch_compile_max_abs_logits": error}, module=engine)
