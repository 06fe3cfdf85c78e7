"""clse-fx against OpenVINO GenAI on this CPU, side by side as a user would run them: `python -m benchmarks.peer_cpu`.

Per model (``--models llava-1.5,qwen2-vl``) at ``--width`` (1/8: text hidden 512):

- a random checkpoint with its processor, saved by ``save_pretrained``. LLaVA-1.5: LLaVA-1.5-7B's geometry with
  widths scaled (``benchmarks.scale.width_geometry``: 32 layers, 576 visual tokens, the real 32064-token
  vocabulary) and a ``LlavaProcessor``. Qwen2-VL: Qwen2-VL-7B's shapes with a decoder as wide as LLaVA's at the
  same width (512 at 1/8: 4 heads of 128, 2 KV heads), 24 layers, a 4-layer vision tower, the real 152064-token
  vocabulary, a ``Qwen2VLProcessor``; a 672x672 image is 576 merged visual tokens. The tokenizers are word-level
  with a chat template (``tests.tiny_models.tiny_tokenizer``), applied on both sides.
- clse-fx bundles (``clse-compile``, onnxruntime target, in a child process) pruned at budget 192 (LLaVA) or
  ratio 0.334 (Qwen2-VL) in every ``--precisions`` entry (fp32 fp16 bf16 int8 int4: ``--dtype`` or
  ``--weight-format``; a precision this clse-fx cannot compile is reported as skipped), and unpruned in fp32.
  Each is compiled for the prompt's exact length (``--text-len``), so no padding is computed.
- OpenVINO GenAI models (``optimum-cli export openvino --weight-format fp16|int8|int4``) exported in an
  environment of their own (``PEER_VENV``, built on first use, see :func:`ensure_peer_venv`), after checking that
  its transformers loads every weight of the checkpoint (``peer_child.check_peer``). OpenVINO runs unpruned, and
  for Qwen2-VL also with its CDPruner at ``pruning_ratio`` 67 (it has no pruning for LLaVA).
- ``--rounds`` interleaved rounds (the variants in rotated order each round), one fresh process per measurement
  (``benchmarks/peer_child.py``): one 336x336 (Qwen2-VL: 672x672) photo-like image, "What is in the picture?",
  batch 1, 32 new tokens forced. Medians go to benchmarks/results/peer_cpu.json with the ratios of the issue's
  targets, and a Markdown table to benchmarks/results/peer_cpu.md.

Checkpoints, bundles, exports and the peer environment are cached under ``--cache`` (default
~/.cache/clse-fx/peer), so a later run only measures. Timings mean something only on an otherwise idle machine:
``--build-only`` builds everything (on a busy machine if need be), ``--measure-only`` then measures what is built.
A bundle cached for another prompt length is compiled again.

The peer's environment, as :func:`ensure_peer_venv` builds it (by hand: the same commands)::

    python3 -m venv ~/.cache/clse-fx/peer-venv
    ~/.cache/clse-fx/peer-venv/bin/pip install torch==2.13.0
    printf 'torch==2.13.0+cpu\ntransformers==5.0.0\n' > ~/.cache/clse-fx/peer-venv/constraints.txt
    ~/.cache/clse-fx/peer-venv/bin/pip install -c ~/.cache/clse-fx/peer-venv/constraints.txt \
        "optimum-intel[openvino]==2.2.0" openvino-genai==2026.4.1.0
    ~/.cache/clse-fx/peer-venv/bin/pip uninstall -y torchvision
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from benchmarks.peer_child import NEW_TOKENS, PROMPT

HERE = Path(__file__).parent
ROOT = HERE.parent
CHILD = HERE / "peer_child.py"
RESULTS = HERE / "results" / "peer_cpu.json"
CACHE = Path.home() / ".cache" / "clse-fx" / "peer"
PEER_VENV = Path.home() / ".cache" / "clse-fx" / "peer-venv"
# The peer's environment. torch is installed first and then pinned: optimum-intel would replace this torch with a
# CUDA build (6 GB). optimum-intel 2.2 exports Qwen2-VL only with transformers <= 5.0.
PEER_TORCH = "torch==2.13.0"
PEER_PACKAGES = ("optimum-intel[openvino]==2.2.0", "openvino-genai==2026.4.1.0")
PEER_TRANSFORMERS = "transformers==5.0.0"

PRECISIONS = ("fp32", "fp16", "bf16", "int8", "int4")
CLSE_FLAGS = {
    "fp32": [],
    "fp16": ["--dtype", "float16"],
    "bf16": ["--dtype", "bfloat16"],
    # A random checkpoint's near-flat logits can miss the int4 floors (docs/compile.md): kept, and the row says so
    "int8": ["--weight-format", "int8", "--accept-lossy"],
    "int4": ["--weight-format", "int4", "--accept-lossy"],
}
# The OpenVINO weights each clse-fx precision is compared with: its default (fp16 weights, bf16 compute on a CPU
# with avx512_bf16) for the float precisions, the same format for int8 / int4.
OPENVINO_WEIGHTS = {"fp32": "fp16", "fp16": "fp16", "bf16": "fp16", "int8": "int8", "int4": "int4"}
# Issue 42's targets, clse-fx pruned over OpenVINO at the same weights (LLaVA: OpenVINO unpruned; Qwen2-VL:
# OpenVINO pruned); TTFT, RSS and disk are at most, decode at least, the ratio.
TARGETS = {
    "llava-1.5": {"ttft_ms": 0.6, "decode_tokens_per_s": 1.0, "peak_rss_mib": 1.1, "disk_mb": 1.1},
    "qwen2-vl": {"ttft_ms": 1.0, "decode_tokens_per_s": 1.0, "peak_rss_mib": 1.1, "disk_mb": 1.1},
}
HIGHER_IS_BETTER = {"decode_tokens_per_s"}
METRICS = ("ttft_ms", "decode_tokens_per_s", "peak_rss_mib", "disk_mb", "load_s")


@dataclass(frozen=True)
class ModelSpec:
    name: str
    image_size: int  # square images of this side
    budget: float  # clse-fx's pruned budget
    num_visual: int
    item_text: str  # what stands for the image in front of the prompt (the runtimes put it there)
    openvino_pruning: int | None  # OpenVINO's pruning_ratio where it prunes this family


MODELS = {
    "llava-1.5": ModelSpec("llava-1.5", 336, 192, 576, "<image>\n", None),
    "qwen2-vl": ModelSpec("qwen2-vl", 672, 0.334, 576, "<|vision_start|><|image_pad|><|vision_end|>", 67),
}


@dataclass(frozen=True)
class Variant:
    """One row: a system at a weight precision, pruned or not."""

    model: str
    system: str  # clse-fx | openvino-genai
    precision: str
    budget: float | None = None  # clse-fx's budget; None = unpruned
    pruning_ratio: int | None = None  # OpenVINO's

    @property
    def name(self) -> str:
        pruning = self.budget or self.pruning_ratio or "all"
        return f"{self.model}/{self.system}/{self.precision}/{pruning}"


def variants(models: list[str], precisions: list[str]) -> list[Variant]:
    """clse-fx pruned in every precision and unpruned in fp32; OpenVINO unpruned (and pruned where it prunes the
    family) at the weights each precision is compared with."""
    rows = []
    for name in models:
        spec = MODELS[name]
        rows += [Variant(name, "clse-fx", p, spec.budget) for p in precisions]
        rows.append(Variant(name, "clse-fx", "fp32", None))
        for weights in dict.fromkeys(OPENVINO_WEIGHTS[p] for p in precisions):
            rows.append(Variant(name, "openvino-genai", weights))
            if spec.openvino_pruning:
                rows.append(Variant(name, "openvino-genai", weights, pruning_ratio=spec.openvino_pruning))
    return rows


# --- checkpoints ---------------------------------------------------------------------------------------------


def qwen2_vl_geometry(width: Fraction) -> dict:
    """Qwen2-VL-7B's shapes at ``width``, its decoder as wide as LLaVA's (4096 * width), 24 layers, 4 vision layers."""
    from benchmarks.geometry import QWEN2_VL_7B

    hidden = int(4096 * width)
    intermediate = round(QWEN2_VL_7B["intermediate"] * hidden / QWEN2_VL_7B["hidden"] / 16) * 16
    vision_hidden = int(QWEN2_VL_7B["vision_hidden"] * width)
    return QWEN2_VL_7B | dict(
        hidden=hidden, intermediate=intermediate, heads=hidden // 128, kv_heads=max(1, hidden // 256), layers=24,
        vision_depth=4, vision_hidden=vision_hidden, vision_heads=max(1, vision_hidden // 80),
    )  # fmt: skip


def build_llava(width: Fraction):
    """The LLaVA-1.5 model at ``width`` and its processor (<image> at LLaVA's id 32000)."""
    from benchmarks import geometry
    from benchmarks.scale import width_geometry
    from clse_fx.demo import llava_processor
    from tests.tiny_models import tiny_tokenizer

    model = geometry.build(width_geometry(width))
    vocab = model.config.text_config.vocab_size
    tokenizer = tiny_tokenizer(model.config.image_token_id, vocab_size=vocab)
    return model, llava_processor(model.config, tokenizer)


def build_qwen2_vl(width: Fraction):
    """The Qwen2-VL model at ``width`` and its processor (Qwen's vision tokens at their real ids)."""
    import torch
    from transformers import Qwen2VLForConditionalGeneration, Qwen2VLImageProcessorPil

    from benchmarks.geometry import qwen2_vl_config
    from tests.tiny_models import QWEN_TOKENS, tiny_processor, tiny_tokenizer

    config = qwen2_vl_config(**qwen2_vl_geometry(width))
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(config).eval()
    ids = {
        "image_token": config.image_token_id,
        "video_token": config.video_token_id,
        "vision_start_token": config.vision_start_token_id,
        "vision_end_token": config.vision_end_token_id,
    }
    named = {attribute: (token, ids[attribute]) for attribute, (token, _) in QWEN_TOKENS.items()}
    tokenizer = tiny_tokenizer(config.image_token_id, vocab_size=config.text_config.vocab_size, named=named)
    image = Qwen2VLImageProcessorPil(patch_size=14, merge_size=2, temporal_patch_size=2)
    return model, tiny_processor("qwen2_vl", image_processor=image, tokenizer=tokenizer)


def photo_like_image(size: int):
    """A deterministic picture with a photo's statistics: a sky gradient, a sun, hills, textured grass and sensor
    noise (CLIP and Qwen see smooth regions and edges, not a flat test card)."""
    import numpy as np
    from PIL import Image, ImageFilter

    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:size, 0:size] / size
    sky = np.stack([0.35 + 0.3 * y, 0.55 + 0.3 * y, 0.95 - 0.2 * y], axis=-1)
    sun = np.exp(-((x - 0.72) ** 2 + (y - 0.22) ** 2) / 0.004)[..., None] * np.array([0.6, 0.45, 0.0])
    ridge = 0.55 + 0.08 * np.sin(7 * x) + 0.05 * np.sin(19 * x + 1)
    grass = np.stack([0.2 + 0.1 * np.sin(40 * x * y), 0.45 + 0.15 * y, 0.15 + 0.0 * x], axis=-1)
    grass += 0.08 * rng.standard_normal((size, size, 1))
    picture = np.where((y > ridge)[..., None], grass, sky + sun) + 0.02 * rng.standard_normal((size, size, 3))
    image = Image.fromarray((np.clip(picture, 0, 1) * 255).astype(np.uint8))
    return image.filter(ImageFilter.GaussianBlur(0.8))


