"""The target registry: each target is a list of builders run in order, like a pass list.

A builder is ``build(context: BuildContext, bundle: Path | None) -> TargetSection``: it writes its files into
the staged bundle directory (None for in-process targets) and returns its typed part of the manifest. Builders
live one per module under ``clse_fx/export/`` and are imported only when their target is built, so this
registry (and the CLI that lists it) stays free of heavy imports.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field

from clse_fx.deploy.manifest import KV_IN_GRAPH, KV_RUNTIME


@dataclass
class TargetSection:
    """A target builder's part of the manifest: the graph files it wrote (name -> file, signature), the graphs
    the runtime runs before the prefill (in order), its parity figures and the seconds of each of its phases.
    ``module`` is an in-process result (the torch-compile target's); it is not written."""

    graphs: dict[str, dict] = field(default_factory=dict)
    pipeline: list[str] = field(default_factory=list)
    parity: dict[str, float | bool] = field(default_factory=dict)
    tensorrt_readiness: dict[str, list[str]] | None = None
    opset: int | None = None
    quantization: dict | None = None  # what --weight-format did (clse_fx.export.quantize.quantize_bundle)
    kv_cache_update: str | None = None  # the decode graph's protocol (manifest runtime.kv_cache_update)
    module: object | None = None


@dataclass(frozen=True)
class Target:
    builders: tuple[str, ...]  # modules under clse_fx.export, each with a ``build`` function
    writes_bundle: bool = True
    summary: str = ""
    device: str | None = None  # where the model must be traced (None: where it is)
    runtime: str = "onnxruntime"  # what runs the bundle: "onnxruntime" (Engine, Triton) or "torch" (libtorch)
    # Who writes each decode step's new key/value into the KV buffers (manifest runtime.kv_cache_update): the
    # decode graph itself through ONNX Runtime's GroupQueryAttention (KV_IN_GRAPH), or the runtime.
    kv_cache_update: str = KV_RUNTIME


TARGETS: dict[str, Target] = {
    "onnxruntime": Target(
        ("onnxruntime",),
        summary="ONNX bundle (prefill + decode) for ONNX Runtime on the CPU",
        kv_cache_update=KV_IN_GRAPH,
    ),
    # Its decode step stays portable: ONNX Runtime's CUDA GroupQueryAttention has float16/bfloat16 kernels only
    # (a float32 graph would run it on the CPU provider, copying across the bus in every layer) and the TensorRT
    # provider it prefers cannot import contrib ops.
    "onnxruntime-gpu": Target(
        ("onnxruntime",), summary="the same bundle; loading prefers the TensorRT and CUDA execution providers"
    ),
    "tensorrt": Target(
        ("onnxruntime", "tensorrt"), summary="the bundle plus a torch-tensorrt prefill engine", device="cuda"
    ),
    "aot-inductor": Target(
        ("aot_inductor",), summary="AOTInductor packages prefill.pt2 and decode.pt2, run with libtorch", runtime="torch"
    ),
    "torch-compile": Target(
        ("torch_compile",), writes_bundle=False, summary="Inductor-compiled prefill and decode", runtime="torch"
    ),
}


def builders(target: str) -> list[Callable]:
    """The ``build`` functions of ``target``, in order, after each builder module's ``require()`` (if it has
    one) has checked that what it needs is installed."""
    modules = [importlib.import_module(f"clse_fx.export.{name}") for name in TARGETS[target].builders]
    for module in modules:
        getattr(module, "require", lambda: None)()
    return [module.build for module in modules]
