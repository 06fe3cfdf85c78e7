"""A bundle is verified, not trusted (issue 39): copies of the shared CLI bundle (conftest.cli_bundle), tampered as
an attacker or a broken copy would, are refused at load with one line naming what is wrong, never loaded or
answered; sessions refuse ids and pixels no graph may see; a weights file changed under a running engine is a
one-line error, never SIGBUS; a signed bundle verifies only with its key; and verification stamps make a second
load cheap without missing a change."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image

from clse_fx.deploy import verify
from clse_fx.deploy.cli import run_main, serve_main
from clse_fx.deploy.engine import Engine
from clse_fx.deploy.manifest import MANIFEST, read_manifest
from clse_fx.deploy.onnx_graph import GraphError, declared_initializers
from clse_fx.deploy.session import OnnxSession
from clse_fx.deploy.weights import BundleChangedError, MappedFile

from .conftest import write_key_pair

EMBED = "model.model.language_model.embed_tokens.weight"  # in the decode graph (the prefill's has a gm. prefix)
LM_HEAD = "model.lm_head.weight.T"  # the decode graph's lm-head weight [64, 46]
WIDE = "model.model.language_model.layers.0.self_attn.q_proj.weight.T"  # a [64, 128] weight of the decode graph
OTHER = "model.model.language_model.layers.0.mlp.up_proj.weight.T"  # another one


@pytest.fixture
def bundle(cli_bundle, tmp_path) -> Path:
    copy = tmp_path / "bundle"
    shutil.copytree(cli_bundle[0], copy)
    return copy


def _manifest(bundle: Path) -> dict:
    return json.loads((bundle / MANIFEST).read_text())


def _write(bundle: Path, manifest: dict) -> None:
    (bundle / MANIFEST).write_text(json.dumps(manifest))


def _refused(bundle: Path, message: str, error=ValueError) -> None:
    with pytest.raises(error) as raised:
        read_manifest(bundle)
    assert message in str(raised.value) and "\n" not in str(raised.value), str(raised.value)


def _table(manifest: dict, graph: str = "decode") -> dict:
    return manifest["graphs"][graph]["initializers"]


def _overlap(manifest):
    _table(manifest)[OTHER]["offset"] = _table(manifest)[WIDE]["offset"] + 64


def _embedding_reads_the_lm_head(manifest):
    _table(manifest)[EMBED]["offset"] = _table(manifest)[LM_HEAD]["offset"]
    _table(manifest, "prefill")[f"gm.{EMBED}"]["offset"] = _table(manifest)[LM_HEAD]["offset"]


def _transposed(manifest):
    _table(manifest)[WIDE]["shape"] = _table(manifest)[WIDE]["shape"][::-1]


def _element_type(manifest):
    for graph in ("prefill", "decode"):
        for entry in _table(manifest, graph).values():
            entry["type"] = 6  # float -> int32: same size, every weight read as integers


def _tokenizer_as_weights(manifest):
    for graph in manifest["graphs"].values():
        graph["external_data"].append("tokenizer.json")
    size = manifest["files"]["tokenizer.json"]["bytes"] // 4
    _table(manifest)[EMBED] |= {"file": "tokenizer.json", "offset": 0, "shape": [size], "length": 4 * size}


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_overlap, f"graphs.decode.initializers['{OTHER}'] says offset"),
        (_embedding_reads_the_lm_head, f"initializers['gm.{EMBED}'] says offset"),
        (_transposed, f"initializers['{WIDE}'] says shape [128, 64] but decode.onnx declares [64, 128]"),
        (_element_type, "says type 6 but prefill.onnx declares 1"),
        (_tokenizer_as_weights, f"initializers['{EMBED}'] says file 'tokenizer.json' but decode.onnx declares"),
        (lambda m: _table(m).pop(WIDE), f"graphs.decode.initializers does not list '{WIDE}', which decode.onnx"),
        (lambda m: _table(m).update(extra=_table(m)[WIDE]), "lists 'extra', which decode.onnx does not declare"),
        (lambda m: _table(m)[WIDE].update(offset=True), "says offset True but decode.onnx declares"),
        (lambda m: _table(m)[WIDE].update(shape=4), "says shape 4 but"),
        (lambda m: _table(m)[WIDE].pop("type"), f"initializers['{WIDE}'] is malformed"),
        (lambda m: m["graphs"]["decode"].update(initializers=[WIDE]), "graphs.decode.initializers is not a table"),
        (lambda m: m["plan"].update(stages=[]), "graphs.prefill.outputs do not match plan.stages"),
        (lambda m: m["plan"].update(stages=[[1, "8"]]), "plan.stages is not a list of [layer, keep] pairs"),
        (lambda m: m["graphs"]["decode"].update(external_data="weights.data"), "graphs.decode is malformed"),
    ],
)
def test_a_manifest_that_disagrees_with_the_hashed_graphs_is_refused(bundle, edit, message):
    """manifest.json is the one file nothing hashes: whatever it says about where weights lie must be what the
    graphs (hashed) declare, so an edited table can neither overlap entries nor point one weight at another's
    bytes (which loaded and answered wrong text before), nor type or shape them otherwise."""
    manifest = _manifest(bundle)
    edit(manifest)
    _write(bundle, manifest)
    _refused(bundle, message)


def test_absurd_manifests_are_one_line_errors(bundle):
    (bundle / MANIFEST).write_text("[" * 200_000 + "]" * 200_000)  # RecursionError in json before
    _refused(bundle, "is corrupted (nested too deeply); recompile the bundle")
    with open(bundle / MANIFEST, "wb") as file:
        file.truncate(65 << 20)  # sparse: no disk needed
    _refused(bundle, "is over 64 MiB, which no manifest is")


def _rewrite_graph(bundle: Path, graph: str, change) -> None:
    """Change ``graph``'s ONNX file and make the manifest agree with it (hash, initializer table), as someone who
    can write the whole bundle but not sign it would (listing a new weight file too is refused earlier: every file
    a manifest entry names must be listed and hashed)."""
    model = onnx.load(str(bundle / f"{graph}.onnx"), load_external_data=False)
    change(model)
    data = model.SerializeToString()
    manifest = _replaced(bundle, f"{graph}.onnx", data)
    with contextlib.suppress(GraphError):  # a graph the reader refuses keeps the old table: it is refused anyway
        declared = declared_initializers(data, f"{graph}.onnx")
        manifest["graphs"][graph]["initializers"] = {name: item.entry() for name, item in declared.items()}
    _write(bundle, manifest)


def _replaced(bundle: Path, name: str, data: bytes) -> dict:
    """Write ``data`` as the bundle file ``name`` and list its hash in the manifest; the manifest."""
    (bundle / name).write_bytes(data)
    manifest = _manifest(bundle)
    manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    _write(bundle, manifest)
    return manifest


def _external(tensor, **fields) -> None:
    """Set ``tensor``'s external-data fields (location, offset, length) to ``fields``."""
    info = {entry.key: entry.value for entry in tensor.external_data} | {k: str(v) for k, v in fields.items()}
    del tensor.external_data[:]
    for key, value in info.items():
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def _initializer(model, name):
    return next(tensor for tensor in model.graph.initializer if tensor.name == name)


