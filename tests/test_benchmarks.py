"""The benchmark harness's own logic (the figures themselves come from `python -m benchmarks.run`)."""

from benchmarks.run import regressions, verdict


def test_regressions_flag_only_machine_independent_bounds():
    thresholds = {"flops_ratio": {"min": 2.0}, "nodes": {"max": 100}}
    assert regressions({"flops_ratio": 2.1, "nodes": 100}, thresholds) == []
    found = regressions({"flops_ratio": 1.9, "nodes": 101}, thresholds)
    assert found == ["flops_ratio = 1.9 fell below 2", "nodes = 101 rose above 100"]
    assert verdict([], thresholds) == "verdict: all 2 thresholds passed (benchmarks/thresholds.json)"
    assert verdict(found[1:], thresholds) == "verdict: 1 of 2 thresholds failed: nodes (benchmarks/thresholds.json)"


def _synthetic_accuracy_results(questions: int, grid: int = 4) -> list[dict]:
    """A small sweep shaped like benchmarks/results/accuracy/results.json's runs, with one method (like CLSE-M)
    that has 3-stage runs only."""
    import numpy as np

    rng = np.random.default_rng(0)

    def run(method: str, plan: str, budget: str, ratio: float) -> dict:
        return {
            "method": method,
            "plan": plan,
            "budget": budget,
            "avg_visual_tokens": ratio * grid**2,
            "accuracy": float(rng.uniform(0.4, 0.9)),
            "correct": (rng.random(questions) < 0.7).tolist(),
            "keep_counts": [[questions // 2] * grid**2] * 3,
            "stages": [[1, 8], [2, 4], [3, 2]],
        }

    runs = [run("unpruned", "none", "unpruned", 1.0)]
    for method, plans in (
        ("CLSE (clse_attn)", ("3-stage", "1-stage")),
        ("random", ("3-stage", "1-stage")),
        ("CLSE-M (merge, hidden)", ("3-stage",)),
    ):
        for plan in plans:
            for budget, ratio in (("192/576", 0.42), ("128/576", 0.33), ("64/576", 0.25)):
                runs.append(run(method, plan, budget, ratio))
    return runs


def test_accuracy_plots_name_every_line_in_a_legend_outside_the_axes():
    import matplotlib.pyplot as plt

    from benchmarks.accuracy import accuracy_by_row_figure, accuracy_vs_budget_figure
    from clse_fx.proxy.data import make_split

    items = make_split("test", 64)  # 64: the queried object's row band cycles every 16 questions
    results = _synthetic_accuracy_results(len(items))
    for fig in (accuracy_vs_budget_figure(results, 4), accuracy_by_row_figure(results, items, 4)):
        labels = {line.get_label() for ax in fig.axes for line in ax.get_lines()}
        assert "CLSE-M (merge, hidden)" in labels and "unpruned" in labels and len(labels) == 4
        assert all(ax.get_legend() is None for ax in fig.axes)  # one figure legend, none inside a panel
        [legend] = fig.legends
        entries = [text.get_text() for text in legend.get_texts()]
        assert len(entries) == len(labels) and set(entries) == labels
        fig.canvas.draw()  # runs the constrained layout that places the legend
        renderer = fig.canvas.get_renderer()
        box = legend.get_window_extent(renderer)
        assert not any(box.overlaps(ax.get_window_extent(renderer)) for ax in fig.axes)
        plt.close(fig)


def test_accuracy_plot_only_redraws_from_results_json(tmp_path):
    import json

    from benchmarks.accuracy import main

    results = _synthetic_accuracy_results(64)
    (tmp_path / "results.json").write_text(json.dumps({"questions": 64, "runs": results}))
    assert main(["--plot-only", "--out", str(tmp_path)]) == 0
    assert {p.name for p in tmp_path.glob("*.png")} == {
        "accuracy_vs_budget.png",
        "accuracy_by_row.png",
        "keep_heatmap.png",
    }


def test_gpu_table_names_the_device_versions_and_every_figure():
    """benchmarks.gpu runs only where a GPU is lent; its report is checked here on results shaped like its own."""
    from benchmarks.gpu import markdown

    times = dict(unmodified_eager=62.2, reference_eager=39.3, pruned_eager=40.5, unpruned_eager=35.1)
    row = {"batch": 1, "budget": 192, "prefill_ms": {**times, "pruned_compiled": 14.0, "unpruned_compiled": 21.3}}
    inductor = {"batch": 1, "budget": 192, "pruned_ms": 9.0, "unpruned_ms": 15.0, "speedup": 15 / 9}
    results = {
        "device": "NVIDIA H200",
        "versions": {"torch": "2.11.0+cu130", "transformers": "5.25.0", "python": "3.12.3"},
        "geometry": "LLaVA-1.5-7B, torch.bfloat16, 40 text + 576 visual",
        "prefill": [{**row, "compiled_speedup": 21.3 / 14.0, "stage_share": 0.053}],
        "decode_budget_192": {"1": {"pruned_tokens_per_s": 139.0, "full_tokens_per_s": 136.0}},
        "kept_ids_identical_float32": {
            "geometry": "LLaVA-1.5-7B geometry, 512 wide, float32",
            "rows": [{"batch": 1, "budget": 192, "eager": True}, {"batch": 8, "budget": 192, "eager": False}],
        },
        "inductor": {
            "prefill": [
                {**inductor, "pruned_compile_s": 61.0, "unpruned_compile_s": 58.0},
                {"batch": 8, "budget": 192, "skipped": "past the 150 s deadline"},
            ],
            "kept_ids_identical_float32": {"batch": 1, "budget": 192, "identical": True},
        },
        "peak_memory_gib": {"prefill": 16.3, "decode_budget_192": 28.7, "inductor": None},
    }
    table = markdown(results)
    assert "NVIDIA H200, torch 2.11.0+cu130, transformers 5.25.0" in table.splitlines()[0]
    assert "| 1 | 192 | 62.2 ms | 39.3 ms | 40.5 ms | 35.1 ms | 14.0 ms | 21.3 ms | 1.52x | 5.3% |" in table
    assert "batch 1, budget 192: pruned 9.0 ms, unpruned 15.0 ms (1.67x; compiles 61 s and 58 s)" in table
    assert "batch 8: skipped (past the 150 s deadline)" in table
    assert "139 tokens/s pruned KV, 136 full KV (1.02x)" in table
    assert "Peak GPU memory (GiB, cumulative): prefill 16.3, decode_budget_192 28.7" in table
    assert "(LLaVA-1.5-7B geometry, 512 wide, float32): eager 1 of 2 budget x batch cases, Inductor-compiled" in table


def _peer_row(model, system, precision, ttft, decode, rss, disk, budget=None, pruning_ratio=None) -> dict:
    return {
        "model": model, "system": system, "precision": precision, "budget": budget, "pruning_ratio": pruning_ratio,
        "width": "1/8", "ttft_ms": ttft, "decode_tokens_per_s": decode, "peak_rss_mib": rss, "disk_mb": disk,
        "load_s": 1.0,
    }  # fmt: skip


def test_peer_cpu_ratios_pair_each_pruned_precision_with_the_peer_at_the_same_weights():
    from benchmarks.peer_cpu import compare, markdown

    rows = [
        _peer_row("llava-1.5", "clse-fx", "bf16", 200, 60, 600, 210, budget=192),
        _peer_row("llava-1.5", "clse-fx", "int8", 250, 80, 500, 100, budget=192),
        _peer_row("llava-1.5", "clse-fx", "fp32", 900, 40, 1600, 415),  # unpruned: compared with nothing
        _peer_row("llava-1.5", "openvino-genai", "fp16", 400, 60, 640, 200),
        _peer_row("llava-1.5", "openvino-genai", "int8", 360, 90, 430, 106),
        _peer_row("qwen2-vl", "clse-fx", "fp32", 300, 70, 700, 160, budget=0.334),
        _peer_row("qwen2-vl", "openvino-genai", "fp16", 480, 84, 600, 163),  # unpruned: not its counterpart
        _peer_row("qwen2-vl", "openvino-genai", "fp16", 320, 80, 600, 163, pruning_ratio=67),
    ]
    ratios = compare(rows)
    assert [(r["model"], r["precision"], r["against"]) for r in ratios] == [
        ("llava-1.5", "bf16", {"precision": "fp16", "pruning_ratio": None}),
        ("llava-1.5", "int8", {"precision": "int8", "pruning_ratio": None}),
        ("qwen2-vl", "fp32", {"precision": "fp16", "pruning_ratio": 67}),
    ]
    bf16, int8, qwen = ratios
    assert bf16["ttft_ms"] == {"ratio": 0.5, "target": "<= 0.6", "met": True}
    assert bf16["decode_tokens_per_s"] == {"ratio": 1.0, "target": ">= 1.0", "met": True}
    assert bf16["disk_mb"]["met"] is True and int8["peak_rss_mib"]["met"] is False  # 210/200 <= 1.1; 500/430 > 1.1
    assert int8["ttft_ms"] == {"ratio": 0.694, "target": "<= 0.6", "met": False}
    assert qwen["ttft_ms"] == {"ratio": 0.938, "target": "<= 1.0", "met": True}
    assert qwen["decode_tokens_per_s"]["met"] is False
    table = markdown(rows, ratios).splitlines()
    assert len(table) == 2 + len(rows) + 1 + 2 + len(ratios)
    assert "| qwen2-vl | fp32 | fp16, pruning_ratio 67 | 0.94x (<= 1.0: met) |" in table[-1]


def test_peer_cpu_rows_have_exactly_the_issue_schema():
    from benchmarks.peer_cpu import Variant, median_row, variants

    samples = [
        {"ttft_ms": t, "decode_tokens_per_s": 50.0, "peak_rss_mib": 600.4, "disk_mb": 210.04, "load_s": 1.234}
        for t in (300.0, 310.0, 900.0)
    ]
    row = median_row(Variant("llava-1.5", "clse-fx", "int4", 192), samples, "1/8")
    assert row == {
        "model": "llava-1.5", "system": "clse-fx", "precision": "int4", "budget": 192, "pruning_ratio": None,
        "width": "1/8", "ttft_ms": 310.0, "decode_tokens_per_s": 50.0, "peak_rss_mib": 600.0, "disk_mb": 210.0,
        "load_s": 1.23,
    }  # fmt: skip
    below = median_row(Variant("llava-1.5", "clse-fx", "int4", 192), samples, "1/8", ["top5 containment 0.4 < 0.6"])
    assert below == row | {"below_lossy_floors": ["top5 containment 0.4 < 0.6"]}  # measured, and said so
    chosen = {v.name for v in variants(["llava-1.5", "qwen2-vl"], ["fp32", "bf16", "int4"])}
    assert chosen == {
        "llava-1.5/clse-fx/fp32/192", "llava-1.5/clse-fx/bf16/192", "llava-1.5/clse-fx/int4/192",
        "llava-1.5/clse-fx/fp32/all", "llava-1.5/openvino-genai/fp16/all", "llava-1.5/openvino-genai/int4/all",
        "qwen2-vl/clse-fx/fp32/0.334", "qwen2-vl/clse-fx/bf16/0.334", "qwen2-vl/clse-fx/int4/0.334",
        "qwen2-vl/clse-fx/fp32/all", "qwen2-vl/openvino-genai/fp16/all", "qwen2-vl/openvino-genai/fp16/67",
        "qwen2-vl/openvino-genai/int4/all", "qwen2-vl/openvino-genai/int4/67",
    }  # fmt: skip


def test_reused_results_seed_the_sweep_cache_under_its_keys(tmp_path):
    """--reuse-results: every run of a results.json lands in the cache file the sweep would look up, so only
    configurations missing there are compiled."""
    import json

    from benchmarks.accuracy import seed_cache
    from clse_fx.proxy.evaluate import METHODS

    runs = [
        {"method": "unpruned", "score": "none", "merge": "none", "merge_metric": "hidden", "budget": "unpruned"},
        {"method": "DART", "score": "dart", "merge": "none", "merge_metric": "hidden", "budget": "64/576"},
    ]
    runs[0]["plan"], runs[1]["plan"] = "none", "1-stage"
    (tmp_path / "results.json").write_text(json.dumps({"runs": runs}))
    assert seed_cache(tmp_path / "results.json", tmp_path / "cache") == 2
    names = {p.name for p in (tmp_path / "cache").iterdir()}
    assert names == {f"{METHODS[0].score}-none-hidden-unpruned-none.json", "dart-none-hidden-64of576-1-stage.json"}


def test_score_table_puts_each_plans_first_stage_cost_beside_its_accuracy():
    from benchmarks.accuracy import score_table

    runs = _synthetic_accuracy_results(8)
    for run in runs:
        run.update(score="random" if run["method"] == "random" else "clse_attn", merge="none")
    runs = [r for r in runs if not r["method"].startswith("CLSE-M")]
    costs = {
        m: {p: {"192/576": 1.0, "128/576": 2.0, "64/576": 3.25} for p in ("1-stage", "3-stage")}
        for m in ("CLSE (clse_attn)", "random")
    }
    lines = score_table(runs, costs, 0.5).splitlines()
    assert len(lines) == 2 + 4 and lines[2].startswith("| `clse_attn` | CLSE (clse_attn) | 1-stage (layer 1) |")
    random_64 = next(r for r in runs if (r["method"], r["plan"], r["budget"]) == ("random", "3-stage", "64/576"))
    assert f"{200 * random_64['accuracy']:.1f}%, 3.25 ms |" in lines[-1]
