"""``clse-run`` (answer prompts about images or videos with a bundle) and ``clse-serve`` (serve it with Ray
Serve). Imports only what deploy needs (numpy, onnxruntime, tokenizers, pillow; Ray to serve): no torch,
transformers or rich."""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import warnings
from pathlib import Path
from typing import NoReturn

from clse_fx.deploy.preprocess.media import DEFAULT_LIMITS, ImageLimits


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line naming ``--help``, not argparse's usage block first."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message}; see {self.prog} --help\n")

    def refuse_unused(self, given: dict[str, bool], needs: str) -> None:
        """A usage error for each option in ``given`` that was passed (True) but would be ignored without ``needs``."""
        unused = [option for option, passed in given.items() if passed]
        if unused:
            self.error(f"{', '.join(unused)} only take{'s' if len(unused) == 1 else ''} effect with {needs}")


def one_line_warnings() -> None:
    """Show warnings (e.g. a GPU bundle falling back to the CPU) as one ``warning:`` line, without the Python
    source line the default format appends."""

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        print(f"warning: {message}", file=file or sys.stderr)

    warnings.showwarning = show


def _run_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="clse-run", description="Answer a prompt about an image or a video with a bundle (no torch needed)."
    )
    parser.add_argument("bundle", help="bundle directory written by clse-compile")
    media = parser.add_mutually_exclusive_group(required=True)
    media.add_argument("--image", action="append", help="image file (repeat for several prompts)")
    media.add_argument(
        "--video", action="append", help="folder of frames or animated GIF/WebP (repeat for several prompts)"
    )
    parser.add_argument("--prompt", action="append", required=True, help="prompt text (one per --image/--video)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate at most (default: 32)")
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, help="with --sample (default: 1.0)")
    parser.add_argument("--top-k", type=int, help="with --sample; 0: every token (default: 0)")
    parser.add_argument("--seed", type=int, help="with --sample: the same seed, the same answer")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    parser.add_argument(
        "--json",
        action="store_true",
        help="print token ids, text, kept visual ids (per stage) and timings as JSON",
    )
    add_image_limit_flags(parser)
    return parser


def add_image_limit_flags(parser: argparse.ArgumentParser) -> None:
    """The image size limits, checked from each image's header before decoding (the same defaults in clse-run,
    Engine and clse-serve)."""
    parser.add_argument(
        "--max-image-pixels", type=int, default=DEFAULT_LIMITS.max_pixels, help="(default: %(default)s)"
    )
    parser.add_argument("--max-image-side", type=int, default=DEFAULT_LIMITS.max_side, help="(default: %(default)s)")
    parser.add_argument(
        "--max-aspect-ratio", type=float, default=DEFAULT_LIMITS.max_aspect_ratio, help="(default: %(default)s)"
    )


def image_limits(args: argparse.Namespace) -> ImageLimits:
    """The limits of :func:`add_image_limit_flags`, each checked to be positive."""
    if min(args.max_image_pixels, args.max_image_side) < 1 or not args.max_aspect_ratio >= 1:
        raise ValueError("--max-image-pixels and --max-image-side must be >= 1, --max-aspect-ratio >= 1")
    return ImageLimits(args.max_image_pixels, args.max_image_side, args.max_aspect_ratio)


