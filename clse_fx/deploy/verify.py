"""A bundle is verified, not trusted: what :func:`open_bundle` checks before anything runs.

``manifest.json`` is the one file nothing else hashes, so everything it says that decides which bytes a runtime
reads is checked against files that are hashed: each listed file against its sha256, and each ONNX graph's weight
table against the graph itself (an edited table could point the embedding at the lm-head's bytes; the graph,
hashed, says where its weights lie). With a public key, the manifest itself must carry a valid signature
(:mod:`clse_fx.deploy.signing`), which makes the whole bundle as trustworthy as the key.

Hashing a 7B bundle (13.5 GB) takes 12-30 s (sha256 runs on one core at 0.45-1.1 GB/s from disk or page cache:
benchmarks/verify_cost.py). So a file that hashed correctly once gets a stamp in a per-user cache directory, keyed
by its identity (device, inode, size, modification and status-change times in ns), and a later load that finds the
file with the same identity skips the hash. Any write to the file changes its status-change time (ctime), which no
user can set back, so a changed file is hashed again. Stamps are written only for files last changed more than
:data:`STAMP_MIN_AGE_S` before hashing began, so that a change in the same tick of the filesystem's clock as the
one hashed cannot go unnoticed. ``CLSE_FX_VERIFY_CACHE`` names another cache directory, or ``off`` (hash on every
load, e.g. on a network filesystem whose server's clock or timestamps you do not trust).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import stat
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from clse_fx.deploy.manifest import (
    MANIFEST,
    Manifest,
    bundle_file,
    check_references,
    file_sha256,
    is_count,
    manifest_bytes,
    parse_manifest,
)
from clse_fx.deploy.onnx_graph import Initializer, declared_initializers

STAMP_MIN_AGE_S = 2.0  # above the coarsest timestamp granularity in use (FAT's 2 s; ext4 and xfs keep ns)
CACHE_VARIABLE = "CLSE_FX_VERIFY_CACHE"
TABLE_FIELDS = ("file", "type", "shape", "offset", "length")


@dataclass(frozen=True)
class FileIdentity:
    """What names one version of a file: where it is (device, inode) and what changes with any write to it (size,
    modification and status-change times)."""

    device: int
    inode: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, status: os.stat_result) -> FileIdentity:
        return cls(status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns, status.st_ctime_ns)


@dataclass
class VerifiedBundle:
    """A bundle whose files matched their hashes: its manifest, each listed file's identity as verified, and each
    ONNX graph's external initializers (checked against the manifest's table and the files)."""

    path: Path
    manifest: Manifest
    identities: dict[str, FileIdentity]
    initializers: dict[str, dict[str, Initializer]] = field(default_factory=dict)


def open_bundle(bundle: str | Path, verify_key: str | Path | None = None) -> VerifiedBundle:
    """Read and verify a bundle: with ``verify_key`` the manifest's signature first, then every file the manifest
    lists against its sha256 (or a stamp of an earlier verification), then each ONNX graph's external data. Every
    refusal is a one-line ValueError (FileNotFoundError for a missing file)."""
    bundle = Path(bundle)
    data = manifest_bytes(bundle)
    if verify_key is not None:
        from clse_fx.deploy.signing import verify_manifest

        verify_manifest(bundle, data, verify_key)
    manifest = parse_manifest(data, str(bundle / MANIFEST))
    check_references(bundle, manifest)
    stamps = Stamps.for_user()
    identities = {name: verify_file(bundle, manifest, name, stamps) for name in manifest.files}
    verified = VerifiedBundle(bundle, manifest, identities)
    for name, graph in manifest.graphs.items():
        if str(graph.get("file")).endswith(".onnx"):
            verified.initializers[name] = graph_initializers(verified, name)
    check_ranges(verified)
    return verified


def verify_file(bundle: Path, manifest: Manifest, name: str, stamps: Stamps) -> FileIdentity:
    """Check the listed file ``name`` against its manifest entry (size, then sha256 unless a stamp vouches for
    this very version of the file); its identity as verified."""
    path = bundle_file(bundle, manifest, name, f"files.{name}")  # never reads a FIFO or a file outside
    entry = manifest.files[name]
    if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str) or not is_count(entry.get("bytes")):
        raise ValueError(f"{MANIFEST} entry files.{name} is malformed; recompile the bundle")
    with open(path, "rb", buffering=0) as file:
        before = FileIdentity.of(os.fstat(file.fileno()))
        if before.size != entry["bytes"]:
            raise ValueError(
                f"bundle file {name} does not match its manifest hash ({before.size} bytes, the manifest lists "
                f"{entry['bytes']}: truncated or replaced?); recompile the bundle"
            )
        if stamps.vouches(before, entry["sha256"]):
            return before
        started_ns = time.time_ns()
        digest = file_sha256(file)
        after = FileIdentity.of(os.fstat(file.fileno()))
    if after != before:
        raise ValueError(f"bundle file {name} changed while it was being verified; load the bundle again")
    if digest != entry["sha256"]:
        raise ValueError(f"bundle file {name} does not match its manifest hash (corrupted?); recompile the bundle")
    stamps.record(after, digest, started_ns)
    return after


def verified_bytes(verified: VerifiedBundle, name: str) -> bytes:
    """The content of the verified (small) file ``name``, hashed again as read: what the caller parses is what the
    manifest lists, whatever happened to the file since it was verified."""
    with open(verified.path / name, "rb", buffering=0) as file:
        data = file.read()
    if hashlib.sha256(data).hexdigest() != verified.manifest.files[name]["sha256"]:
        raise ValueError(f"bundle file {name} changed after it was verified; load the bundle again")
    return data


def check_unchanged(verified: VerifiedBundle, name: str) -> None:
    """Raise a one-line ValueError unless the bundle file ``name`` (what its path names now) is the version that was
    verified. Any change to a file, even one undone (a rewrite restored, a file renamed away and back), moves its
    ctime: so a runtime that read a file by its path between two such checks read what was verified. A hard link or
    chmod moves the ctime too (a Triton repository written from the bundle links its files): a file changed in its
    ctime alone is hashed again rather than refused."""
    path = verified.path / name
    with open(path, "rb", buffering=0) as file:
        now = FileIdentity.of(os.fstat(file.fileno()))
        known = verified.identities[name]
        if now != known and dataclasses.replace(now, ctime_ns=known.ctime_ns) == known:
            if file_sha256(file) == verified.manifest.files[name]["sha256"]:
                verified.identities[name] = now = FileIdentity.of(os.fstat(file.fileno()))
    if now != verified.identities[name]:
        raise ValueError(f"bundle file {name} changed after it was verified; load the bundle again")


def graph_initializers(verified: VerifiedBundle, name: str) -> dict[str, Initializer]:
    """The external initializers the (hash-verified) ONNX graph ``name`` declares, each in a data file the
    manifest lists and hashes (paths relative to the bundle), and the manifest's table of them, if any, equal to
    them: names, element types, shapes, files, offsets and lengths."""
    graph = verified.manifest.graphs[name]
    file = graph["file"]
    declared = declared_initializers(verified_bytes(verified, file), file)
    folder, listed = PurePosixPath(file).parent, graph.get("external_data", [])
    located = {}
    for tensor, initializer in declared.items():
        location = (folder / initializer.file).as_posix()
        if location not in listed or location not in verified.identities:
            raise ValueError(
                f"{file} reads initializer {tensor!r} from {initializer.file!r}, which is not one of the graph's "
                "weight files listed (so hashed) in the manifest; recompile the bundle"
            )
        located[tensor] = dataclasses.replace(initializer, file=location)
    table = graph.get("initializers")
    if table is not None:
        check_table(table, located, f"graphs.{name}.initializers", file)
    return located


def check_table(table: object, declared: dict[str, Initializer], where: str, graph_file: str) -> None:
    """The manifest's initializer ``table`` says what the graph declares, entry for entry."""
    if not isinstance(table, dict):
        raise ValueError(f"{MANIFEST}: {where} is not a table; recompile the bundle")
    for tensor in sorted(set(table) ^ set(declared)):
        side = "does not list" if tensor in declared else "lists"
        raise ValueError(
            f"{MANIFEST}: {where} {side} {tensor!r}, which {graph_file} "
            f"{'declares' if tensor in declared else 'does not declare'}; recompile the bundle"
        )
    for tensor, initializer in declared.items():
        entry, wanted = table[tensor], initializer.entry()
        if not isinstance(entry, dict) or set(entry) != set(TABLE_FIELDS):
            raise ValueError(f"{MANIFEST}: {where}[{tensor!r}] is malformed ({entry!r}); recompile the bundle")
        for key in TABLE_FIELDS:
            if entry[key] != wanted[key] or type(entry[key]) is not type(wanted[key]):
                raise ValueError(
                    f"{MANIFEST}: {where}[{tensor!r}] says {key} {entry[key]!r} but {graph_file} declares "
                    f"{wanted[key]!r}; recompile the bundle"
                )


