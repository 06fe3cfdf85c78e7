"""``clse_fx.compile``: checkpoint -> pruned prefill -> verified engine bundle, with a report of each phase."""

from __future__ import annotations

import contextlib
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from clse_fx.compiler import PrunedPrefill, prune_prefill
from clse_fx.metrics import count_flops, kv_cache_bytes, kv_cache_tokens
from clse_fx.models import adapter_for, supported_architectures
from clse_fx.plan import PruneConfig, plan_budget
from clse_fx.reference import reference_prune
from clse_fx.trace import PrefillModule

TARGETS = ("onnxruntime", "onnxruntime-gpu", "tensorrt", "torch-compile")


@dataclass
class CompileResult:
    """What a compile produced and measured."""

    pruned: PrunedPrefill
    bundle: Path | None
    manifest: dict
    timings: dict[str, float] = field(default_factory=dict)
    module: object | None = None  # the torch-compile target's compiled prefill


def load_checkpoint(model_dir: str | Path) -> tuple[nn.Module, object | None]:
    """Load a local transformers checkpoint (never remote code) and its processor, with clear errors."""
    import transformers

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model directory {model_dir} does not exist; pass a local checkpoint dir or --demo")
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} has no config.json; pass a transformers checkpoint dir (save_pretrained)")
    config = transformers.AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
    architectures = config.architectures or []
    supported = [a for a in architectures if a in supported_architectures()]
    if not supported:
        raise ValueError(
            f"unsupported architecture {', '.join(architectures) or type(config).__name__}; "
            f"clse-fx supports: {', '.join(supported_architectures())}"
        )
    model_class = getattr(transformers, supported[0])
    model = model_class.from_pretrained(model_dir, attn_implementation="sdpa", dtype=torch.float32).eval()
    return model, load_processor(model_dir)


def load_processor(path: str | Path) -> object | None:
    """The processor saved in a local checkpoint directory, or None: graphs compile without one, but a
    bundle without it can only run from token ids and pixels."""
    import transformers

    path = Path(path)
    if not path.is_dir():
        return None
    try:
        return transformers.AutoProcessor.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError, TypeError):
        return None


def example_inputs(
    model: nn.Module,
    batch: int = 1,
    text_len: int = 32,
    images: int = 1,
    seed: int = 0,
    frames: int = 1,
    image_size: tuple[int, int] | None = None,
) -> dict[str, torch.Tensor]:
    """Processor-style inputs of the compiled shape (see :meth:`ModelAdapter.example_inputs`), seeded."""
    generator = torch.Generator().manual_seed(seed)
    return adapter_for(model).example_inputs(batch, text_len, images, generator, frames, image_size)


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    names = ["torch", "transformers", "onnx", "onnxruntime", "onnxscript", "clse-fx"]
    found = {}
    for name in names:
        try:
            found[name] = md.version(name)
        except md.PackageNotFoundError:
            continue
    return found | {"python": platform.python_version()}