def run_main(argv: list[str] | None = None) -> int:
    try:
        code = _run(argv)
        sys.stdout.flush()  # inside the try: a closed pipe must fail here, not in the interpreter's exit flush
        return code
    except BrokenPipeError:  # the reader left (`clse-run ... | head -1`): stop quietly, as Python's docs advise
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _run(argv: list[str] | None) -> int:
    parser = _run_parser()
    args = parser.parse_args(argv)
    sampling_options = {"--temperature": args.temperature, "--top-k": args.top_k, "--seed": args.seed}
    if not args.sample:
        parser.refuse_unused({name: value is not None for name, value in sampling_options.items()}, "--sample")
    one_line_warnings()
    import json

    from clse_fx.deploy.preprocess.media import as_rgb, load_image, load_video

    kind, paths = ("video", args.video) if args.video else ("image", args.image)
    try:
        if len(paths) != len(args.prompt):
            raise ValueError(
                f"got {len(paths)} --{kind} and {len(args.prompt)} --prompt; pass one of each per question"
            )
        from clse_fx.deploy.engine import Engine, SamplingConfig

        sampling = SamplingConfig(
            do_sample=args.sample,
            temperature=1.0 if args.temperature is None else args.temperature,
            top_k=args.top_k or 0,
            seed=args.seed,
        )
        limits = image_limits(args)
        engine = Engine.load(args.bundle)
        engine.image_limits = limits
        if engine.preprocessor is None:
            raise ValueError(
                "this bundle has no preprocessing (the checkpoint's processor did not load at compile time), so it "
                "runs from token ids and pixels only (Engine.generate_ids); recompile with a loadable processor"
            )
        modality = engine.preprocessor.modality
        if modality != kind:
            raise ValueError(f"this bundle was compiled for {modality} prompts; pass --{modality}")
        if kind == "video":
            media = [load_video(path, engine.preprocessor.frames, limits) for path in paths]
        else:
            media = [as_rgb(load_image(path, limits)) for path in paths]
        results = engine.generate(
            media, args.prompt, max_new_tokens=args.max_new_tokens, sampling=sampling, chat=args.chat
        )
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    asked = list(zip(paths, args.prompt))
    for warning in dict.fromkeys(w for r in results for w in r.warnings):  # each once, one line
        print(f"warning: {warning}", file=sys.stderr)
    if args.json:
        rows = [
            {
                kind: image,
                "prompt": prompt,
                "token_ids": r.token_ids,
                "text": r.text,
                "kept_ids": r.kept_ids,  # per stage, the visual tokens (grid order) the prefill kept
                "warnings": r.warnings,
                "timings": vars(r.timings),
            }
            for (image, prompt), r in zip(asked, results)
        ]
        print(json.dumps({"results": rows}))
    else:
        for number, ((image, prompt), r) in enumerate(zip(asked, results), 1):
            t = r.timings
            if len(results) > 1:  # say which answer belongs to which question
                print(f"[{number}] {image}: {prompt}")
            print(r.text)
            print(
                f"[prefill {t.prefill_ms:.1f} ms, decode {t.decode_ms_per_token:.2f} ms/token, "
                f"KV cache {t.kv_cache_bytes / 1024:.1f} KiB]"
            )
    return 0


def _serve_parser() -> argparse.ArgumentParser:
    from clse_fx.deploy.frontend import FrontLimits
    from clse_fx.deploy.serve import Limits

    parser = OneLineParser(
        prog="clse-serve",
        description="Serve a bundle with Ray Serve: POST /generate, GET /health, GET /metadata. Ctrl-C stops it.",
    )
    parser.add_argument("bundle", help="bundle directory written by clse-compile (same path on every node)")
    parser.add_argument("--replicas", type=int, default=1, help="copies of the engines, one Ray actor each")
    parser.add_argument("--address", help="join this Ray cluster (e.g. head-node:6379); default: start a local one")
    parser.add_argument("--host", default="127.0.0.1", help="HTTP address; 0.0.0.0 accepts other machines")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port (default: 8000)")
    parser.add_argument("--num-cpus", type=int, help="CPUs of the local cluster (default: all)")
    parser.add_argument("--cpus-per-replica", type=float, default=1.0, help="CPUs each replica reserves (default: 1)")
    parser.add_argument(
        "--gpus-per-replica", type=float, default=0.0, help="e.g. 1 for onnxruntime-gpu bundles (default: 0)"
    )
    parser.add_argument("--threads", type=int, help="ONNX Runtime threads per replica (default: its CPUs)")
    parser.add_argument("--image-root", help="allow image_path requests for files under this directory")
    parser.add_argument("--max-image-bytes", type=int, default=Limits.max_image_bytes, help="(default: %(default)s)")
    add_image_limit_flags(parser)
    parser.add_argument("--max-body-bytes", type=int, default=Limits.max_body_bytes, help="(default: %(default)s)")
    parser.add_argument("--max-prompt-chars", type=int, default=Limits.max_prompt_chars, help="(default: %(default)s)")
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=Limits.max_new_tokens,
        help="the most a request may ask (default: %(default)s)",
    )
    parser.add_argument(
        "--max-ongoing-requests",
        type=int,
        help="requests one replica holds at once, running or waiting for its batch (default: 32 x compiled batch)",
    )
    parser.add_argument(
        "--max-queued-requests",
        type=int,
        help="requests waiting for a replica when all are full, past which they get 503; -1 unbounded "
        "(default: 2 x max-ongoing-requests x replicas)",
    )
    parser.add_argument(
        "--batch-wait-ms", type=float, default=10.0, help="how long a short batch waits for more requests"
    )
    parser.add_argument(
        "--max-decodes", type=int, default=2, help="images one replica decodes at once (default: %(default)s)"
    )
    front = parser.add_argument_group("connections (the HAProxy front end)")
    front.add_argument(
        "--max-header-bytes",
        type=int,
        default=FrontLimits.max_header_bytes,
        help="request headers past this get 431 (default: %(default)s)",
    )
    front.add_argument(
        "--header-timeout-s",
        type=float,
        default=FrontLimits.header_timeout_s,
        help="time to send the headers (and a body under 32 KiB), else 408 (default: %(default)s)",
    )
    front.add_argument(
        "--body-timeout-s",
        type=float,
        default=FrontLimits.body_timeout_s,
        help="time to send a whole body, and the longest a client may stay silent, else 408 (default: %(default)s)",
    )
    front.add_argument(
        "--max-connections",
        type=int,
        default=FrontLimits.max_connections,
        help="client connections held at once (default: %(default)s)",
    )
    front.add_argument(
        "--max-large-requests",
        type=int,
        help="requests with a body over 32 KiB inside the service at once; the rest wait in the front end "
        "(default: 2 x compiled batch x replicas)",
    )
    front.add_argument(
        "--queue-timeout-s",
        type=float,
        default=FrontLimits.queue_timeout_s,
        help="how long a large request waits in the front end before a 503 (default: %(default)s)",
    )
    parser.add_argument(
        "--stall-timeout-s",
        type=float,
        default=Limits.stall_timeout_s,
        help="/health answers 503 'stalled' when requests wait and none is answered this long (default: %(default)s)",
    )
    return parser


