"""A bundle's weight files, memory-mapped once, shared by all its ONNX Runtime sessions, and guarded while mapped.

Mapped weights are read straight from the file, so a file truncated or rewritten in place under a running engine
would be read as it is then: a page past the new end of the file raises SIGBUS, which Python cannot turn into an
exception (a synchronous fault re-runs the faulting instruction; a handler can only end the process). So the
engine never reads a file that changed:

- Before every graph run (and around the session builds, which read the weights too), each file's size and
  modification time are compared with the verified ones (one ``fstat``): a change made while the engine is idle
  is the one-line :class:`BundleChangedError` naming the file, at the next run, never a fault.
- Where the kernel allows (Linux, the file's owner or CAP_LEASE, a local filesystem), the engine also holds a
  read lease on each file (``fcntl(F_SETLEASE)``): another process's ``open`` for writing or ``truncate`` then
  waits until the engine lets go. A watcher thread sees the lease being broken within :data:`LEASE_POLL_S`; the
  engine lets go at once if no run is in progress, or when the run in progress ends, and refuses every run after.
  A truncation can then never meet a running graph.

The limits: without a lease (another user's file, a network filesystem, a writer that opened the file before the
engine did), a change made during a run can still fault; and the kernel breaks a lease after
``/proc/sys/fs/lease-break-time`` (45 s by default) whatever the engine does, so a run longer than that is not
covered. Replacing a bundle by writing a new one and renaming it into place never touches a running engine's
files (it keeps the old inode mapped), and is how bundles should be updated.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import signal
import threading
import time
import weakref
from collections.abc import Iterator

import numpy as np

from clse_fx.deploy.onnx_graph import ELEMENT_BITS
from clse_fx.deploy.verify import FileIdentity, VerifiedBundle

LEASE_POLL_S = 0.1
# The signal a lease break sends (fcntl F_SETSIG): SIGURG, whose default action is to ignore it; the break is
# seen by polling the lease instead. (SIGIO, the default, would kill the process.)
LEASE_SIGNAL = signal.SIGURG
# Element types ONNX Runtime's Python API wraps over memory it does not own (ortvalue_from_numpy_with_onnx_type):
# whole-byte types; sub-byte (int4, ...) and complex initializers are left to ONNX Runtime to read from the file.
SHARED_BYTES = {t: bits // 8 for t, bits in ELEMENT_BITS.items() if bits in (8, 16, 32, 64) and t != 14}


class BundleChangedError(RuntimeError):
    """A weights file of a loaded bundle changed on disk: the engine refuses to run on it."""


class MappedFile:
    """One weights file: open read-only, mapped once, leased where the kernel allows."""

    def __init__(self, path: os.PathLike, name: str, identity: FileIdentity) -> None:
        self.name, self.identity = name, identity
        self.file = open(path, "rb", buffering=0)  # kept open (and leased) as long as it is mapped
        if FileIdentity.of(os.fstat(self.file.fileno())) != identity:
            raise BundleChangedError(f"bundle file {name} changed after it was verified; load the bundle again")
        self.bytes, self.mapping = np.zeros(0, np.uint8), None
        if identity.size:
            self.mapping = mmap.mmap(self.file.fileno(), 0, access=mmap.ACCESS_READ)
            self.bytes = np.frombuffer(self.mapping, np.uint8)
        self.leased = self._lease()

    def _lease(self) -> bool:
        if not hasattr(fcntl, "F_SETLEASE"):  # leases are Linux's
            return False
        try:
            fcntl.fcntl(self.file.fileno(), fcntl.F_SETSIG, LEASE_SIGNAL)
            fcntl.fcntl(self.file.fileno(), fcntl.F_SETLEASE, fcntl.F_RDLCK)
        except OSError:  # not the owner, a filesystem without leases, or someone has it open for writing
            return False
        return True

    def change(self) -> str | None:
        """How the file changed since it was verified, or None. Size and modification time, not the status-change
        time: a hard link or chmod changes that, not the content."""
        if self.leased and fcntl.fcntl(self.file.fileno(), fcntl.F_GETLEASE) != fcntl.F_RDLCK:
            return "was opened for writing or truncated"
        status = os.fstat(self.file.fileno())
        if (status.st_size, status.st_mtime_ns) != (self.identity.size, self.identity.mtime_ns):
            return "was rewritten or truncated"
        return None

    def drop_resident(self) -> None:
        """Unmap the file's resident pages from this process (``MADV_DONTNEED``): the page cache keeps them, and a
        page read again is mapped back from it (a minor fault), so nothing is lost but the pages' count in RSS."""
        if self.mapping is not None and hasattr(mmap, "MADV_DONTNEED"):
            self.mapping.madvise(mmap.MADV_DONTNEED)

    def release(self) -> None:
        if self.leased:
            with contextlib.suppress(OSError):
                fcntl.fcntl(self.file.fileno(), fcntl.F_SETLEASE, fcntl.F_UNLCK)
            self.leased = False


