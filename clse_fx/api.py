"""``clse_fx.compile``: the compile pipeline, top to bottom.

    options -> plan -> trace (cached per input geometry) -> passes -> static re-export -> verify -> manifest
    -> the target's builders (export/targets.py) -> bundle written atomically

Each phase is one function below; each check lives in one place (options in ``CompileOptions``, budgets in
``plan_budget``, output directories in ``export.bundle``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import platform
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from clse_fx.compiler import PrefillOutputs, PrunedPrefill, prune_prefill
from clse_fx.config_facts import read_config, supported_architecture
from clse_fx.cpu_half import float32_matmuls
from clse_fx.demo import PROXY_MODEL
from clse_fx.deploy.files import staged_directory
from clse_fx.deploy.manifest import KVCacheSection, Manifest, PlanSection, RuntimeSection
from clse_fx.export import deploy_check
from clse_fx.export.bundle import checkpoint_hash, write_manifest
from clse_fx.export.targets import TARGETS, TargetSection, builders
from clse_fx.metrics import kv_cache_bytes, kv_cache_tokens, prefill_flops, unpruned_prefill_flops
from clse_fx.models import adapter_for, deploy_recipe_for, examples_for
from clse_fx.options import CompileOptions
from clse_fx.plan import PruneConfig, check_layout, extra_positions, layout_grids, plan_budget, scored_count
from clse_fx.reference import ReferenceOutput, reference_prune

Progress = Callable[[str], contextlib.AbstractContextManager]


@dataclass
class CompileResult:
    """What a compile produced and measured."""

    pruned: PrunedPrefill
    bundle: Path | None
    manifest: Manifest
    timings: dict[str, float] = field(default_factory=dict)
    module: object | None = None  # the torch-compile target's compiled prefill


@dataclass
class Phases:
    """Reports each compile phase through ``progress`` while it runs, adds up its seconds in ``timings`` and
    records the process's peak resident memory so far when it ends in ``peak_rss_mib`` (where memory grows)."""

    progress: Progress
    timings: dict[str, float] = field(default_factory=dict)
    peak_rss_mib: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def __call__(self, label: str, key: str) -> Iterator[None]:
        start = time.perf_counter()
        with self.progress(label):
            yield
        self.timings[key] = self.timings.get(key, 0.0) + time.perf_counter() - start
        self.peak_rss_mib[key] = peak_rss_mib()


def peak_rss_mib() -> float:
    """This process's peak resident set size so far, in MiB: Linux's VmHWM, elsewhere ``getrusage``. On Linux
    ``ru_maxrss`` carries the parent's peak over fork and exec (a compile started by a process that once held 14 GB
    reported 14 GB), while VmHWM belongs to this program's own memory."""
    status = Path("/proc/self/status")
    if status.is_file():
        return next(int(line.split()[1]) for line in status.read_text().splitlines() if line.startswith("VmHWM")) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux, bytes on macOS


@dataclass
class BuildContext:
    """What a target builder gets: the model, the compiled program and its example inputs, the options, the
    processor to ship, and :meth:`phase` to time and report its own phases."""

    model: nn.Module
    pruned: PrunedPrefill
    inputs: dict[str, torch.Tensor]
    options: CompileOptions
    processor: object | None
    phases: Phases
    output: PrefillOutputs | None = None
    reference: ReferenceOutput | None = None

    def phase(self, label: str, key: str) -> contextlib.AbstractContextManager:
        """Report ``label`` while the block runs and record its seconds under ``key``."""
        return self.phases(label, key)

    def program_output(self) -> PrefillOutputs:
        """The compiled program on the example inputs (on the model's device), computed once per compile."""
        if self.output is None:
            with float32_matmuls(self.model):
                self.output = self.pruned()
        return self.output

    def reference_output(self) -> ReferenceOutput:
        """The eager reference pruner on the example inputs, computed once per compile."""
        if self.reference is None:
            with float32_matmuls(self.model):
                self.reference = reference_prune(self.model, self.pruned.settings.prune, **self.inputs)
        return self.reference


def load_checkpoint(model_dir: str | Path, dtype: str = "float32") -> tuple[nn.Module, object | None]:
    """Load a local transformers checkpoint (never remote code) in ``dtype`` and its processor, with clear errors.
    Weights load straight into ``dtype``: a 7B model in bfloat16 needs half the memory of float32."""
    import transformers

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model directory {model_dir} does not exist; pass a local checkpoint dir or --demo")
    model_class = getattr(transformers, supported_architecture(read_config(model_dir)))
    # use_kernels=False: transformers >= 5.25 otherwise swaps layers for Hub kernels by default (code fetched at load
    # time, numerics not the unmodified model's; without the `kernels` package the load fails).
    model = model_class.from_pretrained(
        model_dir, attn_implementation="sdpa", dtype=getattr(torch, dtype), use_kernels=False
    ).eval()
    return model, load_processor(model_dir)


