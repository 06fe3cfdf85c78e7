"""ONNX export of the pruned prefill (static shapes), validation, and an ONNX Runtime session."""

from __future__ import annotations

import logging
import warnings
import weakref
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from clse_fx.compiler import PrefillOutputs, PrunedPrefill
from clse_fx.cpu_half import float32_matmuls
from clse_fx.decode import decode_example, equal_lengths, export_decode
from clse_fx.deploy.manifest import KV_IN_GRAPH, KV_RUNTIME, decode_names, prefill_output_names
from clse_fx.deploy.onnx_graph import declared_initializers
from clse_fx.deploy.session import OnnxSession, as_array
from clse_fx.export.float32_compute import compute_in_float32
from clse_fx.export.group_query_attention import translation_table
from clse_fx.export.quantize import quantize_bundle, roles_for
from clse_fx.export.rsqrt_as_division import rsqrt_as_division
from clse_fx.export.shared_weights import share_weights
from clse_fx.export.targets import TARGETS, TargetSection
from clse_fx.export.tensorrt_check import check_tensorrt_ready
from clse_fx.export.weight_transposes import defer_weight_transposes
from clse_fx.models import adapter_for, deploy_recipe_for
from clse_fx.models.base import InputGraph
from clse_fx.resident import page_out_weights
from clse_fx.trace import graph_inputs, weights_key

if TYPE_CHECKING:
    from clse_fx.api import BuildContext

OPSET = 18
# Ops TensorRT's ONNX parser rejects or that make shapes data-dependent; the compiled graph must have none.
FORBIDDEN_OPS = {"DFT", "STFT", "NonZero", "Unique", "Loop", "If"}


def output_names(pruned: PrunedPrefill) -> list[str]:
    return prefill_output_names(len(pruned.settings.stages), pruned.settings.prune.plan.num_layers)


def input_names(pruned: PrunedPrefill) -> list[str]:
    return list(pruned.input_names)


def export_onnx(pruned: PrunedPrefill, path: str | Path, optimize: bool = True) -> Path:
    """Write the pruned prefill as a checked ONNX file with named, static-shape inputs and outputs."""
    return export_program(pruned.program, path, input_names(pruned), output_names(pruned), optimize)


def export_program(
    program: torch.export.ExportedProgram,
    path: str | Path,
    inputs: list[str],
    outputs: list[str],
    optimize: bool = True,
    translations: dict | None = None,
) -> Path:
    """Export an ExportedProgram to a checked ONNX file free of ops that engines reject. ``optimize`` runs
    onnxscript's optimizer (constant folding, rewrites): graphs about half the size, for about twice the export
    time on small models; TensorRT readiness needs it (it folds shape computations to build-time constants).
    ``translations``: torch.onnx's ``custom_translation_table`` (custom ops -> onnxscript functions)."""

    path = Path(path)
    # The exporter logs a warning per torchvision op it cannot register; torchvision is not used here.
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        onnx_program = torch.onnx.export(
            program,
            (),
            input_names=inputs,
            output_names=outputs,
            opset_version=OPSET,
            dynamo=True,
            optimize=False,
            verbose=False,
            custom_translation_table=translations,
        )
        defer_weight_transposes(onnx_program.model)  # before the optimizer, which would fold them in memory
        if optimize:
            onnx_program.optimize()
        compute_in_float32(onnx_program.model)  # after it: it would fold the weights' casts in memory
        rsqrt_as_division(onnx_program.model)
    # Weights as external data, always: the exporter then streams them to PATH.data tensor by tensor instead of
    # serialising one protobuf that holds them all (the ONNX export's peak RSS at 1/8 LLaVA-1.5 width in float16:
    # 2.49 -> 0.99 GiB), and checks and signature reads load the graph without its weights.
    onnx_program.save(str(path), external_data=True)
    return checked_onnx(path)


def checked_onnx(path: Path) -> Path:
    """Run the ONNX checker on ``path`` and reject ops that engines cannot run with static shapes."""
    import onnx

    # By path: models over protobuf's 2 GiB limit keep their weights in external data, which the checker reads
    # from disk; the op scan needs the graph only.
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path), load_external_data=False)
    bad = sorted({node.op_type for node in model.graph.node} & FORBIDDEN_OPS)
    if bad:
        raise RuntimeError(f"the exported graph has ops engines cannot run with static shapes: {', '.join(bad)}")
    return path


def export_input_graph(graph: InputGraph, inputs: dict[str, torch.Tensor], path: Path, optimize: bool = True) -> Path:
    """Export an adapter's pre-prefill graph at the shapes of ``inputs`` (see :class:`InputGraph`)."""
    args = tuple(inputs[name] for name in graph.inputs)
    if not graph.traced:
        with torch.no_grad():
            program = torch.export.export(graph.module, args, strict=False)
        return export_program(program, path, list(graph.inputs), list(graph.outputs), optimize)
    # The TorchScript exporter's constant folding fails on bfloat16 graphs (torch 2.13: "ScalarType ComplexDouble is
    # an unexpected tensor scalar type"); ONNX Runtime folds those constants when the session is built instead.
    bfloat16 = any(p.dtype == torch.bfloat16 for p in graph.module.parameters())
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # TracerWarnings: the grid-derived values are meant to be constants
        torch.onnx.export(
            graph.module,
            args,
            str(path),
            dynamo=False,
            input_names=list(graph.inputs),
            output_names=list(graph.outputs),
            opset_version=OPSET,
            do_constant_folding=not bfloat16,
        )
    import onnx_ir as ir

    model = ir.load(path)
    repaired = bfloat16_casts_repaired(model) if bfloat16 else 0
    if compute_in_float32(model) or repaired:
        ir.save(model, path)
    return checked_onnx(path)


