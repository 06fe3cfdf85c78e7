"""The benchmark harness's own logic (the figures themselves come from `python -m benchmarks.run`)."""

from benchmarks.report import README_END, README_START, update_readme
from benchmarks.run import regressions


def test_regressions_flag_only_machine_independent_bounds():
    thresholds = {"flops_ratio": {"min": 2.0}, "nodes": {"max": 100}}
    assert regressions({"flops_ratio": 2.1, "nodes": 100}, thresholds) == []
    found = regressions({"flops_ratio": 1.9, "nodes": 101}, thresholds)
    assert found == ["flops_ratio = 1.9 fell below 2", "nodes = 101 rose above 100"]


def test_readme_block_is_replaced_not_appended(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n\n{README_START}\nold table\n{README_END}\n\nmore\n")
    update_readme(readme, "| new | table |\n")
    update_readme(readme, "| newer | table |\n")
    text = readme.read_text()
    assert text.count(README_START) == 1 and "newer" in text and "old table" not in text and text.endswith("more\n")


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

    times = dict(unmodified_eager=73.0, reference_eager=79.0, pruned_eager=77.8, pruned_compiled=15.6)
    row = {"batch": 1, "budget": 192, "prefill_ms": {**times, "unpruned_compiled": 21.4}}
    results = {
        "device": "NVIDIA H100 80GB HBM3",
        "versions": {"torch": "2.11.0+cu130", "transformers": "5.24.0", "python": "3.11.7"},
        "geometry": "LLaVA-1.5-7B, torch.bfloat16, 40 text + 576 visual",
        "prefill": [{**row, "compiled_speedup": 21.4 / 15.6, "stage_share": 0.012}],
        "decode_budget_192": {1: {"pruned_tokens_per_s": 90.0, "full_tokens_per_s": 80.0}},
        "kept_ids_identical_float32": {
            "geometry": "LLaVA-1.5-7B at 1/8 width, float32",
            "rows": [
                {"batch": 1, "budget": 192, "eager": True, "compiled": True},
                {"batch": 8, "budget": 192, "eager": False},
            ],
        },
        "peak_memory_gib": 15.2,
    }
    table = markdown(results)
    assert "NVIDIA H100 80GB HBM3, torch 2.11.0+cu130, transformers 5.24.0" in table.splitlines()[0]
    assert "| 1 | 192 | 73.0 ms | 79.0 ms | 77.8 ms | 15.6 ms | 21.4 ms | 1.37x | 1.2% |" in table
    assert "90 tokens/s pruned KV, 80 full KV" in table and "Peak GPU memory: 15.2 GiB" in table
    assert "(LLaVA-1.5-7B at 1/8 width, float32): eager 1 of 2 budget x batch cases, compiled 1 of 1" in table