def require_device(device: str | None, asked_by: str = "--device cuda") -> None:
    """A one-line error when ``device`` is cuda and no CUDA device is visible."""
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"{asked_by} needs CUDA, but no CUDA device is visible; run on a GPU machine")


def place_model(model: nn.Module, device: str | None, dtype: str | None) -> nn.Module:
    """``model`` moved to ``device`` and cast to ``dtype`` (None: as it is), with a clear error without CUDA."""
    require_device(device)
    if device is not None:
        model = model.to(device)
    return model.to(getattr(torch, dtype)) if dtype is not None else model


def load_processor(path: str | Path) -> object | None:
    """The processor saved in a local checkpoint directory, or None: graphs compile without one, but a
    bundle without it can only run from token ids and pixels, which a warning says when the checkpoint has
    processor files that fail to load. A processor whose video processor cannot load (transformers' video
    processors need torchvision) is built without it: :func:`processor_without_video`."""
    import transformers

    path = Path(path)
    if not path.is_dir():
        return None
    try:
        return transformers.AutoProcessor.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError, TypeError, ImportError, AttributeError) as error:
        with contextlib.suppress(OSError, ValueError, TypeError, ImportError, AttributeError, KeyError):
            if (processor := processor_without_video(path)) is not None:
                return processor
        if any(path.glob("*processor*.json")) or (path / "tokenizer.json").is_file():
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            warnings.warn(
                f"the checkpoint's processor did not load ({reason}); the bundle will run from token ids and "
                "pixels only, not from text and images",
                stacklevel=2,
            )
        return None


def processor_without_video(path: Path) -> object | None:
    """The checkpoint's processor built from its tokenizer, image processor and ``processor_config.json``
    settings, with no video processor; None for a processor class that has none. The video recipes read the
    image processor's settings, which the LLaVA and Qwen families' video processors share
    (:func:`clse_fx.models.recipes.video_pixels`)."""
    import inspect

    import transformers
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING

    config = transformers.AutoConfig.from_pretrained(path, trust_remote_code=False)
    processor_class = PROCESSOR_MAPPING[type(config)]
    parts = processor_class.get_attributes()
    if "video_processor" not in parts:
        return None
    saved, _ = processor_class.get_processor_dict(path)
    accepted = inspect.signature(processor_class.__init__).parameters
    settings = {name: value for name, value in saved.items() if name in accepted and name not in parts}

    class WithoutVideoProcessor(processor_class):
        def check_argument_for_proper_class(self, argument_name, argument):
            # ProcessorMixin checks each part's class; the video processor's class is what fails to import.
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

        def save_pretrained(self, save_directory, **kwargs) -> None:
            """The files it was built from (ProcessorMixin's would save the absent video processor too)."""
            self.tokenizer.save_pretrained(save_directory)
            self.image_processor.save_pretrained(save_directory)
            own = {name: value for name, value in settings.items() if name != "chat_template"}
            config = json.dumps({"processor_class": processor_class.__name__, **own}, indent=2)
            (Path(save_directory) / "processor_config.json").write_text(config + "\n")
            if self.chat_template:
                (Path(save_directory) / "chat_template.jinja").write_text(self.chat_template)

    WithoutVideoProcessor.__name__ = WithoutVideoProcessor.__qualname__ = processor_class.__name__
    return WithoutVideoProcessor(
        image_processor=transformers.AutoImageProcessor.from_pretrained(path, trust_remote_code=False),
        tokenizer=transformers.AutoTokenizer.from_pretrained(path, trust_remote_code=False),
        video_processor=None,
        **settings,
    )


def example_inputs(model: nn.Module, options: CompileOptions, seed: int = 0) -> dict[str, torch.Tensor]:
    """Processor-style inputs of the compiled geometry (see :meth:`ExampleInputs.example_inputs`), seeded, on
    the model's device."""
    generator = torch.Generator().manual_seed(seed)
    with torch.device("cpu"):  # drawn on the CPU from a CPU generator whatever the default device, then moved
        inputs = examples_for(model).example_inputs(
            options.batch, options.text_len, options.images, generator, options.frames, options.image_size
        )
    device = next(model.parameters()).device
    return {name: tensor.to(device) for name, tensor in inputs.items()}


