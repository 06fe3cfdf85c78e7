"""GPU prefill and decode figures at LLaVA-1.5-7B geometry: `python -m benchmarks.gpu` on a CUDA machine.

Random weights in bfloat16, batch 1 and 8, budgets 192/128/64 of 576 visual tokens. Sections, in order (the
results file is rewritten after each, so a run cut short keeps what it measured):

1. ``prefill``: per batch and budget, prefill ms of the unmodified model (eager), the eager reference pruner, the
   pass-built program eager and replayed as one CUDA graph, beside the unpruned program (same passes, no stage)
   replayed the same way; the share of CLSE stage time in the eager pruned prefill (profiler, kernels under the
   stages' graph nodes); a profiler summary of the pruned and unpruned prefill at batch 1, budget 192.
2. ``decode``: tokens/s of the static-KV decode step (one CUDA graph a step) at batch 1 and 32, pruned (budget
   192) vs full KV.
3. ``kept_ids_identical_float32``: in float32 at 1/8 width, whether the kept visual ids of the pass-built program
   (eager, every budget and batch) equal the reference pruner's.
4. ``inductor``: the product's torch-compile path (Inductor with CUDA graphs, ``mode="reduce-overhead"``) at
   budget 192, batch 1 and 8, pruned vs unpruned, with compile seconds, and the kept ids of the compiled float32
   program; skipped with a note when ``--deadline`` seconds have passed (each compile takes a minute or more).

Peak GPU memory is recorded per section. Writes benchmarks/results/gpu.json and prints a Markdown table naming the
device and versions.

`--smoke` runs the same code at 1/64 width with 4 decoder layers (on CUDA when one is visible, else the CPU, where
"CUDA graph" rows run eager), to check the script in a minute. Installing on a machine without network: see
benchmarks/gpu_machine.sh.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import transformers
from torch import fx

from benchmarks import geometry
from clse_fx.compiler import PrefillOutputs, prune_prefill
from clse_fx.decode import StaticDecodeStep
from clse_fx.export.torch_compile import compile_mode
from clse_fx.plan import PruneConfig, plan_budget
from clse_fx.reference import reference_prune

RESULTS = Path(__file__).parent / "results" / "gpu.json"
SMOKE = dict(hidden=64, intermediate=172, heads=2, vocab=512, vision_hidden=32, vision_layers=1, layers=4)
TEXT_TOKENS = 40


def timed_ms(fn, repeats: int, device: torch.device) -> float:
    """Median wall ms of ``fn`` after two warm-up calls, synchronising the device around each call."""
    for _ in range(2):
        fn()
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


class GraphReplay:
    """``fn(*args)`` captured once as a CUDA graph over static copies of ``args`` (on the CPU: plain calls).

    Replay launches every kernel of the capture at once, so host overhead, which dominates an eager prefill at
    batch 1, drops out; the kernels are eager PyTorch's, so the figures isolate what pruning saves."""

    def __init__(self, fn, args: tuple[torch.Tensor, ...]) -> None:
        self.fn, self.static = fn, tuple(a.clone() for a in args)
        self.graph = None
        if self.static[0].device.type != "cuda":
            return
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up off the capture: cuBLAS handles, lazy module state
            for _ in range(2):
                fn(*self.static)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = fn(*self.static)

    def __call__(self, *args: torch.Tensor):
        """Replay on ``args`` copied into the captured inputs (none: the last ones)."""
        for static, arg in zip(self.static, args):
            static.copy_(arg)
        if self.graph is None:
            return self.fn(*self.static)
        self.graph.replay()
        return self.out


class _StageLabels(fx.Interpreter):
    """Runs a graph node by node, each node traced from a CLSE stage under a profiler range of its own."""

    def run_node(self, node: fx.Node):
        stack = node.meta.get("nn_module_stack") or {}
        if any(str(path).startswith("clse.stage") for path, _ in stack.values()):
            with torch.profiler.record_function("clse_stage"):
                return super().run_node(node)
        return super().run_node(node)


def _activities(device: torch.device) -> list:
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    return activities


def stage_share(program: torch.export.ExportedProgram, args: tuple, device: torch.device) -> float:
    """Share of the eager prefill's kernel time spent in the CLSE stages (scores, top-K, gathers)."""
    module = program.module()
    with torch.no_grad():
        _StageLabels(module).run(*args)  # warm-up
        with torch.profiler.profile(activities=_activities(device)) as prof:
            _StageLabels(module).run(*args)
    kind = "device" if device.type == "cuda" else "cpu"
    events = prof.key_averages()
    # The range's total holds the time of everything run inside it; self times add up to the whole run.
    stage = sum(getattr(e, f"{kind}_time_total") for e in events if e.key == "clse_stage")
    total = sum(getattr(e, f"self_{kind}_time_total") for e in events)
    return stage / max(total, 1e-9)


