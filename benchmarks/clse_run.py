"""Where one ``clse-run`` answer's time goes: `python -m benchmarks.clse_run BUNDLE [BUNDLE ...]`.

For each bundle (the README demo compiled for onnxruntime and for aot-inductor, say), runs the README's first
question in fresh processes, as ``clse-run`` does, and times each part: Python start-up and the deploy imports,
``import torch`` (aot-inductor bundles only: libtorch runs their packages), ``Engine.load`` (manifest, file hashes,
sessions or packages), the first answer, and a second answer in the same process (what ``clse-serve`` or a Python
caller pays per answer once loaded). Then the whole ``clse-run`` command, wall clock, start to exit. Medians of
``--repeats`` processes; results in benchmarks/results/clse_run.json (the docs' table is generated from it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
RESULTS = HERE / "results" / "clse_run.json"
IMAGE = HERE.parent / "examples" / "demo" / "shapes-1.png"
QUESTION = "what colour is the circle ?"

# Runs in a fresh interpreter: prints one JSON line of seconds per part.
_PROBE = """
import json, sys, time
marks = [(time.perf_counter(), time.process_time())]
def mark():
    marks.append((time.perf_counter(), time.process_time()))
from clse_fx.deploy.engine import Engine
from clse_fx.deploy.manifest import read_manifest
from clse_fx.deploy.preprocess.media import as_rgb, load_image
from pathlib import Path
mark()
if read_manifest(Path(sys.argv[1]), verify=False).target == "aot-inductor":
    import torch  # noqa: F401
mark()
engine = Engine.load(sys.argv[1])
mark()
image = as_rgb(load_image(sys.argv[2]))
first = engine.generate([image], [sys.argv[3]], 8, chat=True)[0]
mark()
second = engine.generate([image], [sys.argv[3]], 8, chat=True)[0]
mark()
parts = ("deploy_imports", "import_torch", "engine_load", "first_answer", "second_answer")
row = {"first_prefill_ms": first.timings.prefill_ms, "second_prefill_ms": second.timings.prefill_ms}
for name, (wall0, cpu0), (wall1, cpu1) in zip(parts, marks, marks[1:]):
    row |= {f"{name}_s": wall1 - wall0, f"{name}_cpu_s": cpu1 - cpu0}
print(json.dumps(row | {"answer": first.text}))
"""


def probe(bundle: Path) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, str(bundle), str(IMAGE), QUESTION], capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def command_seconds(bundle: Path) -> tuple[float, float]:
    """The whole README command, ``clse-run BUNDLE --chat --image ... --prompt ...``, start to exit: wall seconds and
    the CPU seconds (user + system) of the process."""
    argv = [str(Path(sys.executable).with_name("clse-run")), str(bundle), "--chat", "--image", str(IMAGE)]
    start = time.perf_counter()
    child = subprocess.Popen([*argv, "--prompt", QUESTION], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(child.pid, 0)
    if os.waitstatus_to_exitcode(status):
        raise RuntimeError(f"clse-run {bundle} failed")
    return time.perf_counter() - start, usage.ru_utime + usage.ru_stime


def measure(bundle: Path, repeats: int) -> dict:
    from clse_fx.deploy.manifest import read_manifest

    probes = [probe(bundle) for _ in range(repeats)]
    row = {key: statistics.median(p[key] for p in probes) for key in probes[0] if key != "answer"}
    commands = [command_seconds(bundle) for _ in range(repeats)]
    row["clse_run_command_s"] = statistics.median(wall for wall, _ in commands)
    row["clse_run_command_cpu_s"] = statistics.median(cpu for _, cpu in commands)
    return {"target": read_manifest(bundle, verify=False).target, "answer": probes[0]["answer"], **row}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.clse_run", description=__doc__.splitlines()[0])
    parser.add_argument("bundles", nargs="+", type=Path, help="demo bundles (clse-compile --demo ... -o DIR)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    rows = [measure(bundle, args.repeats) for bundle in args.bundles]
    results = {
        "machine": f"{platform.machine()}, 2 CPU cores shared with other jobs",
        "question": QUESTION,
        "repeats": args.repeats,
        "rows": rows,
    }
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
