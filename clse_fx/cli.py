"""``clse-compile``: compile a local or HF-cached transformers checkpoint into a pruned, static-shape engine bundle."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from rich.markup import escape

from clse_fx.config_facts import Geometry, config_facts
from clse_fx.deploy.cli import OneLineParser, one_line_warnings
from clse_fx.deploy.files import check_output_dir
from clse_fx.export.targets import TARGETS
from clse_fx.options import DEVICES, DTYPES, WEIGHT_FORMATS, CompileOptions
from clse_fx.plan import KV_POLICIES, MERGE_METRICS, MERGE_MODES, SCORE_TYPES, check_plan_fits

EXPLAIN_PROMPT = "what is in the picture ?"


def _quiet_transformers() -> None:
    """Our own output reports progress; transformers' bars and notices would break the one-line errors."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def _nvidia_driver_present() -> bool:
    """Whether an NVIDIA driver is installed (its device nodes or nvidia-smi), without importing torch."""
    import shutil

    return any(Path("/dev").glob("nvidia*")) or shutil.which("nvidia-smi") is not None


def _interrupt(signum: int, frame) -> None:
    raise KeyboardInterrupt(f"stopped by signal {signum}")


def _budget(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a budget: pass a visual-token count (e.g. 128) or a ratio in (0, 1) (e.g. 0.25)"
        ) from None
    return int(value) if value.is_integer() and value >= 1 else value


def _image_size(text: str) -> tuple[int, int]:
    height, _, width = text.lower().partition("x")
    if not height.isdigit() or not (width or height).isdigit():
        raise argparse.ArgumentTypeError(f"bad image size {text!r}: write HEIGHTxWIDTH or one side, e.g. 448x448")
    return int(height), int(width or height)


def _parser() -> OneLineParser:
    parser = OneLineParser(
        prog="clse-compile",
        description="Prune visual tokens inside an MLLM graph with CLSE and export a static-shape engine bundle.",
    )
    parser.add_argument(
        "model",
        nargs="?",
        help="local transformers checkpoint dir, a hub id already in the local Hugging Face cache "
        "(owner/name[@revision]; never downloaded), or 'demo' for the built-in model",
    )
    parser.add_argument("--demo", action="store_true", help="use the built-in trained proxy LLaVA (no download)")
    parser.add_argument(
        "--keep",
        type=_budget,
        help="visual-token budget as the paper names it (192/128/64 for LLaVA-1.5: its stages keep about 1.72x, "
        "1.09x and 0.32x that many; the report prints the true average per layer), or a ratio (0.25)",
    )
    parser.add_argument("--stages", help="explicit stages LAYER:KEEP,... (e.g. 1:330,11:210,21:62)")
    parser.add_argument("--score", choices=SCORE_TYPES, default="clse_attn")
    parser.add_argument("--kv-policy", choices=KV_POLICIES, default="uniform")
    parser.add_argument("--merge", choices=MERGE_MODES, default="none", help="tome: merge pruned tokens (CLSE-M)")
    parser.add_argument("--merge-metric", choices=MERGE_METRICS, help="similarity for --merge tome (default: hidden)")
    parser.add_argument(
        "--target",
        choices=TARGETS,
        default="onnxruntime",
        help="what to build (default: onnxruntime); torch-compile is for the Python API only",
    )
    parser.add_argument("--fp16", action="store_true", help="tensorrt target: allow FP16 kernels")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="load the checkpoint in this dtype")
    parser.add_argument(
        "--weight-format",
        choices=WEIGHT_FORMATS,
        help="onnxruntime targets: int8 or int4 weight-only quantization (int4: decoder layers at 4 bits, the rest "
        "at 8); checked against the unquantized program by logits cosine and top-k agreement",
    )
    parser.add_argument(
        "--device", choices=DEVICES, help="trace and verify on this device (default: cpu; cuda for tensorrt)"
    )
    parser.add_argument(
        "--accept-lossy",
        action="store_true",
        help="with --weight-format: keep a bundle that misses the lossy floors (the compile fails otherwise); the "
        "misses are recorded in the manifest and the report",
    )
    parser.add_argument(
        "--no-verify",
        action="store_true",
        help="skip the checks against the eager reference and the unquantized model (parity, deploy path, the "
        "lossy floors): the manifest then records none; for timing experiments, not for bundles you ship",
    )
    parser.add_argument(
        "--check",
        choices=["tensorrt"],
        help="also report every node TensorRT's ONNX parser would reject; exit 1 if any",
    )
    parser.add_argument(
        "--image-size", type=_image_size, help="HxW (or one side) pixels, for models of variable resolution (Qwen2-VL)"
    )
    parser.add_argument("--frames", type=int, default=1, help="frames per video (video models; static)")
    parser.add_argument("--text-len", type=int, default=32, help="non-image tokens per prompt (static; default: 32)")
    parser.add_argument("--batch", type=int, default=1, help="prompts per call (static; default: 1)")
    parser.add_argument("--images", type=int, default=1, help="images per prompt (static)")
    parser.add_argument("-o", "--output", help="bundle directory (default: clse-out/<model name>)")
    parser.add_argument("--force", action="store_true", help="replace an existing output directory")
    parser.add_argument(
        "--sign",
        metavar="KEY",
        help="sign the bundle's manifest with this EC private key (PEM; OpenSSF model-signing, the sign extra); "
        "clse-run/clse-serve --verify-key PUB then refuse any other",
    )
    parser.add_argument("--dump-graph", metavar="FILE", help="write the graph before/after each pass to FILE")
    parser.add_argument(
        "--no-onnx-optimize",
        dest="optimize_onnx",
        action="store_false",
        help="skip onnxscript's optimizer on the ONNX graphs: faster exports, but larger graphs that are not "
        "TensorRT-ready (shapes it folds to constants stay computed); for iterating",
    )
    parser.add_argument("--explain", metavar="IMAGE", help="write OUTPUT-explain.png: each stage's kept tokens")
    parser.add_argument("--explain-prompt", help=f"the prompt for --explain (default: {EXPLAIN_PROMPT})")
    parser.add_argument(
        "--triton-repo", metavar="DIR", help="also write a Triton model repository for the bundle to DIR"
    )
    return parser