def check_ranges(verified: VerifiedBundle) -> None:
    """Every graph's external initializers, together: each one's byte range holds exactly what its element type
    and shape need and lies inside its file, and ranges never overlap unless they are the same tensor (the
    compiler stores identical tensors once and points every graph's copy at it)."""
    ranges: dict[str, dict[tuple[int, int], tuple[int, tuple[int, ...], str]]] = {}
    for graph, initializers in verified.initializers.items():
        for tensor, item in initializers.items():
            where = f"graphs.{graph} initializer {tensor!r}"
            if item.length != item.expected_length():
                raise ValueError(
                    f"{where} holds {item.length} bytes but its type and shape {list(item.shape)} need "
                    f"{item.expected_length()}; recompile the bundle"
                )
            if item.offset + item.length > verified.identities[item.file].size:
                raise ValueError(f"{where} does not fit {item.file}; recompile the bundle")
            if not item.length:  # an empty tensor holds no bytes to share or overlap
                continue
            spans = ranges.setdefault(item.file, {})
            same = spans.setdefault((item.offset, item.length), (item.type, item.shape, where))
            if same[:2] != (item.type, item.shape):
                raise ValueError(f"{where} shares its bytes with {same[2]} but not its type or shape; recompile")
    for file, spans in ranges.items():
        end, owner = 0, ""
        for (offset, length), (_, _, where) in sorted(spans.items()):
            if offset < end:
                raise ValueError(f"{where} overlaps {owner} in {file}; recompile the bundle")
            end, owner = offset + length, where