class BundleWeights:
    """A verified bundle's weight files, each memory-mapped once, and the initializers each ONNX graph reads from
    them as OrtValues over that one mapping (no copy). Loaded by ONNX Runtime from each graph's external data, a
    file is mapped once per session: the prefill and the decode step hold the same weights, so their pages would
    count twice in RSS. Given as shared initializers (``add_initializer``), every session reads one mapping. Where
    each initializer lies comes from the graphs themselves, checked against the manifest's table
    (:func:`clse_fx.deploy.verify.open_bundle`). Sessions run inside :meth:`in_use`, which refuses to run on a file
    that changed (module docstring)."""

    def __init__(self, verified: VerifiedBundle) -> None:
        self.verified = verified
        self.files: dict[str, MappedFile] = {}
        self.lock = threading.Lock()
        self.running = 0
        self.changed: str | None = None  # why the engine no longer runs, once a file changed

    def initializers(self, graph_name: str) -> dict:
        """``{name: OrtValue}`` over the mapped files for graph ``graph_name``'s external initializers (those of a
        type ONNX Runtime cannot wrap are left to it to read from the verified file)."""
        import onnxruntime

        values = {}
        for name, item in self.verified.initializers.get(graph_name, {}).items():
            if item.type not in SHARED_BYTES:
                continue
            data = self._mapped(item.file).bytes[item.offset : item.offset + item.length]
            array = data.view(f"u{SHARED_BYTES[item.type]}").reshape(item.shape)
            values[name] = onnxruntime.OrtValue.ortvalue_from_numpy_with_onnx_type(array, item.type)
        return values

    def _mapped(self, name: str) -> MappedFile:
        if name not in self.files:
            self.files[name] = MappedFile(self.verified.path / name, name, self.verified.identities[name])
            if self.files[name].leased and sum(f.leased for f in self.files.values()) == 1:
                threading.Thread(target=_watch, args=(weakref.ref(self),), daemon=True, name="clse-lease").start()
        return self.files[name]

    def drop_resident(self) -> None:
        """Take every mapped file's pages out of this process's resident memory (:meth:`MappedFile.drop_resident`):
        for weights every session pre-packed into its own memory (quantized bundles), the mapped copy is read only
        while the sessions are built, and would otherwise stay resident beside the packed ones."""
        for file in self.files.values():
            file.drop_resident()

    @contextlib.contextmanager
    def in_use(self) -> Iterator[None]:
        """Run a block that reads the mapped weights, unless a file changed (:class:`BundleChangedError`)."""
        with self.lock:
            self._poll()
            if self.changed:
                raise BundleChangedError(self.changed)
            self.running += 1
        try:
            yield
        finally:
            with self.lock:
                self.running -= 1
                self._poll()

    def check(self) -> None:
        """Raise :class:`BundleChangedError` if a weights file changed (for health checks)."""
        with self.in_use():
            pass

    def _poll(self) -> None:
        """Note a changed file; once one has changed and no run is in progress, let go of the leases, so that the
        writer waiting on them proceeds. Called with the lock held."""
        for file in self.files.values():
            reason = None if self.changed else file.change()
            if reason:
                self.changed = f"bundle file {file.name} {reason} while the engine had it loaded; reload the bundle"
        if self.changed and not self.running:
            for file in self.files.values():
                file.release()


def _watch(ref: weakref.ref) -> None:
    """Poll the leases of a :class:`BundleWeights` until it lets go of them or is gone."""
    while True:
        time.sleep(LEASE_POLL_S)
        weights = ref()
        if weights is None:
            return
        with weights.lock:
            weights._poll()
            if not any(file.leased for file in weights.files.values()):
                return
        del weights
