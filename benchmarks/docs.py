"""Every table of figures in README.md and docs/, generated from benchmarks/results/:
`python -m benchmarks.docs [--check]`.

A table sits in a Markdown file between ``<!-- generated: NAME -->`` and ``<!-- /generated -->``. NAME is a
function below registered with ``@table("NAME")``: it reads files under benchmarks/results/ and returns Markdown.
``python -m benchmarks.docs`` rewrites every block from the results; ``--check`` (and tests/test_docs.py) fails
when a block differs from them, so a figure cannot be edited by hand or go stale. A table in the docs that is not
made of measured figures (a list of limits, say) says so on the line before it: ``<!-- not generated: WHY -->``.

To add a table: write ``@table("my_table") def my_table(results: Path) -> str`` reading your JSON, put
``<!-- generated: my_table -->`` and ``<!-- /generated -->`` where it belongs in a page, and run this module.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

ROOT = Path(__file__).parents[1]
RESULTS = ROOT / "benchmarks" / "results"
BLOCK = re.compile(r"<!-- generated: (?P<name>[\w-]+) -->\n.*?<!-- /generated -->", re.S)
NOT_GENERATED = "<!-- not generated:"

TABLES: dict[str, Callable[[Path], str]] = {}


def table(name: str) -> Callable:
    """Register ``function(results_dir) -> Markdown`` as the generated table ``name``."""

    def register(function: Callable[[Path], str]) -> Callable[[Path], str]:
        TABLES[name] = function
        return function

    return register


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


@table("flops_kv")
def flops_kv(results: Path) -> str:
    from benchmarks.report import flops_kv_markdown

    return flops_kv_markdown(_json(results / "full.json"))


@table("cpu_latency")
def cpu_latency(results: Path) -> str:
    from benchmarks.report import latency_markdown

    return latency_markdown(_json(results / "full.json"))


@table("compile_time")
def compile_time(results: Path) -> str:
    from benchmarks.report import compile_markdown

    return compile_markdown(_json(results / "full.json"))


@table("accuracy")
def accuracy(results: Path) -> str:
    from benchmarks.accuracy import table as accuracy_table

    runs = _json(results / "accuracy" / "results.json")["runs"]
    unpruned = next(run for run in runs if run["budget"] == "unpruned")["accuracy"]
    return accuracy_table(runs, unpruned) + "\n"


@table("gpu")
def gpu(results: Path) -> str:
    from benchmarks.gpu import markdown

    return markdown(_json(results / "gpu.json"))


@table("decode")
def decode(results: Path) -> str:
    from benchmarks.decode import table as decode_table

    return decode_table(_json(results / "decode.json")) + "\n"


def _markdown(header: list[str], rows: Iterable[list[str]]) -> str:
    """A Markdown table of ``header`` and ``rows`` (cells already formatted)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows]) + "\n"


@table("accuracy_precision")
def accuracy_precision(results: Path) -> str:
    data = _json(results / "accuracy" / "precision.json")
    budgets = list(dict.fromkeys(row["budget"] for row in data["rows"]))
    by_precision: dict[str, dict] = {}
    for row in data["rows"]:
        by_precision.setdefault(row["precision"], {})[row["budget"]] = row

    def cells(rows: dict) -> list[str]:
        weights = max(row["weights_bytes"] for row in rows.values()) / 2**20
        return [f"{100 * rows[budget]['accuracy']:.1f}%" for budget in budgets] + [f"{weights:.2f} MiB"]

    header = ["weights", *budgets, "weights.data (largest)"]
    return _markdown(header, ([name, *cells(rows)] for name, rows in by_precision.items()))


@table("peer_cpu")
def peer_cpu(results: Path) -> str:
    from benchmarks.peer_cpu import markdown

    data = _json(results / "peer_cpu.json")
    return markdown(data["rows"], data["ratios"])


@table("scale")
def scale(results: Path) -> str:
    gib = 2**30

    def row(key: str, data: dict) -> list[str]:
        width, engine = key.split()[0], data["engine"]
        decode = "-"  # rows measured before the Engine run timed its decode steps
        if "decode_ms_per_token" in engine:
            decode = f"{engine['decode_ms_per_token']:.0f} ms"
            if "decode_weight_bytes" in data:
                decode += f" ({data['decode_weight_bytes'] / data['read_gb_per_s'] / 1e6:.0f} ms)"
        return [
            "1 (7B)" if width == "1" else width,
            data.get("weight_format", "none").replace("none", "float16"),
            f"{data['parameters'] / 1e6:.0f}M",
            f"{data['compile_wall_s']:.0f} s",
            f"{data['compile_peak_rss_bytes'] / gib:.2f} GiB = {data['compile_peak_rss_over_checkpoint']:.2f}x",
            f"{data['bundle_bytes'] / gib:.2f} GiB = {data['bundle_over_checkpoint']:.2f}x",
            f"{engine['load_s']:.1f} s",
            f"{engine['prefill_ms'] / 1e3:.1f} s",
            decode,
            f"{engine['peak_rss_bytes'] / gib:.2f} GiB = {data['engine_rss_over_checkpoint']:.2f}x",
        ]

    header = ["width", "weights", "parameters", "compile wall", "compile peak RSS (x checkpoint)", "bundle"]
    header += ["Engine load", "TTFT", "decode / token (weights read once)", "Engine peak RSS"]
    return _markdown(header, (row(key, data) for key, data in _json(results / "scale.json").items()))


