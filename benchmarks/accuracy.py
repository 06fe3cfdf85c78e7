"""Accuracy proxy: `python -m benchmarks.accuracy [--model DIR] [--limit N]`.

Compiles the trained proxy LLaVA (clse_fx/assets/proxy_llava by default) once per method x budget x plan,
runs each prefill engine on ONNX Runtime over the procedural VQA test split, and writes under
benchmarks/results/accuracy/: results.json, table.md, summary.md and PNG plots (accuracy vs budget,
accuracy by the queried object's grid row, keep frequency per grid position). Engines are cached per
configuration in --cache, so an interrupted run resumes. Not part of CI (about 12 minutes on one thread).
`python -m benchmarks.accuracy --plot-only [--out DIR]` only redraws the PNG plots from DIR/results.json (seconds).
`--reuse-results` seeds the cache with the runs of OUT/results.json, so only configurations missing there (a new
method) are compiled. Each score's stage cost (one stage alone on ONNX Runtime, one thread) is measured too.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).parent
OUT = HERE / "results" / "accuracy"
FOCUS_BUDGET = "64/576"  # the position-bias plots use the tightest budget, where selection matters most


def _label(row: dict) -> str:
    return f"{row['method']} [{row['plan']}]"


def table(results: list[dict], unpruned: float) -> str:
    """The paper-style table: rows = method and plan, columns = budget; accuracy and share of unpruned."""
    budgets = list(dict.fromkeys(r["budget"] for r in results if r["budget"] != "unpruned"))
    visual = len(results[0]["keep_counts"][0])

    def header(budget: str) -> str:  # "64/576": LLaVA-1.5's budget name, the same share of this model's tokens
        count, total = (int(n) for n in budget.split("/"))
        return f"{budget} = demo --keep {round(count / total * visual)} [avg tokens/layer]"

    lines = [
        "| method | plan | " + " | ".join(header(b) for b in budgets) + " |",
        "|---|---|" + "---|" * len(budgets),
    ]
    lines.append("| unpruned | - | " + " | ".join([f"{100 * unpruned:.1f} (100%) [{visual}]"] * len(budgets)) + " |")
    rows = [r for r in results if r["budget"] != "unpruned"]
    for plan in ("3-stage", "1-stage"):
        for method in dict.fromkeys(r["method"] for r in rows if r["plan"] == plan):
            cells = []
            for budget in budgets:
                run = next(r for r in rows if (r["method"], r["plan"], r["budget"]) == (method, plan, budget))
                share = 100 * run["accuracy"] / unpruned
                cells.append(f"{100 * run['accuracy']:.1f} ({share:.1f}%) [{run['avg_visual_tokens']:.0f}]")
            lines.append(f"| {method} | {plan} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def question_only(items) -> float:
    """Accuracy of a model that ignores the image: the most common answer of each question type."""
    from collections import Counter

    kinds = Counter(i.kind for i in items)
    return sum(Counter(i.answer for i in items if i.kind == k).most_common(1)[0][1] for k in kinds) / len(items)


def reading(unpruned: float, floor: float, questions: int) -> str:
    """The honest headline: whether the model reads the image well enough for the table to rank methods."""
    error = 100 * (unpruned * (1 - unpruned) / questions) ** 0.5
    head = f"One standard error of an accuracy here is about {error:.1f} points. "
    if unpruned - floor < 0.2:
        return head + (
            f"**The unpruned model is only {100 * (unpruned - floor):.1f} points above the question-only floor: it "
            "hardly reads the image, so differences between methods are noise and this table does not rank them.**"
        )
    return head + "Differences smaller than about two standard errors do not rank methods."


def by_type_table(results: list[dict]) -> str:
    """Accuracy per question type at the focus budget (and unpruned)."""
    kinds = list(results[0]["by_type"])
    lines = ["| method | plan | " + " | ".join(kinds) + " |", "|---|---|" + "---|" * len(kinds)]
    for r in results:
        if r["budget"] in ("unpruned", FOCUS_BUDGET):
            lines.append(
                f"| {r['method']} | {r['plan'] if r['budget'] != 'unpruned' else '-'} | "
                + " | ".join(f"{100 * r['by_type'][k]:.1f}" for k in kinds)
                + " |"
            )
    return "\n".join(lines)


def findings(results: list[dict], unpruned: float) -> list[str]:
    """Plain statements comparing CLSE with every other method, budget by budget (generated, not edited)."""
    lines = []
    rows = [r for r in results if r["budget"] != "unpruned"]
    for plan in ("3-stage", "1-stage"):
        for budget in dict.fromkeys(r["budget"] for r in rows):
            cell = sorted((r for r in rows if (r["plan"], r["budget"]) == (plan, budget)), key=lambda r: -r["accuracy"])
            clse = next(r for r in cell if r["method"].startswith("CLSE (clse_attn)"))
            better = [f"{r['method']} {100 * r['accuracy']:.1f}" for r in cell if r["accuracy"] > clse["accuracy"]]
            lines.append(
                f"- {plan}, {budget}: CLSE {100 * clse['accuracy']:.1f}% "
                f"({100 * clse['accuracy'] / unpruned:.1f}% of unpruned); best {cell[0]['method']} "
                f"{100 * cell[0]['accuracy']:.1f}%; "
                + (f"methods above CLSE: {', '.join(better)}" if better else "no method above CLSE")
            )
    return lines


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend (benchmarks run headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _colours(rows: list[dict]) -> dict[str, str]:
    """One colour per method, the same in every plot."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    return dict(zip(methods, _pyplot().rcParams["axes.prop_cycle"].by_key()["color"] * 2))


