"""``clse-serve``: a compiled bundle behind Ray Serve (``POST /generate``, ``GET /health``, ``GET /metadata``).

Every replica loads the bundle's engines once. A request is validated and encoded to the compiled shapes
before it is queued, so a bad one gets a 4xx and never fails the batch it would have joined; valid requests
are grouped by ``@serve.batch`` into the bundle's compiled batch. How many requests a replica holds and how
many wait in front of the replicas come from the compiled batch (``Concurrency.derive``), so load past the
service's capacity waits in a bounded queue at the replica instead of in the router's retry backoff, and past
that gets a quick 503. ``/health`` is its own small application: it never waits behind generation.
"""

import asyncio
import base64
import binascii
import dataclasses
import io
import json
import os
import socket
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path, PureWindowsPath
from typing import TYPE_CHECKING

import numpy as np

from clse_fx.deploy.engine import Engine, SamplingConfig
from clse_fx.deploy.frontend import FrontEnd, FrontLimits
from clse_fx.deploy.manifest import Manifest, read_manifest
from clse_fx.deploy.preprocess.media import (
    DEFAULT_LIMITS,
    FORMATS_HINT,
    ImageLimits,
    ImageTooLarge,
    UnacceptedFormat,
    as_rgb,
    open_image,
)

if TYPE_CHECKING:
    from ray.serve import Application

APP_NAME = "clse"
HEALTH_APP_NAME = "clse-health"
MAX_TEMPERATURE = 100.0  # past this every token is as likely as any other: a typo, not a setting
MIN_SAMPLING_TEMPERATURE = 1e-3  # below this logits / temperature overflows; greedy is do_sample false
MAX_SEED = 2**64 - 1
MAX_STOP_TOKENS = 64
MAX_PATH_CHARS = 1024
INGRESS_REPLICAS = 2  # HTTP front ends: no single point of failure on one node
INGRESS_HEADER = "X-Clse-Ingress"  # the answer's ingress replica (Ray Serve's replica id)
GRPC_MESSAGE_LIMIT_VAR = "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH"  # what an engine replica accepts, bytes
ENGINE_HEALTH_CHECK_S = 2.0  # how often Serve's controller checks each engine replica
REPORT_PERIOD_S = 0.5  # how often an ingress with requests in flight tells /health how they fare
REPORT_FRESH_S = 3.0  # an ingress report older than this no longer counts (the ingress went idle or died)
REPLICA_ACTOR_PREFIX = "SERVE_REPLICA::"  # Ray Serve names each replica's actor SERVE_REPLICA::app#deployment#id
# glibc raises its mmap threshold to the size of each large block freed (up to 32 MB), after which request bodies
# and images come from heaps that keep the memory: with a fixed threshold every block over 1 MiB is mapped on its own
# and handed back when freed, so a replica's memory follows the requests it holds, not the most it ever held.
REPLICA_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
RETRIES = 2  # times a request is sent to another replica when the one answering it dies
DEFAULT_NEW_TOKENS = 32  # what a request without max_new_tokens gets, as Engine.generate
FIELDS = (
    "prompt",
    "image",
    "image_path",
    "max_new_tokens",
    "do_sample",
    "temperature",
    "top_k",
    "seed",
    "stop_token_ids",
    "chat",
)


class GenerateRequest:
    """The ``/generate`` body as a pydantic model, for the OpenAPI schema only: the ingress reads the body itself
    (capped by --max-body-bytes before parsing) and :func:`parse_request` checks it, with messages that say
    what to change."""

    @staticmethod
    def model():
        from pydantic import BaseModel, ConfigDict, Field

        class Generate(BaseModel):
            model_config = ConfigDict(extra="forbid", title="GenerateRequest")
            prompt: str = Field(description="the question about the image(s)")
            image: str | list[str] | None = Field(None, description="base64 image file(s); or image_path")
            image_path: str | list[str] | None = Field(None, description="file(s) under the server's --image-root")
            max_new_tokens: int | None = Field(None, ge=1)
            do_sample: bool = False
            temperature: float = Field(1.0, ge=0)
            top_k: int = Field(0, ge=0)
            seed: int | None = Field(None, ge=0)
            stop_token_ids: list[int] | None = Field(None, max_length=MAX_STOP_TOKENS)
            chat: bool = False

        return Generate

    @classmethod
    def openapi_body(cls) -> dict:
        """The ``openapi_extra`` that declares the body of ``POST /generate``."""
        return {
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": cls.model().model_json_schema()}},
            }
        }