def _model_dir(args: argparse.Namespace) -> Path:
    """The checkpoint directory to compile: the demo's, a local one, or a hub id's snapshot in the local HF cache."""
    if args.demo or args.model == "demo":
        from clse_fx.demo import proxy_model_dir

        return proxy_model_dir()
    from clse_fx.hub import resolve_model  # compile_main has already checked that a model is named

    return resolve_model(args.model)


def _explain(bundle: Path, image_path: str, prompt: str) -> Path:
    """Write the kept-token overlay of ``bundle`` on ``image_path`` next to the bundle."""
    from clse_fx.deploy.explain import explain_bundle
    from clse_fx.deploy.preprocess.media import as_rgb, load_image

    try:
        image = as_rgb(load_image(image_path))  # the accepted formats and size limits of clse-run
    except ValueError as error:
        raise ValueError(f"--explain: {error}") from error
    return explain_bundle(bundle, image, prompt, bundle.with_name(f"{bundle.name}-explain.png"))


def _report(console, result, bundle: Path, dump_graph: str | None = None) -> None:
    from rich.table import Table

    m = result.manifest
    plan, geometry = m.plan, m.geometry
    table = Table(title="clse-compile report", show_header=False)
    table.add_row("architecture", f"{m.architecture} ({m.dtype} on {m.device})")
    if m.quantization:
        q = m.quantization
        widths = "; ".join(
            f"{graph} " + ", ".join(f"{count} {width}" for width, count in sorted(counts.items()))
            for graph, counts in q["weights"].items()
        )
        table.add_row(
            "weights",
            f"{q['weight_format']} in blocks of {q['block_size']} ({widths}): "
            f"{q['bytes']['before'] / 2**20:.1f} MiB -> {q['bytes']['after'] / 2**20:.1f} MiB",
        )
    table.add_row("target", m.target)
    table.add_row("plan", ", ".join(f"layer {layer}: keep {keep}" for layer, keep in plan.stages))
    budget = "explicit stages" if plan.budget is None else f"budget {plan.budget:g}"
    table.add_row(
        "visual tokens / layer",
        f"{geometry['num_visual']} -> {plan.avg_visual_tokens:.1f} on average over "
        f"{len(plan.visual_tokens_per_layer)} layers ({budget}, score {plan.score})",
    )
    merge = plan.merge if plan.merge == "none" else f"{plan.merge} (similarity on {plan.merge_metric})"
    table.add_row("merge", merge)
    table.add_row("sequence", f"{geometry['sequence_length']} -> {geometry['pruned_length']} tokens")
    flops = m.flops
    if flops is not None:
        table.add_row(
            "prefill FLOPs",
            f"{flops['unpruned'] / 1e6:.2f} M -> {flops['pruned'] / 1e6:.2f} M "
            f"({flops['unpruned'] / max(flops['pruned'], 1):.2f}x lower)",
        )
    kv = m.kv_cache_bytes
    table.add_row(
        "KV cache",
        f"{kv.unpruned / 1024:.1f} KiB -> {kv.pruned / 1024:.1f} KiB "
        f"({kv.unpruned / kv.pruned:.2f}x smaller, {plan.kv_policy})",
    )
    parity = m.parity
    if "reference_max_abs_logits" in parity:
        table.add_row(
            "parity vs eager reference",
            f"max |dlogits| {parity['reference_max_abs_logits']:.2e}, kept identical: "
            f"{parity['reference_kept_identical']}",
        )
    else:
        table.add_row("checks", "skipped (--no-verify): nothing was compared with the eager reference")
    lossy = [k.removeprefix("lossy_").removesuffix("_logits_cosine") for k in parity if k.endswith("_logits_cosine")]
    if lossy:
        parts = [
            f"{image}: logits cosine {parity[f'lossy_{image}_logits_cosine']:.3f}, top-5 containment "
            f"{parity[f'lossy_{image}_top5_containment']:.3f}, kept overlap {parity[f'lossy_{image}_kept_overlap']:.3f}"
            for image in lossy
        ]
        misses = m.quantization.get("below_floors", [])
        verdict = "floors met"
        if misses:
            verdict = f"[red]BELOW FLOORS, kept by --accept-lossy: {escape('; '.join(misses))}[/red]"
        table.add_row("quantized vs unquantized", escape("; ".join(parts).replace("_", " ")) + f" ({verdict})")
    if "onnxruntime_max_abs_logits" in parity:
        table.add_row(
            "parity ONNX Runtime vs torch",
            f"max |dlogits| {parity['onnxruntime_max_abs_logits']:.2e}, indices identical: "
            f"{parity['onnxruntime_indices_identical']}",
        )
    deploy = [
        key.removeprefix("deploy_").removesuffix("_kept_identical")
        for key in parity
        if key.startswith("deploy_") and key.endswith("_kept_identical")
    ]
    if deploy:
        parts = []
        for name in deploy:
            if parity[f"deploy_{name}_kept_identical"]:
                error = parity[f"deploy_{name}_max_abs_last_logits"]
                parts.append(f"{name}: kept identical, max |dlogits| {error:.2e}")
            else:
                stage, tokens = parity[f"deploy_{name}_near_tie_stage"], parity[f"deploy_{name}_near_tie_tokens"]
                parts.append(f"{name}: {tokens} near-tie trade(s) at stage {stage}, later stages not compared")
        table.add_row("deploy path vs reference", "; ".join(parts).replace("_", " "))
    table.add_row("compile time", ", ".join(f"{k} {v:.2f}s" for k, v in result.timings.items()))
    if m.peak_rss_mib:
        growth = ", ".join(f"{k} {v / 1024:.2f}" for k, v in m.peak_rss_mib.items())
        table.add_row("peak memory (GiB)", f"{max(m.peak_rss_mib.values()) / 1024:.2f} (after each phase: {growth})")
    if "torch_compile_max_abs_logits" in parity:
        table.add_row(
            "parity torch.compile vs reference", f"max |dlogits| {parity['torch_compile_max_abs_logits']:.2e}"
        )
    table.add_row("files", ", ".join(sorted(p.name for p in bundle.iterdir())))
    console.print(table)
    # Paths go below the table, whole (a table cell would crop or fold them), so they can be copied.
    console.print(f"bundle: {bundle}", markup=False, highlight=False, soft_wrap=True)
    if dump_graph:
        console.print(f"graph dump: {Path(dump_graph).resolve()}", markup=False, highlight=False, soft_wrap=True)


