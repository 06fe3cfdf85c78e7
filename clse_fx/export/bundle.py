"""Writing the engine bundle: a directory of graph files, processor files and a manifest.json with hashes
(``clse_fx.deploy.manifest`` defines and reads it).

Bundles are written to a temporary sibling directory and renamed into place
(:func:`clse_fx.deploy.files.staged_directory`), so a failed compile never leaves a half-written bundle behind.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from clse_fx.deploy.manifest import MANIFEST, Manifest, sha256


def checkpoint_hash(model_dir: str | Path) -> str:
    """One hash over a checkpoint's config and weight files, to record what a bundle was compiled from."""
    digest = hashlib.sha256()
    for path in sorted(Path(model_dir).glob("*")):
        if path.suffix in (".json", ".safetensors") and path.is_file():
            digest.update(path.name.encode())
            digest.update(sha256(path).encode())
    return digest.hexdigest()


def write_manifest(bundle: Path, manifest: Manifest, rehash: bool = True) -> None:
    """Write manifest.json, adding the size and sha256 of every other file in the bundle (``rehash=False``: keep
    ``manifest.files``, for a rewrite after which no other file changed; a 7B bundle's weights take a minute)."""
    if rehash:
        manifest.files = {
            str(path.relative_to(bundle)): {"sha256": sha256(path), "bytes": path.stat().st_size}
            for path in sorted(bundle.rglob("*"))
            if path.is_file() and path.name != MANIFEST
        }
    (bundle / MANIFEST).write_text(json.dumps(manifest.to_dict(), indent=2) + "\n")