@dataclass(frozen=True)
class Limits:
    """What one request may ask for. Server-side image paths are refused unless ``image_root`` is set."""

    max_image_bytes: int = 20 << 20
    max_image_pixels: int = DEFAULT_LIMITS.max_pixels
    max_image_side: int = DEFAULT_LIMITS.max_side
    max_image_aspect_ratio: float = DEFAULT_LIMITS.max_aspect_ratio
    max_new_tokens: int = 256
    image_root: str | None = None
    max_prompt_chars: int = 16384  # checked before tokenizing: a 10 MB prompt took 26 s to reach its 422
    max_body_bytes: int = 32 << 20  # the largest image in base64 (27 MB at the default) and room for the rest
    front: FrontLimits = field(default_factory=FrontLimits)  # headers, timeouts and connections (HAProxy)
    stall_timeout_s: float = 60.0  # /health says "stalled" (503) when requests wait and none is answered this long


@dataclass(frozen=True)
class Concurrency:
    """How much work the service holds. ``max_ongoing_requests``: requests one replica accepts at once (the one
    batch it runs, the batches waiting in its ``@serve.batch`` queue); ``max_queued_requests``: requests waiting
    in front of all replicas when every one is full (-1: unbounded), past which a request gets 503 at once;
    ``batch_wait_s``: how long a short batch waits to fill; ``max_decodes``: requests one replica decodes and
    encodes at once (each decoded image costs up to ~200 MB at the default image limits, whatever the body)."""

    max_ongoing_requests: int
    max_queued_requests: int
    batch_wait_s: float = 0.01
    max_decodes: int = 2

    PIPELINE = 32  # compiled batches a replica holds: one running, the rest queued behind it in FIFO order

    @classmethod
    def derive(
        cls,
        batch: int,
        replicas: int = 1,
        max_ongoing_requests: int | None = None,
        max_queued_requests: int | None = None,
        batch_wait_s: float = 0.01,
        max_decodes: int = 2,
    ) -> "Concurrency":
        """Defaults from the compiled batch: a replica holds ``PIPELINE`` batches (so Ray Serve's router, which
        backs off and retries while every replica is full, rarely has to), and twice what all replicas hold may
        wait in front of them (so losing a replica refuses nothing) before requests are refused with 503."""
        if batch < 1 or replicas < 1:
            raise ValueError(f"batch and replicas must be >= 1, got {batch} and {replicas}")
        ongoing = max_ongoing_requests if max_ongoing_requests is not None else cls.PIPELINE * batch
        queued = max_queued_requests if max_queued_requests is not None else 2 * ongoing * replicas
        if ongoing < batch:
            raise ValueError(f"--max-ongoing-requests must be at least the compiled batch {batch}, got {ongoing}")
        if queued < -1:
            raise ValueError(f"--max-queued-requests must be >= 0, or -1 for unbounded, got {queued}")
        if not 0 <= batch_wait_s <= 10:
            raise ValueError(f"--batch-wait-ms must be between 0 and 10000, got {batch_wait_s * 1e3:g}")
        if max_decodes < 1:
            raise ValueError(f"--max-decodes must be >= 1, got {max_decodes}")
        return cls(ongoing, queued, batch_wait_s, max_decodes)


