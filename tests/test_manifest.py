"""The bundle manifest is read and validated against its schema on load: old, foreign and damaged manifests are
one-line errors that say to recompile, never a KeyError inside a generation loop."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from clse_fx.deploy.manifest import (
    KV_IN_GRAPH,
    KV_RUNTIME,
    MANIFEST,
    SCHEMA_VERSION,
    Manifest,
    prefill_output_names,
    read_manifest,
    split_prefill_outputs,
)


@pytest.fixture
def manifest_json(cli_bundle) -> dict:
    bundle, _, _ = cli_bundle
    return json.loads((bundle / MANIFEST).read_text())


def test_a_written_manifest_reads_back_typed_and_unchanged(cli_bundle, manifest_json):
    bundle, _, _ = cli_bundle
    manifest = read_manifest(bundle)
    assert manifest.schema_version == SCHEMA_VERSION and manifest.to_dict() == manifest_json
    assert manifest.runtime.padding == "left"
    assert manifest.runtime.decode_position_start == manifest.sequence_length
    assert manifest.runtime.max_new_tokens == manifest.max_position_embeddings - manifest.sequence_length
    assert manifest.runtime.kv_cache_update == KV_IN_GRAPH  # the onnxruntime target's decode writes the KV cache
    # The graph's recorded outputs are the one output layout the runtime splits by.
    names = [entry["name"] for entry in manifest.graphs["prefill"]["outputs"]]
    assert names == prefill_output_names(manifest.num_stages, manifest.num_layers)
    logits, positions, kept, cache, valid = split_prefill_outputs(names, manifest.num_stages)
    assert valid == "valid"
    assert (logits, positions, cache[:2]) == ("logits", "positions", ["present.0.key", "present.0.value"])
    assert kept == [f"kept_{i}" for i in range(manifest.num_stages)] and len(cache) == 2 * manifest.num_layers


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: {k: v for k, v in m.items() if k != "schema_version"} | {"format_version": 1}, "schema 1 but"),
        (lambda m: m | {"schema_version": SCHEMA_VERSION + 1}, f"schema {SCHEMA_VERSION + 1} but"),
        (lambda m: {"name": "some other tool's manifest"}, "is not a clse-fx bundle manifest"),
        (lambda m: [1, 2], "is not a clse-fx bundle manifest"),
        (lambda m: {k: v for k, v in m.items() if k != "runtime"}, "is invalid (missing field runtime)"),
        (lambda m: m | {"plan": {**m["plan"], "extra": 1}}, "is invalid (unknown field extra)"),
        (lambda m: m | {"geometry": {"batch": 2}}, "is invalid (geometry.text_len)"),
        (lambda m: m | {"graphs": {}}, "is invalid (graphs.prefill)"),
        (lambda m: m | {"kv_cache_bytes": 3}, "is invalid (KVCacheSection must be an object)"),
    ],
)
def test_old_foreign_and_damaged_manifests_are_one_line_errors(manifest_json, tmp_path, change, message):
    (tmp_path / MANIFEST).write_text(json.dumps(change(manifest_json)))
    with pytest.raises(ValueError, match="recompile|clse-compile") as error:
        read_manifest(tmp_path, verify=False)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_undecodable_manifest_is_a_one_line_error(tmp_path):
    (tmp_path / MANIFEST).write_bytes(b"\xff\xfe{")
    with pytest.raises(ValueError, match="is corrupted .*recompile the bundle"):
        read_manifest(tmp_path)
    assert Manifest.__dataclass_fields__["schema_version"].default == SCHEMA_VERSION


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: m | {"geometry": {**m["geometry"], "batch": -1}}, "geometry.batch is -1, not an integer in"),
        (lambda m: m | {"geometry": {**m["geometry"], "batch": 0}}, "geometry.batch is 0, not an integer in"),
        (lambda m: m | {"geometry": {**m["geometry"], "batch": "1"}}, "geometry.batch is '1', not an integer"),
        (lambda m: m | {"geometry": {**m["geometry"], "sequence_length": 10**12}}, "geometry.sequence_length is"),
        (lambda m: m | {"geometry": {**m["geometry"], "text_len": -5}}, "geometry.text_len is -5"),
        (lambda m: m | {"runtime": {**m["runtime"], "max_new_tokens": -3}}, "runtime.max_new_tokens is -3"),
        (lambda m: m | {"runtime": {**m["runtime"], "kv_cache_update": "x"}}, "runtime.kv_cache_update is 'x'"),
    ],
)
def test_manifest_numbers_are_checked_on_load(manifest_json, tmp_path, change, message):
    (tmp_path / MANIFEST).write_text(json.dumps(change(manifest_json)))
    with pytest.raises(ValueError, match="recompile the bundle") as error:
        read_manifest(tmp_path, verify=False)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_bundles_written_before_in_graph_kv_updates_read_as_runtime_written(manifest_json):
    """Their decode graphs output the new keys and values (new.{i}.*): the runtime writes them, as it did."""
    old = json.loads(json.dumps(manifest_json))
    del old["runtime"]["kv_cache_update"]
    for entry in old["graphs"]["decode"]["outputs"]:
        entry["name"] = entry["name"].replace("present.", "new.")
    assert Manifest.from_dict(old).runtime.kv_cache_update == KV_RUNTIME
    with pytest.raises(ValueError, match="graphs.decode.outputs do not match"):
        Manifest.from_dict(manifest_json | {"runtime": old["runtime"]})  # present.* outputs the runtime would not write


def _edited_copy(bundle, tmp_path, edit) -> object:
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    manifest = json.loads((copy / MANIFEST).read_text())
    edit(manifest, copy)
    (copy / MANIFEST).write_text(json.dumps(manifest))
    return copy


def _graph_file(name):
    def edit(manifest, copy):
        manifest["graphs"]["prefill"]["file"] = name(copy) if callable(name) else name

    return edit


def _outside_link(manifest, copy):
    (copy / "linked.onnx").symlink_to(copy.parent / "elsewhere.onnx")
    (copy.parent / "elsewhere.onnx").write_bytes((copy / "prefill.onnx").read_bytes())
    manifest["graphs"]["prefill"]["file"] = "linked.onnx"


def _unlisted(manifest, copy):
    (copy / "other.onnx").write_bytes((copy / "prefill.onnx").read_bytes())
    manifest["graphs"]["prefill"]["file"] = "other.onnx"


def _listed_fifo(manifest, copy):
    os.mkfifo(copy / "pipe.onnx")
    manifest["files"]["pipe.onnx"] = {"sha256": "0" * 64, "bytes": 0}


def _tokenizer_outside(manifest, copy):
    manifest["preprocess"]["text"]["tokenizer"] = "/etc/passwd"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_graph_file(lambda copy: str(copy / "prefill.onnx")), "graphs.prefill names '/"),
        (_graph_file("../prefill.onnx"), "graphs.prefill names '../prefill.onnx' outside the bundle"),
        (_graph_file(""), "graphs.prefill is not a file name"),
        (_outside_link, "a link that leads outside the bundle"),
        (_unlisted, "not listed (so not hash-checked)"),
        (_listed_fifo, "files.pipe.onnx names 'pipe.onnx', which is not a regular file"),
        (_tokenizer_outside, "preprocess.text.tokenizer names '/etc/passwd' outside the bundle"),
    ],
)
def test_a_bundle_reads_only_its_own_listed_files(cli_bundle, tmp_path, edit, message):
    bundle, _, _ = cli_bundle
    copy = _edited_copy(bundle, tmp_path, edit)
    with pytest.raises(ValueError, match="recompile the bundle") as error:
        read_manifest(copy)  # returns (never hangs on the FIFO, never reads outside) with one line
    assert message in str(error.value) and "\n" not in str(error.value)
