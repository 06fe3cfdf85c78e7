"""The engine bundle: a directory of graph files, processor files and a manifest.json with hashes.

Bundles are written to a temporary sibling directory and renamed into place, so a failed compile never
leaves a half-written bundle behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


def sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_hash(model_dir: str | Path) -> str:
    """One hash over a checkpoint's config and weight files, to record what a bundle was compiled from."""
    digest = hashlib.sha256()
    for path in sorted(Path(model_dir).glob("*")):
        if path.suffix in (".json", ".safetensors") and path.is_file():
            digest.update(path.name.encode())
            digest.update(sha256(path).encode())
    return digest.hexdigest()


def check_output_dir(target: str | Path, force: bool) -> None:
    """An existing output directory is only replaced with ``force``."""
    if Path(target).exists() and not force:
        raise FileExistsError(f"output directory {target} already exists; pass --force to replace it")


@contextlib.contextmanager
def staged_directory(target: str | Path, force: bool) -> Iterator[Path]:
    """Yield a temporary directory next to ``target`` and move it to ``target`` only if the block succeeds."""
    target = Path(target)
    check_output_dir(target, force)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield staging
        staging.chmod(0o755)  # mkdtemp makes it private; a bundle is meant to be shared
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_manifest(bundle: Path, manifest: dict) -> None:
    """Write manifest.json, adding the size and sha256 of every other file in the bundle."""
    manifest = dict(manifest, format_version=FORMAT_VERSION)
    manifest["files"] = {
        str(path.relative_to(bundle)): {"sha256": sha256(path), "bytes": path.stat().st_size}
        for path in sorted(bundle.rglob("*"))
        if path.is_file() and path.name != MANIFEST
    }
    (bundle / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def read_manifest(bundle: str | Path, verify: bool = True) -> dict:
    """Load a bundle's manifest; with ``verify``, check every listed file exists and matches its hash."""
    bundle = Path(bundle)
    path = bundle / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{bundle} is not a clse-fx bundle (no {MANIFEST}); compile one with clse-compile")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is corrupted ({error.msg}); recompile the bundle") from error
    if verify:
        for name, entry in manifest.get("files", {}).items():
            file = bundle / name
            if not file.is_file():
                raise FileNotFoundError(f"bundle file {name} is missing from {bundle}; recompile the bundle")
            if sha256(file) != entry["sha256"]:
                raise ValueError(f"bundle file {name} does not match its manifest hash (corrupted?); recompile")
    return manifest