def _report_tensorrt_readiness(console, result) -> int:
    """Print the readiness findings of the compiled graphs; 1 if TensorRT would reject any node."""
    readiness = result.manifest.tensorrt_readiness
    if readiness is None:
        from clse_fx.export.onnxruntime import export_onnx
        from clse_fx.export.tensorrt_check import check_tensorrt_ready

        with tempfile.TemporaryDirectory() as scratch:
            path = export_onnx(result.pruned, Path(scratch) / "prefill.onnx")
            readiness = {"prefill": [str(f) for f in check_tensorrt_ready(path)]}
    findings = [f"{graph}: {finding}" for graph, found in readiness.items() for finding in found]
    for finding in findings:
        console.print(f"[red]not TensorRT-ready[/red] {escape(finding)}", highlight=False, soft_wrap=True)
    if not findings:
        console.print(f"TensorRT readiness: every node accepted ({', '.join(readiness)})")
    return 1 if findings else 0


def phase_progress(console) -> Callable[[str], contextlib.AbstractContextManager]:
    """Progress per compile phase: on a terminal a spinner with the phase's elapsed time, then a line with its
    seconds; without one (logs, CI) one plain line as each phase starts, stamped with the seconds so far."""
    start = time.perf_counter()

    @contextlib.contextmanager
    def phase(name: str) -> Iterator[None]:
        if not console.is_terminal:
            console.print(f"[{time.perf_counter() - start:6.1f}s] {name}", markup=False, highlight=False)
            yield
            return
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        begun = time.perf_counter()
        columns = (SpinnerColumn(), TextColumn("[bold]{task.description}"), TimeElapsedColumn())
        with Progress(*columns, console=console, transient=True) as progress:
            progress.add_task(name, total=None)
            yield
        console.print(f"[green]done[/green] {escape(name)} ({time.perf_counter() - begun:.1f}s)", highlight=False)

    return phase