class RequestError(Exception):
    """A refused request: the HTTP status to answer and a one-line message saying what to change."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Prepared:
    """A validated request: one row of compiled-shape feeds and its generation settings."""

    feeds: dict[str, np.ndarray]
    max_new_tokens: int
    sampling: SamplingConfig
    stops: frozenset[int]
    warnings: tuple[str, ...] = ()  # what in the prompt the model cannot read (answered all the same)

    def group(self) -> tuple:
        """Requests with equal groups share engine calls; a seeded sample runs alone, so only its seed decides it."""
        sampling = self.sampling
        if not sampling.do_sample:
            return (False, self.stops)
        if sampling.seed is not None:
            return (id(self),)
        return (True, sampling.temperature, sampling.top_k, self.stops)


def max_new_tokens_limit(manifest: Manifest, limits: Limits) -> tuple[int, str]:
    """The configured cap, lowered to the positions the model has left (the manifest's runtime limit) when it
    has one; with what sets it, for error messages."""
    configured = (limits.max_new_tokens, "the server's --max-new-tokens")
    if manifest.runtime.max_new_tokens is None:
        return configured
    positions, prompt = manifest.max_position_embeddings, manifest.sequence_length
    left = (
        manifest.runtime.max_new_tokens,
        f"the model's {positions} positions less the {prompt}-token compiled prompt",
    )
    return min(configured, left)


def _typed(body: dict, name: str, kind: type, default):
    value = body.get(name, default)
    if value is None and default is None:
        return None
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
        ok = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
    if not ok:
        raise RequestError(422, f"{name} must be {'a number' if kind is float else f'a JSON {kind.__name__}'}")
    if kind is not float:
        return value
    try:
        return float(value)
    except OverflowError as error:  # an integer past float range, e.g. 1 followed by 400 zeros
        raise RequestError(422, f"{name} must be a finite number") from error


def _base64_bytes(text: str, limits: Limits) -> bytes:
    text = "".join(text.partition(",")[2].split() if text.startswith("data:") else text.split())
    if len(text) > 4 * (limits.max_image_bytes // 3 + 1):
        raise RequestError(413, f"the image is over the {limits.max_image_bytes}-byte limit; send a smaller one")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as error:
        raise RequestError(400, "image is not valid base64; send the image file's bytes base64-encoded") from error
    if len(data) > limits.max_image_bytes:
        raise RequestError(413, f"the image is over the {limits.max_image_bytes}-byte limit; send a smaller one")
    return data


def _path_bytes(path: str, limits: Limits) -> bytes:
    if limits.image_root is None:
        raise RequestError(
            403, "server-side image paths are disabled; send the image as base64 or start clse-serve with --image-root"
        )
    if len(path) > MAX_PATH_CHARS or "\0" in path:
        raise RequestError(422, f"image_path must be a file name of at most {MAX_PATH_CHARS} characters")
    root = Path(limits.image_root).resolve()
    try:
        target = (root / path).resolve()
        inside = target.is_relative_to(root)
    except (OSError, ValueError) as error:
        raise RequestError(400, f"image_path {path!r} is not a usable path ({error})") from error
    if not inside:
        raise RequestError(403, f"image_path {path!r} is outside the server's image root; use a path under it")
    try:
        if not target.is_file():
            raise RequestError(404, f"image_path {path!r} is not a file under the server's image root")
        if target.stat().st_size > limits.max_image_bytes:
            raise RequestError(413, f"the image is over the {limits.max_image_bytes}-byte limit; send a smaller one")
        return target.read_bytes()
    except OSError as error:  # e.g. a name component past the file system's limit, or no permission
        raise RequestError(400, f"image_path {path!r} cannot be read ({error.strerror or error})") from error


def _decode_image(data: bytes, limits: Limits):
    sizes = ImageLimits(limits.max_image_pixels, limits.max_image_side, limits.max_image_aspect_ratio)
    try:
        return as_rgb(open_image(io.BytesIO(data), sizes))
    except ImageTooLarge as error:
        raise RequestError(413, str(error)) from error
    except UnacceptedFormat as error:
        raise RequestError(415, f"cannot decode the image: {error}") from error
    except (OSError, SyntaxError, ValueError) as error:
        raise RequestError(400, f"cannot decode the image ({error}); {FORMATS_HINT}") from error


def load_images(body: dict, limits: Limits) -> list:
    """The request's images, from base64 (``image``) or server-side paths (``image_path``), each checked."""
    if ("image" in body) == ("image_path" in body):
        raise RequestError(422, "send exactly one of image (base64) or image_path (a file under the image root)")
    name = "image" if "image" in body else "image_path"
    values = body[name] if isinstance(body[name], list) else [body[name]]
    if not values or not all(isinstance(value, str) for value in values):
        raise RequestError(422, f"{name} must be a string or a list of strings")
    read = _base64_bytes if name == "image" else _path_bytes
    return [_decode_image(read(value, limits), limits) for value in values]


def read_body(raw: bytes | bytearray) -> object:
    """A request body's JSON (the ingress has already capped its size), or a 400 saying why not: not UTF-8, not
    JSON, or nested past the parser's depth."""
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as error:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        reason = "nested too deeply" if isinstance(error, RecursionError) else "not JSON"
        raise RequestError(400, f"the request body is {reason}; send a JSON object") from None


async def capped_body(request, limit: int, timeout_s: float) -> bytearray:
    """The request's body, read up to ``limit`` bytes within ``timeout_s``: a 413 as soon as the declared length or
    the bytes received pass the limit, before anything is parsed or held beyond it; a 408 when the client is too
    slow. (HAProxy holds small bodies whole before forwarding them, but streams larger ones and can only time out
    an idle client: one sending a byte a second is timed here.)"""
    too_large = RequestError(413, f"the request body is over the server's {limit}-byte limit (--max-body-bytes)")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()  # one growing buffer: a list of chunks joined at the end held each body twice
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                if len(body) + len(chunk) > limit:
                    raise too_large
                body += chunk
    except TimeoutError:
        raise RequestError(
            408, f"the request body did not arrive within {timeout_s:g} s (--body-timeout-s); send it again"
        ) from None
    return body


def parse_request(body: object, engine: Engine, limits: Limits) -> Prepared:
    """Validate a /generate body and encode it to one compiled-shape row; RequestError says what is wrong."""
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise RequestError(422, f"unknown field(s) {', '.join(unknown)}; the fields are {', '.join(FIELDS)}")
    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        raise RequestError(422, "prompt (a string) is required")
    if len(prompt) > limits.max_prompt_chars:
        raise RequestError(413, f"the prompt is over the {limits.max_prompt_chars}-character limit; shorten it")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as error:  # JSON allows a lone surrogate escape ("\ud800"); text cannot hold one
        raise RequestError(422, "prompt holds a lone surrogate (invalid Unicode); send valid UTF-8 text") from error
    limit, reason = max_new_tokens_limit(engine.manifest, limits)
    max_new_tokens = _typed(body, "max_new_tokens", int, min(DEFAULT_NEW_TOKENS, limit))
    if not 1 <= max_new_tokens <= limit:
        raise RequestError(422, f"max_new_tokens must be between 1 and {limit} ({reason})")
    do_sample = _typed(body, "do_sample", bool, False)
    temperature = _typed(body, "temperature", float, 1.0)
    top_k = _typed(body, "top_k", int, 0)
    seed = _typed(body, "seed", int, None)
    chat = _typed(body, "chat", bool, False)
    vocab = engine.manifest.vocab_size()
    if not 0 <= top_k <= vocab:
        raise RequestError(422, f"top_k must be between 0 (all tokens) and the vocabulary size {vocab}")
    try:  # temperature: finite, and > 0 when sampling; seed: none or >= 0
        sampling = SamplingConfig(do_sample=do_sample, temperature=temperature, top_k=top_k, seed=seed)
    except ValueError as error:
        raise RequestError(422, str(error)) from error
    low = MIN_SAMPLING_TEMPERATURE if do_sample else 0
    if not low <= temperature <= MAX_TEMPERATURE:
        raise RequestError(422, f"temperature must be between {low:g} and {MAX_TEMPERATURE:g}, got {temperature:g}")
    if seed is not None and seed > MAX_SEED:
        raise RequestError(422, f"seed must be between 0 and 2**64 - 1, got a {seed.bit_length()}-bit integer")
    stops = body.get("stop_token_ids")
    if stops is not None and not (
        isinstance(stops, list)
        and len(stops) <= MAX_STOP_TOKENS
        and all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in stops)
    ):
        raise RequestError(
            422, f"stop_token_ids must be a list of at most {MAX_STOP_TOKENS} token ids between 0 and {vocab - 1}"
        )
    images = load_images(body, limits)
    try:
        feeds = engine.encode([images], [prompt], chat)
    except ValueError as error:
        raise RequestError(422, str(error)) from error
    return Prepared(
        feeds=feeds,
        max_new_tokens=max_new_tokens,
        sampling=sampling,
        stops=frozenset(engine.manifest.stop_token_ids() if stops is None else stops),
        warnings=tuple(engine.preprocessor.prompt_warnings(prompt, chat)),
    )