def _located(location):
    def change(model):
        for tensor in model.graph.initializer:
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                _external(tensor, location=location)

    return change


def _partial_overlap(model):
    first, second = _initializer(model, WIDE), _initializer(model, OTHER)
    offset = {entry.key: int(entry.value) for entry in first.external_data if entry.key == "offset"}["offset"]
    _external(second, offset=offset + 4096)


def _constant_with_external_data(model):
    tensor = onnx.TensorProto(name="c", data_type=1, dims=[4], data_location=onnx.TensorProto.EXTERNAL)
    _external(tensor, location="weights.data", offset=0, length=16)
    model.graph.node.append(onnx.helper.make_node("Constant", [], ["unused_constant"], value=tensor))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_located("other.data"), "from 'other.data', which is not one of the graph's weight files listed"),
        (_located("*/_ORT_MEM_ADDR_/*"), "from '*/_ORT_MEM_ADDR_/*', which is not one of the graph's weight files"),
        (_partial_overlap, f"initializer '{OTHER}' overlaps graphs."),
        (lambda m: _external(_initializer(m, WIDE), length=100), "holds 100 bytes but its type and shape"),
        (lambda m: _external(_initializer(m, LM_HEAD), offset=10**9), f"initializer '{LM_HEAD}' does not fit weights"),
        (lambda m: _initializer(m, WIDE).dims.__setitem__(0, 32), "holds 32768 bytes but its type and shape"),
        (_constant_with_external_data, "keeps external data outside its main graph's initializers"),
    ],
)
def test_a_graph_reads_only_listed_hashed_bytes_that_fit(bundle, change, message):
    """Even a graph rewritten with a matching hash and table reads weights only from files the manifest lists and
    hashes (an unlisted file in the bundle was loaded unhashed before; ONNX Runtime's in-memory location would
    read process memory), each initializer exactly its type's and shape's bytes, inside its file, overlapping
    no other, and no external data where the table does not look."""
    (bundle / "other.data").write_bytes((bundle / "weights.data").read_bytes())
    _rewrite_graph(bundle, "decode", change)
    _refused(bundle, message)


