"""Hub ids resolve offline through the local Hugging Face cache; paths and uncached ids get one-line errors."""

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
from huggingface_hub import constants, scan_cache_dir
from huggingface_hub.file_download import repo_folder_name

from clse_fx.cli import compile_main
from clse_fx.hub import model_name, resolve_model

REPO = "owner/tiny-llava"
LLAMA_CONFIG = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 32}


def cache_repo(cache: Path, repo_id: str, files: dict[str, bytes], refs: tuple[str, ...] = ("main",)) -> Path:
    """Lay ``files`` out as ``hf download`` does (blobs, snapshot symlinks, refs); return the snapshot dir."""
    commit = hashlib.sha1(repo_id.encode() + b"".join(files.values())).hexdigest()
    storage = cache / repo_folder_name(repo_id=repo_id, repo_type="model")  # the library's own folder name
    snapshot = storage / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (storage / "blobs").mkdir(exist_ok=True)
    (storage / "refs").mkdir(exist_ok=True)
    for name, data in files.items():
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    for ref in refs:
        (storage / "refs" / ref).write_text(commit)
    # Checked against the library's conventions, not just ours: its cache scanner must see this revision.
    info = scan_cache_dir(cache)
    assert not info.warnings, info.warnings
    [revision] = [
        rev for repo in info.repos if repo.repo_id == repo_id for rev in repo.revisions if rev.commit_hash == commit
    ]
    assert set(revision.refs) == set(refs) and {f.file_name for f in revision.files} == set(files)
    return snapshot


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty HF cache that huggingface_hub uses, with the network unreachable and offline mode *off*.

    Offline mode stays off so the test proves the lookup itself never reaches for the network."""
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))  # the library reads the env once, at import
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    def no_network(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", no_network)
    return cache


def config_files(config: dict | None = None) -> dict[str, bytes]:
    return {"config.json": json.dumps(config or LLAMA_CONFIG).encode()}


def test_cached_id_resolves_to_its_snapshot(cache):
    snapshot = cache_repo(cache, REPO, config_files())
    assert resolve_model(REPO) == snapshot
    assert (resolve_model(REPO) / "config.json").is_file()


def test_revision_resolves_by_ref_or_commit(cache):
    snapshot = cache_repo(cache, REPO, config_files(), refs=("main", "v1"))
    assert resolve_model(f"{REPO}@v1") == snapshot
    assert resolve_model(f"{REPO}@{snapshot.name}") == snapshot
    with pytest.raises(FileNotFoundError, match=f"hf download {REPO} --revision v2 "):
        resolve_model(f"{REPO}@v2")


def test_bare_name_resolves_like_a_hub_id(cache):
    snapshot = cache_repo(cache, "gpt2", config_files())
    assert resolve_model("gpt2") == snapshot


def test_uncached_id_names_the_cache_and_how_to_download(cache):
    with pytest.raises(FileNotFoundError) as error:
        resolve_model("llava-hf/llava-1.5-7b-hf")
    message = str(error.value)
    assert f"in the Hugging Face cache at {cache.resolve()};" in message
    assert "download it first with: hf download llava-hf/llava-1.5-7b-hf (clse-compile never downloads)" in message
    assert "\n" not in message


def test_snapshot_without_config_is_reported(cache):
    snapshot = cache_repo(cache, REPO, {"model.safetensors": b"weights"})
    with pytest.raises(FileNotFoundError, match=f"snapshot of {REPO} at {snapshot} has no config.json"):
        resolve_model(REPO)


@pytest.mark.parametrize("name", ["./missing", "/no/such/checkpoint", "~/no-such-checkpoint", "a/b/c", "bad--id"])
def test_missing_path_gives_the_directory_error(cache, name):
    with pytest.raises(FileNotFoundError, match=f"^model directory {name} does not exist; pass a local checkpoint"):
        resolve_model(name)


def test_local_directory_wins_over_the_cache(cache, tmp_path, monkeypatch):
    cache_repo(cache, REPO, config_files())
    monkeypatch.chdir(tmp_path)
    (tmp_path / REPO).mkdir(parents=True)
    assert resolve_model(REPO) == Path(REPO)
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="is a file, not a checkpoint directory"):
        resolve_model("weights.bin")


def test_model_name_is_the_repo_or_directory_name(tmp_path, monkeypatch):
    assert model_name("llava-hf/llava-1.5-7b-hf@v1") == "llava-1.5-7b-hf"
    assert model_name("gpt2") == "gpt2"
    monkeypatch.chdir(tmp_path)
    assert model_name(".") == tmp_path.name


@pytest.mark.parametrize("variable", ["HF_HUB_CACHE", "HF_HOME"])
def test_cache_location_follows_the_environment(tmp_path, variable):
    """In a fresh process, as the CLI runs: the library's own HF_HUB_CACHE / HF_HOME handling decides."""
    cache = tmp_path / "hub"
    snapshot = cache_repo(cache, REPO, config_files())
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_CACHE", "HF_HOME", "HUGGINGFACE_HUB_CACHE")}
    env[variable] = str(cache if variable == "HF_HUB_CACHE" else tmp_path)
    code = f"from clse_fx.hub import resolve_model; print(resolve_model({REPO!r}))"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()) == snapshot


def _run(capsys, *argv: str) -> tuple[int, str]:
    code = compile_main(list(argv))
    return code, capsys.readouterr().err


def test_cli_uncached_id_one_line_error(cache, tmp_path, capsys):
    code, err = _run(capsys, "owner/name", "--keep", "8", "-o", str(tmp_path / "bundle"))
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("error: owner/name is neither a local directory nor in the Hugging Face cache at ")
    assert str(cache.resolve()) in err and "hf download owner/name (clse-compile never downloads)" in err
    assert not (tmp_path / "bundle").exists()


def test_cli_checks_arguments_before_the_cache(cache, tmp_path, capsys):
    code, err = _run(capsys, "owner/name", "--stages", "1-4", "-o", str(tmp_path / "bundle"))
    assert code == 2 and "LAYER:KEEP" in err and "cache" not in err


def test_cli_loads_the_cached_snapshot(cache, tmp_path, capsys):
    """The cached config reaches the loader: its (unsupported) architecture is what the one-line error names."""
    cache_repo(cache, REPO, config_files())
    code, err = _run(capsys, REPO, "--keep", "8", "-o", str(tmp_path / "bundle"))
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "unsupported architecture LlamaForCausalLM" in err
