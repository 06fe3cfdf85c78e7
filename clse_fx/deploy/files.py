"""Output directories that are never left half written: bundles, Triton repositories."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def check_output_dir(target: str | Path, force: bool) -> None:
    """An existing output directory is only replaced with ``force``; a file there never is."""
    if Path(target).is_file():
        raise FileExistsError(f"output {target} is a file; pass a directory path (it is created)")
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