def reference_inputs(model, processor, spec: ModelSpec, image) -> dict:
    """The processor's tensors for the benchmark prompt (chat form) and the model's last logits on them: what the
    peer's transformers and export are checked against."""
    import torch

    text = chat_text(processor.tokenizer, spec)
    inputs = dict(processor(images=[image], text=[text], return_tensors="pt"))
    with torch.no_grad():
        logits = model(**inputs).logits[:, -1]
    return {name: tensor.numpy() for name, tensor in inputs.items()} | {"logits": logits.float().numpy()}


def chat_text(tokenizer, spec: ModelSpec) -> str:
    """The prompt as both runtimes write it: the image in front, in the tokenizer's chat template."""
    message = [{"role": "user", "content": spec.item_text + PROMPT}]
    return tokenizer.apply_chat_template(message, tokenize=False, add_generation_prompt=True)


def text_tokens(checkpoint: Path, spec: ModelSpec) -> int:
    """The prompt's tokens outside the image's span (its placeholder; Qwen's vision start and end too): the
    bundle's --text-len, so nothing is padded."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    image = tokenizer(spec.item_text, add_special_tokens=False)["input_ids"]
    return len(tokenizer(chat_text(tokenizer, spec))["input_ids"]) - len(image)


# Weight names as the Hub's checkpoints have them. transformers 5.25 saves LLaVA's CLIP tower without its
# ``vision_model.`` level, which older versions (the peer's 5.0) do not recognise: they silently initialise a new
# random tower. Both load the Hub's names.
HUB_RENAMES = {"llava-1.5": {"vision_tower.": "vision_tower.vision_model."}, "qwen2-vl": {}}


def hub_layout(weights: Path, renames: dict[str, str]) -> None:
    """Rename the weights in the safetensors file ``weights`` by prefix (``renames``: old prefix -> new)."""
    from safetensors.numpy import load_file, save_file

    if not renames:
        return
    tensors = load_file(weights)
    for name in list(tensors):
        old = next((prefix for prefix in renames if name.startswith(prefix)), None)
        if old is not None:
            tensors[renames[old] + name[len(old) :]] = tensors.pop(name)
    save_file(tensors, weights, metadata={"format": "pt"})


def build_checkpoint(spec: ModelSpec, width: Fraction, work: Path) -> None:
    """``work``/checkpoint (model and processor), ``work``/reference.npz and the image, unless already there."""
    import numpy as np

    image_path = work / f"image-{spec.image_size}.png"
    if (work / "checkpoint" / "config.json").is_file() and (work / "reference.npz").is_file():
        return
    model, processor = (build_llava if spec.name == "llava-1.5" else build_qwen2_vl)(width)
    image = photo_like_image(spec.image_size)
    staging = work / "checkpoint.partial"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    hub_layout(staging / "model.safetensors", HUB_RENAMES[spec.name])
    processor.save_pretrained(staging)
    image.save(image_path)
    np.savez(work / "reference.npz", **reference_inputs(model, processor, spec, image))
    os.sync()  # on disk, as a downloaded checkpoint is
    staging.rename(work / "checkpoint")


# --- the peer's environment and exports ---------------------------------------------------------------------


def ensure_peer_venv(venv: Path = PEER_VENV) -> Path:
    """The peer's Python, creating its environment on first use: torch first (the CPU wheel where pip finds one),
    then OpenVINO GenAI and optimum-intel with torch and transformers pinned by a constraints file."""
    python = venv / "bin" / "python"
    marker = venv / "clse-peer-ready"
    if marker.is_file():
        return python
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q"]
    subprocess.run(pip + [PEER_TORCH], check=True)
    torch_version = subprocess.run(
        [str(python), "-c", "import torch; print(torch.__version__)"], check=True, capture_output=True, text=True
    ).stdout.strip()
    constraints = venv / "constraints.txt"
    constraints.write_text(f"torch=={torch_version}\n{PEER_TRANSFORMERS}\n")
    subprocess.run(pip + ["-c", str(constraints), *PEER_PACKAGES], check=True)
    # optimum-intel requires torchvision, and PyPI's is built against the CUDA torch: with the CPU torch its
    # import fails ("operator torchvision::nms does not exist"), and with it every transformers import. Only
    # optimum-intel's InternVL preprocessing uses it.
    subprocess.run([str(python), "-m", "pip", "uninstall", "-q", "-y", "torchvision"], check=True)
    marker.write_text(peer_versions(python) + "\n")
    return python


def peer_versions(python: Path) -> str:
    packages = "openvino openvino-genai openvino-tokenizers optimum-intel optimum nncf transformers torch"
    code = f"import importlib.metadata as m, json;print(json.dumps({{p: m.version(p) for p in {packages.split()!r}}}))"
    return subprocess.run([str(python), "-c", code], check=True, capture_output=True, text=True).stdout.strip()


def export_openvino(python: Path, checkpoint: Path, weights: str, out: Path) -> None:
    """``optimum-cli export openvino`` into ``out`` (written beside it, then renamed: never half there)."""
    if (out / "openvino_language_model.xml").is_file():
        return
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    command = [str(python.parent / "optimum-cli"), "export", "openvino", "--model", str(checkpoint)]
    command += ["--task", "image-text-to-text", "--weight-format", weights, str(staging)]
    if weights == "int4":
        command[-1:-1] = ["--group-size-fallback", "adjust"]  # 128 need not divide every matrix's width
    run_checked(command, f"optimum-cli export ({weights})")
    staging.rename(out)


def check_peer_weights(python: Path, work: Path, openvino_fp16: Path) -> dict:
    """peer_child.check_peer on this checkpoint, cached; raises when a weight did not load or the logits differ."""
    cached = work / "peer-check.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    command = [str(python), str(CHILD), "check", str(work / "checkpoint"), str(work / "reference.npz")]
    report = json.loads(run_checked(command + [str(openvino_fp16)], "the peer's weight check").splitlines()[-1])
    problems = [f"{key}: {value}" for key, value in report["loading_report"].items() if value]
    torch_side, exported = report["peer_torch_vs_clse_torch"], report["openvino_f32_vs_fp16_rounded_torch"]
    if torch_side["max_abs_diff"] > 1e-3 * max(torch_side["max_abs_logit"], 1):
        problems.append(f"the peer's logits differ from clse-fx's transformers by {torch_side['max_abs_diff']:.3g}")
    if exported["cosine"] < 0.9999 or not exported["same_top1"]:
        problems.append(f"the exported model's f32 logits differ from the checkpoint's ({exported})")
    if problems:
        raise RuntimeError(f"the peer does not compute the checkpoint {work.name}: " + "; ".join(problems))
    cached.write_text(json.dumps(report, indent=2) + "\n")
    return report


# --- clse-fx bundles -----------------------------------------------------------------------------------------


def compile_bundle(checkpoint: Path, spec: ModelSpec, variant: Variant, out: Path) -> None:
    """``clse-compile`` for the prompt's exact length (a cached bundle compiled for another is compiled again);
    clse-compile itself never leaves a half-written bundle."""
    text_len = text_tokens(checkpoint, spec)
    manifest = out / "manifest.json"
    if manifest.is_file() and json.loads(manifest.read_text())["geometry"]["text_len"] == text_len:
        return
    budget = variant.budget if variant.budget is not None else spec.num_visual  # every visual token: unpruned
    command = [sys.executable, "-m", "clse_fx.cli", str(checkpoint), "--keep", str(budget)]
    command += ["--text-len", str(text_len), *CLSE_FLAGS[variant.precision]]
    if spec.name == "qwen2-vl":
        command += ["--image-size", str(spec.image_size)]
    run_checked(command + ["-o", str(out), "--force"], f"clse-compile ({variant.name})")


def below_lossy_floors(bundle: Path) -> list[str]:
    """The lossy floors a quantized clse-fx bundle missed and was kept under (--accept-lossy), from its manifest."""
    manifest = bundle / "manifest.json"
    quantization = json.loads(manifest.read_text()).get("quantization") if manifest.is_file() else None
    return (quantization or {}).get("below_floors", [])


def run_checked(command: list[str], what: str, timeout: float | None = None) -> str:
    """Run ``command`` from the repository root (this clse-fx first on the path); its stdout, or a RuntimeError
    with its last stderr line."""
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(":")}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or done.stdout.strip().splitlines() or ["(no output)"]
        raise RuntimeError(f"{what} failed: {lines[-1]}")
    return done.stdout


# --- measuring -----------------------------------------------------------------------------------------------


def directory_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6


def measure(variant: Variant, artifact: Path, image: Path, peer_python: Path) -> dict:
    """One fresh process: peer_child's measurement of ``variant``, with the model directory's size."""
    if variant.system == "clse-fx":
        command = [sys.executable, str(CHILD), "clse", str(artifact), str(image)]
    else:
        command = [str(peer_python), str(CHILD), "openvino", str(artifact), str(image)]
        command += ["--pruning-ratio", str(variant.pruning_ratio)] if variant.pruning_ratio else []
    sample = json.loads(run_checked(command, f"measuring {variant.name}", timeout=900).splitlines()[-1])
    if sample["new_tokens"] != NEW_TOKENS:
        raise RuntimeError(f"{variant.name} generated {sample['new_tokens']} tokens, not {NEW_TOKENS}")
    computed = sample.get("compiled_tokens", sample["prompt_tokens"])
    if computed != sample["prompt_tokens"]:
        print(f"warning: {variant.name} computes {computed} tokens for a {sample['prompt_tokens']}-token prompt")
    return sample | {"disk_mb": directory_mb(artifact)}


def median_row(variant: Variant, samples: list[dict], width: str, below_floors: list[str] = ()) -> dict:
    """The medians of ``variant``'s samples; ``below_floors``: the lossy floors the bundle measured missed (a
    compile without --accept-lossy refuses it)."""
    row = {
        "model": variant.model,
        "system": variant.system,
        "precision": variant.precision,
        "budget": variant.budget,
        "pruning_ratio": variant.pruning_ratio,
        "width": width,
    }
    digits = {"ttft_ms": 1, "decode_tokens_per_s": 1, "peak_rss_mib": 0, "disk_mb": 1, "load_s": 2}
    row |= {name: round(statistics.median(s[name] for s in samples), digits[name]) for name in METRICS}
    return row | ({"below_lossy_floors": list(below_floors)} if below_floors else {})


# --- ratios and the table ------------------------------------------------------------------------------------


def compare(rows: list[dict]) -> list[dict]:
    """Each clse-fx pruned row over its OpenVINO counterpart at the same weights (LLaVA: unpruned; Qwen2-VL: its
    pruning), per metric: the ratio, the target and whether it is met."""
    out = []
    for ours in rows:
        if ours["system"] != "clse-fx" or ours["budget"] is None:
            continue
        pruning = MODELS[ours["model"]].openvino_pruning
        weights = OPENVINO_WEIGHTS[ours["precision"]]
        theirs = next(
            (
                r
                for r in rows
                if r["system"] == "openvino-genai"
                and (r["model"], r["precision"], r["pruning_ratio"], r["width"])
                == (ours["model"], weights, pruning, ours["width"])
            ),
            None,
        )
        if theirs is None:
            continue
        entry = {
            "model": ours["model"],
            "width": ours["width"],
            "precision": ours["precision"],
            "budget": ours["budget"],
            "against": {"precision": weights, "pruning_ratio": pruning},
        }
        for metric, target in TARGETS[ours["model"]].items():
            ratio = ours[metric] / theirs[metric]
            met = ratio >= target if metric in HIGHER_IS_BETTER else ratio <= target
            bound = ">=" if metric in HIGHER_IS_BETTER else "<="
            entry[metric] = {"ratio": round(ratio, 3), "target": f"{bound} {target}", "met": met}
        out.append(entry)
    return out


def markdown(rows: list[dict], ratios: list[dict]) -> str:
    lines = [
        "| model | system | weights | pruning | TTFT | decode | peak RSS | disk | load |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["budget"] is not None:
            pruning = f"budget {r['budget']}"
        else:
            pruning = f"pruning_ratio {r['pruning_ratio']}" if r["pruning_ratio"] else "none"
        weights = r["precision"] + (" (below lossy floors)" if r.get("below_lossy_floors") else "")
        lines.append(
            f"| {r['model']} | {r['system']} | {weights} | {pruning} | {r['ttft_ms']:.0f} ms | "
            f"{r['decode_tokens_per_s']:.1f} tok/s | {r['peak_rss_mib']:.0f} MiB | {r['disk_mb']:.0f} MB | "
            f"{r['load_s']:.2f} s |"
        )
    lines += [
        f"\n{r['model']} {r['precision']}: the bundle misses clse-compile's lossy floors "
        f"({'; '.join(r['below_lossy_floors'])}): a compile without --accept-lossy refuses it."
        for r in rows
        if r.get("below_lossy_floors")
    ]
    if ratios:
        lines += [
            "",
            "| model | clse-fx weights | against OpenVINO | TTFT | decode | peak RSS | disk |",
            "|---|---|---|---|---|---|---|",
        ]
        for e in ratios:
            ratio = e["against"]["pruning_ratio"]
            against = e["against"]["precision"] + (f", pruning_ratio {ratio}" if ratio else ", unpruned")
            cells = [
                f"{e[m]['ratio']:.2f}x ({e[m]['target']}: {'met' if e[m]['met'] else 'missed'})"
                for m in TARGETS[e["model"]]
            ]
            lines.append(f"| {e['model']} | {e['precision']} | {against} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --- the run -------------------------------------------------------------------------------------------------


class Phases(dict):
    """Seconds spent in each named phase of the run (cached work takes none)."""

    def timed(self, name: str, fn, *args):
        start = time.perf_counter()
        try:
            return fn(*args)
        finally:
            seconds = time.perf_counter() - start
            self[name] = round(self.get(name, 0) + seconds, 1)
            print(f"{name}: {seconds:.1f} s", flush=True)


def prepare(chosen: list[Variant], width: Fraction, cache: Path, phases: Phases, skipped: list[dict], build: bool):
    """Build what every variant runs (checkpoint, bundles, exports, the peer's weight check; with ``build`` off,
    only take what is cached): the artifact of each runnable variant, each model's image, the peer's Python and
    its weight checks."""
    peer_python = phases.timed("peer environment", ensure_peer_venv)
    artifacts: dict[Variant, Path] = {}
    images, checks = {}, {}
    for model in dict.fromkeys(v.model for v in chosen):
        spec = MODELS[model]
        work = cache / f"{model}-{str(width).replace('/', '_')}"
        checkpoint, fp16 = work / "checkpoint", work / "openvino" / "fp16"
        if not build and not (work / "peer-check.json").is_file():
            raise RuntimeError(f"{model} at width {width} is not built yet; run without --measure-only first")
        work.mkdir(parents=True, exist_ok=True)
        phases.timed(f"{model}: checkpoint", build_checkpoint, spec, width, work)
        images[model] = work / f"image-{spec.image_size}.png"
        phases.timed(f"{model}: openvino export fp16", export_openvino, peer_python, checkpoint, "fp16", fp16)
        checks[model] = phases.timed(f"{model}: peer weight check", check_peer_weights, peer_python, work, fp16)
        for variant in (v for v in chosen if v.model == model):
            if variant.system == "openvino-genai":
                out = work / "openvino" / variant.precision
                step, action = f"openvino export {variant.precision}", export_openvino
                args = (peer_python, checkpoint, variant.precision, out)
            else:
                out = work / "clse" / f"{variant.precision}-{variant.budget or 'all'}"
                step, action = f"compile {variant.precision} {variant.budget or 'unpruned'}", compile_bundle
                args = (checkpoint, spec, variant, out)
            try:
                if build:
                    phases.timed(f"{model}: {step}", action, *args)
                elif not any((out / name).is_file() for name in ("manifest.json", "openvino_language_model.xml")):
                    raise RuntimeError("not built (run without --measure-only)")
            except RuntimeError as error:
                skipped.append({"variant": variant.name, "reason": str(error)})
                print(f"skipped {variant.name}: {error}", flush=True)
                continue
            artifacts[variant] = out
    return artifacts, images, peer_python, checks


def measure_rounds(artifacts: dict, images: dict, peer_python: Path, rounds: int) -> dict[Variant, list[dict]]:
    """``rounds`` interleaved rounds, the variants in an order rotated by one each round, one process each."""
    order = list(artifacts)
    if not order:
        raise RuntimeError("nothing to measure: every variant was skipped")
    samples: dict[Variant, list[dict]] = {v: [] for v in order}
    for number in range(rounds):
        shift = number % len(order)
        for variant in order[shift:] + order[:shift]:
            sample = measure(variant, artifacts[variant], images[variant.model], peer_python)
            samples[variant].append(sample)
            print(
                f"round {number + 1}/{rounds} {variant.name}: TTFT {sample['ttft_ms']:.0f} ms, "
                f"{sample['decode_tokens_per_s']:.1f} tok/s, RSS {sample['peak_rss_mib']:.0f} MiB",
                flush=True,
            )
    return samples


def setup_facts(peer_python: Path, argv: list[str]) -> dict:
    import platform

    import onnxruntime

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        platform.processor(),
    )
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return {
        "command": "python -m benchmarks.peer_cpu " + " ".join(argv),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "clse_fx_commit": commit.stdout.strip(),
        "onnxruntime": onnxruntime.__version__,
        "peer": json.loads(peer_versions(peer_python)),
        "prompt": PROMPT,
        "new_tokens": NEW_TOKENS,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.peer_cpu", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9, help="interleaved rounds; rows are medians (default: 9)")
    parser.add_argument("--models", default="llava-1.5,qwen2-vl", help="comma-separated (default: %(default)s)")
    parser.add_argument(
        "--precisions",
        default="fp32,bf16,int8,int4",
        help=f"clse-fx weights at the pruned budget, comma-separated from {','.join(PRECISIONS)} (default: "
        "%(default)s); OpenVINO runs at the weights each is compared with",
    )
    parser.add_argument("--width", type=Fraction, default=Fraction(1, 8), help="of the 7B models (default: 1/8)")
    parser.add_argument("--quick", action="store_true", help="smoke check: 1 round, LLaVA-1.5, fp32")
    stage = parser.add_mutually_exclusive_group()
    stage.add_argument("--build-only", action="store_true", help="build and cache everything, measure nothing")
    stage.add_argument(
        "--measure-only", action="store_true", help="measure what is cached (others are skipped), build nothing"
    )
    parser.add_argument("--cache", type=Path, default=CACHE, help=f"built models (default: {CACHE})")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"results JSON (default: {RESULTS})")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    models, precisions = args.models.split(","), args.precisions.split(",")
    if args.quick:
        args.rounds, models, precisions = 1, ["llava-1.5"], ["fp32"]
    unknown = [m for m in models if m not in MODELS] + [p for p in precisions if p not in PRECISIONS]
    if unknown or args.rounds < 1:
        parser.error(f"unknown {', '.join(unknown)}" if unknown else "--rounds must be >= 1")

    start = time.perf_counter()
    phases, skipped = Phases(), []
    try:
        chosen = variants(models, precisions)
        artifacts, images, peer_python, checks = prepare(
            chosen, args.width, args.cache, phases, skipped, build=not args.measure_only
        )
        if args.build_only:
            print(f"built {len(artifacts)} of {len(chosen)} variants under {args.cache}: {dict(phases)}")
            return 0
        samples = phases.timed("measuring", measure_rounds, artifacts, images, peer_python, args.rounds)
    except (RuntimeError, subprocess.SubprocessError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    rows = [median_row(v, s, str(args.width), below_lossy_floors(artifacts[v])) for v, s in samples.items()]
    ratios = compare(rows)
    result = {
        "rows": rows,
        "ratios": ratios,
        "skipped": skipped,
        "rounds": args.rounds,
        "setup": setup_facts(peer_python, argv),
        "peer_weight_check": checks,
        "phases_s": phases | {"total": round(time.perf_counter() - start, 1)},
        "samples": {v.name: s for v, s in samples.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(rows, ratios)
    args.out.with_suffix(".md").write_text(table + "\n")
    print(table)
    print(f"({result['phases_s']['total']:.0f} s; {args.out})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
