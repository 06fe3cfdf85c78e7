"""Train the accuracy-proxy LLaVA from scratch on streamed procedural VQA.

    OMP_NUM_THREADS=1 python -m clse_fx.proxy.train --out clse_fx/assets/proxy_llava --seed 0

(the defaults are the shipped run, about 45 minutes on one CPU thread; one thread keeps it bit-reproducible).

Phase 1 trains the vision tower and projector alone on per-patch targets (objectness, colour, shape, object
centre, grid row and column), as LLaVA starts from a pretrained CLIP. Phase 2 trains everything end to end
with AdamW and a warmup + cosine schedule. Its loss is the cross-entropy of every answer word in sequences
that ask several questions about one image: the first question is laid out exactly as the compiled engines
receive it (:func:`clse_fx.proxy.model.encode`), the others follow it. The per-patch loss stays on, and a
lookup loss supervises a middle decoder layer at the questions' shape and colour words. The checkpoint with
the best validation accuracy is saved, with ``training.json`` (command, seed, steps, time, accuracies per
question type).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from clse_fx.proxy import data
from clse_fx.proxy.evaluate import accuracy_report
from clse_fx.proxy.model import answer_ids, build_tokenizer, encode, pixel_values, proxy_config, save


def _batch(tokenizer, items: list[data.Item], num_visual: int) -> dict[str, torch.Tensor]:
    feeds = encode(tokenizer, [i.image for i in items], [i.question for i in items], num_visual)
    return {name: torch.from_numpy(value) for name, value in feeds.items()}


def training_batch(
    tokenizer, items: list[data.Item], follow_ups: list[list[tuple[str, str]]], num_visual: int
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, list[tuple[int, int, str]]]:
    """Feeds for several questions per image: (feeds, [2, N] (row, position) of every token to predict (each
    answer word and the end-of-sequence token after it), the N target ids, and (row, position, word) of every
    question word).

    The first question is laid out exactly as the engines receive it (:func:`encode`); each row goes on with
    "answer </s> user : question assistant : answer </s> ..." after it, right padded. Causal attention keeps
    the first answer's logits identical to the engine's, and the follow-ups add supervision for the same image
    pass. The EOS targets teach the model to stop after its one-word answer, so generation ends on its own.
    """
    base = encode(tokenizer, [i.image for i in items], [i.question for i in items], num_visual)
    length = base["input_ids"].shape[1]
    tails, answer_positions, question_words = [], [], []
    for row, (item, pairs) in enumerate(zip(items, follow_ups)):
        first = item.question.split()
        question_words += [(row, length - 2 - len(first) + i, word) for i, word in enumerate(first)]
        eos = tokenizer.eos_token
        # The logits before each answer predict it; the answer's own logits predict the EOS after it.
        words, positions = [item.answer, eos], [length - 1, length]
        for question, answer in pairs:
            asked = question.split()
            words += ["user", ":"]
            question_words += [(row, length + len(words) + i, word) for i, word in enumerate(asked)]
            words += [*asked, "assistant", ":", answer, eos]
            positions += [length + len(words) - 3, length + len(words) - 2]
        tails.append(tokenizer.convert_tokens_to_ids(words))
        answer_positions.append(positions)
    input_ids = np.full((len(items), length + max(map(len, tails))), tokenizer.pad_token_id, dtype=np.int64)
    attention_mask = np.zeros_like(input_ids)
    input_ids[:, :length], attention_mask[:, :length] = base["input_ids"], base["attention_mask"]
    rows, positions = [], []
    for row, (tail, answers) in enumerate(zip(tails, answer_positions)):
        input_ids[row, length : length + len(tail)] = tail
        attention_mask[row, length : length + len(tail)] = 1
        rows += [row] * len(answers)
        positions += answers
    feeds = {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": base["pixel_values"]}
    index = (torch.tensor(rows), torch.tensor(positions))
    targets = torch.from_numpy(input_ids)[index[0], index[1] + 1]
    return {k: torch.from_numpy(v) for k, v in feeds.items()}, torch.stack(index), targets, question_words


@torch.no_grad()
def predict(model, tokenizer, items: list[data.Item], batch: int = 50) -> list[str]:
    """Eager greedy answer word for each item (argmax over the whole vocabulary, decoded)."""
    return [word for word, _ in predict_with_stop(model, tokenizer, items, batch)]


@torch.no_grad()
def predict_with_stop(model, tokenizer, items: list[data.Item], batch: int = 50) -> list[tuple[str, bool]]:
    """Eager greedy answer word for each item, and whether the greedy token after it is the EOS token."""
    num_visual = (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2
    answers = []
    for start in range(0, len(items), batch):
        feeds = _batch(tokenizer, items[start : start + batch], num_visual)
        word = model(**feeds, logits_to_keep=1).logits[:, -1].argmax(-1)
        feeds["input_ids"] = torch.cat([feeds["input_ids"], word[:, None]], dim=1)
        feeds["attention_mask"] = torch.cat([feeds["attention_mask"], torch.ones_like(word[:, None])], dim=1)
        after = model(**feeds, logits_to_keep=1).logits[:, -1].argmax(-1)
        stops = (after == tokenizer.eos_token_id).tolist()
        answers += list(zip(tokenizer.convert_ids_to_tokens(word.tolist()), stops))
    return answers


def curriculum(step: int, steps: int) -> tuple[int, int]:
    """(min, max) objects per training scene: from one object up to the test distribution (2..4) at 20%."""
    most = 1 + int(3 * min(1.0, step / (0.2 * steps)))
    return (1, most) if most < 4 else (2, 4)


COLOUR_IDS = {colour: i for i, colour in enumerate(data.COLOURS)}  # class index of each colour in both heads
COLOUR_LOGITS = slice(1, 1 + len(data.COLOURS))
SHAPE_LOGITS = slice(COLOUR_LOGITS.stop, COLOUR_LOGITS.stop + len(data.SHAPES))
CENTRE_LOGIT = SHAPE_LOGITS.stop


def aux_outputs(grid: int) -> int:
    """Width of the per-patch auxiliary head: objectness, colour, shape, object centre, grid row, grid column."""
    return CENTRE_LOGIT + 1 + 2 * grid


def patch_labels(items: list[data.Item], grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-patch targets [B, grid * grid] of the auxiliary losses: the class of each patch (0 = background,
    else 1 + the (colour, shape) index of the object covering most of it, at least a quarter), and whether the
    patch holds an object's centre (one token per object, which makes counting objects learnable)."""
    labels = np.zeros((len(items), grid * grid), dtype=np.int64)
    centres = np.zeros((len(items), grid * grid), dtype=np.float32)
    cell = data.IMAGE_SIZE // grid
    for row, item in enumerate(items):
        best = np.full(grid * grid, 0.25)
        for shape in item.shapes:
            cover = data.shape_mask(shape).reshape(grid, cell, grid, cell).mean((1, 3)).reshape(-1)
            label = 1 + COLOUR_IDS[shape.colour] * len(data.SHAPES) + data.SHAPES.index(shape.kind)
            better = cover > best
            labels[row, better], best[better] = label, cover[better]
            centres[row, int(shape.y // cell) * grid + int(shape.x // cell)] = 1.0
    return torch.from_numpy(labels), torch.from_numpy(centres)


def aux_loss(logits: torch.Tensor, items: list[data.Item], grid: int) -> torch.Tensor:
    """Per-patch auxiliary loss on [B, grid * grid, aux_outputs(grid)] logits: objectness, grid row and grid
    column over every patch; colour, shape and centre over object patches only (averaged separately, so the
    ~90% background patches do not drown the shape signal, which a tiny ViT otherwise learns very slowly).
    The row and column targets keep each token's position in its features: CLIP's position embedding alone
    does not survive to the projector output, and side questions need it."""
    labels, centres = patch_labels(items, grid)
    objects = labels > 0
    colour, shape = (labels[objects] - 1) // len(data.SHAPES), (labels[objects] - 1) % len(data.SHAPES)
    inside = logits[objects]
    cells = torch.arange(grid * grid).expand_as(labels).reshape(-1)
    rows, columns = logits[..., CENTRE_LOGIT + 1 :].reshape(-1, 2 * grid).split(grid, dim=-1)
    f = torch.nn.functional
    return (
        f.binary_cross_entropy_with_logits(logits[..., 0], objects.float())
        + f.cross_entropy(inside[:, COLOUR_LOGITS], colour)
        + f.cross_entropy(inside[:, SHAPE_LOGITS], shape)
        + f.binary_cross_entropy_with_logits(inside[:, CENTRE_LOGIT], centres[objects])
        + f.cross_entropy(rows, cells // grid)
        + f.cross_entropy(columns, cells % grid)
    )


LOOKUP_SIZES = {"present": 2, "colour": len(data.COLOURS), "horizontal": 2, "vertical": 2, "match": 2, "count": 5}
LOOKUP_OUTPUTS = sum(LOOKUP_SIZES.values())


def lookup_targets(items: list[data.Item], question_words: list[tuple[int, int, str]]) -> dict[str, torch.Tensor]:
    """What each shape or colour word of the questions refers to in its scene (-100 where undefined).

    At a shape word: whether the shape is present, its colour, its halves of the image, and (after a colour
    word, as in "is there a blue square") whether that colour and shape are present together. At a colour
    word: how many shapes have that colour."""
    targets: dict[str, list[int]] = {name: [] for name in LOOKUP_SIZES}
    index = []
    previous: dict[tuple[int, int], str] = {(row, position): word for row, position, word in question_words}
    for row, position, word in question_words:
        shapes = items[row].shapes
        if word in data.SHAPES:
            match = next((s for s in shapes if s.kind == word), None)  # shapes in a scene are distinct
            before = previous.get((row, position - 1))
            found = {
                "present": int(match is not None),
                "colour": COLOUR_IDS[match.colour] if match else -100,
                "horizontal": int(match.x >= data.IMAGE_SIZE / 2) if match else -100,
                "vertical": int(match.y >= data.IMAGE_SIZE / 2) if match else -100,
                "match": int(match is not None and match.colour == before) if before in data.COLOURS else -100,
            }
        elif word in data.COLOURS:
            found = {"count": sum(s.colour == word for s in shapes)}
        else:
            continue
        index.append((row, position))
        for name in LOOKUP_SIZES:
            targets[name].append(found.get(name, -100))
    return {"index": torch.tensor(index).T, **{name: torch.tensor(value) for name, value in targets.items()}}


def lookup_loss(logits: torch.Tensor, targets: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy of [N, LOOKUP_OUTPUTS] logits at the question's shape and colour words against
    :func:`lookup_targets`. Supervising this one-hop lookup mid-decoder breaks the long plateau a tiny decoder
    otherwise sits on before it learns to find an object among 256 visual tokens (with ground-truth visual
    features it was still at 41-51% validation after 500 steps without it, colour and side at 100% with it)."""
    parts = logits.split(list(LOOKUP_SIZES.values()), dim=-1)
    return sum(
        torch.nn.functional.cross_entropy(part, targets[name], ignore_index=-100)
        for part, name in zip(parts, LOOKUP_SIZES)
    )


def _optimizer(params: list[torch.nn.Parameter], lr: float, steps: int) -> tuple:
    """AdamW (no decay on gains and biases) with a linear warmup and a cosine decay to 5%."""
    decay = [p for p in params if p.dim() > 1]
    no_decay = [p for p in params if p.dim() <= 1]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}], lr=lr
    )
    warmup = min(300, steps // 10)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def _step(loss: torch.Tensor, params: list[torch.nn.Parameter], optimizer, scheduler) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    scheduler.step()


def train(args: argparse.Namespace) -> dict:
    """Run the training loop; returns the training record (also written next to the checkpoint)."""
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(args.seed)
    tokenizer = build_tokenizer()
    config = proxy_config(num_layers=args.layers, hidden_size=args.hidden)
    # --init fine-tunes a trained checkpoint (same config) instead of starting from random weights.
    model = (
        LlavaForConditionalGeneration.from_pretrained(args.init) if args.init else LlavaForConditionalGeneration(config)
    )
    num_visual = (config.vision_config.image_size // config.vision_config.patch_size) ** 2
    grid = config.vision_config.image_size // config.vision_config.patch_size
    # Auxiliary head (not saved) on the projector output: per-patch objectness, colour, shape, object
    # centre and grid position. Phase 1 trains the vision tower and projector on it alone (as LLaVA starts from a
    # pretrained CLIP); phase 2 trains everything on the answers, keeping the auxiliary loss.
    aux_head = torch.nn.Linear(config.text_config.hidden_size, aux_outputs(grid))
    # Lookup head (not saved) on decoder layer --lookup-layer's output at the questions' shape and colour words.
    lookup_head = torch.nn.Linear(config.text_config.hidden_size, LOOKUP_OUTPUTS)
    projected: dict[str, torch.Tensor] = {}
    model.model.multi_modal_projector.register_forward_hook(lambda mod, inp, out: projected.update(out=out))
    rng = np.random.default_rng(args.seed + 1000)  # training data: its own stream, disjoint from val/test
    start = time.perf_counter()
    vision = list(model.model.vision_tower.parameters()) + list(model.model.multi_modal_projector.parameters())
    vision += list(aux_head.parameters())
    optimizer, scheduler = _optimizer(vision, args.vision_lr, args.vision_steps)
    for step in range(args.vision_steps):
        items = [data.make_item(rng) for _ in range(args.vision_batch)]
        pixels = torch.from_numpy(pixel_values([i.image for i in items]))
        model.model.get_image_features(pixel_values=pixels)
        loss = aux_loss(aux_head(projected["out"]), items, grid)
        _step(loss, vision, optimizer, scheduler)
        if step % 100 == 0:
            print(f"vision step {step} loss {loss.item():.4f} {time.perf_counter() - start:.0f}s", flush=True)
    params = list(model.parameters()) + list(aux_head.parameters()) + list(lookup_head.parameters())
    optimizer, scheduler = _optimizer(params, args.lr, args.steps)
    val = data.make_split("val")
    out = Path(args.out)
    best, history = -1.0, []
    for step in range(args.steps):
        model.train()
        objects = (2, 4) if args.init else curriculum(step, args.steps)  # a trained model sees the test distribution
        items = [data.make_item(rng, objects=objects) for _ in range(args.batch)]
        follow_ups = [data.follow_up_questions(rng, i.shapes, args.questions - 1) for i in items]
        feeds, (rows, positions), targets, question_words = training_batch(tokenizer, items, follow_ups, num_visual)
        outputs = model(**feeds, output_hidden_states=bool(args.lookup_weight))
        # Summed over answers and EOS targets, averaged over answers: the (easily learnt) EOS targets add to
        # the answer loss instead of halving its weight against the auxiliary losses.
        answers = (targets != tokenizer.eos_token_id).sum()
        loss = torch.nn.functional.cross_entropy(outputs.logits[rows, positions], targets, reduction="sum") / answers
        if args.lookup_weight:
            lookup = lookup_targets(items, question_words)
            hidden = outputs.hidden_states[args.lookup_layer][lookup["index"][0], lookup["index"][1]]
            loss = loss + args.lookup_weight * lookup_loss(lookup_head(hidden), lookup)
        if args.aux_weight:
            loss = loss + args.aux_weight * aux_loss(aux_head(projected["out"]), items, grid)
        _step(loss, params, optimizer, scheduler)
        if step % 50 == 0:
            print(f"step {step} loss {loss.item():.4f} {time.perf_counter() - start:.0f}s", flush=True)
        last = step == args.steps - 1
        if (step + 1) % args.eval_every == 0 or last:
            model.eval()
            report = accuracy_report(predict(model, tokenizer, val), val)
            history.append({"step": step + 1, "val": report["overall"], "seconds": time.perf_counter() - start})
            print(f"step {step + 1} val {json.dumps(report)}", flush=True)
            if report["overall"] > best:
                best = report["overall"]
                save(model.eval(), out)
                _write_record(out, args, step + 1, start, report, history)
        if args.max_minutes and time.perf_counter() - start > args.max_minutes * 60:
            print(f"stopping at step {step + 1}: --max-minutes {args.max_minutes} reached", flush=True)
            break
    model = LlavaForConditionalGeneration.from_pretrained(out).eval()
    test = data.make_split("test")
    record = json.loads((out / "training.json").read_text())
    answers = predict_with_stop(model, tokenizer, test)
    record["test"] = accuracy_report([word for word, _ in answers], test)
    record["test"]["stops_after_answer"] = sum(stop for _, stop in answers) / len(answers)
    record["history"] = history
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def _write_record(out: Path, args: argparse.Namespace, step: int, start: float, val: dict, history: list) -> None:
    record = {
        "command": "python -m clse_fx.proxy.train " + " ".join(sys.argv[1:]),
        "seed": args.seed,
        "init": args.init,  # the checkpoint fine-tuned (its own record under "base"), or None from scratch
        "base": json.loads((Path(args.init) / "training.json").read_text()) if args.init else None,
        "steps_planned": args.steps,
        "checkpoint_step": step,
        "batch": args.batch,
        "lr": args.lr,
        "questions_per_image": args.questions,
        "vision_steps": args.vision_steps,
        "vision_batch": args.vision_batch,
        "vision_lr": args.vision_lr,
        "aux_weight": args.aux_weight,
        "lookup_weight": args.lookup_weight,
        "lookup_layer": args.lookup_layer,
        "train_seconds": round(time.perf_counter() - start, 1),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "val": val,
        "history": history,
        "answers": sorted(answer_ids(build_tokenizer())),
    }
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(prog="python -m clse_fx.proxy.train", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="checkpoint directory to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=2400)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--questions", type=int, default=6, help="questions per training image (first: engine layout)")
    parser.add_argument("--vision-steps", type=int, default=2000, help="phase 1: vision tower steps")
    parser.add_argument("--vision-batch", type=int, default=32, help="phase 1: images per step")
    parser.add_argument("--vision-lr", type=float, default=2e-3, help="phase 1: peak learning rate")
    parser.add_argument("--lr", type=float, default=1.5e-3)
    parser.add_argument("--layers", type=int, default=6, help="decoder layers")
    parser.add_argument("--hidden", type=int, default=128, help="decoder hidden size")
    parser.add_argument("--aux-weight", type=float, default=0.5, help="weight of the per-patch auxiliary loss")
    parser.add_argument("--lookup-weight", type=float, default=1.0, help="weight of the mid-decoder lookup loss")
    parser.add_argument("--lookup-layer", type=int, default=3, help="hidden state (0 = embeddings) it reads")
    parser.add_argument("--eval-every", type=int, default=300)
    parser.add_argument("--max-minutes", type=float, default=0.0, help="stop early after this long (0 = never)")
    parser.add_argument("--init", help="fine-tune this trained checkpoint instead of training from scratch")
    args = parser.parse_args(argv)
    record = train(args)
    print(json.dumps({k: record[k] for k in ("checkpoint_step", "val", "test")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