def make_plan(model: nn.Module, options: CompileOptions, inputs: dict[str, torch.Tensor]) -> PruneConfig:
    """The budget turned into per-stage keeps for this model's visual-token count, plus the score settings."""
    adapter = adapter_for(model)
    layout = adapter.prompt_layout(inputs)
    # Budgets count the scored (grid) tokens; extra tokens are kept on top (docs/method.md#token-layouts).
    num_visual = scored_count(check_layout(layout)) if layout else 0  # no image: plan_budget says what to do
    stages = options.stages
    plan = plan_budget(options.keep, adapter.num_layers, num_visual, stages=stages, schedule=adapter.schedule)
    return PruneConfig(
        plan=plan,
        score=options.score,
        kv_policy=options.kv_policy,
        merge=options.merge,
        merge_metric=options.merge_metric,
    )


def verify(context: BuildContext) -> dict:
    """Parity of the compiled program with the eager reference pruner, and prefill FLOPs before/after (the
    unpruned figure from the traced prefill before any pass: docs/method.md#cost)."""
    pruned = context.pruned
    with context.phase("parity with the eager reference pruner", "verify"):
        out = context.program_output()
        ref = context.reference_output()
        parity = {
            "reference_max_abs_logits": float((out.logits - ref.logits[:, -1:]).abs().max()),
            "reference_kept_identical": all(torch.equal(a, b) for a, b in zip(out.kept, ref.kept)),
        }
    with context.phase("FLOPs before/after", "verify"):
        flops = {"pruned": prefill_flops(pruned), "unpruned": unpruned_prefill_flops(context.model, context.inputs)}
    return {"parity": parity, "flops": flops}


def build_manifest(model: nn.Module, context: BuildContext, checks: dict | None) -> Manifest:
    """The manifest of this compile, assembled in one place (targets add their sections afterwards)."""
    adapter = adapter_for(model)
    options, pruned, inputs = context.options, context.pruned, context.inputs
    prune = pruned.settings.prune
    plan = prune.plan
    text_config = model.config.get_text_config()
    sequence_length = int(inputs["input_ids"].shape[1])
    non_visual = sequence_length - plan.num_visual  # text, vision start/end markers and the layout's extras
    layout = pruned.settings.layout
    dtype = next(model.parameters()).dtype
    itemsize = dtype.itemsize

    def kv_bytes(policy: str) -> int:
        return kv_cache_bytes(text_config, kv_cache_tokens(plan, non_visual, policy), options.batch, itemsize)

    positions = getattr(text_config, "max_position_embeddings", None)
    pipeline_outputs = {name for graph in deploy_recipe_for(model).input_graphs(inputs) for name in graph.outputs}
    source = {"path": str(options.source) if options.source else None}
    if options.source:
        source["sha256"] = checkpoint_hash(options.source)
        if options.source == PROXY_MODEL.resolve():
            source["name"] = "demo"
    return Manifest(
        architecture=type(model).__name__,
        dtype=str(dtype).removeprefix("torch."),
        device=next(model.parameters()).device.type,
        source=source,
        target=options.target,
        plan=PlanSection(
            budget=options.keep,
            stages=[list(s) for s in plan.stages],
            avg_visual_tokens=plan.avg_visual_tokens,
            visual_tokens_per_layer=plan.visual_tokens_per_layer(),
            score=prune.score,
            cutoff=prune.cutoff,
            temp=prune.temp,
            seed=prune.seed,
            kv_policy=prune.kv_policy,
            merge=prune.merge,
            merge_metric=prune.merge_metric,
        ),
        geometry={
            "batch": options.batch,
            "text_len": options.text_len,
            "images": options.images,
            "num_visual": plan.num_visual,
            "visual_tokens_per_prompt": plan.num_visual + len(extra_positions(layout)),  # scored + extras
            "layout": [list(segment) for segment in layout],
            **({"grid": list(layout_grids(layout)[0])} if len(layout) == 1 else {}),  # one grid: as before
            "sequence_length": sequence_length,
            "pruned_length": sequence_length - plan.num_visual + plan.stages[-1][1],
            **deploy_recipe_for(model).compiled_geometry(inputs),
        },
        image_token_id=adapter.visual_token_ids()[0],
        visual_token_ids=list(adapter.visual_token_ids()),
        pad_token_id=text_config.pad_token_id if text_config.pad_token_id is not None else 0,
        eos_token_id=model.generation_config.eos_token_id,
        max_position_embeddings=positions,
        kv_cache_bytes=KVCacheSection(
            pruned=kv_bytes(prune.kv_policy), unpruned=kv_bytes("unpruned"), dtype=str(dtype).removeprefix("torch.")
        ),
        runtime=RuntimeSection(
            padding="left",
            decode_position_start=sequence_length,
            position_offset_input="rope_deltas" if "rope_deltas" in pipeline_outputs else None,
            max_new_tokens=positions - sequence_length if positions else None,
        ),
        versions=_versions(),
        preprocess=deploy_recipe_for(model).preprocess(context.processor, inputs, options.images)
        if context.processor is not None
        else None,
        **(checks or {}),
    )