def test_graphs_that_do_not_parse_or_load_are_one_line_errors(bundle):
    _replaced(bundle, "decode.onnx", b"\xff" * 64)
    _refused(bundle, "decode.onnx is not a readable ONNX graph")
    graph = onnx.helper.make_graph([onnx.helper.make_node("NoSuchOp", ["x"], ["y"])], "g", [], [])
    manifest = _replaced(bundle, "decode.onnx", onnx.helper.make_model(graph).SerializeToString())
    manifest["graphs"]["decode"]["initializers"] = {}
    _write(bundle, manifest)
    with pytest.raises(ValueError, match=r"^ONNX Runtime cannot load decode.onnx \(.*\); recompile the bundle$"):
        Engine.load(bundle)


def test_a_graph_swapped_while_the_sessions_are_built_is_refused(bundle, monkeypatch):
    """ONNX Runtime reads a graph by its path after it was verified: a file swapped in and back meanwhile (same
    bytes again, here) has a new ctime, so the load is refused."""
    from clse_fx.deploy import session

    build = session.inference_session

    def swapping(path, *args):
        original = path.read_bytes()
        path.write_bytes(original)
        return build(path, *args)

    monkeypatch.setattr(session, "inference_session", swapping)
    time.sleep(0.05)  # past the coarse timestamp tick of the copy
    with pytest.raises(ValueError, match=r"^bundle file (prefill|decode).onnx changed after it was verified"):
        Engine.load(bundle)


def test_a_graph_hard_linked_while_the_sessions_are_built_still_loads(bundle, tmp_path, monkeypatch):
    """A hard link (a Triton repository written from the bundle meanwhile) moves the ctime, not the content: the
    file is hashed again and the load goes on."""
    from clse_fx.deploy import session

    build = session.inference_session

    def linking(path, *args):
        os.link(path, tmp_path / f"{path.name}.link")
        return build(path, *args)

    monkeypatch.setattr(session, "inference_session", linking)
    time.sleep(0.05)
    assert Engine.load(bundle).manifest.num_layers > 0