def run_batch(engine: Engine, items: list[Prepared]) -> list[dict]:
    """Answer prepared requests: each group of equal settings runs in chunks of the compiled batch, a short
    chunk padded with copies of its last row (as ``Engine.generate`` does), each row cut to its own limit."""
    results: list[dict] = [{} for _ in items]
    groups = defaultdict(list)
    for index, item in enumerate(items):
        groups[item.group()].append(index)
    for indices in groups.values():
        for start in range(0, len(indices), engine.batch):
            chunk = indices[start : start + engine.batch]
            rows = chunk + [chunk[-1]] * (engine.batch - len(chunk))
            feeds = {name: np.concatenate([items[i].feeds[name] for i in rows]) for name in items[chunk[0]].feeds}
            first = items[chunk[0]]
            ids, timings = engine.generate_ids(
                feeds,
                max(items[i].max_new_tokens for i in chunk),
                first.sampling,
                first.sampling.rng(),
                first.stops,
            )
            for index, tokens in zip(chunk, ids):
                tokens = tokens[: items[index].max_new_tokens]
                results[index] = {
                    "text": engine.preprocessor.decode(tokens),
                    "token_ids": tokens,
                    "timings": vars(timings),
                    "batch_size": len(chunk),
                    "warnings": list(items[index].warnings),
                }
    return results