class Stamps:
    """Records of files that matched their hashes, one small JSON file per (device, inode) in a private directory
    (see the module docstring); unusable (not ours, writable by others, or not writable) means no stamps: every
    load hashes."""

    def __init__(self, directory: Path | None) -> None:
        self.directory = directory

    @classmethod
    def for_user(cls) -> Stamps:
        setting = os.environ.get(CACHE_VARIABLE, "")
        if setting.lower() == "off":
            return cls(None)
        try:
            base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
            directory = Path(setting) if setting else Path(base) / "clse-fx" / "verified"
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            status = os.lstat(directory)
        except (OSError, RuntimeError):  # no home directory, or no way to make the cache: hash on every load
            return cls(None)
        private = stat.S_ISDIR(status.st_mode) and status.st_uid == os.geteuid() and not status.st_mode & 0o022
        return cls(directory if private else None)

    def _path(self, identity: FileIdentity) -> Path | None:
        return self.directory / f"{identity.device}-{identity.inode}.json" if self.directory else None

    def vouches(self, identity: FileIdentity, sha256: str) -> bool:
        """Whether this version of a file (``identity``) was verified to hash to ``sha256``."""
        path = self._path(identity)
        try:
            stamp = json.loads(path.read_bytes()) if path else None
        except (OSError, ValueError):
            return False
        return stamp == {"identity": list(vars(identity).values()), "sha256": sha256}

    def record(self, identity: FileIdentity, sha256: str, hashing_started_ns: int) -> None:
        """Stamp a file that just hashed to ``sha256``, if it was last changed well before hashing began."""
        path = self._path(identity)
        if path is None or hashing_started_ns - max(identity.mtime_ns, identity.ctime_ns) < STAMP_MIN_AGE_S * 1e9:
            return
        staged = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")
        try:
            staged.write_text(json.dumps({"identity": list(vars(identity).values()), "sha256": sha256}))
            os.replace(staged, path)
        except OSError:  # a full or read-only cache costs the next load a hash, nothing else
            staged.unlink(missing_ok=True)