@table("serve_load")
def serve_load(results: Path) -> str:
    data = _json(results / "serve_load.json")

    def row(label: str, level: dict) -> list[str]:
        answered = level["malformed_requests"] - level["malformed_not_4xx"]
        return [
            label,
            f"{level['valid_rps']:.2f}",
            str(level["p50_ms"]),
            str(level["p99_ms"]),
            f"{level['valid_failed']} of {level['valid_requests']}",
            f"{answered} of {level['malformed_requests']}",
            f"{level['health_max_ms']:.1f} ({level['health_not_200']})",
            f"{level['longest_gap_between_answers_s']:.2f} s",
        ]

    rows = [row(str(level["users"]), level) for level in data["levels"]]
    for key, what in (("kill_replica", "engine replica"), ("kill_ingress", "ingress replica")):
        if key in data:
            rows.append(row(f"{data[key]['users']} + {what} killed", data[key]))
    header = ["users", "valid req/s", "p50 ms", "p99 ms", "valid failed", "malformed answered 4xx"]
    return _markdown(header + ["/health max ms (non-200)", "longest gap between answers"], rows)


@table("serve_attack")
def serve_attack(results: Path) -> str:
    from benchmarks.serve_attack import HEADER_REFUSAL_LIMIT_S, ORDINARY_LIMIT_S, PROXY_GROWTH_LIMIT_MIB

    data = _json(results / "serve_attack.json")
    slow, header, images = data["slow_senders"], data["huge_header"], data["large_images"]
    names = {"haproxy": "HAProxy", "ray::ProxyActor": "Serve's proxy", "BundleServer": "engines", "Ingress": "ingress"}

    def counts(statuses: dict) -> str:  # {"408": 2000} -> "408 x 2000"
        return ", ".join(f"{status} x {count}" for status, count in statuses.items()) or "none ended"

    def met(ok: bool) -> str:
        return "met" if ok else "**not met**"

    def per_process(mib: dict, sign: str = "") -> str:  # {"haproxy": 38} -> "HAProxy 38 MiB"
        return ", ".join(f"{names.get(name, name)} {sign}{value:g} MiB" for name, value in mib.items())

    def gib(key: str) -> str:
        return f"{images[key] / 1024:.2f}"

    sent = slow["connections"]
    ended = [f"{kind.replace('_', '-')} {counts(how)}" for kind, how in slow["how_slow_connections_ended"].items()]
    replicas = [
        f"{names[name]} {', '.join(map(str, peaks))}" for name, peaks in images["peak_rss_mib_by_replica"].items()
    ]
    rows = [
        [
            f"{sent['slow_body']} idle slow-body + {sent['slow_header']} trickled-header + {sent['slow_large_body']} "
            f"stalled large-body connections for {slow['seconds']:g} s, each reopened when dropped; an ordinary "
            "`/generate` every 0.5 s",
            f"ordinary: {slow['ordinary_requests']} answers, {slow['ordinary_not_200']} not 200, p50 "
            f"{slow['ordinary_p50_s']:.2f} s, max {slow['ordinary_max_s']:.2f} s; `/health`: "
            f"{counts(slow['health_statuses'])}; how the slow connections ended: {'; '.join(ended)}",
            f"ordinary max < {ORDINARY_LIMIT_S:g} s: {met(slow['ok'])}",
        ],
        [
            f"one {header['header_mib']} MiB header",
            f"`{header['answer']}` after {header['refused_after_s']:.2f} s"
            f"{'' if header['sent_all'] else ', before it was all sent'}; peak RSS growth: "
            f"{per_process(header['peak_rss_growth_mib'], '+')}",
            f"refused < {HEADER_REFUSAL_LIMIT_S:g} s, growth < {PROXY_GROWTH_LIMIT_MIB} MiB: {met(header['ok'])}",
        ],
        [
            f"{images['requests']} concurrent {images['image_bytes_mib']:.1f} MiB images (4096x4096 JPEG, "
            f"{images['body_mib']:.1f} MiB bodies in base64)",
            f"{counts(images['statuses'])} in {images['seconds']:.0f} s; replicas' summed peak RSS "
            f"{gib('replicas_summed_peak_rss_mib')} GiB (idle {gib('replicas_idle_rss_mib')}, the most at one moment "
            f"{gib('replicas_sampled_max_rss_mib')}); peak MiB by replica: {'; '.join(replicas)}; peak "
            f"{per_process(images['front_peak_rss_mib'])}",
            f"summed peak < {images['bound_mib'] / 1024:g} GiB: {met(images['ok'])}",
        ],
    ]
    for key, what in (("kill_ingress", "an ingress replica"), ("kill_engine", "an engine replica")):
        kill = data[key]
        rows.append(
            [
                f"{what} killed (`ray.kill`) under {kill['users']} closed-loop users",
                f"{kill['answers']} answers: {counts(kill['statuses'])}, {kill['not_json']} not JSON; `/health` "
                f"not ok {kill['health_not_ok_after_s']:.2f} s after the kill",
                f"every answer JSON: {met(kill['not_json'] == 0)}",
            ]
        )
    return _markdown(["probe", "measured", "bound"], rows)


