"""One command for every benchmark figure: `python -m benchmarks.run [--quick | --families]`.

`--families` recounts only the meta-device FLOP/KV rows of the model families (about 3 minutes) into the last
full results, keeping its measured latency and compile times.

Writes benchmarks/results/{quick,full}.json and summary.md (plus PNG plots and the docs' tables on a full
run: benchmarks/docs.py), prints the summary, and exits 1 when a machine-independent figure (FLOP/KV ratios, ONNX
node counts, TensorRT findings) regresses past benchmarks/thresholds.json; the last line is the verdict.
Wall-clock times are reported, never checked.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from benchmarks import compile_time, docs, flops_kv, report

HERE = Path(__file__).parent
THRESHOLDS = HERE / "thresholds.json"


def collect(quick: bool) -> dict:
    results: dict = {"mode": "quick" if quick else "full"}
    with torch.no_grad():
        results["llava_7b"] = flops_kv.llava_7b(budgets=(192,) if quick else (192, 128, 64))
    results["compile"] = {"tiny random LLaVA (tests)": compile_time.measure("tiny")}
    if not quick:
        from benchmarks import latency

        results.update(families())
        results["compile"]["demo (clse-compile --demo --keep 64 --score clse)"] = compile_time.measure("demo")
        results["compile"]["1/8-width LLaVA-1.5 latency model"] = compile_time.measure("latency")
        results["latency"] = latency.run()
    return results


def families() -> dict:
    """FLOP and KV rows of every other family at its published geometry (meta device, about 3 minutes)."""
    with torch.no_grad():
        return {key: getattr(flops_kv, key)() for key in report.FAMILIES}


def checked_figures(results: dict) -> dict[str, float]:
    tiny = results["compile"]["tiny random LLaVA (tests)"]
    row = next(r for r in results["llava_7b"]["rows"] if r["budget"] == 192)
    return {
        "tiny_flops_ratio": tiny["flops_ratio"],
        "tiny_kv_ratio": tiny["kv_ratio"],
        "tiny_prefill_onnx_nodes": tiny["onnx_nodes"]["prefill"],
        "tiny_decode_onnx_nodes": tiny["onnx_nodes"]["decode"],
        "tiny_tensorrt_findings": tiny["tensorrt_findings"],
        "llava7b_flops_ratio_192": row["flops_ratio"],
        "llava7b_kv_ratio_192": row["kv_ratio_uniform"],
    }


def regressions(figures: dict[str, float], thresholds: dict[str, dict[str, float]]) -> list[str]:
    failures = []
    for name, bound in thresholds.items():
        value = figures[name]
        if "min" in bound and value < bound["min"]:
            failures.append(f"{name} = {value:.4g} fell below {bound['min']:.4g}")
        if "max" in bound and value > bound["max"]:
            failures.append(f"{name} = {value:.4g} rose above {bound['max']:.4g}")
    return failures


def verdict(failures: list[str], thresholds: dict) -> str:
    """The run's last line: whether every machine-independent figure stayed within its bound, or which did not."""
    if not failures:
        return f"verdict: all {len(thresholds)} thresholds passed (benchmarks/thresholds.json)"
    names = ", ".join(failure.split(" = ")[0] for failure in failures)
    return f"verdict: {len(failures)} of {len(thresholds)} thresholds failed: {names} (benchmarks/thresholds.json)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CI mode: tiny model and FLOP/KV counts only")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument(
        "--families", action="store_true", help="recount only the families' FLOP/KV rows into the last full results"
    )
    args = parser.parse_args(argv)

    if args.families:  # the rest of full.json (latency, compile times) is kept as it was measured
        results = json.loads((args.out / "full.json").read_text()) | families()
    else:
        results = collect(args.quick)
    figures = checked_figures(results)
    results["checked"] = figures
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{results['mode']}.json").write_text(json.dumps(results, indent=2) + "\n")
    summary = report.markdown(results)
    (args.out / "summary.md" if not args.quick else args.out / "quick.md").write_text(summary)
    if not args.quick:
        report.plots(results, args.out)
        docs.update()  # the docs' tables, from the results just written
    print(summary)
    thresholds = json.loads(THRESHOLDS.read_text())
    failures = regressions(figures, thresholds)
    for failure in failures:
        print(f"REGRESSION: {failure}", file=sys.stderr)
    print(verdict(failures, thresholds), flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
