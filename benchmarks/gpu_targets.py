"""The aot-inductor and torch-compile targets on CUDA, on the demo model: `python -m benchmarks.gpu_targets`.

Compiles the README's demo (budget 64, spectral score) with ``clse-compile --target aot-inductor --device cuda``
(prefill.pt2 and decode.pt2 built for CUDA) and with the torch-compile target on CUDA, then on the README's six
demo questions:

- the kept visual ids of every stage from the aot-inductor bundle's ``Engine`` against an onnxruntime bundle's
  (CPU ONNX Runtime; ``--onnx-bundle``, else compiled here) on the same encoded feeds;
- the answers of ``Engine.generate`` (aot-inductor) and of the torch-compile engine's ``generate`` against the
  README's;
- prefill ms: the AOTInductor package on device tensors against the torch-compile prefill (Inductor with CUDA
  graphs), and the Engine's whole prefill call (host feeds in, numpy outputs back) for the aot-inductor bundle.

Writes benchmarks/results/gpu_targets.json (or ``--out``) and prints a summary; ``--device cpu`` checks the script.
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.gpu import timed_ms
from clse_fx.cli import compile_main
from clse_fx.deploy.engine import Engine
from clse_fx.deploy.manifest import split_prefill_outputs

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results" / "gpu_targets.json"
DEMO_FLAGS = ["--demo", "--keep", "64", "--score", "clse"]


def readme_questions() -> list[tuple[str, str, str]]:
    """(image, question, answer) of each README sample on the demo bundle."""
    readme = (ROOT / "README.md").read_text()
    found = re.findall(r'clse-run clse-out/demo --chat --image (\S+) --prompt "(.*?)"\s+# (\w+)$', readme, re.M)
    return [(str(ROOT / image), question, answer) for image, question, answer in found]


def kept_ids(engine: Engine, feeds: dict[str, np.ndarray]) -> list[list[int]]:
    """Each stage's kept visual ids (row 0) from the engine's prefill on ``feeds``."""
    outputs = engine.prefill.run(**engine.run_input_graphs(feeds))
    return [k[0].tolist() for k in split_prefill_outputs(outputs, engine.num_stages)[2]]


def measure(onnx_bundle: Path | None, work: Path, device: torch.device) -> dict:
    from clse_fx import api
    from clse_fx.demo import proxy_model_dir

    aoti_dir = work / "aoti"
    compiles = [[*DEMO_FLAGS, "--target", "aot-inductor", "--device", device.type, "-o", str(aoti_dir), "--force"]]
    if onnx_bundle is None:
        onnx_bundle = work / "onnxruntime"
        compiles.append([*DEMO_FLAGS, "-o", str(onnx_bundle), "--force"])
    for argv in compiles:
        if compile_main(argv) != 0:
            raise RuntimeError(f"clse-compile {' '.join(argv)} failed (its error is above)")
    aoti, onnx = Engine.load(aoti_dir), Engine.load(onnx_bundle)
    model, _ = api.load_checkpoint(proxy_model_dir())
    compiled = api.compile(model, keep=64, score="clse", target="torch-compile", device=device.type).module
    stops = set(aoti.manifest.stop_token_ids())

    rows = []
    for image, question, answer in readme_questions():
        feeds = aoti.encode([Image.open(image).convert("RGB")], [question], chat=True)
        cuda_inputs = {name: torch.from_numpy(np.ascontiguousarray(a)).to(device) for name, a in feeds.items()}
        aoti_ids, onnx_ids = kept_ids(aoti, feeds), kept_ids(onnx, feeds)
        generated = compiled.generate(cuda_inputs, 8, stops)[0]
        rows.append(
            {
                "image": Path(image).name,
                "question": question,
                "readme_answer": answer,
                "aot_inductor_answer": aoti.generate([Image.open(image).convert("RGB")], [question], 8, chat=True)[
                    0
                ].text.strip(),
                "torch_compile_answer": aoti.preprocessor.decode(generated).strip(),
                "kept_ids_identical_to_onnxruntime": aoti_ids == onnx_ids,
                "kept_ids_differing_per_stage": [len(set(a) ^ set(b)) // 2 for a, b in zip(aoti_ids, onnx_ids)],
            }
        )
        print(json.dumps(rows[-1]), flush=True)

    feeds = aoti.encode([Image.open(readme_questions()[0][0]).convert("RGB")], ["what colour is the circle ?"], True)
    device_args = [torch.from_numpy(np.ascontiguousarray(feeds[name])).to(device) for name in aoti.prefill.inputs]
    with torch.no_grad():
        timings = {
            "aot_inductor_package_ms": timed_ms(lambda: aoti.prefill.runner(*device_args), 50, device),
            "torch_compile_prefill_ms": timed_ms(lambda: compiled(*device_args), 50, device),
            "aot_inductor_engine_prefill_call_ms": timed_ms(lambda: aoti.prefill.run(**feeds), 50, device),
        }
    timings["aot_inductor_vs_torch_compile"] = timings["aot_inductor_package_ms"] / timings["torch_compile_prefill_ms"]
    return {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "CPU (check run)",
        "versions": {"torch": torch.__version__},
        "bundle": "demo, --keep 64 --score clse, batch 1",
        "manifest_device": aoti.manifest.device,
        "questions": rows,
        "prefill": timings,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_targets", description=__doc__.splitlines()[0])
    parser.add_argument("--onnx-bundle", type=Path, help="an onnxruntime demo bundle (default: compile one)")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"results JSON (default: {RESULTS})")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: check the script")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device is visible; run on a GPU machine, or pass --device cpu to check the script")
    with tempfile.TemporaryDirectory() as work:
        results = measure(args.onnx_bundle, Path(work), torch.device(args.device))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    rows = results["questions"]
    print(
        f"kept ids identical to onnxruntime: {sum(r['kept_ids_identical_to_onnxruntime'] for r in rows)} of "
        f"{len(rows)}; README answers: aot-inductor {sum(r['aot_inductor_answer'] == r['readme_answer'] for r in rows)}"
        f", torch-compile {sum(r['torch_compile_answer'] == r['readme_answer'] for r in rows)} of {len(rows)}; "
        f"prefill {json.dumps(results['prefill'])}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
