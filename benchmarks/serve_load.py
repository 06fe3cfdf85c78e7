"""``clse-serve`` under load: locust (headless, in-process) against a local service on loopback.

`python -m benchmarks.serve_load` (about 7 minutes; needs the `serve` and `bench` extras) compiles the built-in
demo model (``clse-compile --demo --keep 64 --score clse``), serves it with 2 replicas on a local Ray cluster
bound to 127.0.0.1, and runs each user level (16, 64, 128 concurrent users, no think time) for a bounded time.
One request in ten is malformed (a wrong type, bad base64, an unknown field, ``temperature: 1e309``, a body that
is not JSON): each must get a 4xx, and no valid request may fail. A poller checks ``GET /health`` every 0.25 s
throughout. Two last runs kill, mid-load (``ray.kill``), one engine replica's actor and then one of the two HTTP
ingress replicas, and count the valid requests lost, the longest gap between answers and the /health checks that
said "degraded".
Writes benchmarks/results/serve_load.json and prints a table per level and the 128/16 throughput ratio.

Throughput is wall-clock requests per second on whatever machine runs it, shared with whatever else runs there:
compare the levels of one run (the ratio), not runs on different days.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()  # locust's users are greenlets: patch before anything opens a socket

import argparse  # noqa: E402
import base64  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from pathlib import Path  # noqa: E402

import gevent  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.serving import NO_PROXY, served, wait_healthy  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "serve_load.json"
PROMPTS = ["what is the colour of shape ?", "describe", "how many circle ?", "is the red star left ?"]
MAX_NEW_TOKENS = 8


def _png(seed: int) -> str:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


IMAGES = [_png(seed) for seed in range(4)]


def malformed_bodies() -> list[tuple[str, bytes]]:
    """(kind, raw body): each must be answered 4xx."""
    ok = {"prompt": "describe", "image": IMAGES[0], "max_new_tokens": MAX_NEW_TOKENS}
    return [
        ("wrong_type", json.dumps(dict(ok, max_new_tokens="8")).encode()),
        ("bad_base64", json.dumps(dict(ok, image="not base64 !!")).encode()),
        ("unknown_field", json.dumps(dict(ok, max_tokens=8)).encode()),
        ("temperature_1e309", json.dumps(dict(ok, do_sample=True)).encode()[:-1] + b', "temperature": 1e309}'),
        ("not_json", b'{"prompt": "describe", "image": '),
    ]


def make_user_class():
    from locust import FastHttpUser, task

    bad = malformed_bodies()

    class Client(FastHttpUser):
        wait_time = staticmethod(lambda: 0)  # closed loop: each user sends its next request on the answer
        network_timeout = connection_timeout = 120.0

        @task
        def generate(self) -> None:
            if random.random() < 0.1:
                kind, raw = random.choice(bad)
                with self.client.post(
                    "/generate", data=raw, name=f"malformed:{kind}", catch_response=True, headers=JSON
                ) as answer:
                    if 400 <= answer.status_code < 500:
                        answer.success()
                    else:
                        answer.failure(f"malformed {kind} answered {answer.status_code}")
                return
            body = {"prompt": random.choice(PROMPTS), "image": random.choice(IMAGES), "max_new_tokens": MAX_NEW_TOKENS}
            sent = time.perf_counter()
            with self.client.post("/generate", json=body, name="valid", catch_response=True) as answer:
                front = answer.headers.get("X-Clse-Ingress") if answer.headers else None
                VALID.append((sent, time.perf_counter(), answer.status_code == 200, front))
                if answer.status_code == 200:
                    answer.success()
                else:
                    answer.failure(f"valid request answered {answer.status_code}: {answer.text[:200]}")

    return Client


JSON = {"Content-Type": "application/json"}
# Each valid request: (sent, answered, 200?, the ingress replica that answered): gaps and who lost what in a kill.
VALID: list[tuple[float, float, bool, str | None]] = []


def health_poller(url: str, samples: list, period: float = 0.25) -> None:
    """(seconds the check took, HTTP status, the body's status: ok / degraded / unavailable) every ``period``."""
    while True:
        start = time.perf_counter()
        state = None
        try:
            with NO_PROXY.open(f"{url}/health", timeout=30) as answer:
                status, state = answer.status, json.load(answer).get("status")
        except Exception as error:  # urllib raises for 5xx too
            status = getattr(error, "code", -1)
        samples.append((time.perf_counter() - start, status, state))
        gevent.sleep(period)


def run_level(url: str, users: int, seconds: float, warmup: float, on_half=None) -> dict:
    """``users`` closed-loop users for ``warmup`` + ``seconds``; figures over the last ``seconds`` only."""
    from locust.env import Environment

    env = Environment(user_classes=[make_user_class()], host=url)
    runner = env.create_local_runner()
    runner.start(users, spawn_rate=users)
    gevent.sleep(warmup)
    env.stats.reset_all()
    health: list = []
    poller = gevent.spawn(health_poller, url, health)
    VALID.clear()
    start = time.perf_counter()
    if on_half is not None:
        gevent.sleep(seconds / 3)
        event_at = time.perf_counter()
        gevent.spawn(on_half)
        gevent.sleep(max(0.0, seconds - (time.perf_counter() - start)))
    else:
        gevent.sleep(seconds)
    elapsed = time.perf_counter() - start
    answered = [start, *sorted(end for _, end, ok, _ in VALID if ok and end <= start + elapsed), start + elapsed]
    poller.kill()
    # Stop and let every request in flight finish, so none is counted as neither answered nor failed.
    snapshot = {name: (entry.num_requests, entry.num_failures) for (name, _), entry in env.stats.entries.items()}
    runner.stop()
    runner.quit()
    gap, gap_end = max((b - a, b) for a, b in zip(answered, answered[1:]))
    valid = env.stats.get("valid", "POST")
    malformed = [entry for (name, _), entry in env.stats.entries.items() if name.startswith("malformed:")]
    health_s = sorted(seconds for seconds, _, _ in health) or [float("nan")]
    errors = {str(error.error): error.occurrences for error in env.stats.errors.values()}
    event = {}
    if on_half is not None:  # the valid requests in flight at the event, by outcome: lost or the ingress answering
        in_flight = [(ok, front) for sent, end, ok, front in VALID if sent < event_at < end]
        event = {
            "event_at_s": round(event_at - start, 2),
            "in_flight_at_event": {"lost": sum(not ok for ok, _ in in_flight)}
            | dict(Counter(front for ok, front in in_flight if ok)),
            "lost_sent_after_event": sum(not ok and sent >= event_at for sent, _, ok, _ in VALID),
            # Answers per 0.25 s from 1 s before the event to 4 s after: where a gap falls, and how long it lasts.
            "answers_per_quarter_second_around_event": np.histogram(
                [end - event_at for _, end, ok, _ in VALID if ok], bins=np.arange(-1.0, 4.01, 0.25)
            )[0].tolist(),
        }
    return event | {
        "users": users,
        "seconds": round(elapsed, 1),
        "valid_requests": valid.num_requests,
        "valid_failed": valid.num_failures,
        "valid_rps": round(snapshot.get("valid", (0, 0))[0] / elapsed, 2),
        "p50_ms": valid.get_response_time_percentile(0.5),
        "p99_ms": valid.get_response_time_percentile(0.99),
        "malformed_requests": sum(entry.num_requests for entry in malformed),
        "malformed_not_4xx": sum(entry.num_failures for entry in malformed),
        "health_checks": len(health),
        "health_not_200": sum(status != 200 for _, status, _ in health),
        "health_degraded": sum(state == "degraded" for _, _, state in health),
        "longest_gap_between_answers_s": round(gap, 2),
        "longest_gap_ends_at_s": round(gap_end - start, 2),
        "health_p99_ms": round(1e3 * health_s[min(len(health_s) - 1, int(0.99 * len(health_s)))], 1),
        "health_max_ms": round(1e3 * health_s[-1], 1),
        "errors": errors,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", help="a compiled bundle (default: compile the demo model into a temp dir)")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--users", type=int, nargs="+", default=[16, 64, 128])
    parser.add_argument("--seconds", type=float, default=40.0, help="measured time per level")
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument(
        "--kill-users", type=int, default=64, help="users during the kill-an-engine and kill-an-ingress runs (0: skip)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    with served(args.bundle, args.replicas) as (server, url):
        levels = []
        for users in args.users:
            levels.append(run_level(url, users, args.seconds, args.warmup))
            print(json.dumps(levels[-1]), flush=True)
        kills = {}
        for kind, key, count in (("BundleServer", "replicas", args.replicas), ("Ingress", "ingress_replicas", 2)):
            if not args.kill_users:
                break
            killed = {}

            def kill_one(kind=kind, key=key, count=count, killed=killed) -> None:
                server.stdin.write(f"kill {kind}\n")
                server.stdin.flush()
                start = time.perf_counter()
                killed["replica"] = server.stdout.readline().strip()
                # Time from the kill until /health (Serve's controller) reports the loss and then all replicas.
                killed["noticed_s"] = round(wait_healthy(url, count - 1, 60.0, key) + 0.0, 1)
                wait_healthy(url, count, 180.0, key)
                killed["recovered_s"] = round(time.perf_counter() - start, 1)

            kill = run_level(url, args.kill_users, args.seconds, args.warmup, on_half=kill_one)
            wait_healthy(url, count, 180.0, key)
            kills[kind] = kill | {f"kill_{name}": value for name, value in killed.items()}
            if kind == "Ingress":  # in flight on the killed front end: the ones lost and the ones it answered
                front = killed["replica"].rsplit("#", 1)[-1]
                in_flight = kill["in_flight_at_event"]
                kills[kind]["in_flight_on_killed_ingress"] = in_flight["lost"] + in_flight.get(front, 0)
            print(json.dumps(kills[kind]), flush=True)
    by_users = {level["users"]: level for level in levels}
    ratio = None
    if 16 in by_users and 128 in by_users and by_users[16]["valid_rps"]:
        ratio = round(by_users[128]["valid_rps"] / by_users[16]["valid_rps"], 3)
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores shared with other jobs",
        "replicas": args.replicas,
        "max_new_tokens": MAX_NEW_TOKENS,
        "malformed_share": 0.1,
        "seconds_per_level": args.seconds,
        "levels": levels,
        "ratio_128_over_16": ratio,
        "kill_replica": kills.get("BundleServer"),
        "kill_ingress": kills.get("Ingress"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{'users':>5} {'valid req/s':>11} {'p50 ms':>7} {'p99 ms':>7} {'valid failed':>12} {'malformed 4xx':>13}")
    for level in levels + list(kills.values()):
        ok = level["malformed_requests"] - level["malformed_not_4xx"]
        print(
            f"{level['users']:>5} {level['valid_rps']:>11} {level['p50_ms']:>7} {level['p99_ms']:>7} "
            f"{level['valid_failed']:>12} {ok:>6}/{level['malformed_requests']:<6}"
        )
    print(f"throughput 128/16: {ratio}; results in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
