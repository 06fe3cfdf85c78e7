"""Budgets -> validated per-stage keep counts (docs/method.md#budgets), and the frozen spec of each stage."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

# The choices a plan is made of; plain data here (no torch), so the CLI can list them without importing torch.
SCORE_TYPES = ("clse_attn", "clse", "attn", "l2", "random", "uniform", "dart", "cdpruner")
# The peers' selections (clse_fx/peer_scores.py), which read the instruction tokens too.
PEER_SCORES = ("dart", "cdpruner")
# Scores that read nothing of layer K-1 (its attention or keys), so a stage can also sit before layer 0, where
# CDPruner prunes (before the decoder, on the projected visual features).
LAYER0_SCORES = ("cdpruner", "l2", "random", "uniform")
MERGE_MODES = ("none", "tome")
MERGE_METRICS = ("hidden", "keys")
Grid = tuple[int, int, int]  # (T, H, W) of one grid of visual tokens
# How one row's visual tokens are laid out, in sequence order (docs/method.md#token-layouts): a tuple of
# segments, each ("grid", T, H, W), T frames of H x W tokens that the spectral filter scores frame by frame,
# optionally ("grid", T, H, W, r) with r extra tokens after each row (LLaVA-NeXT's row newlines), or
# ("extra", n), n tokens (CLS, separators) never scored and always kept in their places. Plain tuples, so
# stage specs holding them stay constants FX can write into graph code.
Segment = tuple
Layout = tuple[Segment, ...]


def grid_layout(t: int, h: int, w: int) -> Layout:
    """The layout of visual tokens forming one (T, H, W) grid (every family before segments)."""
    return (("grid", int(t), int(h), int(w)),)


def check_layout(layout: Layout) -> Layout:
    """``layout`` as a tuple of valid segments with at least one grid; a ValueError says what is wrong."""
    layout = tuple(tuple(segment) for segment in layout)
    for segment in layout:
        kind, *sizes = segment
        valid = (kind == "grid" and len(sizes) in (3, 4)) or (kind == "extra" and len(sizes) == 1)
        if not valid or not all(isinstance(n, int) and n >= 1 for n in sizes[:3]) or min(sizes) < 0:
            raise ValueError(
                f"bad layout segment {segment!r}: use ('grid', T, H, W[, extras per row]) or ('extra', n), sizes >= 1"
            )
    if not any(segment[0] == "grid" for segment in layout):
        raise ValueError("a visual layout needs at least one grid segment to score")
    return layout


def _row_extras(segment: Segment) -> int:
    return segment[4] if len(segment) == 5 else 0


def segment_size(segment: Segment) -> int:
    """Tokens in one segment."""
    if segment[0] == "extra":
        return segment[1]
    return segment[1] * segment[2] * (segment[3] + _row_extras(segment))


def layout_grids(layout: Layout) -> tuple[Grid, ...]:
    """The (T, H, W) of each grid segment, in order."""
    return tuple(tuple(segment[1:4]) for segment in layout if segment[0] == "grid")


def scored_count(layout: Layout) -> int:
    """Visual tokens that are scored and pruned (the grids'): what budgets count."""
    return sum(t * h * w for t, h, w in layout_grids(layout))


def _is_extra(layout: Layout) -> list[bool]:
    """For each of a row's visual tokens, in order: whether it is an extra (always kept) token."""
    flags: list[bool] = []
    for segment in layout:
        if segment[0] == "extra":
            flags += [True] * segment[1]
        else:
            row = [False] * segment[3] + [True] * _row_extras(segment)
            flags += row * (segment[1] * segment[2])
    return flags


def extra_positions(layout: Layout) -> tuple[int, ...]:
    """Indices, within a row's visual tokens, of the extra (always kept) tokens."""
    return tuple(i for i, extra in enumerate(_is_extra(layout)) if extra)


def scored_positions(layout: Layout) -> tuple[int, ...]:
    """Indices, within a row's visual tokens, of the grids' tokens, in order (each grid's row-major order)."""
    return tuple(i for i, extra in enumerate(_is_extra(layout)) if not extra)


@dataclass(frozen=True)
class ReferenceSchedule:
    """A published three-stage schedule: stage layers at a reference depth and keep counts per budget.

    ``unit`` says how budgets are quoted: "count" (average visual tokens per layer, LLaVA-1.5) or
    "ratio" (share of the visual tokens, Qwen2-VL). ``table`` maps a budget to per-stage keeps in that
    unit; other budgets are scaled by ``multipliers``.
    """

    name: str
    depth: int
    layers: tuple[int, ...]
    unit: str
    table: dict[float, tuple[float, ...]] = field(default_factory=dict)
    multipliers: tuple[float, ...] = ()


LLAVA_SCHEDULE = ReferenceSchedule(
    name="llava",
    depth=32,
    layers=(1, 11, 21),
    unit="count",
    table={192: (330, 210, 62), 128: (220, 140, 41), 64: (110, 70, 20)},
    multipliers=(1.72, 1.09, 0.32),
)
QWEN2_VL_SCHEDULE = ReferenceSchedule(
    name="qwen2_vl",
    depth=28,
    layers=(1, 10, 19),
    unit="ratio",
    table={0.334: (0.57, 0.36, 0.098), 0.223: (0.38, 0.24, 0.066), 0.112: (0.19, 0.12, 0.034)},
    multipliers=(1.71, 1.08, 0.294),
)


@dataclass(frozen=True)
class Plan:
    """Per-stage pruning plan: before decoder layer ``layer``, keep ``keep`` visual tokens."""

    stages: tuple[tuple[int, int], ...]
    num_layers: int
    num_visual: int

    @property
    def avg_visual_tokens(self) -> float:
        """Visual tokens each decoder layer runs on, averaged over all layers."""
        return sum(self.visual_tokens_per_layer()) / self.num_layers

    def visual_tokens_per_layer(self) -> list[int]:
        counts, current = [], self.num_visual
        keeps = dict(self.stages)
        for layer in range(self.num_layers):
            current = keeps.get(layer, current)
            counts.append(current)
        return counts

    @property
    def is_noop(self) -> bool:
        """True when every stage keeps all visual tokens (pruning disabled)."""
        return all(keep == self.num_visual for _, keep in self.stages)

    def describe(self) -> str:
        stages = ", ".join(f"layer {layer}: {keep}" for layer, keep in self.stages)
        return f"{stages} of {self.num_visual} visual tokens (avg {self.avg_visual_tokens:.1f}/layer)"


def check_budget_given(keep: float | None, stages: object | None) -> None:
    """Exactly one of a budget and explicit stages; a budget is a whole count >= 1 or a ratio in (0, 1) (whether
    the count fits the model's visual tokens is checked once the model is known)."""
    if keep is None and stages is None:
        raise ValueError("give a budget (--keep N or --keep RATIO) or explicit --stages LAYER:KEEP,...")
    if keep is not None and stages is not None:
        raise ValueError("--keep and --stages both given; pass one: a budget or explicit stages")
    if keep is not None and not (0 < keep < 1 or (keep >= 1 and float(keep).is_integer())):
        raise ValueError(
            f"keep={keep:g} is neither a token count nor a ratio in (0, 1): use a budget of at least 1 or a ratio, "
            "e.g. --keep 128 or 0.25"
        )


def parse_stages(text: str) -> list[tuple[int, int]]:
    """Parse ``"1:330,11:210,21:62"`` into [(1, 330), (11, 210), (21, 62)]."""
    stages = []
    for item in text.split(","):
        layer, sep, keep = item.strip().partition(":")
        if not sep or not layer.strip().lstrip("-").isdigit() or not keep.strip().lstrip("-").isdigit():
            raise ValueError(f"bad stage {item.strip()!r}: write stages as LAYER:KEEP pairs, e.g. 1:330,11:210,21:62")
        stages.append((int(layer), int(keep)))
    return stages


def _scaled_layers(schedule: ReferenceSchedule, num_layers: int) -> list[int]:
    """The schedule's stage layers moved to the same relative depths of a ``num_layers``-deep decoder."""
    if num_layers < len(schedule.layers) + 1:
        raise ValueError(
            f"the model has {num_layers} decoder layers, too few for a {len(schedule.layers)}-stage plan; "
            f"pass explicit stages, e.g. --stages 1:KEEP"
        )
    count = len(schedule.layers)
    layers = [max(1, round(ref * num_layers / schedule.depth)) for ref in schedule.layers]
    for i in range(1, count):  # collisions on shallow models: keep the stages strictly increasing
        layers[i] = max(layers[i], layers[i - 1] + 1)
    # ... and below the last layer (the caps rise by one per stage, so the order survives).
    return [min(layer, num_layers - count + i) for i, layer in enumerate(layers)]


def _scheduled_keeps(schedule: ReferenceSchedule, keep: float, num_visual: int) -> list[int]:
    """Per-stage keep counts for a budget in the schedule's unit, capped at ``num_visual``. Counts are rounded;
    ratios follow the published Qwen2-VL code, ``max(1, int(num_visual * ratio))`` (floor)."""
    if schedule.unit == "count":
        budget = keep
        per_stage = schedule.table.get(budget) or [budget * m for m in schedule.multipliers]
        counts = [round(x) for x in per_stage]
    else:
        ratio = keep
        per_stage = schedule.table.get(round(ratio, 3)) or [ratio * m for m in schedule.multipliers]
        counts = [int(num_visual * r) for r in per_stage]
    return [min(max(c, 1), num_visual) for c in counts]


def plan_budget(
    keep: float | None,
    num_layers: int,
    num_visual: int,
    stages: list[tuple[int, int]] | str | None = None,
    schedule: ReferenceSchedule = LLAVA_SCHEDULE,
) -> Plan:
    """Turn a budget into a validated :class:`Plan`.

    ``keep`` is an average visual-token count (an int, or an integral float) or a ratio of the visual
    tokens (a float in (0, 1)); or ``stages`` (``[(layer, keep), ...]`` or ``"1:330,11:210"``) instead of the
    schedule. Invalid input raises ValueError saying what to change.
    """
    check_budget_given(keep, stages)
    if num_layers < 2:
        raise ValueError(f"the model needs at least 2 decoder layers to prune between them, it has {num_layers}")
    if num_visual < 1:
        raise ValueError(f"there are no visual tokens to prune (num_visual={num_visual}); compile with an image")
    if stages is not None:
        if isinstance(stages, str):
            stages = parse_stages(stages)
        return _validated(list(stages), num_layers, num_visual)
    is_ratio = isinstance(keep, float) and 0 < keep < 1
    count = keep * num_visual if is_ratio else int(keep)
    if count < 1:  # a ratio too small for this model (other budgets were checked above)
        raise ValueError(f"keep={keep} leaves less than one visual token; use a budget of at least 1")
    if count > num_visual:
        raise ValueError(
            f"keep={keep} exceeds the {num_visual} visual tokens of this model; use a budget <= {num_visual}"
        )
    # Express the budget in the schedule's own unit before looking it up.
    if schedule.unit == "count":
        budget: float = round(count) if is_ratio else count
    else:
        budget = keep if is_ratio else count / num_visual
    # A budget of every visual token disables pruning (the schedule would still cut the last stages).
    keeps = (
        [num_visual] * len(schedule.layers) if count == num_visual else _scheduled_keeps(schedule, budget, num_visual)
    )
    return _validated(list(zip(_scaled_layers(schedule, num_layers), keeps)), num_layers, num_visual)


def check_plan_fits(
    keep: float | None,
    stages: list[tuple[int, int]] | str | None,
    num_layers: int | None,
    num_visual: int | None,
    schedule: ReferenceSchedule = LLAVA_SCHEDULE,
) -> None:
    """Every check of :func:`plan_budget` that the model's depth and visual-token count decide, when either is
    known before the model loads (from its config.json: ``clse_fx.config_facts``); None skips what needs it."""
    if num_layers is None:
        return
    if num_visual is not None:
        plan_budget(keep, num_layers, num_visual, stages, schedule)
    elif stages is not None:
        for layer, _ in parse_stages(stages) if isinstance(stages, str) else stages:
            _check_stage_layer(layer, num_layers)


def _check_stage_layer(layer: int, num_layers: int) -> None:
    if not 0 <= layer < num_layers:
        raise ValueError(
            f"stage layer {layer} is out of range: use 0..{num_layers - 1} (the model has {num_layers} decoder "
            f"layers; layer 0 only with --score {'/'.join(LAYER0_SCORES)}, which need no layer K-1)"
        )


def check_score_layers(score: str, stages: Iterable[tuple[int, int]]) -> None:
    """A stage before layer 0 needs a score that reads nothing of layer K-1 (``LAYER0_SCORES``)."""
    if score not in LAYER0_SCORES and any(layer == 0 for layer, _ in stages):
        raise ValueError(
            f"--score {score} reads layer K-1's attention or keys, which a stage before layer 0 does not have: "
            f"start the stages at layer 1, or use --score {'/'.join(LAYER0_SCORES)}"
        )


def _validated(stages: list[tuple[int, int]], num_layers: int, num_visual: int) -> Plan:
    if not stages:
        raise ValueError("a plan needs at least one stage, e.g. --stages 1:64")
    previous_layer, previous_keep = -1, num_visual
    for layer, keep in stages:
        _check_stage_layer(layer, num_layers)
        if layer <= previous_layer:
            raise ValueError(f"stage layers must increase, got {layer} after {previous_layer}; sort the stages")
        if not 1 <= keep <= num_visual:
            raise ValueError(f"stage keep {keep} at layer {layer} is out of range: use 1..{num_visual} visual tokens")
        if keep > previous_keep:
            raise ValueError(
                f"stage keep {keep} at layer {layer} grows from {previous_keep}; keep counts must not increase"
            )
        previous_layer, previous_keep = layer, keep
    return Plan(stages=tuple(stages), num_layers=num_layers, num_visual=num_visual)


KV_POLICIES = ("uniform", "per-layer")


@dataclass(frozen=True)
class PruneConfig:
    """Everything that decides which tokens are kept: the plan plus the score's hyper-parameters."""

    plan: Plan
    score: str = "clse_attn"
    cutoff: float = 0.1
    temp: float = 0.1
    seed: int = 0
    kv_policy: str = "uniform"
    merge: str = "none"  # "tome": merge pruned visual tokens into kept ones instead of dropping them
    merge_metric: str = "hidden"  # similarity on hidden states or on layer K-1's (head-averaged) keys

    def __post_init__(self) -> None:
        if self.merge not in MERGE_MODES:
            raise ValueError(f"unknown merge mode {self.merge!r}; choose one of {', '.join(MERGE_MODES)}")
        if self.merge_metric not in MERGE_METRICS:
            raise ValueError(f"unknown merge metric {self.merge_metric!r}; choose one of {', '.join(MERGE_METRICS)}")
        if self.score not in SCORE_TYPES:
            raise ValueError(f"unknown score {self.score!r}; choose one of {', '.join(SCORE_TYPES)}")
        if self.kv_policy not in KV_POLICIES:
            raise ValueError(f"unknown KV policy {self.kv_policy!r}; choose one of {', '.join(KV_POLICIES)}")
        if self.cutoff < 0:
            raise ValueError(f"cutoff must be >= 0, got {self.cutoff}")
        if self.temp <= 0:
            raise ValueError(f"temp must be > 0, got {self.temp}")
        check_score_layers(self.score, self.plan.stages)

    def stage_specs(self, layout: Layout, token_ids: tuple[int, ...]) -> tuple[StageSpec, ...]:
        """One :class:`StageSpec` per planned stage, for visual tokens laid out as ``layout`` and marked by
        ``token_ids``."""
        layout = check_layout(layout)
        if scored_count(layout) != self.plan.num_visual:
            raise ValueError(
                f"the plan is for {self.plan.num_visual} scored visual tokens but the prompt's layout has "
                f"{scored_count(layout)}; compile for this prompt's images"
            )
        specs, num_current = [], self.plan.num_visual
        for index, (layer, keep) in enumerate(self.plan.stages):
            specs.append(
                StageSpec(
                    index=index,
                    layer=layer,
                    keep=keep,
                    num_current=num_current,
                    layout=layout,
                    token_ids=tuple(token_ids),
                    score=self.score,
                    cutoff=self.cutoff,
                    temp=self.temp,
                    seed=self.seed,
                    merge=self.merge,
                    merge_metric=self.merge_metric,
                )
            )
            num_current = keep
        return tuple(specs)


class StageSpec(NamedTuple):
    """Everything that decides one stage (before decoder layer ``layer``, keep ``keep`` of the ``num_current``
    scored visual tokens left, plus every extra token of ``layout``): the one argument the inserted stage op and
    the reference pruner's stage take besides tensors. ``scale`` is the attention's softmax scale, read from the
    model's attention at the cut.

    Immutable, and a NamedTuple rather than a dataclass because FX's code generation writes namedtuple
    constants of call_function nodes into the graph's Python code with their type in scope."""

    index: int
    layer: int
    keep: int
    num_current: int
    layout: Layout
    token_ids: tuple[int, ...]
    score: str
    cutoff: float
    temp: float
    seed: int
    merge: str
    merge_metric: str
    scale: float | None = None

    @property
    def extras(self) -> tuple[int, ...]:
        """Positions, among the row's visual tokens, of the tokens every stage keeps unscored."""
        return extra_positions(self.layout)

    @property
    def visual_in(self) -> int:
        """Visual positions entering the stage: the scored tokens left plus the extras."""
        return self.num_current + len(self.extras)

    @property
    def visual_out(self) -> int:
        """Visual positions leaving the stage."""
        return self.keep + len(self.extras)
