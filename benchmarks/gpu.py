"""GPU prefill and decode figures at LLaVA-1.5-7B geometry: `python -m benchmarks.gpu` on a CUDA machine.

Random weights in bfloat16, batch 1 and 8, budgets 192/128/64 of 576 visual tokens. Per budget and batch:
prefill ms of the unmodified model (eager), the eager reference pruner, the pass-built program (eager) and the
same program compiled by Inductor with CUDA graphs, beside the unpruned program compiled the same way; the share
of CLSE stage time in the eager pruned prefill (profiler, kernels under the stages' graph nodes); decode tokens/s
of the compiled static-KV decode step at batch 1 and 32, pruned vs full KV; peak GPU memory; and, in float32 at
1/8 width, whether the kept visual ids equal the reference pruner's. Writes
benchmarks/results/gpu.json and prints a Markdown table naming the device and versions.

`--smoke` runs the same code on the CPU at 1/64 width with 2 budgets, to check the script without a GPU.
Installing on a machine without network: copy a transformers wheel (and this repository) there, then
`pip install --no-deps transformers-*.whl && pip install --no-deps -e .` next to its own PyTorch.
"""

from __future__ import annotations

import argparse
import dataclasses
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
SMOKE = dict(hidden=64, intermediate=172, heads=2, vocab=512, vision_hidden=32, vision_layers=1)


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


class _StageLabels(fx.Interpreter):
    """Runs a graph node by node, each node traced from a CLSE stage under a profiler range of its own."""

    def run_node(self, node: fx.Node):
        stack = node.meta.get("nn_module_stack") or {}
        if any(str(path).startswith("clse.stage") for path, _ in stack.values()):
            with torch.profiler.record_function("clse_stage"):
                return super().run_node(node)
        return super().run_node(node)


def stage_share(program: torch.export.ExportedProgram, args: tuple, device: torch.device) -> float:
    """Share of the eager prefill's kernel time spent in the CLSE stages (scores, top-K, gathers)."""
    module = program.module()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.no_grad():
        _StageLabels(module).run(*args)  # warm-up
        with torch.profiler.profile(activities=activities) as prof:
            _StageLabels(module).run(*args)
    kind = "device" if device.type == "cuda" else "cpu"
    events = prof.key_averages()
    # The range's total holds the time of everything run inside it; self times add up to the whole run.
    stage = sum(getattr(e, f"{kind}_time_total") for e in events if e.key == "clse_stage")
    total = sum(getattr(e, f"self_{kind}_time_total") for e in events)
    return stage / max(total, 1e-9)


def decode_tokens_per_s(model, lengths: list[int], batch: int, steps: int, device, dtype) -> float:
    """Tokens/s of the compiled static-KV decode step over caches of ``lengths`` (values do not matter)."""
    text = model.config.text_config
    head_dim = text.hidden_size // text.num_attention_heads
    cache = [
        (torch.randn(batch, text.num_key_value_heads, n, head_dim, device=device, dtype=dtype),) * 2 for n in lengths
    ]
    decode = StaticDecodeStep(model, cache, steps + 2)
    decode.load(cache)
    step_fn = torch.compile(decode, fullgraph=True, dynamic=False, mode=compile_mode(device))
    token = torch.ones(batch, 1, dtype=torch.long, device=device)
    pads = torch.zeros(batch, dtype=torch.long, device=device)
    position = torch.full((batch, 1), max(lengths), device=device)

    def run():
        for step in range(steps):
            step_fn(token, position + step, torch.tensor(step, device=device), pads)

    with torch.no_grad():
        ms = timed_ms(run, 3, device)
    return batch * steps / (ms / 1e3)


def prefill_times(model, prune, inputs, pruned, unpruned_compiled, repeats: int, device) -> dict[str, float]:
    """Prefill ms of the reference pruner and the pass-built program, eager and compiled, and of the compiled
    unpruned program, on the same inputs."""
    program, args = pruned.program.module(), pruned.example_args
    fast = torch.compile(program, mode=compile_mode(device), dynamic=False)
    return {
        "reference_eager": timed_ms(lambda: reference_prune(model, prune, **inputs), repeats, device),
        "pruned_eager": timed_ms(lambda: program(*args), repeats, device),
        "pruned_compiled": timed_ms(lambda: fast(*args), repeats, device),
        "unpruned_compiled": timed_ms(lambda: unpruned_compiled(*args), repeats, device),
    }


def kept_ids_check(width: dict, budgets, batches, device: torch.device) -> list[dict]:
    """In float32 on ``device``: are the visual ids the pass-built program keeps, eager and (first batch and budget)
    compiled, identical to the eager reference pruner's? bfloat16 rounding may flip near-tied scores, so the
    identity is checked where it is defined, in float32."""
    model = geometry.build(width, device=device.type)
    rows = []
    for batch in batches:
        inputs = geometry.prompt(model, 40, device=device.type, batch=batch)
        for keep in budgets:
            prune = PruneConfig(plan=plan_budget(keep, 32, 576))
            with torch.no_grad():
                pruned = prune_prefill(model, prune, inputs)
                expected = reference_prune(model, prune, **inputs).kept
                row = {"batch": batch, "budget": keep, "eager": _same_ids(pruned().kept, expected)}
                if (batch, keep) == (batches[0], budgets[0]):  # one compile: the script's time is bounded
                    fast = torch.compile(pruned.program.module(), mode=compile_mode(device), dynamic=False)
                    flat = fast(*pruned.example_args)
                    row["compiled"] = _same_ids(PrefillOutputs.from_flat(flat, len(expected)).kept, expected)
            rows.append(row)
            print(json.dumps({"kept_ids_identical": row}), flush=True)
    return rows