def compile(  # noqa: A001 - the public name is part of the API (clse_fx.compile)
    model: nn.Module,
    keep: float | None = None,
    *,
    stages: str | list[tuple[int, int]] | None = None,
    score: str = "clse_attn",
    target: str = "onnxruntime",
    kv_policy: str = "uniform",
    merge: str = "none",
    merge_metric: str = "hidden",
    batch: int = 1,
    text_len: int = 32,
    images: int = 1,
    frames: int = 1,
    image_size: tuple[int, int] | None = None,
    output_dir: str | Path | None = None,
    force: bool = False,
    processor: object | None = None,
    source: str | Path | None = None,
    dump_graph: str | None = None,
    verify: bool = True,
    fp16: bool = False,
    progress=None,
) -> CompileResult:
    """Compile ``model`` with CLSE pruning for a fixed input geometry, verify it, and write a bundle.

    Targets: ``onnxruntime`` / ``onnxruntime-gpu`` (a bundle; the GPU flavour prefers the TensorRT and CUDA
    execution providers at load time), ``tensorrt`` (the bundle plus a torch-tensorrt engine; CUDA only),
    ``torch-compile`` (``result.module``, an Inductor-compiled pruned prefill; no bundle). Without
    ``output_dir`` only the pruned torch program is built and checked.
    """
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; available: {', '.join(TARGETS)}")
    if target == "tensorrt":
        from clse_fx.export.tensorrt import require_tensorrt

        require_tensorrt()
        model = model.to("cuda")
    if target == "torch-compile" and output_dir is not None:
        raise ValueError("the torch-compile target builds an in-process module (result.module); drop the output dir")
    if batch < 1 or text_len < 1 or images < 0 or frames < 1:
        raise ValueError("batch, text length and frames must be >= 1 and images >= 0")
    step = progress or (lambda name: contextlib.nullcontext())
    adapter = adapter_for(model)
    if output_dir is not None and Path(output_dir).exists() and not force:
        raise FileExistsError(f"output directory {output_dir} already exists; pass --force to replace it")
    if processor is None and output_dir is not None:
        processor = load_processor(getattr(model, "name_or_path", "") or "")
    device = next(model.parameters()).device
    inputs = example_inputs(model, batch, text_len, images, frames=frames, image_size=image_size)
    inputs = {name: tensor.to(device) for name, tensor in inputs.items()}
    num_visual = int(adapter.visual_mask(inputs["input_ids"][:1]).sum())
    if num_visual == 0:
        raise ValueError("compiling without an image has nothing to prune; pass --images 1 or more")
    plan = plan_budget(keep, adapter.num_layers, num_visual, stages=stages, schedule=adapter.schedule)
    prune = PruneConfig(plan=plan, score=score, kv_policy=kv_policy, merge=merge, merge_metric=merge_metric)

    timings: dict[str, float] = {}
    start = time.perf_counter()
    with step("trace, passes and static re-export"):
        pruned = prune_prefill(model, prune, inputs, dump_graph=dump_graph)
    timings["trace+passes+export"] = time.perf_counter() - start

    text_cfg = model.config.text_config
    non_visual = int(inputs["input_ids"].shape[1]) - num_visual  # text plus any vision start/end markers
    head_dim = getattr(text_cfg, "head_dim", None) or text_cfg.hidden_size // text_cfg.num_attention_heads
    kv = {
        policy: kv_cache_bytes(
            kv_cache_tokens(plan, non_visual, policy), batch, text_cfg.num_key_value_heads, head_dim, 4
        )
        for policy in ("uniform", "per-layer")
    }
    unpruned_tokens = [non_visual + num_visual] * adapter.num_layers
    kv_unpruned = kv_cache_bytes(unpruned_tokens, batch, text_cfg.num_key_value_heads, head_dim, 4)
    manifest: dict = {
        "architecture": type(model).__name__,
        "source": {"path": str(source) if source else None},
        "plan": {
            "stages": [list(s) for s in plan.stages],
            "avg_visual_tokens": plan.avg_visual_tokens,
            "visual_tokens_per_layer": plan.visual_tokens_per_layer(),
            "score": score,
            "cutoff": prune.cutoff,
            "temp": prune.temp,
            "seed": prune.seed,
            "kv_policy": kv_policy,
            "merge": merge,
            "merge_metric": merge_metric,
        },
        "geometry": {
            "batch": batch,
            "text_len": text_len,
            "images": images,
            "num_visual": num_visual,
            "grid": list(pruned.settings.grid),
            "sequence_length": int(inputs["input_ids"].shape[1]),
            "pruned_length": int(inputs["input_ids"].shape[1]) - num_visual + plan.stages[-1][1],
            **adapter.compiled_geometry(inputs),
        },
        "image_token_id": adapter.visual_token_ids()[0],
        "pad_token_id": text_cfg.pad_token_id if text_cfg.pad_token_id is not None else 0,
        "eos_token_id": model.generation_config.eos_token_id,
        "max_position_embeddings": getattr(text_cfg, "max_position_embeddings", None),  # caps prompt + generation
        "kv_cache_bytes": {"pruned": kv[kv_policy], "unpruned": kv_unpruned, "dtype": "float32"},
        "versions": _versions(),
    }
    if source:
        from clse_fx.export.bundle import checkpoint_hash

        manifest["source"]["sha256"] = checkpoint_hash(source)

    ref = None  # the eager reference pruner's output, computed once for every parity check
    if verify:
        start = time.perf_counter()
        with step("parity with the eager reference pruner"):
            out = pruned()
            ref = reference_prune(model, prune, **inputs)
            manifest["parity"] = {
                "reference_max_abs_logits": float((out.logits - ref.logits).abs().max()),
                "reference_kept_identical": all(torch.equal(a, b) for a, b in zip(out.kept, ref.kept)),
            }
        with step("FLOPs before/after"):
            manifest["flops"] = {
                "pruned": count_flops(pruned.program.module(), *pruned.example_args),
                "unpruned": count_flops(PrefillModule(model, pruned.input_names[2:]), *pruned.example_args),
            }
        timings["verify"] = time.perf_counter() - start

    module = None
    if target == "torch-compile":
        from clse_fx.export.torch_compile import CompiledPrefill

        start = time.perf_counter()
        with step("torch.compile (Inductor)"):
            module = CompiledPrefill(pruned)
            out = module()
            ref = ref if ref is not None else reference_prune(model, prune, **inputs)
            parity = manifest.setdefault("parity", {})
            parity["torch_compile_max_abs_logits"] = float((out.logits - ref.logits).abs().max())
        timings["torch_compile"] = time.perf_counter() - start

    bundle = None
    if output_dir is not None:
        from clse_fx.export.onnxruntime import write_bundle

        manifest["target"] = target
        input_graphs = adapter.input_graphs(inputs)
        bundle = write_bundle(
            model, pruned, manifest, Path(output_dir), force, processor, timings, step, fp16=fp16, inputs=inputs,
            input_graphs=input_graphs,
        )  # fmt: skip
    manifest["timings_s"] = timings
    return CompileResult(pruned=pruned, bundle=bundle, manifest=manifest, timings=timings, module=module)
