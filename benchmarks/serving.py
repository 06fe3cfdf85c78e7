"""A ``clse-serve`` service in a child process for the serving benchmarks (serve_load, serve_attack): the demo
bundle (or a given one) behind a local loopback Ray cluster, driven by lines on its standard input."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))

SERVER = """
import sys, time
sys.argv = ["clse-serve"]
from clse_fx.deploy import serve
url = serve.start({bundle!r}, serve.Limits(), port={port}, replicas={replicas}, num_cpus={replicas}, threads=1)
import ray
print("ready", flush=True)
for line in sys.stdin:
    if line.startswith("kill "):  # kill BundleServer (an engine replica) or kill Ingress (an HTTP front end)
        kind = line.split()[1]
        names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if kind in a["name"]]
        ray.kill(ray.get_actor(sorted(names)[0], namespace="serve"), no_restart=True)
        print("killed", sorted(names)[0], flush=True)
    elif line.strip() == "stop":
        break
serve.stop(local=True)
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(url: str, replicas: int, timeout: float = 180.0, key: str = "replicas") -> float:
    """Seconds until /health reports ``replicas`` under ``key`` (replicas: engines; ingress_replicas: front ends)."""
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        try:
            with NO_PROXY.open(f"{url}/health", timeout=5) as answer:
                if json.load(answer).get(key) == replicas:
                    return time.perf_counter() - start
        except Exception:
            pass
        time.sleep(0.25)
    raise TimeoutError(f"{url}/health did not report {replicas} {key} in {timeout:.0f} s")


@contextlib.contextmanager
def served(bundle: str | None, replicas: int) -> Iterator[tuple[subprocess.Popen, str]]:
    """(the service's process, its URL), healthy with ``replicas`` engines; ``bundle`` None compiles the demo model
    into a temporary directory first. Stopped on exit (``stop`` on its standard input, killed if it lingers)."""
    with tempfile.TemporaryDirectory() as tmp:
        if bundle is None:
            bundle = f"{tmp}/demo"
            compile_demo = ["--demo", "--keep", "64", "--score", "clse", "-o", bundle, "--force"]
            subprocess.run(
                [Path(sys.executable).parent / "clse-compile", *compile_demo], check=True, stdout=subprocess.DEVNULL
            )
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server = subprocess.Popen(
            [sys.executable, "-c", SERVER.format(bundle=str(bundle), port=port, replicas=replicas)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert server.stdout.readline().strip() == "ready", "clse-serve did not start"
            wait_healthy(url, replicas)
            yield server, url
            server.stdin.write("stop\n")
            server.stdin.flush()
            server.wait(timeout=60)
        finally:
            if server.poll() is None:
                server.kill()