def _legend_outside(fig) -> None:
    """One legend for the whole figure, right of the panels so it covers no data, naming every line once.

    Collected from every panel: a method drawn in one panel only (CLSE-M has no 1-stage runs) still gets its
    entry, which a legend of one panel would drop."""
    handles = {}
    for ax in fig.axes:
        for line in ax.get_lines():
            handles.setdefault(line.get_label(), line)
    handles = {label: line for label, line in handles.items() if not label.startswith("_")}  # "_": unlabelled
    fig.legend(list(handles.values()), list(handles), loc="outside right upper", fontsize=8)


def accuracy_vs_budget_figure(results: list[dict], grid: int):
    """The accuracy_vs_budget.png figure: accuracy against average visual tokens per layer, one panel per plan."""
    plt = _pyplot()
    unpruned = next(r for r in results if r["budget"] == "unpruned")
    rows = [r for r in results if r["budget"] != "unpruned"]
    colours = _colours(rows)
    methods = list(colours)

    # constrained layout makes room for the figure legend outside the panels ("outside right upper").
    fig, axes = plt.subplots(1, 2, figsize=(14, 4.5), sharey=True, layout="constrained")
    for ax, plan in zip(axes, ("3-stage", "1-stage")):
        for method in methods:
            chosen = (r for r in rows if (r["method"], r["plan"]) == (method, plan))
            runs = sorted(chosen, key=lambda r: r["avg_visual_tokens"])
            if runs:
                x = [r["avg_visual_tokens"] for r in runs]
                ax.plot(x, [100 * r["accuracy"] for r in runs], "o-", label=method, color=colours[method])
        ax.axhline(100 * unpruned["accuracy"], color="k", ls="--", lw=1, label="unpruned")
        # Every run of a budget has the same average visual tokens per layer: one tick per budget, named by it.
        ticks = {r["budget"]: r["avg_visual_tokens"] for r in rows if r["plan"] == plan}
        ax.set_xticks(list(ticks.values()), [f"{budget}\n({avg:.0f} of {grid**2})" for budget, avg in ticks.items()])
        ax.set(title=f"{plan} plans", xlabel="budget (LLaVA-1.5's name) and average visual tokens per layer")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy (%)")
    _legend_outside(fig)
    fig.suptitle(f"Proxy LLaVA ({grid}x{grid} visual grid): accuracy vs budget")
    return fig