def public_metadata(manifest: dict) -> dict:
    """The manifest as ``/metadata`` shows it: no file-system path of the machine that compiled the bundle (the
    source checkpoint's) or serves it; an absolute path is cut to its last part (e.g. the checkpoint's folder)."""
    if isinstance(manifest, dict):
        return {key: public_metadata(value) for key, value in manifest.items()}
    if isinstance(manifest, list):
        return [public_metadata(value) for value in manifest]
    if isinstance(manifest, str) and (manifest.startswith(("/", "~", "\\")) or PureWindowsPath(manifest).drive):
        return PureWindowsPath(manifest).name  # splits on / and \ alike
    return manifest


class Progress:
    """The requests one ingress holds past reading their bodies, for ``/health``: how many, how long the oldest has
    waited, and how long since the ingress last answered one (or, idle before, since work arrived)."""

    def __init__(self) -> None:
        self.started: dict[int, float] = {}
        self.progress = time.monotonic()

    def begin(self, key: int) -> None:
        now = time.monotonic()
        if not self.started:
            self.progress = now
        self.started[key] = now

    def end(self, key: int) -> None:
        self.started.pop(key, None)
        self.progress = time.monotonic()

    def snapshot(self) -> dict:
        now = time.monotonic()
        return {
            "in_flight": len(self.started),
            "oldest_request_s": round(now - min(self.started.values()), 2) if self.started else 0.0,
            "since_progress_s": round(now - self.progress, 2),
        }


def health_status(running: int, fronts: int, replicas: int, reports: list[dict], stall_s: float) -> tuple[str, int]:
    """(status, HTTP code) of ``/health`` from the live engine and ingress replicas and the fresh ingress reports:
    "unavailable" (503) with no engine or no ingress; "stalled" (503) when some ingress holds requests and has
    answered none for ``stall_s``; "degraded" (200) while a replica is missing or a request has waited past
    ``stall_s``; else "ok"."""
    if not running or not fronts:
        return "unavailable", 503
    if any(report["in_flight"] and report["since_progress_s"] > stall_s for report in reports):
        return "stalled", 503
    slow = any(report["oldest_request_s"] > stall_s for report in reports)
    whole = running >= replicas and fronts >= INGRESS_REPLICAS
    return ("ok" if whole and not slow else "degraded"), 200


