"""``clse-serve`` against hostile clients on loopback (issue 39): slow senders, a huge header, many large images,
and replica kills, each bounded in count and time.

`python -m benchmarks.serve_attack` (about 3 minutes; needs the `serve` extra) compiles the demo model (or takes
``--bundle``), serves it with 2 replicas on a local Ray cluster bound to 127.0.0.1 at clse-serve's default limits,
and measures:

1. ``--slow`` idle slow-body connections (headers, ``Content-Length: 1000000`` and ``{``), as many slow-header ones
   (a header trickled a byte a second) and ``--slow-large`` large-body ones (96 KiB of a 1 MB body, past
   HAProxy's buffer so that the ingress reads them, then silence),
   all reopened as soon as the server drops them, for ``--attack-seconds``: every ordinary ``/generate`` (one every
   0.5 s) must answer under 2 s, and how the server ended the slow connections (408s);
2. one 50 MB header: the time until it is refused and the front end's (HAProxy's) and Serve proxy's peak RSS growth;
3. ``--images`` concurrent 19 MiB requests (4096x4096 JPEG, base64): the answers, and the replicas' summed peak RSS
   (each replica process's VmHWM, reset first), which must stay under ``--rss-bound-mib``;
4. killing an ingress replica under 16 closed-loop users (every answer JSON, the seconds until ``/health`` says
   so) and then an engine replica (the seconds until ``/health`` says so).

Writes benchmarks/results/serve_attack.json. Timings are wall clock on whatever shares the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import http.client
import io
import json
import os
import platform
import resource
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from benchmarks.serving import NO_PROXY, served, wait_healthy

RESULTS = Path(__file__).parent / "results" / "serve_attack.json"
ORDINARY_LIMIT_S = 2.0
HEADER_REFUSAL_LIMIT_S = 1.0
PROXY_GROWTH_LIMIT_MIB = 50
REPLICAS = ("ray::ServeReplica:clse:BundleServer", "ray::ServeReplica:clse:Ingress")
PROXIES = ("ray::ProxyActor", "haproxy")


def ordinary_body() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, "PNG")
    image = base64.b64encode(buffer.getvalue()).decode()
    return json.dumps({"prompt": "describe", "image": image, "max_new_tokens": 8}).encode()


def large_jpeg_body(target_mib: float = 19.0) -> bytes:
    """A 4096x4096 noise JPEG of about ``target_mib`` MiB (quality searched), as a /generate body."""
    from PIL import Image

    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (4096, 4096, 3), dtype=np.uint8))
    best = b""
    for quality in (70, 80, 85, 90, 95):
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=quality)
        if buffer.tell() > target_mib * 2**20:
            break
        best = buffer.getvalue()
    return json.dumps({"prompt": "describe", "image": base64.b64encode(best).decode(), "max_new_tokens": 4}).encode()


def post(port: int, body: bytes, timeout: float = 120.0) -> tuple[int, bytes, float]:
    """(status, answer, seconds) of POST /generate; status -1 when the connection failed."""
    start = time.perf_counter()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("POST", "/generate", body=body, headers={"Content-Type": "application/json"})
        answer = connection.getresponse()
        return answer.status, answer.read(), time.perf_counter() - start
    except OSError as error:
        return -1, str(error).encode(), time.perf_counter() - start
    finally:
        connection.close()


def health(url: str) -> dict:
    try:
        with NO_PROXY.open(f"{url}/health", timeout=5) as answer:
            return json.load(answer)
    except Exception as error:  # urllib raises for 503; its body is still the JSON answer
        try:
            return json.loads(error.read())
        except Exception:
            return {"status": f"no answer ({error})"}


def processes(names: tuple[str, ...]) -> dict[int, str]:
    """pid -> name of the running processes whose command line starts with one of ``names``."""
    found = {}
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            program = Path(command.split(" ", 1)[0]).name
            for name in names:
                if command.startswith(name) or program == name:
                    found[int(pid)] = name
    return found


def reset_peaks(pids) -> None:
    for pid in pids:  # "5" resets the peak RSS (VmHWM) to the current RSS
        Path(f"/proc/{pid}/clear_refs").write_text("5")


def memory_mib(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


# 1. slow senders ------------------------------------------------------------------------------------------------


async def slow_connection(port: int, kind: str, stop: asyncio.Event, outcomes: dict) -> None:
    """One slow client, reopened whenever the server ends it, until ``stop``; counts how the server ended it."""
    head = b"POST /generate HTTP/1.1\r\nHost: clse\r\nContent-Type: application/json\r\n"
    opening = {
        "slow_body": head + b"Content-Length: 1000000\r\n\r\n{",
        "slow_header": head + b"X-Slow: a",
        "slow_large_body": head + b"Content-Length: 1000000\r\n\r\n{" + b" " * (96 << 10),
    }[kind]
    while not stop.is_set():
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            outcomes["connect_failed"] = outcomes.get("connect_failed", 0) + 1
            await asyncio.sleep(0.5)
            continue
        try:
            writer.write(opening)
            await writer.drain()
            answer = asyncio.ensure_future(reader.read(64))
            while not stop.is_set() and not answer.done():
                if kind == "slow_header":  # a byte a second: never idle
                    writer.write(b"a")
                    await writer.drain()
                await asyncio.wait([answer], timeout=1.0)
            if answer.done():
                status = answer.result()[9:12].decode(errors="replace") or "closed"
                outcomes[status] = outcomes.get(status, 0) + 1
            else:
                answer.cancel()
        except OSError:
            outcomes["reset"] = outcomes.get("reset", 0) + 1
        finally:
            writer.close()


async def slow_senders(port: int, counts: dict[str, int], seconds: float, url: str) -> dict:
    stop = asyncio.Event()
    outcomes = {kind: {} for kind in counts}
    tasks = [
        asyncio.create_task(slow_connection(port, kind, stop, outcomes[kind]))
        for kind, count in counts.items()
        for _ in range(count)
    ]
    await asyncio.sleep(2.0)  # every connection opened
    body, ordinary, healths = ordinary_body(), [], []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        status, _, took = await asyncio.to_thread(post, port, body, 30.0)
        ordinary.append((status, took))
        healths.append((await asyncio.to_thread(health, url)).get("status"))
        await asyncio.sleep(0.5)
    stop.set()
    await asyncio.gather(*tasks)
    worst = max(took for _, took in ordinary)
    return {
        "connections": counts,
        "seconds": seconds,
        "ordinary_requests": len(ordinary),
        "ordinary_not_200": sum(status != 200 for status, _ in ordinary),
        "ordinary_max_s": round(worst, 3),
        "ordinary_p50_s": round(float(np.median([took for _, took in ordinary])), 3),
        "ok": worst < ORDINARY_LIMIT_S and all(status == 200 for status, _ in ordinary),
        "health_statuses": {state: healths.count(state) for state in set(healths)},
        "how_slow_connections_ended": outcomes,
    }


# 2. a huge header ---------------------------------------------------------------------------------------------


def huge_header(port: int, megabytes: int = 50) -> dict:
    fronts = processes(PROXIES)
    reset_peaks(fronts)
    before = {pid: memory_mib(pid, "VmRSS") for pid in fronts}
    sock = socket.create_connection(("127.0.0.1", port))
    start = time.perf_counter()
    answer = {}

    def read() -> None:
        answer["first_line"] = sock.makefile("rb").readline().decode(errors="replace").strip()
        answer["seconds"] = time.perf_counter() - start

    reader = threading.Thread(target=read)
    reader.start()
    try:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: clse\r\nX-Big: " + b"a" * (megabytes << 20) + b"\r\n\r\n")
        answer["sent_all"] = True
    except OSError:
        answer["sent_all"] = False  # refused mid-send: the server closed the connection
    reader.join(30)
    sock.close()
    growth = {name: 0.0 for name in PROXIES}
    for pid, name in fronts.items():
        growth[name] = max(growth[name], memory_mib(pid, "VmHWM") - before[pid])
    seconds = answer.get("seconds", float("inf"))
    return {
        "header_mib": megabytes,
        "answer": answer.get("first_line"),
        "refused_after_s": round(seconds, 3),
        "sent_all": answer["sent_all"],
        "peak_rss_growth_mib": {name: round(value, 1) for name, value in growth.items()},
        "ok": answer.get("first_line", "").split(" ")[1:2] in (["431"], ["400"])
        and seconds < HEADER_REFUSAL_LIMIT_S
        and max(growth.values()) < PROXY_GROWTH_LIMIT_MIB,
    }


# 3. many large images -----------------------------------------------------------------------------------------


def large_images(port: int, count: int, bound_mib: float) -> dict:
    body = large_jpeg_body()
    replicas = processes(REPLICAS)
    fronts = processes(PROXIES)
    idle = sum(memory_mib(pid, "VmRSS") for pid in replicas)
    reset_peaks([*replicas, *fronts])
    results: list = [None] * count
    sampled: list[float] = []
    done = threading.Event()

    def sample() -> None:  # the replicas' summed RSS at one moment, every 50 ms
        while not done.is_set():
            sampled.append(sum(memory_mib(pid, "VmRSS") for pid in replicas))
            time.sleep(0.05)

    def send(index: int) -> None:
        results[index] = post(port, body, 300.0)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(count)]
    sampler = threading.Thread(target=sample)
    start = time.perf_counter()
    sampler.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    done.set()
    sampler.join()
    peaks = {pid: memory_mib(pid, "VmHWM") for pid in replicas}
    statuses = [status for status, _, _ in results]
    summed = sum(peaks.values())
    by_kind = {}
    for pid, name in replicas.items():
        by_kind.setdefault(name.rsplit(":", 1)[-1], []).append(round(peaks[pid]))
    return {
        "requests": count,
        "body_mib": round(len(body) / 2**20, 1),
        "image_bytes_mib": round(len(body) * 3 / 4 / 2**20, 1),
        "statuses": {str(status): statuses.count(status) for status in set(statuses)},
        "seconds": round(time.perf_counter() - start, 1),
        "replicas_idle_rss_mib": round(idle),
        "replicas_summed_peak_rss_mib": round(summed),
        "replicas_sampled_max_rss_mib": round(max(sampled, default=0.0)),
        "peak_rss_mib_by_replica": by_kind,
        "front_peak_rss_mib": {name: round(memory_mib(pid, "VmHWM")) for pid, name in fronts.items()},
        "bound_mib": bound_mib,
        "ok": summed < bound_mib and statuses.count(200) == count,
    }


# 4. kills -----------------------------------------------------------------------------------------------------


def kill_under_load(server: subprocess.Popen, url: str, port: int, kind: str, users: int = 16) -> dict:
    """Kill one ``kind`` replica while ``users`` closed-loop clients send ordinary requests; every answer's status,
    whether each was JSON, and the seconds until /health stopped saying "ok"."""
    body, answers, stop = ordinary_body(), [], threading.Event()

    def user() -> None:
        while not stop.is_set():
            status, text, _ = post(port, body, 60.0)
            try:
                json.loads(text)
                answers.append((status, True))
            except ValueError:
                answers.append((status, False))

    threads = [threading.Thread(target=user) for _ in range(users)]
    for thread in threads:
        thread.start()
    time.sleep(2.0)
    server.stdin.write(f"kill {kind}\n")
    server.stdin.flush()
    killed_at = time.perf_counter()
    killed = server.stdout.readline().strip()
    noticed = None
    while time.perf_counter() - killed_at < 30:
        state = health(url).get("status")
        if state != "ok":
            noticed = round(time.perf_counter() - killed_at, 2)
            break
        time.sleep(0.05)
    time.sleep(3.0)
    stop.set()
    for thread in threads:
        thread.join()
    statuses = [status for status, _ in answers]
    return {
        "killed": killed,
        "users": users,
        "answers": len(answers),
        "statuses": {str(status): statuses.count(status) for status in set(statuses)},
        "not_json": sum(not is_json for _, is_json in answers),
        "health_not_ok_after_s": noticed,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", help="a compiled bundle (default: compile the demo model into a temp dir)")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--slow", type=int, default=1000, help="slow-body and slow-header connections, each")
    parser.add_argument("--slow-large", type=int, default=100, help="large-body connections that stall")
    parser.add_argument("--attack-seconds", type=float, default=20.0)
    parser.add_argument("--images", type=int, default=24, help="concurrent 19 MiB image requests")
    parser.add_argument("--rss-bound-mib", type=float, default=3072.0, help="the replicas' summed peak RSS bound")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # 2000+ sockets here, and HAProxy's two per client
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    started = time.perf_counter()
    with served(args.bundle, args.replicas) as (server, url):
        port = int(url.rsplit(":", 1)[1])
        counts = {"slow_body": args.slow, "slow_header": args.slow, "slow_large_body": args.slow_large}
        result = {"slow_senders": asyncio.run(slow_senders(port, counts, args.attack_seconds, url))}
        print(json.dumps(result["slow_senders"]), flush=True)
        result["huge_header"] = huge_header(port)
        print(json.dumps(result["huge_header"]), flush=True)
        result["large_images"] = large_images(port, args.images, args.rss_bound_mib)
        print(json.dumps(result["large_images"]), flush=True)
        result["kill_ingress"] = kill_under_load(server, url, port, "Ingress")
        print(json.dumps(result["kill_ingress"]), flush=True)
        wait_healthy(url, 2, 180.0, "ingress_replicas")
        result["kill_engine"] = kill_under_load(server, url, port, "BundleServer")
        print(json.dumps(result["kill_engine"]), flush=True)
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores shared with other jobs",
        "replicas": args.replicas,
        "seconds": round(time.perf_counter() - started),
        **result,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    checks = {name: result[name]["ok"] for name in ("slow_senders", "huge_header", "large_images")}
    print(f"checks: {checks}; results in {args.out}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
