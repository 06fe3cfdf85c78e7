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