def profile_summary(fn, device: torch.device, rows: int = 12) -> str:
    """torch.profiler's table of the ops that take the most device (or CPU) time in one call of ``fn``."""
    with torch.no_grad():
        fn()
        with torch.profiler.profile(activities=_activities(device)) as prof:
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=60)


def decode_tokens_per_s(model, lengths: list[int], batch: int, steps: int, device, dtype) -> float:
    """Tokens/s of the static-KV decode step, one CUDA graph replay a step, over caches of ``lengths`` (values do
    not matter)."""
    text = model.config.text_config
    head_dim = text.hidden_size // text.num_attention_heads
    cache = [
        (torch.randn(batch, text.num_key_value_heads, n, head_dim, device=device, dtype=dtype),) * 2 for n in lengths
    ]
    decode = StaticDecodeStep(model, cache, steps + 4)
    decode.load(cache)
    token = torch.ones(batch, 1, dtype=torch.long, device=device)
    pads = torch.zeros(batch, dtype=torch.long, device=device)
    position = torch.full((batch, 1), max(lengths), device=device)
    with torch.no_grad():
        step_graph = GraphReplay(decode, (token, position, torch.tensor(0, device=device), pads))
        step_index, step_position = step_graph.static[2], step_graph.static[1]

        def run():
            for step in range(steps):
                step_index.fill_(step)
                step_position.fill_(max(lengths) + step)
                step_graph()

        ms = timed_ms(run, 3, device)
    return batch * steps / (ms / 1e3)


def _same_ids(kept: list[torch.Tensor], expected: list[torch.Tensor]) -> bool:
    return len(kept) == len(expected) and all(torch.equal(a, b) for a, b in zip(kept, expected))