def _refuse_ignored_options(parser: OneLineParser, args: argparse.Namespace) -> None:
    """An option that would be accepted and then ignored is a usage error."""
    if args.demo and args.model not in (None, "demo"):
        parser.error(f"--demo compiles the built-in model; pass either --demo or {args.model}")
    if args.target != "tensorrt":
        parser.refuse_unused({"--fp16": args.fp16}, "--target tensorrt")
    if args.merge == "none":
        parser.refuse_unused({"--merge-metric": args.merge_metric is not None}, "--merge tome")
    if not args.explain:
        parser.refuse_unused({"--explain-prompt": args.explain_prompt is not None}, "--explain IMAGE")
    if TARGETS[args.target].runtime != "onnxruntime":
        parser.refuse_unused({"--no-onnx-optimize": not args.optimize_onnx}, "a target that builds ONNX graphs")


def compile_main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    _refuse_ignored_options(parser, args)
    one_line_warnings()
    # SIGTERM (a scheduler's stop, `kill`) unwinds like Ctrl-C, so the staged output directory is removed.
    signal.signal(signal.SIGTERM, _interrupt)
    from rich.console import Console

    console = Console(stderr=False)
    errors = Console(stderr=True)
    step = phase_progress(console)

    try:
        if args.target == "torch-compile":
            raise ValueError(
                "the torch-compile target builds an in-process module, not files a command could write: use the "
                "Python API, clse_fx.compile(model, keep=..., target='torch-compile').module (docs/python.md), or "
                "--target aot-inductor for a bundle that runs with torch"
            )
        if args.explain and not Path(args.explain).is_file():
            raise FileNotFoundError(f"--explain image {args.explain} does not exist")
        if args.triton_repo:
            if TARGETS[args.target].runtime != "onnxruntime":
                raise ValueError(f"--triton-repo needs an ONNX bundle; the {args.target} target builds none")
            check_output_dir(args.triton_repo, args.force)
        demo = args.demo or args.model == "demo"
        if not (demo or args.model):
            raise ValueError("name a model directory, or pass --demo for the built-in tiny model")
        from clse_fx.hub import model_name

        options = CompileOptions(
            keep=args.keep,
            stages=args.stages,
            score=args.score,
            kv_policy=args.kv_policy,
            merge=args.merge,
            merge_metric=args.merge_metric or "hidden",
            batch=args.batch,
            text_len=args.text_len,
            images=args.images,
            frames=args.frames,
            image_size=args.image_size,
            target=args.target,
            output_dir=Path(args.output or Path("clse-out") / ("demo" if demo else model_name(args.model))),
            force=args.force,
            fp16=args.fp16,
            dtype=args.dtype,
            weight_format=args.weight_format,
            accept_lossy=args.accept_lossy,
            verify=not args.no_verify,
            device=args.device or (None if args.target == "tensorrt" else "cpu"),  # TensorRT: CUDA by default
            dump_graph=args.dump_graph,
            optimize_onnx=args.optimize_onnx,
            sign_key=args.sign,
        )
        device = options.device or TARGETS[options.target].device
        asked_by = "--device cuda" if options.device else f"--target {options.target}"
        if device == "cuda" and not _nvidia_driver_present():  # before importing torch: a second, not four
            extra = " with the tensorrt extra: pip install 'clse-fx[tensorrt]'" if options.target == "tensorrt" else ""
            raise RuntimeError(
                f"{asked_by} needs CUDA, but no CUDA device is visible (no NVIDIA driver); run on a GPU machine{extra}"
            )
        # Only now, with every argument checked, is a hub id looked up in the local Hugging Face cache.
        model_dir = _model_dir(args)
        # What the checkpoint's config.json decides (its family, depth and visual tokens) is checked before torch
        # is imported: a second, not the minute a 7B checkpoint takes to load.
        facts = config_facts(model_dir, Geometry(options.images, options.frames, options.image_size))
        check_plan_fits(options.keep, options.stages, facts.num_layers, facts.num_visual, facts.schedule)
        options = dataclasses.replace(options, source=model_dir)
        _quiet_transformers()  # only now: every argument has been checked without importing torch or transformers
        # What the target needs (its extras, CUDA) is checked before the checkpoint loads: minutes for a 7B model.
        from clse_fx.api import require_device
        from clse_fx.export.targets import builders

        builders(options.target)
        require_device(device, asked_by)
        with step("loading the checkpoint"):
            from clse_fx.api import compile as compile_model
            from clse_fx.api import load_checkpoint

            model, processor = load_checkpoint(model_dir, dtype=args.dtype)
        result = compile_model(model, options, processor=processor, progress=step)
        _report(console, result, result.bundle, args.dump_graph)
        if args.explain:
            prompt = args.explain_prompt or EXPLAIN_PROMPT
            console.print(f"explanation: {_explain(result.bundle, args.explain, prompt)}")
        if args.triton_repo:
            from clse_fx.deploy.triton import write_triton_repo

            with step("Triton model repository"):
                repo = write_triton_repo(result.bundle, args.triton_repo, force=args.force)
            console.print(f"Triton model repository: serve it with tritonserver --model-repository {repo.resolve()}")
        if args.check == "tensorrt":
            return _report_tensorrt_readiness(console, result)
        return 0
    except (ValueError, FileNotFoundError, FileExistsError, NotImplementedError, RuntimeError) as error:
        errors.print(f"[red]error:[/red] {escape(str(error))}", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        errors.print("interrupted: nothing was written", highlight=False)
        return 130


if __name__ == "__main__":
    sys.exit(compile_main())