def bfloat16_casts_repaired(model) -> int:
    """Give back their bfloat16 type to the casts the TorchScript exporter writes as complex128 (torch 2.13 writes
    torch's ScalarType number for bfloat16, 15, which is ONNX's COMPLEX128); how many. Only for graphs with no
    complex values, which the exporter's graphs of these models never have."""
    import onnx_ir as ir

    casts = [
        node
        for node in model.graph
        if node.op_type == "Cast" and node.attributes.get_int("to") == ir.DataType.COMPLEX128
    ]
    for node in casts:
        node.attributes["to"] = ir.AttrInt64("to", ir.DataType.BFLOAT16)
    return len(casts)


def graph_signature(path: str | Path) -> dict:
    """Names, element types and shapes of an ONNX file's inputs and outputs, the files its weights live in
    (relative to it) and where each weight lies in them, so deploy needs no onnx package to move a graph with its
    weights or to map them once for all its sessions."""
    import onnx

    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    # The table deploy checks against the graph, read by the same code (clse_fx.deploy.verify.graph_initializers).
    initializers = {name: item.entry() for name, item in declared_initializers(path.read_bytes(), path.name).items()}

    def describe(values):
        return [
            {
                "name": v.name,
                "dtype": onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name,
                # A dynamic dimension is recorded by its symbol's name.
                "shape": [
                    d.dim_value if d.HasField("dim_value") else d.dim_param for d in v.type.tensor_type.shape.dim
                ],
            }
            for v in values
        ]

    return {
        "inputs": describe(model.graph.input),
        "outputs": describe(model.graph.output),
        "external_data": sorted({entry["file"] for entry in initializers.values()}),
        "initializers": initializers,  # where each weight lies in them: deploy/weights.py BundleWeights
    }


def prefill_parity(engine: PrefillOutputs, torch_out: PrefillOutputs) -> dict[str, float | bool]:
    """How far an engine's prefill is from the PyTorch graph's: logits and KV, and whether indices agree."""
    caches = [t for pair in engine.cache for t in pair], [t for pair in torch_out.cache for t in pair]
    return {
        "onnxruntime_max_abs_logits": float((engine.logits - torch_out.logits).abs().max()),
        "onnxruntime_max_abs_cache": max(float((a - b).abs().max()) for a, b in zip(*caches)),
        "onnxruntime_indices_identical": torch.equal(engine.positions, torch_out.positions)
        and torch.equal(engine.valid, torch_out.valid)
        and all(torch.equal(a, b) for a, b in zip(engine.kept, torch_out.kept)),
    }