def _prompt(model, batch: int, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    inputs = geometry.prompt(model, TEXT_TOKENS, device=device.type, batch=batch)
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    return inputs


def _unpruned(model, prune: PruneConfig, inputs: dict, pruned):
    """The same passes and static export with no stage: what the pruned program is compared with."""
    return prune_prefill(model, prune, inputs, settings=dataclasses.replace(pruned.settings, stages=()))


def _peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None


class Run:
    """The results dict, rewritten to ``out`` after every section."""

    def __init__(self, out: Path | None, smoke: bool, device: torch.device, dtype: torch.dtype) -> None:
        self.out, self.start = out, time.perf_counter()
        width = "LLaVA-1.5-7B geometry at 1/64 width, 4 layers (smoke)" if smoke else "LLaVA-1.5-7B"
        self.results: dict = {
            "device": torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({platform.machine()})",
            "versions": {
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "python": platform.python_version(),
            },
            "geometry": f"{width}, {dtype}, {TEXT_TOKENS} text + 576 visual",
            "compiled_means": "the eager program's kernels replayed as one CUDA graph (torch.cuda.CUDAGraph)",
            "section_seconds": {},
            "peak_memory_gib": {},
        }

    def section(self, name: str, value, device: torch.device) -> None:
        self.results[name] = value
        self.results["section_seconds"][name] = round(time.perf_counter() - self.start, 1)
        self.results["peak_memory_gib"][name] = _peak_gib(device)
        self.save()

    def save(self) -> None:
        if self.out is not None:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.out.write_text(json.dumps(self.results, indent=2) + "\n")

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


def prefill_section(model, budgets, batches, layers: int, repeats: int, device, dtype) -> tuple[list, dict]:
    """Rows of prefill ms per batch and budget, and profiler summaries at the first batch and budget."""
    rows, profiles = [], {}
    for batch in batches:
        inputs = _prompt(model, batch, device, dtype)
        with torch.no_grad():
            unmodified_ms = timed_ms(lambda inputs=inputs: model(**inputs), repeats, device)
            unpruned = None
            for keep in budgets:
                prune = PruneConfig(plan=plan_budget(keep, layers, 576))
                pruned = prune_prefill(model, prune, inputs)
                if unpruned is None:
                    unpruned = _unpruned(model, prune, inputs, pruned)
                    unpruned_module = unpruned.program.module()
                    run_unpruned = functools.partial(unpruned_module, *unpruned.example_args)
                    unpruned_eager_ms = timed_ms(run_unpruned, repeats, device)
                    unpruned_graph = GraphReplay(unpruned_module, unpruned.example_args)
                    unpruned_graph_ms = timed_ms(unpruned_graph, repeats, device)
                    del unpruned_graph
                module, args = pruned.program.module(), pruned.example_args
                run_pruned = functools.partial(module, *args)
                pruned_graph = GraphReplay(module, args)
                times = {
                    "unmodified_eager": unmodified_ms,
                    "reference_eager": timed_ms(
                        functools.partial(reference_prune, model, prune, **inputs), repeats, device
                    ),
                    "pruned_eager": timed_ms(run_pruned, repeats, device),
                    "unpruned_eager": unpruned_eager_ms,
                    "pruned_compiled": timed_ms(pruned_graph, repeats, device),
                    "unpruned_compiled": unpruned_graph_ms,
                }
                del pruned_graph
                if (batch, keep) == (batches[0], budgets[0]):
                    profiles["pruned"] = profile_summary(run_pruned, device)
                    profiles["unpruned"] = profile_summary(run_unpruned, device)
                row = {
                    "batch": batch,
                    "budget": keep,
                    "stages": [list(s) for s in prune.plan.stages],
                    "prefill_ms": times,
                    "compiled_speedup": times["unpruned_compiled"] / times["pruned_compiled"],
                    "eager_speedup": times["unpruned_eager"] / times["pruned_eager"],
                    "stage_share": stage_share(pruned.program, args, device),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows, profiles


def decode_section(model, layers: int, batches, device, dtype) -> dict:
    plan = plan_budget(192, layers, 576)
    decode = {}
    for batch in batches:
        pruned = decode_tokens_per_s(model, [TEXT_TOKENS + plan.stages[-1][1]] * layers, batch, 32, device, dtype)
        full = decode_tokens_per_s(model, [TEXT_TOKENS + 576] * layers, batch, 32, device, dtype)
        decode[batch] = {"pruned_tokens_per_s": pruned, "full_tokens_per_s": full}
        print(json.dumps({"decode_batch": batch, **decode[batch]}), flush=True)
    return decode


def kept_ids_section(width: dict, budgets, batches, layers: int, device) -> dict:
    """In float32 on ``device``: are the visual ids the pass-built program keeps identical to the eager reference
    pruner's? bfloat16 rounding may flip near-tied scores, so the identity is checked where it is defined."""
    model = geometry.build(width, device=device.type)
    rows = []
    for batch in batches:
        inputs = geometry.prompt(model, TEXT_TOKENS, device=device.type, batch=batch)
        for keep in budgets:
            prune = PruneConfig(plan=plan_budget(keep, layers, 576))
            with torch.no_grad():
                expected = reference_prune(model, prune, **inputs).kept
                kept = prune_prefill(model, prune, inputs)().kept
                row = {"batch": batch, "budget": keep, "eager": _same_ids(kept, expected)}
            rows.append(row)
            print(json.dumps({"kept_ids_identical": row}), flush=True)
    return {"geometry": f"LLaVA-1.5-7B geometry, {width['hidden']} wide, float32", "rows": rows, "model": model}


def inductor_section(model, kept_model, budgets, batches, layers: int, device, dtype, deadline: float, run: Run):
    """The torch-compile target's compiler on the pruned and unpruned programs at the first budget, and the kept
    ids of the compiled float32 program; skipped once ``deadline`` seconds of the run have passed."""
    keep = budgets[0]
    prune = PruneConfig(plan=plan_budget(keep, layers, 576))
    options = dict(mode=compile_mode(device), dynamic=False)
    rows = []
    for batch in batches:
        if run.elapsed() > deadline:
            rows.append({"batch": batch, "budget": keep, "skipped": f"past the {deadline:.0f} s deadline"})
            continue
        inputs = _prompt(model, batch, device, dtype)
        with torch.no_grad():
            pruned = prune_prefill(model, prune, inputs)
            unpruned = _unpruned(model, prune, inputs, pruned)
            row = {"batch": batch, "budget": keep}
            for name, program in (("pruned", pruned), ("unpruned", unpruned)):
                start = time.perf_counter()
                fast = torch.compile(program.program.module(), **options)
                fast(*program.example_args)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                row[f"{name}_compile_s"] = round(time.perf_counter() - start, 1)
                row[f"{name}_ms"] = timed_ms(lambda fast=fast, program=program: fast(*program.example_args), 10, device)
            row["speedup"] = row["unpruned_ms"] / row["pruned_ms"]
        rows.append(row)
        print(json.dumps({"inductor": row}), flush=True)
        run.results["inductor"] = {"prefill": rows}
        run.save()
    compiled_ids = None
    if run.elapsed() <= deadline:
        inputs = geometry.prompt(kept_model, TEXT_TOKENS, device=device.type, batch=batches[0])
        with torch.no_grad():
            pruned = prune_prefill(kept_model, prune, inputs)
            fast = torch.compile(pruned.program.module(), **options)
            flat = fast(*pruned.example_args)
            expected = reference_prune(kept_model, prune, **inputs).kept
            compiled_ids = {
                "batch": batches[0],
                "budget": keep,
                "identical": _same_ids(PrefillOutputs.from_flat(flat, len(expected)).kept, expected),
            }
    return {"prefill": rows, "kept_ids_identical_float32": compiled_ids}


def measure(smoke: bool, out: Path | None, deadline: float) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    budgets = (192, 64) if smoke else (192, 128, 64)
    batches = (1, 2) if smoke else (1, 8)
    repeats = 3 if smoke else 10
    width = SMOKE if smoke else geometry.LLAVA_7B
    layers = width.get("layers", 32)
    run = Run(out, smoke, device, dtype)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model = geometry.build(width, device=device.type, dtype=dtype)
    rows, profiles = prefill_section(model, budgets, batches, layers, repeats, device, dtype)
    run.section("prefill", rows, device)
    run.section("profiles_batch1_budget192", profiles, device)
    run.section("decode_budget_192", decode_section(model, layers, (1, 2) if smoke else (1, 32), device, dtype), device)
    kept = kept_ids_section(SMOKE if smoke else geometry.LLAVA_LATENCY, budgets, batches, layers, device)
    kept_model = kept.pop("model")
    run.section("kept_ids_identical_float32", kept, device)
    inductor = inductor_section(model, kept_model, budgets, batches, layers, device, dtype, deadline, run)
    run.section("inductor", inductor, device)
    run.results["total_seconds"] = round(run.elapsed(), 1)
    run.save()
    return run.results


def markdown(results: dict) -> str:
    lines = [
        f"### GPU prefill and decode, {results['geometry']}; {results['device']}, "
        + ", ".join(f"{name} {version}" for name, version in results["versions"].items()),
        "",
        "| batch | budget | unmodified eager | reference eager | pruned eager | unpruned eager | pruned CUDA graph "
        "| unpruned CUDA graph | speedup (CUDA graph) | CLSE stage share |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results.get("prefill", []):
        t = row["prefill_ms"]
        lines.append(
            f"| {row['batch']} | {row['budget']} | {t['unmodified_eager']:.1f} ms | {t['reference_eager']:.1f} ms "
            f"| {t['pruned_eager']:.1f} ms | {t['unpruned_eager']:.1f} ms | {t['pruned_compiled']:.1f} ms "
            f"| {t['unpruned_compiled']:.1f} ms | {row['compiled_speedup']:.2f}x | {100 * row['stage_share']:.1f}% |"
        )
    for row in (results.get("inductor") or {}).get("prefill", []):
        if "skipped" in row:
            lines.append(f"\nInductor (reduce-overhead), batch {row['batch']}: skipped ({row['skipped']})")
            continue
        lines.append(
            f"\nInductor (reduce-overhead), batch {row['batch']}, budget {row['budget']}: pruned "
            f"{row['pruned_ms']:.1f} ms, unpruned {row['unpruned_ms']:.1f} ms ({row['speedup']:.2f}x; compiles "
            f"{row['pruned_compile_s']:.0f} s and {row['unpruned_compile_s']:.0f} s)"
        )
    for batch, d in results.get("decode_budget_192", {}).items():
        lines.append(
            f"\nDecode at batch {batch} (192, CUDA graph a step): {d['pruned_tokens_per_s']:.0f} tokens/s pruned KV, "
            f"{d['full_tokens_per_s']:.0f} full KV ({d['pruned_tokens_per_s'] / d['full_tokens_per_s']:.2f}x)"
        )
    check = results.get("kept_ids_identical_float32")
    if check:
        kept = check["rows"]
        compiled = (results.get("inductor") or {}).get("kept_ids_identical_float32")
        compiled_text = (
            f", Inductor-compiled (batch {compiled['batch']}, {compiled['budget']}) {compiled['identical']}"
            if compiled
            else ""
        )
        lines.append(
            f"\nKept visual ids identical to the reference pruner's ({check['geometry']}): eager "
            f"{sum(row['eager'] for row in kept)} of {len(kept)} budget x batch cases{compiled_text}"
        )
    peaks = {k: v for k, v in results.get("peak_memory_gib", {}).items() if v is not None}
    if peaks:
        lines.append(
            "\nPeak GPU memory (GiB, cumulative): " + ", ".join(f"{name} {gib:.1f}" for name, gib in peaks.items())
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="1/64 width, 4 layers: check the script in a minute")
    parser.add_argument("--out", type=Path, help=f"results JSON (default: {RESULTS}; smoke runs write none)")
    parser.add_argument(
        "--deadline", type=float, default=420, help="seconds after which the Inductor compiles are skipped"
    )
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        parser.error("no CUDA device is visible; run on a GPU machine, or pass --smoke to check the script")
    results = measure(args.smoke, args.out or (None if args.smoke else RESULTS), args.deadline)
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
