"""clse-compile end to end, and its answers to bad input."""

import re
import shutil
from pathlib import Path

import pytest
from transformers import LlamaConfig, LlamaForCausalLM

from clse_fx.cli import compile_main
from clse_fx.deploy.manifest import read_manifest


def _run(capsys, *argv):
    code = compile_main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_compile_end_to_end(cli_bundle, tmp_path):
    """``clse-compile TINY --keep 8 --batch 2 --text-len 12`` (the shared run): its report and bundle."""
    shared, _, out = cli_bundle
    out_dir = tmp_path / "bundle"
    shutil.copytree(shared, out_dir)  # this test corrupts a file below
    for line in ("clse-compile report", "layer 1: keep 14", "parity vs eager reference", "FLOPs", "KV cache"):
        assert line in out
    manifest = read_manifest(out_dir)  # verifies every file's hash
    assert manifest.architecture == "LlavaForConditionalGeneration"
    assert manifest.plan.stages == [[1, 14], [2, 9], [3, 3]]
    assert manifest.geometry == {
        "batch": 2,
        "text_len": 12,
        "images": 1,
        "num_visual": 36,
        "visual_tokens_per_prompt": 36,
        "layout": [["grid", 1, 6, 6]],
        "grid": [1, 6, 6],
        "sequence_length": 48,
        "pruned_length": 15,
        "image_size": 48,
    }
    assert manifest.geometry["sequence_length"] == 12 + 36 and manifest.geometry["pruned_length"] == 15
    assert manifest.parity["reference_max_abs_logits"] <= 1e-5 and manifest.parity["reference_kept_identical"]
    assert manifest.parity["onnxruntime_max_abs_logits"] <= 1e-4 and manifest.parity["onnxruntime_indices_identical"]
    assert manifest.flops["pruned"] < manifest.flops["unpruned"]
    assert manifest.kv_cache_bytes.pruned < manifest.kv_cache_bytes.unpruned
    assert manifest.source["sha256"] and manifest.image_token_id == 4
    prefill = manifest.graphs["prefill"]
    assert prefill["file"] == "prefill.onnx" and prefill["inputs"][0] == {
        "name": "input_ids",
        "dtype": "int64",
        "shape": [2, 48],
    }
    assert {"tokenizer.json", "processor_config.json", "prefill.onnx"} <= set(manifest.files)
    assert {"torch", "transformers", "onnxruntime"} <= set(manifest.versions)
    # A corrupted file is caught by the manifest hashes.
    (out_dir / "prefill.onnx").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="does not match its manifest hash"):
        read_manifest(out_dir)


def test_progress_on_a_terminal_shows_each_phase_with_its_seconds():
    import io

    from rich.console import Console

    from clse_fx.cli import phase_progress

    console = Console(file=io.StringIO(), force_terminal=True, width=80)
    with phase_progress(console)("tracing the prefill"):
        pass
    assert re.search(r"tracing the prefill \(\d+\.\ds\)", console.file.getvalue())


def test_warnings_print_as_one_line(capsys):
    import warnings

    from clse_fx.deploy.cli import one_line_warnings

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        one_line_warnings()
        warnings.warn("running on CPU", stacklevel=1)
    assert capsys.readouterr().err == "warning: running on CPU\n"


@pytest.fixture
def unsupported_dir(tmp_path):
    config = LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2
    )
    LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    return tmp_path / "llama"


