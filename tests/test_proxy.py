"""The accuracy proxy: shipped checkpoint, data generator, accuracy code, plans and the explanation PNG."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from clse_fx.demo import proxy_model_dir
from clse_fx.proxy import data
from clse_fx.proxy.evaluate import accuracy_by_band, accuracy_report, plans, run_engine
from clse_fx.proxy.model import build_tokenizer, encode, prompt


def _item(kind: str, answer: str, y: float | None = None) -> data.Item:
    target = None if y is None else data.Shape("circle", "red", 10.0, y, 5.0)
    return data.Item(np.zeros((64, 64, 3), np.uint8), (), "q ?", answer, kind, target)


# Hand-checked: 4 of 6 right; colour 1/2, exists 1/1, side 1/2, count 1/1.
FIXTURE = [
    (_item("colour", "red", y=3.0), "red"),
    (_item("colour", "blue", y=60.0), "green"),
    (_item("exists", "yes", y=20.0), " Yes "),
    (_item("side", "left", y=8.0), "right"),
    (_item("side", "top", y=5.0), "top"),
    (_item("count", "two"), "two"),
]


def test_shipped_checkpoint_loads_through_from_pretrained():
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    path = proxy_model_dir()
    model = LlavaForConditionalGeneration.from_pretrained(path)
    processor = AutoProcessor.from_pretrained(path)
    vision = model.config.vision_config
    assert (vision.image_size // vision.patch_size) ** 2 == 256
    assert sum(f.stat().st_size for f in path.iterdir()) < 20e6
    record = json.loads((path / "training.json").read_text())
    assert record["command"].startswith("python -m clse_fx.proxy.train") and "seed" in record
    # Training-time inputs are exactly what the processor (and so Engine.encode) produces.
    item = data.make_split("test", 1)[0]
    ours = encode(processor.tokenizer, [item.image], [item.question], 256)
    theirs = processor(images=[Image.fromarray(item.image)], text=prompt(item.question), return_tensors="np")
    length = int(ours["attention_mask"].sum())
    assert np.array_equal(ours["input_ids"][0, -length:], theirs["input_ids"][0])
    assert np.allclose(ours["pixel_values"], theirs["pixel_values"], atol=1e-6)


def _answer_from_scene(question: str, shapes: tuple[data.Shape, ...]) -> str:
    """The answer read off the drawn shapes (an independent re-derivation of the generator's answers)."""
    words = question.split()
    if words[:2] == ["what", "colour"]:
        return next(s.colour for s in shapes if words[-2] == s.kind)
    if words[:2] == ["is", "there"]:
        return "yes" if any((s.colour, s.kind) == tuple(words[3:5]) for s in shapes) else "no"
    if words[:2] == ["how", "many"]:
        return data.NUMBERS[sum(s.colour == words[2] for s in shapes)]
    target = next(s for s in shapes if s.kind == words[2])
    if "left" in words:
        return "left" if target.x < 32 else "right"
    return "top" if target.y < 32 else "bottom"


def test_splits_are_deterministic_and_answers_match_the_scene():
    first, second = data.make_split("test", 24), data.make_split("test", 24)
    assert [i.question for i in first] == [i.question for i in second]
    assert all(np.array_equal(a.image, b.image) for a, b in zip(first, second))
    assert data.make_split("val", 4)[0].question != first[0].question or not np.array_equal(
        data.make_split("val", 4)[0].image, first[0].image
    )
    for item in first:
        assert item.answer == _answer_from_scene(item.question, item.shapes)
    # The test split's queried objects cycle over the 4x4 cells of the image.
    cells = [int(i.target.y // 16) * 4 + int(i.target.x // 16) for i in first[:4] if i.target is not None]
    assert all(cell == 0 for cell in cells)


def test_render_draws_the_shape_in_its_colour():
    shape = data.Shape("square", "blue", 32.0, 32.0, 6.0)
    image = data.render((shape,), np.random.default_rng(0))
    assert np.abs(image[32, 32].astype(int) - np.array(data.COLOURS["blue"])).max() <= 20
    assert data.shape_mask(shape).sum() == pytest.approx((2 * 6 * 0.85) ** 2, rel=0.2)


def test_accuracy_on_a_hand_checked_fixture():
    items, predictions = [i for i, _ in FIXTURE], [p for _, p in FIXTURE]
    report = accuracy_report(predictions, items)
    assert report["overall"] == pytest.approx(4 / 6)
    assert report["by_type"] == {"colour": 0.5, "exists": 1.0, "side": 0.5, "count": 1.0}
    correct = [p.strip().lower() == i.answer for i, p in FIXTURE]
    # 4 bands of a 16x16 grid's rows (16 px each): y 3, 5, 8 -> band 0 (2 of 3 right); y 20 -> band 1 (right);
    # no queried object in band 2; y 60 -> band 3 (wrong); the count question has no queried object.
    assert accuracy_by_band(correct, items, grid=16) == [pytest.approx(2 / 3), 1.0, None, 0.0]
    with pytest.raises(ValueError, match="one per question"):
        accuracy_report(predictions[:2], items)


class FakeEngine:
    """Stands in for an ONNX prefill engine: fixed answers per row and kept ids per stage."""

    def __init__(self, tokenizer, answers: list[str]) -> None:
        self.ids = tokenizer.convert_tokens_to_ids(answers)
        self.calls = 0

    def run(self, **feeds):
        batch = len(feeds["input_ids"])
        rows = self.ids[self.calls * batch : (self.calls + 1) * batch]
        rows += [rows[-1]] * (batch - len(rows))
        self.calls += 1
        logits = np.zeros((batch, 3, 50), np.float32)
        logits[np.arange(batch), -1, rows] = 1.0
        kept = [np.tile([0, 5], (batch, 1)), np.tile([5], (batch, 1))]
        return [logits, None, *kept, np.ones(batch, bool)]  # no cache; every row valid


def test_run_engine_scores_answers_and_counts_kept_tokens_without_padding_rows():
    tokenizer = build_tokenizer()
    items, predictions = [i for i, _ in FIXTURE], [p.strip().lower() for _, p in FIXTURE]
    feeds = [{"input_ids": np.zeros((4, 3))}, {"input_ids": np.zeros((4, 3))}]  # 6 questions + 2 padding rows
    words, counts = run_engine(FakeEngine(tokenizer, predictions), feeds, 6, 2, 16, tokenizer)
    assert accuracy_report(words, items)["overall"] == pytest.approx(4 / 6)
    assert counts[0, 0] == 6 and counts[0, 5] == 6 and counts[1, 5] == 6 and counts.sum() == 18


def test_plans_match_the_budget_at_the_proxy_geometry():
    found = plans(6, 256, 1 / 9)
    assert found["3-stage"] == [(1, 48), (2, 31), (4, 9)]  # 28 = 64/576 of 256 tokens, x [1.72, 1.09, 0.32]
    (layer, keep), total = found["1-stage"][0], 256 + 48 + 31 + 31 + 9 + 9
    assert layer == 1 and abs(256 + 5 * keep - total) <= 3  # the same average visual tokens per layer


def test_explain_writes_a_png_of_the_right_size(tmp_path):
    from clse_fx.deploy.explain import overlay_png

    image = np.random.default_rng(0).random((64, 64, 3))
    path = overlay_png(image, [np.arange(0, 256, 3), np.array([5, 17])], (16, 16), tmp_path / "explain.png")
    with Image.open(path) as png:
        assert png.format == "PNG" and png.size == (900, 330)


def test_explain_legend_ties_each_stage_to_the_layers_that_see_its_tokens(tmp_path):
    from clse_fx.deploy.explain import layer_spans, overlay_png

    assert layer_spans([1, 2, 4], 6) == ["layer 1", "layers 2-3", "layers 4-5"]
    image = np.random.default_rng(0).random((64, 64, 3))
    kept = [np.arange(0, 256, 3), np.arange(0, 256, 9), np.array([5, 17])]
    path = overlay_png(image, kept, (16, 16), tmp_path / "explain.png", [1, 2, 4], 6)
    with Image.open(path) as png:
        assert png.size == (1200, 365)  # a line more for the legend


def test_follow_up_questions_are_answered_by_their_scene():
    rng = np.random.default_rng(0)
    for item in data.make_split("val", 20):
        pairs = data.follow_up_questions(rng, item.shapes, 5)
        assert len(pairs) == 5
        assert all(answer == _answer_from_scene(question, item.shapes) for question, answer in pairs)


def test_training_batch_first_answer_is_read_in_the_engine_layout():
    import torch
    from transformers import LlavaForConditionalGeneration

    from clse_fx.proxy.model import proxy_config
    from clse_fx.proxy.train import training_batch

    tokenizer, rng = build_tokenizer(), np.random.default_rng(1)
    items = data.make_split("val", 3)
    follow_ups = [data.follow_up_questions(rng, i.shapes, 2) for i in items]
    feeds, (rows, positions), targets, question_words = training_batch(tokenizer, items, follow_ups, 256)
    answers = [[item.answer] + [a for _, a in pairs] for item, pairs in zip(items, follow_ups)]
    expected = [token for row in answers for answer in row for token in (answer, "</s>")]
    assert tokenizer.convert_ids_to_tokens(targets.tolist()) == expected
    assert rows.tolist() == [0] * 6 + [1] * 6 + [2] * 6
    # Each EOS is predicted from its answer's position, and the answer token sits there.
    assert (positions[1::2] == positions[::2] + 1).all()
    assert (feeds["input_ids"][rows[1::2], positions[1::2]] == targets[::2]).all()
    asked = [[] for _ in items]  # every question's words, found at their recorded positions
    for row, position, word in question_words:
        assert tokenizer.convert_ids_to_tokens([int(feeds["input_ids"][row, position])]) == [word]
        asked[row].append(word)
    assert [" ".join(words) for words in asked] == [
        " ".join([item.question] + [q for q, _ in pairs]) for item, pairs in zip(items, follow_ups)
    ]
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(proxy_config(num_layers=2, hidden_size=64)).eval()
    engine_layout = {
        k: torch.from_numpy(v)
        for k, v in encode(tokenizer, [i.image for i in items], [i.question for i in items], 256).items()
    }
    with torch.no_grad():
        first = model(**feeds).logits[rows[::6], positions[::6]]
        alone = model(**engine_layout).logits[:, -1]
    assert positions[::6].tolist() == [engine_layout["input_ids"].shape[1] - 1] * 3
    assert torch.allclose(first, alone, atol=1e-5)


def test_aux_targets_mark_one_centre_per_object_and_score_a_perfect_prediction_near_zero():
    import torch

    from clse_fx.proxy.train import CENTRE_LOGIT, COLOUR_LOGITS, SHAPE_LOGITS, aux_loss, aux_outputs, patch_labels

    items = data.make_split("val", 4)
    labels, centres = patch_labels(items, 16)
    assert centres.sum(1).tolist() == [len(i.shapes) for i in items]
    assert bool((labels[centres > 0] > 0).all())  # a centre patch is covered by its object
    objects = labels > 0
    colour, shape = (labels - 1) // len(data.SHAPES), (labels - 1) % len(data.SHAPES)
    perfect = torch.full((*labels.shape, aux_outputs(16)), -20.0)
    perfect[..., 0] = torch.where(objects, 20.0, -20.0)
    perfect[..., COLOUR_LOGITS].scatter_(-1, colour.clamp(min=0).unsqueeze(-1), 20.0)
    perfect[..., SHAPE_LOGITS].scatter_(-1, shape.clamp(min=0).unsqueeze(-1), 20.0)
    perfect[..., CENTRE_LOGIT] = torch.where(centres > 0, 20.0, -20.0)
    cells = torch.arange(256)
    perfect[:, cells, CENTRE_LOGIT + 1 + cells // 16] = 20.0  # grid row
    perfect[:, cells, CENTRE_LOGIT + 17 + cells % 16] = 20.0  # grid column
    assert aux_loss(perfect, items, 16).item() < 1e-6
    wrong_shapes = perfect.clone()  # every object patch labelled with the next shape: only that term is wrong
    wrong_shapes[..., SHAPE_LOGITS] = perfect[..., SHAPE_LOGITS].roll(1, -1)
    assert aux_loss(wrong_shapes, items, 16).item() > 1.0
    transposed = perfect.clone()  # rows and columns swapped: only the position terms are wrong
    transposed[..., CENTRE_LOGIT + 1 :] = perfect[..., CENTRE_LOGIT + 1 :].roll(16, -1)
    assert aux_loss(transposed, items, 16).item() > 1.0


def test_lookup_targets_say_what_each_shape_and_colour_word_refers_to():
    import torch

    from clse_fx.proxy.train import LOOKUP_OUTPUTS, lookup_loss, lookup_targets

    scene = (data.Shape("circle", "red", 10.0, 50.0, 6.0), data.Shape("square", "red", 40.0, 12.0, 6.0))
    item = data.Item(np.zeros((64, 64, 3), np.uint8), scene, "is there a blue square ?", "no", "exists", None)
    words = "is there a blue square ? how many red shapes are there ? is the cross".split()
    targets = lookup_targets([item], [(0, 100 + i, word) for i, word in enumerate(words)])
    # Hand-derived: "blue" (count 0), "square" (present, red, right half, top half, no blue square), "red"
    # (count 2), "cross" (absent: nothing else defined).
    assert targets["index"].tolist() == [[0, 0, 0, 0], [103, 104, 108, 115]]
    assert targets["count"].tolist() == [0, -100, 2, -100]
    assert targets["present"].tolist() == [-100, 1, -100, 0]
    assert targets["colour"].tolist() == [-100, 0, -100, -100]
    assert (targets["horizontal"].tolist(), targets["vertical"].tolist()) == (
        [-100, 1, -100, -100],
        [-100, 0, -100, -100],
    )
    assert targets["match"].tolist() == [-100, 0, -100, -100]
    sizes = [2, 5, 2, 2, 2, 5]  # present, colour, horizontal, vertical, match, count
    perfect = torch.full((4, LOOKUP_OUTPUTS), -20.0)
    offsets = np.cumsum([0] + sizes)
    for name, offset in zip(("present", "colour", "horizontal", "vertical", "match", "count"), offsets):
        for row, value in enumerate(targets[name].tolist()):
            if value >= 0:
                perfect[row, offset + value] = 20.0
    assert lookup_loss(perfect, targets).item() < 1e-6
    assert lookup_loss(torch.zeros(4, LOOKUP_OUTPUTS), targets).item() > 1.0