def build_app(
    bundle: str | Path,
    limits: Limits,
    replicas: int = 1,
    cpus_per_replica: float = 1.0,
    gpus_per_replica: float = 0.0,
    threads: int | None = None,
    concurrency: Concurrency | None = None,
) -> "Application":
    """The Ray Serve application: ``replicas`` copies of the bundle's engines (``BundleServer``, holding and
    queueing requests as ``concurrency`` says, by default derived from the compiled batch) behind a FastAPI
    ingress with no engine, which retries a request whose replica died under it on another replica."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
    from ray import serve
    from ray.exceptions import ActorDiedError, ActorUnavailableError
    from ray.serve.exceptions import BackPressureError

    bundle = Path(bundle).resolve()
    batch = read_manifest(bundle, verify=False).batch
    threads = threads or max(1, int(cpus_per_replica))
    concurrency = concurrency or Concurrency.derive(batch, replicas)
    api = FastAPI(title="clse-serve", description=f"CLSE-pruned bundle {bundle.name}")

    @api.middleware("http")
    async def name_the_front_end(request: Request, call_next):
        """Every answer names the ingress replica that gave it, to trace a failure to one front end."""
        answer = await call_next(request)
        answer.headers[INGRESS_HEADER] = serve.get_replica_context().replica_id.unique_id
        return answer

    @serve.deployment(
        num_replicas=replicas,
        ray_actor_options={
            "num_cpus": cpus_per_replica,
            "num_gpus": gpus_per_replica,
            # The ingress calls the engines over Serve's gRPC transport (see Ingress); a request carries its
            # image(s) inline, so the engines must accept messages up to the body limit (gRPC's default is 4 MB).
            "runtime_env": {
                "env_vars": {GRPC_MESSAGE_LIMIT_VAR: str(limits.max_body_bytes + (1 << 20)), **REPLICA_MALLOC_ENV}
            },
        },
        # Room for twice the share the ingress sends it: the router never finds every replica full (and backs
        # off) while one is being replaced, or while its view of the replicas' queues lags.
        max_ongoing_requests=2 * concurrency.max_ongoing_requests,
        # Over gRPC a dead engine shows as unavailable, not dead, so only the controller's health check finds it
        # to replace it (Serve checks every 10 s by default).
        health_check_period_s=ENGINE_HEALTH_CHECK_S,
    )
    class BundleServer:
        def __init__(self) -> None:
            self.engine = Engine.load(bundle, threads=threads)
            # Decoding is where a request's memory peaks (an image up to the pixel limit, whatever its body's size):
            # a bound of its own, not the thread pool's size (up to 32 threads).
            self.decodes = asyncio.Semaphore(concurrency.max_decodes)

        def metadata(self) -> dict:
            return public_metadata(self.engine.manifest.to_dict())

        async def generate(self, body: object) -> tuple[int, dict]:
            """(HTTP status, answer): text, token ids and timings, or an error saying what to fix."""
            start = time.perf_counter()
            try:
                async with self.decodes:
                    prepared = await asyncio.to_thread(parse_request, body, self.engine, limits)
                if isinstance(body, dict):  # Serve holds the arguments until the answer: drop the image text, so
                    body.clear()  # only the compiled-shape feeds wait for the batch
                result = await self.batched(prepared)
            except RequestError as error:
                return error.status, {"error": str(error)}
            except Exception as error:  # a failed engine call answers 500; the replica keeps serving
                return 500, {"error": f"generation failed: {error}"}
            result["timings"] = dict(result["timings"], total_ms=(time.perf_counter() - start) * 1e3)
            return 200, result

        @serve.batch(max_batch_size=batch, batch_wait_timeout_s=concurrency.batch_wait_s)
        async def batched(self, items: list[Prepared]) -> list[dict]:
            return await asyncio.to_thread(run_batch, self.engine, items)

    # The ingress only forwards. It lets replicas x max_ongoing_requests requests reach the engines and queues
    # the rest itself, first come first served, up to max_queued_requests (then 503 at once): requests wait in
    # bounded FIFO queues, never in Ray Serve's router, whose back-off-and-retry left replicas idle under load.
    # INGRESS_REPLICAS of them, each with its share, so killing one loses only its requests in flight.
    running = -(-concurrency.max_ongoing_requests * replicas // INGRESS_REPLICAS)
    queued = concurrency.max_queued_requests
    queued = queued if queued < 0 else -(-queued // INGRESS_REPLICAS)
    capacity = running + (queued if queued >= 0 else 100_000)
    # Bodies still arriving count against Serve's limit too: room for every large request HAProxy lets in (it
    # holds small bodies whole before forwarding them), so slow senders never make the router back off.
    reading = limits.front.max_large_requests or 0

    @serve.deployment(
        num_replicas=INGRESS_REPLICAS,
        ray_actor_options={"num_cpus": 0, "runtime_env": {"env_vars": REPLICA_MALLOC_ENV}},
        max_ongoing_requests=capacity + reading + 100,
    )
    @serve.ingress(api)
    class Ingress:
        def __init__(self, engines) -> None:
            # By value over Serve's gRPC transport, not as Ray actor calls: Ray 2.60 runs Serve's actor calls as
            # streaming-generator tasks, whose end blocks the engine's event loop (in 1 s steps) until the caller
            # acknowledges every item; when one ingress dies, the engines then stall the other one's requests for
            # 1-3 s. Over gRPC the survivor sees no gap (benchmarks/serve_load.py, kill-the-ingress run).
            self.engines = engines.options(_by_reference=False)
            self.slots = asyncio.Semaphore(running)
            self.waiting = 0
            self.progress = Progress()
            self.reporter: asyncio.Task | None = None
            self.name = serve.get_replica_context().replica_id.unique_id

        async def report(self) -> None:
            """Tell /health how this ingress's requests fare every REPORT_PERIOD_S while it holds any, and once
            more when it holds none."""
            health = serve.get_deployment_handle("Health", app_name=HEALTH_APP_NAME)
            while True:
                snapshot = self.progress.snapshot()
                try:
                    await health.report.remote(self.name, snapshot)
                except Exception:  # /health is deployed after this application, and may be restarting
                    pass
                if not snapshot["in_flight"]:
                    return
                await asyncio.sleep(REPORT_PERIOD_S)

        @api.get("/metadata")
        async def metadata(self) -> dict:
            """The bundle's manifest."""
            return await self.engines.metadata.remote()

        @api.post("/generate", openapi_extra=GenerateRequest.openapi_body())
        async def generate(self, request: Request) -> JSONResponse:
            """Answer one prompt about its image(s): text, token ids and timings, or a 4xx saying what to fix."""
            try:
                body = read_body(await capped_body(request, limits.max_body_bytes, limits.front.body_timeout_s))
            except RequestError as error:
                return JSONResponse({"error": str(error)}, status_code=error.status)
            if self.slots.locked() and 0 <= queued <= self.waiting:
                return JSONResponse(
                    {"error": "the service is at its queue limit (--max-queued-requests); retry later"},
                    status_code=503,
                    headers={"Retry-After": "1"},
                )
            key = id(body)
            self.progress.begin(key)
            if self.reporter is None or self.reporter.done():
                self.reporter = asyncio.create_task(self.report())
            try:
                return await self.answer(body)
            finally:
                self.progress.end(key)

        async def answer(self, body: object) -> JSONResponse:
            """A slot, then an engine's answer (another engine's when the first died under the request)."""
            self.waiting += 1
            try:
                await self.slots.acquire()
            finally:
                self.waiting -= 1
            try:
                for attempt in range(RETRIES + 1):
                    try:
                        status, answer = await self.engines.generate.remote(body)
                        return JSONResponse(answer, status_code=status)
                    except BackPressureError:
                        return JSONResponse({"error": "the engines are full; retry later"}, status_code=503)
                    except (ActorDiedError, ActorUnavailableError) as error:  # its replica died: another answers
                        if attempt == RETRIES:
                            return JSONResponse({"error": f"no replica answered: {error}"}, status_code=503)
                raise AssertionError("unreachable")
            finally:
                self.slots.release()

    return Ingress.bind(BundleServer.bind())


