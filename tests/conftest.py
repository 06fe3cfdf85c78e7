"""Shared fixtures: tiny LLaVA checkpoints built from config classes and loaded via from_pretrained."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import LlavaForConditionalGeneration

from clse_fx.demo import save_tiny_llava
from clse_fx.models import adapter_for


def _share_the_onnx_op_registry() -> None:
    """torch.onnx.export rebuilds its registry of torchlib translations on every call (about 1.4 s on these
    cores, a tenth of a tiny model's compile); the tests build it once per opset. Custom translations change a
    registry after it is built: the only one (clse_fx/export/group_query_attention.py, for an op only the
    in-graph decode step calls) is the same in every export."""
    import functools

    from torch.onnx._internal.exporter import _registration

    build = _registration.ONNXRegistry.from_torchlib.__func__
    _registration.ONNXRegistry.from_torchlib = classmethod(functools.cache(build))


_share_the_onnx_op_registry()

if os.environ.get("PYTEST_XDIST_WORKER"):
    # One intra-op thread per xdist worker: the workers already fill the cores, and oversubscribed threads slow
    # every matmul down.
    torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def _private_verification_stamps(tmp_path_factory):
    """Bundle verification stamps (clse_fx.deploy.verify) go to this run's temporary directory, not the user's
    cache (subprocesses inherit it)."""
    from clse_fx.deploy.verify import CACHE_VARIABLE

    os.environ[CACHE_VARIABLE] = str(tmp_path_factory.mktemp("verify-stamps"))


def write_key_pair(folder) -> tuple:
    """An elliptic-curve (P-256) key pair in PEM files, as ``openssl ecparam``/``openssl ec`` write them, for
    signed bundles: (private key path, public key path)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    private, public = folder / "key.pem", folder / "key.pub"
    encoding = serialization.Encoding.PEM
    private.write_bytes(key.private_bytes(encoding, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(encoding, serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory):
    return save_tiny_llava(tmp_path_factory.mktemp("tiny-llava"))


@pytest.fixture(scope="session")
def tiny_llava(tiny_llava_dir):
    return LlavaForConditionalGeneration.from_pretrained(tiny_llava_dir).eval()


@pytest.fixture(scope="session")
def odd_llava_dir(tmp_path_factory):
    """A 5x5-grid, 5-layer variant: odd grid, no GQA, another depth."""
    return save_tiny_llava(
        tmp_path_factory.mktemp("odd-llava"), seed=1, image_size=40, num_layers=5, num_heads=4, num_kv_heads=4
    )


@pytest.fixture(scope="session")
def odd_llava(odd_llava_dir):
    return LlavaForConditionalGeneration.from_pretrained(odd_llava_dir).eval()


@pytest.fixture(scope="session")
def cli_bundle(tmp_path_factory, tiny_llava_dir):
    """One ``clse-compile`` of the tiny LLaVA (``--keep 8 --batch 2 --text-len 12 --triton-repo
    --no-onnx-optimize``, and ``--sign key.pem`` next to the bundle where the sign extra is installed; the optimised
    CLI path is the README demo's), shared by the CLI, serving, Triton, generation and bundle-attack tests:
    (bundle, Triton repository, the command's stdout). Built once per run even
    across xdist workers, under a file lock in their shared temporary directory (pytest-xdist's documented
    pattern); tests that change files copy it first."""
    import contextlib
    import io

    from filelock import FileLock

    from clse_fx.cli import compile_main

    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "cli-bundle"
    report = root / "stdout.txt"  # written last: the build is complete
    with FileLock(f"{root}.lock"):
        if not report.is_file():
            root.mkdir(exist_ok=True)
            argv = [str(tiny_llava_dir), "--keep", "8", "--batch", "2", "--text-len", "12"]
            argv += ["-o", str(root / "bundle"), "--triton-repo", str(root / "repo"), "--force", "--no-onnx-optimize"]
            if importlib.util.find_spec("model_signing"):
                argv += ["--sign", str(write_key_pair(root)[0])]
            out, err = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                assert compile_main(argv) == 0, err.getvalue()
            report.write_text(out.getvalue())
    return root / "bundle", root / "repo", report.read_text()


@pytest.fixture(scope="session")
def demo_model():
    """The README's demo model (the shipped proxy LLaVA) and its processor, loaded as clse-compile loads it."""
    from clse_fx.api import load_checkpoint
    from clse_fx.demo import proxy_model_dir

    return load_checkpoint(proxy_model_dir())


@pytest.fixture(scope="session")
def demo_aot_bundle(tmp_path_factory, demo_model):
    """The demo (budget 64, spectral score, as the README) as an aot-inductor bundle at batch 2, shared by the
    aot-inductor and cross-target tests; built once per run across xdist workers (see ``cli_bundle``)."""
    from filelock import FileLock

    import clse_fx

    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "demo-aot"
    bundle = root / "bundle"  # written by renaming a staged directory: present means complete
    with FileLock(f"{root}.lock"):
        if not bundle.is_dir():
            model, processor = demo_model
            # Test-only: C++ built without optimisation (-O0) compiles in about 60% of the time and runs these tiny
            # kernels barely slower; the generated code and the package format are the same.
            with torch._inductor.config.patch({"aot_inductor.debug_compile": True}):
                options = dict(keep=64, score="clse", target="aot-inductor", batch=2, verify=False)
                clse_fx.compile(model, output_dir=bundle, processor=processor, **options)
    return bundle


def prompt_ids(model, layout: list[list[int | str]]) -> torch.Tensor:
    """input_ids from per-row layouts: ints are text ids, "img" expands to one image's placeholder tokens."""
    per_image = adapter_for(model).tokens_per_image()
    image_token_id = model.config.image_token_id
    rows = []
    for row in layout:
        ids: list[int] = []
        for item in row:
            ids.extend([image_token_id] * per_image if item == "img" else [item])
        rows.append(ids)
    return torch.tensor(rows)


def portable_twin(engine, model, folder: Path):
    """``engine``'s bundle with the portable decode graph (:class:`clse_fx.decode.DecodeStep`: the runtime writes
    the KV cache, as in the tensorrt target's bundle) in place of its in-graph one, exported for the same caches
    into ``folder`` and quantized as the bundle was: the oracle of the in-graph decode step."""
    import dataclasses

    from clse_fx.deploy.engine import Engine
    from clse_fx.deploy.manifest import KV_IN_GRAPH, KV_RUNTIME
    from clse_fx.deploy.session import OnnxSession
    from clse_fx.export.onnxruntime import export_decode_onnx
    from clse_fx.export.quantize import quantize_bundle, roles_for
    from clse_fx.export.shared_weights import share_weights

    manifest = engine.manifest
    assert manifest.runtime.kv_cache_update == KV_IN_GRAPH
    shapes = {output["name"]: output["shape"] for output in manifest.graphs["prefill"]["outputs"]}
    dtype = getattr(torch, manifest.dtype)
    cache = [
        tuple(torch.zeros(shapes[f"present.{i}.{kind}"], dtype=dtype) for kind in ("key", "value"))
        for i in range(manifest.num_layers)
    ]
    _, path = export_decode_onnx(model, cache, folder / "decode.onnx", optimize=False)
    if manifest.quantization:
        share_weights([path])
        quantize_bundle([path], roles_for(model), manifest.quantization["weight_format"])
    decode = OnnxSession(path, dtype="float32" if manifest.quantization else manifest.dtype)
    runtime = dataclasses.replace(manifest.runtime, kv_cache_update=KV_RUNTIME)
    twin = dataclasses.replace(manifest, runtime=runtime)
    return Engine(engine.bundle, twin, engine.prefill, decode, engine.preprocessor, engine.input_graphs)


def assert_decodes_like_portable(engine, model, folder: Path, feeds: dict, steps: int, bound: float) -> list:
    """``engine``'s in-graph decode against its :func:`portable_twin` on ``feeds``: the twin decodes greedily,
    the engine is fed the twin's tokens; every step's logits within ``bound`` (max abs), and the same greedy
    token wherever the twin's best two logits are more than ``2 * bound`` apart (closer ones may trade places).
    Returns the twin's greedy tokens."""
    from clse_fx.export.deploy_check import TeacherForcing

    want = TeacherForcing()
    tokens, _ = portable_twin(engine, model, folder).generate_ids(feeds, steps, want)
    got = TeacherForcing(np.array(tokens))
    engine.generate_ids(feeds, steps, got)
    assert len(got.logits) == len(want.logits) == steps
    for have, expected in zip(got.logits, want.logits):
        assert np.abs(have - expected).max() <= bound
        best_two = np.sort(expected, axis=-1)[:, -2:]
        decided = best_two[:, 1] - best_two[:, 0] > 2 * bound
        assert np.array_equal(have.argmax(-1)[decided], expected.argmax(-1)[decided])
    return tokens


# The slowest files first (seconds on 2 cores): xdist gives each worker whole files, and a long file started
# last would leave the other worker idle at the end.
SLOW_FILES = [  # longest first, as measured (--durations=0 summed per file, 2026-12-07)
    "test_aot_inductor.py",  # with test_readme.py (SHARED_WORKER); -m inductor only
    "test_anyres.py",
    "test_video.py",
    "test_serve.py",
    "test_qwen2_vl.py",
    "test_compile_parity.py",
    "test_device.py",
    "test_dtype.py",
    "test_generation.py",
    "test_onnx_export.py",
    "test_video_llava.py",
    "test_tensorrt_and_targets.py",
    "test_cli.py",
    "test_readme.py",
    "test_passes.py",
    "test_merge.py",
    "test_layouts.py",
    "test_quantize.py",
    "test_deploy_check.py",
    "test_peer_scores.py",
]


def pytest_collection_modifyitems(items):
    def rank(item):
        name = item.path.name
        return SLOW_FILES.index(name) if name in SLOW_FILES else len(SLOW_FILES)

    items.sort(key=rank)  # stable: the order inside each file is kept


# Files that share an expensive session fixture run on one xdist worker: on two, the second would wait idle on the
# first's file lock for the whole build (the AOTInductor demo bundle takes about two minutes).
SHARED_WORKER = {"test_readme.py": "test_aot_inductor.py"}


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadFileScheduling

    class SharedFixtureScheduling(LoadFileScheduling):
        """pytest-xdist's per-file scheduling, with the files of :data:`SHARED_WORKER` in one unit of work."""

        def _split_scope(self, nodeid: str) -> str:
            path = super()._split_scope(nodeid)
            folder, _, name = path.rpartition("/")
            return f"{folder}/{SHARED_WORKER.get(name, name)}" if folder else SHARED_WORKER.get(name, name)

    return SharedFixtureScheduling(config, log) if config.getoption("dist") == "loadfile" else None