def input_graph_outputs(model, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What the pre-prefill graphs compute, as the unmodified model computes it (their oracle)."""
    return dict(graph_inputs(model, inputs), rope_deltas=adapter_for(model).rope_deltas(inputs))


def run_input_graphs(
    graphs: list[InputGraph],
    paths: dict[str, Path],
    inputs: dict[str, torch.Tensor],
    expected: dict[str, torch.Tensor],
    dtype: str = "float32",
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Run the exported pre-prefill graphs on ``inputs`` in ONNX Runtime; returns their outputs and each
    output's max abs difference from ``expected`` (:func:`input_graph_outputs`)."""
    feeds: dict = {name: tensor.cpu() for name, tensor in inputs.items()}
    produced, parity = {}, {}
    for graph in graphs:
        outputs = OnnxSession(paths[graph.name], dtype=dtype).run(**{name: feeds[name] for name in graph.inputs})
        for name, value in zip(graph.outputs, outputs):
            feeds[name] = produced[name] = value
            reference = as_array(expected[name])
            parity[f"onnxruntime_{graph.name}_{name}_max_abs"] = float(np.abs(value - reference).max())
    return produced, parity


# model -> {per-layer cache layout: (decode program, {file name: bytes} or None)}. The decode step does not
# depend on the prune config (every layer's KV buffer capacity is a dynamic dimension), so sweeps over budgets,
# scores and KV policies export it once per batch size, dtype and device. Files are kept in memory for small models
# only; larger ones keep the program and export the file again.
_DECODE_EXPORTS: weakref.WeakKeyDictionary[torch.nn.Module, dict] = weakref.WeakKeyDictionary()
DECODE_CACHE_MAX_BYTES = 256 << 20


def export_decode_onnx(
    model: torch.nn.Module,
    prefill_cache: list[tuple[torch.Tensor, torch.Tensor]],
    path: Path,
    optimize: bool = True,
    in_place: bool = False,
) -> tuple[torch.export.ExportedProgram, Path]:
    """Export the decode step for caches shaped like ``prefill_cache`` to ``path`` (checked ONNX); ``in_place``:
    the :class:`~clse_fx.decode.InPlaceDecodeStep` (GroupQueryAttention), else the portable one."""
    layout = tuple((t.shape[0], t.shape[1], t.shape[3], t.dtype, t.device) for pair in prefill_cache for t in pair)
    layout += weights_key(model) + (optimize, in_place)  # the file holds the weights: modified ones need an export
    if in_place:
        layout += (equal_lengths(prefill_cache),)  # the in-place step shares one capacity between equal layers
    exports = _DECODE_EXPORTS.setdefault(model, {})
    program, files = exports.get(layout) or (export_decode(model, prefill_cache, in_place), None)
    if files is None:
        names = decode_names(len(prefill_cache), in_place)
        export_program(program, path, *names, optimize, translation_table() if in_place else None)
        written = [f for f in path.parent.iterdir() if f.name.startswith(path.name)]  # with any external data
        small = sum(f.stat().st_size for f in written) <= DECODE_CACHE_MAX_BYTES
        exports[layout] = (program, {f.name: f.read_bytes() for f in written} if small else None)
    else:
        for name, data in files.items():
            (path.parent / name).write_bytes(data)
    return program, path


def build(context: BuildContext, bundle: Path) -> TargetSection:
    """The ONNX Runtime bundle: export the adapter's input graphs, the prefill and the decode step, check them
    against PyTorch (the prefill fed by the exported input graphs) and for TensorRT readiness."""
    model, pruned, inputs = context.model, context.pruned, context.inputs
    input_graphs = deploy_recipe_for(model).input_graphs(inputs)
    with context.phase("ONNX export and check", "onnx_export"):
        optimize = context.options.optimize_onnx
        pre_paths = {g.name: export_input_graph(g, inputs, bundle / f"{g.name}.onnx", optimize) for g in input_graphs}
        prefill_path = export_onnx(pruned, bundle / "prefill.onnx", optimize)
        device_out = context.program_output()  # on the model's device; parity is measured on the CPU
        torch_out = device_out.cpu()
        in_place = writes_kv_in_graph(context.options.target, device_out.cache)
        decode_program, decode_path = export_decode_onnx(
            model, device_out.cache, bundle / "decode.onnx", optimize, in_place
        )
        share_weights([*pre_paths.values(), prefill_path, decode_path])
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    with context.phase("ONNX Runtime sessions and parity", "session_build+run"):
        step_args = decode_example(device_out.cache)
        # PyTorch first, then its mapped weights handed back: ONNX Runtime maps the bundle's
        with torch.no_grad(), float32_matmuls(model):
            decode_torch = [as_array(t) for t in decode_program.module()(*step_args)]
            expected = input_graph_outputs(model, inputs) if pre_paths else {}
        page_out_weights(model)
        produced, parity = run_input_graphs(input_graphs, pre_paths, inputs, expected, dtype)
        feeds = dict(zip(input_names(pruned), pruned.example_args)) | produced
        engine = OnnxSession(prefill_path, dtype=dtype).run(**feeds)
        engine_out = PrefillOutputs.from_flat([torch.from_numpy(a) for a in engine], len(pruned.settings.stages))
        parity.update(prefill_parity(engine_out, torch_out))
        decode_session = OnnxSession(decode_path, dtype=dtype)
        decode_engine = decode_session.run(**dict(zip(decode_session.inputs, step_args)))
        differences = [float(np.abs(e - t).max()) for e, t in zip(decode_engine, decode_torch)]
        parity["onnxruntime_decode_max_abs"] = max(differences)
    paths = {**pre_paths, "prefill": prefill_path, "decode": decode_path}
    quantization = None
    if context.options.weight_format:  # after the exact parity above: it checks the export, not the quantization
        with context.phase(f"{context.options.weight_format} weight quantization", "quantize"):
            quantization = quantize_bundle(list(paths.values()), roles_for(model), context.options.weight_format)
    return TargetSection(
        graphs={name: {"file": path.name, **graph_signature(path)} for name, path in paths.items()},
        pipeline=list(pre_paths),
        parity=parity,
        tensorrt_readiness={name: [str(f) for f in check_tensorrt_ready(path)] for name, path in paths.items()},
        opset=OPSET,
        quantization=quantization,
        kv_cache_update=KV_IN_GRAPH if in_place else KV_RUNTIME,
    )


def writes_kv_in_graph(target: str, prefill_cache: list[tuple[torch.Tensor, torch.Tensor]]) -> bool:
    """Whether ``target``'s decode step writes the KV cache itself (GroupQueryAttention): where the target asks
    for it (the CPU target; see :data:`~clse_fx.export.targets.TARGETS` for why the others do not) and ONNX
    Runtime's CPU kernel takes the head size (a multiple of 8)."""
    return TARGETS[target].kv_cache_update == KV_IN_GRAPH and prefill_cache[0][0].shape[3] % 8 == 0
