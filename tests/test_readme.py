"""The README's first command and its sample questions, run exactly as the README writes them."""

import contextlib
import io
import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import clse_fx
from clse_fx.cli import compile_main
from clse_fx.deploy.cli import run_main
from clse_fx.deploy.engine import Engine
from clse_fx.plan import PruneConfig, plan_budget
from clse_fx.reference import reference_generate, reference_prune
from clse_fx.trace import graph_inputs

ROOT = Path(__file__).parents[1]
README = (ROOT / "README.md").read_text()
DEMO_OUTPUT = "clse-out/demo"


def _first_compile() -> list[str]:
    """The arguments of the README's first command's ``clse-compile`` (the last command of its first line)."""
    line = next(line for line in README.splitlines() if "clse-compile --demo" in line)
    argv = shlex.split(line.split("&&")[-1])
    assert argv[0].endswith("clse-compile") and argv[argv.index("-o") + 1] == DEMO_OUTPUT
    return argv[1:]


def _sample_questions() -> list[tuple[list[str], str]]:
    """Each README ``clse-run`` on the demo bundle: (its arguments, the answer its comment promises)."""
    samples = re.findall(r"^\S*clse-run (" + DEMO_OUTPUT + r" .*?)\s+# (\w+)$", README, flags=re.MULTILINE)
    return [(shlex.split(command), answer) for command, answer in samples]


def _commands(tool: str) -> list[list[str]]:
    """Every README line that runs ``tool``, split as a shell would (comments dropped)."""
    pattern = rf"^(\.venv/bin/)?{tool} "
    return [shlex.split(line, comments=True) for line in README.splitlines() if re.match(pattern, line)]