def test_clse_run_answers_a_tampered_bundle_with_one_line(bundle, tmp_path, capsys):
    manifest = _manifest(bundle)
    _embedding_reads_the_lm_head(manifest)
    _write(bundle, manifest)
    Image.new("RGB", (48, 48), (120, 30, 200)).save(tmp_path / "image.png")
    assert run_main([str(bundle), "--image", str(tmp_path / "image.png"), "--prompt", "what"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: manifest.json: graphs.prefill.initializers[") and err.count("\n") == 1, err


@pytest.fixture
def stamps(tmp_path, monkeypatch) -> Path:
    """A private stamp directory; files count as old enough to stamp at once."""
    directory = tmp_path / "stamps"
    monkeypatch.setenv(verify.CACHE_VARIABLE, str(directory))
    monkeypatch.setattr(verify, "STAMP_MIN_AGE_S", 0.0)
    return directory


def _count_hashes(monkeypatch) -> list:
    hashed = []
    real = verify.file_sha256

    def counting(file):
        hashed.append(Path(file.name).name)
        return real(file)

    monkeypatch.setattr(verify, "file_sha256", counting)
    return hashed


def test_a_second_load_trusts_stamps_only_for_unchanged_files(bundle, stamps, monkeypatch):
    """A file that hashed correctly once is not hashed again while its identity (device, inode, size, mtime and
    ctime) stays the same; a change that even restores the size and modification time is hashed and refused."""
    hashed = _count_hashes(monkeypatch)
    read_manifest(bundle)
    assert "weights.data" in hashed and len(list(stamps.iterdir())) == len(_manifest(bundle)["files"])
    hashed.clear()
    read_manifest(bundle)
    assert hashed == []
    weights = bundle / "weights.data"
    before = weights.stat()
    time.sleep(0.05)  # past the coarse timestamp tick of the copy
    with open(weights, "r+b") as file:
        file.seek(1000)
        file.write(bytes([file.read(1)[0] ^ 1]))
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))  # the mtime back; the ctime cannot be
    _refused(bundle, "bundle file weights.data does not match its manifest hash")
    assert hashed == ["weights.data"]


def test_stamps_are_not_written_for_fresh_files_or_kept_where_others_can_write(bundle, tmp_path, monkeypatch):
    directory = tmp_path / "stamps"
    monkeypatch.setenv(verify.CACHE_VARIABLE, str(directory))
    read_manifest(bundle)  # copied just now: changed within STAMP_MIN_AGE_S, so not stamped
    assert list(directory.iterdir()) == []
    directory.chmod(0o777)
    assert verify.Stamps.for_user().directory is None
    monkeypatch.setenv(verify.CACHE_VARIABLE, "off")
    assert verify.Stamps.for_user().directory is None


def _prompt(engine: Engine) -> dict[str, np.ndarray]:
    ids = np.full((engine.manifest.batch, engine.sequence_length), 5, dtype=np.int64)
    ids[:, 1 : 1 + engine.manifest.geometry["num_visual"]] = engine.manifest.image_token_id
    pixels = np.random.default_rng(0).standard_normal(engine.prefill.inputs["pixel_values"]).astype(np.float32)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "pixel_values": pixels}


def test_onnx_sessions_refuse_ids_outside_the_vocabulary_and_non_finite_pixels(cli_bundle):
    """Called directly, without Engine's checks: ONNX Runtime ran id -1 as the last token before."""
    engine = Engine.load(cli_bundle[0])
    vocab, feeds = engine.manifest.vocab_size(), _prompt(engine)
    own = OnnxSession(cli_bundle[0] / "prefill.onnx")
    assert own.vocab_size == engine.prefill.vocab_size == vocab  # read from the graph's logits
    for session in (engine.prefill, own):
        for bad_id in (-1, vocab):
            ids = feeds["input_ids"].copy()
            ids[0, -1] = bad_id
            with pytest.raises(ValueError, match=rf"token id {bad_id}, outside the model's vocabulary \[0, {vocab}\)"):
                session.run(**feeds | {"input_ids": ids})
        with pytest.raises(ValueError, match="pixel_values holds NaN or infinite values"):
            session.run(**feeds | {"pixel_values": np.full_like(feeds["pixel_values"], np.nan)})
    shapes = {name: [1 if isinstance(d, str) else d for d in shape] for name, shape in engine.decode.inputs.items()}
    step = {name: np.zeros(shapes[name], dtype) for name, dtype in engine.decode.dtypes.items()}
    with pytest.raises(ValueError, match="token id 46, outside"):
        engine.decode.run(**step | {"input_ids": np.full_like(step["input_ids"], vocab)})


@pytest.mark.parametrize("change", ["rewrite", "truncate"])
def test_a_weights_file_changed_between_runs_is_a_one_line_error(bundle, monkeypatch, change):
    """Without a lease (another user's file, a network filesystem), every run first compares the file's size and
    modification time with the verified ones: the change is an error naming the file, not a fault."""
    monkeypatch.setattr(MappedFile, "_lease", lambda self: False)
    engine = Engine.load(bundle)
    feeds = _prompt(engine)
    engine.generate_ids(feeds, 2)
    time.sleep(0.05)
    if change == "truncate":
        os.truncate(bundle / "weights.data", 1000)
    else:
        with open(bundle / "weights.data", "r+b") as file:
            file.write(b"\0" * 64)
    for call in (lambda: engine.generate_ids(feeds, 2), engine.check_bundle):
        with pytest.raises(BundleChangedError, match=r"^bundle file weights.data was rewritten or truncated while"):
            call()