@pytest.mark.parametrize(
    ("make_args", "message"),
    [
        (lambda d, u, t: [str(t / "missing"), "--keep", "8"], "does not exist"),
        (lambda d, u, t: [str(t), "--keep", "8"], "has no config.json"),
        (lambda d, u, t: [str(u), "--keep", "8"], "unsupported architecture LlamaForCausalLM; clse-fx supports: Llava"),
        (lambda d, u, t: [str(d), "--keep", "37"], "exceeds the 36 visual tokens"),
        (lambda d, u, t: [str(d), "--keep", "0"], "at least 1"),
        (lambda d, u, t: [str(d), "--stages", "4:8"], "stage layer 4 is out of range: use 0..3"),
        (lambda d, u, t: [str(d)], "give a budget"),
        (lambda d, u, t: [str(d), "--keep", "8", "--image-size", "64"], "fixed 48px"),
        (lambda d, u, t: [str(d), "--keep", "8", "--text-len", "0"], "must be >= 1"),
        (lambda d, u, t: [str(d), "--keep", "8", "--stages", "1:4"], "--keep and --stages both given"),
        (lambda d, u, t: [str(d), "--keep", "8", "--accept-lossy"], "--accept-lossy keeps a --weight-format"),
        # Arguments are checked before the model is looked at: a missing model dir is not reported first.
        (lambda d, u, t: [str(t / "missing"), "--stages", "1-4"], "LAYER:KEEP"),
    ],
)
def test_bad_input_one_line_error_and_no_output(tiny_llava_dir, unsupported_dir, tmp_path, capsys, make_args, message):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    out_dir = tmp_path / "out" / "bundle"
    code, out, err = _run(capsys, *make_args(tiny_llava_dir, unsupported_dir, scratch), "-o", str(out_dir))
    assert code == 2
    assert message in err and err.startswith("error: ")
    assert len(err.strip().splitlines()) == 1
    assert not out_dir.exists()
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_existing_output_needs_force(tiny_llava_dir, tmp_path, capsys):
    out_dir = tmp_path / "bundle"
    out_dir.mkdir()
    (out_dir / "keep.txt").write_text("user data")
    code, _, err = _run(capsys, str(tiny_llava_dir), "--keep", "8", "-o", str(out_dir))
    assert code == 2 and "already exists; pass --force" in err and len(err.strip().splitlines()) == 1
    assert (out_dir / "keep.txt").read_text() == "user data"


def test_failure_mid_compile_leaves_nothing_behind(tiny_llava_dir, tmp_path, capsys, monkeypatch):
    import clse_fx.export.onnxruntime as ort_export

    def broken(pruned, path, optimize=True):
        path.write_bytes(b"half")
        raise ValueError("simulated exporter failure")

    monkeypatch.setattr(ort_export, "export_onnx", broken)
    out_dir = tmp_path / "bundle"
    code, _, err = _run(capsys, str(tiny_llava_dir), "--keep", "8", "-o", str(out_dir))
    assert code == 2 and "simulated exporter failure" in err
    assert list(tmp_path.iterdir()) == []


def test_no_verify_compiles_without_the_checks(tiny_llava_dir, tmp_path, capsys, monkeypatch):
    """--no-verify reaches the compiler as verify=False (no parity, deploy-path or lossy check runs)."""
    import clse_fx.api

    asked = []

    def stop(model, options, **kwargs):
        asked.append(options.verify)
        raise ValueError("stopped before compiling")

    monkeypatch.setattr(clse_fx.api, "compile", stop)
    argv = [str(tiny_llava_dir), "--keep", "8", "-o", str(tmp_path / "b")]
    assert _run(capsys, *argv, "--no-verify")[0] == 2 and _run(capsys, *argv)[0] == 2
    assert asked == [False, True]


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["--demo", "--keep", "8", "--stages", "1:4"],
        ["missing-dir", "--stages", "1-4"],
        ["--demo", "--keep", "8", "--text-len", "0"],
        ["--demo", "--keep", "8", "--target", "torch-compile", "--triton-repo", "x"],
    ],
)
def test_help_and_argument_errors_import_neither_torch_nor_transformers(argv):
    """--help and every argument error answer before the heavy imports (seconds on a loaded machine)."""
    import subprocess
    import sys

    code = (
        "import sys\nfrom clse_fx.cli import compile_main\n"
        "try:\n    rc = compile_main(sys.argv[1:])\nexcept SystemExit as e:\n    rc = e.code\n"
        "heavy = sorted({'torch', 'transformers'} & set(sys.modules))\n"
        "print(rc, heavy, file=sys.stderr)"
    )
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120)
    rc, heavy = done.stderr.strip().splitlines()[-1].split(" ", 1)
    assert heavy == "[]", done.stderr
    assert rc == ("0" if argv == ["--help"] else "2")


def test_a_checkpoint_processor_that_fails_to_load_is_a_warning(tiny_llava_dir, tmp_path):
    """The bundle then runs from token ids and pixels only; the compile says so instead of silently."""
    import shutil

    from clse_fx.api import load_processor

    copy = tmp_path / "ckpt"
    shutil.copytree(tiny_llava_dir, copy)
    (copy / "processor_config.json").write_text("{not json")
    with pytest.warns(UserWarning, match="processor did not load .*run from token ids and pixels only"):
        assert load_processor(copy) is None
    assert load_processor(tmp_path / "missing") is None  # no checkpoint dir (an in-memory model): no warning


