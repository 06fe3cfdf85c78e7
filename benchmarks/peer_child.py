"""One measurement of ``benchmarks/peer_cpu.py`` in a fresh process, and the peer's weight check.

Runs under either environment, so it imports only the standard library at the top:

    python benchmarks/peer_child.py clse BUNDLE IMAGE                 (clse-fx's environment)
    PEER_PYTHON benchmarks/peer_child.py openvino MODEL_DIR IMAGE [--pruning-ratio 67]   (the peer's)
    PEER_PYTHON benchmarks/peer_child.py check CHECKPOINT REFERENCE.npz OPENVINO_DIR      (the peer's)

A measurement loads the model (timed), answers the prompt once to warm up (2 tokens), then answers it once
more with exactly ``NEW_TOKENS`` new tokens (end-of-sequence ignored on both sides) and prints one JSON line:
load_s, ttft_ms, decode_tokens_per_s, new_tokens, prompt_tokens, peak_rss_mib. TTFT is the wall time from the
call to its first token (text and pixel preprocessing, vision tower, prefill, first pick); decode tokens/s is
(new_tokens - 1) over the time from the first token to the last. Peak RSS is the process's own high-water mark
(getrusage) after everything, load included.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import time

PROMPT = "What is in the picture?"
NEW_TOKENS = 32


def peak_rss_mib() -> float:
    """This process's VmHWM (Linux's ``ru_maxrss`` carries the parent's peak over fork and exec), in MiB; written
    out rather than imported from clse_fx: OpenVINO's children run in the peer's own environment."""
    status = open("/proc/self/status").read().splitlines()
    return next(int(line.split()[1]) for line in status if line.startswith("VmHWM")) / 1024


def measure_clse(bundle: str, image_path: str) -> dict:
    """clse-fx as clse-run runs it: Engine.load, then Engine.generate with no stop tokens."""
    from clse_fx.deploy.engine import Engine
    from clse_fx.deploy.preprocess.media import as_rgb, load_image

    image = as_rgb(load_image(image_path))
    start = time.perf_counter()
    engine = Engine.load(bundle)
    load_s = time.perf_counter() - start
    chat = engine.preprocessor.text.chat_prefix is not None  # as the peer, which applies the chat template
    prompt_tokens = int(engine.encode([image], [PROMPT], chat)["attention_mask"].sum())
    engine.generate([image], [PROMPT], max_new_tokens=2, stop_token_ids=[], chat=chat)
    start = time.perf_counter()
    [answer] = engine.generate([image], [PROMPT], max_new_tokens=NEW_TOKENS, stop_token_ids=[], chat=chat)
    total_ms = (time.perf_counter() - start) * 1e3
    decode_ms = answer.timings.decode_ms_per_token * (len(answer.token_ids) - 1)
    return {
        "load_s": load_s,
        "ttft_ms": total_ms - decode_ms,
        "decode_tokens_per_s": 1e3 / answer.timings.decode_ms_per_token,
        "new_tokens": len(answer.token_ids),
        "prompt_tokens": prompt_tokens,
        "compiled_tokens": engine.sequence_length,  # the static prompt length (left padding fills the rest)
        "own_prefill_ms": answer.timings.prefill_ms,
        "peak_rss_mib": peak_rss_mib(),
    }


def measure_openvino(model_dir: str, image_path: str, pruning_ratio: int | None) -> dict:
    """OpenVINO GenAI's VLMPipeline on the CPU with its defaults (paged attention, the plugin's default inference
    precision) except prefix caching, which is turned off: it would serve the repeated prompt from cache."""
    import numpy as np
    import openvino as ov
    import openvino_genai as genai
    from PIL import Image

    image = ov.Tensor(np.asarray(Image.open(image_path).convert("RGB"))[None])
    scheduler = genai.SchedulerConfig()  # VLMPipeline's latency-oriented default, less prefix caching
    scheduler.max_num_batched_tokens = 2**63 - 1
    scheduler.enable_prefix_caching = False
    start = time.perf_counter()
    pipe = genai.VLMPipeline(model_dir, "CPU", scheduler_config=scheduler)
    load_s = time.perf_counter() - start

    def config(tokens: int):
        settings = genai.GenerationConfig()
        settings.max_new_tokens = settings.min_new_tokens = tokens
        settings.ignore_eos = True
        if pruning_ratio:
            settings.pruning_ratio = pruning_ratio
        return settings

    class TokenTimes(genai.StreamerBase):
        """The time each new token reaches the caller (a token-id streamer: no detokenization delay)."""

        def __init__(self) -> None:
            super().__init__()
            self.times: list[float] = []

        def write(self, token):
            self.times += [time.perf_counter()] * (len(token) if isinstance(token, list) else 1)
            return genai.StreamingStatus.RUNNING

        def end(self) -> None:
            pass

    pipe.generate(PROMPT, images=[image], generation_config=config(2))
    streamer = TokenTimes()
    start = time.perf_counter()
    result = pipe.generate(PROMPT, images=[image], generation_config=config(NEW_TOKENS), streamer=streamer)
    times = streamer.times
    metrics = result.perf_metrics
    return {
        "load_s": load_s,
        "ttft_ms": (times[0] - start) * 1e3,
        "decode_tokens_per_s": (len(times) - 1) / (times[-1] - times[0]),
        "new_tokens": int(metrics.get_num_generated_tokens()),
        "prompt_tokens": int(metrics.get_num_input_tokens()),
        "own_ttft_ms": metrics.get_ttft().mean,
        "own_tpot_ms": metrics.get_tpot().mean,
        "peak_rss_mib": peak_rss_mib(),
    }


def check_peer(checkpoint: str, reference: str, openvino_dir: str) -> dict:
    """Whether the peer's transformers loads every weight of ``checkpoint`` (its loading report, and the last
    logits on the reference inputs against those clse-fx's transformers computed), and whether the exported
    OpenVINO model computes the same in float32 (its f32 inference hint, against the checkpoint with its weights
    rounded to float16 as the export stores them)."""
    import numpy as np
    import torch
    import transformers
    from optimum.intel import OVModelForVisualCausalLM
    from transformers import AutoModelForImageTextToText

    transformers.utils.logging.disable_progress_bar()
    saved = np.load(reference)
    model, info = AutoModelForImageTextToText.from_pretrained(
        checkpoint, output_loading_info=True, attn_implementation="sdpa"
    )
    accepted = inspect.signature(model.forward).parameters  # the processor of clse-fx's transformers adds some
    inputs = {name: torch.from_numpy(saved[name]) for name in saved.files if name in accepted}
    model.eval()
    with torch.no_grad():
        logits = model(**inputs).logits[:, -1].float().numpy()
        model.half().float()  # the weights as the fp16 export stores them
        rounded = model(**inputs).logits[:, -1].float().numpy()
    openvino = OVModelForVisualCausalLM.from_pretrained(openvino_dir, ov_config={"INFERENCE_PRECISION_HINT": "f32"})
    named = inspect.signature(openvino.forward).parameters
    exported = openvino(**{k: v for k, v in inputs.items() if k in named}).logits[:, -1].float().numpy()

    def compare(ours: np.ndarray, theirs: np.ndarray) -> dict:
        cosine = float((ours * theirs).sum() / np.linalg.norm(ours) / np.linalg.norm(theirs))
        return {
            "max_abs_diff": float(np.abs(ours - theirs).max()),
            "max_abs_logit": float(np.abs(ours).max()),
            "cosine": cosine,
            "same_top1": bool((ours.argmax(-1) == theirs.argmax(-1)).all()),
        }

    return {
        "peer_transformers": transformers.__version__,
        "loading_report": {key: sorted(map(str, value)) for key, value in info.items() if key != "error_msgs"}
        | {"error_msgs": [str(m) for m in info.get("error_msgs", [])]},
        "peer_torch_vs_clse_torch": compare(logits, saved["logits"]),
        "openvino_f32_vs_fp16_rounded_torch": compare(exported, rounded),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/peer_child.py", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    clse = sub.add_parser("clse")
    clse.add_argument("bundle")
    clse.add_argument("image")
    peer = sub.add_parser("openvino")
    peer.add_argument("model_dir")
    peer.add_argument("image")
    peer.add_argument("--pruning-ratio", type=int)
    check = sub.add_parser("check")
    check.add_argument("checkpoint")
    check.add_argument("reference")
    check.add_argument("openvino_dir")
    args = parser.parse_args(argv)
    if args.command == "clse":
        result = measure_clse(args.bundle, args.image)
    elif args.command == "openvino":
        result = measure_openvino(args.model_dir, args.image, args.pruning_ratio)
    else:
        result = check_peer(args.checkpoint, args.reference, args.openvino_dir)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
