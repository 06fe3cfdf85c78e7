"""A ``clse-serve`` service in a child process for the serving benchmarks (serve_load, serve_attack): the demo
bundle (or a given one) behind a local loopback Ray cluster, driven by lines on its standard input."""

from __future__ import annotations

import json
import socket
import time
import urllib.request

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