def add_section(manifest: Manifest, section: TargetSection) -> None:
    """Merge a target builder's section (builders run in order; later graphs join earlier ones)."""
    manifest.graphs.update(section.graphs)
    manifest.pipeline += [name for name in section.pipeline if name not in manifest.pipeline]
    manifest.parity.update(section.parity)
    if section.tensorrt_readiness is not None:
        manifest.tensorrt_readiness = section.tensorrt_readiness
    manifest.opset = section.opset or manifest.opset
    manifest.quantization = section.quantization or manifest.quantization
    manifest.runtime.kv_cache_update = section.kv_cache_update or manifest.runtime.kv_cache_update


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    found = {}
    for name in ["torch", "transformers", "onnx", "onnxruntime", "onnxscript", "clse-fx"]:
        try:
            found[name] = md.version(name)
        except md.PackageNotFoundError:
            continue
    return found | {"python": platform.python_version()}


def compile(  # noqa: A001 - the public name is part of the API (clse_fx.compile)
    model: nn.Module,
    options: CompileOptions | None = None,
    *,
    processor: object | None = None,
    progress: Progress | None = None,
    **fields,
) -> CompileResult:
    """Compile ``model`` with CLSE pruning for a fixed input geometry, verify it, and build its target.

    ``options`` is a :class:`CompileOptions`, or its fields are given as keywords (``keep=128,
    output_dir=...``; with ``options`` they replace its fields). Targets: see ``export/targets.py``. Without
    an output dir only the pruned torch program is built and checked.
    """
    options = CompileOptions(**fields) if options is None else dataclasses.replace(options, **fields)
    phases = Phases(progress or (lambda label: contextlib.nullcontext()))
    target = TARGETS[options.target]
    writes_bundle = target.writes_bundle and options.output_dir is not None
    # Import (and check the requirements of) the target's builders first: a missing extra fails before any work.
    steps = builders(options.target) if writes_bundle or not target.writes_bundle else []
    model = place_model(model, options.device or target.device, options.dtype)

    inputs = example_inputs(model, options)
    prune = make_plan(model, options, inputs)
    if options.output_dir is not None and processor is None:
        processor = load_processor(getattr(model, "name_or_path", "") or "")

    with phases("trace, passes and static re-export", "trace+passes+export"):
        pruned = prune_prefill(model, prune, inputs, dump_graph=options.dump_graph)

    context = BuildContext(model, pruned, inputs, options, processor, phases)
    manifest = build_manifest(model, context, verify(context) if options.verify else None)
    module = None
    with staged_directory(options.output_dir, options.force) if writes_bundle else contextlib.nullcontext() as bundle:
        for build in steps:
            section = build(context, bundle)
            add_section(manifest, section)
            module = section.module or module
        manifest.timings_s, manifest.peak_rss_mib = dict(phases.timings), dict(phases.peak_rss_mib)
        if bundle is not None:
            if processor is not None:
                processor.save_pretrained(bundle)
            write_manifest(bundle, manifest)
        if options.verify and (bundle is not None or module is not None):
            if manifest.quantization:
                with phases(f"{options.weight_format} bundle vs the unquantized model", "deploy_check"):
                    figures, misses = deploy_check.check_lossy(
                        options.weight_format, bundle, model, prune, inputs, accept=options.accept_lossy
                    )
                    manifest.quantization["floors"] = deploy_check.LOSSY_FLOORS[options.weight_format]
                    manifest.quantization["below_floors"] = misses  # kept by --accept-lossy; else none
            else:
                with phases("deploy-path check: constant and flat-region images", "deploy_check"):
                    run = deploy_check.bundle_runner(bundle) if bundle else deploy_check.module_runner(model, module)
                    own_weights = bundle is not None
                    figures = deploy_check.check(options.target, run, model, prune, inputs, own_weights=own_weights)
            manifest.parity.update(figures)
            manifest.timings_s, manifest.peak_rss_mib = dict(phases.timings), dict(phases.peak_rss_mib)
            if bundle is not None:  # the check only read the bundle: its files' hashes stand
                write_manifest(bundle, manifest, rehash=False)
        if bundle is not None and options.sign_key is not None:  # the manifest is final: sign it
            from clse_fx.deploy.signing import sign_manifest

            sign_manifest(bundle, options.sign_key)
    return CompileResult(
        pruned=pruned,
        bundle=options.output_dir if writes_bundle else None,
        manifest=manifest,
        timings=phases.timings,
        module=module,
    )
