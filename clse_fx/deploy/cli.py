"""``clse-run``: answer prompts about images or videos with a bundle. Imports only what deploy needs (numpy,
onnxruntime, tokenizers, pillow): no torch, transformers or rich."""

from __future__ import annotations

import argparse
import sys
import warnings


def one_line_warnings() -> None:
    """Show warnings (e.g. a GPU bundle falling back to the CPU) as one ``warning:`` line, without the Python
    source line the default format appends."""

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        print(f"warning: {message}", file=file or sys.stderr)

    warnings.showwarning = show


def _run_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clse-run", description="Answer a prompt about an image or a video with a bundle (no torch needed)."
    )
    parser.add_argument("bundle", help="bundle directory written by clse-compile")
    media = parser.add_mutually_exclusive_group(required=True)
    media.add_argument("--image", action="append", help="image file (repeat for several prompts)")
    media.add_argument(
        "--video", action="append", help="folder of frames or animated GIF/WebP (repeat for several prompts)"
    )
    parser.add_argument("--prompt", action="append", required=True, help="prompt text (one per --image/--video)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    parser.add_argument("--json", action="store_true", help="print token ids, text and timings as one JSON object")
    return parser


def run_main(argv: list[str] | None = None) -> int:
    args = _run_parser().parse_args(argv)
    one_line_warnings()
    import json

    from clse_fx.deploy.preprocess.media import load_image, load_video

    kind, paths = ("video", args.video) if args.video else ("image", args.image)
    try:
        if len(paths) != len(args.prompt):
            raise ValueError(
                f"got {len(paths)} --{kind} and {len(args.prompt)} --prompt; pass one of each per question"
            )
        from clse_fx.deploy.engine import Engine, SamplingConfig

        sampling = SamplingConfig(do_sample=args.sample, temperature=args.temperature, top_k=args.top_k, seed=args.seed)
        engine = Engine.load(args.bundle)
        modality = engine.preprocessor.modality if engine.preprocessor else kind
        if modality != kind:
            raise ValueError(f"this bundle was compiled for {modality} prompts; pass --{modality}")
        if kind == "video":
            media = [load_video(path, engine.preprocessor.frames) for path in paths]
        else:
            media = [load_image(path).convert("RGB") for path in paths]
        results = engine.generate(
            media, args.prompt, max_new_tokens=args.max_new_tokens, sampling=sampling, chat=args.chat
        )
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    asked = list(zip(paths, args.prompt))
    if args.json:
        rows = [
            {kind: image, "prompt": prompt, "token_ids": r.token_ids, "text": r.text, "timings": vars(r.timings)}
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