def test_clse_run_output_into_a_closed_pipe_and_a_file_as_bundle(cli_bundle, tmp_path):
    """`clse-run ... | head -1` must not end in a BrokenPipeError traceback; a graph file given as the bundle names
    the directory to pass instead."""
    import subprocess
    import sys

    from PIL import Image

    bundle = cli_bundle[0]
    Image.new("RGB", (48, 48), (200, 30, 30)).save(tmp_path / "red.png")
    argv = ["--image", str(tmp_path / "red.png"), "--prompt", "what", "--max-new-tokens", "2"]
    code = "import sys; from clse_fx.deploy.cli import run_main; sys.exit(run_main(sys.argv[1:]))"
    process = subprocess.Popen(
        [sys.executable, "-c", code, str(bundle), *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    process.stdout.close()  # the reader is gone before the first line
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=120) in (0, 1) and "Traceback" not in stderr and "BrokenPipe" not in stderr, stderr
    done = subprocess.run(
        [sys.executable, "-c", code, str(bundle / "prefill.onnx"), *argv], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2
    assert done.stderr.strip() == (
        f"error: {bundle / 'prefill.onnx'} is a file; pass the bundle directory (the folder with manifest.json), "
        f"e.g. {bundle}"
    )


def test_help_shows_the_defaults_of_numeric_options():
    from clse_fx.cli import _parser
    from clse_fx.deploy.cli import _run_parser, _serve_parser

    parsers = (_parser, _run_parser, _serve_parser)
    compile_help, run_help, serve_help = (" ".join(parser().format_help().split()) for parser in parsers)
    assert "(static; default: 32)" in compile_help and "(static; default: 1)" in compile_help
    assert "--max-new-tokens MAX_NEW_TOKENS tokens to generate at most (default: 32)" in run_help
    assert "--port PORT HTTP port (default: 8000)" in serve_help


HELP = "; see clse-compile --help"  # ends every usage error


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--demo", "--keep", "0"], "keep=0 is neither a token count nor a ratio"),
        (["--demo", "--keep", "-5"], "keep=-5 is neither a token count nor a ratio"),
        (["--demo", "--keep", "8", "-o", "{file}"], "is a file; pass a directory path"),
        pytest.param(
            ["--demo", "--keep", "8", "--device", "cuda"],
            "--device cuda needs CUDA",
            marks=pytest.mark.skipif(Path("/dev/nvidia0").exists(), reason="a GPU machine"),
        ),
        # What the checkpoint's config.json decides, before torch is imported.
        (["{empty}", "--keep", "8"], "has no config.json"),
        (["{llama}", "--keep", "8"], "unsupported architecture LlamaForCausalLM; clse-fx supports: Llava"),
        (["--demo", "--stages", "9:100"], "stage layer 9 is out of range: use 0..5"),
        (["--demo", "--keep", "1000"], "keep=1000 exceeds the 256 visual tokens of this model"),
        (["--demo", "--keep", "0.001"], "leaves less than one visual token"),
        (["--demo", "--keep", "8", "--target", "torch-compile"], "use the Python API, clse_fx.compile(model"),
        # Usage errors: one line naming --help, not argparse's usage block.
        (["--demo", "--keep", "abc"], "(e.g. 0.25)" + HELP),
        (["--demo", "--keep", "8", "--target", "bogus"], "invalid choice: 'bogus' (choose from 'onnxruntime', "),
        # No option is accepted and then ignored.
        (["--demo", "--keep", "8", "--fp16"], "--fp16 only takes effect with --target tensorrt" + HELP),
        (["--demo", "--keep", "8", "--merge-metric", "keys"], "--merge-metric only takes effect with --merge tome"),
        (["--demo", "--keep", "8", "--explain-prompt", "hi"], "--explain-prompt only takes effect with --explain"),
        (
            ["--demo", "--keep", "8", "--target", "aot-inductor", "--no-onnx-optimize"],
            "--no-onnx-optimize only takes effect with a target that builds ONNX graphs" + HELP,
        ),
        (["model-dir", "--demo", "--keep", "8"], "pass either --demo or model-dir" + HELP),
    ],
)
def test_option_errors_come_before_the_checkpoint_loads(tmp_path, argv, message):
    """Checks that need no model, or only its config.json, run before it loads (minutes for a 7B checkpoint): a
    one-line error in a fresh process, in well under two seconds, without importing torch."""
    import subprocess
    import sys
    import time

    (tmp_path / "afile").write_text("")
    (tmp_path / "empty").mkdir()
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "model_type": "llama"}')
    paths = {name: tmp_path / name for name in ("afile", "empty", "llama")}
    argv = [arg.format(file=paths["afile"], **paths) for arg in argv]
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "clse_fx.cli", *argv], capture_output=True, text=True, timeout=60
    )
    seconds = time.perf_counter() - start
    lines = done.stderr.splitlines()
    imported = {line.rsplit("|", 1)[-1].strip() for line in lines if line.startswith("import time:")}
    errors = [line for line in lines if not line.startswith("import time:")]
    assert done.returncode == 2 and len(errors) == 1 and message in errors[0], done.stderr[-2000:]
    usage = HELP in message or any(word in message for word in ("invalid choice", "only takes effect"))
    assert errors[0].startswith("error: ") and errors[0].endswith(HELP) == usage
    assert not {"torch", "transformers"} & imported
    assert seconds < 1.5, f"{seconds:.1f} s: a check ran after something heavy"


