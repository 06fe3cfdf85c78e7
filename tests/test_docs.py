"""The docs' tables of figures are generated from benchmarks/results/ (benchmarks/docs.py) and agree with it."""

from benchmarks.docs import RESULTS, TABLES, loose_tables, render, update


def test_every_generated_table_agrees_with_the_results_and_no_table_is_hand_written():
    assert update(check=True) == []  # on failure: python -m benchmarks.docs, and commit what it rewrote


def test_a_block_is_rewritten_from_the_results_and_only_inside_its_markers():
    text = "intro\n\n<!-- generated: decode -->\n| stale | table |\n<!-- /generated -->\n\nmore\n"
    rendered = render(text)
    assert rendered.startswith("intro\n\n<!-- generated: decode -->\n| batch, KV |") and rendered.endswith("more\n")
    assert "stale" not in rendered and render(rendered) == rendered
    assert TABLES["decode"](RESULTS).rstrip() in rendered


def test_tables_outside_blocks_must_say_why_they_are_not_generated():
    table = "| a | b |\n|---|---|\n| 1 | 2 |\n"
    assert loose_tables(f"text\n\n{table}") == ["| a | b |"]
    assert loose_tables(f"text\n<!-- not generated: limits, not figures -->\n{table}") == []
    assert loose_tables(f"<!-- generated: decode -->\n{table}<!-- /generated -->\n") == []