def build_health_app(
    batch: int, concurrency: Concurrency, replicas: int = 1, stall_timeout_s: float = 60.0
) -> "Application":
    """``GET /health`` as its own application with no engine (it never queues behind generation), by
    :func:`health_status`: the engine and ingress replicas alive (the fewer of what Serve's controller counts
    running and what Ray's actor registry still lists, which drops a dead replica at once while the controller
    notices it at its next health check) and what each ingress reports of its requests."""
    from ray import serve
    from ray.util import list_named_actors
    from starlette.responses import JSONResponse

    @serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
    class Health:
        def __init__(self) -> None:
            self.checked, self.answer, self.refreshing = 0.0, None, None
            self.reports: dict[str, tuple[float, dict]] = {}

        def report(self, ingress: str, snapshot: dict) -> None:
            """An ingress replica's :meth:`Progress.snapshot`."""
            self.reports[ingress] = (time.monotonic(), snapshot)

        def replicas(self) -> tuple[dict, int]:
            application = serve.status().applications.get(APP_NAME)
            engines = application and application.deployments.get("BundleServer")
            ingress = application and application.deployments.get("Ingress")
            if engines is None or ingress is None:
                return {"status": "starting", "replicas": 0, "ingress_replicas": 0, "batch": batch}, 503
            alive = [entry["name"] for entry in list_named_actors(all_namespaces=True)]

            def live(deployment: str, state) -> int:
                prefix = f"{REPLICA_ACTOR_PREFIX}{APP_NAME}#{deployment}#"
                return min(state.replica_states.get("RUNNING", 0), sum(name.startswith(prefix) for name in alive))

            running, fronts = live("BundleServer", engines), live("Ingress", ingress)
            now = time.monotonic()
            reports = [snapshot for at, snapshot in self.reports.values() if now - at < REPORT_FRESH_S]
            status, code = health_status(running, fronts, replicas, reports, stall_timeout_s)
            body = {
                "status": status,
                "replicas": running,
                "ingress_replicas": fronts,
                "batch": batch,
                "max_ongoing_requests": concurrency.max_ongoing_requests,
                "max_queued_requests": concurrency.max_queued_requests,
                "in_flight": sum(report["in_flight"] for report in reports),
                "oldest_request_s": max((report["oldest_request_s"] for report in reports), default=0.0),
                "stall_timeout_s": stall_timeout_s,
            }
            return body, code

        async def refresh(self) -> None:
            try:
                self.answer = await asyncio.to_thread(self.replicas)
                self.checked = time.monotonic()
            finally:
                self.refreshing = None

        async def __call__(self, request) -> JSONResponse:
            """Liveness and progress. The controller is asked in the background at most every 0.25 s; a check
            answers from the last reply (at most ~0.5 s old) at once."""
            if self.refreshing is None and time.monotonic() - self.checked > 0.25:
                self.refreshing = asyncio.create_task(self.refresh())
            if self.answer is None:
                await asyncio.shield(self.refreshing)
            body, status = self.answer
            return JSONResponse(body, status_code=status)

    return Health.bind()