@pytest.mark.parametrize(
    ("main", "argv", "message"),
    [
        ("run_main", ["b", "--image", "i.png", "--prompt", "p", "--seed", "3"], "--seed only takes effect with"),
        ("run_main", ["b", "--image", "i.png", "--prompt", "p", "--top-k", "5", "--temperature", "2"], "--temperature"),
        ("run_main", ["b", "--prompt", "p"], "one of the arguments --image --video is required"),
        ("serve_main", ["b", "--address", "head:6379", "--num-cpus", "2"], "--num-cpus only takes effect with a local"),
    ],
)
def test_clse_run_and_serve_usage_errors_are_one_line(capsys, main, argv, message):
    import clse_fx.deploy.cli as deploy_cli

    with pytest.raises(SystemExit) as stopped:
        getattr(deploy_cli, main)(argv)
    err = capsys.readouterr().err
    prog = "clse-run" if main == "run_main" else "clse-serve"
    assert stopped.value.code == 2 and message in err and err.endswith(f"; see {prog} --help\n")
    assert len(err.splitlines()) == 1


def test_sigterm_during_a_compile_leaves_nothing_behind(tiny_llava_dir, tmp_path):
    """SIGTERM unwinds like Ctrl-C: the staged output directory is removed and the process says so in one line."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "bundle"
    argv = [sys.executable, "-m", "clse_fx.cli", str(tiny_llava_dir), "--keep", "8", "-o", str(out), "--no-verify"]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in process.stdout:  # wait until the bundle is being written into its staging directory
        if "ONNX export" in line:
            break
    time.sleep(0.5)
    assert [p.name for p in tmp_path.iterdir()][0].startswith(".bundle."), "the staging directory should exist"
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 130
    assert "interrupted: nothing was written" in process.stderr.read()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("family", ["llava_next_video", "video_llava", "llava_onevision", "qwen2_vl", "qwen2_5_vl"])
def test_a_video_checkpoint_processor_loads_without_its_video_processor(family, tmp_path):
    """transformers' video processors need torchvision, which this set-up does not install: the checkpoint's
    processor is built from its tokenizer, image processor and processor_config.json instead, with no warning,
    and equals the processor the tests build (same tokens, image processor and settings); the bundle's copy
    (save_pretrained) loads back the same way."""
    import warnings

    from clse_fx.api import load_processor

    from . import tiny_models

    configs = {
        "llava_next_video": tiny_models.tiny_llava_next_video_config,
        "video_llava": tiny_models.tiny_video_llava_config,
        "llava_onevision": tiny_models.tiny_llava_onevision_config,
    }
    config = configs[family]() if family in configs else tiny_models.tiny_qwen_config(family)
    expected = tiny_models.tiny_processor(family)
    config.save_pretrained(tmp_path / "ckpt")
    expected.save_pretrained(tmp_path / "ckpt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = load_processor(tmp_path / "ckpt")
        loaded.save_pretrained(tmp_path / "bundle")
        config.save_pretrained(tmp_path / "bundle")
        reloaded = load_processor(tmp_path / "bundle")
    prompt = f"{expected.video_token} {expected.image_token} what colour is the circle ?"
    for processor in (loaded, reloaded):
        assert type(processor).__name__ == type(expected).__name__ and processor.video_processor is None
        assert (processor.image_token, processor.video_token) == (expected.image_token, expected.video_token)
        assert processor.tokenizer(prompt)["input_ids"] == expected.tokenizer(prompt)["input_ids"]
        assert processor.image_processor.to_dict() == expected.image_processor.to_dict()
        for name in ("patch_size", "num_additional_image_tokens", "vision_feature_select_strategy", "num_image_tokens"):
            assert getattr(processor, name, None) == getattr(expected, name, None), name
