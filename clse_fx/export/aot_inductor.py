"""The aot-inductor target: the pruned prefill and the decode step as AOTInductor packages (``prefill.pt2``,
``decode.pt2``), compiled ahead of time for the device they were traced on and loadable with libtorch alone
(no model code, no transformers); the runtime runs them through :class:`clse_fx.deploy.aoti.AotiSession`."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from clse_fx.decode import decode_example, export_decode
from clse_fx.deploy.aoti import AotiSession
from clse_fx.deploy.manifest import DECODE_STEP_INPUTS, decode_names
from clse_fx.deploy.session import as_array
from clse_fx.export.onnxruntime import input_names, output_names
from clse_fx.export.targets import TargetSection
from clse_fx.models import deploy_recipe_for

if TYPE_CHECKING:
    from clse_fx.api import BuildContext


def require() -> None:
    """AOTInductor compiles C++: a one-line error when no compiler is on the PATH."""
    if not any(shutil.which(name) for name in ("c++", "g++", "clang++")):
        raise RuntimeError("--target aot-inductor compiles C++ and needs a C++ compiler on the PATH (e.g. g++)")


def signature(names: list[str], tensors: list[torch.Tensor], dynamic: dict[str, dict[int, str]] | None = None):
    """Names, dtypes and shapes (a dynamic dim by its name) in the manifest's graph-signature format."""
    dynamic = dynamic or {}
    return [
        {
            "name": name,
            "dtype": str(tensor.dtype).removeprefix("torch."),
            "shape": [dynamic.get(name, {}).get(dim, size) for dim, size in enumerate(tensor.shape)],
        }
        for name, tensor in zip(names, tensors)
    ]


def build(context: BuildContext, bundle: Path) -> TargetSection:
    """Compile ``prefill.pt2`` and ``decode.pt2`` and measure both packages against the PyTorch programs."""
    model, pruned = context.model, context.pruned
    if deploy_recipe_for(model).input_graphs(context.inputs):
        raise ValueError(
            f"the aot-inductor target packages the prefill and decode only; {type(model).__name__} also needs "
            "its input graphs (vision tower, M-RoPE index): use --target onnxruntime"
        )
    out = context.program_output()
    step_args = decode_example(out.cache)
    names_in, names_out = decode_names(len(out.cache))
    with context.phase("AOTInductor packages", "aot_inductor"):
        decode_program = export_decode(model, out.cache)
        for program, name in ((pruned.program, "prefill"), (decode_program, "decode")):
            torch._inductor.aoti_compile_and_package(program, package_path=str(bundle / f"{name}.pt2"))
    with torch.no_grad():
        decode_out = decode_program.module()(*step_args)
    # Each layer's KV buffer capacity is its own dynamic dimension (key and value share it).
    past = {name: {2: f"capacity_{i // 2}"} for i, name in enumerate(names_in[len(DECODE_STEP_INPUTS) :])}
    graphs = {
        "prefill": {
            "file": "prefill.pt2",
            "inputs": signature(input_names(pruned), list(pruned.example_args)),
            "outputs": signature(output_names(pruned), out.to_flat()),
        },
        "decode": {
            "file": "decode.pt2",
            "inputs": signature(names_in, list(step_args), past),
            "outputs": signature(names_out, list(decode_out)),
        },
    }
    device = pruned.example_args[0].device.type
    with context.phase("AOTInductor parity", "aot_inductor"):
        prefill = AotiSession(bundle / "prefill.pt2", graphs["prefill"], device)
        engine = prefill.run(**dict(zip(input_names(pruned), pruned.example_args)))
        decode = AotiSession(bundle / "decode.pt2", graphs["decode"], device)
        decode_engine = decode.run(**dict(zip(names_in, step_args)))
    parity = {
        "aot_inductor_max_abs_logits": float(np.abs(engine[0] - as_array(out.logits)).max()),
        "aot_inductor_indices_identical": all(
            np.array_equal(a, b.cpu().numpy())
            for a, b in zip(engine[1 : 2 + len(out.kept)], [out.positions, *out.kept])
        ),
        "aot_inductor_decode_max_abs": max(
            float(np.abs(e - as_array(t)).max()) for e, t in zip(decode_engine, decode_out)
        ),
    }
    return TargetSection(graphs=graphs, parity=parity)
