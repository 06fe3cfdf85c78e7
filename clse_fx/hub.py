"""Resolve ``clse-compile MODEL``: a local checkpoint directory, or a hub id found offline in the local HF cache.

clse-compile never downloads: a hub id (``owner/name``, ``name``, optionally ``@revision``) must already be in
the Hugging Face cache (``HF_HUB_CACHE``, or ``$HF_HOME/hub``), where ``hf download`` or an earlier
``from_pretrained`` put it. ``huggingface_hub`` is imported only to look a hub id up, so argument errors and
plain directories stay fast.
"""

from __future__ import annotations

import os
from pathlib import Path

_NEXT_STEP = "pass a local checkpoint dir, a hub id in the local Hugging Face cache (owner/name) or --demo"


def _looks_like_path(name: str) -> bool:
    """True for names no hub id can be: relative or absolute paths, ``~``, or more than one ``owner/`` slash."""
    separators = {os.sep, os.altsep} - {None, "/"}  # Windows' backslash; "/" is the owner/name separator
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or any(sep in name for sep in separators)


def _split_revision(name: str) -> tuple[str, str | None]:
    """``owner/name@rev`` -> (``owner/name``, ``rev``); repo ids cannot contain ``@``, so the first one splits."""
    repo_id, at, revision = name.partition("@")
    return repo_id, (revision if at else None)


def _is_repo_id(repo_id: str) -> bool:
    """Whether ``repo_id`` is valid by huggingface_hub's own rules (charset, length, no ``--`` or ``..``)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        return False
    return True


def model_name(name: str) -> str:
    """Short name for a default output dir: the directory's own name, or the hub repo's (not a snapshot hash)."""
    path = Path(name).expanduser()
    if path.is_dir():
        return Path(os.path.abspath(path)).name  # abspath: "." names the directory, not ""
    return _split_revision(name)[0].rsplit("/", 1)[-1]


def resolve_model(name: str) -> Path:
    """A local checkpoint directory for ``name``: the directory itself, or a hub id's cached snapshot (offline)."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise FileNotFoundError(f"model {name} is a file, not a checkpoint directory; pass the dir with config.json")
    repo_id, revision = _split_revision(name)
    if _looks_like_path(name) or revision == "" or not _is_repo_id(repo_id):
        raise FileNotFoundError(f"model directory {name} does not exist; {_NEXT_STEP}")

    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    # Read at call time (the library fills it from HF_HUB_CACHE / HF_HOME at import) and passed explicitly, so
    # the directory searched is the one the error names.
    cache = Path(constants.HF_HUB_CACHE).expanduser().resolve()
    download = f"hf download {repo_id}" + (f" --revision {revision}" if revision else "")
    try:
        # local_files_only: never a network call, whatever HF_HUB_OFFLINE says.
        snapshot = Path(snapshot_download(repo_id, revision=revision, cache_dir=cache, local_files_only=True))
    except LocalEntryNotFoundError as error:
        partial = getattr(error, "snapshot_path", None)  # IncompleteSnapshotError: an interrupted download
        if partial:
            raise FileNotFoundError(
                f"the cached snapshot of {name} at {partial} is incomplete; finish it with: {download}"
            ) from None
        raise FileNotFoundError(
            f"{name} is neither a local directory nor in the Hugging Face cache at {cache}; "
            f"download it first with: {download} (clse-compile never downloads)"
        ) from None
    if not (snapshot / "config.json").is_file():
        raise FileNotFoundError(
            f"the cached snapshot of {name} at {snapshot} has no config.json; it is not a transformers checkpoint "
            f"or its download skipped it (fetch it with: {download} config.json)"
        )
    return snapshot