def start(
    bundle: str | Path,
    limits: Limits,
    address: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    replicas: int = 1,
    num_cpus: int | None = None,
    cpus_per_replica: float = 1.0,
    gpus_per_replica: float = 0.0,
    threads: int | None = None,
    concurrency: Concurrency | None = None,
) -> str:
    """Join the Ray cluster at ``address`` (or start a local one on loopback), deploy, return the base URL.
    A local cluster is kept on loopback only when Ray is first imported here (it reads the switch at import).
    ``host:port`` is HAProxy's (:mod:`clse_fx.deploy.frontend`), started first so that a taken port fails at once;
    Ray Serve's own proxy listens on a free loopback port behind it."""
    global _front_end
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage report leaves the machine unless asked
    if not address:
        # Single node: Ray would otherwise advertise the machine's outward address instead of loopback.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray
    from ray import serve

    quiet_ray_logs()  # after importing Serve, which sets its logger to INFO

    batch = read_manifest(Path(bundle), verify=False).batch
    concurrency = concurrency or Concurrency.derive(batch, replicas)
    front = limits.front.resolved(batch, replicas, concurrency.max_queued_requests)
    limits = dataclasses.replace(limits, front=front)
    app = build_app(bundle, limits, replicas, cpus_per_replica, gpus_per_replica, threads, concurrency)
    serve_port = free_loopback_port()
    _front_end = FrontEnd.start(host, port, serve_port, front)
    try:
        if address:
            ray.init(address=address, logging_level="warning", log_to_driver=False)
        else:
            ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level="warning", log_to_driver=False)
        serve.start(http_options={"host": "127.0.0.1", "port": serve_port})
        serve.run(app, name=APP_NAME, route_prefix="/")
        health = build_health_app(batch, concurrency, replicas, limits.stall_timeout_s)
        serve.run(health, name=HEALTH_APP_NAME, route_prefix="/health")
    except Exception:  # the caller stops Ray (see clse-serve); the front end is ours to stop
        _front_end.stop()
        _front_end = None
        raise
    return f"http://{host}:{port}"


_front_end: FrontEnd | None = None  # the running HAProxy, which stop() ends


def free_loopback_port() -> int:
    """A TCP port free on 127.0.0.1 now (for Serve's proxy, which only HAProxy talks to)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def quiet_ray_logs() -> None:
    """Keep a normal start and stop to clse-serve's own lines: Ray Serve's INFO lines ("Started Serve", "Connecting
    to existing Serve app ... will not be applied", which reads as a problem but is how a second application joins
    Serve) and the notice that token authentication is on (it stays on; the cluster listens on loopback) are
    dropped. Warnings and errors from Ray still show."""
    import logging

    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)


def stop(local: bool) -> None:
    """Remove the applications from a cluster clse-serve joined; a local cluster it started is shut down whole."""
    import ray
    from ray import serve

    global _front_end
    if _front_end is not None:
        _front_end.stop()
        _front_end = None
    if not local:  # a local cluster ends with ray.shutdown (Serve's own shutdown there logged a failed retry)
        serve.delete(HEALTH_APP_NAME)
        serve.delete(APP_NAME)
    ray.shutdown()