@table("trace_matrix")
def trace_matrix(results: Path) -> str:
    def cell(run: dict | None) -> str:
        if not run:
            return "not run"
        rows = run["rows"]
        passed = sum(row["result"] == "ok" for row in rows)
        dtypes = ", ".join(dict.fromkeys(row["dtype"] for row in rows))
        where = f" on an {run['gpu']}" if run.get("gpu") else ""
        return f"{passed} of {len(rows)} ({dtypes}){where}"

    header = ["torch", "meta, full width (dtypes x batch 1, 8)", "CPU, 1/8 width (dtypes x batch 1, 8)"]
    rows = [
        [version, cell(runs.get("meta")), cell(runs.get("cpu")), cell(runs.get("cuda"))]
        for version, runs in _json(results / "trace_matrix.json").items()
    ]
    return _markdown(header + ["CUDA, full width"], rows)


@table("score_choice")
def score_choice(results: Path) -> str:
    from benchmarks.accuracy import score_table

    data = _json(results / "accuracy" / "results.json")
    unpruned = next(run for run in data["runs"] if run["budget"] == "unpruned")["accuracy"]
    return score_table(data["runs"], data["stage_ms"], unpruned) + "\n"


@table("clse_run")
def clse_run(results: Path) -> str:
    def part(row: dict, name: str) -> str:  # wall seconds (CPU seconds)
        return f"{row[f'{name}_s']:.2f} s ({row[f'{name}_cpu_s']:.2f})"

    def row(data: dict) -> list[str]:
        torch_s = part(data, "import_torch") if data["target"] == "aot-inductor" else "-"
        parts = ("clse_run_command", "deploy_imports", None, "engine_load", "first_answer", "second_answer")
        return [f"demo, {data['target']}"] + [torch_s if name is None else part(data, name) for name in parts]

    header = ["bundle", "clse-run, start to exit", "Python + deploy imports", "import torch", "Engine.load"]
    header += ["first answer", "next answer, same process"]
    return _markdown(header, (row(data) for data in _json(results / "clse_run.json")["rows"]))


def documents(root: Path = ROOT) -> list[Path]:
    """The Markdown files that may hold generated tables: README.md and every page under docs/."""
    return [root / "README.md", *sorted((root / "docs").rglob("*.md"))]


def render(text: str, results: Path = RESULTS) -> str:
    """``text`` with every generated block rewritten from ``results``; an unknown name is a ValueError."""

    def block(match: re.Match) -> str:
        name = match["name"]
        if name not in TABLES:
            raise ValueError(f"no generated table named {name!r}; known: {', '.join(sorted(TABLES))}")
        return f"<!-- generated: {name} -->\n{TABLES[name](results).rstrip()}\n<!-- /generated -->"

    return BLOCK.sub(block, text)


def loose_tables(text: str) -> list[str]:
    """Header lines of the Markdown tables outside generated blocks not marked ``<!-- not generated: ... -->``."""
    outside = BLOCK.sub("", text).splitlines()
    found = []
    for i, line in enumerate(outside[2:], 2):
        starts_table = line.startswith("|") and re.match(r"^\|(\s*:?-+:?\s*\|)+\s*$", line)
        if starts_table and not outside[i - 2].startswith(NOT_GENERATED):
            found.append(outside[i - 1])
    return found


def update(root: Path = ROOT, results: Path = RESULTS, check: bool = False) -> list[str]:
    """Rewrite (or, with ``check``, only compare) every generated block; the problems found, one line each."""
    problems = []
    for path in documents(root):
        text = path.read_text()
        rendered = render(text, results)
        if rendered != text:
            if check:
                problems.append(f"{path.relative_to(root)}: a generated table differs from benchmarks/results/")
            else:
                path.write_text(rendered)
        problems += [f"{path.relative_to(root)}: table not generated: {line}" for line in loose_tables(text)]
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.docs", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 if a table differs")
    args = parser.parse_args(argv)
    problems = update(check=args.check)
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