def serve_main(argv: list[str] | None = None) -> int:
    parser = _serve_parser()
    args = parser.parse_args(argv)
    if args.address:
        parser.refuse_unused({"--num-cpus": args.num_cpus is not None}, "a local cluster (no --address)")
    one_line_warnings()
    import signal
    import time

    from clse_fx.deploy import serve

    try:
        sized = (args.replicas, args.max_image_bytes, args.max_new_tokens, args.max_body_bytes, args.max_prompt_chars)
        if min(sized) < 1:
            raise ValueError(
                "--replicas, --max-image-bytes, --max-body-bytes, --max-prompt-chars and --max-new-tokens must be >= 1"
            )
        sizes = image_limits(args)
        if args.image_root and not Path(args.image_root).is_dir():
            raise ValueError(f"--image-root {args.image_root} is not a directory")
        if importlib.util.find_spec("ray") is None:
            raise ValueError("clse-serve needs Ray Serve: pip install 'clse-fx[serve]'")
        if not args.stall_timeout_s > 0:
            raise ValueError(f"--stall-timeout-s must be > 0, got {args.stall_timeout_s:g}")
        front = serve.FrontLimits(
            max_header_bytes=args.max_header_bytes,
            header_timeout_s=args.header_timeout_s,
            body_timeout_s=args.body_timeout_s,
            max_connections=args.max_connections,
            max_large_requests=args.max_large_requests,
            queue_timeout_s=args.queue_timeout_s,
        )
        limits = serve.Limits(
            max_image_bytes=args.max_image_bytes,
            max_image_pixels=sizes.max_pixels,
            max_image_side=sizes.max_side,
            max_image_aspect_ratio=sizes.max_aspect_ratio,
            max_new_tokens=args.max_new_tokens,
            image_root=args.image_root,
            max_body_bytes=args.max_body_bytes,
            max_prompt_chars=args.max_prompt_chars,
            front=front,
            stall_timeout_s=args.stall_timeout_s,
        )
        from clse_fx.deploy.manifest import read_manifest

        batch = read_manifest(Path(args.bundle), verify=False).batch
        concurrency = serve.Concurrency.derive(
            batch,
            args.replicas,
            args.max_ongoing_requests,
            args.max_queued_requests,
            args.batch_wait_ms / 1e3,
            args.max_decodes,
        )
        front.resolved(batch, args.replicas, concurrency.max_queued_requests)  # its one-line errors, before Ray
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, signal.default_int_handler)  # either one stops the service cleanly, even starting
        url = serve.start(
            args.bundle,
            limits,
            address=args.address,
            host=args.host,
            port=args.port,
            replicas=args.replicas,
            num_cpus=args.num_cpus,
            cpus_per_replica=args.cpus_per_replica,
            gpus_per_replica=args.gpus_per_replica,
            threads=args.threads,
            concurrency=concurrency,
        )
    except (ValueError, FileNotFoundError, ConnectionError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # stopped while deploying: take down what was started, quietly
        _stop_quietly(serve, args.address is None)
        print("interrupted: the service was stopped before it started", file=sys.stderr)
        return 130
    print(f"serving {args.bundle} at {url}: POST /generate, GET /health, GET /metadata; Ctrl-C stops", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        _stop_quietly(serve, args.address is None)
    return 0


def _stop_quietly(serve, local: bool) -> None:
    """``serve.stop``, with a second Ctrl-C during the shutdown ignored instead of printing a traceback."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    serve.stop(local=local)
