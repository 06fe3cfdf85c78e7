"""Trace an unmodified transformers MLLM's prefill into an FX GraphModule with torch.export."""

from __future__ import annotations

import copy
import weakref

import torch
import torch.fx.traceback as fx_traceback
from torch import fx, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from clse_fx.models import adapter_for


class PrefillModule(nn.Module):
    """The prefill call as positional tensors -> logits: (input_ids, attention_mask, *the adapter's extra
    graph inputs present in this compile), the signature every exported graph shares. ``constants`` are
    keyword arguments traced as Python values (``ModelAdapter.graph_constants``)."""

    def __init__(
        self, model: nn.Module, extra_names: tuple[str, ...] = ("pixel_values",), constants: dict | None = None
    ) -> None:
        super().__init__()
        self.model = model
        self.extra_names = extra_names
        self.constants = constants or {}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *extra: torch.Tensor) -> torch.Tensor:
        named = dict(zip(self.extra_names, extra))
        return adapter_for(self.model).prefill_logits(input_ids, attention_mask, **named, **self.constants)


def graph_inputs(model: nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Processor-style ``inputs`` -> the named graph inputs, in graph order."""
    adapter = adapter_for(model)
    prepared = adapter.prepare_graph_inputs(inputs)
    named = {"input_ids": inputs["input_ids"]}
    named["attention_mask"] = inputs.get("attention_mask")
    if named["attention_mask"] is None:
        named["attention_mask"] = torch.ones_like(inputs["input_ids"])
    named.update({name: prepared[name] for name in adapter.graph_inputs if prepared.get(name) is not None})
    return named


def example_args(model: nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """The positional arguments of :class:`PrefillModule` for a processor-style input dict."""
    return tuple(graph_inputs(model, inputs).values())


# model -> (its weights key, {input geometry: traced graph}); entries go with their model.
_TRACES: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, dict]] = weakref.WeakKeyDictionary()


def _geometry_key(named: dict[str, torch.Tensor]) -> tuple:
    return tuple((name, tuple(t.shape), t.dtype, t.device.type) for name, t in named.items())


def weights_key(model: nn.Module) -> tuple:
    """Changes whenever a parameter or buffer is replaced or modified in place (its autograd version counter),
    so caches of what was traced or exported from ``model`` never serve stale weights."""
    return tuple((id(t), t._version) for t in (*model.parameters(), *model.buffers()))


def trace_prefill(model: nn.Module, inputs: dict[str, torch.Tensor]) -> fx.GraphModule:
    """The prefill exported with batch and sequence dynamic, as an unlifted graph with plain codegen; a fresh
    copy of the graph on every call, so passes may rewrite it.

    Tracing costs seconds to minutes and does not depend on the prune config or on input values, so it runs
    once per model, weights and input geometry (names, shapes, dtypes, device of the graph inputs); the
    copies share the model's parameters. Dynamic dims give every batch- and sequence-sized dimension a symbol
    of its own, which the passes use to find what to gather and which shape arguments to re-bind. Plain
    codegen drops the pytree output spec so passes may add outputs.
    """
    named = graph_inputs(model, inputs)
    constants = adapter_for(model).graph_constants(inputs)
    weights = weights_key(model)
    if model not in _TRACES or _TRACES[model][0] != weights:
        _TRACES[model] = (weights, {})  # traces of other weights are stale for good
    traces = _TRACES[model][1]
    key = (_geometry_key(named), repr(constants))
    if key not in traces:
        traces[key] = _export_dynamic(model, named, constants)
    traced = traces[key]
    return fx.GraphModule(traced, copy.deepcopy(traced.graph))


def _export_dynamic(model: nn.Module, named: dict[str, torch.Tensor], constants: dict) -> fx.GraphModule:
    adapter = adapter_for(model)
    dims = {"batch": torch.export.Dim("batch", min=1, max=4096), "seq": torch.export.Dim("seq", min=2, max=1 << 20)}
    extra = tuple(named)[2:]
    layouts = [adapter.graph_input_dims(name) for name in extra]
    # *extra is one varargs tuple for torch.export's dynamic_shapes.
    extra_dims = tuple({dim: dims[kind] for dim, kind in layout.items()} if layout else None for layout in layouts)
    dynamic = ({0: dims["batch"], 1: dims["seq"]},) * 2 + ((extra_dims,) if extra else ())
    # Size-oblivious reasoning keeps a batch of 1 symbolic instead of specialising it (0/1 specialisation). The
    # math-only SDPA context keeps the backend selectors out of the trace: torch 2.11's (CPU, and CUDA in half
    # precision) test `attn_mask.size(0) == 1` with a plain guard (sdp::check_attn_mask_shape), which fixes the
    # batch to 1 or to not-1 and fails the export. The graph records the backend-neutral SDPA op either way; the
    # runtime still picks the fused kernel.
    with (
        torch.no_grad(),
        torch.fx.experimental._config.patch(backed_size_oblivious=True),
        sdpa_kernel([SDPBackend.MATH]),
    ):
        module = PrefillModule(model, extra, constants)
        program = torch.export.export(module, tuple(named.values()), dynamic_shapes=dynamic, strict=False)
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
        program = torch.export.export(_Replay(gm), args, strict=False)
    return constants_on_device(program, args[0].device)


def constants_on_device(program: torch.export.ExportedProgram, device: torch.device) -> torch.export.ExportedProgram:
    """Store the program's tensor constants on ``device`` (in place; returns ``program``).

    torch.export records a tensor built from data inside the graph (the spectral filter's circulant matrices, a
    member list) as a CPU constant that every run copies to the device: a host-to-device copy per call, which
    also makes the program impossible to capture as a CUDA graph. On the device, that copy becomes a device-side
    one; the export's metadata assertions on the constants are updated to the new device."""
    names = program.graph_signature.inputs_to_lifted_tensor_constants
    placeholders = [n for n in program.graph.nodes if n.op == "placeholder" and n.name in names]
    for placeholder in placeholders:
        name = names[placeholder.name]
        if program.constants[name].device == device:
            continue
        program.constants[name] = program.constants[name].to(device)
        copies = [user for user in placeholder.users if user.target is torch.ops.aten.lift_fresh_copy.default]
        for node in (placeholder, *copies):
            for user in list(node.users):
                if user.target is torch.ops.aten._assert_tensor_metadata.default:
                    user.kwargs = {**user.kwargs, "device": device}
    program.graph_module.recompile()
    return program
