"""Accuracy proxy per weight precision: `python -m benchmarks.accuracy_precision [--limit N]`.

The shipped proxy LLaVA compiled as a full bundle at fp32, bf16 (``--dtype bfloat16``), int8 and int4
(``--weight-format``), unpruned and at the accuracy table's three budgets (three-stage plans, the default
``clse_attn`` score), each bundle's prefill run through ``Engine`` (its shared, memory-mapped weights) over the
procedural VQA test split; the answer is the greedy first token, as in ``benchmarks.accuracy``. Writes
benchmarks/results/accuracy/precision.json (the docs' table is generated from it). Bundles are cached per
configuration in --cache. Not part of CI (about 20 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

HERE = Path(__file__).parent
OUT = HERE / "results" / "accuracy" / "precision.json"
# precision -> compile options (the checkpoint is loaded in the dtype, as clse-compile --dtype does)
PRECISIONS = {
    "fp32": {},
    "bf16": {"dtype": "bfloat16"},
    "int8": {"weight_format": "int8"},
    "int4": {"weight_format": "int4"},
}


def evaluate(model_dir: Path, items, cache: Path, precision: str, batch: int = 20) -> list[dict]:
    """Every budget of one precision: accuracy, average visual tokens per layer and the bundle's weight bytes."""
    import clse_fx
    from clse_fx.api import load_checkpoint
    from clse_fx.deploy.engine import Engine
    from clse_fx.models import adapter_for
    from clse_fx.proxy.evaluate import BUDGETS, accuracy_report, batched_feeds, plans, run_engine
    from clse_fx.proxy.model import TEXT_LEN

    options = PRECISIONS[precision]
    model, processor = load_checkpoint(model_dir, dtype=options.get("dtype", "float32"))
    adapter = adapter_for(model)
    num_visual = adapter.tokens_per_image()
    schedules = {"unpruned": [(1, num_visual)]}
    schedules.update(
        {budget: plans(adapter.num_layers, num_visual, ratio)["3-stage"] for budget, ratio in BUDGETS.items()}
    )
    rows = []
    for budget, stages in schedules.items():
        bundle = cache / f"{precision}-{budget.replace('/', 'of')}"
        start = time.perf_counter()
        if not bundle.is_dir():
            clse_fx.compile(
                model,
                stages=stages,
                batch=batch,
                text_len=TEXT_LEN,
                output_dir=bundle,
                processor=processor,
                verify=False,
                weight_format=options.get("weight_format"),
            )
        engine = Engine.load(bundle)
        feeds = batched_feeds(processor.tokenizer, items, num_visual, batch)
        words, _ = run_engine(engine.prefill, feeds, len(items), len(stages), num_visual, processor.tokenizer)
        report = accuracy_report(words, items)
        rows.append(
            {
                "precision": precision,
                "budget": budget,
                "accuracy": report["overall"],
                "avg_visual_tokens": engine.manifest.plan.avg_visual_tokens,
                "weights_bytes": (bundle / "weights.data").stat().st_size,
                "seconds": round(time.perf_counter() - start, 1),
            }
        )
        print(f"{precision:5s} {budget:9s} accuracy {100 * report['overall']:.2f}%", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.accuracy_precision", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--limit", type=int, help="use the first N test questions (default: all 600)")
    parser.add_argument(
        "--precisions", default=",".join(PRECISIONS), help="comma-separated subset of fp32,bf16,int8,int4"
    )
    parser.add_argument("--cache", default="/tmp/clse-precision-cache", type=Path, help="bundle cache")
    parser.add_argument("--out", default=OUT, type=Path, help="results JSON")
    args = parser.parse_args(argv)
    from clse_fx.cli import _quiet_transformers
    from clse_fx.demo import proxy_model_dir
    from clse_fx.proxy.data import make_split

    _quiet_transformers()
    items = make_split("test")[: args.limit]
    args.cache.mkdir(parents=True, exist_ok=True)
    rows = [row for p in args.precisions.split(",") for row in evaluate(proxy_model_dir(), items, args.cache, p)]
    args.out.write_text(json.dumps({"questions": len(items), "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