def _same_ids(kept: list[torch.Tensor], expected: list[torch.Tensor]) -> bool:
    return len(kept) == len(expected) and all(torch.equal(a, b) for a, b in zip(kept, expected))


def measure(smoke: bool) -> dict:
    device = torch.device("cpu" if smoke else "cuda")
    dtype = torch.float32 if smoke else torch.bfloat16
    budgets = (192, 64) if smoke else (192, 128, 64)
    batches = (1, 2) if smoke else (1, 8)
    repeats = 3 if smoke else 10
    model = geometry.build(SMOKE if smoke else geometry.LLAVA_7B, device=device.type, dtype=dtype)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    compiled = {}
    rows = []
    for batch in batches:
        inputs = geometry.prompt(model, 40, device=device.type, batch=batch)
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        with torch.no_grad():
            unmodified_ms = timed_ms(lambda inputs=inputs: model(**inputs), repeats, device)
        for keep in budgets:
            prune = PruneConfig(plan=plan_budget(keep, 32, 576))
            with torch.no_grad():
                pruned = prune_prefill(model, prune, inputs)
                if batch not in compiled:  # the unpruned program: same passes and export, no stage
                    settings = dataclasses.replace(pruned.settings, stages=())
                    unpruned = prune_prefill(model, prune, inputs, settings=settings)
                    compiled[batch] = torch.compile(unpruned.program.module(), mode=compile_mode(device), dynamic=False)
                times = prefill_times(model, prune, inputs, pruned, compiled[batch], repeats, device)
                times["unmodified_eager"] = unmodified_ms
                share = stage_share(pruned.program, pruned.example_args, device)
            rows.append(
                {
                    "batch": batch,
                    "budget": keep,
                    "stages": [list(s) for s in prune.plan.stages],
                    "prefill_ms": times,
                    "compiled_speedup": times["unpruned_compiled"] / times["pruned_compiled"],
                    "stage_share": share,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    text_tokens, plan = 40, plan_budget(192, 32, 576)
    decode = {}
    for batch in (1, 32) if not smoke else (1, 2):
        with torch.no_grad():
            decode[batch] = {
                "pruned_tokens_per_s": decode_tokens_per_s(
                    model, [text_tokens + plan.stages[-1][1]] * 32, batch, 32, device, dtype
                ),
                "full_tokens_per_s": decode_tokens_per_s(model, [text_tokens + 576] * 32, batch, 32, device, dtype),
            }
    kept = {
        "geometry": "LLaVA-1.5-7B at " + ("1/64 width (smoke)" if smoke else "1/8 width") + ", float32",
        "rows": kept_ids_check(SMOKE if smoke else geometry.LLAVA_LATENCY, budgets, batches, device),
    }
    return {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"CPU (smoke, {platform.machine()})",
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
        "geometry": "LLaVA-1.5-7B" + (" at 1/64 width (smoke)" if smoke else "") + f", {dtype}, 40 text + 576 visual",
        "prefill": rows,
        "decode_budget_192": decode,
        "kept_ids_identical_float32": kept,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
    }


def markdown(results: dict) -> str:
    lines = [
        f"### GPU prefill and decode, {results['geometry']}; {results['device']}, "
        + ", ".join(f"{name} {version}" for name, version in results["versions"].items()),
        "",
        "| batch | budget | unmodified eager | reference eager | pruned eager | pruned compiled | unpruned compiled "
        "| compiled speedup | CLSE stage share |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results["prefill"]:
        t = row["prefill_ms"]
        lines.append(
            f"| {row['batch']} | {row['budget']} | {t['unmodified_eager']:.1f} ms | {t['reference_eager']:.1f} ms "
            f"| {t['pruned_eager']:.1f} ms | {t['pruned_compiled']:.1f} ms | {t['unpruned_compiled']:.1f} ms "
            f"| {row['compiled_speedup']:.2f}x | {100 * row['stage_share']:.1f}% |"
        )
    for batch, d in results["decode_budget_192"].items():
        lines.append(
            f"\nDecode at batch {batch} (192): {d['pruned_tokens_per_s']:.0f} tokens/s pruned KV, "
            f"{d['full_tokens_per_s']:.0f} full KV"
        )
    check = results["kept_ids_identical_float32"]
    kept = check["rows"]
    compiled = [row["compiled"] for row in kept if "compiled" in row]
    lines.append(
        f"\nKept visual ids identical to the reference pruner's ({check['geometry']}): eager "
        f"{sum(row['eager'] for row in kept)} of {len(kept)} budget x batch cases, compiled {sum(compiled)} of "
        f"{len(compiled)}"
    )
    if results["peak_memory_gib"] is not None:
        lines.append(f"\nPeak GPU memory: {results['peak_memory_gib']:.1f} GiB")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, 1/64 width: check the script without a GPU")
    parser.add_argument("--out", type=Path, help=f"results JSON (default: {RESULTS}; smoke runs write none)")
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        parser.error("no CUDA device is visible; run on a GPU machine, or pass --smoke to check the script")
    results = measure(args.smoke)
    out = args.out or (None if args.smoke else RESULTS)
    if out is not None:
        out.write_text(json.dumps(results, indent=2) + "\n")
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