def _captured(main, argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The README's first command, run into a temporary dir with the graph dumped: (bundle, stdout, dump)."""
    base = tmp_path_factory.mktemp("readme")
    argv = [str(base / "demo") if arg == DEMO_OUTPUT else arg for arg in _first_compile()]
    code, out, err = _captured(compile_main, [*argv, "--dump-graph", str(base / "graph.txt")])
    assert code == 0, err
    return base / "demo", out, base / "graph.txt"


def test_first_command_reports_every_phase_and_the_true_average(demo):
    bundle, out, dump = demo
    # Without a terminal, one plain line per phase, stamped with the seconds so far.
    phases = re.findall(r"^\[\s*(\d+\.\d)s\] (.+)$", out, flags=re.MULTILINE)
    names = [name for _, name in phases]
    assert names[0] == "loading the checkpoint" and "parity with the eager reference pruner" in names
    assert len(names) >= 6 and [float(t) for t, _ in phases] == sorted(float(t) for t, _ in phases)
    manifest = json.loads((bundle / "manifest.json").read_text())
    plan = manifest["plan"]
    average = sum(plan["visual_tokens_per_layer"]) / len(plan["visual_tokens_per_layer"])
    assert plan["avg_visual_tokens"] == average and plan["budget"] == float(
        _first_compile()[_first_compile().index("--keep") + 1]
    )
    report = re.sub(r"[│\s]+", " ", out)  # the table's rows, unwrapped
    assert f"{average:.1f} on average over 6 layers (budget {plan['budget']:g}, score clse)" in report
    assert manifest["source"]["name"] == "demo" and Path(manifest["source"]["path"]).is_absolute()
    assert f"graph dump: {dump}\n" in out and f"bundle: {bundle}\n" in out and "manifest.json" in report
    assert "insert_clse_stages" in dump.read_text()
    assert manifest["parity"]["reference_kept_identical"] and manifest["parity"]["onnxruntime_max_abs_logits"] <= 1e-4


def test_sample_questions_get_the_answers_the_readme_shows(demo):
    bundle = demo[0]
    samples = _sample_questions()
    assert len(samples) >= 6
    for argv, answer in samples:
        argv = [
            str(bundle) if arg == DEMO_OUTPUT else str(ROOT / arg) if arg.startswith("examples/") else arg
            for arg in argv
        ]
        code, out, err = _captured(run_main, [*argv, "--json"])
        assert code == 0, err
        result = json.loads(out)["results"][0]
        assert result["text"].strip() == answer, (argv, result)
        # The demo model stops on its own: the answer word, then EOS.
        assert len(result["token_ids"]) == 2 and result["warnings"] == [], result


def test_prompts_the_model_cannot_read_are_answered_with_a_warning(demo):
    """Words outside the demo's vocabulary, and a question without its prompt format: one warning line each
    (once), and the same in --json."""
    image = str(ROOT / "examples/demo/shapes-1.png")
    argv = [str(demo[0]), "--image", image, "--prompt", "What is in the picture?", "--chat", "--max-new-tokens", "2"]
    code, out, err = _captured(run_main, argv)
    assert code == 0 and err.splitlines() == [
        "warning: the model's vocabulary has no 'What', 'in', 'picture?': the prompt reaches it as unknown tokens"
    ]
    code, out, err = _captured(run_main, [*argv[:4], "what colour is the circle ?", "--json"])
    (warning,) = json.loads(out)["results"][0]["warnings"]
    assert code == 0 and "not in the model's chat format (ending 'assistant :'); pass --chat" in warning


def test_the_explain_line_runs_right_after_the_quick_start_without_touching_its_bundle():
    """It writes another bundle (no --force needed, the quick start's answers unchanged) and an image that exists."""
    from clse_fx.cli import _parser

    (explain,) = [argv for argv in _commands("clse-compile") if "--explain" in argv]
    args = _parser().parse_args(explain[1:])
    assert args.output != DEMO_OUTPUT and not args.force and (ROOT / args.explain).is_file()


def test_the_video_quick_start_makes_a_checkpoint_compiles_it_and_asks_about_a_shipped_video():
    """The three lines fit together: the checkpoint the first writes is the one compiled, the bundle compiled is the
    one run, with as many frames as the shipped GIF holds. (tests/test_video.py runs this path end to end.)"""
    from clse_fx.cli import _parser
    from clse_fx.deploy.cli import _run_parser
    from tests import tiny_models

    make = next(line for line in README.splitlines() if "save_tiny_llava_next_video" in line)
    code = shlex.split(make)[2]
    checkpoint = re.search(r"s\('([^']+)'\)", code)[1]
    assert "from tests.tiny_models import save_tiny_llava_next_video as s" in code
    assert callable(tiny_models.save_tiny_llava_next_video)
    (compiled,) = [_parser().parse_args(argv[1:]) for argv in _commands("clse-compile") if checkpoint in argv]
    (run,) = [_run_parser().parse_args(argv[1:]) for argv in _commands("clse-run") if compiled.output in argv]
    assert compiled.model == checkpoint and compiled.frames > 1 and run.chat
    with Image.open(ROOT / run.video[0]) as video:
        assert video.n_frames >= compiled.frames


@pytest.fixture(scope="module")
def torch_compiled(demo_model):
    """The README's demo compile for the torch-compile target, at batch 2 (rows of different lengths are
    left-padded), with the reference pruner's plan for it. Test-only, as for the AOTInductor bundle: Inductor's
    C++ kernels built without optimisation (-O0) while the module's tests run, same generated code."""
    with torch._inductor.config.patch({"aot_inductor.debug_compile": True}):
        options = dict(keep=64, score="clse", target="torch-compile", batch=2, max_new_tokens=8)
        yield clse_fx.compile(demo_model[0], **options), PruneConfig(plan=plan_budget(64, 6, 256), score="clse")


def _tensors(feeds: dict) -> dict:
    return {name: torch.from_numpy(np.ascontiguousarray(array)) for name, array in feeds.items()}


@pytest.mark.inductor  # builds the demo's AOTInductor packages and its torch.compile module (pyproject.toml)
def test_every_target_gives_the_readme_answers_keeping_the_reference_tokens(
    demo, demo_model, demo_aot_bundle, torch_compiled
):
    """One model, one answer: the six README questions through onnxruntime (the README's bundle), aot-inductor and
    torch-compile get the README's answers, and every target keeps the reference pruner's visual ids."""
    (compiled, prune), model = torch_compiled, demo_model[0]
    onnx, aoti = Engine.load(demo[0]), Engine.load(demo_aot_bundle)
    questions = [
        (Image.open(ROOT / argv[argv.index("--image") + 1]).convert("RGB"), argv[argv.index("--prompt") + 1], answer)
        for argv, answer in _sample_questions()
    ]
    for image, question, answer in questions:
        inputs = _tensors(onnx.encode([image], [question], chat=True))
        expected = [stage[0].tolist() for stage in reference_prune(model, prune, **inputs).kept]
        for engine in (onnx, aoti):
            result = engine.generate([image], [question], 8, chat=True)[0]
            assert (result.text.strip(), result.kept_ids) == (answer, expected), (engine.manifest.target, question)
    # torch-compile, two questions a call: their prompts differ in length, so one row is left-padded.
    stops = set(onnx.manifest.stop_token_ids())
    for pair in (questions[i : i + 2] for i in range(0, len(questions), 2)):
        inputs = _tensors(onnx.encode([image for image, _, _ in pair], [question for _, question, _ in pair], True))
        kept = compiled.module(*graph_inputs(model, inputs).values()).kept
        assert all(torch.equal(a, b) for a, b in zip(kept, reference_prune(model, prune, **inputs).kept))
        generated = compiled.module.generate(inputs, 8, stops)
        assert [onnx.preprocessor.decode(row).strip() for row in generated] == [answer for _, _, answer in pair]
        reference = reference_generate(model, prune, max_new_tokens=8, **inputs).tolist()
        assert generated == [row[: len(tokens)] for row, tokens in zip(reference, generated)]
    assert compiled.module.generate(inputs, 1) == [row[:1] for row in generated]  # the same buffers, reloaded
    # The processor's own output as it comes (padded to the longer prompt, shorter than the compiled length).
    processor, pair = demo_model[1], questions[:2]
    texts = [f"user : <image> {question} assistant :" for _, question, _ in pair]
    batch = dict(processor(images=[image for image, _, _ in pair], text=texts, padding=True, return_tensors="pt"))
    assert batch["input_ids"].shape[1] < inputs["input_ids"].shape[1]
    answers = [onnx.preprocessor.decode(row).strip() for row in compiled.module.generate(batch, 8, stops)]
    assert answers == [answer for _, _, answer in pair]
    longer = dict(
        processor(
            images=[pair[0][0]] * 2, text=texts[:1] * 2, padding="max_length", max_length=300, return_tensors="pt"
        )
    )
    with pytest.raises(ValueError, match=r"compiled for 2 prompt\(s\) of at most 288 tokens; .*max_length=288"):
        compiled.module.generate(longer, 8)
    with pytest.raises(ValueError, match="compiled for 1..8"):
        compiled.module.generate(inputs, 9)
    assert compiled.manifest.parity["torch_compile_max_abs_logits"] <= 1e-4
    assert compiled.manifest.parity["deploy_constant_kept_identical"]
