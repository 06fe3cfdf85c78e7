"""Procedural visual QA: coloured shapes on textured backgrounds, with questions that need the object's tokens.

Everything is drawn from a seed, so a split is its seed: ``make_split("test")`` always returns the same
questions. Each question has one single-word answer. Question types:

- ``colour``: "what colour is the circle ?" -> red
- ``exists``: "is there a blue square ?" -> yes / no (negatives reuse a present shape or colour, so the
  answer needs the colour bound to the shape)
- ``side``: "is the star on the left or right ?" / "is the star at the top or bottom ?" (objects whose
  centre is within ``SIDE_MARGIN`` px of the dividing line are not asked about: their answer is ambiguous)
- ``count``: "how many red shapes are there ?" -> zero .. three

Shapes in a scene are distinct (so "the circle" is unique); colours may repeat. In the test split the
queried object's centre is stratified over a 4x4 arrangement of image cells, so it covers the whole image
uniformly; every other object is placed uniformly at random.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IMAGE_SIZE = 64
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 35, 35),
    "green": (30, 190, 60),
    "blue": (40, 90, 245),
    "yellow": (240, 220, 30),
    "purple": (170, 50, 215),
}
SHAPES = ("circle", "square", "triangle", "cross")
NUMBERS = ("zero", "one", "two", "three")
QUESTION_TYPES = ("colour", "exists", "side", "count")
SIDE_MARGIN = 3  # px: no left/right (top/bottom) questions about objects centred this close to the middle
SPLIT_SEEDS = {"train": 1, "val": 2, "test": 3}
SPLIT_SIZES = {"val": 400, "test": 600}
ANSWERS = tuple(COLOURS) + ("yes", "no", "left", "right", "top", "bottom") + NUMBERS
WORDS = tuple(
    "user assistant : what colour is the there a on left or right at top bottom how many shapes are ?".split()
) + tuple(dict.fromkeys(SHAPES + ANSWERS))


@dataclass(frozen=True)
class Shape:
    """One drawn object: its kind, colour name, centre (x, y) in pixels and radius."""

    kind: str
    colour: str
    x: float
    y: float
    radius: float


@dataclass(frozen=True)
class Item:
    """One question about one image: the answer word, the type and the queried object (None for counts and
    "no" answers)."""

    image: np.ndarray  # [H, W, 3] uint8
    shapes: tuple[Shape, ...]
    question: str
    answer: str
    kind: str
    target: Shape | None


def shape_mask(shape: Shape, size: int = IMAGE_SIZE) -> np.ndarray:
    """Boolean [size, size] mask of the pixels ``shape`` covers (pixel centres at +0.5)."""
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    dx, dy, r = xx - shape.x, yy - shape.y, shape.radius
    if shape.kind == "circle":
        return dx**2 + dy**2 <= r**2
    if shape.kind == "square":
        side = r * 0.85
        return (np.abs(dx) <= side) & (np.abs(dy) <= side)
    if shape.kind == "triangle":  # apex up, base at +0.8r
        return (dy <= 0.8 * r) & (dy >= -r) & (np.abs(dx) <= (dy + r) * 0.6)
    if shape.kind == "cross":
        arm = r * 0.35
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= r)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= r))
    raise ValueError(f"unknown shape {shape.kind!r}; choose one of {', '.join(SHAPES)}")


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A low-saturation textured background: noise, stripes, checkerboard or a gradient, plus pixel noise."""
    base = rng.uniform(70, 150) + rng.uniform(-12, 12, size=3)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    kind = rng.integers(4)
    amplitude = rng.uniform(10, 30)
    if kind == 0:
        pattern = rng.normal(0, 1, (size // 4, size // 4)).repeat(4, 0).repeat(4, 1)
    elif kind == 1:
        angle, period = rng.uniform(0, np.pi), rng.uniform(4, 12)
        pattern = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period)
    elif kind == 2:
        cell = int(rng.integers(3, 9))
        pattern = ((xx // cell + yy // cell) % 2) * 2 - 1.0
    else:
        angle = rng.uniform(0, 2 * np.pi)
        pattern = ((xx - size / 2) * np.cos(angle) + (yy - size / 2) * np.sin(angle)) / (size / 2)
    image = base + amplitude * pattern[..., None] + rng.normal(0, 4, (size, size, 3))
    return image


def render(shapes: tuple[Shape, ...], rng: np.random.Generator, size: int = IMAGE_SIZE) -> np.ndarray:
    """Draw ``shapes`` (with a little colour jitter) over a random textured background; uint8 [H, W, 3]."""
    image = _background(rng, size)
    for shape in shapes:
        colour = np.array(COLOURS[shape.colour], dtype=np.float64) + rng.uniform(-20, 20, size=3)
        image[shape_mask(shape, size)] = colour
    return np.clip(image, 0, 255).astype(np.uint8)


def _place(
    rng: np.random.Generator, kinds: list[str], colours: list[str], first_cell: int | None, size: int
) -> tuple[Shape, ...] | None:
    """Non-overlapping placement; the first object in cell ``first_cell`` of a 4x4 layout when given."""
    shapes: list[Shape] = []
    for i, (kind, colour) in enumerate(zip(kinds, colours)):
        radius = rng.uniform(5.0, 7.0)
        for _ in range(100):
            if i == 0 and first_cell is not None:
                cell = size / 4
                x = rng.uniform(first_cell % 4 * cell, (first_cell % 4 + 1) * cell)
                y = rng.uniform(first_cell // 4 * cell, (first_cell // 4 + 1) * cell)
                x, y = float(np.clip(x, radius, size - radius)), float(np.clip(y, radius, size - radius))
            else:
                x, y = rng.uniform(radius, size - radius, size=2)
            if all((x - s.x) ** 2 + (y - s.y) ** 2 > (radius + s.radius + 2) ** 2 for s in shapes):
                shapes.append(Shape(kind, colour, float(x), float(y), float(radius)))
                break
        else:
            return None
    return tuple(shapes)


def _side_is_ambiguous(shape: Shape) -> bool:
    """Whether ``shape`` is centred too close to a dividing line for a left/right or top/bottom question."""
    return min(abs(shape.x - IMAGE_SIZE / 2), abs(shape.y - IMAGE_SIZE / 2)) < SIDE_MARGIN


def _question(rng: np.random.Generator, kind: str, shapes: tuple[Shape, ...]) -> tuple[str, str, Shape | None]:
    """A colour, side or exists question about ``shapes``: (question, answer, queried object)."""
    target = shapes[0]
    if kind == "colour":
        return f"what colour is the {target.kind} ?", target.colour, target
    if kind == "side":
        if rng.random() < 0.5:
            return (
                f"is the {target.kind} on the left or right ?",
                "left" if target.x < IMAGE_SIZE / 2 else "right",
                target,
            )
        return f"is the {target.kind} at the top or bottom ?", "top" if target.y < IMAGE_SIZE / 2 else "bottom", target
    if kind == "exists":
        if rng.random() < 0.5:
            return f"is there a {target.colour} {target.kind} ?", "yes", target
        present = {(s.kind, s.colour) for s in shapes}
        # Hard negatives: a present shape in another colour, or a present colour on another shape.
        kinds = [k for k in SHAPES if (k, target.colour) not in present]
        if rng.random() < 0.5 or not kinds:
            colour = str(rng.choice([c for c in COLOURS if (target.kind, c) not in present]))
            return f"is there a {colour} {target.kind} ?", "no", None
        return f"is there a {target.colour} {rng.choice(kinds)} ?", "no", None
    raise ValueError(f"unknown question type {kind!r}; choose one of {', '.join(QUESTION_TYPES)}")


def make_item(
    rng: np.random.Generator, kind: str | None = None, cell: int | None = None, objects: tuple[int, int] = (2, 4)
) -> Item:
    """One random (image, question, answer) with ``objects`` (min, max) shapes; ``cell`` (0..15) pins the
    queried object to a 4x4 image cell."""
    kind = kind or str(rng.choice(QUESTION_TYPES))
    while True:
        count = int(rng.integers(objects[0], objects[1] + 1))
        kinds = [str(k) for k in rng.permutation(SHAPES)[:count]]
        if kind == "count":  # balance the answers 0..3: draw the count first, then colour the scene to fit
            wanted, colour = int(rng.integers(0, 4)), str(rng.choice(list(COLOURS)))
            count = max(count, wanted)
            kinds = [str(k) for k in rng.permutation(SHAPES)[:count]]
            others = [c for c in COLOURS if c != colour]
            colours = [colour] * wanted + [str(rng.choice(others)) for _ in range(count - wanted)]
            colours = [str(c) for c in rng.permutation(colours)]
        else:
            colours = [str(rng.choice(list(COLOURS))) for _ in range(count)]
        shapes = _place(rng, kinds, colours, cell if kind != "count" else None, IMAGE_SIZE)
        if shapes is None:
            continue
        if kind == "side" and _side_is_ambiguous(shapes[0]):
            continue
        if kind == "count":
            question = f"how many {colour} shapes are there ?"
            answer = NUMBERS[sum(s.colour == colour for s in shapes)]
            return Item(render(shapes, rng), shapes, question, answer, kind, None)
        question, answer, target = _question(rng, kind, shapes)
        return Item(render(shapes, rng), shapes, question, answer, kind, target)


def follow_up_questions(rng: np.random.Generator, shapes: tuple[Shape, ...], count: int) -> list[tuple[str, str]]:
    """``count`` more (question, answer) pairs about the same scene, of random types and targets (training
    sequences ask several questions per image, so one vision and prefix pass supervises several answers)."""
    pairs: list[tuple[str, str]] = []
    while len(pairs) < count:
        kind = str(rng.choice(QUESTION_TYPES))
        if kind == "count":
            present = sorted({s.colour for s in shapes})
            colour = str(rng.choice(present if rng.random() < 0.75 else list(COLOURS)))
            number = sum(s.colour == colour for s in shapes)
            if number < len(NUMBERS):  # four shapes of one colour has no answer word
                pairs.append((f"how many {colour} shapes are there ?", NUMBERS[number]))
            continue
        first = int(rng.integers(len(shapes)))
        ordered = (shapes[first],) + shapes[:first] + shapes[first + 1 :]  # _question asks about the first shape
        if kind == "side" and _side_is_ambiguous(ordered[0]):
            continue
        question, answer, _ = _question(rng, kind, ordered)
        pairs.append((question, answer))
    return pairs


def make_split(split: str, size: int | None = None) -> list[Item]:
    """The fixed ``val`` or ``test`` split (question types balanced; in test the queried object's cell
    cycles over a 4x4 layout of the image)."""
    if split not in SPLIT_SIZES:
        raise ValueError(f"unknown split {split!r}; fixed splits are {', '.join(SPLIT_SIZES)} (train is streamed)")
    rng = np.random.default_rng(SPLIT_SEEDS[split])
    size = SPLIT_SIZES[split] if size is None else size
    return [make_item(rng, QUESTION_TYPES[i % 4], cell=(i // 4) % 16 if split == "test" else None) for i in range(size)]