def accuracy_by_row_figure(results: list[dict], items, grid: int):
    """The accuracy_by_row.png figure: accuracy by the queried object's band of grid rows at the focus budget."""
    from clse_fx.proxy.evaluate import GRID_BANDS, accuracy_by_band

    plt = _pyplot()
    unpruned = next(r for r in results if r["budget"] == "unpruned")
    rows = [r for r in results if r["budget"] != "unpruned"]
    colours = _colours(rows)
    methods = list(colours)

    def percent(accuracies: list) -> list[float]:
        return [np.nan if a is None else 100 * a for a in accuracies]  # None: no question in that band, a gap

    fig, axes = plt.subplots(1, 2, figsize=(14, 4.5), sharey=True, layout="constrained")
    bands = [f"rows {b * grid // GRID_BANDS}-{(b + 1) * grid // GRID_BANDS - 1}" for b in range(GRID_BANDS)]
    for ax, plan in zip(axes, ("3-stage", "1-stage")):
        for method in methods:
            run = next((r for r in rows if (r["method"], r["plan"], r["budget"]) == (method, plan, FOCUS_BUDGET)), None)
            if run:
                acc = accuracy_by_band(run["correct"], items, grid)
                ax.plot(bands, percent(acc), "o-", label=method, color=colours[method])
        acc = accuracy_by_band(unpruned["correct"], items, grid)
        ax.plot(bands, percent(acc), "k--", label="unpruned")
        ax.set(title=f"{plan}, budget {FOCUS_BUDGET}", xlabel="queried object's grid rows (0 = top)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy (%), questions about one object")
    _legend_outside(fig)
    return fig


def plots(results: list[dict], items, grid: int, out: Path) -> None:
    """accuracy_vs_budget.png, accuracy_by_row.png and keep_heatmap.png."""
    plt = _pyplot()
    for name, fig in (
        ("accuracy_vs_budget.png", accuracy_vs_budget_figure(results, grid)),
        ("accuracy_by_row.png", accuracy_by_row_figure(results, items, grid)),
    ):
        fig.savefig(out / name, dpi=110)
        plt.close(fig)

    rows = [r for r in results if r["budget"] != "unpruned"]
    focus = [r for r in rows if (r["plan"], r["budget"]) == ("3-stage", FOCUS_BUDGET)]
    fig, axes = plt.subplots(2, len(focus), figsize=(2.2 * len(focus), 5.4), squeeze=False, layout="constrained")
    for col, run in enumerate(focus):
        counts = np.array(run["keep_counts"], dtype=np.float64) / len(run["correct"])
        for row, stage in enumerate((0, len(counts) - 1)):
            ax = axes[row][col]
            image = ax.imshow(counts[stage].reshape(grid, grid), vmin=0, vmax=1, cmap="viridis")
            ax.set_xticks([])
            ax.set_yticks([])
            keep = run["stages"][stage][1]
            if row == 0:
                ax.set_title(run["method"].replace(" (", "\n("), fontsize=8)
            ax.set_xlabel(f"stage {stage + 1}: keep {keep}", fontsize=8)
    fig.suptitle(f"How often each grid position is kept (3-stage, {FOCUS_BUDGET}; top: first stage, bottom: last)")
    fig.colorbar(image, ax=axes, shrink=0.8, label="share of test questions that keep it")
    fig.savefig(out / "keep_heatmap.png", dpi=110)
    plt.close(fig)


STAGE_TEXT = (12, 4)  # text tokens before and after the image in the stage-cost input (the proxy prompt's shape)