LEASED_TRUNCATION = """
import os, sys, threading, time
import numpy as np
from clse_fx.deploy.engine import Engine
engine = Engine.load(sys.argv[1])
if not all(file.leased for file in engine.weights.files.values()):
    print("no lease"); sys.exit(0)
ids = np.full((engine.manifest.batch, engine.sequence_length), 5, dtype=np.int64)
ids[:, 1 : 1 + engine.manifest.geometry["num_visual"]] = engine.manifest.image_token_id
pixels = np.zeros(engine.prefill.inputs["pixel_values"], np.float32)
feeds, errors, runs = {"input_ids": ids, "attention_mask": np.ones_like(ids), "pixel_values": pixels}, [], []
def generate():
    try:
        while True:
            engine.generate_ids(feeds, 16)
            runs.append(1)
    except Exception as error:
        errors.append(error)
thread = threading.Thread(target=generate)
thread.start()
while not runs:
    time.sleep(0.01)
start = time.perf_counter()
os.truncate(os.path.join(sys.argv[1], "weights.data"), 1000)
waited = time.perf_counter() - start
thread.join()
print(f"{type(errors[0]).__name__}: {errors[0]} (the truncation waited {waited:.3f} s)")
"""


def test_a_weights_file_truncated_mid_run_waits_for_the_run_and_is_then_refused(bundle):
    """With a read lease, a truncation while generations run back to back (once a SIGBUS with no message) waits
    until the step in progress ends; that generation, and every later one, is refused with one line. In a
    subprocess: a regression would kill it, not the test run."""
    done = subprocess.run(
        [sys.executable, "-c", LEASED_TRUNCATION, str(bundle)],
        capture_output=True,
        text=True,
        timeout=120,
        env=os.environ | {"PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    if done.stdout.strip() == "no lease":
        pytest.skip("the kernel gives no read lease on this file (not its owner, or no lease support)")
    assert done.stdout.startswith("BundleChangedError: bundle file weights.data was opened for writing or truncated")
    assert float(done.stdout.rsplit("waited ", 1)[1].split()[0]) < 5, done.stdout


@pytest.fixture
def public_key(cli_bundle) -> Path:
    """The key the shared CLI bundle was signed with (conftest.cli_bundle signs it where model-signing is)."""
    key = cli_bundle[0].parent / "key.pub"
    if not key.is_file():
        pytest.skip("the sign extra (model-signing) is not installed")
    return key


def test_a_signed_bundle_verifies_with_its_key_only(bundle, public_key, tmp_path, capsys):
    assert read_manifest(bundle, verify_key=public_key).batch == 2
    Engine.load(bundle, verify_key=public_key)
    other = tmp_path / "other"
    other.mkdir()
    _, other_public = write_key_pair(other)
    with pytest.raises(ValueError, match=r"manifest is not signed by .*other.*key\.pub \(Key mismatch"):
        read_manifest(bundle, verify_key=other_public)
    assert serve_main([str(bundle), "--verify-key", str(other_public)]) == 2  # before any replica starts
    assert capsys.readouterr().err.count("\n") == 1
    manifest = _manifest(bundle)
    manifest["runtime"]["max_new_tokens"] -= 1  # any edit, however harmless it looks
    _write(bundle, manifest)
    with pytest.raises(ValueError, match="the bundle was changed after signing or signed with another key"):
        read_manifest(bundle, verify_key=public_key)
    image = tmp_path / "image.png"
    Image.new("RGB", (48, 48)).save(image)
    argv = [str(bundle), "--image", str(image), "--prompt", "what", "--verify-key", str(public_key)]
    assert run_main(argv) == 2
    err = capsys.readouterr().err
    assert "is not signed by" in err and err.count("\n") == 1, err
    (bundle / "manifest.json.sig").unlink()
    with pytest.raises(ValueError, match=r"is not signed \(no manifest.json.sig\); sign it with clse-compile --sign"):
        read_manifest(bundle, verify_key=public_key)


def test_clse_compile_checks_the_signing_key_before_loading_the_model(tiny_llava_dir, public_key, tmp_path, capsys):
    from clse_fx.cli import compile_main

    out = tmp_path / "out"
    code = compile_main([str(tiny_llava_dir), "--keep", "8", "-o", str(out), "--sign", str(public_key)])
    err = capsys.readouterr().err
    assert code == 2 and "cannot sign with" in err and "pass an EC private key (PEM)" in err, err
    assert not out.exists()