def _stage_inputs(config, spec, seed: int = 0) -> tuple:
    """Random inputs of one stage on the proxy's prefill geometry (batch 1): the clse_stage arguments."""
    from clse_fx.passes.ops import sequence_positions

    text, grid = config.text_config, spec.num_current
    before, after = STAGE_TEXT
    ids = torch.tensor([[1] * before + [config.image_token_id] * grid + [2] * after])
    heads, kv_heads = text.num_attention_heads, text.num_key_value_heads
    head_dim = text.hidden_size // heads
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(1, ids.shape[1], text.hidden_size, generator=generator)
    query = torch.randn(1, heads, ids.shape[1], head_dim, generator=generator)
    key = torch.randn(1, kv_heads, ids.shape[1], head_dim, generator=generator)
    weight = torch.ones(text.hidden_size)
    return ids, sequence_positions(ids), hidden, hidden, query, key, None, None, None, weight


def stage_cost_ms(config, score: str, layer: int, keep: int, workdir: Path, repeats: int = 30) -> float:
    """Median ms of one stage (score, top-K, survivor index) before ``layer`` keeping ``keep`` of the proxy's
    visual tokens, exported alone to ONNX and run on ONNX Runtime with one thread at batch 1."""
    from clse_fx.deploy.session import OnnxSession
    from clse_fx.passes.ops import clse_stage
    from clse_fx.plan import Plan, PruneConfig, grid_layout

    side = config.vision_config.image_size // config.vision_config.patch_size
    plan = Plan(stages=((layer, keep),), num_layers=config.text_config.num_hidden_layers, num_visual=side * side)
    spec = PruneConfig(plan=plan, score=score).stage_specs(grid_layout(1, side, side), (config.image_token_id,))[0]
    spec = spec._replace(scale=(config.text_config.hidden_size // config.text_config.num_attention_heads) ** -0.5)
    args = _stage_inputs(config, spec)
    query_args = args[4:6] if layer > 0 else (None, None)

    class Stage(torch.nn.Module):
        def forward(self, ids, positions, hidden, query, key, weight):
            return clse_stage(ids, positions, hidden, hidden, query, key, None, None, None, weight, spec=spec)[:3]

    inputs = (args[0], args[1], args[2], *query_args, args[9])
    names = [n for n, a in zip(("ids", "positions", "hidden", "query", "key", "weight"), inputs) if a is not None]
    path = workdir / f"stage-{score}-{layer}-{keep}.onnx"
    if not path.is_file():
        torch.onnx.export(Stage().eval(), inputs, path, input_names=names, dynamo=True, optimize=False)
    session = OnnxSession(path, threads=1)
    feeds = {name: a.numpy() for name, a in zip(names, (a for a in inputs if a is not None))}
    times = []
    for _ in range(repeats + 3):
        start = time.perf_counter()
        session.session.run(None, feeds)
        times.append(time.perf_counter() - start)
    return round(1000 * float(np.median(times[3:])), 3)


def stage_costs(model_dir: Path, results: list[dict], cache: Path) -> dict:
    """Per method, the cost of its first stage at each budget: {method: {plan: {budget: ms}}}, cached in ``cache``."""
    from transformers import AutoConfig

    file = cache / "stage_ms.json"
    costs = json.loads(file.read_text()) if file.is_file() else {}
    config = AutoConfig.from_pretrained(model_dir)
    for run in results:
        if run["budget"] == "unpruned" or run["merge"] != "none":
            continue
        layer, keep = run["stages"][0]
        budgets = costs.setdefault(run["method"], {}).setdefault(run["plan"], {})
        if run["budget"] not in budgets:
            budgets[run["budget"]] = stage_cost_ms(config, run["score"], layer, keep, cache)
            file.write_text(json.dumps(costs))
    return costs


def score_table(results: list[dict], costs: dict, unpruned: float) -> str:
    """Per score (no merging) and plan: share of unpruned accuracy and the first stage's ms at each budget."""
    rows = [r for r in results if r["budget"] != "unpruned" and r["merge"] == "none"]
    budgets = list(dict.fromkeys(r["budget"] for r in rows))
    head = " | ".join(f"{b} [% of unpruned, stage ms]" for b in budgets)
    lines = [f"| score | method | plan (first stage) | {head} |", "|---|---|---|" + "---|" * len(budgets)]
    for plan in ("1-stage", "3-stage"):
        for method in dict.fromkeys(r["method"] for r in rows if r["plan"] == plan):
            runs = {r["budget"]: r for r in rows if (r["method"], r["plan"]) == (method, plan)}
            first = runs[budgets[0]]["stages"][0][0]
            cells = [f"{100 * runs[b]['accuracy'] / unpruned:.1f}%, {costs[method][plan][b]:.2f} ms" for b in budgets]
            score = runs[budgets[0]]["score"]
            lines.append(f"| `{score}` | {method} | {plan} (layer {first}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def seed_cache(results_file: Path, cache: Path) -> int:
    """Write each run of a previous results.json into the per-configuration cache (the sweep's file names), so
    the sweep compiles only configurations missing there. Returns how many runs were written."""
    runs = json.loads(results_file.read_text())["runs"]
    cache.mkdir(parents=True, exist_ok=True)
    for run in runs:
        score = "clse_attn" if run["budget"] == "unpruned" else run["score"]
        key = f"{score}-{run['merge']}-{run['merge_metric']}-{run['budget'].replace('/', 'of')}-{run['plan']}"
        (cache / f"{key}.json").write_text(json.dumps(run))
    return len(runs)


def _grid(results: list[dict]) -> int:
    """Side of the square visual grid, from the length of a run's keep counts."""
    return int(round(len(results[0]["keep_counts"][0]) ** 0.5))


def redraw(out: Path = OUT) -> None:
    """Redraw the PNG plots from ``out``/results.json without rerunning the sweep."""
    from clse_fx.proxy.data import make_split

    data = json.loads((out / "results.json").read_text())
    # The sweep ran the first N questions of the fixed test split (main's --limit); the plots need their positions.
    items = make_split("test")[: data["questions"]]
    plots(data["runs"], items, _grid(data["runs"]), out)


def cross_checks(model_dir: Path, items, results: list[dict], cache: Path) -> dict:
    """Unpruned accuracy in eager PyTorch, and one full bundle (prefill + decode engines) through
    Engine.generate on a slice of the split, compared with the sweep's answers."""
    from PIL import Image

    import clse_fx
    from clse_fx.api import load_checkpoint
    from clse_fx.deploy.engine import Engine
    from clse_fx.models import adapter_for
    from clse_fx.proxy.evaluate import BUDGETS, accuracy_report, plans
    from clse_fx.proxy.model import TEXT_LEN, prompt
    from clse_fx.proxy.train import predict

    model, processor = load_checkpoint(model_dir)
    eager = accuracy_report(predict(model, processor.tokenizer, items), items)
    num_visual = adapter_for(model).tokens_per_image()
    stages = plans(adapter_for(model).num_layers, num_visual, BUDGETS[FOCUS_BUDGET])["3-stage"]
    bundle = cache / "bundle-clse_attn-3-stage"
    if not bundle.is_dir():
        clse_fx.compile(
            model, stages=stages, batch=20, text_len=TEXT_LEN, output_dir=bundle, force=True, processor=processor
        )
    engine = Engine.load(bundle)
    subset = items[:60]
    generated = engine.generate(
        [Image.fromarray(i.image) for i in subset], [prompt(i.question) for i in subset], max_new_tokens=2
    )
    sweep = next(
        r
        for r in results
        if (r["score"], r["merge"], r["budget"], r["plan"]) == ("clse_attn", "none", FOCUS_BUDGET, "3-stage")
    )
    first = processor.tokenizer.convert_ids_to_tokens([g.token_ids[0] for g in generated])
    agree = sum(a == b for a, b in zip(first, sweep["predictions"]))
    return {
        "eager_unpruned": eager,
        "bundle_generate_agreement": f"{agree}/{len(subset)}",
        "bundle_parity": engine.manifest.parity,
    }


def main(argv: list[str] | None = None) -> int:
    """Run the sweep and write every result file."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.accuracy", description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint dir (default: the shipped proxy model)")
    parser.add_argument("--limit", type=int, help="use the first N test questions (default: all 600)")
    parser.add_argument("--cache", default="/tmp/clse-accuracy-cache", help="per-configuration results cache")
    parser.add_argument("--out", default=str(OUT), help="output directory")
    parser.add_argument("--plot-only", action="store_true", help="only redraw the plots from OUT/results.json")
    parser.add_argument(
        "--reuse-results", action="store_true", help="seed the cache with OUT/results.json: compile only new rows"
    )
    args = parser.parse_args(argv)
    if args.plot_only:
        redraw(Path(args.out))
        return 0
    torch.set_num_threads(1)
    from clse_fx.cli import _quiet_transformers
    from clse_fx.demo import proxy_model_dir
    from clse_fx.proxy.data import make_split
    from clse_fx.proxy.evaluate import sweep

    _quiet_transformers()
    model_dir = Path(args.model) if args.model else proxy_model_dir()
    items = make_split("test")[: args.limit]
    # Keyed by the weights too, so a retrained checkpoint never reuses another model's cached results.
    weights = hashlib.sha256((model_dir / "model.safetensors").read_bytes()).hexdigest()[:12]
    cache = Path(args.cache) / f"{weights}-n{len(items)}"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.reuse_results:
        seed_cache(out / "results.json", cache)
    results = sweep(model_dir, items, cache)
    costs = stage_costs(model_dir, results, cache)
    checks = cross_checks(model_dir, items, results, cache)
    grid = _grid(results)
    unpruned = next(r for r in results if r["budget"] == "unpruned")["accuracy"]
    # Summed per configuration rather than timed here, so a run that reads the cache reports the real cost.
    seconds = sum(r["compile_s"] + r["run_s"] for r in results)
    (out / "results.json").write_text(
        json.dumps(
            {
                "questions": len(items),
                "checks": checks,
                "sweep_seconds": round(seconds),
                "stage_ms": costs,
                "runs": results,
            }
        )
        + "\n"
    )
    summary = "\n\n".join(
        [
            "# Accuracy proxy: trained tiny LLaVA, 16x16 visual grid",
            f"{len(items)} test questions; unpruned engine accuracy {100 * unpruned:.1f}% "
            f"(eager PyTorch {100 * checks['eager_unpruned']['overall']:.1f}%). Cells: accuracy % (share of "
            "unpruned) [average visual tokens per layer of 256]. Generated by `python -m benchmarks.accuracy`; "
            f"compiling and running the {len(results)} configurations took "
            f"{seconds / 60:.0f} min.",
            f"Answering from the question alone (the most common answer of each question type) scores "
            f"{100 * question_only(items):.1f}%: compare every cell with that floor as well as with unpruned.",
            reading(unpruned, question_only(items), len(items)),
            table(results, unpruned),
            f"Per question type (unpruned and {FOCUS_BUDGET}):",
            by_type_table(results),
            "Per score: share of unpruned accuracy and the cost of the plan's first stage alone (score, top-K, "
            "survivor index) on ONNX Runtime, one thread, batch 1, this model's geometry (272 tokens, 256 visual, "
            "width 128), median ms:",
            score_table(results, costs, unpruned),
            "CLSE against the others (generated):",
            "\n".join(findings(results, unpruned)),
            f"Full bundle through Engine.generate vs the sweep's prefill engine on the first 60 questions: "
            f"{checks['bundle_generate_agreement']} answers agree.",
        ]
    )
    (out / "table.md").write_text(table(results, unpruned) + "\n")
    (out / "summary.md").write_text(summary + "\n")
    plots(results, items, grid, out)
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
